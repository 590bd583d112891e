/* anebackward/seed_compat.h — the seed header's (ANE/training/backward.h)
 * helper functions, same names and signatures, on libanebackward's kernels.
 *
 * A trainer written against the seed (train.m, stories_cpu_ops.h, ...)
 * replaces `#include "backward.h"` by `#include <anebackward/seed_compat.h>`
 * and links with `anebackward config --cflags --libs`. Header-only: each
 * function is a static inline wrapper over the exported ab_* API.
 *
 *   seed function            seed behaviour                 here
 *   -----------------------  -----------------------------  ------------------------------
 *   cpu_accum_dW             dW += dy^T x, scalar loops     same math, BLAS (ab_linear_backward_dW)
 *   cpu_matmul_backward_dx   dx = dy W, scalar loops        same math, BLAS (ab_linear_backward_dx)
 *   cpu_rmsnorm_backward     correction / (D rms^2): WRONG  / (D rms^3) (ab_rmsnorm_backward)
 *                            no dw: norm weights never train cpu_rmsnorm_backward_dw adds dw (+=)
 *   silu_backward            d silu / dx                    same (overflow-free sigmoid)
 *   cpu_attention_backward   causal MHA, malloc per call,   same math; scratch allocated here,
 *                            scalar loops                   kernels ab_attention_backward
 *   cpu_rope_backward        inverse rotation, in place     same (ab_rope_backward)
 *   model_clip_gradients     over the Model's grad arrays   cpu_clip_gradients: one flat buffer
 *   model_adam_step          Adam over the Model's arrays;  cpu_adam_step: one flat buffer, each
 *                            a tied classifier updated twice parameter once (a tied weight is one
 *                                                           slice with one summed gradient)
 *
 * Differences a caller may notice: results are the corrected math (rms^3)
 * and round differently from the seed's loops (BLAS order of summation);
 * sizes stay `int` as in the seed but the library indexes in int64, so
 * S * dim beyond 2^31 no longer overflows.
 *
 * Errors: the seed functions return void. Here a bad argument (NULL, a
 * negative size, n_heads not dividing ...) or a failed allocation leaves the
 * outputs untouched and records an AB_E* code that seed_compat_last_error()
 * returns (and clears); nothing aborts. The record is per thread and per
 * translation unit (a static _Thread_local in this header); the library's
 * ab_last_error() says, per thread, which kernel refused and why.
 *
 * Thread safety: no global scratch; cpu_attention_backward mallocs its
 * 2*S*S floats per call (as the seed did with its two S-float rows), so
 * concurrent calls from several threads are safe.
 */
#ifndef ANEBACKWARD_SEED_COMPAT_H
#define ANEBACKWARD_SEED_COMPAT_H

#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include "anebackward.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The RMSNorm epsilon the seed hard-codes. */
#define SEED_COMPAT_RMS_EPS 1e-5f

static inline int *seed_compat_error_slot_(void) {
#if defined(__cplusplus)
    static thread_local int code = 0;
#else
    static _Thread_local int code = 0;
#endif
    return &code;
}

/* The first AB_E* error met by a seed_compat call of this thread since the
 * last query (AB_OK if none); ab_strerror() says what it means. Clears it. */
static inline int seed_compat_last_error(void) {
    int *slot = seed_compat_error_slot_();
    int code = *slot;
    *slot = AB_OK;
    return code;
}

static inline void seed_compat_record_(int code) {
    int *slot = seed_compat_error_slot_();
    if (code != AB_OK && *slot == AB_OK) *slot = code;
}

/* dW[out_dim, in_dim] += dy[S, out_dim]^T · x[S, in_dim]  (accumulates, as the seed) */
static inline void cpu_accum_dW(float *dW, const float *dy, const float *x, int S, int out_dim,
                                int in_dim) {
    seed_compat_record_(ab_linear_backward_dW(dW, dy, x, S, in_dim, out_dim, 1));
}

/* dx[S, in_dim] = dy[S, out_dim] · W[out_dim, in_dim]  (overwrites, as the seed) */
static inline void cpu_matmul_backward_dx(const float *W, const float *dy, float *dx, int S,
                                          int out_dim, int in_dim) {
    seed_compat_record_(ab_linear_backward_dx(dx, dy, W, S, in_dim, out_dim, 0));
}

