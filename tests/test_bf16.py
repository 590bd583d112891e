"""bf16 mixed precision: rounding, the bf16 products, the linear kernels, the
model and a short training run, on both paths (oneDNN where this CPU has bf16
instructions, the portable one everywhere).

Oracle: float64 products of the SAME bf16-rounded operands. Every bf16 x bf16
product is exact in fp32 (8 + 8 significant bits), so the only error left is
the fp32 accumulation: |C - C64| <= (K + 2) * 2^-24 * sum_k |a_ik b_kj| for
any summation order (plus 2^-24 |C0| when accumulating into C0).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import anebackward as ab
from anebackward import Llama, LlamaConfig, bf16
from anebackward._native import ffi, fptr, lib, u16ptr
from anebackward.bf16 import to_bf16
from conftest import assert_bit_identical_at_threads, bf16_runnable

U = 2.0 ** -24

# Without oneDNN the portable path runs every test here (bf16_runnable).
if bf16.path() == "unavailable" and os.environ.get("ANEBACKWARD_REQUIRE_BF16") == "1":
    raise RuntimeError(f"ANEBACKWARD_REQUIRE_BF16=1 but {bf16.describe()}")
DEFAULT = "portable" if bf16.path() == "unavailable" else bf16.get_mode()["path"]
ONEDNN = bf16.path() == "onednn"


@pytest.fixture(autouse=True, scope="module")
def _bf16_runnable():
    with bf16_runnable():
        yield
PATHS = ["portable", pytest.param("onednn", marks=pytest.mark.skipif(
    not ONEDNN, reason=f"no oneDNN with bf16 instructions here: {bf16.describe()}"))]


@pytest.fixture(params=PATHS)
def path(request):
    bf16.set_mode(path="portable" if request.param == "portable" else "auto", threads="pool")
    assert bf16.path() == request.param
    yield request.param
    bf16.set_mode(path=DEFAULT, threads="pool")


def rne(a):
    """float32 -> bf16 bits, round to nearest even (NumPy, independent of C)."""
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(a, np.float32))
    r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


def widen(h):
    return (np.asarray(h, np.uint16).astype(np.uint32) << 16).view(np.float32)


def rounded(a):
    return widen(rne(a)).astype(np.float64)


def assert_within_bound(C, A64, B64, C0=None):
    K = A64.shape[1]
    ref = A64 @ B64 + (0 if C0 is None else C0.astype(np.float64))
    bound = (K + 2) * U * (np.abs(A64) @ np.abs(B64))
    if C0 is not None:
        bound = bound + U * np.abs(C0) + U * np.abs(ref)
    err = np.abs(C.astype(np.float64) - ref)
    assert (err <= bound + 1e-30).all(), f"max err/bound {np.max(err / (bound + 1e-30)):.3g}"


# ---- rounding ----
def test_f32_to_bf16_rounds_to_nearest_even_like_an_independent_reference(rng):
    x = np.concatenate([
        rng.standard_normal(100_000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 100_000),
        np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 3.4028235e38, -3.4028235e38,
                  1e-40, -1e-45, 1.17549435e-38], np.float32),
        # exact ties: the bit below the kept ones set, nothing after it
        widen(np.arange(0x3F80, 0x3F90, dtype=np.uint16)) + np.float32(0),
    ]).astype(np.float32)
    ties = (widen(np.arange(0x3F80, 0x3F90, dtype=np.uint16)).view(np.uint32) | 0x8000).view(
        np.float32)
    x = np.concatenate([x, ties])
    h = to_bf16(x)
    ref = rne(x)
    nan = np.isnan(x)
    assert np.array_equal(h[~nan], ref[~nan])
    assert np.isnan(widen(h[nan])).all()
    # ties go to the even neighbour
    assert (rne(ties) & 1 == 0).all() and np.array_equal(to_bf16(ties), rne(ties))
    back = np.empty(h.shape, np.float32)
    assert lib.ab_bf16_to_f32(fptr(back), u16ptr(h), h.size) == 0
    assert np.array_equal(back[~nan].view(np.uint32), widen(h[~nan]).view(np.uint32))
    assert lib.ab_f32_to_bf16(ffi.NULL, ffi.NULL, -1) == lib.AB_EINVAL
    assert lib.ab_f32_to_bf16(ffi.NULL, ffi.NULL, 3) == lib.AB_ENULL


def test_to_bf16_rounds_strided_and_0d_arrays_like_contiguous_ones(rng):
    x = rng.standard_normal((6, 10)).astype(np.float32)
    for a in (x[:, ::3], x.T, x[2, 3, ...]):
        h = to_bf16(a)
        assert h.shape == a.shape and h.dtype == np.uint16
        assert np.array_equal(h, rne(np.atleast_1d(a)).reshape(a.shape))


@pytest.mark.parametrize("bad, got", [([1.0, 2.0], "got list"),
                                      (np.ones(3), "got dtype float64"),
                                      (np.float32(1.0), "got numpy.float32")])
def test_to_bf16_refuses_what_is_not_a_float32_array(bad, got):
    with pytest.raises(TypeError, match=f"to_bf16: a must be a numpy.ndarray of float32, {got}; "
                                        r"convert it with np.asarray\(a, dtype=np.float32\)"):
        to_bf16(bad)


# ---- the bf16 product ----
SHAPES = [
    (0, 1, 37, 51, 29, 0), (0, 0, 37, 51, 29, 1), (1, 0, 37, 51, 29, 1), (1, 1, 5, 7, 3, 0),
    (0, 1, 1, 300, 70, 0), (0, 1, 256, 300, 96, 0),       # rows only (dense tiles)
    (0, 0, 129, 96, 2600, 1),                              # K chunks
    (1, 0, 200, 96, 130, 0), (1, 0, 3000, 64, 40, 1),     # rows of A^T B: A gathered
    (1, 0, 97, 50, 700, 1), (1, 1, 300, 64, 200, 0),      # the same, B transposed too
    (1, 0, 12, 300, 2000, 1), (1, 1, 16, 400, 1000, 0),   # K chunks for A^T B (M <= 16)
    (1, 1, 64, 40, 300, 0),                                # one call (small)
    (0, 1, 20, 4200, 30, 1), (0, 0, 33, 4500, 50, 0),     # wide C: column tiles
]


@pytest.mark.parametrize("ta,tb,M,N,K,acc", SHAPES)
def test_gemm_bf16_matches_float64_of_the_rounded_operands(rng, path, ta, tb, M, N, K, acc):
    A = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
    B = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
    # leading dimensions wider than the matrices: views into bigger buffers
    Ab = np.zeros((A.shape[0], A.shape[1] + 3), np.uint16)
    Ab[:, :A.shape[1]] = to_bf16(A)
    Bb = to_bf16(B)
    C0 = rng.standard_normal((M, N + 5)).astype(np.float32)
    C = C0.copy()
    rc = lib.ab_gemm_bf16(ta, tb, M, N, K, u16ptr(Ab), Ab.shape[1], u16ptr(Bb), Bb.shape[1], acc,
                          fptr(C), C.shape[1])
    assert rc == 0
    A64, B64 = rounded(A), rounded(B)
    A64 = A64.T if ta else A64
    B64 = B64.T if tb else B64
    assert_within_bound(C[:, :N], A64, B64, C0[:, :N] if acc else None)
    assert np.array_equal(C[:, N:], C0[:, N:])          # nothing written past N


def test_gemm_bf16_guards_its_arguments():
    h = np.zeros(16, np.uint16)
    c = np.zeros(16, np.float32)
    hp, cp = u16ptr(h), fptr(c)
    assert lib.ab_gemm_bf16(0, 0, -1, 2, 2, hp, 2, hp, 2, 0, cp, 2) == lib.AB_EINVAL
    assert lib.ab_gemm_bf16(0, 0, 2, 2, 2, hp, 1, hp, 2, 0, cp, 2) == lib.AB_EINVAL
    assert lib.ab_gemm_bf16(0, 0, 2, 2, 2, hp, 2, hp, 2, 0, cp, 1) == lib.AB_EINVAL
    assert lib.ab_gemm_bf16(0, 0, 2, 2, 2, ffi.NULL, 2, hp, 2, 0, cp, 2) == lib.AB_ENULL
    assert lib.ab_bf16_set_mode(7, -1) == lib.AB_EINVAL


@pytest.mark.parametrize("ta,tb,M,N,K", [(0, 1, 256, 768, 288), (0, 0, 130, 288, 4100),
                                         (1, 0, 768, 288, 256), (1, 0, 3000, 96, 64),
                                         (1, 1, 300, 64, 200), (1, 0, 12, 300, 2000),
                                         (0, 1, 64, 5000, 40)])
def test_gemm_bf16_is_bit_identical_at_1_2_3_threads(rng, path, ta, tb, M, N, K):
    A = to_bf16(rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32))
    B = to_bf16(rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32))
    out = []
    before = ab.get_num_threads()
    try:
        for n in (1, 2, 3):
            ab.set_num_threads(n)
            C = np.zeros((M, N), np.float32)
            assert lib.ab_gemm_bf16(ta, tb, M, N, K, u16ptr(A), A.shape[1], u16ptr(B),
                                    B.shape[1], 0, fptr(C), N) == 0
            out.append(C)
    finally:
        ab.set_num_threads(before)
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[0], out[2])


# ---- the NumPy kernels ----
def test_linear_kernels_bf16_match_float64_of_the_rounded_operands(rng, path):
    N, n_in, n_out = 45, 70, 33
    x = rng.standard_normal((3, 15, n_in)).astype(np.float32)
    W = rng.standard_normal((n_out, n_in)).astype(np.float32)
    dy = rng.standard_normal((3, 15, n_out)).astype(np.float32)
    x2, dy2 = x.reshape(N, n_in), dy.reshape(N, n_out)
    y = ab.linear(x, W, precision="bf16")
    assert y.shape == (3, 15, n_out)
    assert_within_bound(y.reshape(N, n_out), rounded(x2), rounded(W).T)
    dx = np.ones((3, 15, n_in), np.float32)
    r = ab.linear_backward_dx(dy, W, dx=dx, accumulate=True, precision="bf16")
    assert np.shares_memory(r, dx)
    assert_within_bound(dx.reshape(N, n_in), rounded(dy2), rounded(W), np.ones((N, n_in)))
    dW = ab.linear_backward_dW(dy, x, precision="bf16")
    assert_within_bound(dW, rounded(dy2).T, rounded(x2))
    # bf16 is not fp32: the rounding is really there
    assert not np.allclose(y, ab.linear(x, W), rtol=1e-5, atol=0)


def test_precision_argument_is_checked():
    x = np.ones((2, 3), np.float32)
    W = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="precision must be 'fp32' or 'bf16'"):
        ab.linear(x, W, precision="fp16")
    with pytest.raises(ValueError, match="backend='reference' has no bf16 path"):
        ab.linear(x, W, precision="bf16", backend="reference")
    with pytest.raises(ValueError, match="precision must be"):
        Llama(LlamaConfig(dim=8, hidden_dim=16, n_layers=1, n_heads=2, n_kv_heads=2,
                          vocab_size=11, max_seq_len=8), precision="bfloat16")
    with pytest.raises(ValueError, match="no bf16 path"):
        Llama(LlamaConfig(dim=8, hidden_dim=16, n_layers=1, n_heads=2, n_kv_heads=2,
                          vocab_size=11, max_seq_len=8), precision="bf16", backend="reference")
    assert np.array_equal(ab.linear(x, W, precision="fp32"), ab.linear(x, W))


# ---- the model ----
def _bf16_torch_model(torch, model):
    """The float64 PyTorch Llama (tests/test_model.py's oracle) whose every
    nn.Linear rounds its operands to bf16 (x, W forward; dy, W and dy, x
    backward) and multiplies in float64."""
    from anebackward.bench.torch_llama import Transformer

    def rnd(t):
        return t.to(torch.float32).to(torch.bfloat16).to(torch.float64)

    class Bf16Linear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, W):
            ctx.save_for_backward(x, W)
            return rnd(x) @ rnd(W).T

        @staticmethod
        def backward(ctx, dy):
            x, W = ctx.saved_tensors
            d = rnd(dy)
            dx = d @ rnd(W)
            dW = d.reshape(-1, d.shape[-1]).T @ rnd(x).reshape(-1, x.shape[-1])
            return dx, dW

    torch.manual_seed(0)
    ref = Transformer.from_config(model.config).double().load_arrays(model.params)
    for mod in ref.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.forward = (lambda x, m=mod: Bf16Linear.apply(x, m.weight))
    return ref


def _grads(torch, ref, tokens, targets):
    ref(torch.tensor(tokens, dtype=torch.long), torch.tensor(targets, dtype=torch.long))
    ref.last_loss.backward()
    return ref.last_loss.item(), {n: p.grad.numpy() for n, p in ref.named_parameters()}


# the last case is big enough for the FFN's and the classifier's weight
# gradients (Aᵀ·B: 256x96, 96x256, 300x96 over 128 rows) to be tiled on the
# pool, each tile's columns of dy copied into a dense buffer
# (csrc/bf16/gemm_bf16.c)
@pytest.mark.parametrize("tied,KV,B,recompute,dim,hidden,V,S", [
    (True, 3, 1, False, 48, 80, 67, 21), (False, 1, 2, True, 48, 80, 67, 21),
    (False, 1, 2, False, 96, 256, 300, 64)])
def test_model_gradients_match_a_float64_oracle_with_bf16_operands(torch, rng, path, tied, KV, B,
                                                                   recompute, dim, hidden, V, S):
    from test_model import randomize, shifted
    cfg = LlamaConfig(dim=dim, hidden_dim=hidden, n_layers=2, n_heads=3, n_kv_heads=KV,
                      vocab_size=V, max_seq_len=S + 3, shared_classifier=tied)
    model = Llama(cfg, seed=1, precision="bf16", recompute=recompute)
    randomize(model, rng, norm_spread=0.2)
    model.flat_params[:model.n_decay] *= 0.5
    model.mark_params_changed()
    tokens = rng.integers(0, cfg.vocab_size, size=(B, S))
    loss = model.forward(tokens)
    model.backward()
    ref_loss, ref = _grads(torch, _bf16_torch_model(torch, model), tokens, shifted(tokens))
    from test_model import torch_grads
    _, ref32 = torch_grads(torch, model, tokens, shifted(tokens))     # no rounding
    assert abs(loss - ref_loss) <= 2e-4 * abs(ref_loss)
    worst_bf16, worst_fp = 0.0, 0.0
    for name, g in model.grads.items():
        scale = np.abs(ref[name]).max()
        assert scale > 0, name
        e = np.abs(g - ref[name]).max() / scale
        worst_bf16 = max(worst_bf16, e)
        worst_fp = max(worst_fp, np.abs(g - ref32[name]).max() / scale)
        # within 1e-2 of the tensor's largest entry: a rounding flip of an fp32
        # activation vs its float64 twin moves an operand by one bf16 ulp (2^-8)
        assert e <= 1e-2, f"{name}: {e:.3g}"
    # the oracle with bf16 operands is much closer than the fp32 one: the
    # rounding happens where the oracle's does
    assert worst_bf16 < 0.5 * worst_fp, (worst_bf16, worst_fp)
    print(f"bf16 oracle {worst_bf16:.3g}, fp32 oracle {worst_fp:.3g}")


def test_model_bf16_is_bit_identical_at_1_2_3_threads_and_with_recompute(rng, path):
    cfg = LlamaConfig(dim=96, hidden_dim=256, n_layers=2, n_heads=4, n_kv_heads=2,
                      vocab_size=4100, max_seq_len=64)
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 64))

    def step(setting):
        m = Llama(cfg, seed=3, precision="bf16", recompute=setting[1])
        loss = m.forward(tokens)
        m.backward()
        return loss, m.flat_grads.copy()
    assert_bit_identical_at_threads(step, ((1, False), (2, False), (3, False), (2, True)))


def test_bf16_weight_copy_follows_the_optimizer_step(rng, path):
    cfg = LlamaConfig(dim=32, hidden_dim=64, n_layers=1, n_heads=2, n_kv_heads=2,
                      vocab_size=50, max_seq_len=16)
    m = Llama(cfg, seed=0, precision="bf16")
    tokens = rng.integers(0, 50, size=(1, 16))
    l0 = m.forward(tokens)
    m.backward()
    ab.AdamW(m, lr=1e-2).step()
    l1 = m.forward(tokens)
    fresh = Llama(cfg, seed=0, precision="bf16", init=False)
    fresh.flat_params[:] = m.flat_params
    fresh.mark_params_changed()
    assert l1 == fresh.forward(tokens) and l1 < l0
    # C refuses a bf16 forward on a workspace without the weight copy
    work = np.zeros(m._workspace(1, 16).size, np.float32)
    rc = lib.ab_model_forward(ffi.new("double *"), m._cfg, fptr(m.flat_params),
                              ffi.from_buffer("int32_t[]", tokens.astype(np.int32)),
                              ffi.from_buffer("int32_t[]", tokens.astype(np.int32)), 1, 16, 1,
                              fptr(work), work.size)
    assert rc == lib.AB_EINVAL


def _losses(precision, steps):
    """steps of AdamW on the main job's corpus with a tiny model: losses and
    validation loss (the same weights and batches for every precision)."""
    from anebackward.data.loader import load_data
    from anebackward.tokenizer import Tokenizer
    tok = Tokenizer.byte_level()
    data = load_data(None, tok)
    m = Llama(LlamaConfig.preset("tiny").replace(vocab_size=tok.vocab_size), seed=0,
              precision=precision)
    opt = ab.AdamW(m, lr=2e-3)         # the trainer's default peak rate
    out = []
    for step in range(steps):
        x, y = data.batch(step, 8, 64)
        out.append(m.forward(x, y))
        m.backward()
        m.clip_grad_norm(1.0)
        opt.step()
    val = np.mean([m.forward(*data.batch(10_000 + i, 8, 64, split="val"), want_grad=False)
                   for i in range(16)])
    return np.array(out), val


def test_short_training_run_stays_within_2_percent_of_fp32(path):
    steps = 150
    l32, v32 = _losses("fp32", steps)
    l16, v16 = _losses("bf16", steps)
    assert l32[-1] < 0.6 * l32[0]                      # it trains
    # the curves, smoothed over 10 steps, stay within 2 % of each other
    k = np.ones(10) / 10
    s32, s16 = np.convolve(l32, k, "valid"), np.convolve(l16, k, "valid")
    assert np.max(np.abs(s16 - s32) / s32) <= 0.02, np.max(np.abs(s16 - s32) / s32)
    assert abs(v16 - v32) <= 0.02 * v32, (v16, v32)
    assert not np.array_equal(l16, l32)                # bf16 really ran
    print(f"max smoothed rel diff {np.max(np.abs(s16 - s32) / s32):.4f}, val {v16:.4f} vs {v32:.4f}")


def test_without_onednn_bf16_says_what_to_install_in_one_line(tmp_path):
    code = ("import anebackward as ab\n"
            "cfg = ab.LlamaConfig(dim=8, hidden_dim=16, n_layers=1, n_heads=2, n_kv_heads=2, "
            "vocab_size=11, max_seq_len=8)\n"
            "print(ab.bf16.path())\n"
            "ab.Llama(cfg, precision='bf16')\n")
    env = dict(os.environ, ANEBACKWARD_ONEDNN_LIBRARY=str(tmp_path / "libdnnl.so.3"),
               ANEBACKWARD_BF16="auto")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode != 0 and r.stdout.strip() == "unavailable"
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("anebackward.errors.Bf16UnavailableError: Llama: precision='bf16' "
                           "needs oneDNN"), r.stderr
    assert "pip install 'anebackward[bf16]'" in last
    # the portable path needs no oneDNN and still runs bf16
    env["ANEBACKWARD_BF16"] = "portable"
    code2 = code.replace("ab.Llama(cfg, precision='bf16')",
                         "m = ab.Llama(cfg, precision='bf16'); print(m.forward([[1, 2, 3, 4]]))")
    r = subprocess.run([sys.executable, "-c", code2], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "portable"
    # and the trainer turns it into its one-line usage error
    env["ANEBACKWARD_BF16"] = "auto"
    r = subprocess.run([sys.executable, "-m", "anebackward", "train", "--config", "tiny",
                        "--steps", "1", "--out", str(tmp_path / "run"), "--precision", "bf16",
                        "--quiet"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("anebackward train: --precision bf16:")
    assert "pip install 'anebackward[bf16]'" in r.stderr


def test_blas_info_says_which_bf16_path_runs():
    info = ab.blas_info()["bf16"]
    assert info.split()[0] in ("onednn", "portable")
    assert info.split()[0] == bf16.path()


def test_model_bf16_takes_padded_batches_like_fp32(rng, path):
    """bf16 operands with a varlen batch (left and right padding): within
    bf16's error of the fp32 model on the same batch, and independent of
    the thread count and of recompute."""
    cfg = LlamaConfig(dim=64, hidden_dim=160, n_layers=2, n_heads=4, n_kv_heads=2,
                      vocab_size=97, max_seq_len=32)
    tok = rng.integers(0, cfg.vocab_size, size=(3, 32)).astype(np.int32)
    mask = np.ones((3, 32), np.int32)
    mask[0, 20:] = 0          # right padding
    mask[2, :7] = 0           # left padding
    x, y, mk = tok[:, :-1], tok[:, 1:].copy(), mask[:, :-1]
    y[(mask[:, 1:] == 0) | (mk == 0)] = -1
    runs = {}
    before = ab.get_num_threads()
    try:
        for prec, n, rec in (("fp32", 2, False), ("bf16", 1, False), ("bf16", 2, False),
                             ("bf16", 2, True)):
            ab.set_num_threads(n)
            m = Llama(cfg, seed=1, precision=prec, recompute=rec)
            loss = m.forward(x, y, attention_mask=mk)
            m.backward()
            runs[prec, n, rec] = (loss, m.flat_grads.copy())
    finally:
        ab.set_num_threads(before)
    l32, g32 = runs["fp32", 2, False]
    l16, g16 = runs["bf16", 1, False]
    for key in (("bf16", 2, False), ("bf16", 2, True)):
        assert runs[key][0] == l16 and np.array_equal(runs[key][1], g16), key
    assert abs(l16 - l32) <= 1e-3 * abs(l32)
    rel = np.linalg.norm(g16 - g32) / np.linalg.norm(g32)
    assert 0 < rel < 3e-2, rel       # bf16 really ran, and stayed close


def test_the_bf16_bench_runs_and_names_its_path(torch, capsys):
    from anebackward.bench import bf16 as bench
    before = ab.get_num_threads()
    try:
        bench.main(["linear", "--shapes", "tiny", "--repeats", "1", "--threads", "1"])
        bench.main(["step", "--shape", "tiny", "--seq", "32", "--repeats", "1", "--warmup", "1",
                    "--threads", "1", "--variants",
                    "fp32,bf16,bf16-onednn-threads,torch-bf16,adapter-bf16"])
    finally:
        ab.set_num_threads(before)
        bf16.set_mode(path=DEFAULT, threads="pool")
    out = capsys.readouterr().out
    assert f"bf16 path: {bf16.path()}" in out
    assert "fwd   64x32->300" in out and "torch-bf16" in out
    first = {line.split()[0]: line.split()[-1] for line in out.splitlines()
             if line.startswith("  ") and line.split()[0] in ("bf16", "adapter-bf16")}
    assert first["adapter-bf16"] == first["bf16"]   # the torch adapter ran the bf16 engine


def test_a_cpu_without_bf16_instructions_takes_the_portable_path():
    """oneDNN limited to AVX2 (ONEDNN_MAX_CPU_ISA, as on a Zen 3): the
    dispatch says portable, and the model still runs bf16."""
    code = ("import anebackward as ab\n"
            "print(ab.bf16.path()); print(ab.bf16.describe())\n"
            "cfg = ab.LlamaConfig(dim=8, hidden_dim=16, n_layers=1, n_heads=2, n_kv_heads=2, "
            "vocab_size=11, max_seq_len=8)\n"
            "print(ab.Llama(cfg, precision='bf16').forward([[1, 2, 3, 4]]))\n")
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ANEBACKWARD_BF16="auto")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    lines = r.stdout.splitlines()
    if lines and lines[0] == "unavailable":    # no oneDNN (CI's main run requires it)
        pytest.skip(f"oneDNN is not loaded here: {lines[1:]}")
    assert r.returncode == 0, r.stderr
    assert lines[0] == "portable"
    assert "oneDNN finds no bf16 instructions" in lines[1] and "isa avx2" in lines[1]
    assert float(lines[2]) > 0
