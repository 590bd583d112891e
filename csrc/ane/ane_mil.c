/* ane_mil.c — MIL program text for the ANE kernels.
 *
 * dx = dy · W with dynamic weights. The ANE compiles only ~119 programs per
 * process, so weights that change every optimiser step cannot be baked in as
 * constants; and a request with several inputs fails, so dy and W travel in
 * ONE fp16 input, packed along the spatial axis (channels = out, the
 * contracted dimension):
 *
 *   packed[1, out, 1, S + in]:  [:, o, :, t]     = dy[t, o]   for t < S
 *                               [:, o, :, S + i] = W[o, i]    (row o of W as is)
 *
 * The program slices the two parts, views them as matrices, and multiplies
 *   dx_rows[S, in] = transpose(dy^T)[S, out] · W[out, in]
 * then returns dx as it comes, token-major: [1, S, 1, in], row t of dx in
 * "channel" t. That is the layout of the CPU's tensors, so the result needs
 * no transpose back, on the ANE or on the CPU (a channels-first [1, in, 1,
 * S] result would need both). Ops used: const, slice_by_size, reshape,
 * transpose, matmul — the emulator implements these (plus cast). Values
 * are fp16 end to end; the caller scales dy first. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include "ab_internal.h"
#include "ane_internal.h"

typedef struct {
    char *buf;
    int64_t cap, len;
} mil_out;

/* Appends the formatted text: written while it fits, always counted in len
 * (so a too-small buffer still learns the whole length). */
__attribute__((format(printf, 2, 0)))
static void vput(mil_out *o, const char *fmt, va_list ap) {
    int64_t room = o->len < o->cap ? o->cap - o->len : 0;
    int n = vsnprintf(room ? o->buf + o->len : NULL, (size_t)room, fmt, ap);
    if (n > 0) o->len += n;
}

__attribute__((format(printf, 2, 3)))
static void put(mil_out *o, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vput(o, fmt, ap);
    va_end(ap);
}

/* Header every program starts with: MIL program version and the build info
 * the Core ML compiler writes (the ANE compiler accepts this header). */
static void put_header(mil_out *o) {
    put(o, "program(1.3)\n"
           "[buildInfo = dict<string, string>({{\"coremlc-component-MIL\", \"3510.2.1\"}, "
           "{\"coremlc-version\", \"3505.4.1\"}, {\"coremltools-component-milinternal\", \"\"}, "
           "{\"coremltools-version\", \"9.0\"}})]\n"
           "{\n");
}

/* tag (may be NULL) is appended to the op's name string, a free-form label. */
static void put_const4_tagged(mil_out *o, const char *name, const char *tag, int64_t a, int64_t b,
                              int64_t c, int64_t d) {
    put(o, "        tensor<int32, [4]> %s = const()[name = string(\"%s%s%s\"), "
           "val = tensor<int32, [4]>([%lld, %lld, %lld, %lld])];\n",
        name, name, tag ? "_" : "", tag ? tag : "", (long long)a, (long long)b, (long long)c, (long long)d);
}

static void put_const4(mil_out *o, const char *name, int64_t a, int64_t b, int64_t c, int64_t d) {
    put_const4_tagged(o, name, NULL, a, b, c, d);
}

/* tensor<fp16, [a, b, c, d]> name = op(args)[name = string("name")]; */
__attribute__((format(printf, 7, 8)))
static void put_op(mil_out *o, const char *name, int64_t a, int64_t b, int64_t c, int64_t d,
                   const char *op_and_args, ...) {
    put(o, "        tensor<fp16, [%lld, %lld, %lld, %lld]> %s = ",
        (long long)a, (long long)b, (long long)c, (long long)d, name);
    va_list ap;
    va_start(ap, op_and_args);
    vput(o, op_and_args, ap);
    va_end(ap);
    put(o, "[name = string(\"%s\")];\n", name);
}

