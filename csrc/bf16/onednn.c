/* onednn.c — oneDNN's matmul primitive, loaded at run time.
 *
 * libdnnl is dlopen()ed (never linked), so the package builds, installs and
 * runs without it; ab_bf16_init names the file (Python passes the copy of
 * the `onednn-cpu-gomp` wheel), or NULL for the default soname libdnnl.so.3.
 * Only the handful of oneDNN C API functions below are used; their
 * prototypes and enum values are those of the oneDNN 3.x C API
 * (oneapi/dnnl/dnnl.h), declared here with opaque handles.
 *
 * One product C[M,N] (+)= op(A)[M,K] · op(B)[K,N] of row-major bf16 A, B
 * into fp32 C is one matmul primitive: src = op(A), weights = op(B), dst = C,
 * transposes and leading dimensions passed as strides (no copies);
 * accumulation (beta = 1) is a `sum` post-op. Primitives are cached per
 * (shape, strides, transposes, beta, thread count) in a mutex-guarded table
 * and never destroyed; the scratchpad is the caller's (user scratchpad mode),
 * a per-thread buffer, and each thread has its own stream, so any thread may
 * run any cached primitive at the same time as others.
 *
 * Threads: oneDNN (the GNU OpenMP build) runs omp_get_max_threads() threads
 * of the calling thread. ab_onednn_matmul sets that count (per thread, with
 * omp_set_num_threads from the libgomp that libdnnl loaded) before creating
 * or running a primitive: 1 inside the package's pool (csrc/bf16/gemm_bf16.c
 * tiles the product), n when oneDNN threads the whole product itself. */
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include "bf16_internal.h"

/* ---- the oneDNN C API subset (oneDNN 3.x) ---- */
typedef void *dnnl_handle;               /* engine, stream, memory, primitive, pd, attr, post_ops, md */
typedef int64_t dnnl_dims_t[12];         /* DNNL_MAX_NDIMS */
typedef struct { int arg; dnnl_handle memory; } dnnl_exec_arg_t;
typedef struct { int major, minor, patch; const char *hash; unsigned cpu_runtime, gpu_runtime; }
    dnnl_version_t;
enum { DNNL_SUCCESS = 0 };
enum { DNNL_CPU_ENGINE = 1 };                                /* dnnl_cpu */
enum { DNNL_STREAM_IN_ORDER = 1 };                           /* dnnl_stream_default_flags */
enum { DNNL_DT_UNDEF = 0, DNNL_DT_BF16 = 2, DNNL_DT_F32 = 3, DNNL_DT_U8 = 6 };
enum { DNNL_SCRATCHPAD_USER = 1 };
enum { DNNL_QUERY_IMPL_INFO_STR = 8, DNNL_QUERY_SCRATCHPAD_MD = 136 };
enum { DNNL_ARG_SRC = 1, DNNL_ARG_DST = 17, DNNL_ARG_WEIGHTS = 33, DNNL_ARG_SCRATCHPAD = 80 };
/* dnnl_cpu_isa_t: bit sets, each ISA includes the bits of those below it */
enum { DNNL_ISA_AVX2 = 0x7, DNNL_ISA_AVX512_CORE = 0x27, DNNL_ISA_AVX512_CORE_BF16 = 0xe7,
       DNNL_ISA_AVX512_CORE_AMX = 0xfef };

