/* swiglu.c — the gated feed-forward nonlinearity.
 *
 *   y   = silu(h1) * h3,            silu(a) = a * s(a),  s = sigmoid
 *   dh1 = dy * h3 * s(h1) * (1 + h1 * (1 - s(h1)))
 *   dh3 = dy * silu(h1)
 * Outputs may alias dy (each element is read before it is written). */
#include "ab_internal.h"

AB_HOT
int ab_swiglu_forward(float *y, const float *h1, const float *h3, int64_t n) {
    AB_NONNEG(n); AB_NONNULL(y); AB_NONNULL(h1); AB_NONNULL(h3);
    AB_SIMD
    for (int64_t i = 0; i < n; i++) y[i] = h1[i] * ab_sigmoidf(h1[i]) * h3[i];
    return AB_OK;
}

AB_HOT
int ab_swiglu_backward(float *dh1, float *dh3, const float *dy,
                       const float *h1, const float *h3, int64_t n) {
    AB_NONNEG(n); AB_NONNULL(dh1); AB_NONNULL(dh3); AB_NONNULL(dy);
    AB_NONNULL(h1); AB_NONNULL(h3);
    AB_SIMD
    for (int64_t i = 0; i < n; i++) {
        float a = h1[i], g = dy[i], s = ab_sigmoidf(a);
        float d1 = g * h3[i] * s * (1.0f + a * (1.0f - s));
        float d3 = g * a * s;
        dh1[i] = d1;
        dh3[i] = d3;
    }
    return AB_OK;
}
