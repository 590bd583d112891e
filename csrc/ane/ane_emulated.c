/* ane_emulated.c — the "emulated" ANE platform: a small MIL interpreter.
 *
 * It runs the same MIL text the core hands to the Neural Engine, so the text,
 * the packing of dy and W into one input, the slicing, the layouts and the
 * loss scaling are all exercised on machines without an ANE. It implements
 * exactly the subset the core emits:
 *
 *   program(<version>) [<attributes>] {
 *     func main[<opset>](<type> <input>) {
 *       <type> <name> = <op>(<arg> = <variable>, ...)[name = string("..."), val = <literal>];
 *       ...
 *     } -> (<output>);
 *   }
 *
 *   types:    tensor<fp16|fp32|int32, [d0, d1, ...]>, bool, string
 *   literals: tensor<int32, [n]>([...]), bool(true|false), string("...")
 *   ops:      const, cast, slice_by_size, reshape, transpose, matmul
 *
 * Everything is checked when the program is compiled (names, argument sets,
 * constant parameters, bounds, and that every declared result type equals the
 * type the op computes); a violation is AB_ANE_EMIL with the line and the
 * reason. Numerics mimic the ANE's: tensors are stored in their declared
 * dtype, so every fp16 intermediate is rounded to fp16 (round to nearest
 * even); matmul multiplies the fp16 values exactly and accumulates in fp32
 * (an assumption about the hardware, stated in docs/ane.md, "fp16 caveats"). One input
 * and one output, as in the core's requests. */
#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ab_internal.h"
#include "ane_internal.h"
#include "ab_testing.h"

#define EMU_MAX_RANK 6
#define EMU_NAME 64
#define EMU_MAX_ELEMS ((int64_t)1 << 34)
#define EMU_MAX_PROGRAM_BYTES ((int64_t)1 << 31)   /* all computed tensors of one program */

/* Test hooks (ab_testing.h): make the next compiles / loads / evaluations
 * of this platform fail, as the Neural Engine's can, so the dispatch's error
 * paths get exercised; saturate fp16 results instead of overflowing; keep a
 * working directory per program as the darwin platform does. */
enum { FAIL_NONE, FAIL_COMPILE, FAIL_LOAD, FAIL_EVAL };
static pthread_mutex_t g_hook_mu = PTHREAD_MUTEX_INITIALIZER;
static int g_fail_stage = FAIL_NONE, g_fail_times;
static int64_t g_fail_msg_bytes;
static volatile int g_saturate;
static char g_workdir[AB_ANE_PATH - 64];

int ab_ane_emulated_fail_next(const char *stage, int times, int64_t msg_bytes) {
    int st;
    if (!stage) st = FAIL_NONE;
    else if (strcmp(stage, "compile") == 0) st = FAIL_COMPILE;
    else if (strcmp(stage, "load") == 0) st = FAIL_LOAD;
    else if (strcmp(stage, "evaluate") == 0) st = FAIL_EVAL;
    else return AB_FAIL(AB_EINVAL, NULL);
    if (stage && (times < 1 || msg_bytes < 0 || msg_bytes > (1 << 20))) return AB_FAIL(AB_EINVAL, NULL);
    pthread_mutex_lock(&g_hook_mu);
    g_fail_stage = st;
    g_fail_times = stage ? times : 0;
    g_fail_msg_bytes = msg_bytes;
    pthread_mutex_unlock(&g_hook_mu);
    return AB_OK;
}

int ab_ane_emulated_saturate(int on) { g_saturate = on != 0; return AB_OK; }

int ab_ane_emulated_workdir(const char *root) {
    if (root && strlen(root) >= sizeof g_workdir) return AB_FAIL(AB_EINVAL, NULL);
    pthread_mutex_lock(&g_hook_mu);
    snprintf(g_workdir, sizeof g_workdir, "%s", root ? root : "");
    pthread_mutex_unlock(&g_hook_mu);
    return AB_OK;
}

/* AB_OK, or the injected failure of this stage (code) with its message. */
static int take_failure(int stage, int code, char *err, size_t errcap) {
    pthread_mutex_lock(&g_hook_mu);
    int hit = g_fail_stage == stage && g_fail_times > 0;
    int64_t nbytes = g_fail_msg_bytes;
    if (hit && --g_fail_times == 0) g_fail_stage = FAIL_NONE;
    pthread_mutex_unlock(&g_hook_mu);
    if (!hit) return AB_OK;
    static const char *names[] = {"", "compile", "load", "evaluate"};
    int n = snprintf(err, errcap, "injected %s failure (test hook)", names[stage]);
    /* a long framework message: "...", then filler, then a marker at the very end */
    for (int64_t i = n; nbytes > 0 && i < nbytes - 4 && (size_t)i + 1 < errcap; i++) err[i] = 'x';
    if (nbytes > n && (size_t)nbytes < errcap) {
        memcpy(err + nbytes - 4, "@END", 4);
        err[nbytes] = '\0';
    }
    return code;
}

enum { DT_FP16, DT_FP32, DT_INT32, DT_BOOL, DT_STRING };
static const char *dt_name[] = {"fp16", "fp32", "int32", "bool", "string"};
static size_t dt_size(int dt) { return dt == DT_FP16 ? 2 : 4; }

enum { OP_CAST, OP_SLICE, OP_RESHAPE, OP_TRANSPOSE, OP_MATMUL };

typedef struct {
    int dtype, is_tensor, rank;
    int64_t dims[EMU_MAX_RANK];
} emu_type;

typedef struct {
    char name[EMU_NAME];
    emu_type t;
    int64_t count;
    int is_const, line;
    int32_t *ivals;          /* const int32 tensor / bool (one value) */
    char str[32];            /* const string */
    void *data;              /* tensor storage while running */
    int owns_data;
} emu_value;

typedef struct {
    int op, out, x, y, line;
    int64_t begin[EMU_MAX_RANK];     /* slice */
    int perm[EMU_MAX_RANK];          /* transpose */
    int tx, ty;                      /* matmul */
} emu_instr;

