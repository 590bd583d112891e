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
 * unrecognised-selector exception. CF objects are toll-free bridged to their
 * NS counterparts (CFDataRef = NSData *, CFDictionaryRef = NSDictionary *). */
#include <CoreFoundation/CoreFoundation.h>
#include <IOSurface/IOSurface.h>
#include <dlfcn.h>
#include <dirent.h>
#include <objc/message.h>
#include <objc/runtime.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
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

/* [error description] as UTF-8 into buf. */
static const char *error_text(id error, char *buf, size_t cap) {
    snprintf(buf, cap, "no error object was returned");
    if (error) {
        id d = msg0(error, "description");
        if (!d || !CFStringGetCString((CFStringRef)d, buf, (CFIndex)cap, kCFStringEncodingUTF8))
            snprintf(buf, cap, "an error whose description cannot be read");
    }
    return buf;
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
    id request;                  /* retained _ANERequest for (req_in, req_out) */
    void *req_in, *req_out;
    int loaded;
    char dir[1024];              /* the compiler's working directory */
} dw_prog;

static CFDictionaryRef empty_dict(void) {
    return CFDictionaryCreate(NULL, NULL, NULL, 0, &kCFTypeDictionaryKeyCallBacks,
                              &kCFTypeDictionaryValueCallBacks);
}

/* rm -r of the compiler's working directory (a few levels at most). */
static void remove_tree_depth(const char *dir, int depth) {
    DIR *d = depth > 0 ? opendir(dir) : NULL;
    if (d) {
        struct dirent *ent;
        char path[1200];
        while ((ent = readdir(d)) != NULL) {
            if (strcmp(ent->d_name, ".") == 0 || strcmp(ent->d_name, "..") == 0) continue;
            snprintf(path, sizeof path, "%s/%s", dir, ent->d_name);
            struct stat sb;
            if (lstat(path, &sb) == 0 && S_ISDIR(sb.st_mode)) remove_tree_depth(path, depth - 1);
            else remove(path);
        }
        closedir(d);
    }
    rmdir(dir);
}

static void remove_tree(const char *dir) {
    if (dir[0]) remove_tree_depth(dir, 4);
}

static int write_file(const char *path, const char *data, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t n = fwrite(data, 1, len, f);
    return (fclose(f) == 0 && n == len) ? 0 : -1;
}

static void dw_unload(void *prog);

