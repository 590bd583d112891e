/* optim.c — global-norm clipping primitives and the fused AdamW update,
 * each one pass over flat float memory.
 *
 *   sumsq:  out += sum_i x_i^2        (double accumulators)
 *   scale:  x_i *= s
 *   adamw:  m = b1 m + (1 - b1) g
 *           v = b2 v + (1 - b2) g^2
 *           p = p - lr wd p                         (decoupled decay)
 *           p = p - lr (m / c1) / (sqrt(v / c2) + eps),  c_k = 1 - b_k^step
 * weight_decay = 0 is plain Adam (the seed's model_adam_step).
 *
 * Threads: fixed chunks of AB_CHUNK floats; sumsq adds the per-chunk partial
 * sums in chunk order, so every result is the same for every thread count. */
#include <stdlib.h>
#include "ab_internal.h"

AB_HOT
static double sumsq_range(const float *x, int64_t n) {
    double acc = 0.0;
    AB_SIMD_REDUCE(+, acc)
    for (int64_t i = 0; i < n; i++) acc += (double)x[i] * (double)x[i];
    return acc;
}

typedef struct { const float *x; int64_t n; double *part; } sumsq_job;

static void sumsq_task(void *ctx, int64_t t, int worker) {
    const sumsq_job *j = ctx;
    const int64_t i0 = t * AB_CHUNK, i1 = i0 + AB_CHUNK < j->n ? i0 + AB_CHUNK : j->n;
    j->part[t] = sumsq_range(j->x + i0, i1 - i0);
}

int ab_sumsq(double *out, const float *x, int64_t n) {
    AB_NONNEG(n); AB_NONNULL(out); AB_NONNULL(x);
    const int64_t chunks = ab_div_up(n, AB_CHUNK);
    double small[64];
    double *part = chunks <= 64 ? small : malloc((size_t)chunks * sizeof(double));
    AB_REQUIRE(part != NULL, AB_ENOMEM);
    sumsq_job j = {x, n, part};
    ab_parallel_for(chunks, ab_workers_for((double)n), sumsq_task, &j);
    double acc = 0.0;
    for (int64_t t = 0; t < chunks; t++) acc += part[t];
    if (part != small) free(part);
    *out += acc;
    return AB_OK;
}

AB_HOT
static void scale_range(float *x, int64_t n, float s) {
    AB_SIMD
    for (int64_t i = 0; i < n; i++) x[i] *= s;
}

typedef struct { float *x; int64_t n; float s; } scale_job;

static void scale_task(void *ctx, int64_t t, int worker) {
    const scale_job *j = ctx;
    const int64_t i0 = t * AB_CHUNK, i1 = i0 + AB_CHUNK < j->n ? i0 + AB_CHUNK : j->n;
    scale_range(j->x + i0, i1 - i0, j->s);
}

int ab_scale(float *x, int64_t n, float s) {
    AB_NONNEG(n); AB_NONNULL(x);
    scale_job j = {x, n, s};
    ab_parallel_for(ab_div_up(n, AB_CHUNK), ab_workers_for((double)n), scale_task, &j);
    return AB_OK;
}

typedef struct {
    float *p, *m, *v;
    const float *g;
    int64_t n;
    float beta1, beta2, eps, step_size, inv_sqrt_c2, decay, a1, a2;
} adamw_job;

AB_HOT
static void adamw_range(const adamw_job *j, int64_t i0, int64_t i1) {
    float *p = j->p, *m = j->m, *v = j->v;
    const float *g = j->g;
    const float beta1 = j->beta1, beta2 = j->beta2, eps = j->eps, a1 = j->a1, a2 = j->a2;
    const float step_size = j->step_size, inv_sqrt_c2 = j->inv_sqrt_c2, decay = j->decay;
    AB_SIMD
    for (int64_t i = i0; i < i1; i++) {
        float gi = g[i];
        float mi = beta1 * m[i] + a1 * gi;
        float vi = beta2 * v[i] + a2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - step_size * mi / (sqrtf(vi) * inv_sqrt_c2 + eps);
    }
}

static void adamw_task(void *ctx, int64_t t, int worker) {
    const adamw_job *j = ctx;
    const int64_t i0 = t * AB_CHUNK, i1 = i0 + AB_CHUNK < j->n ? i0 + AB_CHUNK : j->n;
    adamw_range(j, i0, i1);
}

int ab_adamw(float *p, const float *g, float *m, float *v, int64_t n,
             int64_t step, float lr, float beta1, float beta2, float eps,
             float weight_decay) {
    AB_NONNEG(n); AB_REQUIRE(step >= 1, AB_EINVAL);
    AB_REQUIRE(beta1 >= 0.0f && beta1 < 1.0f && beta2 >= 0.0f && beta2 < 1.0f, AB_EINVAL);
    AB_NONNULL(p); AB_NONNULL(g); AB_NONNULL(m); AB_NONNULL(v);
    const float c1 = (float)(1.0 - pow((double)beta1, (double)step));
    const float c2 = (float)(1.0 - pow((double)beta2, (double)step));
    adamw_job j = {p, m, v, g, n, beta1, beta2, eps, lr / c1, 1.0f / sqrtf(c2),
                   1.0f - lr * weight_decay, 1.0f - beta1, 1.0f - beta2};
    ab_parallel_for(ab_div_up(n, AB_CHUNK), ab_workers_for(4.0 * n), adamw_task, &j);
    return AB_OK;
}