typedef struct {
    emu_value *vals;
    int nvals, capvals;
    emu_instr *ins;
    int nins, capins;
    int input, output;
    size_t in_bytes, out_bytes;
    float *scratch;
    int64_t scratch_floats;
    int loaded;
    char dir[AB_ANE_PATH];       /* working directory ("" if none) */
    int owns_dir;
} emu_prog;

/* ---------------------------------------------------------------- tokens */

enum { TK_EOF, TK_IDENT, TK_NUM, TK_STR, TK_PUNCT, TK_ARROW };

typedef struct {
    const char *p, *end;
    int line;
    int kind, tline;
    char text[256];
    char *err;
    size_t errcap;
    int failed;
} lexer;

__attribute__((format(printf, 3, 4)))
static int lex_fail(lexer *L, int line, const char *fmt, ...) {
    if (L->failed) return AB_ANE_EMIL;
    L->failed = 1;
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return ab_ane_fail(L->err, L->errcap, AB_ANE_EMIL, "MIL line %d: %s", line, msg);
}

static void next(lexer *L) {
    for (;;) {
        while (L->p < L->end && isspace((unsigned char)*L->p)) {
            if (*L->p == '\n') L->line++;
            L->p++;
        }
        if (L->p + 1 < L->end && L->p[0] == '/' && L->p[1] == '/') {
            while (L->p < L->end && *L->p != '\n') L->p++;
            continue;
        }
        break;
    }
    L->tline = L->line;
    L->text[0] = '\0';
    if (L->p >= L->end) { L->kind = TK_EOF; strcpy(L->text, "end of text"); return; }
    const char *s = L->p;
    size_t n = 0;
    if (isalpha((unsigned char)*s) || *s == '_') {
        while (L->p < L->end && (isalnum((unsigned char)*L->p) || *L->p == '_' || *L->p == '.')) L->p++;
        L->kind = TK_IDENT;
    } else if (isdigit((unsigned char)*s) || (*s == '-' && s + 1 < L->end && isdigit((unsigned char)s[1]))) {
        L->p++;
        while (L->p < L->end && (isalnum((unsigned char)*L->p) || *L->p == '.' ||
                                 ((*L->p == '-' || *L->p == '+') && (L->p[-1] == 'e' || L->p[-1] == 'E'))))
            L->p++;
        L->kind = TK_NUM;
    } else if (*s == '"') {
        L->p++;
        while (L->p < L->end && *L->p != '"' && *L->p != '\n') L->p++;
        if (L->p >= L->end || *L->p != '"') { lex_fail(L, L->tline, "unterminated string"); L->kind = TK_EOF; return; }
        L->p++;
        L->kind = TK_STR;
        s++;                                            /* text without quotes */
        n = (size_t)(L->p - 1 - s);
        if (n >= sizeof L->text) n = sizeof L->text - 1;
        memcpy(L->text, s, n);
        L->text[n] = '\0';
        return;
    } else if (*s == '-' && s + 1 < L->end && s[1] == '>') {
        L->p += 2;
        L->kind = TK_ARROW;
    } else {
        L->p++;
        L->kind = TK_PUNCT;
    }
    n = (size_t)(L->p - s);
    if (n >= sizeof L->text) n = sizeof L->text - 1;
    memcpy(L->text, s, n);
    L->text[n] = '\0';
}

static int is_punct(lexer *L, char c) { return L->kind == TK_PUNCT && L->text[0] == c; }
static int is_word(lexer *L, const char *w) { return L->kind == TK_IDENT && strcmp(L->text, w) == 0; }

static int expect_punct(lexer *L, char c, const char *where) {
    if (!is_punct(L, c)) return lex_fail(L, L->tline, "expected '%c' %s, found '%s'", c, where, L->text);
    next(L);
    return AB_OK;
}

static int expect_ident(lexer *L, char *out, size_t cap, const char *what) {
    if (L->kind != TK_IDENT) return lex_fail(L, L->tline, "expected %s, found '%s'", what, L->text);
    if (strlen(L->text) >= cap) return lex_fail(L, L->tline, "%s '%s' is too long", what, L->text);
    strcpy(out, L->text);
    next(L);
    return AB_OK;
}

static int parse_int(lexer *L, int64_t *v, const char *what) {
    if (L->kind != TK_NUM) return lex_fail(L, L->tline, "expected an integer (%s), found '%s'", what, L->text);
    char *endp;
    errno = 0;
    long long x = strtoll(L->text, &endp, 10);
    if (errno == ERANGE) return lex_fail(L, L->tline, "integer '%s' is out of range (%s)", L->text, what);
    if (*endp != '\0') return lex_fail(L, L->tline, "'%s' is not an integer (%s)", L->text, what);
    *v = x;
    next(L);
    return AB_OK;
}

/* ------------------------------------------------------------------ types */

static void type_str(const emu_type *t, char *buf, size_t cap) {
    if (!t->is_tensor) { snprintf(buf, cap, "%s", dt_name[t->dtype]); return; }
    int n = snprintf(buf, cap, "tensor<%s, [", dt_name[t->dtype]);
    for (int i = 0; i < t->rank && n > 0 && (size_t)n < cap; i++)
        n += snprintf(buf + n, cap - (size_t)n, "%s%lld", i ? ", " : "", (long long)t->dims[i]);
    if (n > 0 && (size_t)n < cap) snprintf(buf + n, cap - (size_t)n, "]>");
}

static int type_eq(const emu_type *a, const emu_type *b) {
    if (a->dtype != b->dtype || a->is_tensor != b->is_tensor || a->rank != b->rank) return 0;
    for (int i = 0; i < a->rank; i++) if (a->dims[i] != b->dims[i]) return 0;
    return 1;
}

static int64_t type_count(const emu_type *t) {
    int64_t c = 1;
    for (int i = 0; i < t->rank; i++) c *= t->dims[i];
    return c;
}

