/* model.c — the whole Llama forward and backward over the kernels.
 *
 * What the seed's model_backward was, done right: one call per step, any
 * number of layers, GQA, RMSNorm weight gradients, the FFN norm
 * differentiated at its real input, one gradient for a tied classifier,
 * int64 sizes throughout. The same code runs llama2.c's Llama 2 and the
 * Hugging Face Llama 3 / Qwen3 shapes: head_dim independent of dim (q is
 * qd = n_heads*head_dim wide), Qwen3's per-head q/k RMSNorm, RoPE layout,
 * theta and Llama-3 scaling (ab_model_config's fields after `norm_eps`).
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
 * it. The kernels are deterministic, so the layers' part is bit-identical.
 * The classifier too runs in chunks of cls_chunk_rows rows (a function of
 * V and B*S only, never of the thread count): LOGITS is then [chunk, vocab]
 * instead of [N, vocab]. The forward computes each chunk's logits and adds
 * its loss terms; it keeps a copy of the targets (TGT, N int32) and the
 * loss denominator (DEN, one double), nothing per row. The backward
 * computes each chunk's logits again (one more classifier matmul), its
 * dlogits over them, dXN's rows and dW += dlogits^T XN (the first chunk
 * with beta = accumulate). dW and the loss are summed in another order, and
 * a matmul over a chunk's rows may take another kernel path than over all
 * N, so loss and gradients may differ from the unchunked run in the last
 * bits (float32 rounding).
 * ab_model_forward_logits writes the logits chunk by chunk into the
 * caller's buffer; a forward without targets and without that buffer has
 * nowhere to put them (AB_EINVAL).
 *
 * Like llm.c's gpt2_forward/gpt2_backward, the forward keeps what the
 * backward needs besides activations: a header at offset 0 of the workspace
 * (HDR_FLOATS floats: a "dlogits ready" tag, B, S, the rows N, the varlen
 * segments n_seq) and a copy of the tokens (TOKENS, N int32 in N float
 * slots), with a varlen batch also its segment starts (CU) and positions
 * (POS). The backward takes no tokens; it refuses to run unless the tag is
 * set and B, S match, and clears the tag (one backward per forward). The
 * header is at a fixed place so a backward with the wrong B or S is
 * recognised before any layout is derived from them.
 *
 * Varlen batches (ab_model_forward_batch): the N <= B*S rows are the real
 * tokens only; every per-row array above holds N rows (packed at the start
 * of its B*S-row region), so padding costs no work at all. (B, S) only
 * sizes the workspace.
 *
 * Precision bf16 (c->precision): every matmul goes through proj_forward /
 * proj_dx / proj_dW below, which multiply bf16 operands with fp32
 * accumulation (ab_gemm_bf16). The workspace then starts (after the
 * header, at an offset independent of B and S) with WBF, the bf16 copy of
 * params[0, n_decay) made by ab_model_bf16_refresh (tagged in the header),
 * and ends with a bf16 MIRROR of itself (uint16, one per float: the bf16
 * copy of the activation at work + i is at mirror + i). An operand is
 * rounded into its mirror where a matmul first reads it; the calls that
 * follow on the same, unchanged operand pass X_READY / DY_READY and reuse
 * it. Pages of the mirror that no matmul reads are never touched. Every
 * dW = dy^T x (the classifier's too) reads dy's plain copy, the one dx = dy W
 * reads: ab_gemm_bf16 copies each tile's columns of it into a dense
 * per-thread buffer (outside the workspace; about half of dy at most), so
 * there is no transposed copy and the workspace does not grow for it.
 */
#include <stdio.h>
#include <stdlib.h>
/* ab_last_error() names the public function: spec_X runs ab_model_X */
static const char *public_name(const char *func);
#define AB_FUNC public_name(__func__)
#include "ab_internal.h"
#include "bf16/bf16_internal.h"

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
                         int64_t, int64_t, float, double);
    int (*rope_forward_pos)(float *, const float *, int64_t, int64_t, int64_t, const int32_t *,
                            const ab_rope_params *);
    int (*rope_backward_pos)(float *, const float *, int64_t, int64_t, int64_t, const int32_t *,
                             const ab_rope_params *);
    int (*attention_forward_varlen)(float *, const float *, const float *, const float *,
                                    const int64_t *, int64_t, int64_t, int64_t, int64_t,
                                    float *, int64_t);
    int (*attention_backward_varlen)(float *, float *, float *, const float *, const float *,
                                     const float *, const float *, const int64_t *, int64_t,
                                     int64_t, int64_t, int64_t, float *, int64_t);
    int (*embedding_forward)(float *, const float *, const int32_t *, int64_t, int64_t, int64_t);
    int (*embedding_backward)(float *, const float *, const int32_t *, int64_t, int64_t, int64_t);
} kernel_table;

/* Designated initialisers: a reordered or added member cannot silently
 * pair a slot with the wrong kernel. One list for both tables: P is ab_ for
 * the fast kernels and ab_ref_ for their reference twins (same names after
 * the prefix, same signatures: anebackward.h), so the tables cannot drift
 * apart. */
#define KERNEL_TABLE(P) {                                       \
    .linear_forward = P##linear_forward,                        \
    .linear_backward_dx = P##linear_backward_dx,                \
    .linear_backward_dW = P##linear_backward_dW,                \
    .rmsnorm_forward = P##rmsnorm_forward,                      \
    .rmsnorm_backward = P##rmsnorm_backward,                    \
    .rope_forward = P##rope_forward_ex,                         \
    .rope_backward = P##rope_backward_ex,                       \
    .attention_forward = P##attention_forward,                  \
    .attention_backward = P##attention_backward,                \
    .swiglu_forward = P##swiglu_forward,                        \
    .swiglu_backward = P##swiglu_backward,                      \
    .cross_entropy = P##cross_entropy_ex,                       \
    .rope_forward_pos = P##rope_forward_pos,                    \
    .rope_backward_pos = P##rope_backward_pos,                  \
    .attention_forward_varlen = P##attention_forward_varlen,    \
    .attention_backward_varlen = P##attention_backward_varlen,  \
    .embedding_forward = P##embedding_forward,                  \
    .embedding_backward = P##embedding_backward,                \
}
static const kernel_table FAST = KERNEL_TABLE(ab_);
static const kernel_table REFERENCE = KERNEL_TABLE(ab_ref_);
#undef KERNEL_TABLE

#define TRY(call) do { int rc_ = (call); if (rc_) return rc_; } while (0)
#define AB_SIZE_LIMIT 4503599627370496.0   /* 2^52 floats */

static const char *public_name(const char *func) {
    static _Thread_local char name[64];   /* copied by ab_fail before any reuse */
    if (strncmp(func, "spec_", 5) != 0) return func;
    snprintf(name, sizeof name, "ab_model_%s", func + 5);
    return name;
}

/* The model as the code below reads it: the public ab_model_config
 * (architecture) and ab_model_options (how to run) in one struct, made by
 * to_spec at each public entry point (the end of this file). */
typedef struct {
    int64_t dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len;
    int shared_classifier;
    float norm_eps;
    int reference;
    int64_t head_dim;
    int qk_norm;
    ab_rope_params rope;
    int recompute;
    int precision;
    int64_t lora_rank;
    float lora_scale;
    int lora_targets;
    int lora_merged;
    const int64_t *grad_offsets;
} model_spec;

static int spec_config_check(const model_spec *c);
static int spec_param_layout(const model_spec *c, ab_model_layout *out);
static int spec_grad_layout(const model_spec *c, const uint8_t *trainable,
                            int64_t *grad_offsets, int64_t *n_grads);
static int spec_tensors(const model_spec *c, ab_model_tensor *out, int64_t capacity,
                        int64_t *count);
static int spec_workspace_floats(const model_spec *c, int64_t B, int64_t S, int64_t *total,
                                 int64_t *logits_offset);
static int spec_bf16_refresh(const model_spec *c, const float *params, float *work,
                             int64_t work_floats);
static int spec_bf16_refresh_adapters(const model_spec *c, const float *params, float *work,
                                      int64_t work_floats);
static int spec_forward(double *loss_out, const model_spec *c, const float *params,
                        const int32_t *tokens, const int32_t *targets, int64_t B, int64_t S,
                        int want_grad, float *work, int64_t work_floats);
static int spec_forward_batch(double *loss_out, const model_spec *c, const float *params,
                              const int32_t *tokens, const int32_t *targets, int64_t B,
                              int64_t S, const ab_batch_layout *layout, int want_grad,
                              float *work, int64_t work_floats);
static int spec_forward_logits(double *loss_out, float *logits_out, const model_spec *c,
                               const float *params, const int32_t *tokens,
                               const int32_t *targets, int64_t B, int64_t S, int want_grad,
                               float *work, int64_t work_floats);
static int spec_forward_ane(double *loss_out, const model_spec *c, const float *params,
                            const int32_t *tokens, const int32_t *targets, int64_t B, int64_t S,
                            int want_grad, float *work, int64_t work_floats, ab_ane_ctx *ane,
                            uint64_t params_version, int ane_flags);
static int spec_backward(const model_spec *c, const float *params, float *grads, int64_t B,
                         int64_t S, float grad_scale, int accumulate, float *work,
                         int64_t work_floats);
static int spec_backward_notify(const model_spec *c, const float *params, float *grads,
                                int64_t B, int64_t S, float grad_scale, int accumulate,
                                float *work, int64_t work_floats, ab_grads_ready_fn ready,
                                void *user);
static int spec_backward_ane(const model_spec *c, const float *params, float *grads, int64_t B,
                             int64_t S, float grad_scale, int accumulate, float *work,
                             int64_t work_floats, ab_ane_ctx *ane, uint64_t params_version,
                             int ane_flags);
static int spec_kv_cache_floats(const model_spec *c, int64_t *out);
static int spec_decode_workspace_floats(const model_spec *c, int64_t *out);
static int spec_decode(float *logits, const model_spec *c, const float *params, int32_t token,
                       int64_t pos, float *kv_cache, float *work, int64_t work_floats);

/* Workspace header: int64 words stored in float slots with memcpy. HDR_N:
 * the forward's rows; HDR_NSEQ: its varlen segments (0: B full rows of S);
 * HDR_WBF: the tag of the bf16 weight copy. */
enum { HDR_TAG = 0, HDR_B = 2, HDR_S = 4, HDR_N = 6, HDR_NSEQ = 8, HDR_WBF = 10,
       HDR_FLOATS = 12 };
