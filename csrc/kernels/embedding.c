/* embedding.c — token embedding gather and its scatter-add gradient.
 *
 *   x[t, :]          = E[tokens[t], :]
 *   dE[tokens[t], :] += dx[t, :]        (accumulates; repeated tokens sum)
 * Every token is range-checked before anything is written.
 * Threads: the gather splits rows; the scatter-add splits columns, each task
 * walking all tokens in order over its columns, so repeated tokens never
 * race and sum in the same order for every thread count. */
#include "ab_internal.h"

#define COLS 64   /* columns per scatter-add task */

typedef struct {
    float *out;
    const float *in;
    const int32_t *tokens;
    int64_t N, D, rows;
} emb_job;

static int tokens_in_range(const int32_t *tokens, int64_t N, int64_t V) {
    for (int64_t t = 0; t < N; t++)
        if (tokens[t] < 0 || (int64_t)tokens[t] >= V) return 0;
    return 1;
}

static void gather_task(void *ctx, int64_t task, int worker) {
    const emb_job *j = ctx;
    const int64_t t0 = task * j->rows, t1 = t0 + j->rows < j->N ? t0 + j->rows : j->N;
    for (int64_t t = t0; t < t1; t++)
        memcpy(j->out + t * j->D, j->in + (int64_t)j->tokens[t] * j->D, (size_t)j->D * sizeof(float));
}

AB_HOT
static void scatter_task(void *ctx, int64_t task, int worker) {
    const emb_job *j = ctx;
    const int64_t D = j->D, c0 = task * COLS, n = c0 + COLS < D ? COLS : D - c0;
    for (int64_t t = 0; t < j->N; t++) {
        float *row = j->out + (int64_t)j->tokens[t] * D + c0;
        const float *g = j->in + t * D + c0;
        AB_SIMD
        for (int64_t i = 0; i < n; i++) row[i] += g[i];
    }
}

int ab_embedding_forward(float *x, const float *E, const int32_t *tokens,
                         int64_t N, int64_t V, int64_t D) {
    AB_NONNEG(N); AB_NONNEG(V); AB_NONNEG(D);
    AB_NONNULL(x); AB_NONNULL(E); AB_NONNULL(tokens);
    AB_REQUIRE(tokens_in_range(tokens, N, V), AB_ERANGE);
    if (D == 0) return AB_OK;
    const int64_t rows = AB_CHUNK / D;
    emb_job j = {x, E, tokens, N, D, rows > 0 ? rows : 1};
    ab_parallel_for(ab_div_up(N, j.rows), ab_workers_for((double)N * D), gather_task, &j);
    return AB_OK;
}

int ab_embedding_backward(float *dE, const float *dx, const int32_t *tokens,
                          int64_t N, int64_t V, int64_t D) {
    AB_NONNEG(N); AB_NONNEG(V); AB_NONNEG(D);
    AB_NONNULL(dE); AB_NONNULL(dx); AB_NONNULL(tokens);
    AB_REQUIRE(tokens_in_range(tokens, N, V), AB_ERANGE);
    if (N == 0) return AB_OK;
    emb_job j = {dE, dx, tokens, N, D, 0};
    ab_parallel_for(ab_div_up(D, COLS), ab_workers_for(2.0 * N * D), scatter_task, &j);
    return AB_OK;
}
