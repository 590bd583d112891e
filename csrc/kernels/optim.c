/* optim.c — global-norm clipping primitives and the fused AdamW update,
 * each one pass over flat float memory.
 *
 *   sumsq:  out += sum_i x_i^2        (double accumulators)
 *   scale:  x_i *= s
 *   adamw:  m = b1 m + (1 - b1) g
 *           v = b2 v + (1 - b2) g^2
 *           p = p - lr wd p                         (decoupled decay)
 *           p = p - lr (m / c1) / (sqrt(v / c2) + eps),  c_k = 1 - b_k^step
 * weight_decay = 0 is plain Adam (the seed's model_adam_step). */
#include "ab_internal.h"

AB_HOT
int ab_sumsq(double *out, const float *x, int64_t n) {
    AB_NONNEG(n); AB_NONNULL(out); AB_NONNULL(x);
    double acc = 0.0;
    AB_SIMD_REDUCE(+, acc)
    for (int64_t i = 0; i < n; i++) acc += (double)x[i] * (double)x[i];
    *out += acc;
    return AB_OK;
}

AB_HOT
int ab_scale(float *x, int64_t n, float s) {
    AB_NONNEG(n); AB_NONNULL(x);
    AB_SIMD
    for (int64_t i = 0; i < n; i++) x[i] *= s;
    return AB_OK;
}

AB_HOT
int ab_adamw(float *p, const float *g, float *m, float *v, int64_t n,
             int64_t step, float lr, float beta1, float beta2, float eps,
             float weight_decay) {
    AB_NONNEG(n); AB_REQUIRE(step >= 1, AB_EINVAL);
    AB_REQUIRE(beta1 >= 0.0f && beta1 < 1.0f && beta2 >= 0.0f && beta2 < 1.0f, AB_EINVAL);
    AB_NONNULL(p); AB_NONNULL(g); AB_NONNULL(m); AB_NONNULL(v);
    const float c1 = (float)(1.0 - pow((double)beta1, (double)step));
    const float c2 = (float)(1.0 - pow((double)beta2, (double)step));
    const float step_size = lr / c1, inv_sqrt_c2 = 1.0f / sqrtf(c2);
    const float decay = 1.0f - lr * weight_decay;
    const float a1 = 1.0f - beta1, a2 = 1.0f - beta2;
    AB_SIMD
    for (int64_t i = 0; i < n; i++) {
        float gi = g[i];
        float mi = beta1 * m[i] + a1 * gi;
        float vi = beta2 * v[i] + a2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - step_size * mi / (sqrtf(vi) * inv_sqrt_c2 + eps);
    }
    return AB_OK;
}
