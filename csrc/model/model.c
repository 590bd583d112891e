/* model.c — the whole Llama forward and backward over the kernels.
 *
 * What the seed's model_backward was, done right: one call per step, any
 * number of layers, GQA, RMSNorm weight gradients, the FFN norm
 * differentiated at its real input, one gradient for a tied classifier,
 * int64 sizes throughout. The same code runs llama2.c's Llama 2 and the
 * Hugging Face Llama 3 / Qwen3 shapes: head_dim independent of dim (q is
 * qd = n_heads*head_dim wide), Qwen3's per-head q/k RMSNorm, RoPE layout,
 * theta and Llama-3 scaling (ab_model_config's fields after `reference`).
 *
 * Parameters: one flat float buffer laid out by ab_model_param_layout:
 *   [tok_embeddings | wq(L) | wk(L) | wv(L) | wo(L) | w1(L) | w2(L) | w3(L)
 *    | output (untied only) | attention_norm(L) | ffn_norm(L) | norm
 *    | q_norm(L) | k_norm(L) (qk_norm only)]
 * Every 2-D weight comes first, every 1-D norm weight last, so weight decay
 * is a prefix of the buffer (n_decay floats). Gradients use the same layout.
 *
 * Activations: a caller-owned workspace of ab_model_workspace_floats floats,
 * reused across steps of one (B, S). Per layer l it keeps what the backward
 * needs, N = B*S rows:
 *   X[l]    residual input of layer l            [N, dim]   (X[L] = final)
 *   XA[l]   attention_norm(X[l])                 [N, dim]
 *   QR[l], KR[l]  XA wq^T, XA wk^T (qk_norm only: the q/k norms' inputs)
 *   Q[l]    rope(qnorm(XA wq^T))                 [N, qd]
 *   K[l]    rope(knorm(XA wk^T)), V[l] = XA wv^T [N, kv_dim]
 *   AT[l]   attention(Q, K, V)                   [N, qd]
 *   HM[l]   X[l] + AT wo^T  (FFN-norm input)     [N, dim]
 *   XF[l]   ffn_norm(HM[l])                      [N, dim]
 *   H1[l], H3[l]  XF w1^T, XF w3^T               [N, hidden]
 *   X[l+1] = HM[l] + swiglu(H1, H3) w2^T
 * then XN = norm(X[L]) [N, dim] and LOGITS [N, vocab]. swiglu(H1, H3) is
 * recomputed in the backward rather than stored. The forward with
 * want_grad writes dlogits over LOGITS, so the backward starts from it.
 * With c->recompute the workspace keeps only X[0..L] and ONE layer's set of
 * the other activations: the forward overwrites it layer after layer, and
 * the backward recomputes layer l's from X[l] just before differentiating
 * it. The kernels are deterministic, so the gradients are bit-identical.
 *
 * Like llm.c's gpt2_forward/gpt2_backward, the forward keeps what the
 * backward needs besides activations: a header at offset 0 of the workspace
 * (HDR_FLOATS floats: a "dlogits ready" tag, B, S) and a copy of the tokens
 * (TOKENS, N int32 in N float slots). The backward takes no tokens; it
 * refuses to run unless the tag is set and B, S match, and clears the tag
 * (one backward per forward). The header is at a fixed place so a backward
 * with the wrong B or S is recognised before any layout is derived from them.
 */
#include "ab_internal.h"

/* The kernels the model runs: fast (BLAS + SIMD) or the seed's loops. */
typedef struct {
    int (*linear_forward)(float *, const float *, const float *, int64_t, int64_t, int64_t);
    int (*linear_backward_dx)(float *, const float *, const float *, int64_t, int64_t, int64_t, int);
    int (*linear_backward_dW)(float *, const float *, const float *, int64_t, int64_t, int64_t, int);
    int (*rmsnorm_forward)(float *, const float *, const float *, int64_t, int64_t, float);
    int (*rmsnorm_backward)(float *, float *, const float *, const float *, const float *,
                            int64_t, int64_t, float, int);
    int (*rope_forward)(float *, const float *, int64_t, int64_t, int64_t, int64_t, int64_t,
                        const ab_rope_params *);
    int (*rope_backward)(float *, const float *, int64_t, int64_t, int64_t, int64_t, int64_t,
                         const ab_rope_params *);
    int (*attention_forward)(float *, const float *, const float *, const float *, int64_t,
                             int64_t, int64_t, int64_t, int64_t, float *, int64_t);
    int (*attention_backward)(float *, float *, float *, const float *, const float *,
                              const float *, const float *, int64_t, int64_t, int64_t,
                              int64_t, int64_t, float *, int64_t);
    int (*swiglu_forward)(float *, const float *, const float *, int64_t);
    int (*swiglu_backward)(float *, float *, const float *, const float *, const float *, int64_t);
    int (*cross_entropy)(double *, int64_t *, float *, const float *, const int32_t *,
                         int64_t, int64_t, float);
    int (*embedding_forward)(float *, const float *, const int32_t *, int64_t, int64_t, int64_t);
    int (*embedding_backward)(float *, const float *, const int32_t *, int64_t, int64_t, int64_t);
} kernel_table;

