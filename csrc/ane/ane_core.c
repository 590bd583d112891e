/* ane_core.c — the platform-independent ANE dispatch: context, program cache,
 * weight staging, packing, loss scaling, CPU fallback, the asynchronous
 * worker, error reporting.
 *
 * dx[N, in] (+)= dy[N, out] · W[out, in] runs in row tiles of S rows (the
 * program's spatial size; N <= tile_rows gives one tile with S = N rounded up
 * to 64). in and out are padded with zeros to multiples of 64 as well: every
 * shape the origin project ran on the hardware was a multiple of 64. Per tile:
 *   1. m = max|dy| over the tile's rows; if not finite -> CPU.
 *   2. Loss scaling: s = 2^k with m*s in [2^9, 2^10) (exact in fp32 and fp16),
 *      so small gradients (1e-6 and below) keep their fp16 precision instead
 *      of flushing to fp16's subnormals/zero; 2^10 leaves a factor 64 of
 *      headroom below fp16's 65504 for the sums of the matmul.
 *   3. Pack s*dy^T into the dy part of the fp16 input surface; W goes into its
 *      part once per call, or once per (W, shape, version) when staged.
 *   4. Evaluate; unpack the fp16 [in, S] result. If it holds inf/NaN, or a
 *      value at fp16's largest magnitude (hardware may saturate at ±65504
 *      instead of overflowing), the tile is re-run once with a scale 2^8
 *      smaller, then computed on the CPU in fp32; else dx (+)= it/s.
 * Tiles are independent row blocks, so a CPU fallback for one tile never
 * disturbs another, and accumulate=1 stays exact.
 *
 * The program cache is keyed by (kernel, S, in, out). The ANE allows ~119
 * compiles per process (not per context), so compiles are counted per
 * process and new shapes go to the CPU once the budget (max_programs, default
 * 100) is spent. A failed load is retried once after 100 ms (the origin's
 * bridge does the same); a shape whose compile or load failed is remembered
 * with the platform's message until ab_ane_clear_cache. */
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/types.h>
#include <unistd.h>
#include "ab_internal.h"
#include "ab_testing.h"
#include "ane_internal.h"

#define AB_ANE_SCALE_LOG2 10      /* scaled max|dy| lands in [2^9, 2^10) */
#define AB_ANE_RERUN_DROP 8       /* an overflowed tile is re-run at 2^-8 the scale */
#define AB_ANE_DEFAULT_MAX_PROGRAMS 100
#define AB_ANE_DEFAULT_TILE_ROWS 256
#define AB_ANE_ALIGN 64
#define AB_ANE_LOAD_RETRY_US 100000
#define AB_ANE_SELF_TEST_S 256    /* the self-test's shape: Stories110M's wq at */
#define AB_ANE_SELF_TEST_D 768    /* the origin's 256 rows, a shape it ran       */
#define AB_ANE_SELF_TEST_TOL 4e-3  /* relative (Frobenius); fp16 rounding gives ~5e-4 */
#define AB_ANE_FP16_MAX 65504.0f
#define AB_ANE_MAX_FUSED 3072     /* widest fused side: the widest the origin ran */

static int64_t g_process_compiles;          /* atomic: every context, every platform */
static int64_t g_next_ctx_id;               /* atomic: tags programs per context */

/* ab_ane_testing_self_test_on_open: every platform self-tests at open. */
static int g_selftest_forced;               /* atomic */

/* What the cache needs to know about a kernel: its MIL generator and the
 * sizes of its packed input, output and fp32 staging tile for S rows and two
 * dimensions (a, b). Adding a kernel = a MIL generator, one of these, and a
 * pack/unpack routine like tile_on_ane. */
typedef struct {
    const char *name;
    int (*mil)(char *buf, int64_t cap, int64_t S, int64_t a, int64_t b, const char *tag, int64_t *len);
    size_t (*in_bytes)(int64_t S, int64_t a, int64_t b);
    size_t (*out_bytes)(int64_t S, int64_t a, int64_t b);
    int64_t (*scratch_floats)(int64_t S, int64_t a, int64_t b);
} ane_kernel;

/* linear_backward_dx, a = in, b = out: input fp16 [1, out, 1, S + in],
 * output fp16 [1, S, 1, in] (token-major rows), staging max(in, out) x S floats. */
static size_t dx_in_bytes(int64_t S, int64_t in, int64_t out) { return (size_t)out * (size_t)(S + in) * 2; }
static size_t dx_out_bytes(int64_t S, int64_t in, int64_t out) { return (size_t)in * (size_t)S * 2; }
static int64_t dx_scratch(int64_t S, int64_t in, int64_t out) { return (in > out ? in : out) * S; }
static const ane_kernel K_LINEAR_DX = {"linear_backward_dx", ab_ane_mil_linear_dx_tagged, dx_in_bytes,
                                       dx_out_bytes, dx_scratch};

typedef struct {
    const ane_kernel *kernel;
    int64_t S, in, out;         /* the program's (padded) shape */
    int code;                   /* AB_OK: ready; else why it failed */
    char *msg;                  /* the failure, whole */
    void *prog, *in_surf, *out_surf;
    void *req;                  /* the request binding in_surf and out_surf */
    float *scratch;             /* max(in, out) * S floats: the fp32 staging tile */
} ane_entry;

/* Weights staged in fp16 in their own input surface, for one program shape:
 * W[0..n-1] as the dx (forward = 0) or forward program's M (mm_call). */
typedef struct {
    const float *W[3];
    int n, forward;
    int64_t S, in, out;         /* the shape of the program it feeds */
    uint64_t version;
    void *in_surf;
    void *req;                  /* binds in_surf to the program's output surface */
} ane_stage;

struct ab_ane_job {
    int (*fn)(void *);          /* a CPU job (ab_ane_submit_fn), else a dx job */
    void *arg;
    int64_t ov_id, ov_submit;   /* the overlap hook's numbering (under g_ov_mu) */
    int ov_waited;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done;
    struct ab_ane_job *next;
    ab_ane_ctx *ctx;
    float *dx;
    const float *dy, *W;
    uint64_t w_version;
    int64_t N, in, out;
    int accumulate, flags;
    int rc;
    ab_ane_call_info info;
    char err[AB_ANE_ERRCAP];
    /* test handshake (ab_ane_testing_handshake), under mu */
    int handshake, started, waited;
    int64_t t_submitted, t_waited;
    int64_t cpu_submitted, cpu_waited;  /* the caller thread's CPU time */
};

struct ab_ane_ctx {
    const ab_ane_platform *pf;
    pthread_mutex_t mu;
    ane_entry *entries;
    int64_t n, cap;
    ane_stage *stages;
    int64_t nstages, capstages;
    int64_t max_programs, tile_rows;
    int loss_scaling;
    ab_ane_stats st;
    char tag[48];
    char *last_error;           /* the latest platform failure, NULL if none */
    char *self_test_report;
    /* the worker: a FIFO of jobs, one thread started at the first submit */
    pthread_mutex_t qmu;
    pthread_cond_t qcv;
    ab_ane_job *qhead, *qtail;
    int worker_started, stopping;
    int worker_busy;            /* the worker holds a job (under qmu) */
    pid_t worker_pid;           /* a forked child has no worker: it starts its own */
    pthread_t worker;
};

/* The message goes to the caller's buffer (if any) and, like every refusal
 * of the library, to this thread's ab_last_error(). */
int ab_ane_fail(char *err, size_t errcap, int code, const char *fmt, ...) {
    char own[512];
    if (!err || !errcap) { err = own; errcap = sizeof own; }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errcap, fmt, ap);
    va_end(ap);
    ab_fail(code, "ANE", NULL, "%s", err);
    return code;
}

static void set_str(char **dst, const char *s) {
    char *c = s ? strdup(s) : NULL;
    free(*dst);
    *dst = c;
}

const char *ab_ane_strerror(int code) {
    switch (code) {
    case AB_ANE_EUNAVAILABLE: return "the ANE platform is not available here";
    case AB_ANE_EPLATFORM: return "unknown ANE platform";
    case AB_ANE_EMIL: return "malformed or unsupported MIL program";
    case AB_ANE_ECOMPILE: return "the ANE compiler rejected the program";
    case AB_ANE_ELOAD: return "loading the program onto the ANE failed";
    case AB_ANE_EEVAL: return "evaluating the program on the ANE failed";
    case AB_ANE_ESURFACE: return "creating or locking an ANE tensor surface failed";
    case AB_ANE_EBUDGET: return "the process's ANE compile budget is spent";
    default: return ab_strerror(code);
    }
}

