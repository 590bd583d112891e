/* check.h — what the C test programs share: one line per check, the exit
 * code, a seeded random generator, the error measure against a float64
 * oracle and the oracles more than one program needs. Header only (static inline), so each program still builds with
 * one `cc` command; #include "check.h" finds it next to the program. */
#ifndef AB_TESTS_CHECK_H
#define AB_TESTS_CHECK_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>

static int failures = 0;

/* One result line; a failure is counted for finish(). */
static inline void expect(const char *what, int ok) {
    printf("%-60s %s\n", what, ok ? "ok" : "FAIL");
    if (!ok) failures++;
}

/* The summary line and main's exit code: 0 if every check passed. */
static inline int finish(void) {
    printf("%s (%d failures)\n", failures ? "FAILED" : "all passed", failures);
    return failures != 0;
}

/* xorshift64 state: a program may set its own seed before the first frand(). */
static unsigned long long rng_state = 0x9E3779B97F4A7C15ULL;

/* uniform in [-1, 1) */
static inline float frand(void) {
    rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
    return (float)((rng_state >> 11) * (1.0 / 9007199254740992.0) * 2.0 - 1.0);
}

/* max |a - ref| / (atol + rtol |ref|) over n values: <= 1 passes; NaN counts as worst */
static inline double worst(const float *a, const double *ref, int64_t n, double atol, double rtol) {
    double w = 0;
    for (int64_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - ref[i]) / (atol + rtol * fabs(ref[i]));
        if (!(e <= w)) w = e;
    }
    return w;
}

/* float64 RMSNorm backward of x[N, D] (y = x r w, r = (mean x^2 + eps)^-1/2):
 * rdx = dy's gradient through y, written; rdw += the weight's gradient. */
static inline void rmsnorm_backward_oracle(double *rdx, double *rdw, const float *dy, const float *x,
                                           const float *w, int64_t N, int64_t D, double eps) {
    for (int64_t t = 0; t < N; t++) {
        double ss = 0, dot = 0;
        for (int64_t i = 0; i < D; i++) ss += (double)x[t * D + i] * x[t * D + i];
        double r = 1.0 / sqrt(ss / D + eps);
        for (int64_t i = 0; i < D; i++) dot += (double)w[i] * dy[t * D + i] * x[t * D + i];
        for (int64_t i = 0; i < D; i++) {
            rdx[t * D + i] = w[i] * dy[t * D + i] * r - x[t * D + i] * r * r * r * dot / D;
            rdw[i] += (double)dy[t * D + i] * x[t * D + i] * r;
        }
    }
}

#endif
