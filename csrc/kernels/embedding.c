/* embedding.c — token embedding gather and its scatter-add gradient.
 *
 *   x[t, :]          = E[tokens[t], :]
 *   dE[tokens[t], :] += dx[t, :]        (accumulates; repeated tokens sum)
 * Every token is range-checked before anything is written. */
#include "ab_internal.h"

static int tokens_in_range(const int32_t *tokens, int64_t N, int64_t V) {
    for (int64_t t = 0; t < N; t++)
        if (tokens[t] < 0 || (int64_t)tokens[t] >= V) return 0;
    return 1;
}

int ab_embedding_forward(float *x, const float *E, const int32_t *tokens,
                         int64_t N, int64_t V, int64_t D) {
    AB_NONNEG(N); AB_NONNEG(V); AB_NONNEG(D);
    AB_NONNULL(x); AB_NONNULL(E); AB_NONNULL(tokens);
    AB_REQUIRE(tokens_in_range(tokens, N, V), AB_ERANGE);
    for (int64_t t = 0; t < N; t++)
        memcpy(x + t * D, E + (int64_t)tokens[t] * D, (size_t)D * sizeof(float));
    return AB_OK;
}

AB_HOT
int ab_embedding_backward(float *dE, const float *dx, const int32_t *tokens,
                          int64_t N, int64_t V, int64_t D) {
    AB_NONNEG(N); AB_NONNEG(V); AB_NONNEG(D);
    AB_NONNULL(dE); AB_NONNULL(dx); AB_NONNULL(tokens);
    AB_REQUIRE(tokens_in_range(tokens, N, V), AB_ERANGE);
    for (int64_t t = 0; t < N; t++) {
        float *row = dE + (int64_t)tokens[t] * D;
        const float *g = dx + t * D;
        AB_SIMD
        for (int64_t i = 0; i < D; i++) row[i] += g[i];
    }
    return AB_OK;
}