int ab_ane_clock_ns(int64_t *out) {
    AB_NONNULL(out);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    *out = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
    return AB_OK;
}

static int64_t now_ns(void) {
    int64_t t;
    ab_ane_clock_ns(&t);
    return t;
}

int ab_ane_testing_set_process_compiles(int64_t n) {
    AB_NONNEG(n);
    __atomic_store_n(&g_process_compiles, n, __ATOMIC_SEQ_CST);
    return AB_OK;
}

/* The test handshake: a job submitted to an idle worker is started before
 * its submit returns, and its end is held until someone waits for it; the
 * log keeps (submitted, started, ended, waited) of handshake jobs, and the
 * submitting thread's CPU time at submit and at wait. */
static int g_handshake;                     /* atomic */
enum { JOB_LOG_CAP = 256 };
static pthread_mutex_t g_log_mu = PTHREAD_MUTEX_INITIALIZER;
static int64_t g_log[JOB_LOG_CAP][6];
static int64_t g_log_n;

int ab_ane_testing_handshake(int on) {
    __atomic_store_n(&g_handshake, on != 0, __ATOMIC_SEQ_CST);
    pthread_mutex_lock(&g_log_mu);
    g_log_n = 0;
    pthread_mutex_unlock(&g_log_mu);
    return AB_OK;
}

/* The test logs' copy-out, under the log's mutex: *n = its length len, and
 * its first min(len, cap) entries (entry bytes each) into out. */
static int copy_log(pthread_mutex_t *mu, const void *log, size_t entry, const int64_t *len,
                    int64_t *out, int64_t cap, int64_t *n) {
    pthread_mutex_lock(mu);
    *n = *len;
    const int64_t m = *len < cap ? *len : cap;
    if (m > 0) memcpy(out, log, (size_t)m * entry);
    pthread_mutex_unlock(mu);
    return AB_OK;
}

int ab_ane_testing_job_log(int64_t *out, int64_t cap, int64_t *n) {
    AB_NONNULL(n);
    return copy_log(&g_log_mu, g_log, sizeof g_log[0], &g_log_n, out, cap, n);
}

static int64_t thread_cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Waits on cv until *flag, at most 10 s (a misused hook must not hang a test). */
static void wait_flag(pthread_cond_t *cv, pthread_mutex_t *mu, const int *flag) {
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 10;
    while (!*flag && pthread_cond_timedwait(cv, mu, &until) == 0) {}
}

/* The overlap hook (ab_testing.h): events (seq, kind, id) and the holds
 * that make CPU jobs and synchronous dx calls meet whenever the caller
 * queued the job before the call. */
enum { OV_DX_BEGIN, OV_DX_END, OV_FN_SUBMIT, OV_FN_BEGIN, OV_FN_END, OV_LOG_CAP = 4096 };
static int g_ov_on;                         /* atomic */
static pthread_mutex_t g_ov_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_ov_cv = PTHREAD_COND_INITIALIZER;
static int64_t g_ov_seq, g_ov_n, g_ov_fn_submitted, g_ov_fn_begun, g_ov_dx_calls, g_ov_dx_last_begin;
static int64_t g_ov_log[OV_LOG_CAP][3];

int ab_ane_testing_overlap(int on) {
    pthread_mutex_lock(&g_ov_mu);
    g_ov_seq = g_ov_n = g_ov_fn_submitted = g_ov_fn_begun = g_ov_dx_calls = g_ov_dx_last_begin = 0;
    __atomic_store_n(&g_ov_on, on != 0, __ATOMIC_SEQ_CST);
    pthread_cond_broadcast(&g_ov_cv);
    pthread_mutex_unlock(&g_ov_mu);
    return AB_OK;
}

int ab_ane_testing_overlap_log(int64_t *out, int64_t cap, int64_t *n) {
    AB_NONNULL(n);
    return copy_log(&g_ov_mu, g_ov_log, sizeof g_ov_log[0], &g_ov_n, out, cap, n);
}

/* Under g_ov_mu: log an event, wake the holds; returns its sequence number. */
static int64_t ov_event(int kind, int64_t id) {
    int64_t seq = ++g_ov_seq;
    if (g_ov_n < OV_LOG_CAP) {
        g_ov_log[g_ov_n][0] = seq, g_ov_log[g_ov_n][1] = kind, g_ov_log[g_ov_n][2] = id;
        g_ov_n++;
    }
    pthread_cond_broadcast(&g_ov_cv);
    return seq;
}

/* Under g_ov_mu: wait (at most 10 s) until *a >= b, or *c when c is given. */
static void ov_hold(const int64_t *a, int64_t b, const int *c) {
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 10;
    while (*a < b && !(c && *c) && pthread_cond_timedwait(&g_ov_cv, &g_ov_mu, &until) == 0) {}
}

/* Spend one compile of the process budget, or refuse (AB_ANE_EBUDGET). */
static int take_compile(ab_ane_ctx *ctx) {
    int64_t c = __atomic_load_n(&g_process_compiles, __ATOMIC_SEQ_CST);
    do {
        if (c >= ctx->max_programs) return AB_ANE_EBUDGET;
    } while (!__atomic_compare_exchange_n(&g_process_compiles, &c, c + 1, 0, __ATOMIC_SEQ_CST,
                                          __ATOMIC_SEQ_CST));
    ctx->st.compiles++;
    return AB_OK;
}

int ab_ane_testing_self_test_on_open(int on) {
    __atomic_store_n(&g_selftest_forced, on != 0, __ATOMIC_SEQ_CST);
    return AB_OK;
}

int ab_ane_open(ab_ane_ctx **ctx, const char *platform, char *err, size_t errcap) {
    if (err && errcap) err[0] = '\0';
    if (!ctx) return ab_ane_fail(err, errcap, AB_ENULL, "ctx is NULL");
    *ctx = NULL;
    const ab_ane_platform *pf = NULL;
    if (platform == NULL) {
#if defined(__APPLE__)
        pf = &ab_ane_platform_darwin;
#else
        return ab_ane_fail(err, errcap, AB_ANE_EUNAVAILABLE,
                           "the Apple Neural Engine exists only on Apple Silicon Macs; this build "
                           "is not for macOS (the \"emulated\" platform runs anywhere)");
#endif
    } else if (strcmp(platform, "emulated") == 0) {
        pf = &ab_ane_platform_emulated;
    } else if (strcmp(platform, "darwin") == 0) {
#if defined(__APPLE__)
        pf = &ab_ane_platform_darwin;
#else
        return ab_ane_fail(err, errcap, AB_ANE_EUNAVAILABLE,
                           "the \"darwin\" ANE platform is compiled only on macOS");
#endif
    } else {
        return ab_ane_fail(err, errcap, AB_ANE_EPLATFORM,
                           "unknown ANE platform \"%s\" (known: \"darwin\", \"emulated\")", platform);
    }
    int rc = pf->probe(err, errcap);
    if (rc) return rc;
    ab_ane_ctx *c = calloc(1, sizeof *c);
    if (!c) return ab_ane_fail(err, errcap, AB_ENOMEM, "out of memory");
    if (pthread_mutex_init(&c->mu, NULL) != 0) {
        free(c);
        return ab_ane_fail(err, errcap, AB_ENOMEM, "cannot create a mutex");
    }
    pthread_mutex_init(&c->qmu, NULL);
    pthread_cond_init(&c->qcv, NULL);
    c->pf = pf;
    c->max_programs = AB_ANE_DEFAULT_MAX_PROGRAMS;
    c->tile_rows = AB_ANE_DEFAULT_TILE_ROWS;
    c->loss_scaling = 1;
    c->st.self_test_code = 1;
    c->st.self_test_rel_err = -1.0;
    snprintf(c->tag, sizeof c->tag, "p%ld_c%lld", (long)getpid(),
             (long long)__atomic_add_fetch(&g_next_ctx_id, 1, __ATOMIC_SEQ_CST));
    if (pf->self_test_on_open || __atomic_load_n(&g_selftest_forced, __ATOMIC_SEQ_CST)) {
        char *why = malloc(AB_ANE_ERRCAP);
        rc = why ? ab_ane_self_test(c, why, AB_ANE_ERRCAP) : AB_ENOMEM;
        if (rc) {
            ab_ane_fail(err, errcap, AB_ANE_EUNAVAILABLE, "%s", why ? why : "out of memory");
            free(why);
            ab_ane_close(c);
            return AB_ANE_EUNAVAILABLE;
        }
        free(why);
    }
    *ctx = c;
    return AB_OK;
}