static int parse_type(lexer *L, emu_type *t) {
    memset(t, 0, sizeof *t);
    int line = L->tline;
    if (is_word(L, "bool")) { t->dtype = DT_BOOL; next(L); return AB_OK; }
    if (is_word(L, "string")) { t->dtype = DT_STRING; next(L); return AB_OK; }
    if (!is_word(L, "tensor"))
        return lex_fail(L, line, "expected a type (tensor<...>, bool or string), found '%s'", L->text);
    next(L);
    int rc;
    if ((rc = expect_punct(L, '<', "after 'tensor'"))) return rc;
    if (is_word(L, "fp16")) t->dtype = DT_FP16;
    else if (is_word(L, "fp32")) t->dtype = DT_FP32;
    else if (is_word(L, "int32")) t->dtype = DT_INT32;
    else return lex_fail(L, line, "unsupported tensor dtype '%s' (the emulator knows fp16, fp32, int32)", L->text);
    next(L);
    if ((rc = expect_punct(L, ',', "after the tensor dtype"))) return rc;
    if ((rc = expect_punct(L, '[', "to open the tensor shape"))) return rc;
    t->is_tensor = 1;
    int64_t count = 1;
    while (!is_punct(L, ']')) {
        if (t->rank == EMU_MAX_RANK) return lex_fail(L, line, "tensor rank above %d", EMU_MAX_RANK);
        int64_t d = 0;
        if ((rc = parse_int(L, &d, "a dimension"))) return rc;
        if (d <= 0) return lex_fail(L, line, "tensor dimension %lld must be positive", (long long)d);
        if (d > EMU_MAX_ELEMS / count) return lex_fail(L, line, "tensor too large");
        count *= d;
        t->dims[t->rank++] = d;
        if (is_punct(L, ',')) next(L);
        else if (!is_punct(L, ']')) return lex_fail(L, L->tline, "expected ',' or ']' in a shape, found '%s'", L->text);
    }
    next(L);
    if (t->rank == 0) return lex_fail(L, line, "a tensor needs at least one dimension");
    return expect_punct(L, '>', "to close the tensor type");
}

/* ---------------------------------------------------------------- program */

static void prog_free(emu_prog *P) {
    if (!P) return;
    ab_ane_workdir_remove(P->dir, P->owns_dir);
    for (int i = 0; i < P->nvals; i++) {
        free(P->vals[i].ivals);
        if (P->vals[i].owns_data) free(P->vals[i].data);
    }
    free(P->vals);
    free(P->ins);
    free(P->scratch);
    free(P);
}

static int find_value(const emu_prog *P, const char *name) {
    for (int i = 0; i < P->nvals; i++) if (strcmp(P->vals[i].name, name) == 0) return i;
    return -1;
}

/* An array with room for one more element (n used of *cap, size bytes
 * each): array itself while n < *cap, else array reallocated to twice *cap
 * (or first) elements; NULL, the failure reported, if memory ran out
 * (array then still valid and unchanged). */
static void *room_for_one(lexer *L, void *array, size_t size, int n, int *cap, int first) {
    if (n < *cap) return array;
    int c = *cap ? 2 * *cap : first;
    void *p = realloc(array, (size_t)c * size);
    if (!p) {
        ab_ane_fail(L->err, L->errcap, AB_ENOMEM, "out of memory parsing MIL");
        return NULL;
    }
    *cap = c;
    return p;
}

static int add_value(lexer *L, emu_prog *P, const char *name, const emu_type *t, int line) {
    if (find_value(P, name) >= 0) return lex_fail(L, line, "'%s' is defined twice", name);
    emu_value *vals = room_for_one(L, P->vals, sizeof *vals, P->nvals, &P->capvals, 32);
    if (!vals) return AB_ENOMEM;
    P->vals = vals;
    emu_value *v = &P->vals[P->nvals];
    memset(v, 0, sizeof *v);
    snprintf(v->name, sizeof v->name, "%s", name);
    v->t = *t;
    v->count = t->is_tensor ? type_count(t) : 1;
    v->line = line;
    P->nvals++;
    return AB_OK;
}

/* val = <literal> of a const, checked against the declared type. */
static int parse_literal(lexer *L, emu_value *v) {
    int rc, line = L->tline;
    char want[96];
    type_str(&v->t, want, sizeof want);
    if (is_word(L, "string")) {
        next(L);
        if ((rc = expect_punct(L, '(', "after 'string'"))) return rc;
        if (L->kind != TK_STR) return lex_fail(L, L->tline, "expected a quoted string, found '%s'", L->text);
        snprintf(v->str, sizeof v->str, "%s", L->text);
        next(L);
        if ((rc = expect_punct(L, ')', "after the string"))) return rc;
        if (v->t.dtype != DT_STRING || v->t.is_tensor)
            return lex_fail(L, line, "const '%s' is declared %s but its value is a string", v->name, want);
        return AB_OK;
    }
    if (is_word(L, "bool")) {
        next(L);
        if ((rc = expect_punct(L, '(', "after 'bool'"))) return rc;
        int b;
        if (is_word(L, "true")) b = 1;
        else if (is_word(L, "false")) b = 0;
        else return lex_fail(L, L->tline, "expected true or false, found '%s'", L->text);
        next(L);
        if ((rc = expect_punct(L, ')', "after the bool"))) return rc;
        if (v->t.dtype != DT_BOOL || v->t.is_tensor)
            return lex_fail(L, line, "const '%s' is declared %s but its value is a bool", v->name, want);
        v->ivals = malloc(sizeof(int32_t));
        if (!v->ivals) return ab_ane_fail(L->err, L->errcap, AB_ENOMEM, "out of memory");
        v->ivals[0] = b;
        return AB_OK;
    }
    emu_type lt;
    if ((rc = parse_type(L, &lt))) return rc;
    if (!lt.is_tensor || lt.dtype != DT_INT32 || lt.rank != 1)
        return lex_fail(L, line, "const values must be string(...), bool(...) or tensor<int32, [n]>(...)");
    if (!type_eq(&lt, &v->t)) {
        char got[96];
        type_str(&lt, got, sizeof got);
        return lex_fail(L, line, "const '%s' is declared %s but its value is %s", v->name, want, got);
    }
    if ((rc = expect_punct(L, '(', "before the tensor value"))) return rc;
    if ((rc = expect_punct(L, '[', "to open the tensor value"))) return rc;
    v->ivals = calloc((size_t)lt.dims[0], sizeof(int32_t));
    if (!v->ivals) return ab_ane_fail(L->err, L->errcap, AB_ENOMEM, "out of memory");
    int64_t n = 0;
    while (!is_punct(L, ']')) {
        int64_t x = 0;
        if ((rc = parse_int(L, &x, "a tensor element"))) return rc;
        if (n == lt.dims[0]) return lex_fail(L, line, "const '%s' has more than %lld values", v->name, (long long)lt.dims[0]);
        if (x < INT32_MIN || x > INT32_MAX) return lex_fail(L, line, "value %lld does not fit int32", (long long)x);
        v->ivals[n++] = (int32_t)x;
        if (is_punct(L, ',')) next(L);
        else if (!is_punct(L, ']')) return lex_fail(L, L->tline, "expected ',' or ']' in a tensor value, found '%s'", L->text);
    }
    next(L);
    if (n != lt.dims[0])
        return lex_fail(L, line, "const '%s' has %lld values, its type says %lld", v->name, (long long)n, (long long)lt.dims[0]);
    return expect_punct(L, ')', "after the tensor value");
}