static struct {
    int (*engine_create)(dnnl_handle *, int, size_t);
    int (*stream_create)(dnnl_handle *, dnnl_handle, unsigned);
    int (*md_create_with_strides)(dnnl_handle *, int, const dnnl_dims_t, int, const dnnl_dims_t);
    int (*md_destroy)(dnnl_handle);
    size_t (*md_get_size)(dnnl_handle);
    int (*attr_create)(dnnl_handle *);
    int (*attr_destroy)(dnnl_handle);
    int (*attr_set_scratchpad_mode)(dnnl_handle, int);
    int (*attr_set_post_ops)(dnnl_handle, dnnl_handle);
    int (*post_ops_create)(dnnl_handle *);
    int (*post_ops_destroy)(dnnl_handle);
    int (*post_ops_append_sum)(dnnl_handle, float, int32_t, int);
    int (*matmul_pd_create)(dnnl_handle *, dnnl_handle, dnnl_handle, dnnl_handle, dnnl_handle,
                            dnnl_handle, dnnl_handle);
    int (*pd_query)(dnnl_handle, int, int, void *);
    dnnl_handle (*pd_query_md)(dnnl_handle, int, int);
    int (*pd_destroy)(dnnl_handle);
    int (*primitive_create)(dnnl_handle *, dnnl_handle);
    int (*primitive_execute)(dnnl_handle, dnnl_handle, int, const dnnl_exec_arg_t *);
    int (*memory_create)(dnnl_handle *, dnnl_handle, dnnl_handle, void *);
    int (*memory_destroy)(dnnl_handle);
    int (*stream_wait)(dnnl_handle);
    int (*get_effective_cpu_isa)(void);
    const dnnl_version_t *(*version)(void);
    void (*omp_set_num_threads)(int);
} D;

static pthread_mutex_t init_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_int init_state;       /* 0: not tried, 1: loaded, -1: failed (set once) */
static char init_msg[512];          /* why not, or what was loaded */
static dnnl_handle engine;
static int isa;
static char impl_seen[128];         /* implementation of the last created primitive */

static int load_symbols(void *h, void *gomp) {
#define SYM(field, name) do { *(void **)&D.field = dlsym(h, name); \
        if (!D.field) { snprintf(init_msg, sizeof init_msg, "%s: symbol %s missing", \
                                 "libdnnl", name); return -1; } } while (0)
    SYM(engine_create, "dnnl_engine_create");
    SYM(stream_create, "dnnl_stream_create");
    SYM(md_create_with_strides, "dnnl_memory_desc_create_with_strides");
    SYM(md_destroy, "dnnl_memory_desc_destroy");
    SYM(md_get_size, "dnnl_memory_desc_get_size");
    SYM(attr_create, "dnnl_primitive_attr_create");
    SYM(attr_destroy, "dnnl_primitive_attr_destroy");
    SYM(attr_set_scratchpad_mode, "dnnl_primitive_attr_set_scratchpad_mode");
    SYM(attr_set_post_ops, "dnnl_primitive_attr_set_post_ops");
    SYM(post_ops_create, "dnnl_post_ops_create");
    SYM(post_ops_destroy, "dnnl_post_ops_destroy");
    SYM(post_ops_append_sum, "dnnl_post_ops_append_sum");
    SYM(matmul_pd_create, "dnnl_matmul_primitive_desc_create");
    SYM(pd_query, "dnnl_primitive_desc_query");
    SYM(pd_query_md, "dnnl_primitive_desc_query_md");
    SYM(pd_destroy, "dnnl_primitive_desc_destroy");
    SYM(primitive_create, "dnnl_primitive_create");
    SYM(primitive_execute, "dnnl_primitive_execute");
    SYM(memory_create, "dnnl_memory_create");
    SYM(memory_destroy, "dnnl_memory_destroy");
    SYM(stream_wait, "dnnl_stream_wait");
    SYM(get_effective_cpu_isa, "dnnl_get_effective_cpu_isa");
    SYM(version, "dnnl_version");
    h = gomp;
    SYM(omp_set_num_threads, "omp_set_num_threads");
#undef SYM
    return 0;
}

