/* rmsnorm.c — RMSNorm forward and backward, with the weight gradient.
 *
 *   r_t   = 1 / sqrt(mean_i x_ti^2 + eps)
 *   y_ti  = x_ti r_t w_i
 *   dx_ti = w_i dy_ti r_t - x_ti r_t^3 / D * sum_j w_j dy_tj x_tj
 *   dw_i += sum_t dy_ti x_ti r_t
 *
 * The seed divided the correction by D r^2 (should be D r^3: r here is
 * 1/rms) and never computed dw; both are fixed and tested. */
#include "ab_internal.h"

static inline float inv_rms(const float *x, int64_t D, float eps) {
    float ss = 0.0f;
    AB_SIMD_REDUCE(+, ss)
    for (int64_t i = 0; i < D; i++) ss += x[i] * x[i];
    return 1.0f / sqrtf(ss / (float)D + eps);
}

AB_HOT
int ab_rmsnorm_forward(float *y, const float *x, const float *w,
                       int64_t N, int64_t D, float eps) {
    AB_NONNEG(N); AB_REQUIRE(D > 0, AB_EINVAL); AB_REQUIRE(eps >= 0.0f, AB_EINVAL);
    AB_NONNULL(y); AB_NONNULL(x); AB_NONNULL(w);
    for (int64_t t = 0; t < N; t++) {
        const float *xt = x + t * D;
        float *yt = y + t * D;
        float r = inv_rms(xt, D, eps);
        AB_SIMD
        for (int64_t i = 0; i < D; i++) yt[i] = xt[i] * r * w[i];
    }
    return AB_OK;
}

AB_HOT
int ab_rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x,
                        const float *w, int64_t N, int64_t D, float eps,
                        int accumulate_dx) {
    AB_NONNEG(N); AB_REQUIRE(D > 0, AB_EINVAL); AB_REQUIRE(eps >= 0.0f, AB_EINVAL);
    AB_NONNULL(dx); AB_NONNULL(dy); AB_NONNULL(x); AB_NONNULL(w);
    for (int64_t t = 0; t < N; t++) {
        const float *xt = x + t * D, *dyt = dy + t * D;
        float *dxt = dx + t * D;
        float r = inv_rms(xt, D, eps);
        float dot = 0.0f;
        AB_SIMD_REDUCE(+, dot)
        for (int64_t i = 0; i < D; i++) dot += w[i] * dyt[i] * xt[i];
        float c = dot * r * r * r / (float)D;
        if (dw) {
            AB_SIMD
            for (int64_t i = 0; i < D; i++) dw[i] += dyt[i] * xt[i] * r;
        }
        if (accumulate_dx) {
            AB_SIMD
            for (int64_t i = 0; i < D; i++) dxt[i] += w[i] * dyt[i] * r - xt[i] * c;
        } else {
            AB_SIMD
            for (int64_t i = 0; i < D; i++) dxt[i] = w[i] * dyt[i] * r - xt[i] * c;
        }
    }
    return AB_OK;
}
