/* gemm_bf16.c — bf16 x bf16 -> fp32 products, the path chosen at run time.
 *
 * ab_gemm_bf16 computes C[M,N] (+)= op(A)[M,K] · op(B)[K,N] from row-major
 * bf16 operands with fp32 accumulation and fp32 C, by one of:
 *   oneDNN (csrc/bf16/onednn.c) where it reports bf16 instructions
 *     (avx512_core_bf16 or AMX). Default threading: C is cut into the same
 *     kind of fixed tiles as csrc/gemm.c (an M x N grid, or K chunks summed
 *     in chunk order when K dwarfs M and N), each tile one single-threaded
 *     oneDNN call on the package's pool, so results do not depend on the
 *     thread count (tile sizes follow the shape and the ISA: tile_min).
 *     Tiles are cut so that oneDNN's AMX kernel, which takes dense
 *     operands only, gets dense ones: rows of C (A^T B too: each
 *     tile's columns of A are first copied into a dense per-thread buffer
 *     of K x (tile rows) values), column tiles through a dense per-thread
 *     C buffer for a wide C, K chunks. AB_BF16_ONEDNN_THREADS instead makes
 *     one call threaded by oneDNN itself (the pool idle): results then may
 *     depend on it.
 *   portable: the operands widened to fp32 and one ab_sgemm (tiled, thread
 *     count independent). The same bf16 values are multiplied, accumulated
 *     in fp32; only the summation order differs from oneDNN's.
 * Conversions fp32 <-> bf16 are plain loops (round to nearest even), split
 * in fixed chunks over the pool. */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include "bf16_internal.h"

#define SMALL_MACS (INT64_C(1) << 21)
#define TARGET_TILES 16
#define K_CHUNK_MIN 1024
static int64_t min_tile = 0;   /* 0: by the ISA (tile_min); ab_bf16_testing_tile sets it */
#define PART_FLOATS (INT64_C(1) << 22)   /* partial products of a K split, at most */
static int planner = 1;

static atomic_int mode_path = AB_BF16_AUTO;
static atomic_int mode_threads = AB_BF16_POOL;

int ab_bf16_init(const char *path, char *err, size_t errcap) {
    int rc = ab_onednn_init(path);
    if (err && errcap) snprintf(err, errcap, "%s", ab_onednn_message());
    return rc;
}

int ab_bf16_set_mode(int path, int threads) {
    AB_REQUIRE(path < 0 || path == AB_BF16_AUTO || path == AB_BF16_PORTABLE, AB_EINVAL);
    AB_REQUIRE(threads < 0 || threads == AB_BF16_POOL || threads == AB_BF16_ONEDNN_THREADS,
               AB_EINVAL);
    if (path >= 0) atomic_store(&mode_path, path);
    if (threads >= 0) atomic_store(&mode_threads, threads);
    return AB_OK;
}

int ab_bf16_get_mode(int *path, int *threads) {
    if (path) *path = atomic_load(&mode_path);
    if (threads) *threads = atomic_load(&mode_threads);
    return AB_OK;
}

int ab_bf16_path(void) {
    if (atomic_load(&mode_path) == AB_BF16_PORTABLE) return AB_BF16_PORTABLE;
    if (ab_onednn_state() == 0) (void)ab_onednn_init(NULL);
    if (ab_onednn_state() != 1) return AB_BF16_UNAVAILABLE;
    return ab_onednn_has_bf16() ? AB_BF16_ONEDNN : AB_BF16_PORTABLE;
}

