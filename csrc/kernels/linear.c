/* linear.c — y = x·W^T and its two gradients, all through one sgemm each.
 *
 *   forward:   y[N,out]   = x[N,in] · W[out,in]^T
 *   backward:  dx[N,in]   = dy[N,out] · W[out,in]            (+= if accumulate)
 *              dW[out,in] = dy[N,out]^T · x[N,in]            (+= if accumulate)
 *
 * Accumulation is the sgemm's beta = 1: no temporaries, no extra pass. */
#include "ab_internal.h"

static int check_dims(int64_t N, int64_t in, int64_t out) {
    AB_NONNEG(N); AB_NONNEG(in); AB_NONNEG(out);
    AB_BLAS_FITS(N); AB_BLAS_FITS(in); AB_BLAS_FITS(out);
    return AB_OK;
}

int ab_linear_forward(float *y, const float *x, const float *W,
                      int64_t N, int64_t in, int64_t out) {
    int rc = check_dims(N, in, out);
    if (rc) return rc;
    AB_NONNULL(y); AB_NONNULL(x); AB_NONNULL(W);
    if (N == 0 || out == 0) return AB_OK;
    if (in == 0) { memset(y, 0, (size_t)N * (size_t)out * sizeof(float)); return AB_OK; }
    ab_sgemm(0, 1, N, out, in, 1.0f, x, in, W, in, 0.0f, y, out);
    return AB_OK;
}

int ab_linear_backward_dx(float *dx, const float *dy, const float *W,
                          int64_t N, int64_t in, int64_t out, int accumulate) {
    int rc = check_dims(N, in, out);
    if (rc) return rc;
    AB_NONNULL(dx); AB_NONNULL(dy); AB_NONNULL(W);
    if (N == 0 || in == 0) return AB_OK;
    if (out == 0) {
        if (!accumulate) memset(dx, 0, (size_t)N * (size_t)in * sizeof(float));
        return AB_OK;
    }
    ab_sgemm(0, 0, N, in, out, 1.0f, dy, out, W, in, accumulate ? 1.0f : 0.0f, dx, in);
    return AB_OK;
}

int ab_linear_backward_dW(float *dW, const float *dy, const float *x,
                          int64_t N, int64_t in, int64_t out, int accumulate) {
    int rc = check_dims(N, in, out);
    if (rc) return rc;
    AB_NONNULL(dW); AB_NONNULL(dy); AB_NONNULL(x);
    if (out == 0 || in == 0) return AB_OK;
    if (N == 0) {
        if (!accumulate) memset(dW, 0, (size_t)out * (size_t)in * sizeof(float));
        return AB_OK;
    }
    ab_sgemm(1, 0, out, in, N, 1.0f, dy, out, x, in, accumulate ? 1.0f : 0.0f, dW, in);
    return AB_OK;
}
