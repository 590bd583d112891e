/* ane_darwin.c — the "darwin" ANE platform: Apple's private
 * AppleNeuralEngine.framework, driven from C through the Objective-C runtime.
 * Built on macOS only (ffibuild.py); links Foundation, CoreFoundation,
 * IOSurface and libobjc, and opens the private framework with dlopen at run
 * time, so a missing or changed framework is an error message, not a failed
 * import.
 *
 * The private API (as documented by github maderix/ANE):
 *   _ANEInMemoryModelDescriptor  +modelWithMILText:weights:optionsPlist:
 *   _ANEInMemoryModel            +inMemoryModelWithDescriptor:  -hexStringIdentifier
 *                                -compileWithQoS:options:error:  -loadWithQoS:options:error:
 *                                -evaluateWithQoS:options:request:error:  -unloadWithQoS:error:
 *   _ANERequest                  +requestWithInputs:inputIndices:outputs:outputIndices:
 *                                 weightsBuffer:perfStats:procedureIndex:
 *   _ANEIOSurfaceObject          +objectWithIOSurface:
 * Tensors are IOSurfaces holding [1, C, 1, S] channels-first data. The
 * compiler reads the program from a directory named after the model's
 * hexStringIdentifier in the user's temporary directory, so the MIL is
 * written there before compiling (and the directory removed at unload).
 *
 * Every class and selector is checked with the runtime before first use, so
 * an OS where they changed gives "... does not respond to ..." instead of an
 * unrecognised-selector exception. The framework calls that can still throw
 * (descriptor, model, compile, load, evaluate, unload, request) go through
 * guarded(): when the build compiles ane_darwin_guard.m and defines
 * AB_ANE_OBJC_GUARD, an Objective-C exception becomes an error carrying its
 * name and reason instead of terminating the process. The framework's error
 * descriptions are copied whole, however long. CF objects are toll-free
 * bridged to their NS counterparts (CFDataRef = NSData *, CFDictionaryRef =
 * NSDictionary *). */
#include <CoreFoundation/CoreFoundation.h>
#include <IOSurface/IOSurface.h>
#include <dlfcn.h>
#include <objc/message.h>
#include <objc/runtime.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "ane_internal.h"

#define ANE_FRAMEWORK "/System/Library/PrivateFrameworks/AppleNeuralEngine.framework/AppleNeuralEngine"
#define ANE_QOS 21u                      /* the QoS value the origin project uses */

/* libobjc's autorelease pool entry points (what @autoreleasepool compiles to). */
extern void *objc_autoreleasePoolPush(void);
extern void objc_autoreleasePoolPop(void *pool);

static Class g_desc, g_model, g_request, g_io;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static int g_init_rc;
static char g_init_msg[512];

#define SEL_(s) sel_registerName(s)

static id msg0(id obj, const char *sel) { return ((id (*)(id, SEL))objc_msgSend)(obj, SEL_(sel)); }
static id msg1(id obj, const char *sel, id a) { return ((id (*)(id, SEL, id))objc_msgSend)(obj, SEL_(sel), a); }

/* [obj description] as UTF-8, whole (malloc'ed; NULL if unreadable). */
static char *describe(id obj) {
    id d = obj ? msg0(obj, "description") : NULL;
    if (!d) return NULL;
    CFIndex cap = CFStringGetMaximumSizeForEncoding(CFStringGetLength((CFStringRef)d), kCFStringEncodingUTF8) + 1;
    char *buf = cap > 0 ? malloc((size_t)cap) : NULL;
    if (buf && !CFStringGetCString((CFStringRef)d, buf, cap, kCFStringEncodingUTF8)) { free(buf); buf = NULL; }
    return buf;
}

/* "<what>: <the NSError's description>" into err; returns code. */
static int fail_with_error(char *err, size_t errcap, int code, const char *what, id error) {
    char *d = describe(error);
    ab_ane_fail(err, errcap, code, "%s: %s", what,
                d ? d : error ? "an error whose description cannot be read" : "no error object was returned");
    free(d);
    return code;
}

