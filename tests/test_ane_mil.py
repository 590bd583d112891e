"""The MIL program text of the ANE dx kernel (golden) and the emulated
platform's interpreter: each op against NumPy, and malformed programs
rejected with the line and the reason."""
import pathlib

import numpy as np
import pytest

from anebackward import ane
from anebackward.errors import AnebackwardError

GOLDEN = pathlib.Path(__file__).parent / "golden"


@pytest.fixture
def emulator():
    from anebackward._native import lib
    ane.reset()
    lib.ab_ane_testing_set_process_compiles(0)      # every run_mil is a compile: start with the budget
    prev = ane.use_emulator(True)
    yield ane
    ane.use_emulator(prev)
    ane.reset()


def test_mil_text_is_pinned():
    """The generated program for S=32, in=48, out=16, byte for byte. If a
    change to the generator is intended, check the new text by eye, then
    write it to the golden file."""
    want = (GOLDEN / "ane_linear_dx_S32_in48_out16.mil").read_text()
    got = ane.mil_linear_dx(32, 48, 16)
    assert got == want


def test_mil_text_shape_dependent_parts():
    t = ane.mil_linear_dx(256, 288, 768)
    assert "func main<ios18>(tensor<fp16, [1, 768, 1, 544]> packed)" in t   # out channels, S + in
    assert "val = tensor<int32, [4]>([0, 0, 0, 256])" in t                  # W starts after S
    assert "tensor<fp16, [1, 256, 1, 288]> dx = reshape" in t            # token-major: S rows of in
    assert t.count("const()") == 9 and t.count("matmul(") == 1 and t.count("transpose(") == 1


@pytest.mark.parametrize("args", [(0, 4, 4), (4, 0, 4), (4, 4, -1), (2 ** 31, 4, 4)])
def test_mil_text_rejects_bad_sizes(args):
    with pytest.raises(ValueError):
        ane.mil_linear_dx(*args)


def f16_round(a):
    return np.asarray(a, dtype=np.float64).astype(np.float16)


def test_generated_program_runs_in_the_interpreter(emulator):
    """Packed input built here by hand, result against float64 math rounded
    once to fp16 (the interpreter stores fp16, accumulates in fp32)."""
    S, n_in, n_out = 32, 48, 16
    rng = np.random.default_rng(0)
    dy = f16_round(rng.standard_normal((S, n_out)))
    W = f16_round(rng.standard_normal((n_out, n_in)))
    packed = np.concatenate([dy.T, W], axis=1)[None, :, None, :]        # [1, out, 1, S + in]
    out = ane.run_mil(ane.mil_linear_dx(S, n_in, n_out), np.ascontiguousarray(packed), (1, S, 1, n_in))
    want = f16_round(dy.astype(np.float64) @ W.astype(np.float64))[None, :, None, :]   # token-major
    diff = np.abs(out.astype(np.float64) - want.astype(np.float64))
    ulp = np.spacing(np.abs(want).astype(np.float16)).astype(np.float64)
    assert np.all(diff <= ulp), "within one fp16 ulp of the exactly rounded result"


HEADER = "program(1.3)\n{\n    func main<ios18>(%s) {\n"
FOOTER = "    } -> (%s);\n}\n"


def prog(inputs, body, out):
    return HEADER % inputs + "".join("        " + line + "\n" for line in body) + FOOTER % out


def test_ops_cast_transpose_slice_reshape(emulator):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 5)).astype(np.float32)
    mil = prog("tensor<fp32, [2, 3, 5]> x", [
        'string to16 = const()[name = string("to16"), val = string("fp16")];',
        'tensor<fp16, [2, 3, 5]> h = cast(dtype = to16, x = x)[name = string("h")];',
        'tensor<int32, [3]> p = const()[name = string("p"), val = tensor<int32, [3]>([2, 0, 1])];',
        'tensor<fp16, [5, 2, 3]> t = transpose(perm = p, x = h)[name = string("t")];',
        'tensor<int32, [3]> b = const()[name = string("b"), val = tensor<int32, [3]>([1, 0, 1])];',
        'tensor<int32, [3]> s = const()[name = string("s"), val = tensor<int32, [3]>([3, -1, 2])];',
        'tensor<fp16, [3, 2, 2]> c = slice_by_size(x = t, begin = b, size = s)[name = string("c")];',
        'tensor<int32, [2]> r = const()[name = string("r"), val = tensor<int32, [2]>([-1, 4])];',
        'tensor<fp16, [3, 4]> y16 = reshape(shape = r, x = c)[name = string("y16")];',
        'string to32 = const()[name = string("to32"), val = string("fp32")];',
        'tensor<fp32, [3, 4]> y = cast(dtype = to32, x = y16)[name = string("y")];',
    ], "y")
    got = ane.run_mil(mil, x, (3, 4), np.float32)
    want = x.astype(np.float16).transpose(2, 0, 1)[1:4, 0:2, 1:3].reshape(3, 4).astype(np.float32)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("tx,ty", [(False, False), (True, False), (False, True), (True, True)])
