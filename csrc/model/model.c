/* model.c — the whole Llama forward and backward over the kernels.
 *
 * What the seed's model_backward was, done right: one call per step, any
 * number of layers, GQA, RMSNorm weight gradients, the FFN norm
 * differentiated at its real input, one gradient for a tied classifier,
 * int64 sizes throughout.
 *
 * Parameters: one flat float buffer laid out by ab_model_param_layout:
 *   [tok_embeddings | wq(L) | wk(L) | wv(L) | wo(L) | w1(L) | w2(L) | w3(L)
 *    | output (untied only) | attention_norm(L) | ffn_norm(L) | norm]
 * Every 2-D weight comes first, every 1-D norm weight last, so weight decay
 * is a prefix of the buffer (n_decay floats). Gradients use the same layout.
 *
 * Activations: a caller-owned workspace of ab_model_workspace_floats floats,
 * reused across steps of one (B, S). Per layer l it keeps what the backward
 * needs, N = B*S rows:
 *   X[l]    residual input of layer l            [N, dim]   (X[L] = final)
 *   XA[l]   attention_norm(X[l])                 [N, dim]
 *   Q[l]    rope(XA wq^T)                        [N, dim]
 *   K[l]    rope(XA wk^T), V[l] = XA wv^T        [N, kv_dim]
 *   AT[l]   attention(Q, K, V)                   [N, dim]
 *   HM[l]   X[l] + AT wo^T  (FFN-norm input)     [N, dim]
 *   XF[l]   ffn_norm(HM[l])                      [N, dim]
 *   H1[l], H3[l]  XF w1^T, XF w3^T               [N, hidden]
 *   X[l+1] = HM[l] + swiglu(H1, H3) w2^T
 * then XN = norm(X[L]) [N, dim] and LOGITS [N, vocab]. swiglu(H1, H3) is
 * recomputed in the backward rather than stored. The forward with
 * want_grad writes dlogits over LOGITS, so the backward starts from it.
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
    int (*rope_forward)(float *, const float *, int64_t, int64_t, int64_t, int64_t, int64_t);
    int (*rope_backward)(float *, const float *, int64_t, int64_t, int64_t, int64_t, int64_t);
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
    .rope_forward = ab_rope_forward,
    .rope_backward = ab_rope_backward,
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
    .rope_forward = ab_ref_rope_forward,
    .rope_backward = ab_ref_rope_backward,
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

int ab_model_config_check(const ab_model_config *c) {
    AB_NONNULL(c);
    AB_REQUIRE(c->dim > 0 && c->hidden_dim > 0 && c->n_layers > 0 && c->n_heads > 0
               && c->n_kv_heads > 0 && c->vocab_size > 0 && c->max_seq_len > 0, AB_EINVAL);
    AB_REQUIRE(c->dim % c->n_heads == 0, AB_EINVAL);
    AB_REQUIRE((c->dim / c->n_heads) % 2 == 0, AB_EINVAL);          /* RoPE pairs */
    AB_REQUIRE(c->n_heads % c->n_kv_heads == 0, AB_EINVAL);
    AB_REQUIRE(c->norm_eps >= 0.0f, AB_EINVAL);
    AB_BLAS_FITS(c->dim); AB_BLAS_FITS(c->hidden_dim); AB_BLAS_FITS(c->vocab_size);
    /* Sizes are sums of products of these dimensions; an upper bound of each
     * computed in double (no overflow there) keeps every int64 product and
     * partial sum below 2^52. Bigger models could not be allocated anyway. */
    const double L = (double)c->n_layers, D = (double)c->dim, Hd = (double)c->hidden_dim;
    const double V = (double)c->vocab_size, T = (double)c->max_seq_len;
    AB_REQUIRE(2 * V * D + L * (4 * D * D + 3 * Hd * D + 2 * D) + D < AB_SIZE_LIMIT, AB_ETOOBIG);
    AB_REQUIRE(2 * L * T * D + 4 * D + 2 * Hd + T < AB_SIZE_LIMIT, AB_ETOOBIG);  /* decode */
    return AB_OK;
}

