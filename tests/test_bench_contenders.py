"""The benchmark's contenders compute the same thing as the package, so the
ratios compare equal work: anebackward/bench/numpy_impl.py and torch_impl.py
per kernel, and the full-step implementations (llama_ops.py with NumPy, the
reference backend and our kernels; torch_llama.py) on one step."""
import numpy as np
import pytest

import anebackward as ab
from anebackward.bench import cases as K
from anebackward.bench import llama_ops, numpy_impl


@pytest.fixture(scope="module")
def mods():
    return {"numpy_impl": numpy_impl, "llama_ops": llama_ops}


def _tiny_cases():
    return K.cases(["tiny"], K.KERNELS)


def _result(kernel, ops, inp, prealloc):
    """Run a case once on private copies of its inputs; return its outputs as arrays."""
    case = [c for c in _tiny_cases() if c.kernel == kernel][0]
    a = {k: v.copy() for k, v in inp.items()}
    fn, reset = K.api_callable(case, ops, a, prealloc)
    if reset:
        reset()
    r = fn()
    if kernel in ("clip_grad_norm",):
        return [np.float32(r), a["grad"]]
    if kernel == "adamw_step":
        return [a["param"], a["m"], a["v"]]
    if kernel == "embedding_backward":
        return [r]
    return [np.asarray(x, dtype=np.float32) for x in (r if isinstance(r, tuple) else (r,))]


@pytest.mark.parametrize("kernel", K.KERNELS)
def test_numpy_impl_matches_ours(kernel, mods, rng):
    case = [c for c in _tiny_cases() if c.kernel == kernel][0]
    inp = K.inputs(case, rng)
    ours = _result(kernel, K.KernelOps(ab, "cpu"), inp, True)
    theirs = _result(kernel, mods["numpy_impl"], inp, False)
    assert len(ours) == len(theirs)
    for o, t in zip(ours, theirs):
        np.testing.assert_allclose(t, o, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("kernel", [k for k in K.KERNELS if k not in ("clip_grad_norm", "adamw_step")])
def test_torch_impl_matches_ours(kernel, torch, rng):
    from anebackward.bench import torch_impl as ti
    case = [c for c in _tiny_cases() if c.kernel == kernel][0]
    inp = K.inputs(case, rng)
    ours = _result(kernel, K.KernelOps(ab, "cpu"), inp, True)
    r = ti.make(kernel, {k: v.copy() for k, v in inp.items()}, case.dims)()
    r = r if isinstance(r, tuple) else (r,)
    if kernel == "cross_entropy_backward":
        ours = ours[1:]                     # torch returns (dlogits,), ours (loss, dlogits)
    theirs = [x.detach().numpy().reshape(o.shape) for x, o in zip(r, ours)]
    for o, t in zip(ours, theirs):
        np.testing.assert_allclose(t, o, rtol=2e-4, atol=2e-5)


def test_full_step_implementations_agree(mods, torch):
    c = K.model_config(K.SHAPES["tiny"])
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, c["vocab_size"], c["max_seq_len"]).astype(np.int32)
    targets = np.append(tokens[1:], -1).astype(np.int32)
    lo = mods["llama_ops"]
    runs = {}
    for name, ops in (("numpy", mods["numpy_impl"]), ("reference", K.KernelOps(ab, "reference")),
                      ("ours", K.KernelOps(ab, "cpu"))):
        m = lo.ComposedLlama(c, ops, seed=3)
        loss = m.step(tokens, targets, K.ADAMW)
        runs[name] = (loss, m.flat.copy(), m.gflat.copy())
    loss0, p0, g0 = runs["ours"]
    assert np.isfinite(loss0) and np.abs(g0).max() > 0
    for name in ("numpy", "reference"):
        loss, p, g = runs[name]
        assert loss == pytest.approx(loss0, rel=1e-5)
        np.testing.assert_allclose(g, g0, rtol=1e-3, atol=1e-6)
        # Adam's first step is ~lr·sign(g): tiny gradients may differ by a fraction of lr
        np.testing.assert_allclose(p, p0, rtol=1e-4, atol=0.05 * K.ADAMW["lr"])
    # the PyTorch model: same parameters (llama2.c names), same loss and gradients
    from anebackward.bench.torch_llama import Transformer
    model = Transformer.from_config(c)
    ref = lo.ComposedLlama(c, K.KernelOps(ab, "cpu"), seed=3)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            prm.copy_(torch.from_numpy(ref.p[name]))
    model(torch.from_numpy(tokens).long()[None], torch.from_numpy(targets).long()[None])
    loss_t = model.last_loss
    loss_t.backward()
    assert float(loss_t.detach()) == pytest.approx(loss0, rel=1e-5)
    ref_g = lo.ComposedLlama(c, K.KernelOps(ab, "cpu"), seed=3)
    ref_g.step(tokens, targets, dict(K.ADAMW, lr=0.0, weight_decay=0.0))
    params = list(model.parameters())              # the tied weight once
    norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)))
    scale = min(1.0, 1.0 / norm)   # the step clipped its gradients to norm 1
    for name, prm in model.named_parameters():
        np.testing.assert_allclose(prm.grad.numpy() * scale, ref_g.g[name], rtol=2e-3, atol=1e-6)


def test_torch_step_plain_and_package_agree_on_the_first_step(torch, capsys, keep_blas_threads):
    """bench/torch_step's plain PyTorch Llama (torch_llama.py) and
    anebackward.torch.Transformer start from the same weights: same first loss."""
    from anebackward.bench import torch_step
    torch_step.run_shape("small", ["plain", "ab"], repeats=1, warmup=1, T=1)
    rows = {line.split()[0]: float(line.split()[-1]) for line in capsys.readouterr().out.splitlines()
            if line.strip().startswith(("plain ", "ab "))}
    assert set(rows) == {"plain", "ab"}
    assert rows["ab"] == pytest.approx(rows["plain"], rel=1e-5)


def test_hf_step_autocast_variants_run_bf16_from_the_same_weights(torch, capsys, keep_blas_threads):
    """bench/hf_step's autocast variants: the patched ones ran the engine at
    bf16 (the bench says so) and start from the unpatched model's loss."""
    from conftest import import_hf
    import_hf()
    from anebackward import bf16
    from anebackward.bench import hf_step
    before, threads = bf16.get_mode()["path"], torch.get_num_threads()
    if not bf16.available():
        bf16.set_mode(path="portable")
    try:
        hf_step.main(["--seq", "16", "--repeats", "1", "--warmup-calls", "1", "--threads", "1",
                      "--fused", "--variants", "sdpa-bf16,patched-bf16,patched-bf16-switched"])
    finally:
        bf16.set_mode(path=before)
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = {line.split()[0]: float(line.split()[-1]) for line in out.splitlines()
            if line.split() and line.split()[0] in ("sdpa-bf16", "patched-bf16",
                                                    "patched-bf16-switched")}
    assert set(rows) == {"sdpa-bf16", "patched-bf16", "patched-bf16-switched"}
    assert rows["patched-bf16"] == rows["patched-bf16-switched"]
    assert rows["patched-bf16"] == pytest.approx(rows["sdpa-bf16"], rel=2e-4)
    assert "patched-bf16: engine precision bf16" in out
    assert "patched-bf16-switched: engine precision bf16" in out