static void entry_release(const ab_ane_platform *pf, ane_entry *e) {
    if (e->req) pf->request_release(e->req);
    if (e->prog) pf->unload(e->prog);
    if (e->in_surf) pf->surface_release(e->in_surf);
    if (e->out_surf) pf->surface_release(e->out_surf);
    free(e->scratch);
    free(e->msg);
    memset(e, 0, sizeof *e);
}

/* Release every program and staged weight. Called with the mutex held. */
static void cache_release(ab_ane_ctx *ctx) {
    for (int64_t i = 0; i < ctx->nstages; i++) {     /* requests before what they bind */
        ctx->pf->request_release(ctx->stages[i].req);
        ctx->pf->surface_release(ctx->stages[i].in_surf);
    }
    for (int64_t i = 0; i < ctx->n; i++) entry_release(ctx->pf, &ctx->entries[i]);
    ctx->n = 0;
    ctx->nstages = 0;
}

static void worker_stop(ab_ane_ctx *ctx) {
    pthread_mutex_lock(&ctx->qmu);
    int started = ctx->worker_started && ctx->worker_pid == getpid();   /* ours, not a parent's */
    ctx->stopping = 1;
    pthread_cond_broadcast(&ctx->qcv);
    pthread_mutex_unlock(&ctx->qmu);
    if (started) pthread_join(ctx->worker, NULL);   /* the worker drains the queue first */
}

int ab_ane_close(ab_ane_ctx *ctx) {
    if (!ctx) return AB_OK;
    worker_stop(ctx);
    pthread_mutex_lock(&ctx->mu);
    cache_release(ctx);
    pthread_mutex_unlock(&ctx->mu);
    free(ctx->entries);
    free(ctx->stages);
    free(ctx->last_error);
    free(ctx->self_test_report);
    pthread_mutex_destroy(&ctx->mu);
    pthread_mutex_destroy(&ctx->qmu);
    pthread_cond_destroy(&ctx->qcv);
    free(ctx);
    return AB_OK;
}

int ab_ane_clear_cache(ab_ane_ctx *ctx) {
    AB_NONNULL(ctx);
    pthread_mutex_lock(&ctx->mu);
    cache_release(ctx);
    pthread_mutex_unlock(&ctx->mu);
    return AB_OK;
}

const char *ab_ane_platform_name(const ab_ane_ctx *ctx) { return ctx ? ctx->pf->name : ""; }

int ab_ane_configure(ab_ane_ctx *ctx, int loss_scaling, int64_t max_programs, int64_t tile_rows) {
    AB_NONNULL(ctx);
    if (tile_rows >= 0 && (tile_rows == 0 || tile_rows % AB_ANE_ALIGN != 0 || tile_rows > (1 << 20)))
        return AB_FAIL(AB_EINVAL, NULL);
    pthread_mutex_lock(&ctx->mu);
    if (loss_scaling >= 0) ctx->loss_scaling = loss_scaling != 0;
    if (max_programs >= 0) ctx->max_programs = max_programs;
    if (tile_rows > 0) ctx->tile_rows = tile_rows;
    pthread_mutex_unlock(&ctx->mu);
    return AB_OK;
}

static int copy_out(const char *s, char *buf, size_t cap, size_t *needed) {
    size_t n = s ? strlen(s) : 0;
    if (needed) *needed = n + 1;
    if (buf && cap) snprintf(buf, cap, "%s", s ? s : "");
    return AB_OK;
}

int ab_ane_last_error(ab_ane_ctx *ctx, char *buf, size_t cap, size_t *needed) {
    AB_NONNULL(ctx);
    AB_REQUIRE(buf || cap == 0, AB_ENULL);
    pthread_mutex_lock(&ctx->mu);
    copy_out(ctx->last_error, buf, cap, needed);
    pthread_mutex_unlock(&ctx->mu);
    return AB_OK;
}

int ab_ane_self_test_report(ab_ane_ctx *ctx, char *buf, size_t cap, size_t *needed) {
    AB_NONNULL(ctx);
    AB_REQUIRE(buf || cap == 0, AB_ENULL);
    pthread_mutex_lock(&ctx->mu);
    copy_out(ctx->self_test_report ? ctx->self_test_report : "not run", buf, cap, needed);
    pthread_mutex_unlock(&ctx->mu);
    return AB_OK;
}

int ab_ane_get_stats(ab_ane_ctx *ctx, ab_ane_stats *out) {
    AB_NONNULL(ctx);
    AB_NONNULL(out);
    pthread_mutex_lock(&ctx->mu);
    *out = ctx->st;
    out->process_compiles = __atomic_load_n(&g_process_compiles, __ATOMIC_SEQ_CST);
    out->programs = ctx->n;
    out->max_programs = ctx->max_programs;
    out->tile_rows = ctx->tile_rows;
    out->loss_scaling = ctx->loss_scaling;
    pthread_mutex_unlock(&ctx->mu);
    return AB_OK;
}

/* Load, retrying once after 100 ms: the origin's bridge found first loads
 * that fail transiently. */
static int load_with_retry(ab_ane_ctx *ctx, void *prog, char *pm, size_t pmcap) {
    int rc = ctx->pf->load(prog, pm, pmcap);
    if (rc) {
        ctx->st.load_retries++;
        usleep(AB_ANE_LOAD_RETRY_US);
        rc = ctx->pf->load(prog, pm, pmcap);
    }
    return rc;
}

/* Compile + load one program and its surfaces; the result (or the failure,
 * with the platform's message) goes into e. Called with the mutex held and
 * one compile of the budget taken. */
static void entry_build(ab_ane_ctx *ctx, ane_entry *e) {
    const ab_ane_platform *pf = ctx->pf;
    char *pm = calloc(1, AB_ANE_ERRCAP);
    const char *stage = "MIL generation";
    const ane_kernel *k = e->kernel;
    int64_t S = e->S, in = e->in, out = e->out, len = 0;
    int rc = pm ? k->mil(NULL, 0, S, in, out, ctx->tag, &len) : AB_ENOMEM;
    char *mil = rc ? NULL : malloc((size_t)len + 1);
    if (!rc && !mil) rc = AB_FAIL(AB_ENOMEM, NULL);
    if (!rc) rc = k->mil(mil, len + 1, S, in, out, ctx->tag, &len);
    if (!rc) { stage = "compile"; rc = pf->compile(mil, (size_t)len, &e->prog, pm, AB_ANE_ERRCAP); }
    free(mil);
    if (!rc) { stage = "load"; rc = load_with_retry(ctx, e->prog, pm, AB_ANE_ERRCAP); }
    if (!rc) {
        stage = "surface";
        rc = pf->surface_create(k->in_bytes(S, in, out), &e->in_surf, pm, AB_ANE_ERRCAP);
        if (!rc) rc = pf->surface_create(k->out_bytes(S, in, out), &e->out_surf, pm, AB_ANE_ERRCAP);
    }
    if (!rc) {
        stage = "request";
        rc = pf->request_create(e->prog, e->in_surf, e->out_surf, &e->req, pm, AB_ANE_ERRCAP);
        if (!rc) ctx->st.requests++;
    }
    if (!rc) {
        e->scratch = malloc((size_t)k->scratch_floats(S, in, out) * sizeof(float));
        if (!e->scratch) { rc = AB_FAIL(AB_ENOMEM, NULL); snprintf(pm, AB_ANE_ERRCAP, "out of memory"); }
    }
    e->code = rc;
    if (rc) {
        const char *why = pm && pm[0] ? pm : ab_ane_strerror(rc);
        size_t cap = strlen(why) + 256;
        e->msg = malloc(cap);
        if (e->msg)
            snprintf(e->msg, cap, "%s platform, %s of the %s program (S=%lld, in=%lld, out=%lld) "
                     "failed: %s", pf->name, stage, k->name, (long long)S, (long long)in,
                     (long long)out, why);
        /* keep the entry as a remembered failure, without resources */
        if (e->req) pf->request_release(e->req);
        if (e->prog) pf->unload(e->prog);
        if (e->in_surf) pf->surface_release(e->in_surf);
        if (e->out_surf) pf->surface_release(e->out_surf);
        free(e->scratch);
        e->prog = e->in_surf = e->out_surf = e->req = NULL;
        e->scratch = NULL;
    }
    free(pm);
}