int ab_ane_mil_linear_dx(char *buf, int64_t cap, int64_t S, int64_t in, int64_t out, int64_t *len) {
    return ab_ane_mil_linear_dx_tagged(buf, cap, S, in, out, NULL, len);
}

int ab_ane_mil_linear_dx_tagged(char *buf, int64_t cap, int64_t S, int64_t in, int64_t out,
                                const char *tag, int64_t *len) {
    if (!len) return AB_FAIL(AB_ENULL, NULL);
    *len = 0;
    if (S <= 0 || in <= 0 || out <= 0 || cap < 0) return AB_FAIL(AB_EINVAL, NULL);
    if (cap > 0 && buf == NULL) return AB_FAIL(AB_ENULL, NULL);
    if (S > INT32_MAX || in > INT32_MAX - S || out > INT32_MAX) return AB_FAIL(AB_ETOOBIG, NULL);
    if (tag) {                                   /* a label: letters, digits, '_' */
        if (strlen(tag) > 64) return AB_FAIL(AB_EINVAL, NULL);
        for (const char *t = tag; *t; t++)
            if (!((*t >= 'a' && *t <= 'z') || (*t >= 'A' && *t <= 'Z') || (*t >= '0' && *t <= '9') || *t == '_'))
                return AB_FAIL(AB_EINVAL, NULL);
    }
    mil_out o = {buf, cap, 0};
    if (cap > 0) buf[0] = '\0';
    put_header(&o);
    put(&o, "    func main<ios18>(tensor<fp16, [1, %lld, 1, %lld]> packed) {\n",
        (long long)out, (long long)(S + in));
    /* dy^T: channels 0..out, spatial 0..S */
    /* The tag (per process and context) only labels this op: the compiler's
     * working directory is named after a hash of the program, so the label
     * keeps two contexts or processes out of each other's (ane_workdir.c). */
    put_const4_tagged(&o, "dy_begin", tag, 0, 0, 0, 0);
    put_const4(&o, "dy_size", 1, out, 1, S);
    put_op(&o, "dy_cf", 1, out, 1, S, "slice_by_size(x = packed, begin = dy_begin, size = dy_size)");
    /* W: channels 0..out, spatial S..S+in */
    put_const4(&o, "w_begin", 0, 0, 0, S);
    put_const4(&o, "w_size", 1, out, 1, in);
    put_op(&o, "w_cf", 1, out, 1, in, "slice_by_size(x = packed, begin = w_begin, size = w_size)");
    /* [1, out, 1, S] -> [1, 1, out, S] -> [1, 1, S, out]: the rows of dy */
    put_const4(&o, "dy_mat_shape", 1, 1, out, S);
    put_op(&o, "dy_mat", 1, 1, out, S, "reshape(shape = dy_mat_shape, x = dy_cf)");
    put_const4(&o, "swap_last2", 0, 1, 3, 2);
    put_op(&o, "dy_rows", 1, 1, S, out, "transpose(perm = swap_last2, x = dy_mat)");
    /* [1, out, 1, in] -> [1, 1, out, in]: W as a matrix */
    put_const4(&o, "w_mat_shape", 1, 1, out, in);
    put_op(&o, "w_mat", 1, 1, out, in, "reshape(shape = w_mat_shape, x = w_cf)");
    put(&o, "        bool no_transpose = const()[name = string(\"no_transpose\"), val = bool(false)];\n");
    put_op(&o, "dx_rows", 1, 1, S, in,
           "matmul(transpose_x = no_transpose, transpose_y = no_transpose, x = dy_rows, y = w_mat)");
    /* token-major out: [1, 1, S, in] -> [1, S, 1, in], no data movement */
    put_const4(&o, "dx_shape", 1, S, 1, in);
    put_op(&o, "dx", 1, S, 1, in, "reshape(shape = dx_shape, x = dx_rows)");
    put(&o, "    } -> (dx);\n}\n");
    *len = o.len;
    return AB_OK;
}