/* Designated initialisers: a reordered or added member cannot silently
 * pair a slot with the wrong kernel. */
static const kernel_table FAST = {
    .linear_forward = ab_linear_forward,
    .linear_backward_dx = ab_linear_backward_dx,
    .linear_backward_dW = ab_linear_backward_dW,
    .rmsnorm_forward = ab_rmsnorm_forward,
    .rmsnorm_backward = ab_rmsnorm_backward,
    .rope_forward = ab_rope_forward_ex,
    .rope_backward = ab_rope_backward_ex,
    .attention_forward = ab_attention_forward,
    .attention_backward = ab_attention_backward,
    .swiglu_forward = ab_swiglu_forward,
    .swiglu_backward = ab_swiglu_backward,
    .cross_entropy = ab_cross_entropy,
    .embedding_forward = ab_embedding_forward,
    .embedding_backward = ab_embedding_backward,
};
static const kernel_table REFERENCE = {
    .linear_forward = ab_ref_linear_forward,
    .linear_backward_dx = ab_ref_linear_backward_dx,
    .linear_backward_dW = ab_ref_linear_backward_dW,
    .rmsnorm_forward = ab_ref_rmsnorm_forward,
    .rmsnorm_backward = ab_ref_rmsnorm_backward,
    .rope_forward = ab_ref_rope_forward_ex,
    .rope_backward = ab_ref_rope_backward_ex,
    .attention_forward = ab_ref_attention_forward,
    .attention_backward = ab_ref_attention_backward,
    .swiglu_forward = ab_ref_swiglu_forward,
    .swiglu_backward = ab_ref_swiglu_backward,
    .cross_entropy = ab_ref_cross_entropy,
    .embedding_forward = ab_ref_embedding_forward,
    .embedding_backward = ab_ref_embedding_backward,
};

#define TRY(call) do { int rc_ = (call); if (rc_) return rc_; } while (0)
#define AB_SIZE_LIMIT 4503599627370496.0   /* 2^52 floats */

/* Workspace header: int64 words stored in float slots with memcpy. */
enum { HDR_TAG = 0, HDR_B = 2, HDR_S = 4, HDR_FLOATS = 8 };
static const int64_t READY_TAG = 0x0a59444145524241LL;   /* "ABREADY\n" */

static int64_t hdr_get(const float *work, int slot) {
    int64_t v;
    memcpy(&v, work + slot, sizeof v);
    return v;
}
static void hdr_set(float *work, int slot, int64_t v) { memcpy(work + slot, &v, sizeof v); }


/* The model's sizes, derived once from a checked config. */
typedef struct {
    int64_t L, D, Hd, V, H, KV, hd, qd, kv;
} dims;

static dims model_dims(const ab_model_config *c) {
    dims d;
    d.L = c->n_layers; d.D = c->dim; d.Hd = c->hidden_dim; d.V = c->vocab_size;
    d.H = c->n_heads; d.KV = c->n_kv_heads;
    d.hd = c->head_dim ? c->head_dim : c->dim / c->n_heads;
    d.qd = d.H * d.hd; d.kv = d.KV * d.hd;
    return d;
}

int ab_model_config_check(const ab_model_config *c) {
    AB_NONNULL(c);
    AB_REQUIRE(c->dim > 0 && c->hidden_dim > 0 && c->n_layers > 0 && c->n_heads > 0
               && c->n_kv_heads > 0 && c->vocab_size > 0 && c->max_seq_len > 0, AB_EINVAL);
    AB_REQUIRE(c->head_dim >= 0, AB_EINVAL);
    if (c->head_dim == 0) AB_REQUIRE(c->dim % c->n_heads == 0, AB_EINVAL);
    const int64_t hd = c->head_dim ? c->head_dim : c->dim / c->n_heads;
    AB_REQUIRE(hd > 0 && hd % 2 == 0, AB_EINVAL);                   /* RoPE pairs */
    AB_REQUIRE(c->n_heads % c->n_kv_heads == 0, AB_EINVAL);
    AB_REQUIRE(c->norm_eps >= 0.0f, AB_EINVAL);
    TRY(ab_rope_params_check(&c->rope));
    AB_BLAS_FITS(c->dim); AB_BLAS_FITS(c->hidden_dim); AB_BLAS_FITS(c->vocab_size);
    /* Sizes are sums of products of these dimensions; an upper bound of each
     * computed in double (no overflow there) keeps every int64 product and
     * partial sum below 2^52. Bigger models could not be allocated anyway. */
    const double L = (double)c->n_layers, D = (double)c->dim, Hd = (double)c->hidden_dim;
    const double V = (double)c->vocab_size, T = (double)c->max_seq_len;
    const double Q = (double)c->n_heads * (double)hd;              /* q width, >= kv width */
    AB_REQUIRE(Q < AB_SIZE_LIMIT, AB_ETOOBIG);
    AB_BLAS_FITS(c->n_heads * hd);
    AB_REQUIRE(2 * V * D + L * (4 * Q * D + 3 * Hd * D + 2 * D + 2 * Q) + D < AB_SIZE_LIMIT,
               AB_ETOOBIG);
    AB_REQUIRE(2 * L * T * Q + 4 * (D + Q) + 2 * Hd + T < AB_SIZE_LIMIT, AB_ETOOBIG);  /* decode */
    return AB_OK;
}