static const int64_t READY_TAG = 0x0a59444145524241LL;   /* "ABREADY\n" */
static const int64_t READY_TAG_BF16 = 0x0a36314642524241LL;   /* "ABRBF16\n": bf16 forward */
static const int64_t WBF_TAG = 0x0a36314657524241LL;     /* "ABRWF16\n": WBF is made */

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

static dims model_dims(const model_spec *c) {
    dims d;
    d.L = c->n_layers; d.D = c->dim; d.Hd = c->hidden_dim; d.V = c->vocab_size;
    d.H = c->n_heads; d.KV = c->n_kv_heads;
    d.hd = c->head_dim ? c->head_dim : c->dim / c->n_heads;
    d.qd = d.H * d.hd; d.kv = d.KV * d.hd;
    return d;
}

static int spec_config_check(const model_spec *c) {
    AB_NONNULL(c);
    AB_REQUIRE(c->dim > 0 && c->hidden_dim > 0 && c->n_layers > 0 && c->n_heads > 0
               && c->n_kv_heads > 0 && c->vocab_size > 0 && c->max_seq_len > 0, AB_EINVAL);
    AB_REQUIRE(c->head_dim >= 0, AB_EINVAL);
    if (c->head_dim == 0) AB_REQUIRE(c->dim % c->n_heads == 0, AB_EINVAL);
    const int64_t hd = c->head_dim ? c->head_dim : c->dim / c->n_heads;
    AB_REQUIRE(hd > 0 && hd % 2 == 0, AB_EINVAL);                   /* RoPE pairs */
    AB_REQUIRE(c->n_heads % c->n_kv_heads == 0, AB_EINVAL);
    AB_REQUIRE(c->norm_eps >= 0.0f, AB_EINVAL);
    AB_REQUIRE(c->precision == AB_PRECISION_FP32 || c->precision == AB_PRECISION_BF16, AB_EINVAL);
    AB_REQUIRE(!(c->reference && c->precision == AB_PRECISION_BF16), AB_EINVAL);
    TRY(ab_rope_params_check(&c->rope));
    AB_REQUIRE(c->lora_rank >= 0, AB_EINVAL);
    if (c->lora_rank > 0) {
        AB_REQUIRE(c->lora_targets > 0 && c->lora_targets < 128, AB_EINVAL);
        AB_REQUIRE(isfinite(c->lora_scale), AB_EINVAL);
        AB_BLAS_FITS(c->lora_rank);
    }
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
    if (c->lora_rank > 0)   /* the adapters: at most 7 pairs of (in + out) x r per layer */
        AB_REQUIRE(L * 7.0 * 2.0 * (D + Q + Hd) * (double)c->lora_rank < AB_SIZE_LIMIT,
                   AB_ETOOBIG);
    return AB_OK;
}

/* LoRA target t (0..6: wq wk wv wo w1 w2 w3): its input and output widths */
static int64_t lora_in(const dims *d, int t) {
    return t == 3 ? d->qd : t == 5 ? d->Hd : d->D;
}
static int64_t lora_out(const dims *d, int t) {
    switch (t) {
    case 0: return d->qd;
    case 1: case 2: return d->kv;
    case 4: case 6: return d->Hd;
    default: return d->D;      /* wo, w2 */
    }
}
/* Does target t carry an adapter that the forward applies? */
static int lora_on(const model_spec *c, int t) {
    return c->lora_rank > 0 && !c->lora_merged && ((c->lora_targets >> t) & 1);
}

/* ---- the model's tensors: one table ----
 * kind_shape is the one place that says what each tensor kind is: its shape
 * per layer (ndim 0: the model has no such tensor). The parameter layout
 * (ab_model_param_layout), the per-tensor offsets (tensor_at), the gradient
 * layout and the exported table (ab_model_tensors) all walk it. */
static int per_layer_kind(int kind) {
    return !(kind == AB_TENSOR_TOK || kind == AB_TENSOR_OUTPUT || kind == AB_TENSOR_NORM);
}

static int kind_shape(const model_spec *c, const dims *d, int kind, int64_t shape[2]) {
    const int64_t D = d->D, Hd = d->Hd, r = c->lora_rank;
    shape[0] = shape[1] = 0;
    switch (kind) {
    case AB_TENSOR_TOK: shape[0] = d->V; shape[1] = D; return 2;
    case AB_TENSOR_WQ: shape[0] = d->qd; shape[1] = D; return 2;
    case AB_TENSOR_WK: case AB_TENSOR_WV: shape[0] = d->kv; shape[1] = D; return 2;
    case AB_TENSOR_WO: shape[0] = D; shape[1] = d->qd; return 2;
    case AB_TENSOR_W1: case AB_TENSOR_W3: shape[0] = Hd; shape[1] = D; return 2;
    case AB_TENSOR_W2: shape[0] = D; shape[1] = Hd; return 2;
    case AB_TENSOR_OUTPUT:   /* tied: it is tok_embeddings, no tensor of its own */
        if (c->shared_classifier) return 0;
        shape[0] = d->V; shape[1] = D; return 2;
    case AB_TENSOR_ATTENTION_NORM: case AB_TENSOR_FFN_NORM: case AB_TENSOR_NORM:
        shape[0] = D; return 1;
    case AB_TENSOR_Q_NORM: case AB_TENSOR_K_NORM:
        if (!c->qk_norm) return 0;
        shape[0] = d->hd; return 1;
    default: {
        const int b = kind >= AB_TENSOR_LORA_B;
        const int t = kind - (b ? AB_TENSOR_LORA_B : AB_TENSOR_LORA_A);
        if (!(r > 0 && ((c->lora_targets >> t) & 1))) return 0;
        shape[0] = b ? lora_out(d, t) : r;
        shape[1] = b ? r : lora_in(d, t);
        return 2;
    }
    }
}

static int64_t kind_size(const model_spec *c, const dims *d, int kind) {
    int64_t s[2];
    const int nd = kind_shape(c, d, kind, s);
    return nd == 0 ? 0 : nd == 1 ? s[0] : s[0] * s[1];
}

/* where kind's stack of layers starts in params */
static int64_t kind_start(const ab_model_layout *P, int kind) {
    switch (kind) {
    case AB_TENSOR_TOK: return P->tok_embeddings;
    case AB_TENSOR_WQ: return P->wq;
    case AB_TENSOR_WK: return P->wk;
    case AB_TENSOR_WV: return P->wv;
    case AB_TENSOR_WO: return P->wo;
    case AB_TENSOR_W1: return P->w1;
    case AB_TENSOR_W2: return P->w2;
    case AB_TENSOR_W3: return P->w3;
    case AB_TENSOR_OUTPUT: return P->output;
    case AB_TENSOR_ATTENTION_NORM: return P->attention_norm;
    case AB_TENSOR_FFN_NORM: return P->ffn_norm;
    case AB_TENSOR_NORM: return P->norm;
    case AB_TENSOR_Q_NORM: return P->q_norm;
    case AB_TENSOR_K_NORM: return P->k_norm;
    default:
        return kind >= AB_TENSOR_LORA_B ? P->lora_b[kind - AB_TENSOR_LORA_B]
                                        : P->lora_a[kind - AB_TENSOR_LORA_A];
    }
}

/* Kinds are numbered in parameter order: each kind's stack of layers
 * follows the previous kind's; the 2-D weights (up to the classifier) come
 * before the norms, so weight decay is the prefix [0, n_decay). */
static int spec_param_layout(const model_spec *c, ab_model_layout *o) {
    TRY(spec_config_check(c));
    AB_NONNULL(o);
    const dims d = model_dims(c);
    int64_t start[AB_TENSOR_KINDS], p = 0;
    for (int kind = 0; kind < AB_TENSOR_KINDS; kind++) {
        start[kind] = p;
        p += (per_layer_kind(kind) ? d.L : 1) * kind_size(c, &d, kind);
        if (kind == AB_TENSOR_OUTPUT) o->n_decay = p;
    }
    o->n_params = p;
    o->tok_embeddings = start[AB_TENSOR_TOK];
    o->wq = start[AB_TENSOR_WQ]; o->wk = start[AB_TENSOR_WK];
    o->wv = start[AB_TENSOR_WV]; o->wo = start[AB_TENSOR_WO];
    o->w1 = start[AB_TENSOR_W1]; o->w2 = start[AB_TENSOR_W2]; o->w3 = start[AB_TENSOR_W3];
    o->output = c->shared_classifier ? o->tok_embeddings : start[AB_TENSOR_OUTPUT];
    o->attention_norm = start[AB_TENSOR_ATTENTION_NORM];
    o->ffn_norm = start[AB_TENSOR_FFN_NORM];
    o->norm = start[AB_TENSOR_NORM];
    o->q_norm = start[AB_TENSOR_Q_NORM]; o->k_norm = start[AB_TENSOR_K_NORM];
    for (int t = 0; t < 7; t++) {   /* untargeted: empty, at the end */
        const int on = kind_size(c, &d, AB_TENSOR_LORA_A + t) > 0;
        o->lora_a[t] = on ? start[AB_TENSOR_LORA_A + t] : p;
        o->lora_b[t] = on ? start[AB_TENSOR_LORA_B + t] : p;
    }
    return AB_OK;
}

/* Tensor (kind, layer): its offset in params and its size, or size 0 when
 * the model has no such tensor. */
static int64_t tensor_at(const model_spec *c, const ab_model_layout *P, const dims *d,
                         int kind, int64_t l, int64_t *size) {
    if (!per_layer_kind(kind) && l != 0) { *size = 0; return 0; }
    const int64_t n = kind_size(c, d, kind);
    *size = n;
    return kind_start(P, kind) + l * n;
}

/* Walking the slots in order packs the trainable tensors in parameter order
 * (all trainable: the parameter layout itself). The table is the one place
 * that says where a gradient lives: the C backward writes there and
 * Python's grads views read the same numbers (ab_model_tensors). */
static int spec_grad_layout(const model_spec *c, const uint8_t *trainable,
                            int64_t *grad_offsets, int64_t *n_grads) {
    ab_model_layout P;
    TRY(spec_param_layout(c, &P));
    AB_NONNULL(trainable); AB_NONNULL(grad_offsets); AB_NONNULL(n_grads);
    const dims d = model_dims(c);
    const int64_t L = d.L;
    int64_t g = 0;
    for (int kind = 0; kind < AB_TENSOR_KINDS; kind++)
        for (int64_t l = 0; l < L; l++) {
            int64_t n;
            (void)tensor_at(c, &P, &d, kind, l, &n);
            const int64_t slot = kind * L + l;
            grad_offsets[slot] = -1;
            if (kind == AB_TENSOR_OUTPUT && c->shared_classifier) {   /* it is the embedding */
                grad_offsets[slot] = l == 0 ? grad_offsets[AB_TENSOR_TOK * L] : -1;
                continue;
            }
            if (n > 0 && trainable[slot]) { grad_offsets[slot] = g; g += n; }
        }
    *n_grads = g;
    return AB_OK;
}