const char *ab_bf16_describe(void) {
    static _Thread_local char buf[768];
    const int p = ab_bf16_path();
    const int st = ab_onednn_state();
    const char *dnnl = st == 1 ? ab_onednn_message() : st == 0 ? "oneDNN not loaded" : NULL;
    if (p == AB_BF16_ONEDNN) {
        const char *impl = ab_onednn_impl();
        snprintf(buf, sizeof buf, "onednn (%s%s%s; %s)", dnnl, *impl ? ", kernel " : "", impl,
                 atomic_load(&mode_threads) == AB_BF16_ONEDNN_THREADS
                     ? "oneDNN's own threads" : "tiles on the package's pool");
    } else if (p == AB_BF16_PORTABLE) {
        const char *why = atomic_load(&mode_path) == AB_BF16_PORTABLE ? "asked for"
                          : "oneDNN finds no bf16 instructions";
        snprintf(buf, sizeof buf, "portable (%s%s%s; bf16 operands widened to fp32 + sgemm)",
                 why, st == 1 ? ": " : "", st == 1 ? ab_onednn_message() : "");
    } else {
        snprintf(buf, sizeof buf, "unavailable (%s)", dnnl ? dnnl : "oneDNN not loaded");
    }
    return buf;
}

/* ---- conversions ---- */
typedef struct { uint16_t *h; float *f; const float *cf; const uint16_t *ch; int64_t n; } cv_job;

AB_HOT static void to_bf16_loop(uint16_t *dst, const float *src, int64_t n) {
    AB_SIMD
    for (int64_t i = 0; i < n; i++) dst[i] = ab_f32_bf16(src[i]);
}
AB_HOT static void to_f32_loop(float *dst, const uint16_t *src, int64_t n) {
    AB_SIMD
    for (int64_t i = 0; i < n; i++) dst[i] = ab_bf16_f32(src[i]);
}
/* chunk t of a conversion: to bf16 when j->h is set, else to fp32 */
static void convert_task(void *ctx, int64_t t, int w) {
    const cv_job *j = ctx;
    const int64_t i0 = t * AB_CHUNK, n = i0 + AB_CHUNK < j->n ? AB_CHUNK : j->n - i0;
    if (j->h) to_bf16_loop(j->h + i0, j->cf + i0, n);
    else to_f32_loop(j->f + i0, j->ch + i0, n);
}
static int convert(const cv_job *j) {
    if (j->n > 0)
        ab_parallel_for(ab_div_up(j->n, AB_CHUNK), ab_workers_for((double)j->n), convert_task,
                        (void *)j);
    return AB_OK;
}

int ab_f32_to_bf16(uint16_t *dst, const float *src, int64_t n) {
    AB_NONNEG(n);
    if (n > 0) { AB_NONNULL(dst); AB_NONNULL(src); }
    return convert(&(cv_job){dst, NULL, src, NULL, n});
}

int ab_bf16_to_f32(float *dst, const uint16_t *src, int64_t n) {
    AB_NONNEG(n);
    if (n > 0) { AB_NONNULL(dst); AB_NONNULL(src); }
    return convert(&(cv_job){NULL, dst, NULL, src, n});
}

/* ---- the product ---- */
typedef struct {
    int transA, transB, accumulate;
    int64_t M, N, K, lda, ldb, ldc;
    int64_t tm, tn, nm, tk, nk;
    const uint16_t *A, *B;
    float *C, *part;
    atomic_int rc;
} bjob;

static const uint16_t *ba_at(const bjob *j, int64_t m0, int64_t k0) {
    return j->transA ? j->A + k0 * j->lda + m0 : j->A + m0 * j->lda + k0;
}
static const uint16_t *bb_at(const bjob *j, int64_t k0, int64_t n0) {
    return j->transB ? j->B + n0 * j->ldb + k0 : j->B + k0 * j->ldb + n0;
}
static void fail(bjob *j, int rc) {
    int expected = AB_OK;
    if (rc) atomic_compare_exchange_strong(&j->rc, &expected, rc);
}

static void grid_task(void *ctx, int64_t t, int worker) {
    bjob *j = ctx;
    const int64_t m0 = (t % j->nm) * j->tm, n0 = (t / j->nm) * j->tn;
    const int64_t m = m0 + j->tm < j->M ? j->tm : j->M - m0;
    const int64_t n = n0 + j->tn < j->N ? j->tn : j->N - n0;
    fail(j, ab_onednn_matmul(j->transA, j->transB, m, n, j->K, ba_at(j, m0, 0), j->lda,
                             bb_at(j, 0, n0), j->ldb, j->accumulate, j->C + m0 * j->ldc + n0,
                             j->ldc, 1));
}