int ab_model_param_layout(const ab_model_config *c, ab_model_layout *o) {
    TRY(ab_model_config_check(c));
    AB_NONNULL(o);
    const dims d = model_dims(c);
    const int64_t L = d.L, D = d.D, Hd = d.Hd, V = d.V;
    int64_t p = 0;
    o->tok_embeddings = p; p += V * D;
    o->wq = p; p += L * d.qd * D;
    o->wk = p; p += L * d.kv * D;
    o->wv = p; p += L * d.kv * D;
    o->wo = p; p += L * D * d.qd;
    o->w1 = p; p += L * Hd * D;
    o->w2 = p; p += L * D * Hd;
    o->w3 = p; p += L * Hd * D;
    if (c->shared_classifier) o->output = o->tok_embeddings;
    else { o->output = p; p += V * D; }
    o->n_decay = p;
    o->attention_norm = p; p += L * D;
    o->ffn_norm = p; p += L * D;
    o->norm = p; p += D;
    o->q_norm = p; if (c->qk_norm) p += L * d.hd;
    o->k_norm = p; if (c->qk_norm) p += L * d.hd;
    o->n_params = p;
    return AB_OK;
}

/* Workspace offsets (floats) for a batch of B sequences of S tokens. The
 * per-layer activations (XA .. H3) are `slots` deep: L, or 1 with recompute. */
typedef struct {
    int64_t X, XA, QR, KR, Q, K, V, AT, HM, XF, H1, H3, XN, LOGITS;  /* saved activations */
    int64_t G, DH1, DH3, DX, DXN, DA, DQ, DK, DV, DQN, DKN, ATTW;    /* scratch */
    int64_t TOKENS;  /* the forward's tokens, N int32 (the header is at 0) */
    int64_t slots, total;
} ws_layout;

static int workspace_layout(const ab_model_config *c, int64_t B, int64_t S, ws_layout *w) {
    TRY(ab_model_config_check(c));
    AB_REQUIRE(B > 0 && S > 0, AB_EINVAL);
    const dims d = model_dims(c);
    {   /* an upper bound of the total in double: no int64 overflow below */
        const double n = (double)B * (double)S, Ld = (double)c->n_layers + 2;
        const double est = Ld * n * (5.0 * c->dim + 8.0 * (double)d.qd + 5.0 * c->hidden_dim)
                           + n * c->vocab_size + 2.0 * (double)S * (double)S + n + HDR_FLOATS;
        AB_REQUIRE(est < AB_SIZE_LIMIT, AB_ETOOBIG);
    }
    const int64_t L = d.L, D = d.D, Hd = d.Hd, V = d.V, qd = d.qd, kv = d.kv, N = B * S;
    const int64_t R = c->recompute ? 1 : L;        /* activation slots */
    const int64_t qn = c->qk_norm ? 1 : 0;
    AB_BLAS_FITS(N);
    int64_t p = HDR_FLOATS;
    w->slots = R;
    w->TOKENS = p; p += N;
    w->X = p; p += (L + 1) * N * D;
    w->XA = p; p += R * N * D;
    w->QR = p; p += qn * R * N * qd;
    w->KR = p; p += qn * R * N * kv;
    w->Q = p; p += R * N * qd;
    w->K = p; p += R * N * kv;
    w->V = p; p += R * N * kv;
    w->AT = p; p += R * N * qd;
    w->HM = p; p += R * N * D;
    w->XF = p; p += R * N * D;
    w->H1 = p; p += R * N * Hd;
    w->H3 = p; p += R * N * Hd;
    w->XN = p; p += N * D;
    w->LOGITS = p; p += N * V;
    w->G = p; p += N * Hd;
    w->DH1 = p; p += N * Hd;
    w->DH3 = p; p += N * Hd;
    w->DX = p; p += N * D;
    w->DXN = p; p += N * D;
    w->DA = p; p += N * qd;
    w->DQ = p; p += N * qd;
    w->DK = p; p += N * kv;
    w->DV = p; p += N * kv;
    w->DQN = p; p += qn * N * qd;
    w->DKN = p; p += qn * N * kv;
    w->ATTW = p; p += ab_attention_workspace_floats(S);
    w->total = p;
    return AB_OK;
}

int ab_model_workspace_floats(const ab_model_config *c, int64_t B, int64_t S,
                              int64_t *total, int64_t *logits_offset) {
    AB_NONNULL(total);
    ws_layout w;
    TRY(workspace_layout(c, B, S, &w));
    *total = w.total;
    if (logits_offset) *logits_offset = w.LOGITS;
    return AB_OK;
}

static void add_into(float *y, const float *a, const float *b, int64_t n) {
    AB_SIMD
    for (int64_t i = 0; i < n; i++) y[i] = a[i] + b[i];
}

/* One layer's activations in the workspace (slot l, or 0 with recompute). */
typedef struct {
    float *X, *XA, *QR, *KR, *Q, *K, *V, *AT, *HM, *XF, *H1, *H3;
} layer_acts;

