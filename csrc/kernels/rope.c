/* rope.c — rotary position embedding, llama2.c convention.
 *
 * Each head's pairs (x_2i, x_2i+1) rotate by the angle a = p * f_i with
 * p = pos_offset + s and f_i = 10000^(-2i/head_dim):
 *   forward:  y0 = x0 cos a - x1 sin a,    y1 = x0 sin a + x1 cos a
 *   backward: the transpose, a rotation by -a:
 *             dx0 = dy0 cos a + dy1 sin a, dx1 = -dy0 sin a + dy1 cos a
 * Angles are formed in float exactly as llama2.c's run.c forms them
 * (f = 1/powf(10000, 2i/head_dim), a = p * f in float, cosf/sinf), so the
 * rotation matches run.c's bit for bit on the same libm.
 * out may equal in (in place). Threads: tasks of a fixed number of rows. */
#include "ab_internal.h"

#define HOIST 256   /* head_dim/2 up to this: frequencies computed once per task */

typedef struct {
    float *y;
    const float *x;
    int64_t N, S, n_heads, head_dim, pos_offset, rows;
    float sign;
} rope_job;

static void rope_task(void *ctx, int64_t task, int worker) {
    const rope_job *j = ctx;
    const int64_t half = j->head_dim / 2, D = j->n_heads * j->head_dim;
    const int64_t r0 = task * j->rows, r1 = r0 + j->rows < j->N ? r0 + j->rows : j->N;
    float freq_small[HOIST];
    const int hoist = half <= HOIST;
    if (hoist)
        for (int64_t i = 0; i < half; i++) freq_small[i] = ab_rope_freq(2 * i, j->head_dim);
    for (int64_t row = r0; row < r1; row++) {
        float pos = (float)(j->pos_offset + row % j->S);
        const float *xr = j->x + row * D;
        float *yr = j->y + row * D;
        for (int64_t i = 0; i < half; i++) {
            float a = pos * (hoist ? freq_small[i] : ab_rope_freq(2 * i, j->head_dim));
            float c = cosf(a), sn = j->sign * sinf(a);
            for (int64_t h = 0; h < j->n_heads; h++) {
                int64_t o = h * j->head_dim + 2 * i;
                float x0 = xr[o], x1 = xr[o + 1];
                yr[o] = x0 * c - x1 * sn;
                yr[o + 1] = x0 * sn + x1 * c;
            }
        }
    }
}

static int rope_apply(float *y, const float *x, int64_t B, int64_t S,
                      int64_t n_heads, int64_t head_dim, int64_t pos_offset,
                      float sign) {
    AB_NONNEG(B); AB_NONNEG(S); AB_NONNEG(pos_offset);
    AB_REQUIRE(n_heads > 0 && head_dim > 0 && head_dim % 2 == 0, AB_EINVAL);
    AB_REQUIRE(pos_offset <= INT64_MAX - S, AB_EINVAL);   /* pos_offset + s must not overflow */
    AB_MUL_FITS(n_heads, head_dim);
    AB_MUL_FITS(B, S);
    AB_MUL_FITS(B * S, n_heads * head_dim);
    AB_NONNULL(y); AB_NONNULL(x);
    const int64_t D = n_heads * head_dim, rows = (AB_CHUNK / 4) / D;
    rope_job j = {y, x, B * S, S, n_heads, head_dim, pos_offset, rows > 0 ? rows : 1, sign};
    ab_parallel_for(ab_div_up(j.N, j.rows), ab_workers_for((double)j.N * D), rope_task, &j);
    return AB_OK;
}

int ab_rope_forward(float *y, const float *x, int64_t B, int64_t S,
                    int64_t n_heads, int64_t head_dim, int64_t pos_offset) {
    return rope_apply(y, x, B, S, n_heads, head_dim, pos_offset, 1.0f);
}

int ab_rope_backward(float *dx, const float *dy, int64_t B, int64_t S,
                     int64_t n_heads, int64_t head_dim, int64_t pos_offset) {
    return rope_apply(dx, dy, B, S, n_heads, head_dim, pos_offset, -1.0f);
}
