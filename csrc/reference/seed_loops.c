/* seed_loops.c — the `reference` backend: the seed's scalar loops
 * (backward.h of the origin project) with their structure kept and their
 * math corrected. It is the benchmark baseline and a second test oracle,
 * deliberately naive: O(S*out*in) loops, no BLAS, no SIMD pragmas.
 *
 * What changed from the seed, and why:
 *   - RMSNorm dx divides by D*rms^3 (the seed: D*rms^2) and dw is computed.
 *   - attention handles GQA (n_kv_heads) and a batch axis.
 *   - indices are int64_t (the seed's int overflowed for vocab*dim).
 *   - scratch comes from the caller's workspace (the seed malloc'ed per call).
 *   - sizes are bounded before they are multiplied (REF_FITS), so no index
 *     product or position can overflow int64 (signed overflow is UB).
 *   - RMSNorm and AdamW scale before cubing/squaring (as the fast kernels
 *     do), so large activations or gradients do not overflow float.
 * Kernels the seed did not have (forwards, cross-entropy, embedding) are
 * written in the same plain style. */
#include "ab_internal.h"

/* 1 when a*b*c*d (each >= 0, checked before) fits int64_t: bound first,
 * then multiply. Every index in a kernel is below such a product. */
static int ref_fits(int64_t a, int64_t b, int64_t c, int64_t d) {
    int64_t f[4] = {a, b, c, d}, acc = 1;
    for (int i = 0; i < 4; i++) if (f[i] == 0) return 1;
    for (int i = 0; i < 4; i++) {
        if (acc > INT64_MAX / f[i]) return 0;
        acc *= f[i];
    }
    return 1;
}
#define REF_FITS(a, b, c, d) AB_REQUIRE(ref_fits(a, b, c, d), AB_ETOOBIG)
#define GUARD_DIMS3(a, b, c) do { AB_NONNEG(a); AB_NONNEG(b); AB_NONNEG(c); \
    REF_FITS(a, b, 1, 1); REF_FITS(a, c, 1, 1); REF_FITS(b, c, 1, 1); } while (0)

/* seed: none (forward). y = x W^T */
int ab_ref_linear_forward(float *y, const float *x, const float *W,
                          int64_t N, int64_t in, int64_t out) {
    GUARD_DIMS3(N, in, out); AB_NONNULL(y); AB_NONNULL(x); AB_NONNULL(W);
    for (int64_t t = 0; t < N; t++)
        for (int64_t i = 0; i < out; i++) {
            float sum = 0;
            for (int64_t j = 0; j < in; j++) sum += W[i * in + j] * x[t * in + j];
            y[t * out + i] = sum;
        }
    return AB_OK;
}

/* seed: cpu_matmul_backward_dx. dx = dy W */
int ab_ref_linear_backward_dx(float *dx, const float *dy, const float *W,
                              int64_t N, int64_t in, int64_t out, int accumulate) {
    GUARD_DIMS3(N, in, out); AB_NONNULL(dx); AB_NONNULL(dy); AB_NONNULL(W);
    for (int64_t t = 0; t < N; t++)
        for (int64_t j = 0; j < in; j++) {
            float sum = 0;
            for (int64_t i = 0; i < out; i++) sum += W[i * in + j] * dy[t * out + i];
            dx[t * in + j] = accumulate ? dx[t * in + j] + sum : sum;
        }
    return AB_OK;
}

/* seed: cpu_accum_dW. dW += dy^T x */
int ab_ref_linear_backward_dW(float *dW, const float *dy, const float *x,
                              int64_t N, int64_t in, int64_t out, int accumulate) {
    GUARD_DIMS3(N, in, out); AB_NONNULL(dW); AB_NONNULL(dy); AB_NONNULL(x);
    if (!accumulate) memset(dW, 0, (size_t)out * (size_t)in * sizeof(float));
    for (int64_t t = 0; t < N; t++)
        for (int64_t i = 0; i < out; i++)
            for (int64_t j = 0; j < in; j++)
                dW[i * in + j] += dy[t * out + i] * x[t * in + j];
    return AB_OK;
}