static layer_acts acts_of(const ws_layout *W, const dims *d, float *work, int64_t N, int64_t l) {
    const int64_t s = W->slots == 1 ? 0 : l;
    layer_acts a;
    a.X = work + W->X + l * N * d->D;
    a.XA = work + W->XA + s * N * d->D;
    a.QR = work + W->QR + s * N * d->qd;
    a.KR = work + W->KR + s * N * d->kv;
    a.Q = work + W->Q + s * N * d->qd;
    a.K = work + W->K + s * N * d->kv;
    a.V = work + W->V + s * N * d->kv;
    a.AT = work + W->AT + s * N * d->qd;
    a.HM = work + W->HM + s * N * d->D;
    a.XF = work + W->XF + s * N * d->D;
    a.H1 = work + W->H1 + s * N * d->Hd;
    a.H3 = work + W->H3 + s * N * d->Hd;
    return a;
}

/* Layer l's forward from X[l]: its activations into their slot and, if
 * write_next, X[l+1] (a backward recompute leaves X[l+1] alone). */
static int layer_forward(const kernel_table *k, const ab_model_config *c, const dims *d,
                         const ab_model_layout *P, const ws_layout *W, const float *params,
                         float *work, int64_t B, int64_t S, int64_t l, int write_next) {
    const int64_t D = d->D, Hd = d->Hd, H = d->H, KV = d->KV, hd = d->hd;
    const int64_t qd = d->qd, kv = d->kv, N = B * S;
    const float eps = c->norm_eps;
    const float *wq = params + P->wq + l * qd * D, *wk = params + P->wk + l * kv * D;
    const float *wv = params + P->wv + l * kv * D, *wo = params + P->wo + l * D * qd;
    const float *w1 = params + P->w1 + l * Hd * D, *w2 = params + P->w2 + l * D * Hd;
    const float *w3 = params + P->w3 + l * Hd * D;
    const float *rms_att = params + P->attention_norm + l * D;
    const float *rms_ffn = params + P->ffn_norm + l * D;
    layer_acts a = acts_of(W, d, work, N, l);
    float *G = work + W->G, *T = work + W->DXN;   /* scratch */

    /* attention block */
    TRY(k->rmsnorm_forward(a.XA, a.X, rms_att, N, D, eps));
    if (c->qk_norm) {   /* Qwen3: q, k normalised per head before RoPE */
        TRY(k->linear_forward(a.QR, a.XA, wq, N, D, qd));
        TRY(k->linear_forward(a.KR, a.XA, wk, N, D, kv));
        TRY(k->rmsnorm_forward(a.Q, a.QR, params + P->q_norm + l * hd, N * H, hd, eps));
        TRY(k->rmsnorm_forward(a.K, a.KR, params + P->k_norm + l * hd, N * KV, hd, eps));
    } else {
        TRY(k->linear_forward(a.Q, a.XA, wq, N, D, qd));
        TRY(k->linear_forward(a.K, a.XA, wk, N, D, kv));
    }
    TRY(k->linear_forward(a.V, a.XA, wv, N, D, kv));
    TRY(k->rope_forward(a.Q, a.Q, B, S, H, hd, 0, &c->rope));
    TRY(k->rope_forward(a.K, a.K, B, S, KV, hd, 0, &c->rope));
    TRY(k->attention_forward(a.AT, a.Q, a.K, a.V, B, S, H, KV, hd, work + W->ATTW,
                             ab_attention_workspace_floats(S)));
    TRY(k->linear_forward(T, a.AT, wo, N, qd, D));
    add_into(a.HM, a.X, T, N * D);
    /* feed-forward block */
    TRY(k->rmsnorm_forward(a.XF, a.HM, rms_ffn, N, D, eps));
    TRY(k->linear_forward(a.H1, a.XF, w1, N, D, Hd));
    TRY(k->linear_forward(a.H3, a.XF, w3, N, D, Hd));
    if (write_next) {
        TRY(k->swiglu_forward(G, a.H1, a.H3, N * Hd));
        TRY(k->linear_forward(T, G, w2, N, Hd, D));
        add_into(a.X + N * D, a.HM, T, N * D);
    }
    return AB_OK;
}

