/* rope.c — rotary position embedding, llama2.c's and Hugging Face's.
 *
 * Each head's rotation pairs (x0, x1) — (2k, 2k+1) in llama2.c's interleaved
 * layout, (k, k + head_dim/2) in HF's rotate-half layout — rotate by the
 * angle a = p * f_k with p = pos_offset + s and f_k = theta^(-2k/head_dim)
 * (optionally Llama-3 scaled, see ab_rope_freq_p):
 *   forward:  y0 = x0 cos a - x1 sin a,    y1 = x0 sin a + x1 cos a
 *   backward: the transpose, a rotation by -a:
 *             dx0 = dy0 cos a + dy1 sin a, dx1 = -dy0 sin a + dy1 cos a
 * Angles are formed in float exactly as llama2.c's run.c forms them
 * (f = 1/powf(theta, 2k/head_dim), a = p * f in float, cosf/sinf), so with
 * the defaults the rotation matches run.c's bit for bit on the same libm; HF
 * forms the same float32 products in torch.
 * out may equal in (in place). Threads: tasks of a fixed number of rows. */
#include "ab_internal.h"

#define HOIST 256   /* head_dim/2 up to this: frequencies computed once per task */

static const ab_rope_params rope_defaults = {AB_ROPE_INTERLEAVED, 10000.0f, 0.0f, 0.0f, 0.0f, 0};

int ab_rope_params_check(const ab_rope_params *p) {
    if (!p) return AB_OK;
    AB_REQUIRE(p->layout == AB_ROPE_INTERLEAVED || p->layout == AB_ROPE_HALF, AB_EINVAL);
    AB_REQUIRE(p->theta == 0.0f || (isfinite(p->theta) && p->theta > 1.0f), AB_EINVAL);
    if (p->factor == 0.0f) return AB_OK;
    AB_REQUIRE(isfinite(p->factor) && p->factor >= 1.0f, AB_EINVAL);
    AB_REQUIRE(isfinite(p->high_freq_factor) && p->low_freq_factor > 0.0f
               && p->low_freq_factor < p->high_freq_factor, AB_EINVAL);
    AB_REQUIRE(p->original_max_position_embeddings >= 1, AB_EINVAL);
    return AB_OK;
}

/* Float arithmetic in the order of HF's _compute_llama3_parameters (float32
 * tensors there), so the scaled frequencies agree to the last bit or two. */
float ab_rope_freq_p(int64_t i, int64_t head_dim, const ab_rope_params *p) {
    if (!p) p = &rope_defaults;
    float theta = p->theta == 0.0f ? 10000.0f : p->theta;
    float f = 1.0f / powf(theta, (float)i / (float)head_dim);
    if (p->factor == 0.0f) return f;
    const float L = (float)p->original_max_position_embeddings;
    const float low_wavelen = L / p->low_freq_factor, high_wavelen = L / p->high_freq_factor;
    const float wavelen = 6.28318530717958647692f / f;   /* 2 pi, rounded to float as torch does */
    if (wavelen > low_wavelen) return f / p->factor;     /* long waves: interpolated */
    if (wavelen < high_wavelen) return f;                /* short waves: unchanged */
    float smooth = (L / wavelen - p->low_freq_factor) / (p->high_freq_factor - p->low_freq_factor);
    return (1.0f - smooth) * f / p->factor + smooth * f;
}

int ab_rope_inv_freq(float *inv_freq, int64_t head_dim, const ab_rope_params *p) {
    AB_REQUIRE_MSG(head_dim > 0 && head_dim % 2 == 0, AB_EINVAL,
                   "head_dim must be even (pairs rotate), got %lld", (long long)head_dim);
    AB_NONNULL(inv_freq);
    int rc = ab_rope_params_check(p);
    if (rc) return rc;
    for (int64_t k = 0; k < head_dim / 2; k++) inv_freq[k] = ab_rope_freq_p(2 * k, head_dim, p);
    return AB_OK;
}

typedef struct {
    float *y;
    const float *x;
    const ab_rope_params *p;
    const int32_t *positions;   /* per row, or NULL: pos_offset + row % S */
    int64_t N, S, n_heads, head_dim, pos_offset, rows;
    float sign;
} rope_job;

static void rope_task(void *ctx, int64_t task, int worker) {
    const rope_job *j = ctx;
    const int64_t half = j->head_dim / 2, D = j->n_heads * j->head_dim;
    const int layout = j->p ? j->p->layout : AB_ROPE_INTERLEAVED;
    const int64_t stride = ab_rope_pair_stride(j->head_dim, layout);
    const int64_t r0 = task * j->rows, r1 = r0 + j->rows < j->N ? r0 + j->rows : j->N;
    float freq_small[HOIST];
    const int hoist = half <= HOIST;
    if (hoist)
        for (int64_t k = 0; k < half; k++) freq_small[k] = ab_rope_freq_p(2 * k, j->head_dim, j->p);
    for (int64_t row = r0; row < r1; row++) {
        float pos = (float)(j->positions ? (int64_t)j->positions[row]
                                         : j->pos_offset + row % j->S);
        const float *xr = j->x + row * D;
        float *yr = j->y + row * D;
        for (int64_t k = 0; k < half; k++) {
            float a = pos * (hoist ? freq_small[k] : ab_rope_freq_p(2 * k, j->head_dim, j->p));
            float c = cosf(a), sn = j->sign * sinf(a);
            const int64_t first = ab_rope_pair_first(k, j->head_dim, layout);
            for (int64_t h = 0; h < j->n_heads; h++) {
                int64_t o = h * j->head_dim + first;
                float x0 = xr[o], x1 = xr[o + stride];
                yr[o] = x0 * c - x1 * sn;
                yr[o + stride] = x0 * sn + x1 * c;
            }
        }
    }
}

