/* ane_core.c — the platform-independent ANE dispatch: context, program cache,
 * packing, loss scaling, CPU fallback, error reporting.
 *
 * dx[N, in] (+)= dy[N, out] · W[out, in] runs in row tiles of S rows (the
 * program's spatial size; N <= tile_rows gives one tile with S = N rounded up
 * to 32). Per tile:
 *   1. m = max|dy| over the tile's rows; if not finite -> CPU.
 *   2. Loss scaling: s = 2^k with m*s in [2^9, 2^10) (exact in fp32 and fp16),
 *      so small gradients (1e-6 and below) keep their fp16 precision instead
 *      of flushing to fp16's subnormals/zero; 2^10 leaves a factor 64 of
 *      headroom below fp16's 65504 for the sums of the matmul.
 *   3. Pack s*dy^T and W (once per call) into the fp16 input surface.
 *   4. Evaluate; unpack the fp16 [in, S] result. If it holds inf/NaN (fp16
 *      overflow) the tile is recomputed on the CPU in fp32; else dx (+)= it/s.
 * Tiles are independent row blocks, so a CPU fallback for one tile never
 * disturbs another, and accumulate=1 stays exact.
 *
 * The program cache is keyed by (kernel, S, in, out). Compiling is limited:
 * the ANE allows ~119 compiles per process, so the context stops compiling at
 * max_programs (default 100) and runs further new shapes on the CPU. A shape
 * whose compile or load failed is remembered as failed with the platform's
 * message (no retry, no budget burnt). */
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ab_internal.h"
#include "ane_internal.h"

#define AB_ANE_SCALE_LOG2 10      /* scaled max|dy| lands in [2^9, 2^10) */
#define AB_ANE_DEFAULT_MAX_PROGRAMS 100
#define AB_ANE_DEFAULT_TILE_ROWS 256
#define AB_ANE_ROW_ALIGN 32
#define AB_ANE_MSG 384

/* What the cache needs to know about a kernel: its MIL generator and the
 * sizes of its packed input, output and fp32 staging tile for S rows and two
 * dimensions (a, b). Adding a kernel = a MIL generator, one of these, and a
 * pack/unpack routine like tile_on_ane. */
typedef struct {
    const char *name;
    int64_t (*mil)(char *buf, int64_t cap, int64_t S, int64_t a, int64_t b);
    size_t (*in_bytes)(int64_t S, int64_t a, int64_t b);
    size_t (*out_bytes)(int64_t S, int64_t a, int64_t b);
    int64_t (*scratch_floats)(int64_t S, int64_t a, int64_t b);
} ane_kernel;

/* linear_backward_dx, a = in, b = out: input fp16 [1, out, 1, S + in],
 * output fp16 [1, in, 1, S], staging max(in, out) x S floats. */
static size_t dx_in_bytes(int64_t S, int64_t in, int64_t out) { return (size_t)out * (size_t)(S + in) * 2; }
static size_t dx_out_bytes(int64_t S, int64_t in, int64_t out) { return (size_t)in * (size_t)S * 2; }
static int64_t dx_scratch(int64_t S, int64_t in, int64_t out) { return (in > out ? in : out) * S; }
static const ane_kernel K_LINEAR_DX = {"linear_backward_dx", ab_ane_mil_linear_dx, dx_in_bytes,
                                       dx_out_bytes, dx_scratch};

typedef struct {
    const ane_kernel *kernel;
    int64_t S, in, out;
    int code;                   /* AB_OK: ready; else why it failed */
    char msg[AB_ANE_MSG];
    void *prog, *in_surf, *out_surf;
    float *scratch;             /* max(in, out) * S floats: the fp32 staging tile */
} ane_entry;

struct ab_ane_ctx {
    const ab_ane_platform *pf;
    pthread_mutex_t mu;
    ane_entry *entries;
    int64_t n, cap;
    int64_t max_programs, tile_rows;
    int loss_scaling;
    ab_ane_stats st;
    char last_error[AB_ANE_MSG];    /* the latest platform failure, "" if none */
};

int ab_ane_fail(char *err, size_t errcap, int code, const char *fmt, ...) {
    if (err && errcap) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errcap, fmt, ap);
        va_end(ap);
    }
    return code;
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
    default: return ab_strerror(code);
    }
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
    c->pf = pf;
    c->max_programs = AB_ANE_DEFAULT_MAX_PROGRAMS;
    c->tile_rows = AB_ANE_DEFAULT_TILE_ROWS;
    c->loss_scaling = 1;
    if (pf->self_test_on_open) {
        char why[AB_ANE_MSG];
        rc = ab_ane_self_test(c, why, sizeof why);
        if (rc) {
            ab_ane_close(c);
            return ab_ane_fail(err, errcap, AB_ANE_EUNAVAILABLE, "%s", why);
        }
    }
    *ctx = c;
    return AB_OK;
}

