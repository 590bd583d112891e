/* ane_convert.c — fp32 <-> fp16 conversion and the layout transposes between
 * token-major rows [N, C] and the ANE's channels-first [1, C, 1, S] tensors.
 *
 * fp16 is IEEE binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits.
 * fp32 -> fp16 rounds to nearest, ties to even; values from 65520 up become
 * inf; values below 2^-14 become subnormals (multiples of 2^-24) and values
 * up to 2^-25 (inclusive, a tie to even) become zero; NaN stays NaN (quiet,
 * top payload bits kept) — the same results as F16C's VCVTPS2PH with
 * round-to-nearest and as NEON's FCVTN under the default FPCR.
 *
 * Vector paths: F16C on x86-64 (the default build has no -mf16c, so the
 * functions carry a target attribute and are chosen by a runtime CPU check)
 * and NEON on arm64 (always present). The scalar path is the fallback and
 * the reference in the tests. */
#include <string.h>
#include "ab_internal.h"
#include "ane_internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define AB_HAVE_F16C_CODE 1
#elif defined(__aarch64__)
#include <arm_neon.h>
#define AB_HAVE_NEON_F16 1
#endif

static inline uint16_t f32_to_f16_one(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) {                       /* inf or NaN */
        if (ax == 0x7f800000u) return (uint16_t)(sign | 0x7c00u);
        return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    }
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);   /* >= 65520 */
    if (ax < 0x38800000u) {                        /* below 2^-14: subnormal */
        if (ax <= 0x33000000u) return (uint16_t)sign;           /* <= 2^-25 */
        uint32_t e = ax >> 23;                     /* 102 .. 112 */
        uint32_t m = (ax & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - e;                 /* 14 .. 24 */
        uint32_t h = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (h & 1u))) h++;   /* may carry to 2^-14 */
        return (uint16_t)(sign | h);
    }
    uint32_t h = (ax - 0x38000000u) >> 13;         /* rebias 127 -> 15 */
    uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
    return (uint16_t)(sign | h);
}

static inline float f16_to_f32_one(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu, bits;
    if (e == 0x1f) {
        bits = sign | 0x7f800000u | (m << 13);
    } else if (e == 0) {
        float v = (float)m * 0x1p-24f;             /* subnormal or zero, exact */
        memcpy(&bits, &v, sizeof bits);
        bits |= sign;
    } else {
        bits = sign | ((e + 112u) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* The public converters' one argument check: n >= 0, pointers set unless n == 0. */
static int convert_args_ok(const void *dst, const void *src, int64_t n) {
    AB_NONNEG(n);
    AB_REQUIRE(n == 0 || (dst && src), AB_ENULL);
    return AB_OK;
}

static void f32_to_f16_scalar(uint16_t *dst, const float *src, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = f32_to_f16_one(src[i]);
}

static void f16_to_f32_scalar(float *dst, const uint16_t *src, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = f16_to_f32_one(src[i]);
}

#if defined(AB_HAVE_F16C_CODE)
__attribute__((target("avx,f16c")))
static void f32_to_f16_f16c(uint16_t *dst, const float *src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i *)(void *)(dst + i), h);
    }
    for (; i < n; i++) dst[i] = f32_to_f16_one(src[i]);
}

__attribute__((target("avx,f16c")))
static void f16_to_f32_f16c(float *dst, const uint16_t *src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(src + i))));
    for (; i < n; i++) dst[i] = f16_to_f32_one(src[i]);
}

static int have_f16c(void) {
    static int cached = -1;     /* every thread computes the same value; atomics keep it race-free */
    int c = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (c < 0) {
        __builtin_cpu_init();
        c = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
        __atomic_store_n(&cached, c, __ATOMIC_RELAXED);
    }
    return c;
}
#endif

#if defined(AB_HAVE_NEON_F16)
static void f32_to_f16_neon(uint16_t *dst, const float *src, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        vst1_u16(dst + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(src + i))));
    for (; i < n; i++) dst[i] = f32_to_f16_one(src[i]);
}

static void f16_to_f32_neon(float *dst, const uint16_t *src, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        vst1q_f32(dst + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(src + i))));
    for (; i < n; i++) dst[i] = f16_to_f32_one(src[i]);
}
#endif

/* A conversion path: its name (ab_ane_fp16_path) and both directions. */
typedef struct {
    const char *name;
    void (*to_f16)(uint16_t *dst, const float *src, int64_t n);
    void (*to_f32)(float *dst, const uint16_t *src, int64_t n);
} fp16_path;