int ab_model_forward(double *loss_out, const ab_model_config *c, const float *params,
                     const int32_t *tokens, const int32_t *targets, int64_t B, int64_t S,
                     int want_grad, float *work, int64_t work_floats) {
    ab_model_layout P;
    ws_layout W;
    TRY(ab_model_param_layout(c, &P));
    TRY(workspace_layout(c, B, S, &W));
    AB_NONNULL(params); AB_NONNULL(tokens); AB_NONNULL(work);
    AB_REQUIRE(work_floats >= W.total, AB_EWORKSPACE);
    AB_REQUIRE(S <= c->max_seq_len, AB_EINVAL);
    AB_REQUIRE(!want_grad || (targets && loss_out), AB_EINVAL);
    const kernel_table *k = c->reference ? &REFERENCE : &FAST;
    const dims d = model_dims(c);
    const int64_t L = d.L, D = d.D, V = d.V, N = B * S;

    hdr_set(work, HDR_TAG, 0);
    hdr_set(work, HDR_B, B);
    hdr_set(work, HDR_S, S);
    memcpy(work + W.TOKENS, tokens, (size_t)N * sizeof(int32_t));
    TRY(k->embedding_forward(work + W.X, params + P.tok_embeddings, tokens, N, V, D));
    for (int64_t l = 0; l < L; l++)
        TRY(layer_forward(k, c, &d, &P, &W, params, work, B, S, l, 1));
    float *XN = work + W.XN, *LOGITS = work + W.LOGITS;
    TRY(k->rmsnorm_forward(XN, work + W.X + L * N * D, params + P.norm, N, D, c->norm_eps));
    TRY(k->linear_forward(LOGITS, XN, params + P.output, N, D, V));
    if (targets) {
        double loss = 0.0;
        TRY(k->cross_entropy(&loss, NULL, want_grad ? LOGITS : NULL, LOGITS, targets, N, V, 1.0f));
        if (loss_out) *loss_out = loss;
        if (want_grad) hdr_set(work, HDR_TAG, READY_TAG);
    }
    return AB_OK;
}

/* ab_model_forward that also hands the caller the logits: the forward
 * without targets (activations and logits in the workspace), a copy of the
 * logits, then the same cross-entropy over them in place (loss, and dlogits
 * with want_grad) as ab_model_forward's. Bit-identical loss and dlogits. */
int ab_model_forward_logits(double *loss_out, float *logits_out, const ab_model_config *c,
                            const float *params, const int32_t *tokens, const int32_t *targets,
                            int64_t B, int64_t S, int want_grad, float *work,
                            int64_t work_floats) {
    ws_layout W;
    AB_NONNULL(logits_out);
    AB_REQUIRE(!want_grad || (targets && loss_out), AB_EINVAL);
    TRY(ab_model_forward(NULL, c, params, tokens, NULL, B, S, 0, work, work_floats));
    TRY(workspace_layout(c, B, S, &W));
    const kernel_table *k = c->reference ? &REFERENCE : &FAST;
    const int64_t N = B * S, V = c->vocab_size;
    float *LOGITS = work + W.LOGITS;
    memcpy(logits_out, LOGITS, (size_t)(N * V) * sizeof(float));
    if (targets) {
        double loss = 0.0;
        TRY(k->cross_entropy(&loss, NULL, want_grad ? LOGITS : NULL, LOGITS, targets, N, V, 1.0f));
        if (loss_out) *loss_out = loss;
        if (want_grad) hdr_set(work, HDR_TAG, READY_TAG);
    }
    return AB_OK;
}

/* The layer projections' dx on the ANE (ab_model_backward_ane): each dx is
 * queued to the context's worker before the CPU computes the same
 * projection's dW, and waited for after it (the origin project's overlap).
 * The worker's queue is FIFO, so a dx that accumulates onto an earlier one
 * (wk, wv onto wq; w3 onto w1) follows it. Without a context the dx runs on
 * the CPU at once: the same kernels on the same inputs, bit-identical to
 * ab_model_backward. */
typedef struct {
    ab_ane_ctx *ctx;            /* NULL: every dx on the CPU */
    uint64_t version;           /* of params: the weights' fp16 staging key */
    int flags;
    ab_ane_job *jobs[3];
    int n;
} dx_queue;

static int dx_submit(dx_queue *q, const kernel_table *k, float *dx, const float *dy,
                     const float *W, int64_t N, int64_t in, int64_t out, int accumulate) {
    if (!q->ctx) return k->linear_backward_dx(dx, dy, W, N, in, out, accumulate);
    int rc = ab_ane_linear_backward_dx_submit(q->ctx, &q->jobs[q->n], dx, dy, W, q->version,
                                              N, in, out, accumulate, q->flags);
    if (!rc) q->n++;
    return rc;
}

/* Waits for every queued dx (also after an error: they write the workspace);
 * returns the first error. */
static int dx_wait(dx_queue *q) {
    int rc = AB_OK;
    for (int i = 0; i < q->n; i++) {
        int r = ab_ane_job_wait(q->jobs[i], NULL, NULL, 0);
        if (!rc) rc = r;
    }
    q->n = 0;
    return rc;
}

#define TRYQ(q, call) do { int rc_ = (call); if (rc_) { dx_wait(q); return rc_; } } while (0)

/* who is told when a group of gradients is final (ab_model_backward_notify) */
typedef struct { ab_grads_ready_fn fn; void *user; } ready_hook;

static void announce(const ready_hook *h, int64_t group) {
    if (h && h->fn) h->fn(h->user, group);      /* h NULL: the ANE path */
}

static int model_backward(const ab_model_config *c, const float *params, float *grads,
                          int64_t B, int64_t S, float grad_scale, int accumulate,
                          float *work, int64_t work_floats, dx_queue *q, const ready_hook *h);

int ab_model_backward(const ab_model_config *c, const float *params, float *grads,
                      int64_t B, int64_t S, float grad_scale, int accumulate,
                      float *work, int64_t work_floats) {
    return ab_model_backward_notify(c, params, grads, B, S, grad_scale, accumulate, work,
                                    work_floats, NULL, NULL);
}