static void entry_release(const ab_ane_platform *pf, ane_entry *e) {
    if (e->prog) pf->unload(e->prog);
    if (e->in_surf) pf->surface_release(e->in_surf);
    if (e->out_surf) pf->surface_release(e->out_surf);
    free(e->scratch);
    memset(e, 0, sizeof *e);
}

void ab_ane_close(ab_ane_ctx *ctx) {
    if (!ctx) return;
    for (int64_t i = 0; i < ctx->n; i++) entry_release(ctx->pf, &ctx->entries[i]);
    free(ctx->entries);
    pthread_mutex_destroy(&ctx->mu);
    free(ctx);
}

const char *ab_ane_platform_name(const ab_ane_ctx *ctx) { return ctx ? ctx->pf->name : ""; }

int ab_ane_configure(ab_ane_ctx *ctx, int loss_scaling, int64_t max_programs, int64_t tile_rows) {
    AB_NONNULL(ctx);
    if (tile_rows >= 0 && (tile_rows == 0 || tile_rows % AB_ANE_ROW_ALIGN != 0 || tile_rows > (1 << 20)))
        return AB_EINVAL;
    pthread_mutex_lock(&ctx->mu);
    if (loss_scaling >= 0) ctx->loss_scaling = loss_scaling != 0;
    if (max_programs >= 0) ctx->max_programs = max_programs;
    if (tile_rows > 0) ctx->tile_rows = tile_rows;
    pthread_mutex_unlock(&ctx->mu);
    return AB_OK;
}

int ab_ane_last_error(ab_ane_ctx *ctx, char *buf, size_t cap) {
    AB_NONNULL(ctx);
    AB_NONNULL(buf);
    AB_REQUIRE(cap > 0, AB_EINVAL);
    pthread_mutex_lock(&ctx->mu);
    snprintf(buf, cap, "%s", ctx->last_error);
    pthread_mutex_unlock(&ctx->mu);
    return AB_OK;
}

int ab_ane_get_stats(ab_ane_ctx *ctx, ab_ane_stats *out) {
    AB_NONNULL(ctx);
    AB_NONNULL(out);
    pthread_mutex_lock(&ctx->mu);
    *out = ctx->st;
    out->programs = ctx->n;
    out->max_programs = ctx->max_programs;
    out->tile_rows = ctx->tile_rows;
    out->loss_scaling = ctx->loss_scaling;
    pthread_mutex_unlock(&ctx->mu);
    return AB_OK;
}

/* Compile + load one program and its surfaces; the result (or the failure,
 * with the platform's message) goes into e. Called with the mutex held. */
static void entry_build(ab_ane_ctx *ctx, ane_entry *e) {
    const ab_ane_platform *pf = ctx->pf;
    char pm[AB_ANE_MSG] = "";
    const char *stage = "MIL generation";
    const ane_kernel *k = e->kernel;
    int64_t S = e->S, in = e->in, out = e->out;
    int64_t len = k->mil(NULL, 0, S, in, out);
    char *mil = len > 0 ? malloc((size_t)len + 1) : NULL;
    int rc = len < 0 ? (int)len : (mil ? AB_OK : AB_ENOMEM);
    if (!rc) {
        k->mil(mil, len + 1, S, in, out);
        stage = "compile";
        ctx->st.compiles++;
        rc = pf->compile(mil, (size_t)len, &e->prog, pm, sizeof pm);
    }
    free(mil);
    if (!rc) { stage = "load"; rc = pf->load(e->prog, pm, sizeof pm); }
    if (!rc) {
        stage = "surface";
        rc = pf->surface_create(k->in_bytes(S, in, out), &e->in_surf, pm, sizeof pm);
        if (!rc) rc = pf->surface_create(k->out_bytes(S, in, out), &e->out_surf, pm, sizeof pm);
    }
    if (!rc) {
        e->scratch = malloc((size_t)k->scratch_floats(S, in, out) * sizeof(float));
        if (!e->scratch) { rc = AB_ENOMEM; snprintf(pm, sizeof pm, "out of memory"); }
    }
    e->code = rc;
    if (rc) {
        snprintf(e->msg, sizeof e->msg, "%s platform, %s of the %s program "
                 "(S=%lld, in=%lld, out=%lld) failed: %s", pf->name, stage, k->name, (long long)S,
                 (long long)in, (long long)out, pm[0] ? pm : ab_ane_strerror(rc));
        /* keep the entry as a remembered failure, without resources */
        if (e->prog) pf->unload(e->prog);
        if (e->in_surf) pf->surface_release(e->in_surf);
        if (e->out_surf) pf->surface_release(e->out_surf);
        free(e->scratch);
        e->prog = e->in_surf = e->out_surf = NULL;
        e->scratch = NULL;
    }
}