/* The cached program for a shape; *budget = 1 and NULL when the process
 * budget forbids compiling a new one. */
static ane_entry *entry_get(ab_ane_ctx *ctx, const ane_kernel *kernel, int64_t S, int64_t in,
                            int64_t out, int *budget) {
    *budget = 0;
    for (int64_t i = 0; i < ctx->n; i++) {
        ane_entry *e = &ctx->entries[i];
        if (e->kernel == kernel && e->S == S && e->in == in && e->out == out) return e;
    }
    if (ctx->n == ctx->cap) {
        int64_t cap = ctx->cap ? 2 * ctx->cap : 8;
        ane_entry *n = realloc(ctx->entries, (size_t)cap * sizeof *n);
        if (!n) return NULL;
        ctx->entries = n;
        ctx->cap = cap;
    }
    if (take_compile(ctx)) { *budget = 1; return NULL; }
    ane_entry *e = &ctx->entries[ctx->n++];
    memset(e, 0, sizeof *e);
    e->kernel = kernel;
    e->S = S;
    e->in = in;
    e->out = out;
    entry_build(ctx, e);
    return e;
}

/* Power-of-two exponent k with m * 2^k in [2^(L-1), 2^L), L = AB_ANE_SCALE_LOG2. */
static int scale_exponent(float m) {
    if (!(m > 0.0f)) return 0;
    int e;
    frexpf(m, &e);                       /* m = f * 2^e, f in [0.5, 1) */
    int k = AB_ANE_SCALE_LOG2 - e;
    return k > 100 ? 100 : (k < -100 ? -100 : k);
}

/* max|x| over n floats; *finite = 0 if any is inf or NaN. */
static float max_abs(const float *x, int64_t n, int *finite) {
    float m = 0.0f;
    int bad = 0;
    AB_SIMD_REDUCE(max, m)
    for (int64_t i = 0; i < n; i++) { float a = fabsf(x[i]); m = a > m ? a : m; }
    AB_SIMD_REDUCE(|, bad)
    for (int64_t i = 0; i < n; i++) bad |= !(fabsf(x[i]) <= 3.4028235e38f);
    *finite = !bad;
    return m;
}

/* 1 when every value is finite and below fp16's largest magnitude: a value
 * at ±65504 may be the hardware saturating instead of overflowing. */
static int all_in_fp16_range(const float *x, int64_t n) {
    int bad = 0;
    AB_SIMD_REDUCE(|, bad)
    for (int64_t i = 0; i < n; i++) bad |= !(fabsf(x[i]) < AB_ANE_FP16_MAX);
    return !bad;
}

static void note_fallback(ab_ane_ctx *ctx, ab_ane_call_info *info, int reason) {
    if (!info->fallback) info->fallback = reason;
    switch (reason) {
    case AB_ANE_FB_OVERFLOW: ctx->st.fallback_overflow++; break;
    case AB_ANE_FB_RANGE: ctx->st.fallback_range++; break;
    case AB_ANE_FB_BUDGET: ctx->st.fallback_budget++; break;
    default: ctx->st.fallback_error++; break;
    }
}

/* One call of the program family: Y[N, A] (+)= X[N, C] · M[C, A], M built
 * from 1..3 weights W_p[out_p, in], all with the dx program (packed
 * [1, C, 1, S + A]: X^T then M; result Y token-major [1, S, 1, A]):
 *   dx (forward = 0): X = [dy_0 | dy_1 | ...] (C = Σ out_p), M = [W_0; W_1; ...]
 *     stacked by rows (A = in), Y = dx: the fused dx of projections that
 *     share their input (wq wk wv; w1 w3), one evaluation for their sum;
 *   forward (forward = 1): X = x (C = in), M = [W_0^T | W_1^T | ...] (A =
 *     Σ out_p), Y = [y_0 | y_1 | ...]. The model calls it with one weight
 *     per projection (ab_ane_linear_forward). */
typedef struct {
    int forward, n;
    float *const *dst;          /* dx: dst[0] [N, in]; forward: y_p [N, out_p] */
    const float *const *src;    /* dx: dy_p [N, out_p]; forward: src[0] = x [N, in] */
    const float *const *W;
    const int64_t *out;
    int64_t N, in, C, A;        /* C, A: the real (unpadded) contracted and result widths */
    int accumulate;
} mm_call;

static int64_t part_off(const mm_call *m, int p) {
    int64_t o = 0;
    for (int q = 0; q < p; q++) o += m->out[q];
    return o;
}

/* Write M (fp16) into the M part of an input surface of program e, zero
 * padding included: [:, c, :, S + a] = M[c, a]. For the forward M holds
 * W^T, transposed here once per staged version. */
static int write_W(ab_ane_ctx *ctx, const ane_entry *e, void *surf, const mm_call *m) {
    int64_t S = e->S, SP = e->S + e->in, Cp = e->out, Ap = e->in;
    float *row = m->forward ? malloc((size_t)Ap * sizeof(float)) : NULL;
    if (m->forward && !row) return AB_FAIL(AB_ENOMEM, NULL);
    uint16_t *pin = ctx->pf->surface_lock(surf, 0);
    if (!pin) { free(row); return AB_ANE_ESURFACE; }
    for (int64_t c = 0; c < Cp; c++) {
        uint16_t *dst = pin + c * SP + S;
        if (c >= m->C) { memset(dst, 0, (size_t)Ap * 2); continue; }
        if (m->forward) {               /* row c of M = column c of every W_p */
            int64_t a = 0;
            for (int p = 0; p < m->n; p++)
                for (int64_t o = 0; o < m->out[p]; o++) row[a++] = m->W[p][o * m->in + c];
            for (; a < Ap; a++) row[a] = 0.0f;
            ab_ane_f32_to_f16(dst, row, Ap);
        } else {                        /* row c of M = row c - off_p of W_p */
            int p = 0;
            int64_t o = c;
            while (o >= m->out[p]) o -= m->out[p++];
            ab_ane_f32_to_f16(dst, m->W[p] + o * m->in, m->in);
            memset(dst + m->in, 0, (size_t)(Ap - m->in) * 2);
        }
    }
    ctx->pf->surface_unlock(surf, 0);
    free(row);
    ctx->st.weight_stagings++;
    return AB_OK;
}

/* fp16 holds |x| < 65520; NaN/inf or larger weights cannot go there.
 * Weights are not loss-scaled: if even the largest is below 2^-10, most of
 * them would land in fp16's subnormal range (< 6.1e-5) and lose their
 * precision, so such a matrix stays on the CPU too. */
static int weights_fit_fp16(const mm_call *m) {
    for (int p = 0; p < m->n; p++) {
        int finite;
        float wmax = max_abs(m->W[p], m->out[p] * m->in, &finite);
        if (!(finite && wmax < 65520.0f && !(wmax > 0.0f && wmax < 0x1p-10f))) return 0;
    }
    return 1;
}

static int stage_matches(const ane_stage *t, const ane_entry *e, const mm_call *m) {
    if (t->S != e->S || t->in != e->in || t->out != e->out || t->forward != m->forward || t->n != m->n)
        return 0;
    for (int p = 0; p < m->n; p++)
        if (t->W[p] != m->W[p]) return 0;
    return 1;
}

/* The input surface (and its request) holding M for this call: a staged
 * one (w_version != 0), converted (and range-checked) only when its version
 * changed, or the program's own, written on every call. *reason =
 * AB_ANE_FB_RANGE when a weight cannot go to fp16. */