static const char *isa_name(int v) {
    switch (v) {
    case DNNL_ISA_AVX512_CORE_AMX: return "avx512_core_amx";
    case 0x1fef: return "avx512_core_amx_fp16";
    case 0x1ef: return "avx512_core_fp16";
    case DNNL_ISA_AVX512_CORE_BF16: return "avx512_core_bf16";
    case 0x67: return "avx512_core_vnni";
    case DNNL_ISA_AVX512_CORE: return "avx512_core";
    case 0x1f: return "avx2_vnni_2";
    case 0xf: return "avx2_vnni";
    case DNNL_ISA_AVX2: return "avx2";
    case 0x3: return "avx";
    case 0x1: return "sse41";
    default: return "unknown";
    }
}

int ab_onednn_init(const char *path) {
    pthread_mutex_lock(&init_lock);
    if (init_state == 0) {
        const char *file = path && *path ? path : "libdnnl.so.3";
        void *h = dlopen(file, RTLD_NOW | RTLD_LOCAL);
        void *gomp = h ? dlopen("libgomp.so.1", RTLD_NOW | RTLD_LOCAL) : NULL;
        if (!h || !gomp) {
            const char *e = dlerror();
            snprintf(init_msg, sizeof init_msg, "cannot load %s: %s",
                     h ? "libgomp.so.1" : file, e ? e : "unknown error");
            init_state = -1;
        } else if (load_symbols(h, gomp) != 0) {
            init_state = -1;
        } else if (D.engine_create(&engine, DNNL_CPU_ENGINE, 0) != DNNL_SUCCESS) {
            snprintf(init_msg, sizeof init_msg, "%s: dnnl_engine_create(cpu) failed", file);
            init_state = -1;
        } else {
            const dnnl_version_t *v = D.version();
            isa = D.get_effective_cpu_isa();
            snprintf(init_msg, sizeof init_msg, "oneDNN %d.%d.%d, isa %s", v->major, v->minor,
                     v->patch, isa_name(isa));
            init_state = 1;
        }
    }
    int rc = init_state == 1 ? AB_OK : AB_EUNAVAILABLE;
    pthread_mutex_unlock(&init_lock);
    return rc;
}

int ab_onednn_state(void) { return atomic_load(&init_state); }

const char *ab_onednn_message(void) { return init_msg; }

int ab_onednn_has_bf16(void) {
    return ab_onednn_state() == 1
           && (isa & DNNL_ISA_AVX512_CORE_BF16) == DNNL_ISA_AVX512_CORE_BF16;
}

int ab_onednn_has_amx(void) {
    return ab_onednn_state() == 1
           && (isa & DNNL_ISA_AVX512_CORE_AMX) == DNNL_ISA_AVX512_CORE_AMX;
}

const char *ab_onednn_impl(void) { return impl_seen; }

/* ---- the primitive cache ---- */
typedef struct {
    int64_t M, N, K, lda, ldb, ldc;
    int transA, transB, accumulate, threads;
} mm_key;

typedef struct {
    mm_key key;
    dnnl_handle prim, md_a, md_b, md_c, md_s;   /* md_s: the scratchpad, bytes */
    size_t scratch_bytes;
} mm_entry;

#define CACHE_SLOTS 4096         /* open addressing; a full table stops caching */
static mm_entry *cache[CACHE_SLOTS];
static int cache_count;
static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;

static uint64_t key_hash(const mm_key *k) {
    const int64_t v[10] = {k->M, k->N, k->K, k->lda, k->ldb, k->ldc, k->transA, k->transB,
                           k->accumulate, k->threads};
    uint64_t h = 1469598103934665603ULL;
    for (int i = 0; i < 10; i++) { h ^= (uint64_t)v[i]; h *= 1099511628211ULL; }
    return h;
}

static int key_eq(const mm_key *a, const mm_key *b) {
    return a->M == b->M && a->N == b->N && a->K == b->K && a->lda == b->lda && a->ldb == b->ldb
           && a->ldc == b->ldc && a->transA == b->transA && a->transB == b->transB
           && a->accumulate == b->accumulate && a->threads == b->threads;
}