typedef struct { char key[EMU_NAME]; int val; } emu_arg;

/* The argument named key, which must be a variable of the program. */
static int arg_get(lexer *L, emu_arg *args, int nargs, int *used, const char *op, const char *key,
                   int line) {
    for (int i = 0; i < nargs; i++)
        if (strcmp(args[i].key, key) == 0) { used[i] = 1; return args[i].val; }
    lex_fail(L, line, "%s needs the argument '%s'", op, key);
    return -1;
}

static int const_ints(lexer *L, emu_prog *P, int vi, int64_t n, const char *op, const char *key, int line) {
    emu_value *v = &P->vals[vi];
    if (!v->is_const || !v->t.is_tensor || v->t.dtype != DT_INT32 || v->t.rank != 1 || v->t.dims[0] != n)
        return lex_fail(L, line, "%s: '%s' must be a const tensor<int32, [%lld]>, '%s' is not", op, key,
                        (long long)n, v->name);
    return AB_OK;
}

static int const_bool(lexer *L, emu_prog *P, int vi, const char *op, const char *key, int line, int *out) {
    emu_value *v = &P->vals[vi];
    if (!v->is_const || v->t.is_tensor || v->t.dtype != DT_BOOL)
        return lex_fail(L, line, "%s: '%s' must be a const bool, '%s' is not", op, key, v->name);
    *out = v->ivals[0];
    return AB_OK;
}

/* A data operand: an fp16/fp32 tensor computed by the program (consts hold
 * int32/bool attribute values, no tensor data). */
static int want_tensor(lexer *L, emu_prog *P, int vi, const char *op, const char *key, int line) {
    emu_value *v = &P->vals[vi];
    if (!v->t.is_tensor || v->is_const || (v->t.dtype != DT_FP16 && v->t.dtype != DT_FP32))
        return lex_fail(L, line, "%s: '%s' must be an fp16 or fp32 tensor computed by the program, "
                        "'%s' is not", op, key, v->name);
    return AB_OK;
}