/* RMSNorm backward with the seed's signature (eps = 1e-5), math corrected:
 * dx_ti = w_i dy_ti / rms_t - x_ti sum_j(w_j dy_tj x_tj) / (D rms_t^3).
 * dx is overwritten, as in the seed. */
static inline void cpu_rmsnorm_backward(float *dx, const float *dy, const float *x,
                                        const float *w, int S, int D) {
    seed_compat_record_(ab_rmsnorm_backward(dx, NULL, dy, x, w, S, D, SEED_COMPAT_RMS_EPS, 0));
}

/* The same, plus the weight gradient the seed never computed:
 * dw_i += sum_t dy_ti x_ti / rms_t (accumulates; dw may be NULL). */
static inline void cpu_rmsnorm_backward_dw(float *dx, float *dw, const float *dy, const float *x,
                                           const float *w, int S, int D) {
    seed_compat_record_(ab_rmsnorm_backward(dx, dw, dy, x, w, S, D, SEED_COMPAT_RMS_EPS, 0));
}

/* d silu(x) / dx = s (1 + x (1 - s)), s = sigmoid(x). The seed's formula;
 * the sigmoid is evaluated without overflowing expf for large |x|. */
static inline float silu_backward(float x) {
    float s = x >= 0.0f ? 1.0f / (1.0f + expf(-x)) : expf(x) / (1.0f + expf(x));
    return s * (1.0f + x * (1.0f - s));
}

/* Causal multi-head attention backward, one sequence: q, k, v, d_out, dq,
 * dk, dv are [S, n_heads*head_dim]; dq, dk, dv are overwritten. */
static inline void cpu_attention_backward(float *dq, float *dk, float *dv, const float *d_out,
                                          const float *q, const float *k, const float *v,
                                          int S, int n_heads, int head_dim) {
    if (S <= 0) { seed_compat_record_(AB_EINVAL); return; }
    int64_t n = ab_attention_workspace_floats(S);
    float *work = (float *)malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    if (!work) { seed_compat_record_(AB_ENOMEM); return; }
    seed_compat_record_(ab_attention_backward(dq, dk, dv, d_out, q, k, v, 1, S, n_heads,
                                              n_heads, head_dim, work, n));
    free(work);
}

/* Undo the rotary embedding on dq and dk in place ([S, n_heads*head_dim],
 * position t rotated back by t * 10000^(-i/head_dim)). */
static inline void cpu_rope_backward(float *dq, float *dk, int S, int n_heads, int head_dim) {
    int rc = ab_rope_backward(dq, dq, 1, S, n_heads, head_dim, 0);
    if (rc == AB_OK) rc = ab_rope_backward(dk, dk, 1, S, n_heads, head_dim, 0);
    seed_compat_record_(rc);
}

/* model_clip_gradients over one flat gradient buffer: if the global L2 norm
 * of grads[0..n) exceeds max_norm, scale them to max_norm. Returns the norm
 * before clipping (the seed returned nothing); -1 on bad arguments. */
static inline float cpu_clip_gradients(float *grads, size_t n, float max_norm) {
    double ss = 0.0;
    int rc = ab_sumsq(&ss, grads, (int64_t)n);
    if (rc != AB_OK) { seed_compat_record_(rc); return -1.0f; }
    float norm = (float)sqrt(ss);
    if (norm > max_norm) seed_compat_record_(ab_scale(grads, (int64_t)n, max_norm / norm));
    return norm;
}

/* model_adam_step over one flat buffer: params, grads, m, v of n floats;
 * *step is the Adam step count, incremented first (the seed's adam_step++).
 * Plain Adam (no weight decay), as the seed. */
static inline void cpu_adam_step(float *params, const float *grads, float *m, float *v, size_t n,
                                 int *step, float lr, float beta1, float beta2, float eps) {
    if (!step) { seed_compat_record_(AB_ENULL); return; }
    int rc = ab_adamw(params, grads, m, v, (int64_t)n, (int64_t)*step + 1, lr, beta1, beta2, eps,
                      0.0f);
    if (rc == AB_OK) *step += 1;
    seed_compat_record_(rc);
}

#ifdef __cplusplus
}
#endif
#endif /* ANEBACKWARD_SEED_COMPAT_H */
