/* ab_internal.h — shared by every C file in csrc: argument guards, the fast
 * vectorisable exp, and BLAS helpers. Not part of the Python-visible API. */
#ifndef AB_INTERNAL_H
#define AB_INTERNAL_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#include "anebackward.h"
#include "ab_testing.h"
#include "blas.h"

/* Guards: every public function checks its own preconditions and returns an
 * error code; a failed guard also records why (the function and the failed
 * condition, or the call site's message) as this thread's ab_last_error().
 * ab_fail records and returns code (csrc/runtime.c); msg may be NULL. */
int ab_fail(int code, const char *func, const char *cond, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;
/* AB_FUNC: the name a message gives (a file whose public functions wrap
 * internal ones defines it to map the internal name to the public one). */
#ifndef AB_FUNC
#define AB_FUNC __func__
#endif
/* AB_REQUIRE_MSG(cond, code, "printf format", args...). The code itself is
 * returned (not ab_fail's result), so the compiler sees which paths fail. */
#define AB_REQUIRE_MSG(cond, code, ...) \
    do { if (!(cond)) { ab_fail((code), AB_FUNC, #cond, __VA_ARGS__); return (code); } } while (0)
#define AB_REQUIRE(cond, code) \
    do { if (!(cond)) { ab_fail((code), AB_FUNC, #cond, NULL); return (code); } } while (0)
#define AB_FAIL(code, msg) (ab_fail((code), AB_FUNC, NULL, (msg)), (code))
#define AB_NONNULL(p) AB_REQUIRE_MSG((p) != NULL, AB_ENULL, #p " is NULL")
#define AB_NONNEG(n) AB_REQUIRE_MSG((n) >= 0, AB_EINVAL, #n " is negative (%lld)", (long long)(n))
/* A dimension (or leading dimension) passed to the BLAS must fit its int. */
#define AB_BLAS_FITS(n) \
    AB_REQUIRE_MSG((int64_t)(n) <= AB_BLAS_INT_MAX, AB_ETOOBIG, \
                   #n " = %lld exceeds the BLAS's 2^31 - 1", (long long)(n))

/* Sizes are bounded before they are multiplied (no signed overflow): a
 * product of sizes stays below 2^52 floats (AB_ETOOBIG's promise). */
#define AB_MAX_FLOATS (INT64_C(1) << 52)
static inline int ab_mul_fits(int64_t a, int64_t b) {
    return a >= 0 && b >= 0 && (a == 0 || b <= AB_MAX_FLOATS / a);
}
#define AB_MUL_FITS(a, b) \
    AB_REQUIRE_MSG(ab_mul_fits((a), (b)), AB_ETOOBIG, #a " * " #b " exceeds 2^52 floats")

/* Vectorisable loops without -ffast-math: `#pragma omp simd` (built with
 * -fopenmp-simd, no OpenMP runtime) allows reassociating reductions. */
#define AB_SIMD _Pragma("omp simd")
#define AB_STR_(x) #x
#define AB_SIMD_REDUCE(op, var) _Pragma(AB_STR_(omp simd reduction(op:var)))

/* AB_HOT marks the elementwise hot loops: on x86-64 Linux with GCC they are
 * compiled three times (AVX-512, AVX2+FMA, baseline SSE2) and the loader
 * picks the best the CPU has (ifunc), so the default build stays portable and
 * still uses wide vectors. ANEBACKWARD_NATIVE=1 builds (-march=native) and
 * other compilers get one version. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) \
    && !defined(AB_NO_MULTIVERSION)
#define AB_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define AB_HOT
#endif

/* exp(x) for float, ~2 ulp, branch-free so loops over it vectorise.
 * exp(x) = 2^n * e^r with n = round(x log2 e), |r| <= ln2/2, e^r by its
 * degree-7 Taylor polynomial (truncation error < 6e-9 relative). 2^n is
 * applied as two factors 2^(n>>1) * 2^(n - (n>>1)) so that n from -150 to
 * 128 (denormal results up to FLT_MAX) needs no special case.
 * NaN propagates, x > 88.7228 gives +inf, x < -103.97 gives 0. */
static inline float ab_expf(float x) {
    const float hi = 88.7228f, lo = -103.97f;
    float xc = x > hi ? hi : x;
    xc = xc < lo ? lo : xc;
    const float shifter = 12582912.0f;          /* 1.5 * 2^23: rounds to int */
    float t = xc * 1.44269504088896341f + shifter;
    float n = t - shifter;
    int32_t ni;
    memcpy(&ni, &t, sizeof ni);
    ni -= 0x4B400000;                           /* bits of the shifter */
    float r = xc - n * 0.693145751953125f;      /* ln2 split hi/lo */
    r = r - n * 1.428606765330187045e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t n1 = ni >> 1, n2 = ni - n1;
    /* unsigned shifts: for NaN input ni is garbage and a signed shift would be UB */
    uint32_t b1 = (uint32_t)(n1 + 127) << 23, b2 = (uint32_t)(n2 + 127) << 23;
    float s1, s2;
    memcpy(&s1, &b1, sizeof s1);
    memcpy(&s2, &b2, sizeof s2);
    float res = (p * s1) * s2;
    res = x > hi ? INFINITY : res;
    res = x < lo ? 0.0f : res;
    return res;
}

/* ---- the ANE context's worker (csrc/ane/ane_core.c) ----
 * fn(arg) queued to the same FIFO thread as the asynchronous dx jobs, so a
 * caller can keep CPU work (the weight gradients) off its own path while it
 * drives the ANE; ab_ane_job_wait returns fn's result and frees the job. */
int ab_ane_submit_fn(ab_ane_ctx *ctx, ab_ane_job **job, int (*fn)(void *), void *arg);
/* The fused dx of projections that share an input (wq wk wv; w1 w3): one
 * evaluation per row tile of dx[N, in] (+)= Σ_p dy[p][N, out[p]] · W[p], n =
 * 1..3 weights W[p] [out[p], in] fp16-staged together once per (weights,
 * w_version), flags as for ab_ane_linear_backward_dx. A fused side wider
 * than the origin ever ran (3072 channels) runs one evaluation per W[p]. */
int ab_ane_linear_backward_dx_sum(ab_ane_ctx *ctx, float *dx, int n, const float *const *dy,
                                  const float *const *W, const int64_t *out, uint64_t w_version,
                                  int64_t N, int64_t in, int accumulate, int flags);

/* ---- the worker pool (csrc/threads.c) ----
 * Runs fn(ctx, task, worker) for task in [0, n_tasks) on at most
 * min(ab_get_num_threads(), max_workers) threads; worker < that count picks
 * a per-worker scratch slice. Task boundaries must not depend on the thread
 * count (that is what makes results identical for every count).
 * Returns the number of workers used. */
#define AB_MAX_THREADS 256
typedef void (*ab_task_fn)(void *ctx, int64_t task, int worker);
int ab_parallel_for(int64_t n_tasks, int max_workers, ab_task_fn fn, void *ctx);
/* Reads the setting once (and so puts the BLAS at 1 thread); cheap after. */
void ab_threads_init(void);

/* Fixed work per task for element-wise loops (floats): big enough that the
 * hand-out costs nothing, small enough to balance any thread count. */
#define AB_CHUNK 16384
static inline int64_t ab_div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }
/* Workers for an element-wise job touching `floats` floats: below ~50 us of
 * work one thread (waking a second costs about as much, and on a busy
 * machine a preempted worker can stall the caller for a scheduler tick).
 * Only who runs the tasks changes, never the tasks: results are the same. */
#define AB_PAR_MIN_FLOATS 131072.0
static inline int ab_workers_for(double floats) {   /* double: products cannot overflow */
    return floats < AB_PAR_MIN_FLOATS ? 1 : AB_MAX_THREADS;
}

static inline float ab_sigmoidf(float x) { return 1.0f / (1.0f + ab_expf(-x)); }

/* C = alpha * op(A) · op(B) + beta * C, row-major, dims already checked:
 * one BLAS call on the calling thread (the BLAS itself runs single-threaded,
 * see csrc/gemm.c). */
static inline void ab_sgemm_1(int transA, int transB, int64_t M, int64_t N, int64_t K,
                              float alpha, const float *A, int64_t lda,
                              const float *B, int64_t ldb, float beta,
                              float *C, int64_t ldc) {
    AB_SGEMM(CblasRowMajor, transA ? CblasTrans : CblasNoTrans,
             transB ? CblasTrans : CblasNoTrans, (ab_blasint)M, (ab_blasint)N,
             (ab_blasint)K, alpha, A, (ab_blasint)lda, B, (ab_blasint)ldb, beta,
             C, (ab_blasint)ldc);
}

/* The same product split into fixed tiles of C run on the worker pool
 * (csrc/gemm.c): the result does not depend on the thread count. */
void ab_sgemm(int transA, int transB, int64_t M, int64_t N, int64_t K,
              float alpha, const float *A, int64_t lda, const float *B, int64_t ldb,
              float beta, float *C, int64_t ldc);
/* Its pieces the bf16 products share (csrc/bf16/gemm_bf16.c): a tile of
 * about L/parts rounded up to 16, the grid of tiles of an M x N product,
 * and row c[N] = beta c + nk partial rows MN apart, added in chunk order
 * (beta 0: c is not read). */
int64_t ab_gemm_tile(int64_t L, int64_t parts);
void ab_gemm_grid(int64_t M, int64_t N, int64_t min_tile, int64_t most, int64_t *pm,
                  int64_t *pn);
void ab_gemm_sum_parts(float *c, const float *p, int64_t N, int64_t MN, int64_t nk, float beta);

/* Checks varlen segment starts (csrc/kernels/attention.c): cu[0] = 0 and
 * non-decreasing over cu[0..n_seq]; *N = cu[n_seq], *max_len = the longest
 * segment. AB_ENULL / AB_EINVAL otherwise. */
int ab_varlen_check(const int64_t *cu, int64_t n_seq, int64_t *N, int64_t *max_len);

/* RoPE frequency for pair index i (even, 0 <= i < head_dim), computed in
 * float as llama2.c's run.c and model.py do, so angles match theirs. */
static inline float ab_rope_freq(int64_t i, int64_t head_dim) {
    return 1.0f / powf(10000.0f, (float)i / (float)head_dim);
}

/* The same for any ab_rope_params (csrc/kernels/rope.c): theta and Llama-3
 * scaling applied; with the defaults it equals ab_rope_freq bit for bit.
 * p must have passed ab_rope_params_check (NULL = defaults). */
float ab_rope_freq_p(int64_t i, int64_t head_dim, const ab_rope_params *p);
/* Element offsets of rotation pair k (0 <= k < head_dim/2) inside a head. */
static inline int64_t ab_rope_pair_first(int64_t k, int64_t head_dim, int layout) {
    return layout == AB_ROPE_HALF ? k : 2 * k;
}
static inline int64_t ab_rope_pair_stride(int64_t head_dim, int layout) {
    return layout == AB_ROPE_HALF ? head_dim / 2 : 1;
}

#endif