/* Check the op's arguments, compute its result type, fill the instruction. */
static int build_instr(lexer *L, emu_prog *P, const char *op, emu_arg *args, int nargs,
                       emu_instr *ix, emu_type *res, int line) {
    int used[16] = {0};
    int rc;
    memset(ix, 0, sizeof *ix);
    ix->line = line;
    memset(res, 0, sizeof *res);
#define ARG(var, key) do { var = arg_get(L, args, nargs, used, op, key, line); if (var < 0) return AB_ANE_EMIL; } while (0)
    if (strcmp(op, "cast") == 0) {
        int dt;
        ix->op = OP_CAST;
        ARG(ix->x, "x");
        ARG(dt, "dtype");
        if ((rc = want_tensor(L, P, ix->x, op, "x", line))) return rc;
        emu_value *d = &P->vals[dt];
        if (!d->is_const || d->t.dtype != DT_STRING || d->t.is_tensor)
            return lex_fail(L, line, "cast: 'dtype' must be a const string");
        *res = P->vals[ix->x].t;
        if (strcmp(d->str, "fp16") == 0) res->dtype = DT_FP16;
        else if (strcmp(d->str, "fp32") == 0) res->dtype = DT_FP32;
        else return lex_fail(L, line, "cast: dtype \"%s\" is not supported (fp16, fp32)", d->str);
    } else if (strcmp(op, "slice_by_size") == 0) {
        int b, s;
        ix->op = OP_SLICE;
        ARG(ix->x, "x");
        ARG(b, "begin");
        ARG(s, "size");
        if ((rc = want_tensor(L, P, ix->x, op, "x", line))) return rc;
        const emu_type *xt = &P->vals[ix->x].t;
        if ((rc = const_ints(L, P, b, xt->rank, op, "begin", line))) return rc;
        if ((rc = const_ints(L, P, s, xt->rank, op, "size", line))) return rc;
        *res = *xt;
        for (int i = 0; i < xt->rank; i++) {
            int64_t bi = P->vals[b].ivals[i], si = P->vals[s].ivals[i];
            if (si == -1) si = xt->dims[i] - bi;
            if (bi < 0 || si <= 0 || bi + si > xt->dims[i])
                return lex_fail(L, line, "slice_by_size: axis %d: begin %lld size %lld is outside the "
                                "input's %lld", i, (long long)bi, (long long)P->vals[s].ivals[i],
                                (long long)xt->dims[i]);
            ix->begin[i] = bi;
            res->dims[i] = si;
        }
    } else if (strcmp(op, "reshape") == 0) {
        int sh;
        ix->op = OP_RESHAPE;
        ARG(ix->x, "x");
        ARG(sh, "shape");
        if ((rc = want_tensor(L, P, ix->x, op, "x", line))) return rc;
        emu_value *sv = &P->vals[sh];
        if (!sv->is_const || !sv->t.is_tensor || sv->t.dtype != DT_INT32 || sv->t.rank != 1 ||
            sv->t.dims[0] > EMU_MAX_RANK)
            return lex_fail(L, line, "reshape: 'shape' must be a const tensor<int32, [n]>, n <= %d", EMU_MAX_RANK);
        const emu_type *xt = &P->vals[ix->x].t;
        int64_t have = type_count(xt), known = 1;
        int infer = -1;
        *res = *xt;
        res->rank = (int)sv->t.dims[0];
        for (int i = 0; i < res->rank; i++) {
            int64_t d = sv->ivals[i];
            if (d == -1 && infer < 0) { infer = i; continue; }
            if (d <= 0) return lex_fail(L, line, "reshape: dimension %lld is invalid", (long long)d);
            /* bounded before multiplying: the product never exceeds the input's count */
            if (d > have / known)
                return lex_fail(L, line, "reshape: %lld elements cannot take the requested shape", (long long)have);
            res->dims[i] = d;
            known *= d;
        }
        if (infer >= 0) res->dims[infer] = known > 0 && have % known == 0 ? have / known : -1;
        if (type_count(res) != have || (infer >= 0 && res->dims[infer] <= 0))
            return lex_fail(L, line, "reshape: %lld elements cannot take the requested shape", (long long)have);
    } else if (strcmp(op, "transpose") == 0) {
        int pm;
        ix->op = OP_TRANSPOSE;
        ARG(ix->x, "x");
        ARG(pm, "perm");
        if ((rc = want_tensor(L, P, ix->x, op, "x", line))) return rc;
        const emu_type *xt = &P->vals[ix->x].t;
        if ((rc = const_ints(L, P, pm, xt->rank, op, "perm", line))) return rc;
        int seen[EMU_MAX_RANK] = {0};
        *res = *xt;
        for (int i = 0; i < xt->rank; i++) {
            int p = P->vals[pm].ivals[i];
            if (p < 0 || p >= xt->rank || seen[p])
                return lex_fail(L, line, "transpose: perm is not a permutation of 0..%d", xt->rank - 1);
            seen[p] = 1;
            ix->perm[i] = p;
            res->dims[i] = xt->dims[p];
        }
    } else if (strcmp(op, "matmul") == 0) {
        int txv, tyv;
        ix->op = OP_MATMUL;
        ARG(ix->x, "x");
        ARG(ix->y, "y");
        ARG(txv, "transpose_x");
        ARG(tyv, "transpose_y");
        if ((rc = want_tensor(L, P, ix->x, op, "x", line))) return rc;
        if ((rc = want_tensor(L, P, ix->y, op, "y", line))) return rc;
        if ((rc = const_bool(L, P, txv, op, "transpose_x", line, &ix->tx))) return rc;
        if ((rc = const_bool(L, P, tyv, op, "transpose_y", line, &ix->ty))) return rc;
        const emu_type *xt = &P->vals[ix->x].t, *yt = &P->vals[ix->y].t;
        if (xt->dtype != yt->dtype || xt->rank != yt->rank || xt->rank < 2)
            return lex_fail(L, line, "matmul: x and y must have the same dtype and rank (>= 2)");
        int r = xt->rank;
        for (int i = 0; i < r - 2; i++)
            if (xt->dims[i] != yt->dims[i])
                return lex_fail(L, line, "matmul: batch axis %d differs (%lld vs %lld)", i,
                                (long long)xt->dims[i], (long long)yt->dims[i]);
        int64_t M = ix->tx ? xt->dims[r - 1] : xt->dims[r - 2], K = ix->tx ? xt->dims[r - 2] : xt->dims[r - 1];
        int64_t K2 = ix->ty ? yt->dims[r - 1] : yt->dims[r - 2], N = ix->ty ? yt->dims[r - 2] : yt->dims[r - 1];
        if (K != K2)
            return lex_fail(L, line, "matmul: inner dimensions differ (%lld vs %lld)", (long long)K, (long long)K2);
        *res = *xt;
        res->dims[r - 2] = M;
        res->dims[r - 1] = N;
    } else {
        return lex_fail(L, line, "unknown op '%s' (the emulator implements const, cast, slice_by_size, "
                        "reshape, transpose, matmul)", op);
    }
#undef ARG
    for (int i = 0; i < nargs; i++)
        if (!used[i]) return lex_fail(L, line, "%s has no argument '%s'", op, args[i].key);
    return AB_OK;
}

static int add_instr(lexer *L, emu_prog *P, const emu_instr *ix) {
    emu_instr *ins = room_for_one(L, P->ins, sizeof *ins, P->nins, &P->capins, 16);
    if (!ins) return AB_ENOMEM;
    P->ins = ins;
    P->ins[P->nins++] = *ix;
    return AB_OK;
}