/* seed: rmsnorm forward (forward.h). */
int ab_ref_rmsnorm_forward(float *y, const float *x, const float *w,
                           int64_t N, int64_t D, float eps) {
    AB_NONNEG(N); AB_REQUIRE(D > 0 && eps >= 0.0f, AB_EINVAL); REF_FITS(N, D, 1, 1);
    AB_NONNULL(y); AB_NONNULL(x); AB_NONNULL(w);
    for (int64_t t = 0; t < N; t++) {
        float ss = 0;
        for (int64_t i = 0; i < D; i++) ss += x[t * D + i] * x[t * D + i];
        float inv_rms = 1.0f / sqrtf(ss / D + eps);
        for (int64_t i = 0; i < D; i++) y[t * D + i] = x[t * D + i] * inv_rms * w[i];
    }
    return AB_OK;
}

/* seed: cpu_rmsnorm_backward — FIXED: dot / (D rms^3), and dw. The
 * correction multiplies by 1/rms three times instead of dividing by rms^3,
 * which overflows float once rms > ~7e12 (and then dropped the term). */
int ab_ref_rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x,
                            const float *w, int64_t N, int64_t D, float eps,
                            int accumulate_dx) {
    AB_NONNEG(N); AB_REQUIRE(D > 0 && eps >= 0.0f, AB_EINVAL); REF_FITS(N, D, 1, 1);
    AB_NONNULL(dx); AB_NONNULL(dy); AB_NONNULL(x); AB_NONNULL(w);
    for (int64_t t = 0; t < N; t++) {
        float ss = 0;
        for (int64_t i = 0; i < D; i++) ss += x[t * D + i] * x[t * D + i];
        float rms = sqrtf(ss / D + eps);
        float inv_rms = 1.0f / rms;
        float dot = 0;
        for (int64_t i = 0; i < D; i++) dot += dy[t * D + i] * w[i] * x[t * D + i];
        dot = dot * inv_rms * inv_rms * inv_rms / D;   /* the seed had D * rms * rms */
        for (int64_t i = 0; i < D; i++) {
            float g = dy[t * D + i] * w[i] * inv_rms - x[t * D + i] * dot;
            dx[t * D + i] = accumulate_dx ? dx[t * D + i] + g : g;
            if (dw) dw[i] += dy[t * D + i] * x[t * D + i] * inv_rms;
        }
    }
    return AB_OK;
}

/* seed: cpu_rope_backward (and its forward); per-element powf/cosf like
 * the seed, but the angle as llama2.c forms it, and both directions; p
 * selects the pair layout, theta and Llama-3 scaling (NULL: llama2.c's). */
static int ref_rope_rows(float *y, const float *x, const int32_t *positions, int64_t B,
                         int64_t S, int64_t n_heads, int64_t head_dim, int64_t pos_offset,
                         const ab_rope_params *p, float sign);
