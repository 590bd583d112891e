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

/* CDEF END */

#ifdef __cplusplus
}
#endif
#endif /* AB_TESTING_H */