int ab_model_backward_notify(const ab_model_config *c, const float *params, float *grads,
                             int64_t B, int64_t S, float grad_scale, int accumulate,
                             float *work, int64_t work_floats,
                             ab_grads_ready_fn ready, void *user) {
    dx_queue q = {0};
    ready_hook h = {ready, user};
    return model_backward(c, params, grads, B, S, grad_scale, accumulate, work, work_floats, &q,
                          &h);
}

int ab_model_backward_ane(const ab_model_config *c, const float *params, float *grads,
                          int64_t B, int64_t S, float grad_scale, int accumulate,
                          float *work, int64_t work_floats, ab_ane_ctx *ane,
                          uint64_t params_version, int ane_flags) {
    AB_REQUIRE(!c || !c->reference || !ane, AB_EINVAL);   /* the seed loops stay seed loops */
    AB_REQUIRE(ane_flags == 0 || ane_flags == AB_ANE_STRICT, AB_EINVAL);
    dx_queue q = {ane, params_version, ane_flags, {NULL, NULL, NULL}, 0};
    return model_backward(c, params, grads, B, S, grad_scale, accumulate, work, work_floats, &q,
                          NULL);
}

static int model_backward(const ab_model_config *c, const float *params, float *grads,
                          int64_t B, int64_t S, float grad_scale, int accumulate,
                          float *work, int64_t work_floats, dx_queue *q, const ready_hook *h) {
    ab_model_layout P;
    ws_layout W;
    TRY(ab_model_param_layout(c, &P));
    TRY(workspace_layout(c, B, S, &W));
    AB_NONNULL(params); AB_NONNULL(grads); AB_NONNULL(work);
    AB_REQUIRE(work_floats >= HDR_FLOATS, AB_EWORKSPACE);
    /* dlogits must come from a want_grad forward of this (B, S) on this
     * workspace, and are used once (the backward scales them in place) */
    AB_REQUIRE(hdr_get(work, HDR_TAG) == READY_TAG, AB_EINVAL);
    AB_REQUIRE(hdr_get(work, HDR_B) == B && hdr_get(work, HDR_S) == S, AB_EINVAL);
    AB_REQUIRE(work_floats >= W.total, AB_EWORKSPACE);
    hdr_set(work, HDR_TAG, 0);
    const int32_t *tokens = (const int32_t *)(work + W.TOKENS);   /* the forward's */
    const kernel_table *k = c->reference ? &REFERENCE : &FAST;
    const dims d = model_dims(c);
    const int64_t L = d.L, D = d.D, Hd = d.Hd, V = d.V, H = d.H, KV = d.KV, hd = d.hd;
    const int64_t qd = d.qd, kv = d.kv, N = B * S;
    const float eps = c->norm_eps;
    const int64_t attw = ab_attention_workspace_floats(S);
    const int acc = accumulate != 0;

    /* Every dW below is written with beta = acc except those that are sums:
     * the norm weights (the rmsnorm kernel always adds) and the embedding
     * (scatter-add). Those start from zero unless accumulating. A tied
     * classifier's dW is written first into the embedding gradient, and the
     * scatter-add of the embedding adds to it: one gradient, one buffer. */
    if (!acc) {
        memset(grads + P.n_decay, 0, (size_t)(P.n_params - P.n_decay) * sizeof(float));
        if (!c->shared_classifier)
            memset(grads + P.tok_embeddings, 0, (size_t)(V * D) * sizeof(float));
    }
    float *DL = work + W.LOGITS;               /* dlogits, written by the forward */
    if (grad_scale != 1.0f) TRY(ab_scale(DL, N * V, grad_scale));
    float *DX = work + W.DX, *DXN = work + W.DXN;

    /* classifier and final norm */
    const float *XN = work + W.XN;
    TRY(k->linear_backward_dW(grads + P.output, DL, XN, N, D, V, acc));
    TRY(k->linear_backward_dx(DXN, DL, params + P.output, N, D, V, 0));
    TRY(k->rmsnorm_backward(DX, grads + P.norm, DXN, work + W.X + L * N * D, params + P.norm,
                            N, D, eps, 0));
    announce(h, L);                            /* norm, untied output */

    for (int64_t l = L - 1; l >= 0; l--) {
        const float *wq = params + P.wq + l * qd * D, *wk = params + P.wk + l * kv * D;
        const float *wv = params + P.wv + l * kv * D, *wo = params + P.wo + l * D * qd;
        const float *w1 = params + P.w1 + l * Hd * D, *w2 = params + P.w2 + l * D * Hd;
        const float *w3 = params + P.w3 + l * Hd * D;
        float *gwq = grads + P.wq + l * qd * D, *gwk = grads + P.wk + l * kv * D;
        float *gwv = grads + P.wv + l * kv * D, *gwo = grads + P.wo + l * D * qd;
        float *gw1 = grads + P.w1 + l * Hd * D, *gw2 = grads + P.w2 + l * D * Hd;
        float *gw3 = grads + P.w3 + l * Hd * D;
        if (W.slots == 1) TRY(layer_forward(k, c, &d, &P, &W, params, work, B, S, l, 0));
        const layer_acts a = acts_of(&W, &d, work, N, l);
        float *G = work + W.G, *DH1 = work + W.DH1, *DH3 = work + W.DH3;
        float *DA = work + W.DA, *DQ = work + W.DQ, *DK = work + W.DK, *DV = work + W.DV;

        /* feed-forward: X[l+1] = HM + swiglu(XF w1^T, XF w3^T) w2^T; DX = dL/dX[l+1] */
        TRY(k->swiglu_forward(G, a.H1, a.H3, N * Hd));
        TRY(dx_submit(q, k, DH1, DX, w2, N, Hd, D, 0));
        TRYQ(q, k->linear_backward_dW(gw2, DX, G, N, Hd, D, acc));
        TRY(dx_wait(q));
        TRY(k->swiglu_backward(DH1, DH3, DH1, a.H1, a.H3, N * Hd));
        TRY(dx_submit(q, k, DXN, DH1, w1, N, D, Hd, 0));
        TRYQ(q, dx_submit(q, k, DXN, DH3, w3, N, D, Hd, 1));
        TRYQ(q, k->linear_backward_dW(gw1, DH1, a.XF, N, D, Hd, acc));
        TRYQ(q, k->linear_backward_dW(gw3, DH3, a.XF, N, D, Hd, acc));
        TRY(dx_wait(q));
        /* the FFN norm's input is HM, the residual after attention */
        TRY(k->rmsnorm_backward(DX, grads + P.ffn_norm + l * D, DXN, a.HM,
                                params + P.ffn_norm + l * D, N, D, eps, 1));
        /* attention: HM = X + attention(rope(XA wq^T), rope(XA wk^T), XA wv^T) wo^T */
        TRY(dx_submit(q, k, DA, DX, wo, N, qd, D, 0));
        TRYQ(q, k->linear_backward_dW(gwo, DX, a.AT, N, qd, D, acc));
        TRY(dx_wait(q));
        TRY(k->attention_backward(DQ, DK, DV, DA, a.Q, a.K, a.V, B, S, H, KV, hd,
                                  work + W.ATTW, attw));
        TRY(k->rope_backward(DQ, DQ, B, S, H, hd, 0, &c->rope));
        TRY(k->rope_backward(DK, DK, B, S, KV, hd, 0, &c->rope));
        if (c->qk_norm) {   /* through the per-head norms to the raw projections */
            float *DQN = work + W.DQN, *DKN = work + W.DKN;
            TRY(k->rmsnorm_backward(DQN, grads + P.q_norm + l * hd, DQ, a.QR,
                                    params + P.q_norm + l * hd, N * H, hd, eps, 0));
            TRY(k->rmsnorm_backward(DKN, grads + P.k_norm + l * hd, DK, a.KR,
                                    params + P.k_norm + l * hd, N * KV, hd, eps, 0));
            DQ = DQN;
            DK = DKN;
        }
        TRY(dx_submit(q, k, DXN, DQ, wq, N, D, qd, 0));
        TRYQ(q, dx_submit(q, k, DXN, DK, wk, N, D, kv, 1));
        TRYQ(q, dx_submit(q, k, DXN, DV, wv, N, D, kv, 1));
        TRYQ(q, k->linear_backward_dW(gwq, DQ, a.XA, N, D, qd, acc));
        TRYQ(q, k->linear_backward_dW(gwk, DK, a.XA, N, D, kv, acc));
        TRYQ(q, k->linear_backward_dW(gwv, DV, a.XA, N, D, kv, acc));
        TRY(dx_wait(q));
        TRY(k->rmsnorm_backward(DX, grads + P.attention_norm + l * D, DXN, a.X,
                                params + P.attention_norm + l * D, N, D, eps, 1));
        announce(h, l);                        /* every tensor of layer l */
    }
    /* embedding: scatter-add (onto the classifier's dW when tied) */
    TRY(k->embedding_backward(grads + P.tok_embeddings, DX, tokens, N, V, D));
    announce(h, -1);
    return AB_OK;
}

