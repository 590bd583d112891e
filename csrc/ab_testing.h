/* ab_testing.h — test hooks: declared for the cffi module (its cdef reads
 * between the markers below, after anebackward.h's), not part of the public
 * C API and not installed for C users. */
#ifndef AB_TESTING_H
#define AB_TESTING_H

#include "anebackward.h"

#ifdef __cplusplus
extern "C" {
#endif

/* CDEF BEGIN */

/* Test hook of the emulated ANE platform: the next "compile", "load" or
 * "evaluate" fails with a platform error (NULL: clear). Process-wide. */
int ab_ane_emulated_fail_next(const char *stage);

/* Bench hook of the worker pool (csrc/threads.c): enable 1 resets and
 * starts (2 resumes without reset, 0 stops) counting the wall time spent in
 * parallel regions of at least two tasks that may use two threads or more
 * (at 1 thread: the work that more threads could share) and, in
 * bound_ns[4], that time as it would be on 2, 4, 8, 16 threads if every task
 * of a region took the same time (its task count and worker cap kept);
 * every call first reports the counts so far (NULLs allowed). Process-wide. */
int ab_pool_stats(int enable, int64_t *parallel_ns, int64_t *regions, int64_t *bound_ns);

/* CDEF END */

#ifdef __cplusplus
}
#endif
#endif /* AB_TESTING_H */