/* The framework calls that may raise, as data, so that one guard covers all. */
enum { CALL_DESC, CALL_MODEL, CALL_COMPILE, CALL_LOAD, CALL_EVAL, CALL_UNLOAD, CALL_REQUEST };
typedef struct {
    int kind;
    id self, a, b, c, d;
    id *error;
    BOOL ok;
    id result;
} dw_call;

static void dw_invoke(void *p) {
    dw_call *c = p;
    switch (c->kind) {
    case CALL_DESC:
        c->result = ((id (*)(id, SEL, id, id, id))objc_msgSend)(
            c->self, SEL_("modelWithMILText:weights:optionsPlist:"), c->a, c->b, (id)NULL);
        break;
    case CALL_MODEL:
        c->result = msg1(c->self, "inMemoryModelWithDescriptor:", c->a);
        break;
    case CALL_COMPILE:
        c->ok = ((BOOL (*)(id, SEL, unsigned int, id, id *))objc_msgSend)(
            c->self, SEL_("compileWithQoS:options:error:"), ANE_QOS, c->a, c->error);
        break;
    case CALL_LOAD:
        c->ok = ((BOOL (*)(id, SEL, unsigned int, id, id *))objc_msgSend)(
            c->self, SEL_("loadWithQoS:options:error:"), ANE_QOS, c->a, c->error);
        break;
    case CALL_EVAL:
        c->ok = ((BOOL (*)(id, SEL, unsigned int, id, id, id *))objc_msgSend)(
            c->self, SEL_("evaluateWithQoS:options:request:error:"), ANE_QOS, c->a, c->b, c->error);
        break;
    case CALL_UNLOAD:
        c->ok = ((BOOL (*)(id, SEL, unsigned int, id *))objc_msgSend)(
            c->self, SEL_("unloadWithQoS:error:"), ANE_QOS, c->error);
        break;
    case CALL_REQUEST:
        c->result = ((id (*)(id, SEL, id, id, id, id, id, id, id))objc_msgSend)(
            c->self,
            SEL_("requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:"),
            c->a, c->b, c->c, c->b, (id)NULL, (id)NULL, c->d);
        break;
    }
}

#if defined(AB_ANE_OBJC_GUARD)
/* ane_darwin_guard.m: fn(arg) inside @try; on an exception 1 and *msg =
 * "<name>: <reason>" (malloc'ed). */
int ab_ane_darwin_try(void (*fn)(void *), void *arg, char **msg);
#endif

/* Run one framework call; AB_OK, or `code` when it raised. */
static int guarded(dw_call *c, int code, const char *what, char *err, size_t errcap) {
#if defined(AB_ANE_OBJC_GUARD)
    char *exc = NULL;
    if (ab_ane_darwin_try(dw_invoke, c, &exc)) {
        ab_ane_fail(err, errcap, code, "%s raised an Objective-C exception: %s", what,
                    exc ? exc : "(no description)");
        free(exc);
        return code;
    }
#else
    dw_invoke(c);
#endif
    return AB_OK;
}

