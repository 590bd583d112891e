"""fp32 <-> fp16 conversion and layout transposes of the ANE core (csrc/ane/ane_convert.c).

Oracle: NumPy's float16 casts (IEEE binary16, round to nearest even). Both
the default path (F16C / NEON where the CPU has it) and the portable scalar
path are checked, bit for bit on every non-NaN value.
"""
import numpy as np
import pytest

from anebackward._native import ffi, lib

PATHS = {
    "default": (lib.ab_ane_f32_to_f16, lib.ab_ane_f16_to_f32),
    "scalar": (lib.ab_ane_f32_to_f16_scalar, lib.ab_ane_f16_to_f32_scalar),
}


def to_f16(fn, x):
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, dtype=np.uint16)
    assert fn(ffi.from_buffer("uint16_t[]", out), ffi.from_buffer("float[]", x), x.size) == lib.AB_OK
    return out


def to_f32(fn, h):
    h = np.ascontiguousarray(h, dtype=np.uint16)
    out = np.empty(h.shape, dtype=np.float32)
    assert fn(ffi.from_buffer("float[]", out), ffi.from_buffer("uint16_t[]", h), h.size) == lib.AB_OK
    return out


def assert_same_f16(got, x):
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    assert np.all((got[nan] & 0x7C00) == 0x7C00) and np.all((got[nan] & 0x03FF) != 0), "NaN must stay NaN"
    assert np.all((got[nan] & 0x8000) == (want[nan] & 0x8000)), "NaN keeps its sign"
    bad = np.flatnonzero(got[~nan] != want[~nan])
    if bad.size:
        i = bad[0]
        v = x[~nan][i]
        raise AssertionError(f"{bad.size} mismatches; first: {v!r} (bits {v.view(np.uint32):#010x}) -> "
                             f"{got[~nan][i]:#06x}, NumPy says {want[~nan][i]:#06x}")


def test_fp16_path_is_reported():
    assert ffi.string(lib.ab_ane_fp16_path()).decode() in ("f16c", "neon", "scalar")


@pytest.mark.parametrize("path", PATHS)
def test_every_half_converts_exactly_to_float(path):
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    got = to_f32(PATHS[path][1], h)
    want = h.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


@pytest.mark.parametrize("path", PATHS)
def test_float_to_half_rounds_to_nearest_even(path):
    rng = np.random.default_rng(7)
    # random bit patterns cover every exponent, sign, NaN payloads, subnormals
    bits = rng.integers(0, 2 ** 32, size=400_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    assert_same_f16(to_f16(PATHS[path][0], x), x)
    # values in fp16's range, where rounding decides the result
    y = (rng.standard_normal(200_000) * np.exp(rng.uniform(-20, 12, 200_000))).astype(np.float32)
    assert_same_f16(to_f16(PATHS[path][0], y), y)


@pytest.mark.parametrize("path", PATHS)
def test_ties_and_edges(path):
    # every exact midpoint between neighbouring positive halves (the ties),
    # and just above/below each: RNE, carries into the exponent, the
    # subnormal/normal border and the overflow border (65504 | 65520)
    h = np.arange(0, 0x7C00, dtype=np.uint16)
    lo = h.view(np.float16).astype(np.float64)
    hi = (h + 1).view(np.float16).astype(np.float64)
    hi[-1] = 65536.0                                    # the step above 65504 leads to inf
    mid = ((lo + hi) / 2).astype(np.float32)            # exact: 12 significant bits
    near = np.concatenate([mid, np.nextafter(mid, np.float32(np.inf)),
                           np.nextafter(mid, np.float32(0))])
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 65504, 65519.996, 65520,
                        -65520, 2 ** -24, 2 ** -25, -(2 ** -25), 2 ** -25 * 1.0000001,
                        2 ** -14, 2 ** -14 * (1 - 2 ** -11), 3e38, 1e-45], dtype=np.float32)
    x = np.concatenate([near, -near, special])
    assert_same_f16(to_f16(PATHS[path][0], x), x)