/* a per-thread scratch buffer of at least `bytes` (grown, never shrunk, kept
 * for the thread's next tile); NULL when out of memory */
typedef struct { void *p; size_t cap; } scratch_buf;
static void *thread_scratch(scratch_buf *s, size_t bytes) {
    if (bytes > s->cap) {
        free(s->p);
        s->p = malloc(bytes);
        s->cap = s->p ? bytes : 0;
    }
    return s->p;
}
static _Thread_local scratch_buf t_ctile, t_atile;

/* column tiles of a wide C (all M rows, tn columns): into a dense per-thread
 * buffer, then copied (or added) into C. Each tile packs only its slice of B,
 * where row tiles would each pack all of it. */
static void wide_task(void *ctx, int64_t t, int worker) {
    bjob *j = ctx;
    const int64_t n0 = t * j->tn, n = n0 + j->tn < j->N ? j->tn : j->N - n0, M = j->M;
    float *T = thread_scratch(&t_ctile, (size_t)(M * n) * sizeof(float));
    if (!T) { fail(j, AB_ENOMEM); return; }
    int rc = ab_onednn_matmul(j->transA, j->transB, M, n, j->K, j->A, j->lda, bb_at(j, 0, n0),
                              j->ldb, 0, T, n, 1);
    if (rc) { fail(j, rc); return; }
    for (int64_t r = 0; r < M; r++) {
        float *c = j->C + r * j->ldc + n0;
        const float *x = T + r * n;
        if (j->accumulate) {
            AB_SIMD
            for (int64_t i = 0; i < n; i++) c[i] += x[i];
        } else {
            memcpy(c, x, (size_t)n * sizeof(float));
        }
    }
}

/* rows of C for A^T B: the tile's columns of A (all K rows, strided in A)
 * are first copied into a dense per-thread [K, m] buffer, so that oneDNN's
 * AMX kernel takes them (it reads dense operands only; the copy is one pass
 * over A in all, row pieces of m values, no transpose) */
static void gather_task(void *ctx, int64_t t, int worker) {
    bjob *j = ctx;
    const int64_t m0 = t * j->tm, m = m0 + j->tm < j->M ? j->tm : j->M - m0, K = j->K;
    uint16_t *At = thread_scratch(&t_atile, (size_t)(K * m) * sizeof(uint16_t));
    if (!At) { fail(j, AB_ENOMEM); return; }
    for (int64_t k = 0; k < K; k++)
        memcpy(At + k * m, j->A + k * j->lda + m0, (size_t)m * sizeof(uint16_t));
    fail(j, ab_onednn_matmul(1, j->transB, m, j->N, K, At, m, j->B, j->ldb, j->accumulate,
                             j->C + m0 * j->ldc, j->ldc, 1));
}

static void kchunk_task(void *ctx, int64_t t, int worker) {
    bjob *j = ctx;
    const int64_t k0 = t * j->tk, k = k0 + j->tk < j->K ? j->tk : j->K - k0;
    fail(j, ab_onednn_matmul(j->transA, j->transB, j->M, j->N, k, ba_at(j, 0, k0), j->lda,
                             bb_at(j, k0, 0), j->ldb, 0, j->part + t * j->M * j->N, j->N, 1));
}

static void ksum_task(void *ctx, int64_t t, int worker) {
    const bjob *j = ctx;
    ab_gemm_sum_parts(j->C + t * j->ldc, j->part + t * j->N, j->N, j->M * j->N, j->nk,
                      j->accumulate ? 1.0f : 0.0f);
}

/* K cut into chunks of tk: each chunk's product into its own partial C, the
 * partials then summed in chunk order */
