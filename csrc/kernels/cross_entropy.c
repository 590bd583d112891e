/* cross_entropy.c — softmax cross-entropy loss and dlogits in one pass.
 *
 * For each row t with target y_t (rows with y_t == -1 are ignored):
 *   m_t = max_j z_tj,  Z_t = sum_j exp(z_tj - m_t)
 *   loss_t = log Z_t + m_t - z_t[y_t]
 *   dz_tj  = (exp(z_tj - m_t) / Z_t - [j == y_t]) * grad_scale / n
 * loss = sum_t loss_t / n, n = number of counted rows, or a denominator the
 * caller gives (ab_cross_entropy_ex: HF Trainer's num_items_in_batch, the
 * counted targets of a whole accumulated batch); dz uses the same n.
 * dlogits may be the logits buffer itself (written in place): z[y_t] is read
 * before the row is overwritten.
 * Threads: tasks of a fixed number of rows; their loss sums are added in
 * task order. */
#include <stdlib.h>
#include "ab_internal.h"

#define CE_BLOCK ((int64_t)1 << 12)

typedef struct {
    float *dlogits;
    const float *logits;
    const int32_t *targets;
    int64_t N, V, rows;
    float inv_n;
    double *part;
} ce_job;

AB_HOT
static double ce_row(float *dz, const float *z, int32_t y, int64_t V, float inv_n) {
    float m = -INFINITY;
    AB_SIMD_REDUCE(max, m)
    for (int64_t j = 0; j < V; j++) m = z[j] > m ? z[j] : m;
    const float zy = z[y];
    /* float sums over blocks of CE_BLOCK classes, added in double: a float
       sum of more than 2^24 terms near 1 stops growing (a row of 2^26
       classes lost 0.04 nats), and a long block summed one term at a time
       (a build without SIMD) drifts: 2^16-class blocks were 3e-4 nats off
       at 2^26 classes; blocks of 2^12 are 16 times shorter). */
    double total = 0.0;
    for (int64_t j0 = 0; j0 < V; j0 += CE_BLOCK) {
        const int64_t j1 = V - j0 < CE_BLOCK ? V : j0 + CE_BLOCK;
        float sum = 0.0f;
        if (dz) {
            /* keep exp(z - m) in dz so the second pass only scales */
            AB_SIMD_REDUCE(+, sum)
            for (int64_t j = j0; j < j1; j++) { float e = ab_expf(z[j] - m); dz[j] = e; sum += e; }
        } else {
            AB_SIMD_REDUCE(+, sum)
            for (int64_t j = j0; j < j1; j++) sum += ab_expf(z[j] - m);
        }
        total += sum;
    }
    if (dz) {
        const float k = (float)(inv_n / total);
        AB_SIMD
        for (int64_t j = 0; j < V; j++) dz[j] *= k;
        dz[y] -= inv_n;
    }
    return log(total) + (double)m - (double)zy;
}

static void ce_task(void *ctx, int64_t task, int worker) {
    const ce_job *j = ctx;
    const int64_t t0 = task * j->rows, t1 = t0 + j->rows < j->N ? t0 + j->rows : j->N;
    double total = 0.0;
    for (int64_t t = t0; t < t1; t++) {
        float *dz = j->dlogits ? j->dlogits + t * j->V : NULL;
        int32_t y = j->targets[t];
        if (y == -1) {
            if (dz) memset(dz, 0, (size_t)j->V * sizeof(float));
            continue;
        }
        total += ce_row(dz, j->logits + t * j->V, y, j->V, j->inv_n);
    }
    j->part[task] = total;
}

int ab_cross_entropy(double *loss_out, int64_t *n_counted_out, float *dlogits,
                     const float *logits, const int32_t *targets,
                     int64_t N, int64_t V, float grad_scale) {
    return ab_cross_entropy_ex(loss_out, n_counted_out, dlogits, logits, targets, N, V,
                               grad_scale, 0.0);
}

int ab_cross_entropy_ex(double *loss_out, int64_t *n_counted_out, float *dlogits,
                        const float *logits, const int32_t *targets,
                        int64_t N, int64_t V, float grad_scale, double denominator) {
    AB_NONNEG(N); AB_REQUIRE(V > 0, AB_EINVAL);
    AB_REQUIRE(denominator == 0.0 || (isfinite(denominator) && denominator > 0.0), AB_EINVAL);
    AB_NONNULL(loss_out); AB_NONNULL(logits); AB_NONNULL(targets);
    int64_t n = 0;
    for (int64_t t = 0; t < N; t++) {
        int32_t y = targets[t];
        AB_REQUIRE(y == -1 || (y >= 0 && (int64_t)y < V), AB_ERANGE);
        n += (y != -1);
    }
    const int64_t rows = AB_CHUNK / V;
    const double den = denominator > 0.0 ? denominator : (double)n;
    ce_job j = {dlogits, logits, targets, N, V, rows > 0 ? rows : 1,
                den > 0.0 ? grad_scale / (float)den : 0.0f, NULL};
    const int64_t n_tasks = ab_div_up(N, j.rows);
    double small[64];
    j.part = n_tasks <= 64 ? small : malloc((size_t)n_tasks * sizeof(double));
    AB_REQUIRE(j.part != NULL, AB_ENOMEM);
    ab_parallel_for(n_tasks, ab_workers_for((double)N * V), ce_task, &j);
    double total = 0.0;
    for (int64_t t = 0; t < n_tasks; t++) total += j.part[t];
    if (j.part != small) free(j.part);
    *loss_out = den > 0.0 ? total / den : NAN;
    if (n_counted_out) *n_counted_out = n;
    return AB_OK;
}