/* ---- one-token inference with a KV cache (run.c's forward) ----
 * kv_cache: keys then values, each [L, max_seq_len, kv_dim]. work: x, xb2
 * [dim]; xb [max(dim, qd)]; q [qd]; hb, hb2 [hidden]; att [max_seq_len];
 * with qk_norm also qr [qd] (the norms' input), after q.
 * Both sizes are bounded by ab_model_config_check (in double, before any
 * int64 product: 2*L*T*qd + 4*(dim + qd) + 2*hidden + T < 2^52, kv <= qd). */
int ab_model_kv_cache_floats(const ab_model_config *c, int64_t *out) {
    TRY(ab_model_config_check(c));
    AB_NONNULL(out);
    *out = 2 * c->n_layers * c->max_seq_len * model_dims(c).kv;
    return AB_OK;
}

int ab_model_decode_workspace_floats(const ab_model_config *c, int64_t *out) {
    TRY(ab_model_config_check(c));
    AB_NONNULL(out);
    const dims d = model_dims(c);
    *out = 2 * d.D + (d.D > d.qd ? d.D : d.qd) + (c->qk_norm ? 2 : 1) * d.qd + 2 * d.Hd
           + c->max_seq_len;
    return AB_OK;
}

int ab_model_decode(float *logits, const ab_model_config *c, const float *params,
                    int32_t token, int64_t pos, float *kv_cache, float *work,
                    int64_t work_floats) {
    ab_model_layout P;
    int64_t need;
    TRY(ab_model_param_layout(c, &P));
    TRY(ab_model_decode_workspace_floats(c, &need));
    AB_NONNULL(logits); AB_NONNULL(params); AB_NONNULL(kv_cache); AB_NONNULL(work);
    AB_REQUIRE(work_floats >= need, AB_EWORKSPACE);
    AB_REQUIRE(pos >= 0 && pos < c->max_seq_len, AB_EINVAL);
    AB_REQUIRE(token >= 0 && (int64_t)token < c->vocab_size, AB_ERANGE);
    const kernel_table *k = c->reference ? &REFERENCE : &FAST;
    const dims d = model_dims(c);
    const int64_t L = d.L, D = d.D, Hd = d.Hd, V = d.V, H = d.H, KV = d.KV, hd = d.hd;
    const int64_t qd = d.qd, kv = d.kv, T = c->max_seq_len, group = H / KV;
    const float eps = c->norm_eps, scale = 1.0f / sqrtf((float)hd);
    float *x = work, *xb2 = x + D, *xb = xb2 + D;
    float *q = xb + (D > qd ? D : qd), *qr = q + qd;   /* qr only with qk_norm */
    float *hb = qr + (c->qk_norm ? qd : 0), *hb2 = hb + Hd, *att = hb2 + Hd;
    float *kc = kv_cache, *vc = kv_cache + L * T * kv;

    memcpy(x, params + P.tok_embeddings + (int64_t)token * D, (size_t)D * sizeof(float));
    for (int64_t l = 0; l < L; l++) {
        float *kl = kc + l * T * kv, *vl = vc + l * T * kv, *kp = kl + pos * kv;
        TRY(k->rmsnorm_forward(xb, x, params + P.attention_norm + l * D, 1, D, eps));
        TRY(k->linear_forward(c->qk_norm ? qr : q, xb, params + P.wq + l * qd * D, 1, D, qd));
        TRY(k->linear_forward(kp, xb, params + P.wk + l * kv * D, 1, D, kv));
        TRY(k->linear_forward(vl + pos * kv, xb, params + P.wv + l * kv * D, 1, D, kv));
        if (c->qk_norm) {   /* kr reuses qr: q is done with it */
            TRY(k->rmsnorm_forward(q, qr, params + P.q_norm + l * hd, H, hd, eps));
            memcpy(qr, kp, (size_t)kv * sizeof(float));
            TRY(k->rmsnorm_forward(kp, qr, params + P.k_norm + l * hd, KV, hd, eps));
        }
        TRY(k->rope_forward(q, q, 1, 1, H, hd, pos, &c->rope));
        TRY(k->rope_forward(kp, kp, 1, 1, KV, hd, pos, &c->rope));
        for (int64_t h = 0; h < H; h++) {
            const int64_t g = h / group;
            const float *qh = q + h * hd;
            float m = -INFINITY, sum = 0.0f;
            for (int64_t t = 0; t <= pos; t++) {
                const float *kt = kl + t * kv + g * hd;
                float s = 0.0f;
                AB_SIMD_REDUCE(+, s)
                for (int64_t i = 0; i < hd; i++) s += qh[i] * kt[i];
                att[t] = s * scale;
                m = att[t] > m ? att[t] : m;
            }
            for (int64_t t = 0; t <= pos; t++) { att[t] = ab_expf(att[t] - m); sum += att[t]; }
            float *o = xb + h * hd;
            memset(o, 0, (size_t)hd * sizeof(float));
            for (int64_t t = 0; t <= pos; t++) {
                const float a = att[t] / sum, *vt = vl + t * kv + g * hd;
                AB_SIMD
                for (int64_t i = 0; i < hd; i++) o[i] += a * vt[i];
            }
        }
        TRY(k->linear_forward(xb2, xb, params + P.wo + l * D * qd, 1, qd, D));
        add_into(x, x, xb2, D);
        TRY(k->rmsnorm_forward(xb, x, params + P.ffn_norm + l * D, 1, D, eps));
        TRY(k->linear_forward(hb, xb, params + P.w1 + l * Hd * D, 1, D, Hd));
        TRY(k->linear_forward(hb2, xb, params + P.w3 + l * Hd * D, 1, D, Hd));
        TRY(k->swiglu_forward(hb, hb, hb2, Hd));
        TRY(k->linear_forward(xb2, hb, params + P.w2 + l * D * Hd, 1, Hd, D));
        add_into(x, x, xb2, D);
    }
    TRY(k->rmsnorm_forward(xb, x, params + P.norm, 1, D, eps));
    TRY(k->linear_forward(logits, xb, params + P.output, 1, D, V));
    return AB_OK;
}