static void init_once(void) {
#if !defined(__arm64__) && !defined(__aarch64__)
    g_init_rc = ab_ane_fail(g_init_msg, sizeof g_init_msg, AB_ANE_EUNAVAILABLE,
                            "this Mac has an Intel CPU; the Neural Engine exists only on Apple Silicon");
    return;
#endif
    if (!dlopen(ANE_FRAMEWORK, RTLD_NOW | RTLD_GLOBAL)) {
        const char *why = dlerror();
        g_init_rc = ab_ane_fail(g_init_msg, sizeof g_init_msg, AB_ANE_EUNAVAILABLE,
                                "cannot load the private framework %s: %s", ANE_FRAMEWORK,
                                why ? why : "unknown dlopen error");
        return;
    }
    struct { Class *cls; const char *name; } classes[] = {
        {&g_desc, "_ANEInMemoryModelDescriptor"}, {&g_model, "_ANEInMemoryModel"},
        {&g_request, "_ANERequest"}, {&g_io, "_ANEIOSurfaceObject"},
    };
    for (size_t i = 0; i < sizeof classes / sizeof classes[0]; i++) {
        *classes[i].cls = (Class)objc_getClass(classes[i].name);   /* declared as returning id */
        if (!*classes[i].cls) {
            g_init_rc = ab_ane_fail(g_init_msg, sizeof g_init_msg, AB_ANE_EUNAVAILABLE,
                                    "AppleNeuralEngine.framework has no class %s (this macOS version "
                                    "is not supported; macOS 15 or later is needed)", classes[i].name);
            return;
        }
    }
    struct { Class cls; int is_class_method; const char *sel; } sels[] = {
        {g_desc, 1, "modelWithMILText:weights:optionsPlist:"},
        {g_model, 1, "inMemoryModelWithDescriptor:"},
        {g_model, 0, "hexStringIdentifier"},
        {g_model, 0, "compileWithQoS:options:error:"},
        {g_model, 0, "loadWithQoS:options:error:"},
        {g_model, 0, "evaluateWithQoS:options:request:error:"},
        {g_model, 0, "unloadWithQoS:error:"},
        {g_request, 1, "requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:"},
        {g_io, 1, "objectWithIOSurface:"},
    };
    for (size_t i = 0; i < sizeof sels / sizeof sels[0]; i++) {
        Method m = sels[i].is_class_method ? class_getClassMethod(sels[i].cls, SEL_(sels[i].sel))
                                           : class_getInstanceMethod(sels[i].cls, SEL_(sels[i].sel));
        if (!m) {
            g_init_rc = ab_ane_fail(g_init_msg, sizeof g_init_msg, AB_ANE_EUNAVAILABLE,
                                    "%s does not respond to %s%s (the private API changed in this "
                                    "macOS version)", class_getName(sels[i].cls),
                                    sels[i].is_class_method ? "+" : "-", sels[i].sel);
            return;
        }
    }
    g_init_rc = AB_OK;
}

static int dw_probe(char *err, size_t errcap) {
    pthread_once(&g_once, init_once);
    if (g_init_rc) return ab_ane_fail(err, errcap, g_init_rc, "%s", g_init_msg);
    return AB_OK;
}

typedef struct {
    id model;                    /* retained _ANEInMemoryModel */
    int loaded;
    char dir[AB_ANE_PATH];       /* the compiler's working directory */
    int owns_dir;                /* created by this program: removed at unload */
} dw_prog;

static CFDictionaryRef empty_dict(void) {
    return CFDictionaryCreate(NULL, NULL, NULL, 0, &kCFTypeDictionaryKeyCallBacks,
                              &kCFTypeDictionaryValueCallBacks);
}

static void dw_unload(void *prog);

static const char *dw_program_dir(void *prog) { return ((dw_prog *)prog)->dir; }