static int weights_surface(ab_ane_ctx *ctx, ane_entry *e, const mm_call *m, uint64_t w_version,
                           void **surf, void **req, int *staged_now, int *reason) {
    *staged_now = 0;
    *reason = AB_ANE_FB_NONE;
    ane_stage *s = NULL;
    if (w_version != 0) {
        for (int64_t i = 0; i < ctx->nstages; i++)
            if (stage_matches(&ctx->stages[i], e, m)) { s = &ctx->stages[i]; break; }
        if (s && s->version == w_version) {
            ctx->st.weight_reuses++;
            *surf = s->in_surf;
            *req = s->req;
            return AB_OK;
        }
    }
    if (!weights_fit_fp16(m)) { *reason = AB_ANE_FB_RANGE; return AB_OK; }
    if (w_version == 0) {
        *surf = e->in_surf;
        *req = e->req;
        *staged_now = 1;
        return write_W(ctx, e, e->in_surf, m);
    }
    if (!s) {
        if (ctx->nstages == ctx->capstages) {
            int64_t cap = ctx->capstages ? 2 * ctx->capstages : 16;
            ane_stage *n = realloc(ctx->stages, (size_t)cap * sizeof *n);
            if (!n) return AB_FAIL(AB_ENOMEM, NULL);
            ctx->stages = n;
            ctx->capstages = cap;
        }
        char pm[256];
        void *ns = NULL, *nr = NULL;
        int rc = ctx->pf->surface_create(e->kernel->in_bytes(e->S, e->in, e->out), &ns, pm, sizeof pm);
        if (rc) return rc;
        /* the request is made once, with the surface: every later version
         * of these weights is written into the same surface */
        rc = ctx->pf->request_create(e->prog, ns, e->out_surf, &nr, pm, sizeof pm);
        if (rc) { ctx->pf->surface_release(ns); return rc; }
        ctx->st.requests++;
        s = &ctx->stages[ctx->nstages++];
        memset(s, 0, sizeof *s);
        for (int p = 0; p < m->n; p++) s->W[p] = m->W[p];
        s->n = m->n;
        s->forward = m->forward;
        s->S = e->S, s->in = e->in, s->out = e->out;
        s->in_surf = ns;
        s->req = nr;
    }
    *surf = s->in_surf;
    *req = s->req;
    s->version = 0;                 /* invalid until the write completes */
    int rc = write_W(ctx, e, s->in_surf, m);
    if (rc) return rc;
    s->version = w_version;
    *staged_now = 1;
    return AB_OK;
}

/* Rows r0 .. r0+rows of X: max|X| over its parts (*finite = 0 on inf/NaN). */
static float tile_max(const mm_call *m, int64_t r0, int64_t rows, int *finite) {
    float mx = 0.0f;
    *finite = 1;
    int nx = m->forward ? 1 : m->n;
    for (int p = 0; p < nx; p++) {
        int64_t w = m->forward ? m->in : m->out[p];
        int f;
        float v = max_abs(m->src[p] + r0 * w, rows * w, &f);
        *finite &= f;
        mx = v > mx ? v : mx;
    }
    return mx;
}

/* One tile (rows r0 .. r0+rows) on the ANE at scale 2^k: AB_OK and
 * *overflow set, or a platform error. The M part of surf is written. */
static int tile_on_ane(ab_ane_ctx *ctx, ane_entry *e, void *surf, void *req, const mm_call *m,
                       int64_t r0, int64_t rows, int k, int *overflow, int64_t *eval_ns, char *err,
                       size_t errcap) {
    const ab_ane_platform *pf = ctx->pf;
    int64_t S = e->S, SP = S + e->in;
    float scale = ldexpf(1.0f, k);
    *overflow = 0;
    /* s * X^T into the fp32 staging tile [C, S], padding columns zero */
    int nx = m->forward ? 1 : m->n;
    for (int p = 0, c0 = 0; p < nx; p++) {
        int64_t w = m->forward ? m->in : m->out[p];
        ab_ane_rows_to_channels(e->scratch + c0 * S, S, m->src[p] + r0 * w, rows, w, scale);
        c0 += (int)w;
    }
    if (rows < S)
        for (int64_t c = 0; c < m->C; c++) memset(e->scratch + c * S + rows, 0, (size_t)(S - rows) * sizeof(float));
    uint16_t *pin = pf->surface_lock(surf, 0);
    if (!pin) return ab_ane_fail(err, errcap, AB_ANE_ESURFACE, "%s platform: cannot lock the input surface", pf->name);
    for (int64_t c = 0; c < e->out; c++) {
        if (c < m->C) ab_ane_f32_to_f16(pin + c * SP, e->scratch + c * S, S);
        else memset(pin + c * SP, 0, (size_t)S * 2);
    }
    pf->surface_unlock(surf, 0);
    char *pm = calloc(1, AB_ANE_ERRCAP);
    if (!pm) return ab_ane_fail(err, errcap, AB_ENOMEM, "out of memory");
    int64_t t0 = now_ns();
    int rc = pf->eval(e->prog, req, pm, AB_ANE_ERRCAP);
    *eval_ns += now_ns() - t0;
    if (rc) {
        ab_ane_fail(err, errcap, rc, "%s platform, evaluate %s (S=%lld, in=%lld, out=%lld): %s",
                    pf->name, m->forward ? "linear (forward)" : "linear_backward_dx", (long long)S,
                    (long long)e->in, (long long)e->out, pm[0] ? pm : ab_ane_strerror(rc));
        free(pm);
        return rc;
    }
    free(pm);
    const uint16_t *pout = pf->surface_lock(e->out_surf, 1);
    if (!pout) return ab_ane_fail(err, errcap, AB_ANE_ESURFACE, "%s platform: cannot lock the output surface", pf->name);
    int64_t Ap = e->in;                     /* the result: `rows` token-major rows of Ap */
    ab_ane_f16_to_f32(e->scratch, pout, rows * Ap);
    pf->surface_unlock(e->out_surf, 1);
    if (!all_in_fp16_range(e->scratch, rows * Ap)) { *overflow = 1; return AB_OK; }
    int ny = m->forward ? m->n : 1, acc = m->forward ? 0 : m->accumulate;
    float inv = ldexpf(1.0f, -k);
    for (int p = 0, a0 = 0; p < ny; p++) {
        int64_t w = m->forward ? m->out[p] : m->in;
        for (int64_t t = 0; t < rows; t++) {
            float *d = m->dst[p] + (r0 + t) * w;
            const float *src = e->scratch + t * Ap + a0;
            if (acc) {
                AB_SIMD
                for (int64_t j = 0; j < w; j++) d[j] += src[j] * inv;
            } else {
                AB_SIMD
                for (int64_t j = 0; j < w; j++) d[j] = src[j] * inv;
            }
        }
        a0 += (int)w;
    }
    return AB_OK;
}

/* Rows r0 .. r0+rows on the CPU (fp32), with the same result layout. */
static int tile_on_cpu(const mm_call *m, int64_t r0, int64_t rows) {
    int rc = AB_OK;
    for (int p = 0; p < m->n && !rc; p++) {
        if (m->forward)
            rc = ab_linear_forward(m->dst[p] + r0 * m->out[p], m->src[0] + r0 * m->in, m->W[p], rows,
                                   m->in, m->out[p]);
        else
            rc = ab_linear_backward_dx(m->dst[0] + r0 * m->in, m->src[p] + r0 * m->out[p], m->W[p], rows,
                                       m->in, m->out[p], p ? 1 : m->accumulate);
    }
    return rc;
}

static int64_t round_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

static void set_last_error(ab_ane_ctx *ctx, const char *msg) { set_str(&ctx->last_error, msg); }