static int dw_compile(const char *mil, size_t mil_len, void **prog, char *err, size_t errcap) {
    *prog = NULL;
    int rc = dw_probe(err, errcap);
    if (rc) return rc;
    dw_prog *P = calloc(1, sizeof *P);
    if (!P) return ab_ane_fail(err, errcap, AB_ENOMEM, "out of memory");
    void *pool = objc_autoreleasePoolPush();
    CFDataRef text = CFDataCreate(NULL, (const UInt8 *)mil, (CFIndex)mil_len);
    CFDictionaryRef empty = empty_dict();
    char why[512];
    id desc = text && empty
        ? ((id (*)(id, SEL, id, id, id))objc_msgSend)((id)g_desc, SEL_("modelWithMILText:weights:optionsPlist:"),
                                                      (id)text, (id)empty, (id)NULL)
        : NULL;
    if (!desc) {
        rc = ab_ane_fail(err, errcap, AB_ANE_ECOMPILE, "_ANEInMemoryModelDescriptor refused the MIL text");
        goto done;
    }
    id model = msg1((id)g_model, "inMemoryModelWithDescriptor:", desc);
    if (!model) {
        rc = ab_ane_fail(err, errcap, AB_ANE_ECOMPILE, "_ANEInMemoryModel could not be created");
        goto done;
    }
    P->model = msg0(model, "retain");
    /* the compiler's directory: <user temp dir>/<hexStringIdentifier>/ */
    char tmp[512] = "";
    size_t n = confstr(_CS_DARWIN_USER_TEMP_DIR, tmp, sizeof tmp);
    if (n == 0 || n > sizeof tmp) snprintf(tmp, sizeof tmp, "%s/", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    id hex = msg0(P->model, "hexStringIdentifier");
    char hexs[256];
    if (!hex || !CFStringGetCString((CFStringRef)hex, hexs, sizeof hexs, kCFStringEncodingUTF8)) {
        rc = ab_ane_fail(err, errcap, AB_ANE_ECOMPILE, "the model has no hexStringIdentifier");
        goto done;
    }
    char path[1200];
    snprintf(P->dir, sizeof P->dir, "%s%s%s", tmp, tmp[strlen(tmp) - 1] == '/' ? "" : "/", hexs);
    snprintf(path, sizeof path, "%s/weights", P->dir);
    mkdir(P->dir, 0700);
    mkdir(path, 0700);
    snprintf(path, sizeof path, "%s/model.mil", P->dir);
    if (write_file(path, mil, mil_len)) {
        rc = ab_ane_fail(err, errcap, AB_ANE_ECOMPILE, "cannot write %s", path);
        goto done;
    }
    id error = NULL;
    BOOL ok = ((BOOL (*)(id, SEL, unsigned int, id, id *))objc_msgSend)(
        P->model, SEL_("compileWithQoS:options:error:"), ANE_QOS, (id)empty, &error);
    if (!ok) rc = ab_ane_fail(err, errcap, AB_ANE_ECOMPILE, "compileWithQoS: %s", error_text(error, why, sizeof why));
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
    char why[512];
    BOOL ok = ((BOOL (*)(id, SEL, unsigned int, id, id *))objc_msgSend)(
        P->model, SEL_("loadWithQoS:options:error:"), ANE_QOS, (id)empty, &error);
    int rc = ok ? AB_OK : ab_ane_fail(err, errcap, AB_ANE_ELOAD, "loadWithQoS: %s", error_text(error, why, sizeof why));
    P->loaded = ok;
    CFRelease(empty);
    objc_autoreleasePoolPop(pool);
    return rc;
}

static CFArrayRef array1(const void *obj) {
    return CFArrayCreate(NULL, &obj, 1, &kCFTypeArrayCallBacks);
}

/* The request binds the two surfaces; rebuilt only when they change. */
static int bind_request(dw_prog *P, void *in_surface, void *out_surface, char *err, size_t errcap) {
    if (P->request && P->req_in == in_surface && P->req_out == out_surface) return AB_OK;
    if (P->request) { msg0(P->request, "release"); P->request = NULL; }
    id in_obj = ((id (*)(id, SEL, IOSurfaceRef))objc_msgSend)((id)g_io, SEL_("objectWithIOSurface:"), (IOSurfaceRef)in_surface);
    id out_obj = ((id (*)(id, SEL, IOSurfaceRef))objc_msgSend)((id)g_io, SEL_("objectWithIOSurface:"), (IOSurfaceRef)out_surface);
    if (!in_obj || !out_obj) return ab_ane_fail(err, errcap, AB_ANE_ESURFACE, "_ANEIOSurfaceObject refused a surface");
    int zero = 0;
    CFNumberRef idx0 = CFNumberCreate(NULL, kCFNumberIntType, &zero);
    CFArrayRef ins = array1(in_obj), outs = array1(out_obj), idx = array1(idx0);
    id req = ((id (*)(id, SEL, id, id, id, id, id, id, id))objc_msgSend)(
        (id)g_request,
        SEL_("requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:"),
        (id)ins, (id)idx, (id)outs, (id)idx, (id)NULL, (id)NULL, (id)idx0);
    CFRelease(ins);
    CFRelease(outs);
    CFRelease(idx);
    CFRelease(idx0);
    if (!req) return ab_ane_fail(err, errcap, AB_ANE_EEVAL, "_ANERequest could not be created");
    P->request = msg0(req, "retain");
    P->req_in = in_surface;
    P->req_out = out_surface;
    return AB_OK;
}

static int dw_eval(void *prog, void *in_surface, void *out_surface, char *err, size_t errcap) {
    dw_prog *P = prog;
    if (!P->loaded) return ab_ane_fail(err, errcap, AB_ANE_EEVAL, "the program is not loaded");
    void *pool = objc_autoreleasePoolPush();
    int rc = bind_request(P, in_surface, out_surface, err, errcap);
    if (!rc) {
        CFDictionaryRef empty = empty_dict();
        id error = NULL;
        char why[512];
        BOOL ok = ((BOOL (*)(id, SEL, unsigned int, id, id, id *))objc_msgSend)(
            P->model, SEL_("evaluateWithQoS:options:request:error:"), ANE_QOS, (id)empty, P->request, &error);
        if (!ok) rc = ab_ane_fail(err, errcap, AB_ANE_EEVAL, "evaluateWithQoS: %s", error_text(error, why, sizeof why));
        CFRelease(empty);
    }
    objc_autoreleasePoolPop(pool);
    return rc;
}

static void dw_unload(void *prog) {
    dw_prog *P = prog;
    if (!P) return;
    void *pool = objc_autoreleasePoolPush();
    if (P->loaded) {
        id error = NULL;
        ((BOOL (*)(id, SEL, unsigned int, id *))objc_msgSend)(P->model, SEL_("unloadWithQoS:error:"), ANE_QOS, &error);
    }
    if (P->request) msg0(P->request, "release");
    if (P->model) msg0(P->model, "release");
    objc_autoreleasePoolPop(pool);
    remove_tree(P->dir);
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
    "darwin", 1, dw_probe, dw_compile, dw_load, dw_eval, dw_unload,
    dw_surface_create, dw_surface_lock, dw_surface_unlock, dw_surface_release,
};