static int ref_rope(float *y, const float *x, int64_t B, int64_t S, int64_t n_heads,
                    int64_t head_dim, int64_t pos_offset, const ab_rope_params *p,
                    float sign) {
    return ref_rope_rows(y, x, NULL, B, S, n_heads, head_dim, pos_offset, p, sign);
}
/* positions != NULL: row b*S + t at positions[b*S + t] (pos_offset 0) */
static int ref_rope_rows(float *y, const float *x, const int32_t *positions, int64_t B,
                         int64_t S, int64_t n_heads, int64_t head_dim, int64_t pos_offset,
                         const ab_rope_params *p, float sign) {
    AB_NONNEG(B); AB_NONNEG(S); AB_NONNEG(pos_offset);
    AB_REQUIRE(n_heads > 0 && head_dim > 0 && head_dim % 2 == 0, AB_EINVAL);
    AB_REQUIRE(pos_offset <= INT64_MAX - S, AB_EINVAL);   /* pos_offset + t must not overflow */
    int rc = ab_rope_params_check(p);
    if (rc) return rc;
    REF_FITS(B, S, n_heads, head_dim);
    AB_NONNULL(y); AB_NONNULL(x);
    const int layout = p ? p->layout : AB_ROPE_INTERLEAVED;
    const int64_t stride = ab_rope_pair_stride(head_dim, layout);
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < S; t++)
            for (int64_t h = 0; h < n_heads; h++)
                for (int64_t i = 0; i < head_dim; i += 2) {
                    int64_t pos = positions ? (int64_t)positions[b * S + t] : pos_offset + t;
                    float val = (float)pos * ab_rope_freq_p(i, head_dim, p);
                    float cos_v = cosf(val), sin_v = sign * sinf(val);
                    int64_t off = (b * S + t) * n_heads * head_dim + h * head_dim
                                  + ab_rope_pair_first(i / 2, head_dim, layout);
                    float x0 = x[off], x1 = x[off + stride];
                    y[off] = x0 * cos_v - x1 * sin_v;
                    y[off + stride] = x0 * sin_v + x1 * cos_v;
                }
    return AB_OK;
}
int ab_ref_rope_forward(float *y, const float *x, int64_t B, int64_t S,
                        int64_t n_heads, int64_t head_dim, int64_t pos_offset) {
    return ref_rope(y, x, B, S, n_heads, head_dim, pos_offset, NULL, 1.0f);
}
int ab_ref_rope_backward(float *dx, const float *dy, int64_t B, int64_t S,
                         int64_t n_heads, int64_t head_dim, int64_t pos_offset) {
    return ref_rope(dx, dy, B, S, n_heads, head_dim, pos_offset, NULL, -1.0f);
}
int ab_ref_rope_forward_ex(float *y, const float *x, int64_t B, int64_t S,
                           int64_t n_heads, int64_t head_dim, int64_t pos_offset,
                           const ab_rope_params *p) {
    return ref_rope(y, x, B, S, n_heads, head_dim, pos_offset, p, 1.0f);
}
int ab_ref_rope_backward_ex(float *dx, const float *dy, int64_t B, int64_t S,
                            int64_t n_heads, int64_t head_dim, int64_t pos_offset,
                            const ab_rope_params *p) {
    return ref_rope(dx, dy, B, S, n_heads, head_dim, pos_offset, p, -1.0f);
}
static int ref_rope_pos(float *y, const float *x, int64_t N, int64_t n_heads, int64_t head_dim,
                        const int32_t *positions, const ab_rope_params *p, float sign) {
    AB_NONNEG(N); AB_NONNULL(positions);
    for (int64_t t = 0; t < N; t++) AB_REQUIRE(positions[t] >= 0, AB_EINVAL);
    return ref_rope_rows(y, x, positions, 1, N, n_heads, head_dim, 0, p, sign);
}
int ab_ref_rope_forward_pos(float *y, const float *x, int64_t N, int64_t n_heads,
                            int64_t head_dim, const int32_t *positions, const ab_rope_params *p) {
    return ref_rope_pos(y, x, N, n_heads, head_dim, positions, p, 1.0f);
}
int ab_ref_rope_backward_pos(float *dx, const float *dy, int64_t N, int64_t n_heads,
                             int64_t head_dim, const int32_t *positions,
                             const ab_rope_params *p) {
    return ref_rope_pos(dx, dy, N, n_heads, head_dim, positions, p, -1.0f);
}

static int ref_attention_args(int64_t B, int64_t S, int64_t H, int64_t KV, int64_t hd,
                              int64_t work_floats) {
    AB_NONNEG(B); AB_NONNEG(S);
    AB_REQUIRE(H > 0 && KV > 0 && hd > 0 && H % KV == 0, AB_EINVAL);
    REF_FITS(B, S, H, hd);
    AB_REQUIRE(S <= INT64_MAX / 2 && work_floats >= 2 * S, AB_EWORKSPACE);
    return AB_OK;
}