/* The call with the mutex held. */
static int mm_locked(ab_ane_ctx *ctx, const mm_call *m, uint64_t w_version, int flags,
                     ab_ane_call_info *info, char *err, size_t errcap) {
    int strict = (flags & AB_ANE_STRICT) != 0;
    int scaling = ctx->loss_scaling && !(flags & AB_ANE_NO_LOSS_SCALE);
    int64_t N = m->N, S = ctx->tile_rows;
    if (N < S) S = round_up(N, AB_ANE_ALIGN);
    if (S > ctx->tile_rows) S = ctx->tile_rows;
    int64_t tiles = (N + S - 1) / S;
    info->tiles = tiles;
    ctx->st.calls++;

    int rc = AB_OK, reason = AB_ANE_FB_NONE, budget;
    ane_entry *e = entry_get(ctx, &K_LINEAR_DX, S, round_up(m->A, AB_ANE_ALIGN), round_up(m->C, AB_ANE_ALIGN),
                             &budget);
    void *surf = NULL, *req = NULL;
    if (!e) {
        reason = budget ? AB_ANE_FB_BUDGET : AB_ANE_FB_ERROR;
        if (budget) {
            char msg[200];
            snprintf(msg, sizeof msg, "the compile budget of %lld programs per process is spent "
                     "(%lld compiled); new shapes run on the CPU", (long long)ctx->max_programs,
                     (long long)__atomic_load_n(&g_process_compiles, __ATOMIC_SEQ_CST));
            set_last_error(ctx, msg);
        }
    } else if (e->code) {
        set_last_error(ctx, e->msg);
        if (strict) rc = ab_ane_fail(err, errcap, e->code, "%s", e->msg ? e->msg : ab_ane_strerror(e->code));
        else reason = AB_ANE_FB_ERROR;
    } else {
        int staged_now, wreason;
        int src = weights_surface(ctx, e, m, w_version, &surf, &req, &staged_now, &wreason);
        info->w_staged = staged_now;
        if (src) {
            char msg[200];
            snprintf(msg, sizeof msg, "%s platform: staging W failed: %s", ctx->pf->name, ab_ane_strerror(src));
            set_last_error(ctx, msg);
            if (strict) rc = ab_ane_fail(err, errcap, src, "%s", msg);
            else reason = AB_ANE_FB_ERROR;
        } else if (wreason) {
            reason = wreason;
        }
    }
    int failed = AB_OK, got_scale = 0;
    for (int64_t t = 0; t < tiles && rc == AB_OK; t++) {
        int64_t r0 = t * S, rows = N - r0 < S ? N - r0 : S;
        int tile_reason = reason;
        if (!tile_reason) {
            int finite;
            float mx = tile_max(m, r0, rows, &finite);
            if (!finite) tile_reason = AB_ANE_FB_RANGE;
            else {
                int k = scaling ? scale_exponent(mx) : 0;
                int overflow;
                char *pm = malloc(AB_ANE_ERRCAP);
                int trc = pm ? tile_on_ane(ctx, e, surf, req, m, r0, rows, k, &overflow, &info->eval_ns, pm, AB_ANE_ERRCAP)
                             : AB_ENOMEM;
                if (!trc && overflow && scaling) {      /* re-run with more headroom */
                    ctx->st.overflow_reruns++;
                    k -= AB_ANE_RERUN_DROP;
                    trc = tile_on_ane(ctx, e, surf, req, m, r0, rows, k, &overflow, &info->eval_ns, pm, AB_ANE_ERRCAP);
                }
                if (trc) {
                    /* This and the remaining tiles go to the CPU either way, so
                     * the result is never left half-updated; strict calls then report. */
                    const char *msg = pm ? pm : "out of memory";
                    if (strict && !failed) failed = ab_ane_fail(err, errcap, trc, "%s", msg);
                    tile_reason = AB_ANE_FB_ERROR;
                    reason = AB_ANE_FB_ERROR;        /* do not retry the platform this call */
                    set_last_error(ctx, msg);
                } else if (overflow) {
                    tile_reason = AB_ANE_FB_OVERFLOW;
                } else {
                    if (!got_scale) { info->scale_log2 = k; got_scale = 1; }
                    ctx->st.tiles_ane++;
                }
                free(pm);
            }
        }
        if (tile_reason) {
            note_fallback(ctx, info, tile_reason);
            info->tiles_cpu++;
            ctx->st.tiles_cpu++;
            rc = tile_on_cpu(m, r0, rows);
        }
    }
    return rc ? rc : failed;
}

/* Checks, the overlap hook, the mutex; the CPU kernels' edge cases. */
static int mm_run(ab_ane_ctx *ctx, mm_call *m, uint64_t w_version, int flags, ab_ane_call_info *info,
                  char *err, size_t errcap) {
    ab_ane_call_info local;
    if (!info) info = &local;
    memset(info, 0, sizeof *info);
    if (err && errcap) err[0] = '\0';
    info->t_start_ns = now_ns();
    int ov = __atomic_load_n(&g_ov_on, __ATOMIC_SEQ_CST);
    int64_t ov_id = 0, ov_need = 0;
    if (ov) {           /* the CPU jobs queued so far must begin before this call ends */
        pthread_mutex_lock(&g_ov_mu);
        ov_id = g_ov_dx_calls++;
        ov_need = g_ov_fn_submitted;
        g_ov_dx_last_begin = ov_event(OV_DX_BEGIN, ov_id);
        pthread_mutex_unlock(&g_ov_mu);
    }
    int rc = AB_OK;
    int64_t sum = 0;
    if (!ctx || m->n < 1 || m->n > 3 || !m->src[0] || !m->dst[0])
        rc = ab_ane_fail(err, errcap, AB_ENULL, "a required pointer is NULL");
    for (int p = 0; p < m->n && !rc; p++) {
        if (!m->W[p] || (!m->forward && !m->src[p]) || (m->forward && !m->dst[p]))
            rc = ab_ane_fail(err, errcap, AB_ENULL, "a required pointer is NULL");
        else if (m->out[p] < 0) rc = ab_ane_fail(err, errcap, AB_EINVAL, "negative size");
        else sum += m->out[p] > INT32_MAX ? INT32_MAX : m->out[p];
    }
    if (!rc && (m->N < 0 || m->in < 0)) rc = ab_ane_fail(err, errcap, AB_EINVAL, "negative size");
    if (!rc && (m->in > INT32_MAX / 2 || sum > INT32_MAX / 2 || m->N > ((int64_t)1 << 40)))
        rc = ab_ane_fail(err, errcap, AB_ETOOBIG, "dimension too large for an ANE tensor");
    int empty = 0;
    for (int p = 0; p < m->n; p++) empty |= m->out[p] == 0;
    if (!rc) {
        m->C = m->forward ? m->in : sum;
        m->A = m->forward ? sum : m->in;
        if (m->N == 0 || m->in == 0 || empty)   /* nothing for the ANE: the CPU kernels' edge cases */
            rc = tile_on_cpu(m, 0, m->N);
        else {
            pthread_mutex_lock(&ctx->mu);
            rc = mm_locked(ctx, m, w_version, flags, info, err, errcap);
            pthread_mutex_unlock(&ctx->mu);
        }
    }
    if (ov) {
        pthread_mutex_lock(&g_ov_mu);
        ov_hold(&g_ov_fn_begun, ov_need, NULL);
        ov_event(OV_DX_END, ov_id);
        pthread_mutex_unlock(&g_ov_mu);
    }
    info->t_end_ns = now_ns();
    return rc;
}

int ab_ane_linear_backward_dx(ab_ane_ctx *ctx, float *dx, const float *dy, const float *W,
                              uint64_t w_version, int64_t N, int64_t in, int64_t out, int accumulate,
                              int flags, ab_ane_call_info *info, char *err, size_t errcap) {
    float *dst[1] = {dx};
    const float *src[1] = {dy}, *Ws[1] = {W};
    int64_t outs[1] = {out};
    mm_call m = {0, 1, dst, src, Ws, outs, N, in, 0, 0, accumulate};
    return mm_run(ctx, &m, w_version, flags, info, err, errcap);
}

int ab_ane_linear_forward(ab_ane_ctx *ctx, float *y, const float *x, const float *W, uint64_t w_version,
                          int64_t N, int64_t in, int64_t out, int flags, ab_ane_call_info *info,
                          char *err, size_t errcap) {
    float *dst[1] = {y};
    const float *src[1] = {x}, *Ws[1] = {W};
    int64_t outs[1] = {out};
    mm_call m = {1, 1, dst, src, Ws, outs, N, in, 0, 0, 0};
    return mm_run(ctx, &m, w_version, flags, info, err, errcap);
}

/* A fused side wider than any the origin ran on the hardware: run the
 * projections one by one instead. */
static int fused_too_wide(int n, const int64_t *out) {
    int64_t sum = 0;
    for (int p = 0; p < n; p++) sum += out[p] > 0 ? out[p] : 0;
    return n > 1 && round_up(sum, AB_ANE_ALIGN) > AB_ANE_MAX_FUSED;
}