static int dw_compile(const char *mil, size_t mil_len, void **prog, char *err, size_t errcap) {
    *prog = NULL;
    int rc = dw_probe(err, errcap);
    if (rc) return rc;
    dw_prog *P = calloc(1, sizeof *P);
    if (!P) return ab_ane_fail(err, errcap, AB_ENOMEM, "out of memory");
    void *pool = objc_autoreleasePoolPush();
    CFDataRef text = CFDataCreate(NULL, (const UInt8 *)mil, (CFIndex)mil_len);
    CFDictionaryRef empty = empty_dict();
    dw_call c = {.kind = CALL_DESC, .self = (id)g_desc, .a = (id)text, .b = (id)empty};
    if (!text || !empty) { rc = ab_ane_fail(err, errcap, AB_ENOMEM, "out of memory"); goto done; }
    if ((rc = guarded(&c, AB_ANE_ECOMPILE, "modelWithMILText:weights:optionsPlist:", err, errcap))) goto done;
    if (!c.result) {
        rc = ab_ane_fail(err, errcap, AB_ANE_ECOMPILE, "_ANEInMemoryModelDescriptor refused the MIL text");
        goto done;
    }
    c = (dw_call){.kind = CALL_MODEL, .self = (id)g_model, .a = c.result};
    if ((rc = guarded(&c, AB_ANE_ECOMPILE, "inMemoryModelWithDescriptor:", err, errcap))) goto done;
    if (!c.result) {
        rc = ab_ane_fail(err, errcap, AB_ANE_ECOMPILE, "_ANEInMemoryModel could not be created");
        goto done;
    }
    P->model = msg0(c.result, "retain");
    /* the compiler's directory: <user temp dir>/<hexStringIdentifier>/. The
     * core tags every program per process and context, so the identifier
     * (derived from the program) differs between contexts and processes. */
    char tmp[512] = "";
    size_t n = confstr(_CS_DARWIN_USER_TEMP_DIR, tmp, sizeof tmp);
    if (n == 0 || n > sizeof tmp) snprintf(tmp, sizeof tmp, "%s", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    id hex = msg0(P->model, "hexStringIdentifier");
    char hexs[256];
    if (!hex || !CFStringGetCString((CFStringRef)hex, hexs, sizeof hexs, kCFStringEncodingUTF8)) {
        rc = ab_ane_fail(err, errcap, AB_ANE_ECOMPILE, "the model has no hexStringIdentifier");
        goto done;
    }
    rc = ab_ane_workdir_create(tmp, hexs, mil, mil_len, P->dir, sizeof P->dir, &P->owns_dir, err, errcap);
    if (rc) goto done;
    id error = NULL;
    c = (dw_call){.kind = CALL_COMPILE, .self = P->model, .a = (id)empty, .error = &error};
    if ((rc = guarded(&c, AB_ANE_ECOMPILE, "compileWithQoS:options:error:", err, errcap))) goto done;
    if (!c.ok) rc = fail_with_error(err, errcap, AB_ANE_ECOMPILE, "compileWithQoS", error);
done:
    if (text) CFRelease(text);
    if (empty) CFRelease(empty);
    objc_autoreleasePoolPop(pool);
    if (rc) dw_unload(P);
    else *prog = P;
    return rc;
}

static int dw_load(void *prog, char *err, size_t errcap) {
    dw_prog *P = prog;
    if (P->loaded) return AB_OK;
    void *pool = objc_autoreleasePoolPush();
    CFDictionaryRef empty = empty_dict();
    id error = NULL;
    dw_call c = {.kind = CALL_LOAD, .self = P->model, .a = (id)empty, .error = &error};
    int rc = guarded(&c, AB_ANE_ELOAD, "loadWithQoS:options:error:", err, errcap);
    if (!rc && !c.ok) rc = fail_with_error(err, errcap, AB_ANE_ELOAD, "loadWithQoS", error);
    P->loaded = !rc;
    CFRelease(empty);
    objc_autoreleasePoolPop(pool);
    return rc;
}

static CFArrayRef array1(const void *obj) {
    return CFArrayCreate(NULL, &obj, 1, &kCFTypeArrayCallBacks);
}

/* The request binding two surfaces, retained; the core makes one per
 * surface pair when it creates the pair (so none per evaluation) and
 * releases it before the surfaces and the program. */
static int dw_request_create(void *prog, void *in_surface, void *out_surface, void **req, char *err,
                             size_t errcap) {
    (void)prog;
    *req = NULL;
    void *pool = objc_autoreleasePoolPush();
    int rc = AB_OK;
    id in_obj = ((id (*)(id, SEL, IOSurfaceRef))objc_msgSend)((id)g_io, SEL_("objectWithIOSurface:"), (IOSurfaceRef)in_surface);
    id out_obj = ((id (*)(id, SEL, IOSurfaceRef))objc_msgSend)((id)g_io, SEL_("objectWithIOSurface:"), (IOSurfaceRef)out_surface);
    if (!in_obj || !out_obj) {
        rc = ab_ane_fail(err, errcap, AB_ANE_ESURFACE, "_ANEIOSurfaceObject refused a surface");
    } else {
        int zero = 0;
        CFNumberRef idx0 = CFNumberCreate(NULL, kCFNumberIntType, &zero);
        CFArrayRef ins = array1(in_obj), outs = array1(out_obj), idx = array1(idx0);
        dw_call c = {.kind = CALL_REQUEST, .self = (id)g_request, .a = (id)ins, .b = (id)idx, .c = (id)outs, .d = (id)idx0};
        rc = guarded(&c, AB_ANE_EEVAL, "requestWithInputs:...", err, errcap);
        CFRelease(ins);
        CFRelease(outs);
        CFRelease(idx);
        CFRelease(idx0);
        if (!rc && !c.result) rc = ab_ane_fail(err, errcap, AB_ANE_EEVAL, "_ANERequest could not be created");
        if (!rc) *req = (void *)msg0(c.result, "retain");
    }
    objc_autoreleasePoolPop(pool);
    return rc;
}

static void dw_request_release(void *req) {
    if (req) msg0((id)req, "release");
}

static int dw_eval(void *prog, void *req, char *err, size_t errcap) {
    dw_prog *P = prog;
    if (!P->loaded) return ab_ane_fail(err, errcap, AB_ANE_EEVAL, "the program is not loaded");
    if (!req) return ab_ane_fail(err, errcap, AB_ANE_EEVAL, "no request");
    void *pool = objc_autoreleasePoolPush();
    CFDictionaryRef empty = empty_dict();
    id error = NULL;
    dw_call c = {.kind = CALL_EVAL, .self = P->model, .a = (id)empty, .b = (id)req, .error = &error};
    int rc = guarded(&c, AB_ANE_EEVAL, "evaluateWithQoS:options:request:error:", err, errcap);
    if (!rc && !c.ok) rc = fail_with_error(err, errcap, AB_ANE_EEVAL, "evaluateWithQoS", error);
    CFRelease(empty);
    objc_autoreleasePoolPop(pool);
    return rc;
}

static void dw_unload(void *prog) {
    dw_prog *P = prog;
    if (!P) return;
    void *pool = objc_autoreleasePoolPush();
    if (P->loaded) {
        id error = NULL;
        char ignored[256];           /* nothing to report to: the program is going away */
        dw_call c = {.kind = CALL_UNLOAD, .self = P->model, .error = &error};
        guarded(&c, AB_ANE_ELOAD, "unloadWithQoS:error:", ignored, sizeof ignored);
    }
    if (P->model) msg0(P->model, "release");
    objc_autoreleasePoolPop(pool);
    ab_ane_workdir_remove(P->dir, P->owns_dir);
    free(P);
}

static int dw_surface_create(size_t bytes, void **surface, char *err, size_t errcap) {
    *surface = NULL;
    long long b = (long long)bytes, one = 1, zero = 0;
    const void *keys[] = {kIOSurfaceWidth, kIOSurfaceHeight, kIOSurfaceBytesPerElement,
                          kIOSurfaceBytesPerRow, kIOSurfaceAllocSize, kIOSurfacePixelFormat};
    const long long *vals_ll[] = {&b, &one, &one, &b, &b, &zero};
    const void *vals[6];
    for (int i = 0; i < 6; i++) vals[i] = CFNumberCreate(NULL, kCFNumberLongLongType, vals_ll[i]);
    CFDictionaryRef props = CFDictionaryCreate(NULL, keys, vals, 6, &kCFTypeDictionaryKeyCallBacks,
                                               &kCFTypeDictionaryValueCallBacks);
    for (int i = 0; i < 6; i++) if (vals[i]) CFRelease(vals[i]);
    IOSurfaceRef s = props ? IOSurfaceCreate(props) : NULL;
    if (props) CFRelease(props);
    if (!s) return ab_ane_fail(err, errcap, AB_ANE_ESURFACE, "IOSurfaceCreate failed for %zu bytes", bytes);
    *surface = (void *)s;
    return AB_OK;
}

static void *dw_surface_lock(void *surface, int read_only) {
    IOSurfaceRef s = surface;
    if (IOSurfaceLock(s, read_only ? kIOSurfaceLockReadOnly : 0, NULL) != 0) return NULL;
    return IOSurfaceGetBaseAddress(s);
}

static void dw_surface_unlock(void *surface, int read_only) {
    IOSurfaceUnlock((IOSurfaceRef)surface, read_only ? kIOSurfaceLockReadOnly : 0, NULL);
}

static void dw_surface_release(void *surface) {
    if (surface) CFRelease((IOSurfaceRef)surface);
}

const ab_ane_platform ab_ane_platform_darwin = {
    "darwin", 1, dw_probe, dw_compile, dw_load, dw_request_create, dw_request_release, dw_eval,
    dw_unload, dw_program_dir,
    dw_surface_create, dw_surface_lock, dw_surface_unlock, dw_surface_release,
};