/* Row t of one head's causal attention probabilities: scores[s] =
 * softmax over s <= t of (q_t . k_s) * scale, q_t = q[0..hd), k_s =
 * k[s * ldk .. s * ldk + hd). The forward and the backward's recomputation
 * are the same loops, so their probabilities are the same floats. */
static void ref_softmax_row(float *scores, const float *q, const float *k, int64_t ldk, int64_t t,
                            int64_t hd, float scale) {
    float mx = -INFINITY;
    for (int64_t s = 0; s <= t; s++) {
        float dot = 0;
        for (int64_t i = 0; i < hd; i++) dot += q[i] * k[s * ldk + i];
        scores[s] = dot * scale;
        if (scores[s] > mx) mx = scores[s];
    }
    float sm = 0;
    for (int64_t s = 0; s <= t; s++) { scores[s] = expf(scores[s] - mx); sm += scores[s]; }
    for (int64_t s = 0; s <= t; s++) scores[s] /= sm;
}

/* seed: none (forward.h's attention loop). One row of scores at a time,
 * over segments: segment b is rows [cu[b], cu[b+1]) (cu NULL: b*S, S rows). */
static void ref_attention_fwd(float *out, const float *q, const float *k, const float *v,
                              const int64_t *cu, int64_t B, int64_t S, int64_t H, int64_t KV,
                              int64_t hd, float *work) {
    float scale = 1.0f / sqrtf((float)hd);
    int64_t D = H * hd, Dkv = KV * hd, group = H / KV;
    float *scores = work;
    for (int64_t b = 0; b < B; b++) {
        const int64_t t0 = cu ? cu[b] : b * S, n = cu ? cu[b + 1] - cu[b] : S;
        for (int64_t h = 0; h < H; h++) {
            const float *qb = q + t0 * D, *kb = k + t0 * Dkv, *vb = v + t0 * Dkv;
            float *ob = out + t0 * D;
            int64_t g = h / group;
            for (int64_t t = 0; t < n; t++) {
                ref_softmax_row(scores, qb + t * D + h * hd, kb + g * hd, Dkv, t, hd, scale);
                for (int64_t i = 0; i < hd; i++) {
                    float acc = 0;
                    for (int64_t s = 0; s <= t; s++) acc += scores[s] * vb[s * Dkv + g * hd + i];
                    ob[t * D + h * hd + i] = acc;
                }
            }
        }
    }
}

/* seed: cpu_attention_backward, extended to GQA, batches and segments. */
static void ref_attention_bwd(float *dq, float *dk, float *dv, const float *d_out,
                              const float *q, const float *k, const float *v,
                              const int64_t *cu, int64_t B, int64_t S, int64_t H, int64_t KV,
                              int64_t hd, float *work, int64_t max_len) {
    float scale = 1.0f / sqrtf((float)hd);
    int64_t D = H * hd, Dkv = KV * hd, group = H / KV;
    float *scores = work, *dscores = work + max_len;
    const int64_t N = cu ? cu[B] : B * S;
    memset(dq, 0, (size_t)(N * D) * sizeof(float));
    memset(dk, 0, (size_t)(N * Dkv) * sizeof(float));
    memset(dv, 0, (size_t)(N * Dkv) * sizeof(float));
    for (int64_t b = 0; b < B; b++) {
        const int64_t t0 = cu ? cu[b] : b * S, n = cu ? cu[b + 1] - cu[b] : S;
        const float *qb = q + t0 * D, *kb = k + t0 * Dkv, *vb = v + t0 * Dkv;
        const float *dob = d_out + t0 * D;
        float *dqb = dq + t0 * D, *dkb = dk + t0 * Dkv, *dvb = dv + t0 * Dkv;
        for (int64_t h = 0; h < H; h++) {
            int64_t g = h / group;
            for (int64_t t = 0; t < n; t++) {
                ref_softmax_row(scores, qb + t * D + h * hd, kb + g * hd, Dkv, t, hd, scale);
                float ds_sum = 0;
                for (int64_t s = 0; s <= t; s++) {
                    float dot = 0;
                    for (int64_t i = 0; i < hd; i++) dot += dob[t * D + h * hd + i] * vb[s * Dkv + g * hd + i];
                    dscores[s] = dot;
                    ds_sum += scores[s] * dot;
                }
                for (int64_t s = 0; s <= t; s++) {
                    float ds = scores[s] * (dscores[s] - ds_sum) * scale;
                    for (int64_t i = 0; i < hd; i++) dqb[t * D + h * hd + i] += ds * kb[s * Dkv + g * hd + i];
                    for (int64_t i = 0; i < hd; i++) dkb[s * Dkv + g * hd + i] += ds * qb[t * D + h * hd + i];
                    for (int64_t i = 0; i < hd; i++) dvb[s * Dkv + g * hd + i] += scores[s] * dob[t * D + h * hd + i];
                }
            }
        }
    }
}