/* <type> <name> = <op>(<args>)[<attrs>]; */
static int parse_statement(lexer *L, emu_prog *P) {
    int rc, line = L->tline;
    emu_type decl;
    char name[EMU_NAME], op[EMU_NAME];
    if ((rc = parse_type(L, &decl))) return rc;
    if ((rc = expect_ident(L, name, sizeof name, "a variable name"))) return rc;
    if ((rc = expect_punct(L, '=', "after the variable name"))) return rc;
    if ((rc = expect_ident(L, op, sizeof op, "an op name"))) return rc;
    if ((rc = expect_punct(L, '(', "after the op name"))) return rc;
    emu_arg args[16];
    int nargs = 0;
    while (!is_punct(L, ')')) {
        if (nargs == 16) return lex_fail(L, line, "too many arguments");
        if ((rc = expect_ident(L, args[nargs].key, sizeof args[nargs].key, "an argument name"))) return rc;
        if ((rc = expect_punct(L, '=', "after the argument name"))) return rc;
        char ref[EMU_NAME];
        if (L->kind != TK_IDENT)
            return lex_fail(L, L->tline, "argument '%s' must name a variable (declare constants with const()), "
                            "found '%s'", args[nargs].key, L->text);
        if ((rc = expect_ident(L, ref, sizeof ref, "a variable"))) return rc;
        args[nargs].val = find_value(P, ref);
        if (args[nargs].val < 0) return lex_fail(L, line, "'%s' is used before it is defined", ref);
        for (int i = 0; i < nargs; i++)
            if (strcmp(args[i].key, args[nargs].key) == 0)
                return lex_fail(L, line, "argument '%s' is given twice", args[i].key);
        nargs++;
        if (is_punct(L, ',')) next(L);
        else if (!is_punct(L, ')')) return lex_fail(L, L->tline, "expected ',' or ')' in the arguments, found '%s'", L->text);
    }
    next(L);
    int is_const = strcmp(op, "const") == 0;
    if (is_const && nargs) return lex_fail(L, line, "const takes no arguments, only [val = ...]");
    if ((rc = add_value(L, P, name, &decl, line))) return rc;
    int vi = P->nvals - 1;
    int have_val = 0;
    if (is_punct(L, '[')) {
        next(L);
        while (!is_punct(L, ']')) {
            char key[EMU_NAME];
            if ((rc = expect_ident(L, key, sizeof key, "an attribute name"))) return rc;
            if ((rc = expect_punct(L, '=', "after the attribute name"))) return rc;
            if (strcmp(key, "val") == 0 && is_const) {
                if (have_val) return lex_fail(L, L->tline, "const '%s' has 'val' twice", name);
                if ((rc = parse_literal(L, &P->vals[vi]))) return rc;
                have_val = 1;
            } else if (strcmp(key, "name") == 0) {
                if (!is_word(L, "string")) return lex_fail(L, L->tline, "name must be string(\"...\")");
                next(L);
                if ((rc = expect_punct(L, '(', "after 'string'"))) return rc;
                if (L->kind != TK_STR) return lex_fail(L, L->tline, "expected a quoted name");
                next(L);
                if ((rc = expect_punct(L, ')', "after the name"))) return rc;
            } else {
                return lex_fail(L, line, "unsupported attribute '%s' on %s", key, op);
            }
            if (is_punct(L, ',')) next(L);
            else if (!is_punct(L, ']')) return lex_fail(L, L->tline, "expected ',' or ']' in attributes, found '%s'", L->text);
        }
        next(L);
    }
    if ((rc = expect_punct(L, ';', "at the end of the statement"))) return rc;
    if (is_const) {
        if (!have_val) return lex_fail(L, line, "const '%s' has no val", name);
        P->vals[vi].is_const = 1;
        return AB_OK;
    }
    emu_instr ix;
    emu_type res;
    if ((rc = build_instr(L, P, op, args, nargs, &ix, &res, line))) return rc;
    if (!type_eq(&res, &decl)) {
        char d[96], r[96];
        type_str(&decl, d, sizeof d);
        type_str(&res, r, sizeof r);
        return lex_fail(L, line, "'%s' is declared %s but %s gives %s", name, d, op, r);
    }
    ix.out = vi;
    return add_instr(L, P, &ix);
}

static int parse_program(lexer *L, emu_prog *P) {
    int rc;
    next(L);
    if (!is_word(L, "program")) return lex_fail(L, L->tline, "a MIL program starts with 'program(<version>)', found '%s'", L->text);
    next(L);
    if ((rc = expect_punct(L, '(', "after 'program'"))) return rc;
    if (L->kind != TK_NUM) return lex_fail(L, L->tline, "expected the program version, found '%s'", L->text);
    next(L);
    if ((rc = expect_punct(L, ')', "after the program version"))) return rc;
    if (is_punct(L, '[')) {                     /* program attributes (buildInfo): skipped */
        int depth = 0;
        do {
            if (L->kind == TK_EOF) return lex_fail(L, L->tline, "unterminated program attributes");
            if (is_punct(L, '[')) depth++;
            if (is_punct(L, ']')) depth--;
            next(L);
        } while (depth > 0);
    }
    if ((rc = expect_punct(L, '{', "to open the program"))) return rc;
    if (!is_word(L, "func")) return lex_fail(L, L->tline, "expected 'func', found '%s'", L->text);
    next(L);
    if (!is_word(L, "main")) return lex_fail(L, L->tline, "the function must be 'main', found '%s'", L->text);
    next(L);
    if (is_punct(L, '<')) {                     /* opset, e.g. <ios18> */
        next(L);
        if (L->kind != TK_IDENT) return lex_fail(L, L->tline, "expected an opset name, found '%s'", L->text);
        next(L);
        if ((rc = expect_punct(L, '>', "after the opset"))) return rc;
    }
    if ((rc = expect_punct(L, '(', "to open the inputs"))) return rc;
    int ninputs = 0, line = L->tline;
    while (!is_punct(L, ')')) {
        emu_type t;
        char name[EMU_NAME];
        if ((rc = parse_type(L, &t))) return rc;
        if (!t.is_tensor || t.dtype == DT_INT32)
            return lex_fail(L, L->tline, "inputs must be fp16 or fp32 tensors");
        if ((rc = expect_ident(L, name, sizeof name, "an input name"))) return rc;
        if ((rc = add_value(L, P, name, &t, line))) return rc;
        P->input = P->nvals - 1;
        ninputs++;
        if (is_punct(L, ',')) next(L);
        else if (!is_punct(L, ')')) return lex_fail(L, L->tline, "expected ',' or ')' after an input, found '%s'", L->text);
    }
    next(L);
    if (ninputs != 1)
        return lex_fail(L, line, "main has %d inputs; an ANE request takes exactly one (pack several "
                        "tensors along the spatial axis of one input)", ninputs);
    if ((rc = expect_punct(L, '{', "to open the function body"))) return rc;
    while (!is_punct(L, '}')) {
        if (L->kind == TK_EOF) return lex_fail(L, L->tline, "the function body is not closed with '}'");
        if ((rc = parse_statement(L, P))) return rc;
    }
    next(L);
    if (L->kind != TK_ARROW) return lex_fail(L, L->tline, "expected '-> (<output>)' after the function body, found '%s'", L->text);
    next(L);
    if ((rc = expect_punct(L, '(', "after '->'"))) return rc;
    char out[EMU_NAME];
    line = L->tline;
    if ((rc = expect_ident(L, out, sizeof out, "the output name"))) return rc;
    if (is_punct(L, ',')) return lex_fail(L, line, "several outputs are not supported (one output surface)");
    if ((rc = expect_punct(L, ')', "after the output"))) return rc;
    if ((rc = expect_punct(L, ';', "after the outputs"))) return rc;
    if ((rc = expect_punct(L, '}', "to close the program"))) return rc;
    if (L->kind != TK_EOF) return lex_fail(L, L->tline, "text after the end of the program: '%s'", L->text);
    P->output = find_value(P, out);
    if (P->output < 0) return lex_fail(L, line, "output '%s' is not defined", out);
    const emu_value *o = &P->vals[P->output];
    if (!o->t.is_tensor || o->t.dtype == DT_INT32 || o->is_const)
        return lex_fail(L, line, "output '%s' must be a computed fp16 or fp32 tensor", out);
    const emu_value *in = &P->vals[P->input];
    P->in_bytes = (size_t)in->count * dt_size(in->t.dtype);
    P->out_bytes = (size_t)o->count * dt_size(o->t.dtype);
    return AB_OK;
}

