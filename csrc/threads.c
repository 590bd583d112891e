/* threads.c — the package's one worker pool and its one thread setting.
 *
 * ab_parallel_for(n_tasks, ...) runs fn(ctx, task, worker) for every task in
 * [0, n_tasks) on up to n = ab_get_num_threads() threads: the caller plus
 * n - 1 pool threads created on first use. Kernels split their work into
 * tasks whose boundaries depend only on the problem size, never on n, and
 * combine per-task partial results in task order, so every result is
 * bit-identical for every thread count. Which thread runs which task is
 * free (tasks are handed out by an atomic counter); `worker` (< the worker
 * count asked for) only selects a per-worker scratch slice.
 *
 * Idle pool threads sleep on a condition variable (they spin only briefly
 * after a job, so back-to-back kernels start fast without burning a core).
 * The caller takes tasks too and waits only for threads that joined before
 * it had taken the last task: on a busy machine a descheduled worker costs
 * nothing, so n threads are never much slower than one.
 * One parallel region runs at a time: a caller that finds the pool busy
 * (another Python thread, or a task of a running region) runs its tasks
 * itself, serially, with the same results.
 *
 * The setting covers the BLAS too: OpenBLAS is kept at 1 thread and every
 * sgemm is tiled over this pool (csrc/gemm.c), so the package never runs
 * more than n threads and no second pool spins beside this one. */
#include <errno.h>
#include <pthread.h>
#include <time.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>
#include "ab_internal.h"

#define SPIN_ROUNDS 1000    /* a few microseconds of polling before a worker sleeps */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;   /* the fields below */
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;     /* a job was posted */
static pthread_cond_t done = PTHREAD_COND_INITIALIZER;     /* pool threads finished it */
static pthread_mutex_t region = PTHREAD_MUTEX_INITIALIZER; /* held by the running region */

static atomic_int setting;    /* the thread setting; 0 until first read */
static int n_started;         /* pool threads created (ids 1..n_started) */
static int atfork_registered;

/* the posted job */
static ab_task_fn job_fn;
static void *job_ctx;
static int64_t job_tasks;
static int job_workers;              /* caller + pool threads 1..job_workers-1 */
static int job_open;                 /* pool threads may still join */
static atomic_int job_active;        /* pool threads that joined and are not done */
static atomic_uint_fast64_t generation;
static atomic_int_fast64_t next_task;
static uint64_t born_at[AB_MAX_THREADS];  /* generation when thread id was created */

/* ab_pool_stats (a test/bench hook): wall time inside regions of >= 2 tasks */
static atomic_int stats_on;
static atomic_int_fast64_t stats_ns, stats_regions, stats_bound_ns[4];   /* n = 2, 4, 8, 16 */

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int ab_pool_stats(int enable, int64_t *parallel_ns, int64_t *regions, int64_t *bound_ns) {
    if (parallel_ns) *parallel_ns = atomic_load(&stats_ns);
    if (regions) *regions = atomic_load(&stats_regions);
    for (int i = 0; i < 4 && bound_ns; i++) bound_ns[i] = atomic_load(&stats_bound_ns[i]);
    if (enable == 1) {
        atomic_store(&stats_ns, 0); atomic_store(&stats_regions, 0);
        for (int i = 0; i < 4; i++) atomic_store(&stats_bound_ns[i], 0);
    }
    atomic_store(&stats_on, enable != 0);
    return AB_OK;
}  /* generation when thread id was created */

static int env_threads(void) {
    const char *s = getenv("ANEBACKWARD_NUM_THREADS");
    if (s && *s) {
        char *end;
        errno = 0;
        long n = strtol(s, &end, 10);
        if (!errno && *end == '\0' && n >= 1 && n <= AB_MAX_THREADS) return (int)n;
    }
    return 0;
}

/* The default: ANEBACKWARD_NUM_THREADS, else the BLAS's own default (which
 * honours OPENBLAS_NUM_THREADS), else the online cores. Called under lock. */