int ab_ref_attention_forward(float *out, const float *q, const float *k, const float *v,
                             int64_t B, int64_t S, int64_t H, int64_t KV,
                             int64_t hd, float *work, int64_t work_floats) {
    int rc = ref_attention_args(B, S, H, KV, hd, work_floats);
    if (rc) return rc;
    AB_NONNULL(out); AB_NONNULL(q); AB_NONNULL(k); AB_NONNULL(v);
    if (B == 0 || S == 0) return AB_OK;
    AB_NONNULL(work);
    ref_attention_fwd(out, q, k, v, NULL, B, S, H, KV, hd, work);
    return AB_OK;
}

int ab_ref_attention_backward(float *dq, float *dk, float *dv, const float *d_out,
                              const float *q, const float *k, const float *v,
                              int64_t B, int64_t S, int64_t H, int64_t KV,
                              int64_t hd, float *work, int64_t work_floats) {
    int rc = ref_attention_args(B, S, H, KV, hd, work_floats);
    if (rc) return rc;
    AB_NONNULL(dq); AB_NONNULL(dk); AB_NONNULL(dv); AB_NONNULL(d_out);
    AB_NONNULL(q); AB_NONNULL(k); AB_NONNULL(v);
    if (B == 0 || S == 0) return AB_OK;
    AB_NONNULL(work);
    ref_attention_bwd(dq, dk, dv, d_out, q, k, v, NULL, B, S, H, KV, hd, work, S);
    return AB_OK;
}

/* cu_seqlens checked; work: 2 * (longest segment) floats */
static int ref_varlen_args(const int64_t *cu, int64_t n_seq, int64_t H, int64_t KV, int64_t hd,
                           int64_t work_floats, int64_t *max_len) {
    int64_t N;
    int rc = ab_varlen_check(cu, n_seq, &N, max_len);
    if (rc) return rc;
    AB_REQUIRE(H > 0 && KV > 0 && hd > 0 && H % KV == 0, AB_EINVAL);
    REF_FITS(N, H, hd, 1);
    AB_REQUIRE(*max_len <= INT64_MAX / 2 && work_floats >= 2 * *max_len, AB_EWORKSPACE);
    return AB_OK;
}

int ab_ref_attention_forward_varlen(float *out, const float *q, const float *k, const float *v,
                                    const int64_t *cu_seqlens, int64_t n_seq, int64_t H,
                                    int64_t KV, int64_t hd, float *work, int64_t work_floats) {
    int64_t max_len;
    int rc = ref_varlen_args(cu_seqlens, n_seq, H, KV, hd, work_floats, &max_len);
    if (rc) return rc;
    AB_NONNULL(out); AB_NONNULL(q); AB_NONNULL(k); AB_NONNULL(v);
    if (max_len == 0) return AB_OK;
    AB_NONNULL(work);
    ref_attention_fwd(out, q, k, v, cu_seqlens, n_seq, 0, H, KV, hd, work);
    return AB_OK;
}