/* Like the darwin platform: <root>/<identifier>/model.mil, the identifier a
 * hash of the program text (FNV-1a, as hex), when a root is set. */
static int emu_workdir(emu_prog *P, const char *mil, size_t len, char *err, size_t errcap) {
    char root[sizeof g_workdir];
    pthread_mutex_lock(&g_hook_mu);
    snprintf(root, sizeof root, "%s", g_workdir);
    pthread_mutex_unlock(&g_hook_mu);
    if (!root[0]) return AB_OK;
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < len; i++) { h ^= (unsigned char)mil[i]; h *= 1099511628211ull; }
    char name[24];
    snprintf(name, sizeof name, "%016llx", (unsigned long long)h);
    return ab_ane_workdir_create(root, name, mil, len, P->dir, sizeof P->dir, &P->owns_dir, err, errcap);
}

static const char *emu_program_dir(void *prog) { return ((emu_prog *)prog)->dir; }

static int emu_compile(const char *mil, size_t len, void **prog, char *err, size_t errcap) {
    *prog = NULL;
    int rc = take_failure(FAIL_COMPILE, AB_ANE_ECOMPILE, err, errcap);
    if (rc) return rc;
    emu_prog *P = calloc(1, sizeof *P);
    if (!P) return ab_ane_fail(err, errcap, AB_ENOMEM, "out of memory");
    lexer L = {mil, mil + len, 1, TK_EOF, 1, "", err, errcap, 0};
    rc = parse_program(&L, P);
    if (!rc) rc = emu_workdir(P, mil, len, err, errcap);
    if (rc) { prog_free(P); return rc; }
    *prog = P;
    return AB_OK;
}

/* Storage for every computed tensor (reshape results alias their input),
 * plus the fp32 scratch matmul needs: allocated once, reused by each eval. */
static int emu_load(void *prog, char *err, size_t errcap) {
    emu_prog *P = prog;
    int rc = take_failure(FAIL_LOAD, AB_ANE_ELOAD, err, errcap);
    if (rc) return rc;
    if (P->loaded) return AB_OK;
    int64_t scratch = 0, total = 0;
    for (int i = 0; i < P->nins; i++) {           /* bounded before anything is allocated */
        const emu_value *o = &P->vals[P->ins[i].out];
        if (P->ins[i].op != OP_RESHAPE) total += o->count * (int64_t)dt_size(o->t.dtype);
        if (total > EMU_MAX_PROGRAM_BYTES)
            return ab_ane_fail(err, errcap, AB_ENOMEM, "the program's tensors need more than the emulator's "
                               "limit of %lld bytes", (long long)EMU_MAX_PROGRAM_BYTES);
    }
    for (int i = 0; i < P->nins; i++) {
        emu_instr *ix = &P->ins[i];
        emu_value *o = &P->vals[ix->out];
        if (ix->op != OP_RESHAPE) {
            o->data = malloc((size_t)o->count * dt_size(o->t.dtype));
            if (!o->data) return ab_ane_fail(err, errcap, AB_ENOMEM, "out of memory loading the program");
            o->owns_data = 1;
        }
        if (ix->op == OP_MATMUL && o->t.dtype == DT_FP16) {
            const emu_type *xt = &P->vals[ix->x].t, *yt = &P->vals[ix->y].t;
            int r = xt->rank;
            int64_t need = xt->dims[r - 1] * xt->dims[r - 2] + yt->dims[r - 1] * yt->dims[r - 2] +
                           o->t.dims[r - 1] * o->t.dims[r - 2];
            if (need > scratch) scratch = need;
        }
    }
    if (scratch > 0) {
        P->scratch = malloc((size_t)scratch * sizeof(float));
        if (!P->scratch) return ab_ane_fail(err, errcap, AB_ENOMEM, "out of memory loading the program");
        P->scratch_floats = scratch;
    }
    P->loaded = 1;
    return AB_OK;
}

static void row_major_strides(const emu_type *t, int64_t *st) {
    int64_t s = 1;
    for (int i = t->rank - 1; i >= 0; i--) { st[i] = s; s *= t->dims[i]; }
}

/* out[idx] = in[sum idx_k * src_stride_k + base] over the output shape. */
static void gather(void *out, const void *in, const emu_type *ot, const int64_t *src_stride,
                   int64_t base, size_t es) {
    int r = ot->rank;
    int64_t idx[EMU_MAX_RANK] = {0};
    int64_t inner = ot->dims[r - 1], sinner = src_stride[r - 1];
    int64_t outer = type_count(ot) / inner;
    unsigned char *o = out;
    const unsigned char *s = in;
    for (int64_t k = 0; k < outer; k++) {
        int64_t off = base;
        for (int i = 0; i < r - 1; i++) off += idx[i] * src_stride[i];
        if (sinner == 1) {
            memcpy(o, s + (size_t)off * es, (size_t)inner * es);
        } else if (es == 2) {
            uint16_t *o2 = (uint16_t *)(void *)o;
            const uint16_t *s2 = (const uint16_t *)(const void *)s + off;
            for (int64_t j = 0; j < inner; j++) o2[j] = s2[j * sinner];
        } else {
            uint32_t *o4 = (uint32_t *)(void *)o;
            const uint32_t *s4 = (const uint32_t *)(const void *)s + off;
            for (int64_t j = 0; j < inner; j++) o4[j] = s4[j * sinner];
        }
        o += (size_t)inner * es;
        for (int i = r - 2; i >= 0; i--) {      /* odometer over the outer axes */
            if (++idx[i] < ot->dims[i]) break;
            idx[i] = 0;
        }
    }
}