int ab_ane_linear_backward_dx_sum(ab_ane_ctx *ctx, float *dx, int n, const float *const *dy,
                                  const float *const *W, const int64_t *out, uint64_t w_version,
                                  int64_t N, int64_t in, int accumulate, int flags) {
    AB_NONNULL(dy); AB_NONNULL(W); AB_NONNULL(out);
    AB_REQUIRE(n >= 1 && n <= 3, AB_EINVAL);
    float *dst[1] = {dx};
    if (fused_too_wide(n, out)) {       /* one evaluation per projection, accumulating */
        for (int p = 0; p < n; p++) {
            mm_call m = {0, 1, dst, dy + p, W + p, out + p, N, in, 0, 0, p ? 1 : accumulate};
            int rc = mm_run(ctx, &m, w_version, flags, NULL, NULL, 0);
            if (rc) return rc;
        }
        return AB_OK;
    }
    mm_call m = {0, n, dst, dy, W, out, N, in, 0, 0, accumulate};
    return mm_run(ctx, &m, w_version, flags, NULL, NULL, 0);
}

/* ---------------------------------------------------------------- async */

static void job_finish(ab_ane_job *j) {
    pthread_mutex_lock(&j->mu);
    j->done = 1;
    pthread_cond_broadcast(&j->cv);
    pthread_mutex_unlock(&j->mu);
}

static void *worker_main(void *arg) {
    ab_ane_ctx *ctx = arg;
    for (;;) {
        pthread_mutex_lock(&ctx->qmu);
        while (!ctx->qhead && !ctx->stopping) pthread_cond_wait(&ctx->qcv, &ctx->qmu);
        ab_ane_job *j = ctx->qhead;
        if (!j) { pthread_mutex_unlock(&ctx->qmu); return NULL; }   /* stopping, queue drained */
        ctx->qhead = j->next;
        if (!ctx->qhead) ctx->qtail = NULL;
        ctx->worker_busy = 1;
        pthread_mutex_unlock(&ctx->qmu);
        int64_t t_started = now_ns();
        if (j->handshake) {
            pthread_mutex_lock(&j->mu);
            j->started = 1;
            pthread_cond_broadcast(&j->cv);
            pthread_mutex_unlock(&j->mu);
        }
        if (j->fn) {
            int ov = __atomic_load_n(&g_ov_on, __ATOMIC_SEQ_CST);
            if (ov) {       /* runs once a dx call has begun after it was queued */
                pthread_mutex_lock(&g_ov_mu);
                ov_event(OV_FN_BEGIN, j->ov_id);
                g_ov_fn_begun++;
                ov_hold(&g_ov_dx_last_begin, j->ov_submit + 1, &j->ov_waited);
                pthread_mutex_unlock(&g_ov_mu);
            }
            j->info.t_start_ns = now_ns();
            j->rc = j->fn(j->arg);
            j->info.t_end_ns = now_ns();
            if (ov) {
                pthread_mutex_lock(&g_ov_mu);
                ov_event(OV_FN_END, j->ov_id);
                pthread_mutex_unlock(&g_ov_mu);
            }
        } else {
            j->rc = ab_ane_linear_backward_dx(ctx, j->dx, j->dy, j->W, j->w_version, j->N, j->in, j->out,
                                              j->accumulate, j->flags, &j->info, j->err, sizeof j->err);
        }
        if (j->handshake) {         /* held until waited for: it ends then */
            pthread_mutex_lock(&j->mu);
            wait_flag(&j->cv, &j->mu, &j->waited);
            j->info.t_start_ns = t_started;     /* before its submit returned */
            j->info.t_end_ns = now_ns();
            pthread_mutex_unlock(&j->mu);
        }
        pthread_mutex_lock(&ctx->qmu);
        ctx->worker_busy = 0;
        pthread_mutex_unlock(&ctx->qmu);
        job_finish(j);
    }
}

static int enqueue(ab_ane_ctx *ctx, ab_ane_job *j, ab_ane_job **job);

static int dx_check(ab_ane_ctx *ctx, float *dx, const float *dy, const float *W, int64_t N, int64_t in,
                    int64_t out) {
    if (!ctx || !dx || !dy || !W) return AB_FAIL(AB_ENULL, NULL);
    if (N < 0 || in < 0 || out < 0) return AB_FAIL(AB_EINVAL, NULL);
    if (in > INT32_MAX / 2 || out > INT32_MAX / 2 || N > ((int64_t)1 << 40)) return AB_FAIL(AB_ETOOBIG, NULL);
    return AB_OK;
}

int ab_ane_linear_backward_dx_submit(ab_ane_ctx *ctx, ab_ane_job **job, float *dx, const float *dy,
                                     const float *W, uint64_t w_version, int64_t N, int64_t in,
                                     int64_t out, int accumulate, int flags) {
    AB_NONNULL(job);
    *job = NULL;
    int rc = dx_check(ctx, dx, dy, W, N, in, out);
    if (rc) return rc;
    ab_ane_job *j = calloc(1, sizeof *j);
    if (!j) return AB_FAIL(AB_ENOMEM, NULL);
    j->dx = dx;
    j->dy = dy;
    j->W = W;
    j->w_version = w_version;
    j->N = N;
    j->in = in;
    j->out = out;
    j->accumulate = accumulate;
    j->flags = flags;
    return enqueue(ctx, j, job);
}

int ab_ane_submit_fn(ab_ane_ctx *ctx, ab_ane_job **job, int (*fn)(void *), void *arg) {
    AB_NONNULL(job);
    *job = NULL;
    AB_NONNULL(ctx);
    AB_NONNULL(fn);
    ab_ane_job *j = calloc(1, sizeof *j);
    if (!j) return AB_FAIL(AB_ENOMEM, NULL);
    j->fn = fn;
    j->arg = arg;
    if (__atomic_load_n(&g_ov_on, __ATOMIC_SEQ_CST)) {
        pthread_mutex_lock(&g_ov_mu);
        j->ov_id = g_ov_fn_submitted++;
        j->ov_submit = ov_event(OV_FN_SUBMIT, j->ov_id);
        pthread_mutex_unlock(&g_ov_mu);
    }
    return enqueue(ctx, j, job);
}

/* Queue job j (freed on failure), starting the worker if needed. */
static int enqueue(ab_ane_ctx *ctx, ab_ane_job *j, ab_ane_job **job) {
    int rc = AB_OK;
    j->ctx = ctx;
    pthread_mutex_init(&j->mu, NULL);
    pthread_cond_init(&j->cv, NULL);
    j->handshake = !j->fn && __atomic_load_n(&g_handshake, __ATOMIC_SEQ_CST);
    j->t_submitted = now_ns();
    j->cpu_submitted = thread_cpu_ns();
    int idle = 0;
    pthread_mutex_lock(&ctx->qmu);
    if (ctx->worker_started && ctx->worker_pid != getpid()) {
        /* fork() copied the context but not its worker thread (nor the
         * parent's queue, whose jobs belong to the parent) */
        ctx->worker_started = 0;
        ctx->qhead = ctx->qtail = NULL;
        ctx->worker_busy = 0;
    }
    if (ctx->stopping) rc = AB_FAIL(AB_EINVAL, NULL);
    else if (!ctx->worker_started) {
        if (pthread_create(&ctx->worker, NULL, worker_main, ctx) != 0) rc = AB_FAIL(AB_ENOMEM, NULL);
        else { ctx->worker_started = 1; ctx->worker_pid = getpid(); }
    }
    if (!rc) {
        idle = !ctx->qhead && !ctx->worker_busy;
        if (ctx->qtail) ctx->qtail->next = j;
        else ctx->qhead = j;
        ctx->qtail = j;
        pthread_cond_signal(&ctx->qcv);
    }
    pthread_mutex_unlock(&ctx->qmu);
    if (rc) {
        pthread_mutex_destroy(&j->mu);
        pthread_cond_destroy(&j->cv);
        free(j);
        return rc;
    }
    if (j->handshake && idle) {
        pthread_mutex_lock(&j->mu);
        wait_flag(&j->cv, &j->mu, &j->started);
        pthread_mutex_unlock(&j->mu);
    }
    *job = j;
    return AB_OK;
}

