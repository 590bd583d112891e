/* embedding.c — token embedding gather and its scatter-add gradient.
 *
 *   x[t, :]          = E[tokens[t], :]
 *   dE[tokens[t], :] += dx[t, :]        (accumulates; repeated tokens sum)
 * Every token is range-checked before anything is written.
 * Threads: the gather splits rows. The scatter-add splits the rows of dE:
 * task b owns the token ids with id % n_buckets == b and walks all tokens in
 * order, adding only its own, so a repeated token's rows are summed by one
 * task in token order (no races; the same sums for every thread count) and
 * every add streams whole contiguous rows. n_buckets depends on N and D only
 * (each task scans all N tokens, so a bucket must own enough work). */
#include "ab_internal.h"

#define MAX_BUCKETS 32   /* scatter-add tasks */

typedef struct {
    float *out;
    const float *in;
    const int32_t *tokens;
    int64_t N, D, rows;   /* rows: gather rows per task; scatter: buckets */
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
    const int64_t D = j->D, nb = j->rows;
    for (int64_t t = 0; t < j->N; t++) {
        const int64_t id = j->tokens[t];
        if (id % nb != task) continue;
        float *row = j->out + id * D;
        const float *g = j->in + t * D;
        AB_SIMD
        for (int64_t i = 0; i < D; i++) row[i] += g[i];
    }
}

/* buckets: about AB_CHUNK floats of adds each on average, at most MAX_BUCKETS */
static int64_t scatter_buckets(int64_t N, int64_t D) {
    const int64_t nb = N * D / AB_CHUNK;
    return nb < 1 ? 1 : nb > MAX_BUCKETS ? MAX_BUCKETS : nb;
}

/* Both directions' checks, every token before anything is written. A macro
 * so that a failure names the public function and the argument as spelled
 * there ("ab_embedding_backward: dE is NULL"): AB_NONNULL and AB_NONNEG
 * report __func__ and the argument's text. */
#define EMBEDDING_ARGS(out, in, tokens, N, V, D)                               \
    AB_NONNEG(N); AB_NONNEG(V); AB_NONNEG(D);                                  \
    AB_NONNULL(out); AB_NONNULL(in); AB_NONNULL(tokens);                       \
    AB_REQUIRE(tokens_in_range(tokens, N, V), AB_ERANGE)

int ab_embedding_forward(float *x, const float *E, const int32_t *tokens,
                         int64_t N, int64_t V, int64_t D) {
    EMBEDDING_ARGS(x, E, tokens, N, V, D);
    if (D == 0) return AB_OK;
    const int64_t rows = AB_CHUNK / D;
    emb_job j = {x, E, tokens, N, D, rows > 0 ? rows : 1};
    ab_parallel_for(ab_div_up(N, j.rows), ab_workers_for((double)N * D), gather_task, &j);
    return AB_OK;
}

int ab_embedding_backward(float *dE, const float *dx, const int32_t *tokens,
                          int64_t N, int64_t V, int64_t D) {
    EMBEDDING_ARGS(dE, dx, tokens, N, V, D);
    if (N == 0) return AB_OK;
    if (D == 0) return AB_OK;
    AB_MUL_FITS(N, D);
    emb_job j = {dE, dx, tokens, N, D, scatter_buckets(N, D)};
    ab_parallel_for(j.rows, ab_workers_for(2.0 * N * D), scatter_task, &j);
    return AB_OK;
}