int ab_ref_attention_backward_varlen(float *dq, float *dk, float *dv, const float *d_out,
                                     const float *q, const float *k, const float *v,
                                     const int64_t *cu_seqlens, int64_t n_seq, int64_t H,
                                     int64_t KV, int64_t hd, float *work, int64_t work_floats) {
    int64_t max_len;
    int rc = ref_varlen_args(cu_seqlens, n_seq, H, KV, hd, work_floats, &max_len);
    if (rc) return rc;
    AB_NONNULL(dq); AB_NONNULL(dk); AB_NONNULL(dv); AB_NONNULL(d_out);
    AB_NONNULL(q); AB_NONNULL(k); AB_NONNULL(v);
    if (max_len == 0) return AB_OK;
    AB_NONNULL(work);
    ref_attention_bwd(dq, dk, dv, d_out, q, k, v, cu_seqlens, n_seq, 0, H, KV, hd, work, max_len);
    return AB_OK;
}

/* seed: the FFN loop's silu_backward. */
int ab_ref_swiglu_forward(float *y, const float *h1, const float *h3, int64_t n) {
    AB_NONNEG(n); AB_NONNULL(y); AB_NONNULL(h1); AB_NONNULL(h3);
    for (int64_t i = 0; i < n; i++) y[i] = h1[i] / (1.0f + expf(-h1[i])) * h3[i];
    return AB_OK;
}
int ab_ref_swiglu_backward(float *dh1, float *dh3, const float *dy,
                           const float *h1, const float *h3, int64_t n) {
    AB_NONNEG(n); AB_NONNULL(dh1); AB_NONNULL(dh3); AB_NONNULL(dy);
    AB_NONNULL(h1); AB_NONNULL(h3);
    for (int64_t i = 0; i < n; i++) {
        float x = h1[i], g = dy[i];
        float s = 1.0f / (1.0f + expf(-x));
        float d1 = g * h3[i] * s * (1.0f + x * (1.0f - s));
        float d3 = g * x * s;
        dh1[i] = d1;
        dh3[i] = d3;
    }
    return AB_OK;
}

/* seed: model_backward's dlogits loop, with ignored rows and a true mean. */
int ab_ref_cross_entropy(double *loss_out, int64_t *n_counted_out, float *dlogits,
                         const float *logits, const int32_t *targets,
                         int64_t N, int64_t V, float grad_scale) {
    return ab_ref_cross_entropy_ex(loss_out, n_counted_out, dlogits, logits, targets, N, V,
                                   grad_scale, 0.0);
}
/* denominator > 0 replaces the count (HF Trainer's num_items_in_batch) */
int ab_ref_cross_entropy_ex(double *loss_out, int64_t *n_counted_out, float *dlogits,
                            const float *logits, const int32_t *targets,
                            int64_t N, int64_t V, float grad_scale, double denominator) {
    AB_NONNEG(N); AB_REQUIRE(V > 0, AB_EINVAL); REF_FITS(N, V, 1, 1);
    AB_REQUIRE(denominator == 0.0 || (isfinite(denominator) && denominator > 0.0), AB_EINVAL);
    AB_NONNULL(loss_out); AB_NONNULL(logits); AB_NONNULL(targets);
    int64_t n = 0;
    for (int64_t t = 0; t < N; t++) {
        AB_REQUIRE(targets[t] == -1 || (targets[t] >= 0 && targets[t] < V), AB_ERANGE);
        n += targets[t] != -1;
    }
    const double den = denominator > 0.0 ? denominator : (double)n;
    double total = 0;
    for (int64_t t = 0; t < N; t++) {
        int32_t y = targets[t];
        if (y == -1) {
            if (dlogits) for (int64_t i = 0; i < V; i++) dlogits[t * V + i] = 0;
            continue;
        }
        float mx = -INFINITY;
        for (int64_t i = 0; i < V; i++) if (logits[t * V + i] > mx) mx = logits[t * V + i];
        /* double: a float sum of V ones stops growing at 2^24 (the loss of a
           2^26-class uniform row came out as log(2^24)) */
        double sm = 0;
        for (int64_t i = 0; i < V; i++) sm += expf(logits[t * V + i] - mx);
        float zy = logits[t * V + y];
        total += log(sm) + mx - zy;
        if (dlogits) {
            for (int64_t i = 0; i < V; i++)
                dlogits[t * V + i] = (float)(expf(logits[t * V + i] - mx) / sm * grad_scale / den);
            dlogits[t * V + y] -= grad_scale / (float)den;
        }
    }
    *loss_out = den > 0 ? total / den : NAN;
    if (n_counted_out) *n_counted_out = n;
    return AB_OK;
}