static mm_entry *create_entry(const mm_key *k) {
    mm_entry *e = calloc(1, sizeof *e);
    if (!e) return NULL;
    e->key = *k;
    dnnl_dims_t da = {k->M, k->K}, db = {k->K, k->N}, dc = {k->M, k->N};
    /* row-major A[M,lda] (or its transpose A[K,lda] read as [M,K]) as strides */
    dnnl_dims_t sa = {k->transA ? 1 : k->lda, k->transA ? k->lda : 1};
    dnnl_dims_t sb = {k->transB ? 1 : k->ldb, k->transB ? k->ldb : 1};
    dnnl_dims_t sc = {k->ldc, 1};
    dnnl_handle attr = NULL, po = NULL, pd = NULL;
    int ok = D.md_create_with_strides(&e->md_a, 2, da, DNNL_DT_BF16, sa) == DNNL_SUCCESS
             && D.md_create_with_strides(&e->md_b, 2, db, DNNL_DT_BF16, sb) == DNNL_SUCCESS
             && D.md_create_with_strides(&e->md_c, 2, dc, DNNL_DT_F32, sc) == DNNL_SUCCESS
             && D.attr_create(&attr) == DNNL_SUCCESS
             && D.attr_set_scratchpad_mode(attr, DNNL_SCRATCHPAD_USER) == DNNL_SUCCESS;
    if (ok && k->accumulate)
        ok = D.post_ops_create(&po) == DNNL_SUCCESS
             && D.post_ops_append_sum(po, 1.0f, 0, DNNL_DT_UNDEF) == DNNL_SUCCESS
             && D.attr_set_post_ops(attr, po) == DNNL_SUCCESS;
    ok = ok && D.matmul_pd_create(&pd, engine, e->md_a, e->md_b, NULL, e->md_c, attr)
                   == DNNL_SUCCESS;
    if (ok) {
        const char *impl = NULL;
        if (D.pd_query(pd, DNNL_QUERY_IMPL_INFO_STR, 0, &impl) == DNNL_SUCCESS && impl)
            snprintf(impl_seen, sizeof impl_seen, "%s", impl);
        dnnl_handle smd = D.pd_query_md(pd, DNNL_QUERY_SCRATCHPAD_MD, 0);
        e->scratch_bytes = smd ? D.md_get_size(smd) : 0;
        if (e->scratch_bytes) {
            dnnl_dims_t ds = {(int64_t)e->scratch_bytes}, ss = {1};
            ok = D.md_create_with_strides(&e->md_s, 1, ds, DNNL_DT_U8, ss) == DNNL_SUCCESS;
        }
        ok = ok && D.primitive_create(&e->prim, pd) == DNNL_SUCCESS;
    }
    if (pd) D.pd_destroy(pd);
    if (po) D.post_ops_destroy(po);
    if (attr) D.attr_destroy(attr);
    if (!ok) {
        if (e->md_a) D.md_destroy(e->md_a);
        if (e->md_b) D.md_destroy(e->md_b);
        if (e->md_c) D.md_destroy(e->md_c);
        if (e->md_s) D.md_destroy(e->md_s);
        free(e);
        return NULL;
    }
    return e;
}

/* The cached primitive for k, created (under the lock: creation is rare and
 * oneDNN's own creation is thread-safe anyway) on first use. */
static mm_entry *lookup(const mm_key *k) {
    const uint64_t h = key_hash(k);
    pthread_mutex_lock(&cache_lock);
    mm_entry *found = NULL;
    size_t slot = (size_t)(h % CACHE_SLOTS);
    for (int i = 0; i < CACHE_SLOTS; i++, slot = (slot + 1) % CACHE_SLOTS) {
        if (!cache[slot]) break;
        if (key_eq(&cache[slot]->key, k)) { found = cache[slot]; break; }
    }
    if (!found) {
        found = create_entry(k);
        /* keep it unless the table is nearly full (then it serves this call only) */
        if (found && cache_count < CACHE_SLOTS / 2 && !cache[slot]) {
            cache[slot] = found;
            cache_count++;
        } else if (found) {
            found = (mm_entry *)((uintptr_t)found | 1);   /* tag: free after use */
        }
    }
    pthread_mutex_unlock(&cache_lock);
    return found;
}

