/* ane_internal.h — what the ANE core (ane_core.c) needs from the platforms,
 * and the helpers shared inside csrc/ane. Not part of the Python API.
 *
 * A platform is a table of functions. The core never knows whether a program
 * runs on the Neural Engine (ane_darwin.c) or in the interpreter
 * (ane_emulated.c): it hands over MIL text, gets an opaque program, and moves
 * bytes through opaque surfaces (IOSurfaces on Apple, heap blocks otherwise).
 * Every function that can fail returns an AB_* / AB_ANE_E* code and writes a
 * sentence into err (capacity errcap, always NUL-terminated; the core passes
 * AB_ANE_ERRCAP bytes, so framework messages arrive whole). */
#ifndef AB_ANE_INTERNAL_H
#define AB_ANE_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include "anebackward.h"
#include "ab_testing.h"

#define AB_ANE_PATH 1200

typedef struct ab_ane_platform {
    const char *name;
    /* Run ab_ane_self_test when a context opens: a framework that loads may
     * still be unable to run programs (e.g. in a virtual machine). */
    int self_test_on_open;
    /* Can this platform run in this process? (framework, classes, CPU) */
    int (*probe)(char *err, size_t errcap);
    /* MIL text -> program (not yet loaded). */
    int (*compile)(const char *mil, size_t mil_len, void **prog, char *err, size_t errcap);
    int (*load)(void *prog, char *err, size_t errcap);
    /* A request binds one input and one output surface to a loaded program
     * (a request with several inputs fails on the ANE, so the core packs
     * everything into one). The core creates one per surface pair when the
     * pair is made (a program's own surfaces, a staged weight's surface)
     * and releases it before the surfaces and the program. */
    int (*request_create)(void *prog, void *in_surface, void *out_surface, void **req, char *err,
                          size_t errcap);
    void (*request_release)(void *req);
    int (*eval)(void *prog, void *req, char *err, size_t errcap);
    /* Unload (if loaded) and free the program. */
    void (*unload)(void *prog);
    /* The compiler's working directory of a program ("" if none). */
    const char *(*program_dir)(void *prog);
    int (*surface_create)(size_t bytes, void **surface, char *err, size_t errcap);
    /* Base address while locked; NULL if the lock failed. */
    void *(*surface_lock)(void *surface, int read_only);
    void (*surface_unlock)(void *surface, int read_only);
    void (*surface_release)(void *surface);
} ab_ane_platform;

extern const ab_ane_platform ab_ane_platform_emulated;
#if defined(__APPLE__)
extern const ab_ane_platform ab_ane_platform_darwin;
#endif

/* snprintf into err, truncating safely; returns code (for `return ab_ane_fail(...)`). */
int ab_ane_fail(char *err, size_t errcap, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* The dx program's MIL with an instance tag ([A-Za-z0-9_], NULL: none) in one
 * op's name, which makes programs of different contexts/processes distinct
 * texts. */
int ab_ane_mil_linear_dx_tagged(char *buf, int64_t cap, int64_t S, int64_t in, int64_t out,
                                const char *tag, int64_t *len);

/* ane_workdir.c: <root>/<name>/ with model.mil written atomically; *owned = 1
 * when this call created the directory (only then does remove delete it). */
int ab_ane_workdir_create(const char *root, const char *name, const char *mil, size_t mil_len,
                          char *dir, size_t dircap, int *owned, char *err, size_t errcap);
void ab_ane_workdir_remove(const char *dir, int owned);

/* fp16 bit helpers used by the interpreter and the core. */
static inline int ab_ane_f16_is_finite(uint16_t h) { return (h & 0x7c00u) != 0x7c00u; }

#endif