int ab_ane_job_wait(ab_ane_job *job, ab_ane_call_info *info, char *err, size_t errcap) {
    AB_NONNULL(job);
    pthread_mutex_lock(&job->mu);
    job->t_waited = now_ns();
    job->cpu_waited = thread_cpu_ns();
    job->waited = 1;
    pthread_cond_broadcast(&job->cv);
    pthread_mutex_unlock(&job->mu);
    if (job->fn && __atomic_load_n(&g_ov_on, __ATOMIC_SEQ_CST)) {  /* releases its hold */
        pthread_mutex_lock(&g_ov_mu);
        job->ov_waited = 1;
        pthread_cond_broadcast(&g_ov_cv);
        pthread_mutex_unlock(&g_ov_mu);
    }
    pthread_mutex_lock(&job->mu);
    while (!job->done) pthread_cond_wait(&job->cv, &job->mu);
    pthread_mutex_unlock(&job->mu);
    if (job->handshake) {
        pthread_mutex_lock(&g_log_mu);
        if (g_log_n < JOB_LOG_CAP) {
            int64_t *e = g_log[g_log_n++];
            e[0] = job->t_submitted, e[1] = job->info.t_start_ns, e[2] = job->info.t_end_ns;
            e[3] = job->t_waited, e[4] = job->cpu_submitted, e[5] = job->cpu_waited;
        }
        pthread_mutex_unlock(&g_log_mu);
    }
    int rc = job->rc;
    if (info) *info = job->info;
    if (err && errcap) snprintf(err, errcap, "%s", job->err);
    pthread_mutex_destroy(&job->mu);
    pthread_cond_destroy(&job->cv);
    free(job);
    return rc;
}

/* ------------------------------------------------------------ diagnosis */

int ab_ane_run_mil(ab_ane_ctx *ctx, const char *mil, const void *in, size_t in_bytes,
                   void *out, size_t out_bytes, char *err, size_t errcap) {
    if (err && errcap) err[0] = '\0';
    if (!ctx || !mil || (!in && in_bytes) || (!out && out_bytes))
        return ab_ane_fail(err, errcap, AB_ENULL, "a required pointer is NULL");
    const ab_ane_platform *pf = ctx->pf;
    void *prog = NULL, *si = NULL, *so = NULL, *req = NULL;
    char *pm = calloc(1, AB_ANE_ERRCAP);
    if (!pm) return ab_ane_fail(err, errcap, AB_ENOMEM, "out of memory");
    const char *stage = "compile";
    int rc;
    pthread_mutex_lock(&ctx->mu);
    if (take_compile(ctx)) {
        pthread_mutex_unlock(&ctx->mu);
        free(pm);
        return ab_ane_fail(err, errcap, AB_ANE_EBUDGET, "the compile budget of %lld programs per process "
                           "is spent", (long long)ctx->max_programs);
    }
    rc = pf->compile(mil, strlen(mil), &prog, pm, AB_ANE_ERRCAP);
    if (!rc) { stage = "load"; rc = load_with_retry(ctx, prog, pm, AB_ANE_ERRCAP); }
    if (!rc) { stage = "surface"; rc = pf->surface_create(in_bytes, &si, pm, AB_ANE_ERRCAP); }
    if (!rc) rc = pf->surface_create(out_bytes, &so, pm, AB_ANE_ERRCAP);
    if (!rc) {
        void *p = pf->surface_lock(si, 0);
        if (!p) rc = ab_ane_fail(pm, AB_ANE_ERRCAP, AB_ANE_ESURFACE, "cannot lock the input surface");
        else { if (in_bytes) memcpy(p, in, in_bytes); pf->surface_unlock(si, 0); }
    }
    if (!rc) { stage = "request"; rc = pf->request_create(prog, si, so, &req, pm, AB_ANE_ERRCAP); }
    if (!rc) { ctx->st.requests++; stage = "evaluate"; rc = pf->eval(prog, req, pm, AB_ANE_ERRCAP); }
    if (!rc) {
        void *p = pf->surface_lock(so, 1);
        if (!p) rc = ab_ane_fail(pm, AB_ANE_ERRCAP, AB_ANE_ESURFACE, "cannot lock the output surface");
        else { if (out_bytes) memcpy(out, p, out_bytes); pf->surface_unlock(so, 1); }
    }
    if (req) pf->request_release(req);
    if (prog) pf->unload(prog);
    if (si) pf->surface_release(si);
    if (so) pf->surface_release(so);
    if (rc) {
        ab_ane_fail(err, errcap, rc, "%s platform, %s: %s", pf->name, stage, pm[0] ? pm : ab_ane_strerror(rc));
        set_last_error(ctx, err && errcap ? err : pm);
    }
    pthread_mutex_unlock(&ctx->mu);
    free(pm);
    return rc;
}

int ab_ane_testing_program_dir(ab_ane_ctx *ctx, int64_t S, int64_t in, int64_t out, char *buf, size_t cap) {
    AB_NONNULL(ctx);
    AB_NONNULL(buf);
    AB_REQUIRE(cap > 0, AB_EINVAL);
    buf[0] = '\0';
    pthread_mutex_lock(&ctx->mu);
    for (int64_t i = 0; i < ctx->n; i++) {
        ane_entry *e = &ctx->entries[i];
        if (e->S == S && e->in == in && e->out == out && e->prog)
            snprintf(buf, cap, "%s", ctx->pf->program_dir(e->prog));
    }
    pthread_mutex_unlock(&ctx->mu);
    return AB_OK;
}

/* dx of a 256 x 768 x 768 problem (S x in x out: Stories110M's attention
 * projections at the origin project's 256 rows, a shape it ran on the
 * hardware; the program is the one such a model's wq/wk/wv/wo use) with
 * values in [-1, 1]: the platform must match the CPU within fp16 tolerance.
 * The program stays cached for later calls of the same shape. */
int ab_ane_self_test(ab_ane_ctx *ctx, char *err, size_t errcap) {
    enum { S = AB_ANE_SELF_TEST_S, n = AB_ANE_SELF_TEST_D };
    if (err && errcap) err[0] = '\0';
    AB_NONNULL(ctx);
    float *buf = malloc(((size_t)3 * S * n + (size_t)n * n) * sizeof(float));
    char *why = calloc(1, AB_ANE_ERRCAP), rep[300];
    if (!buf || !why) { free(buf); free(why); return ab_ane_fail(err, errcap, AB_ENOMEM, "out of memory"); }
    float *dy = buf, *W = buf + S * n, *dx = W + n * n, *want = dx + S * n;
    uint32_t s = 12345u;
    for (int i = 0; i < S * n + n * n; i++) {      /* a fixed LCG: the same problem everywhere */
        s = s * 1664525u + 1013904223u;
        buf[i] = (float)((int)(s >> 9) % 2001 - 1000) / 1000.0f;
    }
    int rc = ab_linear_backward_dx(want, dy, W, S, n, n, 0);
    ab_ane_call_info info;
    if (!rc) rc = ab_ane_linear_backward_dx(ctx, dx, dy, W, 0, S, n, n, 0, AB_ANE_STRICT, &info, why,
                                            AB_ANE_ERRCAP);
    double num = 0.0, den = 0.0;
    if (!rc) {
        for (int i = 0; i < S * n; i++) {
            double d = (double)dx[i] - (double)want[i];
            num += d * d;
            den += (double)want[i] * (double)want[i];
        }
    }
    double rel = den > 0.0 ? sqrt(num / den) : 0.0;
    if (rc) {
    } else if (info.tiles_cpu) {
        rc = AB_ANE_EEVAL;
        snprintf(why, AB_ANE_ERRCAP, "the test program's result was out of fp16 range and fell back to the CPU");
    } else if (!(rel <= AB_ANE_SELF_TEST_TOL)) {
        rc = AB_ANE_EEVAL;
        snprintf(why, AB_ANE_ERRCAP, "%dx%dx%d dx differs from the CPU by %.3g relative (tolerance %g)",
                 S, n, n, rel, AB_ANE_SELF_TEST_TOL);
    } else {
        snprintf(rep, sizeof rep, "passed: %dx%dx%d dx, relative error %.2e (tolerance %g)", S, n, n, rel,
                 AB_ANE_SELF_TEST_TOL);
    }
    size_t fcap = strlen(why) + 128;
    char *full = rc ? malloc(fcap) : NULL;
    if (full) snprintf(full, fcap, "%s platform failed its self-test: %s", ctx->pf->name, why);
    if (rc) ab_ane_fail(err, errcap, rc, "%s", full ? full : why);
    pthread_mutex_lock(&ctx->mu);
    ctx->st.self_test_code = rc;
    ctx->st.self_test_rel_err = rc == AB_ANE_EEVAL || !rc ? rel : -1.0;
    set_str(&ctx->self_test_report, rc ? (full ? full : why) : rep);
    pthread_mutex_unlock(&ctx->mu);
    free(full);
    free(buf);
    free(why);
    return rc;
}