static void entry_free(mm_entry *e) {
    D.md_destroy(e->md_a); D.md_destroy(e->md_b); D.md_destroy(e->md_c);
    if (e->md_s) D.md_destroy(e->md_s);
    free(e);   /* the primitive itself: see below */
}

/* per-thread: stream, scratchpad, the OpenMP thread count last set */
static __thread dnnl_handle t_stream;
static __thread void *t_scratch;
static __thread size_t t_scratch_bytes;
static __thread int t_omp_threads;

int ab_onednn_matmul(int transA, int transB, int64_t M, int64_t N, int64_t K,
                     const uint16_t *A, int64_t lda, const uint16_t *B, int64_t ldb,
                     int accumulate, float *C, int64_t ldc, int threads) {
    if (ab_onednn_state() != 1) return AB_FAIL(AB_EUNAVAILABLE, NULL);
    if (threads < 1) threads = 1;
    if (t_omp_threads != threads) {      /* before creation: oneDNN plans for it */
        D.omp_set_num_threads(threads);
        t_omp_threads = threads;
    }
    if (!t_stream && D.stream_create(&t_stream, engine, DNNL_STREAM_IN_ORDER) != DNNL_SUCCESS) {
        t_stream = NULL;
        return AB_FAIL(AB_EUNAVAILABLE, NULL);
    }
    const mm_key k = {M, N, K, lda, ldb, ldc, transA != 0, transB != 0, accumulate != 0, threads};
    mm_entry *e = lookup(&k);
    if (!e) return AB_FAIL(AB_EUNAVAILABLE, NULL);
    const int transient = (int)((uintptr_t)e & 1);
    e = (mm_entry *)((uintptr_t)e & ~(uintptr_t)1);
    int rc = AB_OK;
    if (e->scratch_bytes > t_scratch_bytes) {
        free(t_scratch);
        t_scratch = malloc(e->scratch_bytes);
        t_scratch_bytes = t_scratch ? e->scratch_bytes : 0;
        if (!t_scratch) rc = AB_FAIL(AB_ENOMEM, NULL);
    }
    dnnl_handle ma = NULL, mb = NULL, mc = NULL, ms = NULL;
    if (rc == AB_OK) {
        int ok = D.memory_create(&ma, e->md_a, engine, (void *)A) == DNNL_SUCCESS
                 && D.memory_create(&mb, e->md_b, engine, (void *)B) == DNNL_SUCCESS
                 && D.memory_create(&mc, e->md_c, engine, C) == DNNL_SUCCESS;
        dnnl_exec_arg_t args[4] = {{DNNL_ARG_SRC, ma}, {DNNL_ARG_WEIGHTS, mb},
                                   {DNNL_ARG_DST, mc}, {DNNL_ARG_SCRATCHPAD, NULL}};
        int nargs = 3;
        if (ok && e->scratch_bytes) {
            ok = D.memory_create(&ms, e->md_s, engine, t_scratch) == DNNL_SUCCESS;
            args[3].memory = ms;
            nargs = 4;
        }
        ok = ok && D.primitive_execute(e->prim, t_stream, nargs, args) == DNNL_SUCCESS
             && D.stream_wait(t_stream) == DNNL_SUCCESS;
        if (!ok) rc = AB_FAIL(AB_EUNAVAILABLE, NULL);
    }
    if (ma) D.memory_destroy(ma);
    if (mb) D.memory_destroy(mb);
    if (mc) D.memory_destroy(mc);
    if (ms) D.memory_destroy(ms);
    if (transient) entry_free(e);   /* its primitive leaks: only past 2048 shapes */
    return rc;
}
