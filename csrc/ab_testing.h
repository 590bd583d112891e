/* ab_testing.h — test and benchmark hooks: declared for the cffi module (its
 * cdef reads between the markers below, after anebackward.h's), not part of
 * the public C API, not exported by libanebackward and not installed for C
 * users. */
#ifndef AB_TESTING_H
#define AB_TESTING_H

#include "anebackward.h"

#ifdef __cplusplus
extern "C" {
#endif

/* CDEF BEGIN */

/* Minimum tile edge of the pool-tiled bf16 product (default 128; >= 16):
 * for benchmarks of the tiling. */
int ab_bf16_testing_tile(int64_t t);

/* Test hooks of the emulated ANE platform (process-wide):
 * fail_next: the next `times` "compile", "load" or "evaluate" calls fail with
 *   a platform error whose message is msg_bytes long (0: a short one);
 *   stage NULL clears.
 * saturate: fp16 results clamp at +-65504 instead of becoming inf (as the
 *   Neural Engine may do).
 * workdir: compile into <root>/<hash of the MIL>/ as the darwin platform does
 *   in the temp directory, removed at unload if this program created it
 *   (NULL: no directories, the default). */
int ab_ane_emulated_fail_next(const char *stage, int times, int64_t msg_bytes);
int ab_ane_emulated_saturate(int on);
int ab_ane_emulated_workdir(const char *root);
/* on: every platform (the emulated one too) runs ab_ane_self_test when a
 * context opens, as the darwin platform always does. */
int ab_ane_testing_self_test_on_open(int on);
/* The process-wide compile count the budget is checked against. */
int ab_ane_testing_set_process_compiles(int64_t n);
/* Handshake of asynchronous dx jobs, so that tests of the overlap do not
 * depend on the scheduler: a job submitted while the worker is idle has
 * started before its submit returns, and every job is held running until
 * ab_ane_job_wait is called for it (its t_end_ns is then). Each wait adds
 * (submitted, started, ended, waited) on ab_ane_clock_ns and the CPU time
 * of the thread that submitted at submit and of the one that waits at wait
 * (CLOCK_THREAD_CPUTIME_ID), in ns, to a log of up to 256 jobs, which
 * job_log reads (*n = entries; out: 6 * cap) and turning the hook on or off
 * clears. Holds time out after 10 s. */
int ab_ane_testing_handshake(int on);
/* The overlap hook, for the model's ANE backward: while on, each CPU job
 * (ab_ane_submit_fn) begins, then holds until a synchronous dx call
 * (ab_ane_linear_backward_dx) has begun after the job was queued (or the
 * job is waited for), and each such dx call holds at its end until every
 * CPU job queued before it began has begun. So a job and the first dx call
 * queued after it run at the same time whenever the caller lets them (a
 * caller that waits for the job first gets no overlap, and the log shows
 * it); holds time out after 10 s. overlap_log: (seq, kind, id) per event,
 * kind 0/1 = dx call begin/end, 2/3/4 = CPU job submitted/begun/ended, id
 * numbering dx calls and CPU jobs from 0 (out: 3 * cap; up to 4096 events).
 * Turning the hook on or off clears the log. */
int ab_ane_testing_overlap(int on);
int ab_ane_testing_overlap_log(int64_t *out, int64_t cap, int64_t *n);
int ab_ane_testing_job_log(int64_t *out, int64_t cap, int64_t *n);
/* The working directory of the cached program of this shape ("" if none). */
int ab_ane_testing_program_dir(ab_ane_ctx *ctx, int64_t S, int64_t in, int64_t out,
                               char *buf, size_t cap);

/* Bench hook of the worker pool (csrc/threads.c): enable 1 resets and
 * starts (2 resumes without reset, 0 stops) counting the wall time spent in
 * parallel regions of at least two tasks that may use two threads or more
 * (at 1 thread: the work that more threads could share) and, in
 * bound_ns[4], that time as it would be on 2, 4, 8, 16 threads if every task
 * of a region took the same time (its task count and worker cap kept);
 * every call first reports the counts so far (NULLs allowed). Process-wide. */
int ab_pool_stats(int enable, int64_t *parallel_ns, int64_t *regions, int64_t *bound_ns);

/* OpenBLAS's own thread count, set directly: only the benchmark's raw-sgemm
 * contender uses it (the package's one setting is ab_set_num_threads). */
void ab_blas_set_num_threads(int n);

/* Pieces of the ANE path, reached directly by the tests. */
/* MIL text of the dynamic-weight dx program; snprintf semantics: *len = the
 * length needed (without NUL), at most cap bytes written. */
int ab_ane_mil_linear_dx(char *buf, int64_t cap, int64_t S, int64_t in, int64_t out,
                  int64_t *len);
/* fp32 <-> fp16 (IEEE binary16, round to nearest even; subnormals, inf and
 * NaN kept). The default functions use F16C/NEON when the CPU has it.
 * n < 0: AB_EINVAL; NULL with n > 0: AB_ENULL. */
int ab_ane_f32_to_f16(uint16_t *dst, const float *src, int64_t n);
int ab_ane_f16_to_f32(float *dst, const uint16_t *src, int64_t n);
int ab_ane_f32_to_f16_scalar(uint16_t *dst, const float *src, int64_t n);
int ab_ane_f16_to_f32_scalar(float *dst, const uint16_t *src, int64_t n);
const char *ab_ane_fp16_path(void);
/* Token-major [N, C] <-> channels-first [C, ld] (spatial stride ld >= N). */
int ab_ane_rows_to_channels(float *dst, int64_t ld, const float *src, int64_t N,
                            int64_t C, float scale);
int ab_ane_channels_to_rows(float *dst, const float *src, int64_t ld, int64_t N,
                            int64_t C, float scale, int accumulate);

/* CDEF END */

#ifdef __cplusplus
}
#endif
#endif /* AB_TESTING_H */
