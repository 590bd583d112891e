/* linear.c — y = x·W^T and its two gradients, one matrix product each, in
 * fp32 (one sgemm) or with bf16 operands (the *_bf16 entry points).
 *
 *   forward:   y[N,out]   = x[N,in] · W[out,in]^T
 *   backward:  dx[N,in]   = dy[N,out] · W[out,in]            (+= if accumulate)
 *              dW[out,in] = dy[N,out]^T · x[N,in]            (+= if accumulate)
 *
 * fp32: accumulation is the sgemm's beta = 1 (no temporaries, no extra pass).
 * bf16: the fp32 inputs are rounded to bf16 (round to nearest even) into one
 * temporary buffer and multiplied with fp32 accumulation and output
 * (ab_gemm_bf16: oneDNN or the portable path). The model keeps its operands
 * in bf16 already and calls ab_gemm_bf16 directly (csrc/model/model.c);
 * these are the one-call kernels. Each product's checks and empty cases are
 * written once, for both precisions. */
#include <stdlib.h>
#include "ab_internal.h"
#include "bf16/bf16_internal.h"

static int check_dims(int64_t N, int64_t in, int64_t out) {
    AB_NONNEG(N); AB_NONNEG(in); AB_NONNEG(out);
    AB_BLAS_FITS(N); AB_BLAS_FITS(in); AB_BLAS_FITS(out);
    AB_MUL_FITS(N, in); AB_MUL_FITS(N, out); AB_MUL_FITS(in, out);
    return AB_OK;
}

/* C[M,Nc] (+)= op(a)·op(b), a holding na and b nb floats, C dense (row
 * stride Nc). Empty cases: nothing to write, or K == 0 (an empty sum:
 * zeros, or C unchanged when accumulating). */
static int product(int bf16, int ta, int tb, int64_t M, int64_t Nc, int64_t K,
                   const float *a, int64_t na, int64_t lda, const float *b, int64_t nb,
                   int64_t ldb, int accumulate, float *C) {
    if (M == 0 || Nc == 0) return AB_OK;
    if (K == 0) {
        if (!accumulate) memset(C, 0, (size_t)M * (size_t)Nc * sizeof(float));
        return AB_OK;
    }
    if (!bf16) {
        ab_sgemm(ta, tb, M, Nc, K, 1.0f, a, lda, b, ldb, accumulate ? 1.0f : 0.0f, C, Nc);
        return AB_OK;
    }
    if (ab_bf16_path() == AB_BF16_UNAVAILABLE) return AB_FAIL(AB_EUNAVAILABLE, NULL);
    uint16_t *h = malloc((size_t)(na + nb) * sizeof(uint16_t));
    if (!h) return AB_FAIL(AB_ENOMEM, NULL);
    ab_f32_to_bf16(h, a, na);
    ab_f32_to_bf16(h + na, b, nb);
    int rc = ab_gemm_bf16(ta, tb, M, Nc, K, h, lda, h + na, ldb, accumulate, C, Nc);
    free(h);
    return rc;
}

static int linear_forward(int bf16, float *y, const float *x, const float *W,
                   int64_t N, int64_t in, int64_t out) {
    int rc = check_dims(N, in, out);
    if (rc) return rc;
    AB_NONNULL(y); AB_NONNULL(x); AB_NONNULL(W);
    return product(bf16, 0, 1, N, out, in, x, N * in, in, W, out * in, in, 0, y);
}

static int linear_backward_dx(int bf16, float *dx, const float *dy, const float *W,
                       int64_t N, int64_t in, int64_t out, int accumulate) {
    int rc = check_dims(N, in, out);
    if (rc) return rc;
    AB_NONNULL(dx); AB_NONNULL(dy); AB_NONNULL(W);
    return product(bf16, 0, 0, N, in, out, dy, N * out, out, W, out * in, in, accumulate, dx);
}

static int linear_backward_dW(int bf16, float *dW, const float *dy, const float *x,
                       int64_t N, int64_t in, int64_t out, int accumulate) {
    int rc = check_dims(N, in, out);
    if (rc) return rc;
    AB_NONNULL(dW); AB_NONNULL(dy); AB_NONNULL(x);
    return product(bf16, 1, 0, out, in, N, dy, N * out, out, x, N * in, in, accumulate, dW);
}

/* The public entry points: each product once in fp32 (bf16 = 0) and once
 * with bf16 operands (the _bf16 twin), same arguments. A macro because
 * each pair is two exported definitions: ab_linear_forward{,_bf16},
 * ab_linear_backward_dx{,_bf16}, ab_linear_backward_dW{,_bf16}. */
#define LINEAR_ENTRY_POINTS(name, params, ...)                                   \
    int ab_linear_##name params { return linear_##name(0, __VA_ARGS__); }      \
    int ab_linear_##name##_bf16 params { return linear_##name(1, __VA_ARGS__); }

LINEAR_ENTRY_POINTS(forward, (float *y, const float *x, const float *W,
                              int64_t N, int64_t in, int64_t out),
                    y, x, W, N, in, out)
LINEAR_ENTRY_POINTS(backward_dx, (float *dx, const float *dy, const float *W,
                                  int64_t N, int64_t in, int64_t out, int accumulate),
                    dx, dy, W, N, in, out, accumulate)
LINEAR_ENTRY_POINTS(backward_dW, (float *dW, const float *dy, const float *x,
                                  int64_t N, int64_t in, int64_t out, int accumulate),
                    dW, dy, x, N, in, out, accumulate)