def test_op_matmul_transposes_and_batch(emulator, tx, ty):
    rng = np.random.default_rng(2)
    B, M, K, N = 3, 4, 6, 5
    a = rng.standard_normal((B, K, M) if tx else (B, M, K)).astype(np.float32)
    b = rng.standard_normal((B, N, K) if ty else (B, K, N)).astype(np.float32)
    packed = np.concatenate([a.reshape(B, -1), b.reshape(B, -1)], axis=1)      # [B, a | b]
    na = a[0].size
    mil = prog(f"tensor<fp32, [{B}, {packed.shape[1]}]> x", [
        f'tensor<int32, [2]> ba = const()[name = string("ba"), val = tensor<int32, [2]>([0, 0])];',
        f'tensor<int32, [2]> sa = const()[name = string("sa"), val = tensor<int32, [2]>([{B}, {na}])];',
        f'tensor<fp32, [{B}, {na}]> af = slice_by_size(x = x, begin = ba, size = sa)[name = string("af")];',
        f'tensor<int32, [2]> bb = const()[name = string("bb"), val = tensor<int32, [2]>([0, {na}])];',
        f'tensor<int32, [2]> sb = const()[name = string("sb"), val = tensor<int32, [2]>([{B}, -1])];',
        f'tensor<fp32, [{B}, {b[0].size}]> bf = slice_by_size(x = x, begin = bb, size = sb)[name = string("bf")];',
        f'tensor<int32, [3]> ra = const()[name = string("ra"), val = tensor<int32, [3]>([{", ".join(map(str, a.shape))}])];',
        f'tensor<int32, [3]> rb = const()[name = string("rb"), val = tensor<int32, [3]>([{", ".join(map(str, b.shape))}])];',
        f'tensor<fp32, [{", ".join(map(str, a.shape))}]> am = reshape(shape = ra, x = af)[name = string("am")];',
        f'tensor<fp32, [{", ".join(map(str, b.shape))}]> bm = reshape(shape = rb, x = bf)[name = string("bm")];',
        f'bool tx = const()[name = string("tx"), val = bool({str(tx).lower()})];',
        f'bool ty = const()[name = string("ty"), val = bool({str(ty).lower()})];',
        f'tensor<fp32, [{B}, {M}, {N}]> y = matmul(transpose_x = tx, transpose_y = ty, x = am, y = bm)[name = string("y")];',
    ], "y")
    got = ane.run_mil(mil, np.ascontiguousarray(packed), (B, M, N), np.float32)
    want = (a.transpose(0, 2, 1) if tx else a) @ (b.transpose(0, 2, 1) if ty else b)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


GOOD = [
    'tensor<int32, [2]> r = const()[name = string("r"), val = tensor<int32, [2]>([4, 2])];',
    'tensor<fp16, [4, 2]> y = reshape(shape = r, x = x)[name = string("y")];',
]
X = "tensor<fp16, [2, 4]> x"

