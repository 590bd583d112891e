/* swiglu.c — the gated feed-forward nonlinearity.
 *
 *   y   = silu(h1) * h3,            silu(a) = a * s(a),  s = sigmoid
 *   dh1 = dy * h3 * s(h1) * (1 + h1 * (1 - s(h1)))
 *   dh3 = dy * silu(h1)
 * Outputs may alias dy (each element is read before it is written).
 * Threads: fixed chunks of AB_CHUNK elements. */
#include "ab_internal.h"

typedef struct { float *y, *dh1, *dh3; const float *dy, *h1, *h3; int64_t n; } swiglu_job;

AB_HOT
static void swiglu_forward_range(float *y, const float *h1, const float *h3, int64_t n) {
    AB_SIMD
    for (int64_t i = 0; i < n; i++) y[i] = h1[i] * ab_sigmoidf(h1[i]) * h3[i];
}

AB_HOT
static void swiglu_backward_range(float *dh1, float *dh3, const float *dy,
                                  const float *h1, const float *h3, int64_t n) {
    AB_SIMD
    for (int64_t i = 0; i < n; i++) {
        float a = h1[i], g = dy[i], s = ab_sigmoidf(a);
        float d1 = g * h3[i] * s * (1.0f + a * (1.0f - s));
        float d3 = g * a * s;
        dh1[i] = d1;
        dh3[i] = d3;
    }
}

static void forward_task(void *ctx, int64_t t, int worker) {
    const swiglu_job *j = ctx;
    const int64_t i0 = t * AB_CHUNK, m = i0 + AB_CHUNK < j->n ? AB_CHUNK : j->n - i0;
    swiglu_forward_range(j->y + i0, j->h1 + i0, j->h3 + i0, m);
}

static void backward_task(void *ctx, int64_t t, int worker) {
    const swiglu_job *j = ctx;
    const int64_t i0 = t * AB_CHUNK, m = i0 + AB_CHUNK < j->n ? AB_CHUNK : j->n - i0;
    swiglu_backward_range(j->dh1 + i0, j->dh3 + i0, j->dy + i0, j->h1 + i0, j->h3 + i0, m);
}

int ab_swiglu_forward(float *y, const float *h1, const float *h3, int64_t n) {
    AB_NONNEG(n); AB_NONNULL(y); AB_NONNULL(h1); AB_NONNULL(h3);
    swiglu_job j = {.y = y, .h1 = h1, .h3 = h3, .n = n};
    ab_parallel_for(ab_div_up(n, AB_CHUNK), ab_workers_for(2.0 * n), forward_task, &j);
    return AB_OK;
}

int ab_swiglu_backward(float *dh1, float *dh3, const float *dy,
                       const float *h1, const float *h3, int64_t n) {
    AB_NONNEG(n); AB_NONNULL(dh1); AB_NONNULL(dh3); AB_NONNULL(dy);
    AB_NONNULL(h1); AB_NONNULL(h3);
    swiglu_job j = {.dh1 = dh1, .dh3 = dh3, .dy = dy, .h1 = h1, .h3 = h3, .n = n};
    ab_parallel_for(ab_div_up(n, AB_CHUNK), ab_workers_for(3.0 * n), backward_task, &j);
    return AB_OK;
}
