/* bf16_internal.h — the bf16 matmul path inside the C core (csrc/bf16). */
#ifndef AB_BF16_INTERNAL_H
#define AB_BF16_INTERNAL_H

#include "ab_internal.h"

/* oneDNN, loaded at run time (onednn.c). ab_onednn_init: AB_OK or
 * AB_EUNAVAILABLE (ab_onednn_message says why); only the first call loads.
 * ab_onednn_state: 0 not tried, 1 loaded, -1 failed. */
int ab_onednn_init(const char *path);
int ab_onednn_state(void);
const char *ab_onednn_message(void);
int ab_onednn_has_bf16(void);
int ab_onednn_has_amx(void);
const char *ab_onednn_impl(void);
/* C[M,N] (+)= op(A)[M,K] op(B)[K,N], bf16 row-major operands, fp32 C, on
 * the calling thread with `threads` OpenMP threads of oneDNN's own. */
int ab_onednn_matmul(int transA, int transB, int64_t M, int64_t N, int64_t K,
                     const uint16_t *A, int64_t lda, const uint16_t *B, int64_t ldb,
                     int accumulate, float *C, int64_t ldc, int threads);

/* fp32 -> bf16, round to nearest even; NaN stays NaN (quiet), overflow
 * rounds to inf as IEEE rounding does. */
static inline uint16_t ab_f32_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t q = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? q : r);
}
static inline float ab_bf16_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#endif