static void run_matmul(emu_prog *P, const emu_instr *ix) {
    emu_value *x = &P->vals[ix->x], *y = &P->vals[ix->y], *o = &P->vals[ix->out];
    int r = x->t.rank;
    int64_t xr = x->t.dims[r - 2], xc = x->t.dims[r - 1], yr = y->t.dims[r - 2], yc = y->t.dims[r - 1];
    int64_t M = o->t.dims[r - 2], N = o->t.dims[r - 1], K = ix->tx ? xr : xc;
    int64_t batch = x->count / (xr * xc);
    for (int64_t b = 0; b < batch; b++) {
        if (o->t.dtype == DT_FP32) {
            const float *A = (const float *)x->data + b * xr * xc, *B = (const float *)y->data + b * yr * yc;
            ab_sgemm(ix->tx, ix->ty, M, N, K, 1.0f, A, xc, B, yc, 0.0f, (float *)o->data + b * M * N, N);
        } else {
            /* fp16 operands are exact in fp32; accumulate in fp32, store fp16 */
            float *A = P->scratch, *B = A + xr * xc, *C = B + yr * yc;
            ab_ane_f16_to_f32(A, (const uint16_t *)x->data + b * xr * xc, xr * xc);
            ab_ane_f16_to_f32(B, (const uint16_t *)y->data + b * yr * yc, yr * yc);
            ab_sgemm(ix->tx, ix->ty, M, N, K, 1.0f, A, xc, B, yc, 0.0f, C, N);
            if (g_saturate)          /* clamp at fp16's largest finite value, NaN kept */
                for (int64_t i = 0; i < M * N; i++)
                    C[i] = C[i] > 65504.0f ? 65504.0f : (C[i] < -65504.0f ? -65504.0f : C[i]);
            ab_ane_f32_to_f16((uint16_t *)o->data + b * M * N, C, M * N);
        }
    }
}

static void emu_unload(void *prog) { prog_free(prog); }

/* Surfaces: a heap block with its size in front. */
typedef struct { size_t bytes; int locked; unsigned char *data; } emu_surface;

static int emu_surface_create(size_t bytes, void **surface, char *err, size_t errcap) {
    emu_surface *s = calloc(1, sizeof *s);
    if (s) s->data = calloc(bytes ? bytes : 1, 1);
    if (!s || !s->data) {
        free(s);
        *surface = NULL;
        return ab_ane_fail(err, errcap, AB_ANE_ESURFACE, "cannot allocate a %zu-byte surface", bytes);
    }
    s->bytes = bytes;
    *surface = s;
    return AB_OK;
}

static void *emu_surface_lock(void *surface, int read_only) {
    emu_surface *s = surface;
    if (!s || s->locked) return NULL;
    s->locked = 1;
    return s->data;
}

static void emu_surface_unlock(void *surface, int read_only) { ((emu_surface *)surface)->locked = 0; }

static void emu_surface_release(void *surface) {
    emu_surface *s = surface;
    if (s) free(s->data);
    free(s);
}

/* A request: the program and the two surfaces it binds. */
typedef struct { emu_prog *prog; emu_surface *in, *out; } emu_request;

static int emu_request_create(void *prog, void *in_surface, void *out_surface, void **req, char *err,
                              size_t errcap) {
    emu_request *r = malloc(sizeof *r);
    *req = r;
    if (!r) return ab_ane_fail(err, errcap, AB_ENOMEM, "out of memory");
    *r = (emu_request){prog, in_surface, out_surface};
    return AB_OK;
}

static void emu_request_release(void *req) { free(req); }

static int emu_eval(void *prog, void *req, char *err, size_t errcap) {
    emu_prog *P = prog;
    emu_request *r = req;
    int rc = take_failure(FAIL_EVAL, AB_ANE_EEVAL, err, errcap);
    if (rc) return rc;
    if (!P->loaded) return ab_ane_fail(err, errcap, AB_ANE_EEVAL, "evaluate: the program is not loaded");
    if (!r || r->prog != P)
        return ab_ane_fail(err, errcap, AB_ANE_EEVAL, "evaluate: the request belongs to another program");
    emu_surface *si = r->in, *so = r->out;
    if (!si || !so || si->bytes != P->in_bytes || so->bytes != P->out_bytes)
        return ab_ane_fail(err, errcap, AB_ANE_EEVAL, "evaluate: surfaces of %zu/%zu bytes, the program "
                           "needs %zu in and %zu out", si ? si->bytes : 0, so ? so->bytes : 0,
                           P->in_bytes, P->out_bytes);
    P->vals[P->input].data = si->data;
    for (int i = 0; i < P->nins; i++) {
        const emu_instr *ix = &P->ins[i];
        emu_value *x = &P->vals[ix->x], *o = &P->vals[ix->out];
        int64_t st[EMU_MAX_RANK], src[EMU_MAX_RANK];
        switch (ix->op) {
        case OP_CAST:
            if (x->t.dtype == o->t.dtype) memcpy(o->data, x->data, (size_t)o->count * dt_size(o->t.dtype));
            else if (o->t.dtype == DT_FP16) ab_ane_f32_to_f16(o->data, x->data, o->count);
            else ab_ane_f16_to_f32(o->data, x->data, o->count);
            break;
        case OP_SLICE: {
            row_major_strides(&x->t, st);
            int64_t base = 0;
            for (int k = 0; k < x->t.rank; k++) base += ix->begin[k] * st[k];
            gather(o->data, x->data, &o->t, st, base, dt_size(o->t.dtype));
            break;
        }
        case OP_RESHAPE:
            o->data = x->data;
            break;
        case OP_TRANSPOSE:
            row_major_strides(&x->t, st);
            for (int k = 0; k < o->t.rank; k++) src[k] = st[ix->perm[k]];
            gather(o->data, x->data, &o->t, src, 0, dt_size(o->t.dtype));
            break;
        case OP_MATMUL:
            run_matmul(P, ix);
            break;
        }
    }
    memcpy(so->data, P->vals[P->output].data, P->out_bytes);
    P->vals[P->input].data = NULL;
    return AB_OK;
}

static int emu_probe(char *err, size_t errcap) { return AB_OK; }

const ab_ane_platform ab_ane_platform_emulated = {
    "emulated", 0, emu_probe, emu_compile, emu_load, emu_request_create, emu_request_release, emu_eval,
    emu_unload, emu_program_dir,
    emu_surface_create, emu_surface_lock, emu_surface_unlock, emu_surface_release,
};