int ab_model_param_layout(const ab_model_config *c, ab_model_layout *o) {
    TRY(ab_model_config_check(c));
    AB_NONNULL(o);
    const int64_t L = c->n_layers, D = c->dim, Hd = c->hidden_dim, V = c->vocab_size;
    const int64_t kv = D / c->n_heads * c->n_kv_heads;
    int64_t p = 0;
    o->tok_embeddings = p; p += V * D;
    o->wq = p; p += L * D * D;
    o->wk = p; p += L * kv * D;
    o->wv = p; p += L * kv * D;
    o->wo = p; p += L * D * D;
    o->w1 = p; p += L * Hd * D;
    o->w2 = p; p += L * D * Hd;
    o->w3 = p; p += L * Hd * D;
    if (c->shared_classifier) o->output = o->tok_embeddings;
    else { o->output = p; p += V * D; }
    o->n_decay = p;
    o->attention_norm = p; p += L * D;
    o->ffn_norm = p; p += L * D;
    o->norm = p; p += D;
    o->n_params = p;
    return AB_OK;
}

/* Workspace offsets (floats) for a batch of B sequences of S tokens. */
typedef struct {
    int64_t X, XA, Q, K, V, AT, HM, XF, H1, H3, XN, LOGITS;  /* saved activations */
    int64_t G, DH1, DH3, DX, DXN, DA, DQ, DK, DV, ATTW;       /* scratch */
    int64_t TOKENS;  /* the forward's tokens, N int32 (the header is at 0) */
    int64_t total;
} ws_layout;

