/* gemm.c — every sgemm of the package, split over the worker pool.
 *
 * The BLAS runs single-threaded (ab_set_num_threads keeps OpenBLAS at 1):
 * the package's pool is the only one, so its threads and the BLAS's never
 * compete for cores, and an idle BLAS pool never spins beside it. A product
 * C[M,N] = op(A)[M,K] op(B)[K,N] is cut into tiles that depend only on
 * (M, N, K), one BLAS call each, so results do not depend on the thread
 * count (OpenBLAS's own threading changes them):
 *   - K much longer than M and N (the classifier's dx): K chunks, each
 *     product into its own scratch, summed in chunk order. Every element of
 *     A and B is packed once, as in one call.
 *   - otherwise a grid of M x N tiles no smaller than MIN_TILE: each tile
 *     re-packs its slices of A and B, which stays cheap at that size.
 * Accelerate (macOS) manages its own threads: one call, no tiling. */
#include <stdlib.h>
#include "ab_internal.h"

#define SMALL_MACS (INT64_C(1) << 21)   /* below this a single call: too small to share */
#define TARGET_TILES 16
#define MIN_TILE 128
#define K_CHUNK_MIN 1024

typedef struct {
    int transA, transB;
    int64_t M, N, K, lda, ldb, ldc;
    int64_t tm, tn, nm;        /* grid: tile sizes, tiles along M */
    int64_t tk, nk;            /* K split: chunk, chunks (nk > 1) */
    float alpha, beta;
    const float *A, *B;
    float *C, *part;           /* part: nk partial products [M, N] */
} gemm_job;

static const float *a_at(const gemm_job *j, int64_t m0, int64_t k0) {
    return j->transA ? j->A + k0 * j->lda + m0 : j->A + m0 * j->lda + k0;
}
static const float *b_at(const gemm_job *j, int64_t k0, int64_t n0) {
    return j->transB ? j->B + n0 * j->ldb + k0 : j->B + k0 * j->ldb + n0;
}

static void grid_task(void *ctx, int64_t t, int worker) {
    const gemm_job *j = ctx;
    const int64_t m0 = (t % j->nm) * j->tm, n0 = (t / j->nm) * j->tn;
    const int64_t m = m0 + j->tm < j->M ? j->tm : j->M - m0;
    const int64_t n = n0 + j->tn < j->N ? j->tn : j->N - n0;
    ab_sgemm_1(j->transA, j->transB, m, n, j->K, j->alpha, a_at(j, m0, 0), j->lda,
               b_at(j, 0, n0), j->ldb, j->beta, j->C + m0 * j->ldc + n0, j->ldc);
}

static void kchunk_task(void *ctx, int64_t t, int worker) {
    const gemm_job *j = ctx;
    const int64_t k0 = t * j->tk, k = k0 + j->tk < j->K ? j->tk : j->K - k0;
    ab_sgemm_1(j->transA, j->transB, j->M, j->N, k, j->alpha, a_at(j, 0, k0), j->lda,
               b_at(j, k0, 0), j->ldb, 0.0f, j->part + t * j->M * j->N, j->N);
}

/* Row c[N] = beta c + the nk partial rows p, p + MN, ... added in chunk
 * order (beta 0: c is not read, BLAS semantics). Shared with the bf16
 * products (csrc/bf16/gemm_bf16.c): one reduction order for both. */
void ab_gemm_sum_parts(float *c, const float *p, int64_t N, int64_t MN, int64_t nk, float beta) {
    if (beta == 0.0f) {
        AB_SIMD
        for (int64_t i = 0; i < N; i++) c[i] = p[i];
    } else {
        AB_SIMD
        for (int64_t i = 0; i < N; i++) c[i] = beta * c[i] + p[i];
    }
    for (int64_t q = 1; q < nk; q++) {
        const float *pq = p + q * MN;
        AB_SIMD
        for (int64_t i = 0; i < N; i++) c[i] += pq[i];
    }
}

static void ksum_task(void *ctx, int64_t t, int worker) {
    const gemm_job *j = ctx;
    ab_gemm_sum_parts(j->C + t * j->ldc, j->part + t * j->N, j->N, j->M * j->N, j->nk, j->beta);
}

/* a tile of about L/parts, rounded up to a multiple of 16 */
int64_t ab_gemm_tile(int64_t L, int64_t parts) {
    return ab_div_up(ab_div_up(L, parts), 16) * 16;
}

/* an M x N grid of at most `most` tiles (pm row parts x pn column parts,
 * powers of two), halving the longer side while its tiles stay >= min_tile;
 * it depends on the shape only, never on the thread count */
void ab_gemm_grid(int64_t M, int64_t N, int64_t min_tile, int64_t most, int64_t *pm,
                  int64_t *pn) {
    int64_t m = 1, n = 1;
    while (m * n < most) {
        const int64_t cm = ab_gemm_tile(M, m), cn = ab_gemm_tile(N, n);
        if (cn >= cm && ab_gemm_tile(N, 2 * n) >= min_tile) n *= 2;
        else if (ab_gemm_tile(M, 2 * m) >= min_tile) m *= 2;
        else if (ab_gemm_tile(N, 2 * n) >= min_tile) n *= 2;
        else break;
    }
    *pm = m;
    *pn = n;
}

void ab_sgemm(int transA, int transB, int64_t M, int64_t N, int64_t K,
              float alpha, const float *A, int64_t lda, const float *B, int64_t ldb,
              float beta, float *C, int64_t ldc) {
#ifdef AB_BLAS_HAVE_OPENBLAS_CONTROLS
    ab_threads_init();   /* even an untiled call must not meet a multithreaded BLAS */
    if ((double)M * (double)N * (double)K >= (double)SMALL_MACS && M > 0 && N > 0 && K > 0) {
        gemm_job j = {transA, transB, M, N, K, lda, ldb, ldc, M, N, 1, K, 1,
                      alpha, beta, A, B, C, NULL};
        const int64_t big = M > N ? M : N;
        if (K >= 8 * big && K >= 2 * K_CHUNK_MIN) {
            int64_t tk = ab_div_up(ab_div_up(K, TARGET_TILES), 256) * 256;
            j.tk = tk > K_CHUNK_MIN ? tk : K_CHUNK_MIN;
            j.nk = ab_div_up(K, j.tk);
            j.part = malloc((size_t)(j.nk * M * N) * sizeof(float));
            if (j.part) {
                ab_parallel_for(j.nk, AB_MAX_THREADS, kchunk_task, &j);
                ab_parallel_for(M, AB_MAX_THREADS, ksum_task, &j);
                free(j.part);
                return;
            }   /* no memory for the partials: one call below */
        } else {
            int64_t pm, pn;
            ab_gemm_grid(M, N, MIN_TILE, TARGET_TILES, &pm, &pn);
            if (pm * pn > 1) {
                j.tm = ab_gemm_tile(M, pm); j.tn = ab_gemm_tile(N, pn);
                j.nm = ab_div_up(M, j.tm);
                ab_parallel_for(j.nm * ab_div_up(N, j.tn), AB_MAX_THREADS, grid_task, &j);
                return;
            }
        }
    }
#endif
    ab_sgemm_1(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
