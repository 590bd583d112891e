/* cross_entropy.c — softmax cross-entropy loss and dlogits in one pass.
 *
 * For each row t with target y_t (rows with y_t == -1 are ignored):
 *   m_t = max_j z_tj,  Z_t = sum_j exp(z_tj - m_t)
 *   loss_t = log Z_t + m_t - z_t[y_t]
 *   dz_tj  = (exp(z_tj - m_t) / Z_t - [j == y_t]) * grad_scale / n
 * loss = sum_t loss_t / n, n = number of counted rows.
 * dlogits may be the logits buffer itself (written in place): z[y_t] is read
 * before the row is overwritten. */
#include "ab_internal.h"

AB_HOT
int ab_cross_entropy(double *loss_out, int64_t *n_counted_out, float *dlogits,
                     const float *logits, const int32_t *targets,
                     int64_t N, int64_t V, float grad_scale) {
    AB_NONNEG(N); AB_REQUIRE(V > 0, AB_EINVAL);
    AB_NONNULL(loss_out); AB_NONNULL(logits); AB_NONNULL(targets);
    int64_t n = 0;
    for (int64_t t = 0; t < N; t++) {
        int32_t y = targets[t];
        AB_REQUIRE(y == -1 || (y >= 0 && (int64_t)y < V), AB_ERANGE);
        n += (y != -1);
    }
    const float inv_n = n > 0 ? grad_scale / (float)n : 0.0f;
    double total = 0.0;
    for (int64_t t = 0; t < N; t++) {
        const float *z = logits + t * V;
        float *dz = dlogits ? dlogits + t * V : NULL;
        int32_t y = targets[t];
        if (y == -1) {
            if (dz) memset(dz, 0, (size_t)V * sizeof(float));
            continue;
        }
        float m = -INFINITY;
        AB_SIMD_REDUCE(max, m)
        for (int64_t j = 0; j < V; j++) m = z[j] > m ? z[j] : m;
        const float zy = z[y];
        float sum = 0.0f;
        if (dz) {
            /* keep exp(z - m) in dz so the second pass only scales */
            AB_SIMD_REDUCE(+, sum)
            for (int64_t j = 0; j < V; j++) { float e = ab_expf(z[j] - m); dz[j] = e; sum += e; }
            const float k = inv_n / sum;
            AB_SIMD
            for (int64_t j = 0; j < V; j++) dz[j] *= k;
            dz[y] -= inv_n;
        } else {
            AB_SIMD_REDUCE(+, sum)
            for (int64_t j = 0; j < V; j++) sum += ab_expf(z[j] - m);
        }
        total += log((double)sum) + (double)m - (double)zy;
    }
    *loss_out = n > 0 ? total / (double)n : NAN;
    if (n_counted_out) *n_counted_out = n;
    return AB_OK;
}
