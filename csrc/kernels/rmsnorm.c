/* rmsnorm.c — RMSNorm forward and backward, with the weight gradient.
 *
 *   r_t   = 1 / sqrt(mean_i x_ti^2 + eps)
 *   y_ti  = x_ti r_t w_i
 *   dx_ti = w_i dy_ti r_t - x_ti r_t^3 / D * sum_j w_j dy_tj x_tj
 *   dw_i += sum_t dy_ti x_ti r_t
 *
 * The seed divided the correction by D r^2 (should be D r^3: r here is
 * 1/rms) and never computed dw; both are fixed and tested.
 *
 * Threads: tasks of a fixed number of rows (from D alone). dw: each task
 * sums its rows into its own partial row, then the partials are added to dw
 * in task order (split over columns), so dw does not depend on the thread
 * count either. */
#include <stdlib.h>
#include "ab_internal.h"

/* rows per task: about AB_CHUNK/4 floats of x */
static int64_t rows_per_task(int64_t D) {
    int64_t r = (AB_CHUNK / 4) / D;
    return r > 0 ? r : 1;
}

#define DW_COLS 256   /* columns per task of the dw reduction */

typedef struct {
    float *y, *dx, *dw, *part;
    const float *x, *w, *dy;
    int64_t N, D, rows, n_tasks;
    float eps;
    int accumulate_dx;
} rms_job;

static inline float inv_rms(const float *x, int64_t D, float eps) {
    float ss = 0.0f;
    AB_SIMD_REDUCE(+, ss)
    for (int64_t i = 0; i < D; i++) ss += x[i] * x[i];
    return 1.0f / sqrtf(ss / (float)D + eps);
}

AB_HOT
static void forward_rows(const rms_job *j, int64_t t0, int64_t t1) {
    const int64_t D = j->D;
    const float *w = j->w;
    for (int64_t t = t0; t < t1; t++) {
        const float *xt = j->x + t * D;
        float *yt = j->y + t * D;
        float r = inv_rms(xt, D, j->eps);
        AB_SIMD
        for (int64_t i = 0; i < D; i++) yt[i] = xt[i] * r * w[i];
    }
}

/* dx rows [t0, t1); dwp (if not NULL) = sum over these rows of dy x r */
AB_HOT
static void backward_rows(const rms_job *j, int64_t t0, int64_t t1, float *dwp) {
    const int64_t D = j->D;
    const float *w = j->w;
    if (dwp) memset(dwp, 0, (size_t)D * sizeof(float));
    for (int64_t t = t0; t < t1; t++) {
        const float *xt = j->x + t * D, *dyt = j->dy + t * D;
        float *dxt = j->dx + t * D;
        float r = inv_rms(xt, D, j->eps);
        float dot = 0.0f;
        AB_SIMD_REDUCE(+, dot)
        for (int64_t i = 0; i < D; i++) dot += w[i] * dyt[i] * xt[i];
        float c = dot * r * r * r / (float)D;
        if (dwp) {
            AB_SIMD
            for (int64_t i = 0; i < D; i++) dwp[i] += dyt[i] * xt[i] * r;
        }
        if (j->accumulate_dx) {
            AB_SIMD
            for (int64_t i = 0; i < D; i++) dxt[i] += w[i] * dyt[i] * r - xt[i] * c;
        } else {
            AB_SIMD
            for (int64_t i = 0; i < D; i++) dxt[i] = w[i] * dyt[i] * r - xt[i] * c;
        }
    }
}

static void forward_task(void *ctx, int64_t task, int worker) {
    const rms_job *j = ctx;
    const int64_t t0 = task * j->rows, t1 = t0 + j->rows < j->N ? t0 + j->rows : j->N;
    forward_rows(j, t0, t1);
}

static void backward_task(void *ctx, int64_t task, int worker) {
    const rms_job *j = ctx;
    const int64_t t0 = task * j->rows, t1 = t0 + j->rows < j->N ? t0 + j->rows : j->N;
    backward_rows(j, t0, t1, j->part ? j->part + task * j->D : NULL);
}

/* dw[c0:c1] += part[0] + part[1] + ... in task order */
static void dw_reduce_task(void *ctx, int64_t task, int worker) {
    const rms_job *j = ctx;
    const int64_t c0 = task * DW_COLS, c1 = c0 + DW_COLS < j->D ? c0 + DW_COLS : j->D;
    for (int64_t p = 0; p < j->n_tasks; p++) {
        const float *src = j->part + p * j->D;
        float *dw = j->dw;
        AB_SIMD
        for (int64_t i = c0; i < c1; i++) dw[i] += src[i];
    }
}

int ab_rmsnorm_forward(float *y, const float *x, const float *w,
                       int64_t N, int64_t D, float eps) {
    AB_NONNEG(N); AB_REQUIRE(D > 0, AB_EINVAL); AB_REQUIRE(eps >= 0.0f, AB_EINVAL);
    AB_NONNULL(y); AB_NONNULL(x); AB_NONNULL(w);
    rms_job j = {.y = y, .x = x, .w = w, .N = N, .D = D, .rows = rows_per_task(D), .eps = eps};
    ab_parallel_for(ab_div_up(N, j.rows), ab_workers_for((double)N * D), forward_task, &j);
    return AB_OK;
}

int ab_rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x,
                        const float *w, int64_t N, int64_t D, float eps,
                        int accumulate_dx) {
    AB_NONNEG(N); AB_REQUIRE(D > 0, AB_EINVAL); AB_REQUIRE(eps >= 0.0f, AB_EINVAL);
    AB_NONNULL(dx); AB_NONNULL(dy); AB_NONNULL(x); AB_NONNULL(w);
    rms_job j = {.dx = dx, .dw = dw, .dy = dy, .x = x, .w = w, .N = N, .D = D,
                 .rows = rows_per_task(D), .eps = eps, .accumulate_dx = accumulate_dx};
    j.n_tasks = ab_div_up(N, j.rows);
    if (j.n_tasks == 0) return AB_OK;
    float small[4096];
    if (dw) {
        AB_REQUIRE(j.n_tasks <= INT64_MAX / D, AB_ETOOBIG);
        const int64_t nf = j.n_tasks * D;
        j.part = nf <= 4096 ? small : malloc((size_t)nf * sizeof(float));
        AB_REQUIRE(j.part != NULL, AB_ENOMEM);
    }
    ab_parallel_for(j.n_tasks, ab_workers_for(2.0 * N * D), backward_task, &j);
    if (dw) {
        ab_parallel_for(ab_div_up(D, DW_COLS), ab_workers_for((double)j.n_tasks * D), dw_reduce_task, &j);
        if (j.part != small) free(j.part);
    }
    return AB_OK;
}
