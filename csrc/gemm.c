/* gemm.c — every sgemm of the package, split over the worker pool.
 *
 * The BLAS runs single-threaded (ab_set_num_threads keeps OpenBLAS at 1):
 * the package's pool is the only one, so its threads and the BLAS's never
 * compete for cores, and an idle BLAS pool never spins beside it. A product
 * C[M,N] is cut along its longer side into tiles whose width depends only on
 * (M, N, K); each tile is one BLAS call on one worker. A tile's elements see
 * the same K loop however many threads run, so results do not depend on the
 * thread count (OpenBLAS's own threading changes them).
 * Accelerate (macOS) manages its own threads: one call, no tiling. */
#include "ab_internal.h"

#define SMALL_MACS (INT64_C(1) << 21)   /* below this a single call: too small to share */
#define TARGET_TILES 24
#define MIN_TILE 16

typedef struct {
    int transA, transB;
    int64_t M, N, K, lda, ldb, ldc, tile;
    int split_rows;
    float alpha, beta;
    const float *A, *B;
    float *C;
} gemm_job;

static void tile_task(void *ctx, int64_t t, int worker) {
    const gemm_job *j = ctx;
    const int64_t L = j->split_rows ? j->M : j->N;
    const int64_t i0 = t * j->tile, w = i0 + j->tile < L ? j->tile : L - i0;
    if (j->split_rows) {
        const float *A = j->transA ? j->A + i0 : j->A + i0 * j->lda;
        ab_sgemm_1(j->transA, j->transB, w, j->N, j->K, j->alpha, A, j->lda, j->B, j->ldb,
                   j->beta, j->C + i0 * j->ldc, j->ldc);
    } else {
        const float *B = j->transB ? j->B + i0 * j->ldb : j->B + i0;
        ab_sgemm_1(j->transA, j->transB, j->M, w, j->K, j->alpha, j->A, j->lda, B, j->ldb,
                   j->beta, j->C + i0, j->ldc);
    }
}

void ab_sgemm(int transA, int transB, int64_t M, int64_t N, int64_t K,
              float alpha, const float *A, int64_t lda, const float *B, int64_t ldb,
              float beta, float *C, int64_t ldc) {
#ifdef AB_BLAS_HAVE_OPENBLAS_CONTROLS
    const int split_rows = M > N;
    const int64_t L = split_rows ? M : N;
    if ((double)M * (double)N * (double)K >= (double)SMALL_MACS && L >= 2 * MIN_TILE) {
        int64_t tile = ab_div_up(ab_div_up(L, TARGET_TILES), MIN_TILE) * MIN_TILE;
        gemm_job j = {transA, transB, M, N, K, lda, ldb, ldc, tile, split_rows,
                      alpha, beta, A, B, C};
        ab_parallel_for(ab_div_up(L, tile), AB_MAX_THREADS, tile_task, &j);
        return;
    }
#endif
    ab_sgemm_1(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