MALFORMED = [
    ("unknown op", prog(X, [GOOD[0], 'tensor<fp16, [4, 2]> y = softmax(x = x)[name = string("y")];'], "y"),
     "line 5: unknown op 'softmax'"),
    ("undefined variable", prog(X, ['tensor<fp16, [4, 2]> y = reshape(shape = q, x = x)[name = string("y")];'], "y"),
     "'q' is used before it is defined"),
    ("declared shape wrong", prog(X, [GOOD[0], 'tensor<fp16, [2, 4]> y = reshape(shape = r, x = x)[name = string("y")];'], "y"),
     "'y' is declared tensor<fp16, [2, 4]> but reshape gives tensor<fp16, [4, 2]>"),
    ("two inputs", prog(X + ", tensor<fp16, [2, 4]> z", GOOD, "y"), "takes exactly one"),
    ("missing argument", prog(X, [GOOD[0], 'tensor<fp16, [4, 2]> y = reshape(x = x)[name = string("y")];'], "y"),
     "reshape needs the argument 'shape'"),
    ("extra argument", prog(X, [GOOD[0], 'tensor<fp16, [4, 2]> y = reshape(shape = r, x = x, z = x)[name = string("y")];'], "y"),
     "reshape has no argument 'z'"),
    ("unterminated string", prog(X, ['tensor<int32, [2]> r = const()[name = string("r), val = tensor<int32, [2]>([4, 2])];'], "y"),
     "unterminated string"),
    ("slice out of bounds", prog(X, [
        'tensor<int32, [2]> b = const()[name = string("b"), val = tensor<int32, [2]>([0, 3])];',
        'tensor<int32, [2]> s = const()[name = string("s"), val = tensor<int32, [2]>([2, 2])];',
        'tensor<fp16, [2, 2]> y = slice_by_size(x = x, begin = b, size = s)[name = string("y")];'], "y"),
     "outside the input"),
    ("reshape count", prog(X, [
        'tensor<int32, [2]> r = const()[name = string("r"), val = tensor<int32, [2]>([3, 2])];',
        'tensor<fp16, [3, 2]> y = reshape(shape = r, x = x)[name = string("y")];'], "y"),
     "cannot take the requested shape"),
    ("bad perm", prog(X, [
        'tensor<int32, [2]> p = const()[name = string("p"), val = tensor<int32, [2]>([0, 0])];',
        'tensor<fp16, [2, 4]> y = transpose(perm = p, x = x)[name = string("y")];'], "y"),
     "not a permutation"),
    ("matmul inner", prog(X, [
        'bool f = const()[name = string("f"), val = bool(false)];',
        'tensor<fp16, [2, 4]> y = matmul(transpose_x = f, transpose_y = f, x = x, y = x)[name = string("y")];'], "y"),
     "inner dimensions differ"),
    ("const type", prog(X, ['tensor<int32, [3]> r = const()[name = string("r"), val = tensor<int32, [2]>([4, 2])];'], "r"),
     "declared tensor<int32, [3]> but its value is tensor<int32, [2]>"),
    ("duplicate name", prog(X, GOOD + ['tensor<fp16, [4, 2]> y = reshape(shape = r, x = x)[name = string("y")];'], "y"),
     "'y' is defined twice"),
    ("undefined output", prog(X, GOOD, "nope"), "output 'nope' is not defined"),
    ("missing arrow", (HEADER % X) + "".join(GOOD) + "    }\n}\n", "expected '-> (<output>)'"),
    ("missing semicolon", prog(X, [GOOD[0][:-1], GOOD[1]], "y"), "expected ';' at the end of the statement"),
    ("not MIL", "hello world", "starts with 'program(<version>)'"),
    ("empty", "", "starts with 'program(<version>)'"),
    ("dtype", prog("tensor<fp64, [2]> x", [], "x"), "unsupported tensor dtype 'fp64'"),
    ("trailing text", prog(X, GOOD, "y") + "garbage", "text after the end of the program"),
    # a const has no tensor data: using one as an op's data input once crashed the emulator
    ("const as data", prog(X, GOOD + [
        'tensor<int32, [1]> q = const()[name = string("q"), val = tensor<int32, [1]>([0])];',
        'tensor<int32, [2]> t = transpose(perm = q, x = r)[name = string("t")];'], "y"),
     "'x' must be an fp16 or fp32 tensor computed by the program, 'r' is not"),
    # shape values whose product wraps around 2**64 to exactly the input's 8 elements:
    # multiplied unbounded, the reshape was accepted (signed overflow) and failed later
    ("reshape overflow", prog(X, [
        'tensor<int32, [5]> r = const()[name = string("r"), val = tensor<int32, [5]>('
        '[8, 733583431, 1720196969, 236235671, 504117497])];',
        'tensor<fp16, [4, 2]> y = reshape(shape = r, x = x)[name = string("y")];'], "y"),
     "reshape: 8 elements cannot take the requested shape"),
    ("reshape overflow, inferred axis", prog(X, [
        'tensor<int32, [6]> r = const()[name = string("r"), val = tensor<int32, [6]>('
        '[-1, 8, 733583431, 1720196969, 236235671, 504117497])];',
        'tensor<fp16, [4, 2]> y = reshape(shape = r, x = x)[name = string("y")];'], "y"),
     "reshape: 8 elements cannot take the requested shape"),
    ("val twice", prog(X, ['tensor<int32, [2]> r = const()[name = string("r"), val = tensor<int32, [2]>([4, 2]), '
                           'val = tensor<int32, [2]>([4, 2])];', GOOD[1]], "y"),
     "const 'r' has 'val' twice"),
]


@pytest.mark.parametrize("case,mil,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_interpreter_rejects_malformed_mil(emulator, case, mil, message):
    x = np.zeros((2, 4), dtype=np.float16)
    with pytest.raises(AnebackwardError) as e:
        ane.run_mil(mil, x, (4, 2))
    text = str(e.value)
    assert "emulated platform, compile: MIL line" in text, text
    assert message in text, text


def test_the_well_formed_twin_runs(emulator):
    x = np.arange(8, dtype=np.float16).reshape(2, 4)
    assert np.array_equal(ane.run_mil(prog(X, GOOD, "y"), x, (4, 2)), x.reshape(4, 2))


def test_surface_size_mismatch_is_an_evaluate_error(emulator):
    x = np.zeros((3, 4), dtype=np.float16)                 # program wants [2, 4]
    with pytest.raises(AnebackwardError, match="emulated platform, evaluate: .*the program needs 16 in"):
        ane.run_mil(prog(X, GOOD, "y"), x, (4, 2))