static int rope_run(float *y, const float *x, const int32_t *positions, int64_t N, int64_t S,
                    int64_t n_heads, int64_t head_dim, int64_t pos_offset,
                    const ab_rope_params *p, float sign);

static int rope_apply(float *y, const float *x, int64_t B, int64_t S,
                      int64_t n_heads, int64_t head_dim, int64_t pos_offset,
                      const ab_rope_params *p, float sign) {
    AB_NONNEG(B); AB_NONNEG(S); AB_NONNEG(pos_offset);
    AB_REQUIRE(n_heads > 0, AB_EINVAL);
    AB_REQUIRE_MSG(head_dim > 0 && head_dim % 2 == 0, AB_EINVAL,
                   "head_dim must be even (pairs rotate), got %lld", (long long)head_dim);
    AB_REQUIRE(pos_offset <= INT64_MAX - S, AB_EINVAL);   /* pos_offset + s must not overflow */
    int rc = ab_rope_params_check(p);
    if (rc) return rc;
    AB_MUL_FITS(n_heads, head_dim);
    AB_MUL_FITS(B, S);
    AB_MUL_FITS(B * S, n_heads * head_dim);
    AB_NONNULL(y); AB_NONNULL(x);
    return rope_run(y, x, NULL, B * S, S, n_heads, head_dim, pos_offset, p, sign);
}

/* positions: checked by the caller (every entry >= 0) or NULL */
static int rope_run(float *y, const float *x, const int32_t *positions, int64_t N, int64_t S,
                    int64_t n_heads, int64_t head_dim, int64_t pos_offset,
                    const ab_rope_params *p, float sign) {
    const int64_t D = n_heads * head_dim, rows = (AB_CHUNK / 4) / D;
    rope_job j = {y, x, p, positions, N, S, n_heads, head_dim, pos_offset, rows > 0 ? rows : 1,
                  sign};
    /* weighted: each float costs a few ns (the sincos per position), ~10x a
     * streaming kernel's, so 256 x 288 (stories15M, ~0.17 ms) is worth splitting */
    ab_parallel_for(ab_div_up(j.N, j.rows), ab_workers_for(16.0 * j.N * D), rope_task, &j);
    return AB_OK;
}

int ab_rope_forward(float *y, const float *x, int64_t B, int64_t S,
                    int64_t n_heads, int64_t head_dim, int64_t pos_offset) {
    return rope_apply(y, x, B, S, n_heads, head_dim, pos_offset, NULL, 1.0f);
}

int ab_rope_backward(float *dx, const float *dy, int64_t B, int64_t S,
                     int64_t n_heads, int64_t head_dim, int64_t pos_offset) {
    return rope_apply(dx, dy, B, S, n_heads, head_dim, pos_offset, NULL, -1.0f);
}

int ab_rope_forward_ex(float *y, const float *x, int64_t B, int64_t S,
                       int64_t n_heads, int64_t head_dim, int64_t pos_offset,
                       const ab_rope_params *p) {
    return rope_apply(y, x, B, S, n_heads, head_dim, pos_offset, p, 1.0f);
}

int ab_rope_backward_ex(float *dx, const float *dy, int64_t B, int64_t S,
                        int64_t n_heads, int64_t head_dim, int64_t pos_offset,
                        const ab_rope_params *p) {
    return rope_apply(dx, dy, B, S, n_heads, head_dim, pos_offset, p, -1.0f);
}

/* Per-row positions (varlen batches, left padding, packed documents):
 * row t rotates by positions[t] * f_k. */
static int rope_apply_pos(float *y, const float *x, int64_t N, int64_t n_heads,
                          int64_t head_dim, const int32_t *positions,
                          const ab_rope_params *p, float sign) {
    AB_NONNEG(N);
    AB_REQUIRE(n_heads > 0, AB_EINVAL);
    AB_REQUIRE_MSG(head_dim > 0 && head_dim % 2 == 0, AB_EINVAL,
                   "head_dim must be even (pairs rotate), got %lld", (long long)head_dim);
    int rc = ab_rope_params_check(p);
    if (rc) return rc;
    AB_MUL_FITS(n_heads, head_dim);
    AB_MUL_FITS(N, n_heads * head_dim);
    AB_NONNULL(y); AB_NONNULL(x); AB_NONNULL(positions);
    for (int64_t t = 0; t < N; t++) AB_REQUIRE(positions[t] >= 0, AB_EINVAL);
    if (N == 0) return AB_OK;
    return rope_run(y, x, positions, N, 1, n_heads, head_dim, 0, p, sign);
}

int ab_rope_forward_pos(float *y, const float *x, int64_t N, int64_t n_heads, int64_t head_dim,
                        const int32_t *positions, const ab_rope_params *p) {
    return rope_apply_pos(y, x, N, n_heads, head_dim, positions, p, 1.0f);
}

int ab_rope_backward_pos(float *dx, const float *dy, int64_t N, int64_t n_heads,
                         int64_t head_dim, const int32_t *positions, const ab_rope_params *p) {
    return rope_apply_pos(dx, dy, N, n_heads, head_dim, positions, p, -1.0f);
}