static int k_split(bjob *j, int64_t tk) {
    j->tk = tk;
    j->nk = ab_div_up(j->K, tk);
    j->part = malloc((size_t)(j->nk * j->M * j->N) * sizeof(float));
    if (!j->part) return AB_FAIL(AB_ENOMEM, NULL);
    ab_parallel_for(j->nk, AB_MAX_THREADS, kchunk_task, j);
    if (atomic_load(&j->rc) == AB_OK) ab_parallel_for(j->M, AB_MAX_THREADS, ksum_task, j);
    free(j->part);
    j->part = NULL;
    return atomic_load(&j->rc);
}

/* The smallest tile side. oneDNN's AMX kernel runs a product about six
 * times faster per thread than its avx512_core_bf16 kernel, so a call's
 * fixed costs (all of B copied into the tile layout, the tile set-up) weigh
 * six times more: on AMX tiles are twice as tall (measured at the
 * stories110M shapes: 128-row calls ran at ~0.75 of oneDNN's own threading,
 * 256-row calls at ~0.93). Chosen by the ISA and the shape only, never by
 * the thread count. */
static int64_t tile_min(void) {
    return min_tile ? min_tile : ab_onednn_has_amx() ? 512 : 256;
}

static int gemm_onednn(bjob *j) {
    const int64_t M = j->M, N = j->N, K = j->K;
    if (atomic_load(&mode_threads) == AB_BF16_ONEDNN_THREADS)
        return ab_onednn_matmul(j->transA, j->transB, M, N, K, j->A, j->lda, j->B, j->ldb,
                                j->accumulate, j->C, j->ldc, ab_get_num_threads());
    if ((double)M * (double)N * (double)K >= (double)SMALL_MACS) {
        const int64_t big = M > N ? M : N;
        if (K >= 8 * big && K >= 2 * K_CHUNK_MIN) {
            const int64_t tk = ab_div_up(ab_div_up(K, TARGET_TILES), 256) * 256;
            return k_split(j, tk > K_CHUNK_MIN ? tk : K_CHUNK_MIN);
        }
        int64_t pm = 1, pn = 1;
        const int64_t tmin = tile_min();
        /* a wide C in column tiles, unless two row tiles would do (each
         * packs all of B, but no C goes through a buffer) */
        if (planner == 1 && !j->transA && N >= 8 * M && N >= 4096 && M > tmin
            && M * ab_gemm_tile(N, TARGET_TILES) <= PART_FLOATS) {
            j->tn = ab_gemm_tile(N, TARGET_TILES);
            ab_parallel_for(ab_div_up(N, j->tn), AB_MAX_THREADS, wide_task, j);
            return atomic_load(&j->rc);
        }
        if (planner == 1 && M > 16) {
            /* rows of C only: every tile's A and C stay dense (oneDNN's AMX
             * kernel takes dense operands only); each tile packs all of B, so
             * tiles of >= min_tile / 2 rows (A^T: >= min_tile, as each tile
             * also transposes its A inside oneDNN), but at least two */
            const int64_t rows = j->transA ? tmin : tmin / 2;
            while (pm < TARGET_TILES && ab_gemm_tile(M, 2 * pm) >= rows) pm *= 2;
            if (pm == 1) pm = 2;
            j->tm = ab_gemm_tile(M, pm);
            j->nm = ab_div_up(M, j->tm);
            /* A^T: each tile's columns of A gathered (its buffer: tiles are
             * at most M / 2 rows, rounded up to 16) */
            ab_parallel_for(j->nm, AB_MAX_THREADS, j->transA ? gather_task : grid_task, j);
            return atomic_load(&j->rc);
        }
        if (planner == 1 && M * N <= PART_FLOATS / 2 && K >= 256) {
            /* A^T B with M <= 16: K chunks (rows of both operands) keep them
             * dense; as many chunks of >= 128 rows as PART_FLOATS of partial
             * products allow */
            int64_t nk = PART_FLOATS / (M * N), most = K / 128;
            nk = nk < most ? nk : most;
            nk = nk < TARGET_TILES ? nk : TARGET_TILES;
            return k_split(j, ab_div_up(ab_div_up(K, nk), 16) * 16);
        } else {
            ab_gemm_grid(M, N, tmin, TARGET_TILES, &pm, &pn);
        }
        j->tm = ab_gemm_tile(M, pm); j->tn = ab_gemm_tile(N, pn);
        j->nm = ab_div_up(M, j->tm);
        ab_parallel_for(j->nm * ab_div_up(N, j->tn), AB_MAX_THREADS, grid_task, j);
        return atomic_load(&j->rc);
    }
    return ab_onednn_matmul(j->transA, j->transB, M, N, K, j->A, j->lda, j->B, j->ldb,
                            j->accumulate, j->C, j->ldc, 1);
}