/* Where tensor (kind, l)'s gradient goes: NULL when it is frozen. */
static float *grad_of(const model_spec *c, const ab_model_layout *P, const dims *d,
                      float *grads, int kind, int64_t l) {
    int64_t n;
    const int64_t off = tensor_at(c, P, d, kind, l, &n);
    if (!c->grad_offsets) return grads + off;
    const int64_t g = c->grad_offsets[kind * d->L + l];
    return g < 0 ? NULL : grads + g;
}

/* The exported table: every tensor the model has, in parameter order. */
static const char *const kind_names[AB_TENSOR_KINDS] = {
    "tok_embeddings", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
    "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "output", "attention_norm",
    "ffn_norm", "norm", "attention.q_norm", "attention.k_norm",
    "attention.wq", "attention.wk", "attention.wv", "attention.wo",
    "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
    "attention.wq", "attention.wk", "attention.wv", "attention.wo",
    "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"};

static int spec_tensors(const model_spec *c, ab_model_tensor *out, int64_t capacity,
                        int64_t *count) {
    ab_model_layout P;
    TRY(spec_param_layout(c, &P));
    AB_NONNULL(count);
    const dims d = model_dims(c);
    const int64_t L = d.L;
    int64_t n = 0;
    for (int kind = 0; kind < AB_TENSOR_KINDS; kind++) {
        const int per_layer = per_layer_kind(kind);
        int64_t shape[2];
        const int ndim = kind_shape(c, &d, kind, shape);
        if (ndim == 0) continue;
        for (int64_t l = 0; l < (per_layer ? L : 1); l++, n++) {
            if (!out) continue;
            AB_REQUIRE_MSG(n < capacity, AB_EINVAL, "capacity %lld is too small: the model "
                           "has more tensors (call with out NULL for the count)",
                           (long long)capacity);
            ab_model_tensor *t = &out[n];
            int64_t size;
            memset(t, 0, sizeof *t);
            const char *ab = kind >= AB_TENSOR_LORA_B ? ".lora_B"
                             : kind >= AB_TENSOR_LORA_A ? ".lora_A" : "";
            if (per_layer)
                snprintf(t->name, sizeof t->name, "layers.%lld.%s%s.weight", (long long)l,
                         kind_names[kind], ab);
            else
                snprintf(t->name, sizeof t->name, "%s.weight", kind_names[kind]);
            t->kind = kind;
            t->layer = per_layer ? l : -1;
            t->offset = tensor_at(c, &P, &d, kind, l, &size);
            t->ndim = ndim;
            t->shape[0] = shape[0];
            t->shape[1] = shape[1];
            t->grad_offset = c->grad_offsets ? c->grad_offsets[kind * L + l] : t->offset;
            t->group = per_layer ? l : kind == AB_TENSOR_TOK ? -1 : L;
            t->decay = ndim == 2;
        }
    }
    *count = n;
    return AB_OK;
}

/* The bf16 weight copy covers params[0, n_decay) (the 2-D weights), and
 * with adapters all of params (the norms' few floats are not worth a second
 * indexing), so a weight's copy is always at wbf + (W - params). */
static int64_t wbf_floats(const model_spec *c, const ab_model_layout *P) {
    return c->lora_rank > 0 ? P->n_params : P->n_decay;
}

/* Rows per classifier chunk with recompute (N without): about 2^20 floats
 * of logits, a multiple of 16 rows between 64 and 256, at most N. It
 * depends on the shape only, so any thread count gives the same bits. */
static int64_t cls_chunk_rows(const model_spec *c, int64_t N) {
    if (!c->recompute) return N;
    int64_t r = (((int64_t)1 << 20) / c->vocab_size) & ~(int64_t)15;
    r = r < 64 ? 64 : r > 256 ? 256 : r;
    return r < N ? r : N;
}

/* Workspace offsets (floats) for a batch of B sequences of S tokens. The
 * per-layer activations (XA .. H3) are `slots` deep: L, or 1 with recompute. */
typedef struct {
    int64_t X, XA, QR, KR, Q, K, V, AT, HM, XF, H1, H3, XN, LOGITS;  /* saved activations */
    int64_t G, DH1, DH3, DX, DXN, DA, DQ, DK, DV, DQN, DKN, ATTW;    /* scratch */
    int64_t TOKENS;  /* the forward's tokens, N int32 (the header is at 0) */
    int64_t TGT, DEN, cls_rows;   /* chunked classifier: targets, denominator, chunk rows */
    int64_t CU, POS; /* its varlen layout: B*S+1 int64 segment starts, N int32 positions */
    int64_t LA[7];   /* LoRA: x A^T of each target [slots, N, r] (absent: 0 floats) */
    int64_t LT, LS, DLA;   /* LoRA scratch: [N, widest output], [N, r], [N, r] */
    int64_t MIRROR, WBF;   /* bf16 only: uint16 mirror of [0, MIRROR), weight copy */
    int64_t slots, total;
} ws_layout;

static int workspace_layout(const model_spec *c, int64_t B, int64_t S, ws_layout *w) {
    TRY(spec_config_check(c));
    AB_REQUIRE(B > 0 && S > 0, AB_EINVAL);
    const dims d = model_dims(c);
    {   /* an upper bound of the total in double: no int64 overflow below */
        const double n = (double)B * (double)S, Ld = (double)c->n_layers + 2;
        const double est = Ld * n * (5.0 * c->dim + 8.0 * (double)d.qd + 5.0 * c->hidden_dim)
                           + n * c->vocab_size + 2.0 * (double)S * (double)S + 5 * n + 4
                           + HDR_FLOATS
                           + (c->lora_rank > 0 ? n * ((double)c->n_layers * 7.0 + 2.0)
                                                 * (double)c->lora_rank : 0.0);
        /* bf16: + the mirror (half of it) and the weights' copy */
        const double bf = c->precision == AB_PRECISION_BF16
                          ? 0.5 * est + 0.5 * (double)c->vocab_size * (double)c->dim * 2
                            + 0.5 * (double)c->n_layers * (4.0 * (double)d.qd * c->dim
                                                           + 3.0 * c->hidden_dim * c->dim)
                            + 0.5 * (double)c->n_layers * (2.0 * c->dim + 2.0 * d.hd)
                            + (c->lora_rank > 0 ? 0.5 * (double)c->n_layers * 14.0
                               * (c->dim + d.qd + c->hidden_dim) * (double)c->lora_rank : 0.0)
                          : 0.0;
        AB_REQUIRE(est + 1.5 * bf < AB_SIZE_LIMIT, AB_ETOOBIG);
    }
    const int64_t L = d.L, D = d.D, Hd = d.Hd, V = d.V, qd = d.qd, kv = d.kv, N = B * S;
    const int64_t R = c->recompute ? 1 : L;        /* activation slots */
    const int64_t qn = c->qk_norm ? 1 : 0;
    AB_BLAS_FITS(N);
    int64_t p = HDR_FLOATS;
    w->WBF = p;            /* bf16: right after the header, whatever B and S */
    if (c->precision == AB_PRECISION_BF16) {
        ab_model_layout P;
        TRY(spec_param_layout(c, &P));
        p += ab_div_up(wbf_floats(c, &P), 2);
        p += p & 1;        /* CU below holds int64: keep p even (8-byte aligned) */
    }
    w->slots = R;
    w->CU = p; p += 2 * (N + 1);   /* int64, 8-byte aligned: p is even here */
    w->TOKENS = p; p += N;
    w->POS = p; p += N;
    w->cls_rows = cls_chunk_rows(c, N);
    w->DEN = p; p += c->recompute ? 2 : 0;      /* a double: p stays even */
    w->TGT = p; p += c->recompute ? N : 0;
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
    w->LOGITS = p; p += w->cls_rows * V;
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
    {
        const int64_t r = c->lora_rank;
        int64_t widest = 0;
        for (int t = 0; t < 7; t++) {
            w->LA[t] = p;
            if (r > 0 && ((c->lora_targets >> t) & 1)) {
                p += R * N * r;
                if (lora_out(&d, t) > widest) widest = lora_out(&d, t);
            }
        }
        w->LT = p; p += N * widest;
        w->LS = p; p += r > 0 ? N * r : 0;
        w->DLA = p; p += r > 0 ? N * r : 0;
    }
    w->MIRROR = p;
    if (c->precision == AB_PRECISION_BF16) p += ab_div_up(w->MIRROR, 2);   /* uint16s */
    w->total = p;
    return AB_OK;
}