/* The cached program for a shape; NULL when the budget forbids a new one. */
static ane_entry *entry_get(ab_ane_ctx *ctx, const ane_kernel *kernel, int64_t S, int64_t in, int64_t out) {
    for (int64_t i = 0; i < ctx->n; i++) {
        ane_entry *e = &ctx->entries[i];
        if (e->kernel == kernel && e->S == S && e->in == in && e->out == out) return e;
    }
    if (ctx->st.compiles >= ctx->max_programs) return NULL;
    if (ctx->n == ctx->cap) {
        int64_t cap = ctx->cap ? 2 * ctx->cap : 8;
        ane_entry *n = realloc(ctx->entries, (size_t)cap * sizeof *n);
        if (!n) return NULL;
        ctx->entries = n;
        ctx->cap = cap;
    }
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

static int all_finite(const float *x, int64_t n) {
    int bad = 0;
    AB_SIMD_REDUCE(|, bad)
    for (int64_t i = 0; i < n; i++) bad |= !(fabsf(x[i]) <= 3.4028235e38f);
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

/* One tile on the ANE: AB_OK and *overflow set, or a platform error. */
static int tile_on_ane(ab_ane_ctx *ctx, ane_entry *e, float *dx, const float *dy, const float *W,
                       int64_t rows, int write_W, int k, int accumulate, int *overflow,
                       char *err, size_t errcap) {
    const ab_ane_platform *pf = ctx->pf;
    int64_t S = e->S, in = e->in, out = e->out, SP = S + in;
    float scale = ldexpf(1.0f, k);
    *overflow = 0;
    /* s * dy^T into the fp32 staging tile [out, S], padding columns zero */
    ab_ane_rows_to_channels(e->scratch, S, dy, rows, out, scale);
    if (rows < S)
        for (int64_t o = 0; o < out; o++) memset(e->scratch + o * S + rows, 0, (size_t)(S - rows) * sizeof(float));
    uint16_t *pin = pf->surface_lock(e->in_surf, 0);
    if (!pin) return ab_ane_fail(err, errcap, AB_ANE_ESURFACE, "%s platform: cannot lock the input surface", pf->name);
    for (int64_t o = 0; o < out; o++) {
        ab_ane_f32_to_f16(pin + o * SP, e->scratch + o * S, S);
        if (write_W) ab_ane_f32_to_f16(pin + o * SP + S, W + o * in, in);
    }
    pf->surface_unlock(e->in_surf, 0);
    char pm[AB_ANE_MSG] = "";
    int rc = pf->eval(e->prog, e->in_surf, e->out_surf, pm, sizeof pm);
    if (rc) return ab_ane_fail(err, errcap, rc, "%s platform, evaluate linear_backward_dx (S=%lld, in=%lld, "
                               "out=%lld): %s", pf->name, (long long)S, (long long)in, (long long)out,
                               pm[0] ? pm : ab_ane_strerror(rc));
    const uint16_t *pout = pf->surface_lock(e->out_surf, 1);
    if (!pout) return ab_ane_fail(err, errcap, AB_ANE_ESURFACE, "%s platform: cannot lock the output surface", pf->name);
    ab_ane_f16_to_f32(e->scratch, pout, in * S);
    pf->surface_unlock(e->out_surf, 1);
    if (!all_finite(e->scratch, in * S)) { *overflow = 1; return AB_OK; }
    ab_ane_channels_to_rows(dx, e->scratch, S, rows, in, ldexpf(1.0f, -k), accumulate);
    return AB_OK;
}

int ab_ane_linear_backward_dx(ab_ane_ctx *ctx, float *dx, const float *dy, const float *W,
                              int64_t N, int64_t in, int64_t out, int accumulate, int flags,
                              ab_ane_call_info *info, char *err, size_t errcap) {
    ab_ane_call_info local;
    if (!info) info = &local;
    memset(info, 0, sizeof *info);
    if (err && errcap) err[0] = '\0';
    if (!ctx || !dx || !dy || !W) return ab_ane_fail(err, errcap, AB_ENULL, "a required pointer is NULL");
    if (N < 0 || in < 0 || out < 0) return ab_ane_fail(err, errcap, AB_EINVAL, "negative size");
    if (N == 0 || in == 0 || out == 0)       /* nothing for the ANE: the CPU kernel's edge cases */
        return ab_linear_backward_dx(dx, dy, W, N, in, out, accumulate);
    if (in > INT32_MAX / 2 || out > INT32_MAX / 2 || N > ((int64_t)1 << 40))
        return ab_ane_fail(err, errcap, AB_ETOOBIG, "dimension too large for an ANE tensor");
    int strict = (flags & AB_ANE_STRICT) != 0;
    pthread_mutex_lock(&ctx->mu);
    int scaling = ctx->loss_scaling && !(flags & AB_ANE_NO_LOSS_SCALE);
    int64_t S = ctx->tile_rows;
    if (N < S) S = (N + AB_ANE_ROW_ALIGN - 1) / AB_ANE_ROW_ALIGN * AB_ANE_ROW_ALIGN;
    if (S > ctx->tile_rows) S = ctx->tile_rows;
    int64_t tiles = (N + S - 1) / S;
    info->tiles = tiles;
    ctx->st.calls++;

    int rc = AB_OK, reason = AB_ANE_FB_NONE;
    ane_entry *e = entry_get(ctx, &K_LINEAR_DX, S, in, out);
    if (!e) {
        reason = AB_ANE_FB_BUDGET;
    } else if (e->code) {
        snprintf(ctx->last_error, sizeof ctx->last_error, "%s", e->msg);
        if (strict) rc = ab_ane_fail(err, errcap, e->code, "%s", e->msg);
        else reason = AB_ANE_FB_ERROR;
    } else {
        int finite;
        /* fp16 holds |x| < 65520; NaN/inf or larger weights cannot go there.
         * Weights are not loss-scaled: if even the largest is below 2^-10,
         * most of them would land in fp16's subnormal range (< 6.1e-5) and
         * lose their precision, so such a matrix stays on the CPU too. */
        float wmax = max_abs(W, in * out, &finite);
        if (!finite || wmax >= 65520.0f || (wmax > 0.0f && wmax < 0x1p-10f)) reason = AB_ANE_FB_RANGE;
    }
    int W_written = 0, got_scale = 0, failed = AB_OK;
    for (int64_t t = 0; t < tiles && rc == AB_OK; t++) {
        int64_t r0 = t * S, rows = N - r0 < S ? N - r0 : S;
        float *dxt = dx + r0 * in;
        const float *dyt = dy + r0 * out;
        int tile_reason = reason;
        if (!tile_reason) {
            int finite;
            float m = max_abs(dyt, rows * out, &finite);
            if (!finite) tile_reason = AB_ANE_FB_RANGE;
            else {
                int k = scaling ? scale_exponent(m) : 0;
                int overflow;
                char pm[AB_ANE_MSG] = "";
                int trc = tile_on_ane(ctx, e, dxt, dyt, W, rows, !W_written, k, accumulate,
                                      &overflow, pm, sizeof pm);
                W_written = 1;
                if (trc) {
                    /* This and the remaining tiles go to the CPU either way, so
                     * dx is never left half-updated; strict calls then report. */
                    if (strict && !failed) failed = ab_ane_fail(err, errcap, trc, "%s", pm);
                    tile_reason = AB_ANE_FB_ERROR;
                    reason = AB_ANE_FB_ERROR;        /* do not retry the platform this call */
                    snprintf(ctx->last_error, sizeof ctx->last_error, "%s", pm);
                } else if (overflow) {
                    tile_reason = AB_ANE_FB_OVERFLOW;
                } else {
                    if (!got_scale) { info->scale_log2 = k; got_scale = 1; }
                    ctx->st.tiles_ane++;
                }
            }
        }
        if (tile_reason) {
            note_fallback(ctx, info, tile_reason);
            info->tiles_cpu++;
            ctx->st.tiles_cpu++;
            rc = ab_linear_backward_dx(dxt, dyt, W, rows, in, out, accumulate);
        }
    }
    pthread_mutex_unlock(&ctx->mu);
    return rc ? rc : failed;
}

int ab_ane_run_mil(ab_ane_ctx *ctx, const char *mil, const void *in, size_t in_bytes,
                   void *out, size_t out_bytes, char *err, size_t errcap) {
    if (err && errcap) err[0] = '\0';
    if (!ctx || !mil || (!in && in_bytes) || (!out && out_bytes))
        return ab_ane_fail(err, errcap, AB_ENULL, "a required pointer is NULL");
    const ab_ane_platform *pf = ctx->pf;
    void *prog = NULL, *si = NULL, *so = NULL;
    char pm[AB_ANE_MSG] = "";
    const char *stage = "compile";
    int rc;
    pthread_mutex_lock(&ctx->mu);
    if (ctx->st.compiles >= ctx->max_programs) {
        pthread_mutex_unlock(&ctx->mu);
        return ab_ane_fail(err, errcap, AB_ANE_ECOMPILE, "the compile budget of %lld programs is spent",
                           (long long)ctx->max_programs);
    }
    ctx->st.compiles++;
    rc = pf->compile(mil, strlen(mil), &prog, pm, sizeof pm);
    if (!rc) { stage = "load"; rc = pf->load(prog, pm, sizeof pm); }
    if (!rc) { stage = "surface"; rc = pf->surface_create(in_bytes, &si, pm, sizeof pm); }
    if (!rc) rc = pf->surface_create(out_bytes, &so, pm, sizeof pm);
    if (!rc) {
        void *p = pf->surface_lock(si, 0);
        if (!p) rc = ab_ane_fail(pm, sizeof pm, AB_ANE_ESURFACE, "cannot lock the input surface");
        else { if (in_bytes) memcpy(p, in, in_bytes); pf->surface_unlock(si, 0); }
    }
    if (!rc) { stage = "evaluate"; rc = pf->eval(prog, si, so, pm, sizeof pm); }
    if (!rc) {
        void *p = pf->surface_lock(so, 1);
        if (!p) rc = ab_ane_fail(pm, sizeof pm, AB_ANE_ESURFACE, "cannot lock the output surface");
        else { if (out_bytes) memcpy(out, p, out_bytes); pf->surface_unlock(so, 1); }
    }
    if (prog) pf->unload(prog);
    if (si) pf->surface_release(si);
    if (so) pf->surface_release(so);
    if (rc) {
        ab_ane_fail(err, errcap, rc, "%s platform, %s: %s", pf->name, stage, pm[0] ? pm : ab_ane_strerror(rc));
        snprintf(ctx->last_error, sizeof ctx->last_error, "%s", err && errcap ? err : "");
    }
    pthread_mutex_unlock(&ctx->mu);
    return rc;
}

/* dx for a 32 x 32 x 32 problem of small integers: every product and sum is
 * exact in fp16, so the platform must reproduce the CPU result bit for bit.
 * The program stays cached for later calls of the same shape. */
int ab_ane_self_test(ab_ane_ctx *ctx, char *err, size_t errcap) {
    enum { n = 32 };
    float dy[n * n], W[n * n], dx[n * n], want[n * n];
    if (err && errcap) err[0] = '\0';
    AB_NONNULL(ctx);
    for (int i = 0; i < n * n; i++) {
        dy[i] = (float)((i * 7) % 5 - 2);
        W[i] = (float)((i * 11) % 5 - 2);
    }
    int rc = ab_linear_backward_dx(want, dy, W, n, n, n, 0);
    if (rc) return ab_ane_fail(err, errcap, rc, "self-test: CPU reference failed");
    ab_ane_call_info info;
    char why[AB_ANE_MSG] = "";
    rc = ab_ane_linear_backward_dx(ctx, dx, dy, W, n, n, n, 0, AB_ANE_STRICT, &info, why, sizeof why);
    if (rc) return ab_ane_fail(err, errcap, rc, "%s platform failed its self-test: %s", ctx->pf->name, why);
    if (info.tiles_cpu) return ab_ane_fail(err, errcap, AB_ANE_EEVAL, "%s platform failed its self-test: "
                                           "the test program fell back to the CPU", ctx->pf->name);
    for (int i = 0; i < n * n; i++)
        if (dx[i] != want[i])
            return ab_ane_fail(err, errcap, AB_ANE_EEVAL, "%s platform failed its self-test: dx[%d] = %g, "
                               "expected %g", ctx->pf->name, i, (double)dx[i], (double)want[i]);
    return AB_OK;
}
