/* runtime.c — error strings and facts about the BLAS in use. */
#include <stdarg.h>
#include <stdio.h>
#include "ab_internal.h"

/* This thread's last refusal: "function: why". One buffer per thread, so
 * concurrent callers never see each other's messages. */
static _Thread_local char t_last_error[512];

int ab_fail(int code, const char *func, const char *cond, const char *fmt, ...) {
    if (fmt) {
        int n = snprintf(t_last_error, sizeof t_last_error, "%s: ", func);
        va_list ap;
        va_start(ap, fmt);
        if (n > 0 && (size_t)n < sizeof t_last_error)
            vsnprintf(t_last_error + n, sizeof t_last_error - (size_t)n, fmt, ap);
        va_end(ap);
    } else if (cond)
        snprintf(t_last_error, sizeof t_last_error, "%s: %s (requires %s)", func,
                 ab_strerror(code), cond);
    else
        snprintf(t_last_error, sizeof t_last_error, "%s: %s", func, ab_strerror(code));
    return code;
}

const char *ab_last_error(void) { return t_last_error; }

void ab_clear_error(void) { t_last_error[0] = '\0'; }

#ifndef AB_BUILD_FLAGS
#define AB_BUILD_FLAGS "unknown"
#endif

const char *ab_strerror(int code) {
    switch (code) {
    case AB_OK: return "ok";
    case AB_EINVAL: return "invalid size or argument";
    case AB_ENULL: return "a required buffer is NULL";
    case AB_ERANGE: return "a token id or target is outside [0, vocab_size)";
    case AB_EWORKSPACE: return "the workspace is smaller than required";
    case AB_ETOOBIG: return "too large: a BLAS dimension above 2^31 - 1, or a buffer above 2^52 floats";
    case AB_ENOMEM: return "out of memory";
    case AB_EUNAVAILABLE:
        return "bf16 matmuls need oneDNN, which could not be loaded: pip install 'anebackward[bf16]'";
    default: return "unknown error";
    }
}

const char *ab_blas_name(void) { return AB_BLAS_NAME; }
const char *ab_build_flags(void) { return AB_BUILD_FLAGS; }

#ifdef AB_BLAS_HAVE_OPENBLAS_CONTROLS
const char *ab_blas_corename(void) { return scipy_openblas_get_corename(); }
int ab_blas_get_num_threads(void) { return scipy_openblas_get_num_threads(); }
void ab_blas_set_num_threads(int n) { if (n > 0) scipy_openblas_set_num_threads(n); }
#else
const char *ab_blas_corename(void) { return "Accelerate"; }
int ab_blas_get_num_threads(void) { return 0; }  /* Accelerate decides itself */
void ab_blas_set_num_threads(int n) { (void)n; }
#endif

/* ab_set_num_threads / ab_get_num_threads: csrc/threads.c */