/* rows x cols of a row-major bf16 matrix with leading dimension ld, widened */
static float *widen(const uint16_t *X, int64_t rows, int64_t cols, int64_t ld) {
    float *w = malloc((size_t)(rows * cols) * sizeof(float));
    if (!w) return NULL;
    if (ld == cols) {
        ab_bf16_to_f32(w, X, rows * cols);
    } else {
        for (int64_t r = 0; r < rows; r++) to_f32_loop(w + r * cols, X + r * ld, cols);
    }
    return w;
}

static int gemm_portable(const bjob *j) {
    const int64_t ar = j->transA ? j->K : j->M, ac = j->transA ? j->M : j->K;
    const int64_t br = j->transB ? j->N : j->K, bc = j->transB ? j->K : j->N;
    float *a = widen(j->A, ar, ac, j->lda), *b = a ? widen(j->B, br, bc, j->ldb) : NULL;
    if (a && b)
        ab_sgemm(j->transA, j->transB, j->M, j->N, j->K, 1.0f, a, ac, b, bc,
                 j->accumulate ? 1.0f : 0.0f, j->C, j->ldc);
    free(a);
    free(b);
    return a && b ? AB_OK : AB_ENOMEM;
}

int ab_gemm_bf16(int transA, int transB, int64_t M, int64_t N, int64_t K,
                 const uint16_t *A, int64_t lda, const uint16_t *B, int64_t ldb,
                 int accumulate, float *C, int64_t ldc) {
    AB_NONNEG(M); AB_NONNEG(N); AB_NONNEG(K);
    AB_BLAS_FITS(M); AB_BLAS_FITS(N); AB_BLAS_FITS(K);
    AB_MUL_FITS(M, N); AB_MUL_FITS(M, K); AB_MUL_FITS(N, K);
    if (M == 0 || N == 0) return AB_OK;
    AB_NONNULL(C);
    AB_REQUIRE(ldc >= N, AB_EINVAL);
    AB_REQUIRE(lda >= (transA ? M : K) && lda >= 1, AB_EINVAL);
    AB_REQUIRE(ldb >= (transB ? K : N) && ldb >= 1, AB_EINVAL);
    AB_BLAS_FITS(lda); AB_BLAS_FITS(ldb); AB_BLAS_FITS(ldc);
    const int path = ab_bf16_path();
    if (path == AB_BF16_UNAVAILABLE) return AB_FAIL(AB_EUNAVAILABLE, NULL);
    if (K == 0) {
        if (!accumulate)
            for (int64_t r = 0; r < M; r++) memset(C + r * ldc, 0, (size_t)N * sizeof(float));
        return AB_OK;
    }
    AB_NONNULL(A); AB_NONNULL(B);
    bjob j = {transA != 0, transB != 0, accumulate != 0, M, N, K, lda, ldb, ldc,
              M, N, 1, K, 1, A, B, C, NULL, AB_OK};
    ab_threads_init();
    return path == AB_BF16_ONEDNN ? gemm_onednn(&j) : gemm_portable(&j);
}

int ab_bf16_testing_tile(int64_t t) {
    AB_REQUIRE(t >= 16, AB_EINVAL);
    min_tile = t % 10000;
    planner = (int)(t / 10000);
    return AB_OK;
}