static int current_setting(void) {
    if (setting == 0) {
        int n = env_threads();
        if (n == 0) n = ab_blas_get_num_threads();
        if (n <= 0) {
            long c = sysconf(_SC_NPROCESSORS_ONLN);
            n = c > 0 ? (int)c : 1;
        }
        setting = n < AB_MAX_THREADS ? n : AB_MAX_THREADS;
        ab_blas_set_num_threads(1);
    }
    return setting;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void run_tasks(int worker) {
    ab_task_fn fn = job_fn;
    void *ctx = job_ctx;
    const int64_t n = job_tasks;
    for (int64_t t; (t = atomic_fetch_add(&next_task, 1)) < n;) fn(ctx, t, worker);
}

static void *pool_main(void *arg) {
    const int id = (int)(intptr_t)arg;
    pthread_mutex_lock(&lock);
    uint64_t seen = born_at[id];   /* a job posted after its creation is for it too */
    pthread_mutex_unlock(&lock);
    for (;;) {
        /* brief poll first: the next kernel usually follows within microseconds */
        for (int i = 0; i < SPIN_ROUNDS && atomic_load(&generation) == seen; i++) cpu_relax();
        pthread_mutex_lock(&lock);
        while (atomic_load(&generation) == seen) pthread_cond_wait(&wake, &lock);
        seen = atomic_load(&generation);
        /* a thread that wakes after the caller took the last task stays out:
         * nobody ever waits for a thread the OS did not schedule in time */
        int mine = id < job_workers && job_open;
        if (mine) job_active++;
        pthread_mutex_unlock(&lock);
        if (!mine) continue;
        run_tasks(id);
        pthread_mutex_lock(&lock);
        if (--job_active == 0 && !job_open) pthread_cond_signal(&done);
        pthread_mutex_unlock(&lock);
    }
    return NULL;
}

/* After fork() only the forking thread exists: forget the pool threads. */
static void after_fork_child(void) {
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t c = PTHREAD_COND_INITIALIZER;
    lock = m; region = m; wake = c; done = c;
    n_started = 0;
}

/* Start pool threads up to id want-1; returns how many workers are usable. */
static int ensure_started(int want) {
    if (!atfork_registered) {
        pthread_atfork(NULL, NULL, after_fork_child);
        atfork_registered = 1;
    }
    while (n_started < want - 1) {
        pthread_t t;
        pthread_attr_t attr;
        born_at[n_started + 1] = atomic_load(&generation);
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&t, &attr, pool_main, (void *)(intptr_t)(n_started + 1));
        pthread_attr_destroy(&attr);
        if (rc != 0) break;   /* fewer threads: still correct, just slower */
        n_started++;
    }
    return n_started + 1 < want ? n_started + 1 : want;
}

static int parallel_for(int64_t n_tasks, int max_workers, ab_task_fn fn, void *ctx);

int ab_parallel_for(int64_t n_tasks, int max_workers, ab_task_fn fn, void *ctx) {
    if (n_tasks < 2 || max_workers < 2 || !atomic_load(&stats_on))
        return parallel_for(n_tasks, max_workers, fn, ctx);
    const int64_t t0 = now_ns();
    int n = parallel_for(n_tasks, max_workers, fn, ctx);
    const int64_t dt = now_ns() - t0;
    atomic_fetch_add(&stats_ns, dt);
    atomic_fetch_add(&stats_regions, 1);
    /* the same region on k threads if its tasks were equal: dt ceil(T/k)/T */
    for (int i = 0, k = 2; i < 4; i++, k *= 2) {
        const int64_t kk = k < max_workers ? k : max_workers;
        atomic_fetch_add(&stats_bound_ns[i],
                         (int64_t)((double)dt * (double)ab_div_up(n_tasks, kk) / (double)n_tasks));
    }
    return n;
}

static int parallel_for(int64_t n_tasks, int max_workers, ab_task_fn fn, void *ctx) {
    if (n_tasks <= 0) return 0;
    pthread_mutex_lock(&lock);
    int n = current_setting();
    pthread_mutex_unlock(&lock);
    if (max_workers < n) n = max_workers;
    if (n_tasks < n) n = (int)n_tasks;
    if (n <= 1 || pthread_mutex_trylock(&region) != 0) {
        for (int64_t t = 0; t < n_tasks; t++) fn(ctx, t, 0);
        return 1;
    }
    pthread_mutex_lock(&lock);
    n = ensure_started(n);
    job_fn = fn; job_ctx = ctx; job_tasks = n_tasks;
    job_workers = n; job_open = 1; job_active = 0;
    atomic_store(&next_task, 0);
    atomic_fetch_add(&generation, 1);
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&lock);

    run_tasks(0);

    pthread_mutex_lock(&lock);
    job_open = 0;                 /* every task is taken: latecomers stay out */
    pthread_mutex_unlock(&lock);
    for (int i = 0; i < SPIN_ROUNDS && atomic_load(&job_active) > 0; i++) cpu_relax();
    pthread_mutex_lock(&lock);
    while (atomic_load(&job_active) > 0) pthread_cond_wait(&done, &lock);
    pthread_mutex_unlock(&lock);
    pthread_mutex_unlock(&region);
    return n;
}

/* The one thread setting (the BLAS stays single-threaded under it). */
int ab_set_num_threads(int n) {
    AB_REQUIRE(n >= 1 && n <= AB_MAX_THREADS, AB_EINVAL);
    pthread_mutex_lock(&lock);
    setting = n;
    ab_blas_set_num_threads(1);
    pthread_mutex_unlock(&lock);
    return AB_OK;
}

/* The BLAS is switched to 1 thread with the first read of the setting. */
void ab_threads_init(void) {
    if (atomic_load(&setting) == 0) (void)ab_get_num_threads();
}

int ab_get_num_threads(void) {
    pthread_mutex_lock(&lock);
    int n = current_setting();
    pthread_mutex_unlock(&lock);
    return n;
}