@pytest.mark.parametrize("n", list(range(0, 19)) + [31, 33, 1000])
def test_vector_tails(n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    h = to_f16(lib.ab_ane_f32_to_f16, x)
    assert_same_f16(h, x)
    assert np.array_equal(to_f32(lib.ab_ane_f16_to_f32, h), x.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("N,C,ld", [(1, 1, 1), (37, 45, 64), (64, 288, 64), (5, 70, 9)])
def test_rows_channels_transposes(N, C, ld):
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((N, C)).astype(np.float32)
    cf = np.full((C, ld), 7.0, dtype=np.float32)
    assert lib.ab_ane_rows_to_channels(ffi.from_buffer("float[]", cf), ld, ffi.from_buffer("float[]", rows),
                                       N, C, 4.0) == lib.AB_OK
    assert np.array_equal(cf[:, :N], 4.0 * rows.T)
    assert np.all(cf[:, N:] == 7.0), "columns beyond N are not touched"
    back = rng.standard_normal((N, C)).astype(np.float32)
    start = back.copy()
    assert lib.ab_ane_channels_to_rows(ffi.from_buffer("float[]", back), ffi.from_buffer("float[]", cf), ld,
                                       N, C, 0.5, 1) == lib.AB_OK
    np.testing.assert_allclose(back, start + 2.0 * rows, rtol=1e-6, atol=1e-6)
    lib.ab_ane_channels_to_rows(ffi.from_buffer("float[]", back), ffi.from_buffer("float[]", cf), ld, N, C, 0.25, 0)
    assert np.array_equal(back, rows)


@pytest.mark.parametrize("name", ["ab_ane_f32_to_f16", "ab_ane_f16_to_f32", "ab_ane_f32_to_f16_scalar",
                                  "ab_ane_f16_to_f32_scalar"])
def test_converters_return_error_codes(name):
    fn = getattr(lib, name)
    buf = ffi.new("char[]", 64)
    assert fn(ffi.cast("void *", buf), ffi.cast("void *", buf), -1) == lib.AB_EINVAL
    assert fn(ffi.NULL, ffi.cast("void *", buf), 4) == lib.AB_ENULL
    assert fn(ffi.cast("void *", buf), ffi.NULL, 4) == lib.AB_ENULL
    assert fn(ffi.NULL, ffi.NULL, 0) == lib.AB_OK, "nothing to convert: no pointer needed"


def test_transposes_return_error_codes():
    a = ffi.new("float[]", 64)
    for fn, args in ((lib.ab_ane_rows_to_channels, lambda ld, N, C, d, s: (d, ld, s, N, C, 1.0)),
                     (lib.ab_ane_channels_to_rows, lambda ld, N, C, d, s: (d, s, ld, N, C, 1.0, 0))):
        assert fn(*args(4, 4, 4, a, a)) == lib.AB_OK
        assert fn(*args(3, 4, 4, a, a)) == lib.AB_EINVAL, "ld < N"
        assert fn(*args(4, -1, 4, a, a)) == lib.AB_EINVAL
        assert fn(*args(4, 4, -1, a, a)) == lib.AB_EINVAL
        assert fn(*args(4, 4, 4, ffi.NULL, a)) == lib.AB_ENULL
        assert fn(*args(4, 0, 4, ffi.NULL, ffi.NULL)) == lib.AB_OK


def test_mil_generator_returns_error_codes():
    n = ffi.new("int64_t *")
    assert lib.ab_ane_mil_linear_dx(ffi.NULL, 0, 32, 48, 16, n) == lib.AB_OK and n[0] > 500
    assert lib.ab_ane_mil_linear_dx(ffi.NULL, 0, 0, 48, 16, n) == lib.AB_EINVAL
    assert lib.ab_ane_mil_linear_dx(ffi.NULL, 10, 32, 48, 16, n) == lib.AB_ENULL
    assert lib.ab_ane_mil_linear_dx(ffi.NULL, 0, 32, 48, 16, ffi.NULL) == lib.AB_ENULL
    assert lib.ab_ane_mil_linear_dx(ffi.NULL, 0, 2 ** 31, 48, 16, n) == lib.AB_ETOOBIG