static int workspace_layout(const ab_model_config *c, int64_t B, int64_t S, ws_layout *w) {
    TRY(ab_model_config_check(c));
    AB_REQUIRE(B > 0 && S > 0, AB_EINVAL);
    {   /* an upper bound of the total in double: no int64 overflow below */
        const double n = (double)B * (double)S, Ld = (double)c->n_layers + 2;
        const double est = Ld * n * (8.0 * c->dim + 5.0 * c->hidden_dim) + n * c->vocab_size
                           + 2.0 * (double)S * (double)S + n + HDR_FLOATS;
        AB_REQUIRE(est < AB_SIZE_LIMIT, AB_ETOOBIG);
    }
    const int64_t L = c->n_layers, D = c->dim, Hd = c->hidden_dim, V = c->vocab_size;
    const int64_t kv = D / c->n_heads * c->n_kv_heads, N = B * S;
    AB_BLAS_FITS(N);
    int64_t p = HDR_FLOATS;
    w->TOKENS = p; p += N;
    w->X = p; p += (L + 1) * N * D;
    w->XA = p; p += L * N * D;
    w->Q = p; p += L * N * D;
    w->K = p; p += L * N * kv;
    w->V = p; p += L * N * kv;
    w->AT = p; p += L * N * D;
    w->HM = p; p += L * N * D;
    w->XF = p; p += L * N * D;
    w->H1 = p; p += L * N * Hd;
    w->H3 = p; p += L * N * Hd;
    w->XN = p; p += N * D;
    w->LOGITS = p; p += N * V;
    w->G = p; p += N * Hd;
    w->DH1 = p; p += N * Hd;
    w->DH3 = p; p += N * Hd;
    w->DX = p; p += N * D;
    w->DXN = p; p += N * D;
    w->DA = p; p += N * D;
    w->DQ = p; p += N * D;
    w->DK = p; p += N * kv;
    w->DV = p; p += N * kv;
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
    const int64_t L = c->n_layers, D = c->dim, Hd = c->hidden_dim, V = c->vocab_size;
    const int64_t H = c->n_heads, KV = c->n_kv_heads, hd = D / H, kv = hd * KV, N = B * S;
    const float eps = c->norm_eps;
    const int64_t attw = ab_attention_workspace_floats(S);

    hdr_set(work, HDR_TAG, 0);
    hdr_set(work, HDR_B, B);
    hdr_set(work, HDR_S, S);
    memcpy(work + W.TOKENS, tokens, (size_t)N * sizeof(int32_t));
    float *X0 = work + W.X;
    TRY(k->embedding_forward(X0, params + P.tok_embeddings, tokens, N, V, D));
    for (int64_t l = 0; l < L; l++) {
        const float *wq = params + P.wq + l * D * D, *wk = params + P.wk + l * kv * D;
        const float *wv = params + P.wv + l * kv * D, *wo = params + P.wo + l * D * D;
        const float *w1 = params + P.w1 + l * Hd * D, *w2 = params + P.w2 + l * D * Hd;
        const float *w3 = params + P.w3 + l * Hd * D;
        const float *rms_att = params + P.attention_norm + l * D;
        const float *rms_ffn = params + P.ffn_norm + l * D;
        float *X = work + W.X + l * N * D, *Xnext = X + N * D;
        float *XA = work + W.XA + l * N * D, *Q = work + W.Q + l * N * D;
        float *K = work + W.K + l * N * kv, *Vv = work + W.V + l * N * kv;
        float *AT = work + W.AT + l * N * D, *HM = work + W.HM + l * N * D;
        float *XF = work + W.XF + l * N * D;
        float *H1 = work + W.H1 + l * N * Hd, *H3 = work + W.H3 + l * N * Hd;
        float *G = work + W.G, *T = work + W.DXN;   /* scratch */

        /* attention block */
        TRY(k->rmsnorm_forward(XA, X, rms_att, N, D, eps));
        TRY(k->linear_forward(Q, XA, wq, N, D, D));
        TRY(k->linear_forward(K, XA, wk, N, D, kv));
        TRY(k->linear_forward(Vv, XA, wv, N, D, kv));
        TRY(k->rope_forward(Q, Q, B, S, H, hd, 0));
        TRY(k->rope_forward(K, K, B, S, KV, hd, 0));
        TRY(k->attention_forward(AT, Q, K, Vv, B, S, H, KV, hd, work + W.ATTW, attw));
        TRY(k->linear_forward(T, AT, wo, N, D, D));
        add_into(HM, X, T, N * D);
        /* feed-forward block */
        TRY(k->rmsnorm_forward(XF, HM, rms_ffn, N, D, eps));
        TRY(k->linear_forward(H1, XF, w1, N, D, Hd));
        TRY(k->linear_forward(H3, XF, w3, N, D, Hd));
        TRY(k->swiglu_forward(G, H1, H3, N * Hd));
        TRY(k->linear_forward(T, G, w2, N, Hd, D));
        add_into(Xnext, HM, T, N * D);
    }
    float *XN = work + W.XN, *LOGITS = work + W.LOGITS;
    TRY(k->rmsnorm_forward(XN, work + W.X + L * N * D, params + P.norm, N, D, eps));
    TRY(k->linear_forward(LOGITS, XN, params + P.output, N, D, V));
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

static int model_backward(const ab_model_config *c, const float *params, float *grads,
                          int64_t B, int64_t S, float grad_scale, int accumulate,
                          float *work, int64_t work_floats, dx_queue *q);

int ab_model_backward(const ab_model_config *c, const float *params, float *grads,
                      int64_t B, int64_t S, float grad_scale, int accumulate,
                      float *work, int64_t work_floats) {
    dx_queue q = {0};
    return model_backward(c, params, grads, B, S, grad_scale, accumulate, work, work_floats, &q);
}

int ab_model_backward_ane(const ab_model_config *c, const float *params, float *grads,
                          int64_t B, int64_t S, float grad_scale, int accumulate,
                          float *work, int64_t work_floats, ab_ane_ctx *ane,
                          uint64_t params_version, int ane_flags) {
    AB_REQUIRE(!c || !c->reference || !ane, AB_EINVAL);   /* the seed loops stay seed loops */
    AB_REQUIRE(ane_flags == 0 || ane_flags == AB_ANE_STRICT, AB_EINVAL);
    dx_queue q = {ane, params_version, ane_flags, {NULL, NULL, NULL}, 0};
    return model_backward(c, params, grads, B, S, grad_scale, accumulate, work, work_floats, &q);
}

static int model_backward(const ab_model_config *c, const float *params, float *grads,
                          int64_t B, int64_t S, float grad_scale, int accumulate,
                          float *work, int64_t work_floats, dx_queue *q) {
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
    const int64_t L = c->n_layers, D = c->dim, Hd = c->hidden_dim, V = c->vocab_size;
    const int64_t H = c->n_heads, KV = c->n_kv_heads, hd = D / H, kv = hd * KV, N = B * S;
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

    for (int64_t l = L - 1; l >= 0; l--) {
        const float *wq = params + P.wq + l * D * D, *wk = params + P.wk + l * kv * D;
        const float *wv = params + P.wv + l * kv * D, *wo = params + P.wo + l * D * D;
        const float *w1 = params + P.w1 + l * Hd * D, *w2 = params + P.w2 + l * D * Hd;
        const float *w3 = params + P.w3 + l * Hd * D;
        float *gwq = grads + P.wq + l * D * D, *gwk = grads + P.wk + l * kv * D;
        float *gwv = grads + P.wv + l * kv * D, *gwo = grads + P.wo + l * D * D;
        float *gw1 = grads + P.w1 + l * Hd * D, *gw2 = grads + P.w2 + l * D * Hd;
        float *gw3 = grads + P.w3 + l * Hd * D;
        const float *X = work + W.X + l * N * D, *XA = work + W.XA + l * N * D;
        const float *Q = work + W.Q + l * N * D, *K = work + W.K + l * N * kv;
        const float *Vv = work + W.V + l * N * kv, *AT = work + W.AT + l * N * D;
        const float *HM = work + W.HM + l * N * D, *XF = work + W.XF + l * N * D;
        const float *H1 = work + W.H1 + l * N * Hd, *H3 = work + W.H3 + l * N * Hd;
        float *G = work + W.G, *DH1 = work + W.DH1, *DH3 = work + W.DH3;
        float *DA = work + W.DA, *DQ = work + W.DQ, *DK = work + W.DK, *DV = work + W.DV;

        /* feed-forward: X[l+1] = HM + swiglu(XF w1^T, XF w3^T) w2^T; DX = dL/dX[l+1] */
        TRY(k->swiglu_forward(G, H1, H3, N * Hd));
        TRY(dx_submit(q, k, DH1, DX, w2, N, Hd, D, 0));
        TRYQ(q, k->linear_backward_dW(gw2, DX, G, N, Hd, D, acc));
        TRY(dx_wait(q));
        TRY(k->swiglu_backward(DH1, DH3, DH1, H1, H3, N * Hd));
        TRY(dx_submit(q, k, DXN, DH1, w1, N, D, Hd, 0));
        TRYQ(q, dx_submit(q, k, DXN, DH3, w3, N, D, Hd, 1));
        TRYQ(q, k->linear_backward_dW(gw1, DH1, XF, N, D, Hd, acc));
        TRYQ(q, k->linear_backward_dW(gw3, DH3, XF, N, D, Hd, acc));
        TRY(dx_wait(q));
        /* the FFN norm's input is HM, the residual after attention */
        TRY(k->rmsnorm_backward(DX, grads + P.ffn_norm + l * D, DXN, HM,
                                params + P.ffn_norm + l * D, N, D, eps, 1));
        /* attention: HM = X + attention(rope(XA wq^T), rope(XA wk^T), XA wv^T) wo^T */
        TRY(dx_submit(q, k, DA, DX, wo, N, D, D, 0));
        TRYQ(q, k->linear_backward_dW(gwo, DX, AT, N, D, D, acc));
        TRY(dx_wait(q));
        TRY(k->attention_backward(DQ, DK, DV, DA, Q, K, Vv, B, S, H, KV, hd,
                                  work + W.ATTW, attw));
        TRY(k->rope_backward(DQ, DQ, B, S, H, hd, 0));
        TRY(k->rope_backward(DK, DK, B, S, KV, hd, 0));
        TRY(dx_submit(q, k, DXN, DQ, wq, N, D, D, 0));
        TRYQ(q, dx_submit(q, k, DXN, DK, wk, N, D, kv, 1));
        TRYQ(q, dx_submit(q, k, DXN, DV, wv, N, D, kv, 1));
        TRYQ(q, k->linear_backward_dW(gwq, DQ, XA, N, D, D, acc));
        TRYQ(q, k->linear_backward_dW(gwk, DK, XA, N, D, kv, acc));
        TRYQ(q, k->linear_backward_dW(gwv, DV, XA, N, D, kv, acc));
        TRY(dx_wait(q));
        TRY(k->rmsnorm_backward(DX, grads + P.attention_norm + l * D, DXN, X,
                                params + P.attention_norm + l * D, N, D, eps, 1));
    }
    /* embedding: scatter-add (onto the classifier's dW when tied) */
    TRY(k->embedding_backward(grads + P.tok_embeddings, DX, tokens, N, V, D));
    return AB_OK;
}

/* ---- one-token inference with a KV cache (run.c's forward) ----
 * kv_cache: keys then values, each [L, max_seq_len, kv_dim]. work: x, xb,
 * xb2, q [dim]; hb, hb2 [hidden]; att [max_seq_len]. Both sizes are bounded
 * by ab_model_config_check (in double, before any int64 product:
 * 2*L*T*dim + 4*dim + 2*hidden + T < 2^52, and kv_dim <= dim). */
int ab_model_kv_cache_floats(const ab_model_config *c, int64_t *out) {
    TRY(ab_model_config_check(c));
    AB_NONNULL(out);
    *out = 2 * c->n_layers * c->max_seq_len * (c->dim / c->n_heads * c->n_kv_heads);
    return AB_OK;
}

int ab_model_decode_workspace_floats(const ab_model_config *c, int64_t *out) {
    TRY(ab_model_config_check(c));
    AB_NONNULL(out);
    *out = 4 * c->dim + 2 * c->hidden_dim + c->max_seq_len;
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
    const int64_t L = c->n_layers, D = c->dim, Hd = c->hidden_dim, V = c->vocab_size;
    const int64_t H = c->n_heads, KV = c->n_kv_heads, hd = D / H, kv = hd * KV;
    const int64_t T = c->max_seq_len, group = H / KV;
    const float eps = c->norm_eps, scale = 1.0f / sqrtf((float)hd);
    float *x = work, *xb = x + D, *xb2 = xb + D, *q = xb2 + D;
    float *hb = q + D, *hb2 = hb + Hd, *att = hb2 + Hd;
    float *kc = kv_cache, *vc = kv_cache + L * T * kv;

    memcpy(x, params + P.tok_embeddings + (int64_t)token * D, (size_t)D * sizeof(float));
    for (int64_t l = 0; l < L; l++) {
        float *kl = kc + l * T * kv, *vl = vc + l * T * kv;
        TRY(k->rmsnorm_forward(xb, x, params + P.attention_norm + l * D, 1, D, eps));
        TRY(k->linear_forward(q, xb, params + P.wq + l * D * D, 1, D, D));
        TRY(k->linear_forward(kl + pos * kv, xb, params + P.wk + l * kv * D, 1, D, kv));
        TRY(k->linear_forward(vl + pos * kv, xb, params + P.wv + l * kv * D, 1, D, kv));
        TRY(k->rope_forward(q, q, 1, 1, H, hd, pos));
        TRY(k->rope_forward(kl + pos * kv, kl + pos * kv, 1, 1, KV, hd, pos));
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
        TRY(k->linear_forward(xb2, xb, params + P.wo + l * D * D, 1, D, D));
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