static const fp16_path SCALAR_PATH = {"scalar", f32_to_f16_scalar, f16_to_f32_scalar};
#if defined(AB_HAVE_F16C_CODE)
static const fp16_path F16C_PATH = {"f16c", f32_to_f16_f16c, f16_to_f32_f16c};
#elif defined(AB_HAVE_NEON_F16)
static const fp16_path NEON_PATH = {"neon", f32_to_f16_neon, f16_to_f32_neon};
#endif

/* The one choice of path: F16C where the CPU has it, NEON on arm64, else scalar. */
static const fp16_path *fp16_path_here(void) {
#if defined(AB_HAVE_F16C_CODE)
    return have_f16c() ? &F16C_PATH : &SCALAR_PATH;
#elif defined(AB_HAVE_NEON_F16)
    return &NEON_PATH;
#else
    return &SCALAR_PATH;
#endif
}

/* The converters' bodies, one per direction: the argument check, then the path's loop. */
static int to_f16(const fp16_path *p, uint16_t *dst, const float *src, int64_t n) {
    int rc = convert_args_ok(dst, src, n);
    if (!rc) p->to_f16(dst, src, n);
    return rc;
}

static int to_f32(const fp16_path *p, float *dst, const uint16_t *src, int64_t n) {
    int rc = convert_args_ok(dst, src, n);
    if (!rc) p->to_f32(dst, src, n);
    return rc;
}

int ab_ane_f32_to_f16(uint16_t *dst, const float *src, int64_t n) {
    return to_f16(fp16_path_here(), dst, src, n);
}
int ab_ane_f16_to_f32(float *dst, const uint16_t *src, int64_t n) {
    return to_f32(fp16_path_here(), dst, src, n);
}
int ab_ane_f32_to_f16_scalar(uint16_t *dst, const float *src, int64_t n) {
    return to_f16(&SCALAR_PATH, dst, src, n);
}
int ab_ane_f16_to_f32_scalar(float *dst, const uint16_t *src, int64_t n) {
    return to_f32(&SCALAR_PATH, dst, src, n);
}

const char *ab_ane_fp16_path(void) { return fp16_path_here()->name; }

/* Blocked transposes: 32x32 blocks keep both the row reads and the channel
 * writes within a few cache lines. */
#define AB_TB 32

/* The transposes' argument check: sizes >= 0, ld >= N, pointers set unless empty. */
static int transpose_args_ok(const float *dst, const float *src, int64_t ld, int64_t N, int64_t C) {
    AB_NONNEG(N);
    AB_NONNEG(C);
    AB_REQUIRE(ld >= N, AB_EINVAL);
    AB_REQUIRE(N == 0 || C == 0 || (dst && src), AB_ENULL);
    return AB_OK;
}

/* Both transposes: dst[i*ldd + j] (+)= src[j*lds + i] * scale for i < R,
 * j < J, block by block; each row i of a block is written contiguously. */
static void transpose_scaled(float *dst, int64_t ldd, const float *src, int64_t lds, int64_t R,
                             int64_t J, float scale, int accumulate) {
    for (int64_t i0 = 0; i0 < R; i0 += AB_TB) {
        int64_t i1 = i0 + AB_TB < R ? i0 + AB_TB : R;
        for (int64_t j0 = 0; j0 < J; j0 += AB_TB) {
            int64_t j1 = j0 + AB_TB < J ? j0 + AB_TB : J;
            for (int64_t i = i0; i < i1; i++) {
                float *d = dst + i * ldd;
                const float *s = src + i;
                if (accumulate) {
                    for (int64_t j = j0; j < j1; j++) d[j] += s[j * lds] * scale;
                } else {
                    for (int64_t j = j0; j < j1; j++) d[j] = s[j * lds] * scale;
                }
            }
        }
    }
}

/* dst[c*ld + t] = src[t*C + c] * scale  for t < N, c < C. */
int ab_ane_rows_to_channels(float *dst, int64_t ld, const float *src, int64_t N, int64_t C,
                            float scale) {
    int rc = transpose_args_ok(dst, src, ld, N, C);
    if (!rc) transpose_scaled(dst, ld, src, C, C, N, scale, 0);
    return rc;
}

/* dst[t*C + c] (+)= src[c*ld + t] * scale  for t < N, c < C. */
int ab_ane_channels_to_rows(float *dst, const float *src, int64_t ld, int64_t N, int64_t C,
                            float scale, int accumulate) {
    int rc = transpose_args_ok(dst, src, ld, N, C);
    if (!rc) transpose_scaled(dst, C, src, ld, N, C, scale, accumulate);
    return rc;
}