static int spec_workspace_floats(const model_spec *c, int64_t B, int64_t S,
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

/* The rows a forward runs: B full rows of S (n_seq 0), or a varlen list of
 * N real tokens in n_seq segments (cu, pos: the workspace's copies). */
typedef struct {
    int64_t B, S, N, n_seq;
    const int64_t *cu;
    const int32_t *pos;
} batch_rows;

static int rope_rows(const kernel_table *k, const model_spec *c, const batch_rows *g,
                     float *x, int64_t heads, int64_t hd, int backward) {
    if (g->n_seq == 0)
        return backward ? k->rope_backward(x, x, g->B, g->S, heads, hd, 0, &c->rope)
                        : k->rope_forward(x, x, g->B, g->S, heads, hd, 0, &c->rope);
    return backward ? k->rope_backward_pos(x, x, g->N, heads, hd, g->pos, &c->rope)
                    : k->rope_forward_pos(x, x, g->N, heads, hd, g->pos, &c->rope);
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

/* Where the layer projections run: the CPU kernels (ctx NULL) or the ANE
 * context, with the weights' fp16 staging key and the AB_ANE_* flags. */
typedef struct {
    ab_ane_ctx *ctx;
    uint64_t version;
    int flags;
} ane_route;

/* ---- every matmul of the forward and backward goes through these three ----
 * y = x W^T, dx (+)= dy W, dW (+)= dy^T x as in csrc/kernels/linear.c: fp32
 * through the kernel table, or (precision bf16) bf16 operands: W's copy in
 * WBF (same offset as in params), x's and dy's in the workspace's mirror,
 * rounded here unless `ready` says the mirror is already current. */
typedef struct {
    const kernel_table *k;
    const ane_route *ane;      /* non-NULL with a context: forward projections on the ANE */
    int bf16;
    const float *params;       /* W - params: the offset into wbf */
    const uint16_t *wbf;
    const float *work;         /* x - work: the offset into mirror */
    uint16_t *mirror;
} proj_ctx;
enum { X_READY = 1, DY_READY = 2 };

static proj_ctx proj_make(const kernel_table *k, const ane_route *r, const model_spec *c,
                          const ws_layout *W, const float *params, float *work) {
    proj_ctx p = {k, r, c->precision == AB_PRECISION_BF16, params, NULL, work, NULL};
    if (p.bf16) {
        p.wbf = (const uint16_t *)(work + W->WBF);
        p.mirror = (uint16_t *)(work + W->MIRROR);
    }
    return p;
}

static const uint16_t *proj_operand(const proj_ctx *p, const float *a, int64_t n, int ready) {
    uint16_t *h = p->mirror + (a - p->work);
    if (!ready) ab_f32_to_bf16(h, a, n);
    return h;
}

static int proj_forward(const proj_ctx *p, float *y, const float *x, const float *W,
                        int64_t N, int64_t in, int64_t out, int ready) {
    if (p->ane && p->ane->ctx)   /* fp32 only: the ANE refuses bf16 configs */
        return ab_ane_linear_forward(p->ane->ctx, y, x, W, p->ane->version, N, in, out,
                                     p->ane->flags, NULL, NULL, 0);
    if (!p->bf16) return p->k->linear_forward(y, x, W, N, in, out);
    const uint16_t *xb = proj_operand(p, x, N * in, ready & X_READY);
    return ab_gemm_bf16(0, 1, N, out, in, xb, in, p->wbf + (W - p->params), in, 0, y, out);
}

static int proj_dx(const proj_ctx *p, float *dx, const float *dy, const float *W,
                   int64_t N, int64_t in, int64_t out, int accumulate, int ready) {
    if (!p->bf16) return p->k->linear_backward_dx(dx, dy, W, N, in, out, accumulate);
    const uint16_t *dyb = proj_operand(p, dy, N * out, ready & DY_READY);
    return ab_gemm_bf16(0, 0, N, in, out, dyb, out, p->wbf + (W - p->params), in, accumulate,
                        dx, in);
}

static int proj_dW(const proj_ctx *p, float *dW, const float *dy, const float *x,
                   int64_t N, int64_t in, int64_t out, int accumulate, int ready) {
    if (!p->bf16) return p->k->linear_backward_dW(dW, dy, x, N, in, out, accumulate);
    /* dy^T: ab_gemm_bf16 copies each tile's columns of dy into a dense
     * buffer (oneDNN's AMX kernel takes dense operands only) */
    const uint16_t *xb = proj_operand(p, x, N * in, ready & X_READY);
    const uint16_t *dyb = proj_operand(p, dy, N * out, ready & DY_READY);
    return ab_gemm_bf16(1, 0, out, in, N, dyb, out, xb, in, accumulate, dW, in);
}

/* ---- LoRA: y += s (x A^T) B^T on target t (0..6: wq wk wv wo w1 w2 w3) ----
 * Every product goes through proj_forward / proj_dx / proj_dW (fp32 or
 * bf16: A and B have their copy in WBF like the base weights). */
typedef struct {
    const model_spec *c;
    const dims *d;
    const ab_model_layout *P;
    const ws_layout *W;
    const float *params;
    float *work;
} lora_ctx;

static float *lora_xa(const lora_ctx *z, int t, int64_t N, int64_t l) {
    const int64_t s = z->W->slots == 1 ? 0 : l;
    return z->work + z->W->LA[t] + s * N * z->c->lora_rank;
}

static int lora_forward(const proj_ctx *pj, const lora_ctx *z, int t, int64_t l, float *y,
                        const float *x, int64_t N, int ready) {
    if (!lora_on(z->c, t)) return AB_OK;
    const int64_t r = z->c->lora_rank, in = lora_in(z->d, t), out = lora_out(z->d, t);
    const float s = z->c->lora_scale;
    float *xa = lora_xa(z, t, N, l), *T = z->work + z->W->LT;
    TRY(proj_forward(pj, xa, x, z->params + z->P->lora_a[t] + l * r * in, N, in, r, ready));
    TRY(proj_forward(pj, T, xa, z->params + z->P->lora_b[t] + l * out * r, N, r, out, 0));
    const int64_t n = N * out;
    AB_SIMD
    for (int64_t i = 0; i < n; i++) y[i] += s * T[i];
    return AB_OK;
}

/* Layer l's forward from X[l]: its activations into their slot and, if
 * write_next, X[l+1] (a backward recompute leaves X[l+1] alone). */
static int layer_forward(const kernel_table *k, const ane_route *r, const model_spec *c,
                         const dims *d, const ab_model_layout *P, const ws_layout *W,
                         const float *params, float *work, const batch_rows *g, int64_t l,
                         int write_next) {
    const int64_t D = d->D, Hd = d->Hd, H = d->H, KV = d->KV, hd = d->hd;
    const int64_t qd = d->qd, kv = d->kv, N = g->N, S = g->S;
    const float eps = c->norm_eps;
    const float *wq = params + P->wq + l * qd * D, *wk = params + P->wk + l * kv * D;
    const float *wv = params + P->wv + l * kv * D, *wo = params + P->wo + l * D * qd;
    const float *w1 = params + P->w1 + l * Hd * D, *w2 = params + P->w2 + l * D * Hd;
    const float *w3 = params + P->w3 + l * Hd * D;
    const float *rms_att = params + P->attention_norm + l * D;
    const float *rms_ffn = params + P->ffn_norm + l * D;
    layer_acts a = acts_of(W, d, work, N, l);
    float *G = work + W->G, *T = work + W->DXN;   /* scratch */
    const proj_ctx pj = proj_make(k, r, c, W, params, work);
    const lora_ctx z = {c, d, P, W, params, work};

    /* attention block */
    TRY(k->rmsnorm_forward(a.XA, a.X, rms_att, N, D, eps));
    if (c->qk_norm) {   /* Qwen3: q, k normalised per head before RoPE */
        TRY(proj_forward(&pj, a.QR, a.XA, wq, N, D, qd, 0));
        TRY(lora_forward(&pj, &z, 0, l, a.QR, a.XA, N, X_READY));
        TRY(proj_forward(&pj, a.KR, a.XA, wk, N, D, kv, X_READY));
        TRY(lora_forward(&pj, &z, 1, l, a.KR, a.XA, N, X_READY));
        TRY(k->rmsnorm_forward(a.Q, a.QR, params + P->q_norm + l * hd, N * H, hd, eps));
        TRY(k->rmsnorm_forward(a.K, a.KR, params + P->k_norm + l * hd, N * KV, hd, eps));
    } else {
        TRY(proj_forward(&pj, a.Q, a.XA, wq, N, D, qd, 0));
        TRY(lora_forward(&pj, &z, 0, l, a.Q, a.XA, N, X_READY));
        TRY(proj_forward(&pj, a.K, a.XA, wk, N, D, kv, X_READY));
        TRY(lora_forward(&pj, &z, 1, l, a.K, a.XA, N, X_READY));
    }
    TRY(proj_forward(&pj, a.V, a.XA, wv, N, D, kv, X_READY));
    TRY(lora_forward(&pj, &z, 2, l, a.V, a.XA, N, X_READY));
    TRY(rope_rows(k, c, g, a.Q, H, hd, 0));
    TRY(rope_rows(k, c, g, a.K, KV, hd, 0));
    if (g->n_seq == 0)
        TRY(k->attention_forward(a.AT, a.Q, a.K, a.V, g->B, S, H, KV, hd, work + W->ATTW,
                                 ab_attention_workspace_floats(S)));
    else
        TRY(k->attention_forward_varlen(a.AT, a.Q, a.K, a.V, g->cu, g->n_seq, H, KV, hd,
                                        work + W->ATTW, ab_attention_workspace_floats(S)));
    TRY(proj_forward(&pj, T, a.AT, wo, N, qd, D, 0));
    TRY(lora_forward(&pj, &z, 3, l, T, a.AT, N, X_READY));
    add_into(a.HM, a.X, T, N * D);
    /* feed-forward block */
    TRY(k->rmsnorm_forward(a.XF, a.HM, rms_ffn, N, D, eps));
    TRY(proj_forward(&pj, a.H1, a.XF, w1, N, D, Hd, 0));
    TRY(lora_forward(&pj, &z, 4, l, a.H1, a.XF, N, X_READY));
    TRY(proj_forward(&pj, a.H3, a.XF, w3, N, D, Hd, X_READY));
    TRY(lora_forward(&pj, &z, 6, l, a.H3, a.XF, N, X_READY));
    if (write_next) {
        TRY(k->swiglu_forward(G, a.H1, a.H3, N * Hd));
        TRY(proj_forward(&pj, T, G, w2, N, Hd, D, 0));
        TRY(lora_forward(&pj, &z, 5, l, T, G, N, X_READY));
        add_into(a.X + N * D, a.HM, T, N * D);
    }
    return AB_OK;
}

static int spec_bf16_refresh(const model_spec *c, const float *params, float *work,
                             int64_t work_floats) {
    ab_model_layout P;
    TRY(spec_param_layout(c, &P));
    AB_REQUIRE(c->precision == AB_PRECISION_BF16, AB_EINVAL);
    AB_NONNULL(params); AB_NONNULL(work);
    AB_REQUIRE(work_floats >= HDR_FLOATS, AB_EWORKSPACE);
    /* the weights' copy follows the header whatever B and S are */
    const int64_t nw = wbf_floats(c, &P);
    AB_REQUIRE(work_floats >= HDR_FLOATS + ab_div_up(nw, 2), AB_EWORKSPACE);
    if (ab_bf16_path() == AB_BF16_UNAVAILABLE) return AB_FAIL(AB_EUNAVAILABLE, NULL);
    hdr_set(work, HDR_WBF, 0);
    TRY(ab_f32_to_bf16((uint16_t *)(work + HDR_FLOATS), params, nw));
    hdr_set(work, HDR_WBF, WBF_TAG);
    return AB_OK;
}

static int spec_bf16_refresh_adapters(const model_spec *c, const float *params, float *work,
                                      int64_t work_floats) {
    ab_model_layout P;
    TRY(spec_param_layout(c, &P));
    AB_REQUIRE(c->precision == AB_PRECISION_BF16 && c->lora_rank > 0, AB_EINVAL);
    AB_NONNULL(params); AB_NONNULL(work);
    AB_REQUIRE(work_floats >= HDR_FLOATS + ab_div_up(P.n_params, 2), AB_EWORKSPACE);
    AB_REQUIRE(hdr_get(work, HDR_WBF) == WBF_TAG, AB_EINVAL);
    int64_t first = P.n_params;
    for (int t = 0; t < 7; t++) first = P.lora_a[t] < first ? P.lora_a[t] : first;
    hdr_set(work, HDR_WBF, 0);
    TRY(ab_f32_to_bf16((uint16_t *)(work + HDR_FLOATS) + first, params + first,
                       P.n_params - first));
    hdr_set(work, HDR_WBF, WBF_TAG);
    return AB_OK;
}

/* The forward's rows, read back from the workspace header and copies. */
static batch_rows rows_of(const ws_layout *W, float *work, int64_t B, int64_t S) {
    batch_rows g = {B, S, hdr_get(work, HDR_N), hdr_get(work, HDR_NSEQ), NULL, NULL};
    if (g.n_seq) {
        g.cu = (const int64_t *)(void *)(work + W->CU);
        g.pos = (const int32_t *)(work + W->POS);
    }
    return g;
}

/* The forward of every entry point: full rows (layout NULL) or a varlen
 * batch; layer projections on the CPU or, with a route, the ANE. */
static int model_forward(double *loss_out, const model_spec *c, const float *params,
                         const int32_t *tokens, const int32_t *targets, int64_t B, int64_t S,
                         const ab_batch_layout *layout, int want_grad, float *work,
                         int64_t work_floats, const ane_route *r, float *logits_out) {
    ab_model_layout P;
    ws_layout W;
    TRY(spec_param_layout(c, &P));
    TRY(workspace_layout(c, B, S, &W));
    AB_NONNULL(params); AB_NONNULL(tokens); AB_NONNULL(work);
    AB_REQUIRE(work_floats >= W.total, AB_EWORKSPACE);
    AB_REQUIRE_MSG(S <= c->max_seq_len, AB_EINVAL, "S exceeds the config's max_seq_len");
    AB_REQUIRE_MSG(!want_grad || (targets && loss_out), AB_EINVAL,
                   "want_grad needs targets and loss_out");
    AB_REQUIRE_MSG(!c->recompute || targets || logits_out, AB_EINVAL,
                   "with recompute the workspace holds one chunk of logits: ask for them "
                   "with ab_model_forward_logits");
    double den = 0.0;
    int64_t N = B * S, n_seq = 0;
    if (layout) {   /* checked before the workspace is touched */
        int64_t n_rows, max_len;
        n_seq = layout->n_seq;
        AB_REQUIRE(n_seq >= 1 && layout->n_tokens >= 1 && layout->n_tokens <= B * S, AB_EINVAL);
        TRY(ab_varlen_check(layout->cu_seqlens, n_seq, &n_rows, &max_len));
        AB_REQUIRE(n_rows == layout->n_tokens && max_len <= S, AB_EINVAL);
        if (layout->positions)
            for (int64_t t = 0; t < n_rows; t++) AB_REQUIRE(layout->positions[t] >= 0, AB_EINVAL);
        den = layout->loss_denominator;
        AB_REQUIRE(den == 0.0 || (isfinite(den) && den > 0.0), AB_EINVAL);
        /* the segment starts are int64 in the workspace: a float* from
         * malloc/calloc/NumPy is aligned for them (HDR_FLOATS is even) */
        AB_REQUIRE((uintptr_t)(work + W.CU) % sizeof(int64_t) == 0, AB_EINVAL);
        N = n_rows;
    }
    const kernel_table *k = c->reference ? &REFERENCE : &FAST;
    const dims d = model_dims(c);
    const int64_t L = d.L, D = d.D, V = d.V;
    const int bf16 = c->precision == AB_PRECISION_BF16;
    /* bf16: the weights' copy must have been made (ab_model_bf16_refresh) */
    AB_REQUIRE_MSG(!bf16 || hdr_get(work, HDR_WBF) == WBF_TAG, AB_EINVAL,
                   "bf16: call spec_bf16_refresh after each change of params");
    const proj_ctx pj = proj_make(k, NULL, c, &W, params, work);   /* the classifier: CPU */

    hdr_set(work, HDR_TAG, 0);
    hdr_set(work, HDR_B, B);
    hdr_set(work, HDR_S, S);
    hdr_set(work, HDR_N, N);
    hdr_set(work, HDR_NSEQ, n_seq);
    if (layout) {
        int64_t *cu = (int64_t *)(void *)(work + W.CU);
        int32_t *pos = (int32_t *)(work + W.POS);
        memcpy(cu, layout->cu_seqlens, (size_t)(n_seq + 1) * sizeof(int64_t));
        if (layout->positions) memcpy(pos, layout->positions, (size_t)N * sizeof(int32_t));
        else   /* each token's index inside its segment */
            for (int64_t i = 0; i < n_seq; i++)
                for (int64_t t = cu[i]; t < cu[i + 1]; t++) pos[t] = (int32_t)(t - cu[i]);
    }
    const batch_rows g = rows_of(&W, work, B, S);
    memcpy(work + W.TOKENS, tokens, (size_t)N * sizeof(int32_t));
    TRY(k->embedding_forward(work + W.X, params + P.tok_embeddings, tokens, N, V, D));
    for (int64_t l = 0; l < L; l++)
        TRY(layer_forward(k, r, c, &d, &P, &W, params, work, &g, l, 1));
    float *XN = work + W.XN, *LOGITS = work + W.LOGITS;
    TRY(k->rmsnorm_forward(XN, work + W.X + L * N * D, params + P.norm, N, D, c->norm_eps));
    if (c->recompute) {     /* the classifier in chunks of C rows, loss only */
        const int64_t C = W.cls_rows;
        double total = 0.0, n = 0.0;
        if (targets)
            for (int64_t t = 0; t < N; t++) n += targets[t] != -1;
        for (int64_t r0 = 0; r0 < N; r0 += C) {
            const int64_t rows = N - r0 < C ? N - r0 : C;
            float *lg = logits_out ? logits_out + r0 * V : LOGITS;
            TRY(proj_forward(&pj, lg, XN + r0 * D, params + P.output, rows, D, V, 0));
            if (targets) {   /* denominator 1: the chunk's sum of loss terms */
                double part = 0.0;
                TRY(k->cross_entropy(&part, NULL, NULL, lg, targets + r0, rows, V, 1.0f, 1.0));
                total += part;
            }
        }
        if (targets) {
            const double dn = den > 0.0 ? den : n;
            if (loss_out) *loss_out = dn > 0.0 ? total / dn : NAN;
            if (want_grad) {   /* what the backward's dlogits need */
                memcpy(work + W.TGT, targets, (size_t)N * sizeof(int32_t));
                memcpy(work + W.DEN, &dn, sizeof dn);
                hdr_set(work, HDR_TAG, bf16 ? READY_TAG_BF16 : READY_TAG);
            }
        }
        return AB_OK;
    }
    TRY(proj_forward(&pj, LOGITS, XN, params + P.output, N, D, V, 0));
    if (targets) {
        double loss = 0.0;
        TRY(k->cross_entropy(&loss, NULL, want_grad ? LOGITS : NULL, LOGITS, targets, N, V, 1.0f,
                             den));
        if (loss_out) *loss_out = loss;
        if (want_grad) hdr_set(work, HDR_TAG, bf16 ? READY_TAG_BF16 : READY_TAG);
    }
    return AB_OK;
}

static int spec_forward(double *loss_out, const model_spec *c, const float *params,
                        const int32_t *tokens, const int32_t *targets, int64_t B, int64_t S,
                        int want_grad, float *work, int64_t work_floats) {
    return model_forward(loss_out, c, params, tokens, targets, B, S, NULL, want_grad, work,
                         work_floats, NULL, NULL);
}

static int spec_forward_batch(double *loss_out, const model_spec *c, const float *params,
                              const int32_t *tokens, const int32_t *targets, int64_t B, int64_t S,
                              const ab_batch_layout *layout, int want_grad, float *work,
                              int64_t work_floats) {
    return model_forward(loss_out, c, params, tokens, targets, B, S, layout, want_grad, work,
                         work_floats, NULL, NULL);
}

/* ab_model_forward that also hands the caller the logits: the forward
 * without targets (activations and logits in the workspace), a copy of the
 * logits, then the same cross-entropy over them in place (loss, and dlogits
 * with want_grad) as ab_model_forward's. Bit-identical loss and dlogits. */
static int spec_forward_logits(double *loss_out, float *logits_out, const model_spec *c,
                               const float *params, const int32_t *tokens, const int32_t *targets,
                               int64_t B, int64_t S, int want_grad, float *work,
                               int64_t work_floats) {
    ws_layout W;
    AB_NONNULL(logits_out);
    AB_NONNULL(c);
    AB_REQUIRE_MSG(!want_grad || (targets && loss_out), AB_EINVAL,
                   "want_grad needs targets and loss_out");
    if (c->recompute)   /* the chunked classifier writes the logits straight there */
        return model_forward(loss_out, c, params, tokens, targets, B, S, NULL, want_grad, work,
                             work_floats, NULL, logits_out);
    TRY(model_forward(NULL, c, params, tokens, NULL, B, S, NULL, 0, work, work_floats, NULL,
                      NULL));
    TRY(workspace_layout(c, B, S, &W));
    const kernel_table *k = c->reference ? &REFERENCE : &FAST;
    const int64_t N = B * S, V = c->vocab_size;
    float *LOGITS = work + W.LOGITS;
    memcpy(logits_out, LOGITS, (size_t)(N * V) * sizeof(float));
    if (targets) {
        double loss = 0.0;
        TRY(k->cross_entropy(&loss, NULL, want_grad ? LOGITS : NULL, LOGITS, targets, N, V, 1.0f,
                             0.0));
        if (loss_out) *loss_out = loss;
        if (want_grad)
            hdr_set(work, HDR_TAG, c->precision == AB_PRECISION_BF16 ? READY_TAG_BF16 : READY_TAG);
    }
    return AB_OK;
}

static int spec_forward_ane(double *loss_out, const model_spec *c, const float *params,
                            const int32_t *tokens, const int32_t *targets, int64_t B, int64_t S,
                            int want_grad, float *work, int64_t work_floats, ab_ane_ctx *ane,
                            uint64_t params_version, int ane_flags) {
    AB_REQUIRE(!c || !c->reference || !ane, AB_EINVAL);   /* the seed loops stay seed loops */
    AB_REQUIRE(!c || c->precision == AB_PRECISION_FP32 || !ane, AB_EINVAL);   /* fp32 only */
    AB_REQUIRE(ane_flags == 0 || ane_flags == AB_ANE_STRICT, AB_EINVAL);
    AB_REQUIRE(!c || !ane || c->lora_rank == 0, AB_EINVAL);   /* no adapters on the ANE */
    const ane_route r = {ane, params_version, ane_flags};
    return model_forward(loss_out, c, params, tokens, targets, B, S, NULL, want_grad, work,
                         work_floats, &r, NULL);
}

/* The ANE path of the backward (ab_model_backward_ane), as the origin
 * project runs it: each projection's dx runs on the ANE on this thread (its
 * result is on the critical path), and each weight gradient is queued to
 * the ANE context's worker thread (a serial CPU queue), waited for once at
 * the end of the backward. A queued dW reads its inputs later, so those the
 * backward overwrites in the meantime (the gradient scratch: dy of every
 * projection, swiglu's G) are copied into the job; the saved activations
 * (XA, AT, XF) stay in place unless recompute rebuilds them, and then the
 * queue is drained before each layer's recompute. Without a context every
 * call runs on the CPU at once: the same kernels on the same inputs,
 * bit-identical to ab_model_backward. */
typedef struct {
    float *dW;
    const float *dy, *x;
    int64_t N, in, out;
    int acc;
    float *own;                 /* the copies dy/x point into, freed by the job */
    ab_ane_job *job;
} dw_job;

typedef struct {
    ane_route r;                /* r.ctx NULL: everything on the CPU at once */
    dw_job *jobs;               /* queued weight gradients, in order */
    int64_t n, cap;
} ane_queue;

static int dw_run(void *p) {
    dw_job *j = p;
    int rc = ab_linear_backward_dW(j->dW, j->dy, j->x, j->N, j->in, j->out, j->acc);
    free(j->own);
    j->own = NULL;
    return rc;
}

/* dx (+)= Σ_p dy[p]·W[p] over the n projections sharing this input: one
 * fused evaluation on the ANE (this thread) with a context, else the CPU
 * kernel per projection, accumulating. */
static int dx_run(ane_queue *q, const proj_ctx *pj, float *dx, int n, const float *const *dy,
                  const float *const *W, const int64_t *out, int64_t N, int64_t in, int accumulate) {
    if (q->r.ctx)
        return ab_ane_linear_backward_dx_sum(q->r.ctx, dx, n, dy, W, out, q->r.version, N, in,
                                             accumulate, q->r.flags);
    for (int p = 0; p < n; p++)
        TRY(proj_dx(pj, dx, dy[p], W[p], N, in, out[p], p ? 1 : accumulate, 0));
    return AB_OK;
}

/* dW (+)= dy^T·x: queued with a context (dy and/or x copied when copy_dy /
 * copy_x: the backward overwrites them before the job may run), else now
 * (`ready`: proj_dW's flags, the bf16 operands already in the mirror). */
static int dw_queue(ane_queue *q, const proj_ctx *pj, float *dW, const float *dy, int copy_dy,
                    const float *x, int copy_x, int64_t N, int64_t in, int64_t out, int acc,
                    int ready) {
    if (!q->r.ctx) return proj_dW(pj, dW, dy, x, N, in, out, acc, ready);
    AB_REQUIRE(q->n < q->cap, AB_EINVAL);      /* sized for one backward: never moves */
    const int64_t ndy = copy_dy ? N * out : 0, nx = copy_x ? N * in : 0;
    float *own = ndy + nx ? malloc((size_t)(ndy + nx) * sizeof(float)) : NULL;
    if (ndy + nx && !own) return AB_FAIL(AB_ENOMEM, NULL);
    if (ndy) { memcpy(own, dy, (size_t)ndy * sizeof(float)); dy = own; }
    if (nx) { memcpy(own + ndy, x, (size_t)nx * sizeof(float)); x = own + ndy; }
    dw_job *j = &q->jobs[q->n];
    *j = (dw_job){dW, dy, x, N, in, out, acc, own, NULL};
    int rc = ab_ane_submit_fn(q->r.ctx, &j->job, dw_run, j);
    if (rc) { free(own); return rc; }
    q->n++;
    return AB_OK;
}

/* Target t's adapter gradients (those not frozen) and its share of dx (+=),
 * from dy [N, out] and the input x [N, in]; dy_ready / x_ready: whether
 * their bf16 copies are current (DY_READY / X_READY or 0). */
static int lora_backward(ane_queue *q, const proj_ctx *pj, const lora_ctx *z, float *grads, int t,
                         int64_t l, float *dx, const float *dy, const float *x, int64_t N,
                         int acc, int dy_ready, int x_ready) {
    if (!lora_on(z->c, t)) return AB_OK;
    const model_spec *c = z->c;
    const int64_t r = c->lora_rank, in = lora_in(z->d, t), out = lora_out(z->d, t);
    const float s = c->lora_scale;
    const float *A = z->params + z->P->lora_a[t] + l * r * in;
    const float *Bw = z->params + z->P->lora_b[t] + l * out * r;
    float *gA = grad_of(c, z->P, z->d, grads, AB_TENSOR_LORA_A + t, l);
    float *gB = grad_of(c, z->P, z->d, grads, AB_TENSOR_LORA_B + t, l);
    const float *xa = lora_xa(z, t, N, l);
    float *LS = z->work + z->W->LS, *DLA = z->work + z->W->DLA;
    const int64_t n = N * r;
    if (gB) {       /* dB = dy^T (s x A^T) */
        AB_SIMD
        for (int64_t i = 0; i < n; i++) LS[i] = s * xa[i];
        TRY(dw_queue(q, pj, gB, dy, 1, LS, 1, N, r, out, acc, dy_ready));
    }
    /* d(x A^T) = s dy B */
    TRY(proj_dx(pj, DLA, dy, Bw, N, r, out, 0, gB ? DY_READY : dy_ready));
    AB_SIMD
    for (int64_t i = 0; i < n; i++) DLA[i] *= s;
    if (gA) TRY(dw_queue(q, pj, gA, DLA, 1, x, 1, N, in, r, acc, x_ready));   /* dA */
    return proj_dx(pj, dx, DLA, A, N, in, r, 1, gA ? DY_READY : 0);           /* dx += */
}

/* Waits for every queued dW (also after an error: they write the
 * gradients); returns the first error. */
static int dw_wait(ane_queue *q) {
    int rc = AB_OK;
    for (int64_t i = 0; i < q->n; i++) {
        int r = ab_ane_job_wait(q->jobs[i].job, NULL, NULL, 0);
        if (!rc) rc = r;
    }
    q->n = 0;
    return rc;
}


/* who is told when a group of gradients is final (ab_model_backward_notify) */
typedef struct { ab_grads_ready_fn fn; void *user; } ready_hook;

static void announce(const ready_hook *h, int64_t group) {
    if (h && h->fn) h->fn(h->user, group);      /* h NULL: the ANE path */
}

static int model_backward(const model_spec *c, const float *params, float *grads,
                          int64_t B, int64_t S, float grad_scale, int accumulate,
                          float *work, int64_t work_floats, ane_queue *q, const ready_hook *h);

static int spec_backward(const model_spec *c, const float *params, float *grads,
                         int64_t B, int64_t S, float grad_scale, int accumulate,
                         float *work, int64_t work_floats) {
    return spec_backward_notify(c, params, grads, B, S, grad_scale, accumulate, work,
                                    work_floats, NULL, NULL);
}

static int spec_backward_notify(const model_spec *c, const float *params, float *grads,
                                int64_t B, int64_t S, float grad_scale, int accumulate,
                                float *work, int64_t work_floats,
                                ab_grads_ready_fn ready, void *user) {
    ane_queue q = {0};
    ready_hook h = {ready, user};
    return model_backward(c, params, grads, B, S, grad_scale, accumulate, work, work_floats, &q,
                          &h);
}

static int spec_backward_ane(const model_spec *c, const float *params, float *grads,
                             int64_t B, int64_t S, float grad_scale, int accumulate,
                             float *work, int64_t work_floats, ab_ane_ctx *ane,
                             uint64_t params_version, int ane_flags) {
    AB_REQUIRE(!c || !c->reference || !ane, AB_EINVAL);   /* the seed loops stay seed loops */
    AB_REQUIRE(!c || c->precision == AB_PRECISION_FP32 || !ane, AB_EINVAL);   /* fp32 only */
    AB_REQUIRE(ane_flags == 0 || ane_flags == AB_ANE_STRICT, AB_EINVAL);
    ane_queue q = {{ane, params_version, ane_flags}, NULL, 0, 0};
    if (ane) {          /* every dW of one backward: the classifier's and 7 per layer */
        AB_REQUIRE(c && c->n_layers > 0 && c->n_layers < ((int64_t)1 << 40), AB_EINVAL);
        q.cap = 1 + 7 * c->n_layers;
        q.jobs = malloc((size_t)q.cap * sizeof *q.jobs);
        if (!q.jobs) return AB_FAIL(AB_ENOMEM, NULL);
    }
    int rc = model_backward(c, params, grads, B, S, grad_scale, accumulate, work, work_floats, &q,
                            NULL);
    free(q.jobs);
    return rc;
}

static int model_backward(const model_spec *c, const float *params, float *grads,
                          int64_t B, int64_t S, float grad_scale, int accumulate,
                          float *work, int64_t work_floats, ane_queue *q, const ready_hook *h) {
    ab_model_layout P;
    ws_layout W;
    TRY(spec_param_layout(c, &P));
    TRY(workspace_layout(c, B, S, &W));
    AB_NONNULL(params); AB_NONNULL(grads); AB_NONNULL(work);
    AB_REQUIRE(work_floats >= HDR_FLOATS, AB_EWORKSPACE);
    /* dlogits must come from a want_grad forward of this (B, S) on this
     * workspace, and are used once (the backward scales them in place) */
    const int bf16 = c->precision == AB_PRECISION_BF16;
    AB_REQUIRE_MSG(hdr_get(work, HDR_TAG) == (bf16 ? READY_TAG_BF16 : READY_TAG), AB_EINVAL,
                   "one backward per forward: run a forward with want_grad = 1 on this "
                   "workspace (and the same precision) before each backward");
    AB_REQUIRE_MSG(hdr_get(work, HDR_B) == B && hdr_get(work, HDR_S) == S, AB_EINVAL,
                   "B and S differ from the forward's on this workspace");
    AB_REQUIRE(work_floats >= W.total, AB_EWORKSPACE);
    AB_REQUIRE(!c->lora_merged || c->lora_rank == 0, AB_EINVAL);   /* unmerge to train */
    AB_REQUIRE(!q->r.ctx || c->lora_rank == 0, AB_EINVAL);         /* no adapters on the ANE */
    hdr_set(work, HDR_TAG, 0);
    const int32_t *tokens = (const int32_t *)(work + W.TOKENS);   /* the forward's */
    const batch_rows g = rows_of(&W, work, B, S);                  /* and its rows */
    const kernel_table *k = c->reference ? &REFERENCE : &FAST;
    const dims d = model_dims(c);
    const int64_t L = d.L, D = d.D, Hd = d.Hd, V = d.V, H = d.H, KV = d.KV, hd = d.hd;
    const int64_t qd = d.qd, kv = d.kv, N = g.N;
    const float eps = c->norm_eps;
    const int64_t attw = ab_attention_workspace_floats(S);
    const int acc = accumulate != 0;
    const proj_ctx pj = proj_make(k, &q->r, c, &W, params, work);
    const lora_ctx z = {c, &d, &P, &W, params, work};
#define GRAD(kind, l) grad_of(c, &P, &d, grads, (kind), (l))

    /* Every dW below is written with beta = acc except those that are sums:
     * the norm weights (the rmsnorm kernel always adds) and the embedding
     * (scatter-add). Those start from zero unless accumulating. A tied
     * classifier's dW is written first into the embedding gradient, and the
     * scatter-add of the embedding adds to it: one gradient, one buffer. */
    if (!acc) {     /* the sums: norm weights, and the embedding unless it is the classifier */
        static const int sums[] = {AB_TENSOR_TOK, AB_TENSOR_ATTENTION_NORM, AB_TENSOR_FFN_NORM,
                                   AB_TENSOR_NORM, AB_TENSOR_Q_NORM, AB_TENSOR_K_NORM};
        for (size_t i = 0; i < sizeof sums / sizeof *sums; i++)
            for (int64_t l = 0; l < L; l++) {
                int64_t n;
                (void)tensor_at(c, &P, &d, sums[i], l, &n);
                float *gp = GRAD(sums[i], l);
                if (n && gp && !(sums[i] == AB_TENSOR_TOK && c->shared_classifier))
                    memset(gp, 0, (size_t)n * sizeof(float));
            }
    }
    float *DL = work + W.LOGITS;   /* dlogits, written by the forward (recompute: a chunk's) */
    if (grad_scale != 1.0f && !c->recompute) TRY(ab_scale(DL, N * V, grad_scale));
    float *DX = work + W.DX, *DXN = work + W.DXN;

    /* classifier and final norm (its dW reads dlogits and XN, which stay) */
    const float *XN = work + W.XN;
    int rc = AB_OK;
#define TRYB(call) do { if ((rc = (call)) != AB_OK) goto end; } while (0)
    float *gout = GRAD(AB_TENSOR_OUTPUT, 0);
    if (c->recompute) {     /* each chunk's logits again, its dlogits, dXN rows, dW += */
        const proj_ctx pc = proj_make(k, NULL, c, &W, params, work);   /* as the forward's */
        const int32_t *tgt = (const int32_t *)(work + W.TGT);
        double den, unused;
        memcpy(&den, work + W.DEN, sizeof den);
        for (int64_t r0 = 0, C = W.cls_rows; r0 < N; r0 += C) {
            const int64_t rows = N - r0 < C ? N - r0 : C;
            /* a queued dW of the last chunk still reads DL (the queue holds
             * one at a time: no copy of it; the layers' recompute waits too) */
            TRYB(dw_wait(q));
            TRYB(proj_forward(&pc, DL, XN + r0 * D, params + P.output, rows, D, V, 0));
            /* den 0 only when no row is counted: then every chunk's dlogits are 0 */
            TRYB(k->cross_entropy(&unused, NULL, DL, DL, tgt + r0, rows, V, 1.0f, den));
            if (grad_scale != 1.0f) TRYB(ab_scale(DL, rows * V, grad_scale));
            if (gout)
                TRYB(dw_queue(q, &pc, gout, DL, 0, XN + r0 * D, 0, rows, D, V,
                              r0 ? 1 : acc, X_READY));
            TRYB(proj_dx(&pc, DXN + r0 * D, DL, params + P.output, rows, D, V, 0,
                         gout ? DY_READY : 0));
        }
    } else {
        if (gout)
            TRYB(dw_queue(q, &pj, gout, DL, 0, XN, 0, N, D, V, acc, X_READY));
        TRYB(proj_dx(&pj, DXN, DL, params + P.output, N, D, V, 0, gout ? DY_READY : 0));
    }
    TRYB(k->rmsnorm_backward(DX, GRAD(AB_TENSOR_NORM, 0), DXN, work + W.X + L * N * D, params + P.norm,
                             N, D, eps, 0));
    announce(h, L);                            /* norm, untied output */

    for (int64_t l = L - 1; l >= 0; l--) {
        const float *wq = params + P.wq + l * qd * D, *wk = params + P.wk + l * kv * D;
        const float *wv = params + P.wv + l * kv * D, *wo = params + P.wo + l * D * qd;
        const float *w1 = params + P.w1 + l * Hd * D, *w2 = params + P.w2 + l * D * Hd;
        const float *w3 = params + P.w3 + l * Hd * D;
        float *gwq = GRAD(AB_TENSOR_WQ, l), *gwk = GRAD(AB_TENSOR_WK, l);
        float *gwv = GRAD(AB_TENSOR_WV, l), *gwo = GRAD(AB_TENSOR_WO, l);
        float *gw1 = GRAD(AB_TENSOR_W1, l), *gw2 = GRAD(AB_TENSOR_W2, l);
        float *gw3 = GRAD(AB_TENSOR_W3, l);
        if (c->recompute) {     /* the queued dW still read the activations it rebuilds */
            TRYB(dw_wait(q));
            TRYB(layer_forward(k, &q->r, c, &d, &P, &W, params, work, &g, l, 0));
        }
        const layer_acts a = acts_of(&W, &d, work, N, l);
        float *G = work + W.G, *DH1 = work + W.DH1, *DH3 = work + W.DH3;
        float *DA = work + W.DA, *DQ = work + W.DQ, *DK = work + W.DK, *DV = work + W.DV;

        /* feed-forward: X[l+1] = HM + swiglu(XF w1^T, XF w3^T) w2^T; DX = dL/dX[l+1] */
        TRYB(k->swiglu_forward(G, a.H1, a.H3, N * Hd));
        if (W.slots == 1 && lora_on(c, 5))   /* the recompute stops before w2: x A^T of G */
            TRYB(proj_forward(&pj, lora_xa(&z, 5, N, l), G,
                              params + P.lora_a[5] + l * c->lora_rank * Hd, N, Hd,
                              c->lora_rank, 0));
        {
            const float *dy[1] = {DX}, *Ws[1] = {w2};
            const int64_t outs[1] = {D};
            TRYB(dx_run(q, &pj, DH1, 1, dy, Ws, outs, N, Hd, 0));
        }
        if (gw2) TRYB(dw_queue(q, &pj, gw2, DX, 1, G, 1, N, Hd, D, acc, DY_READY));
        TRYB(lora_backward(q, &pj, &z, grads, 5, l, DH1, DX, G, N, acc, DY_READY,
                           gw2 ? X_READY : 0));
        TRYB(k->swiglu_backward(DH1, DH3, DH1, a.H1, a.H3, N * Hd));
        {
            const float *dy[2] = {DH1, DH3}, *Ws[2] = {w1, w3};
            const int64_t outs[2] = {Hd, Hd};
            TRYB(dx_run(q, &pj, DXN, 2, dy, Ws, outs, N, D, 0));
        }
        if (gw1) TRYB(dw_queue(q, &pj, gw1, DH1, 1, a.XF, 0, N, D, Hd, acc, DY_READY | X_READY));
        if (gw3) TRYB(dw_queue(q, &pj, gw3, DH3, 1, a.XF, 0, N, D, Hd, acc, DY_READY | X_READY));
        TRYB(lora_backward(q, &pj, &z, grads, 4, l, DXN, DH1, a.XF, N, acc, DY_READY, X_READY));
        TRYB(lora_backward(q, &pj, &z, grads, 6, l, DXN, DH3, a.XF, N, acc, DY_READY, X_READY));
        /* the FFN norm's input is HM, the residual after attention */
        TRYB(k->rmsnorm_backward(DX, GRAD(AB_TENSOR_FFN_NORM, l), DXN, a.HM,
                                 params + P.ffn_norm + l * D, N, D, eps, 1));
        /* attention: HM = X + attention(rope(XA wq^T), rope(XA wk^T), XA wv^T) wo^T */
        {
            const float *dy[1] = {DX}, *Ws[1] = {wo};
            const int64_t outs[1] = {D};
            TRYB(dx_run(q, &pj, DA, 1, dy, Ws, outs, N, qd, 0));
        }
        if (gwo) TRYB(dw_queue(q, &pj, gwo, DX, 1, a.AT, 0, N, qd, D, acc, DY_READY | X_READY));
        TRYB(lora_backward(q, &pj, &z, grads, 3, l, DA, DX, a.AT, N, acc, DY_READY, X_READY));
        if (g.n_seq == 0)
            TRYB(k->attention_backward(DQ, DK, DV, DA, a.Q, a.K, a.V, B, S, H, KV, hd,
                                       work + W.ATTW, attw));
        else
            TRYB(k->attention_backward_varlen(DQ, DK, DV, DA, a.Q, a.K, a.V, g.cu, g.n_seq, H,
                                              KV, hd, work + W.ATTW, attw));
        TRYB(rope_rows(k, c, &g, DQ, H, hd, 1));
        TRYB(rope_rows(k, c, &g, DK, KV, hd, 1));
        if (c->qk_norm) {   /* through the per-head norms to the raw projections */
            float *DQN = work + W.DQN, *DKN = work + W.DKN;
            TRYB(k->rmsnorm_backward(DQN, GRAD(AB_TENSOR_Q_NORM, l), DQ, a.QR,
                                     params + P.q_norm + l * hd, N * H, hd, eps, 0));
            TRYB(k->rmsnorm_backward(DKN, GRAD(AB_TENSOR_K_NORM, l), DK, a.KR,
                                     params + P.k_norm + l * hd, N * KV, hd, eps, 0));
            DQ = DQN;
            DK = DKN;
        }
        {
            const float *dy[3] = {DQ, DK, DV}, *Ws[3] = {wq, wk, wv};
            const int64_t outs[3] = {qd, kv, kv};
            TRYB(dx_run(q, &pj, DXN, 3, dy, Ws, outs, N, D, 0));
        }
        if (gwq) TRYB(dw_queue(q, &pj, gwq, DQ, 1, a.XA, 0, N, D, qd, acc, DY_READY | X_READY));
        if (gwk) TRYB(dw_queue(q, &pj, gwk, DK, 1, a.XA, 0, N, D, kv, acc, DY_READY | X_READY));
        if (gwv) TRYB(dw_queue(q, &pj, gwv, DV, 1, a.XA, 0, N, D, kv, acc, DY_READY | X_READY));
        TRYB(lora_backward(q, &pj, &z, grads, 0, l, DXN, DQ, a.XA, N, acc, DY_READY, X_READY));
        TRYB(lora_backward(q, &pj, &z, grads, 1, l, DXN, DK, a.XA, N, acc, DY_READY, X_READY));
        TRYB(lora_backward(q, &pj, &z, grads, 2, l, DXN, DV, a.XA, N, acc, DY_READY, X_READY));
        TRYB(k->rmsnorm_backward(DX, GRAD(AB_TENSOR_ATTENTION_NORM, l), DXN, a.X,
                                 params + P.attention_norm + l * D, N, D, eps, 1));
        announce(h, l);                        /* every tensor of layer l (CPU path only) */
    }
end:
#undef TRYB
    {   /* the one wait for the queued dW (also after an error: they write grads) */
        int rw = dw_wait(q);
        if (!rc) rc = rw;
    }
    if (rc) return rc;
    /* embedding: scatter-add (onto the classifier's dW when tied) */
    float *gtok = GRAD(AB_TENSOR_TOK, 0);
    if (gtok) TRY(k->embedding_backward(gtok, DX, tokens, N, V, D));
#undef GRAD
    announce(h, -1);
    return AB_OK;
}

/* ---- one-token inference with a KV cache (run.c's forward) ----
 * kv_cache: keys then values, each [L, max_seq_len, kv_dim]. work: x, xb2
 * [dim]; xb [max(dim, qd)]; q [qd]; hb, hb2 [hidden]; att [max_seq_len];
 * with qk_norm also qr [qd] (the norms' input), after q.
 * Both sizes are bounded by ab_model_config_check (in double, before any
 * int64 product: 2*L*T*qd + 4*(dim + qd) + 2*hidden + T < 2^52, kv <= qd). */
static int spec_kv_cache_floats(const model_spec *c, int64_t *out) {
    TRY(spec_config_check(c));
    AB_NONNULL(out);
    *out = 2 * c->n_layers * c->max_seq_len * model_dims(c).kv;
    return AB_OK;
}

static int spec_decode_workspace_floats(const model_spec *c, int64_t *out) {
    TRY(spec_config_check(c));
    AB_NONNULL(out);
    const dims d = model_dims(c);
    *out = 2 * d.D + (d.D > d.qd ? d.D : d.qd) + (c->qk_norm ? 2 : 1) * d.qd + 2 * d.Hd
           + c->max_seq_len;
    return AB_OK;
}

static int spec_decode(float *logits, const model_spec *c, const float *params,
                       int32_t token, int64_t pos, float *kv_cache, float *work,
                       int64_t work_floats) {
    ab_model_layout P;
    int64_t need;
    TRY(spec_param_layout(c, &P));
    TRY(spec_decode_workspace_floats(c, &need));
    AB_NONNULL(logits); AB_NONNULL(params); AB_NONNULL(kv_cache); AB_NONNULL(work);
    AB_REQUIRE(work_floats >= need, AB_EWORKSPACE);
    AB_REQUIRE(pos >= 0 && pos < c->max_seq_len, AB_EINVAL);
    AB_REQUIRE(c->lora_rank == 0 || c->lora_merged, AB_EINVAL);   /* merge adapters first */
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

/* ---- the public API: each function checks the caller's struct sizes,
 * makes the model_spec above and runs the function of the same name. A
 * later version that appends fields reads them only when struct_size says
 * the caller's struct has them (the defaults otherwise). */
static int to_spec(const ab_model_config *c, model_spec *s, const char *func) {
    if (!c) return ab_fail(AB_ENULL, func, NULL, "c is NULL");
    if (c->struct_size != sizeof(ab_model_config))
        return ab_fail(AB_EINVAL, func, NULL, "ab_model_config.struct_size is %u, not this "
                       "library's sizeof(ab_model_config) = %u: set it to sizeof(ab_model_config)",
                       (unsigned)c->struct_size, (unsigned)sizeof(ab_model_config));
    const ab_model_options *o = c->options;
    if (o && o->struct_size != sizeof(ab_model_options))
        return ab_fail(AB_EINVAL, func, NULL, "ab_model_options.struct_size is %u, not this "
                       "library's sizeof(ab_model_options) = %u: set it to "
                       "sizeof(ab_model_options)",
                       (unsigned)o->struct_size, (unsigned)sizeof(ab_model_options));
    *s = (model_spec){.dim = c->dim, .hidden_dim = c->hidden_dim, .n_layers = c->n_layers,
                      .n_heads = c->n_heads, .n_kv_heads = c->n_kv_heads,
                      .vocab_size = c->vocab_size, .max_seq_len = c->max_seq_len,
                      .shared_classifier = c->shared_classifier, .norm_eps = c->norm_eps,
                      .head_dim = c->head_dim, .qk_norm = c->qk_norm, .rope = c->rope,
                      .lora_rank = c->lora_rank, .lora_scale = c->lora_scale,
                      .lora_targets = c->lora_targets};
    if (o) {
        s->reference = o->reference;
        s->recompute = o->recompute;
        s->precision = o->precision;
        s->lora_merged = o->lora_merged;
        s->grad_offsets = o->grad_offsets;
    }
    return AB_OK;
}
#define SPEC(c) model_spec s; TRY(to_spec((c), &s, __func__))

int ab_model_config_check(const ab_model_config *c) {
    SPEC(c);
    return spec_config_check(&s);
}
int ab_model_param_layout(const ab_model_config *c, ab_model_layout *out) {
    SPEC(c);
    return spec_param_layout(&s, out);
}
int ab_model_grad_layout(const ab_model_config *c, const uint8_t *trainable,
                         int64_t *grad_offsets, int64_t *n_grads) {
    SPEC(c);
    return spec_grad_layout(&s, trainable, grad_offsets, n_grads);
}
int ab_model_tensors(const ab_model_config *c, ab_model_tensor *out, int64_t capacity,
                     int64_t *count) {
    SPEC(c);
    return spec_tensors(&s, out, capacity, count);
}
int ab_model_workspace_floats(const ab_model_config *c, int64_t B, int64_t S, int64_t *total,
                              int64_t *logits_offset) {
    SPEC(c);
    return spec_workspace_floats(&s, B, S, total, logits_offset);
}
int ab_model_bf16_refresh(const ab_model_config *c, const float *params, float *work,
                          int64_t work_floats) {
    SPEC(c);
    return spec_bf16_refresh(&s, params, work, work_floats);
}
int ab_model_bf16_refresh_adapters(const ab_model_config *c, const float *params, float *work,
                                   int64_t work_floats) {
    SPEC(c);
    return spec_bf16_refresh_adapters(&s, params, work, work_floats);
}
int ab_model_forward(double *loss_out, const ab_model_config *c, const float *params,
                     const int32_t *tokens, const int32_t *targets, int64_t B, int64_t S,
                     int want_grad, float *work, int64_t work_floats) {
    SPEC(c);
    return spec_forward(loss_out, &s, params, tokens, targets, B, S, want_grad, work,
        work_floats);
}
int ab_model_forward_batch(double *loss_out, const ab_model_config *c, const float *params,
                           const int32_t *tokens, const int32_t *targets, int64_t B, int64_t S,
                           const ab_batch_layout *layout, int want_grad, float *work,
                           int64_t work_floats) {
    SPEC(c);
    return spec_forward_batch(loss_out, &s, params, tokens, targets, B, S, layout, want_grad,
        work, work_floats);
}
int ab_model_forward_logits(double *loss_out, float *logits_out, const ab_model_config *c,
                            const float *params, const int32_t *tokens, const int32_t *targets,
                            int64_t B, int64_t S, int want_grad, float *work,
                            int64_t work_floats) {
    SPEC(c);
    return spec_forward_logits(loss_out, logits_out, &s, params, tokens, targets, B, S,
        want_grad, work, work_floats);
}
int ab_model_forward_ane(double *loss_out, const ab_model_config *c, const float *params,
                         const int32_t *tokens, const int32_t *targets, int64_t B, int64_t S,
                         int want_grad, float *work, int64_t work_floats, ab_ane_ctx *ane,
                         uint64_t params_version, int ane_flags) {
    SPEC(c);
    return spec_forward_ane(loss_out, &s, params, tokens, targets, B, S, want_grad, work,
        work_floats, ane, params_version, ane_flags);
}
int ab_model_backward(const ab_model_config *c, const float *params, float *grads, int64_t B,
                      int64_t S, float grad_scale, int accumulate, float *work,
                      int64_t work_floats) {
    SPEC(c);
    return spec_backward(&s, params, grads, B, S, grad_scale, accumulate, work, work_floats);
}
int ab_model_backward_notify(const ab_model_config *c, const float *params, float *grads,
                             int64_t B, int64_t S, float grad_scale, int accumulate,
                             float *work, int64_t work_floats, ab_grads_ready_fn ready,
                             void *user) {
    SPEC(c);
    return spec_backward_notify(&s, params, grads, B, S, grad_scale, accumulate, work,
        work_floats, ready, user);
}
int ab_model_backward_ane(const ab_model_config *c, const float *params, float *grads,
                          int64_t B, int64_t S, float grad_scale, int accumulate, float *work,
                          int64_t work_floats, ab_ane_ctx *ane, uint64_t params_version,
                          int ane_flags) {
    SPEC(c);
    return spec_backward_ane(&s, params, grads, B, S, grad_scale, accumulate, work, work_floats,
        ane, params_version, ane_flags);
}
int ab_model_kv_cache_floats(const ab_model_config *c, int64_t *out) {
    SPEC(c);
    return spec_kv_cache_floats(&s, out);
}
int ab_model_decode_workspace_floats(const ab_model_config *c, int64_t *out) {
    SPEC(c);
    return spec_decode_workspace_floats(&s, out);
}
int ab_model_decode(float *logits, const ab_model_config *c, const float *params, int32_t token,
                    int64_t pos, float *kv_cache, float *work, int64_t work_floats) {
    SPEC(c);
    return spec_decode(logits, &s, params, token, pos, kv_cache, work, work_floats);
}