/* Both embedding directions' checks, every token before anything is
 * written. A macro so that a failure names the public function and the
 * argument as spelled there (the guards report __func__ and their text). */
#define REF_EMBEDDING_ARGS(out, in, tokens, N, V, D)                           \
    GUARD_DIMS3(N, V, D); AB_NONNULL(out); AB_NONNULL(in); AB_NONNULL(tokens); \
    for (int64_t t = 0; t < N; t++) AB_REQUIRE(tokens[t] >= 0 && tokens[t] < V, AB_ERANGE)

/* seed: model_backward's embedding loop. */
int ab_ref_embedding_forward(float *x, const float *E, const int32_t *tokens,
                             int64_t N, int64_t V, int64_t D) {
    REF_EMBEDDING_ARGS(x, E, tokens, N, V, D);
    for (int64_t t = 0; t < N; t++)
        for (int64_t i = 0; i < D; i++) x[t * D + i] = E[(int64_t)tokens[t] * D + i];
    return AB_OK;
}
int ab_ref_embedding_backward(float *dE, const float *dx, const int32_t *tokens,
                              int64_t N, int64_t V, int64_t D) {
    REF_EMBEDDING_ARGS(dE, dx, tokens, N, V, D);
    for (int64_t t = 0; t < N; t++)
        for (int64_t i = 0; i < D; i++) dE[(int64_t)tokens[t] * D + i] += dx[t * D + i];
    return AB_OK;
}

/* seed: model_clip_gradients and model_adam_step. */
int ab_ref_sumsq(double *out, const float *x, int64_t n) {
    AB_NONNEG(n); AB_NONNULL(out); AB_NONNULL(x);
    for (int64_t i = 0; i < n; i++) *out += (double)x[i] * x[i];
    return AB_OK;
}
int ab_ref_scale(float *x, int64_t n, float s) {
    AB_NONNEG(n); AB_NONNULL(x);
    for (int64_t i = 0; i < n; i++) x[i] *= s;
    return AB_OK;
}
int ab_ref_adamw(float *p, const float *g, float *m, float *v, int64_t n,
                 int64_t step, float lr, float beta1, float beta2, float eps,
                 float weight_decay) {
    AB_NONNEG(n); AB_REQUIRE(step >= 1, AB_EINVAL);
    AB_REQUIRE(beta1 >= 0.0f && beta1 < 1.0f && beta2 >= 0.0f && beta2 < 1.0f, AB_EINVAL);
    AB_NONNULL(p); AB_NONNULL(g); AB_NONNULL(m); AB_NONNULL(v);
    float bc1 = 1.0f - powf(beta1, (float)step);
    float bc2 = 1.0f - powf(beta2, (float)step);
    /* sqrt(v)/sqrt(bc2), not sqrt(v/bc2): early in training bc2 is small and
     * v/bc2 overflowed for |g| > ~2e19, which gave no update at all */
    float inv_sqrt_bc2 = 1.0f / sqrtf(bc2);
    for (int64_t i = 0; i < n; i++) {
        float gi = g[i];
        m[i] = beta1 * m[i] + (1 - beta1) * gi;
        v[i] = beta2 * v[i] + (1 - beta2) * gi * gi;
        float m_hat = m[i] / bc1;
        p[i] -= lr * weight_decay * p[i];
        p[i] -= lr * m_hat / (sqrtf(v[i]) * inv_sqrt_bc2 + eps);
    }
    return AB_OK;
}
