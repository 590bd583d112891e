"""The model's backward with the layer projections' dx on the (emulated)
ANE: gradients against the CPU backward (fp16 tolerance; bit-identical
when the ANE is not used), weight staging keyed to params_version (reused
across backwards of one step, renewed after AdamW.step), routing."""
import numpy as np
import pytest

import anebackward as ab
from anebackward import ane
from anebackward._native import ffi, lib

CFG = ab.LlamaConfig(dim=128, hidden_dim=192, n_layers=2, n_heads=4, n_kv_heads=2,
                     vocab_size=97, max_seq_len=64)
N_PROJ = 7                       # wq wk wv wo w1 w2 w3 per layer


def batch(rng, B=2, S=64):
    t = rng.integers(0, CFG.vocab_size, size=(B, S + 1)).astype(np.int32)
    return t[:, :-1].copy(), t[:, 1:].copy()


def step(model, tokens, targets, **kw):
    model.forward(tokens, targets)
    model.backward(**kw)
    return model.flat_grads.copy()


def assert_close_per_tensor(model, got, ref, tol):
    for name, off, shape in model._specs:
        n = int(np.prod(shape))
        g, r = got[off:off + n].astype(np.float64), ref[off:off + n].astype(np.float64)
        err = np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30)
        assert err < tol, f"{name}: relative error {err:.3g} >= {tol}"


def test_backward_on_the_ane_matches_the_cpu_within_fp16_tolerance(emulator, rng):
    tokens, targets = batch(rng)
    cpu = ab.Llama(CFG, seed=3, backend="cpu")
    dev = ab.Llama(CFG, seed=3, backend="ane")
    ref = step(cpu, tokens, targets)
    before = ane.status()["tiles_ane"]
    got = step(dev, tokens, targets)
    assert dev.ane_reason is None
    # every projection's dx of every layer ran on the ANE (one 64-row tile each)
    assert ane.status()["tiles_ane"] - before == N_PROJ * CFG.n_layers
    assert ane.status()["tiles_cpu"] == 0
    assert not np.array_equal(got, ref)          # fp16 went through: not the CPU path
    assert_close_per_tensor(cpu, got, ref, 5e-3)
    # accumulate and grad_scale take the same path
    got2 = step(dev, tokens, targets, accumulate=True, grad_scale=0.5)
    assert_close_per_tensor(cpu, got2, 1.5 * ref, 5e-3)


def test_backward_is_bit_identical_to_the_cpu_when_the_ane_is_not_used(emulator, rng):
    tokens, targets = batch(rng)
    ref = step(ab.Llama(CFG, seed=5, backend="cpu"), tokens, targets)
    ane.configure(min_flops=2 ** 62)             # "auto" keeps every projection on the CPU
    auto = ab.Llama(CFG, seed=5, backend="auto")
    assert np.array_equal(step(auto, tokens, targets), ref)
    assert "min_flops" in auto.ane_reason
    assert ane.status()["calls"] == 0
    ane.use_emulator(False)                      # no ANE at all (Linux): "auto" is the CPU
    if not ane.available():
        assert np.array_equal(step(auto, tokens, targets), ref)
        assert auto.ane_reason
    # the C entry point without a context is ab_model_backward
    m = ab.Llama(CFG, seed=5, backend="cpu")
    m.forward(tokens, targets)
    m._pending = None
    work = m._workspace(*tokens.shape)
    p, g, w = (ffi.from_buffer("float[]", a) for a in (m.flat_params, m.flat_grads, work))
    assert lib.ab_model_backward_ane(m._cfg, p, g, *tokens.shape, 1.0, 0, w, work.size,
                                     ffi.NULL, 1, 0) == 0
    assert np.array_equal(m.flat_grads, ref)


def test_auto_runs_the_projections_on_the_ane_when_every_shape_is_routed(emulator, rng):
    tokens, targets = batch(rng)
    ane.configure(min_flops=0)
    ref = step(ab.Llama(CFG, seed=7, backend="cpu"), tokens, targets)
    auto = ab.Llama(CFG, seed=7, backend="auto")
    got = step(auto, tokens, targets)
    assert auto.ane_reason is None and ane.status()["tiles_ane"] == N_PROJ * CFG.n_layers
    assert_close_per_tensor(auto, got, ref, 5e-3)


def test_staging_is_reused_within_a_step_and_renewed_after_adamw_step(emulator, rng):
    tokens, targets = batch(rng)
    cpu = ab.Llama(CFG, seed=11, backend="cpu")
    dev = ab.Llama(CFG, seed=11, backend="ane")
    n_w = N_PROJ * CFG.n_layers                  # distinct weight matrices
    step(dev, tokens, targets)
    st = ane.status()
    assert st["weight_stagings"] == n_w and st["weight_reuses"] == 0
    # one program per distinct shape, shared by every layer
    shapes = {shape for name, _, shape in dev._specs if name.startswith("layers.") and len(shape) == 2}
    assert st["compiles"] == len(shapes)
    step(dev, tokens, targets, accumulate=True)  # a second micro-batch: same weights
    st = ane.status()
    assert st["weight_stagings"] == n_w and st["weight_reuses"] == n_w
    # an optimiser step changes every weight: the staged copies must not be used
    opt_c, opt_d = ab.AdamW(cpu, lr=1e-2), ab.AdamW(dev, lr=1e-2)
    step(cpu, tokens, targets)
    dev.flat_grads[:] = cpu.flat_grads            # the same update on both models
    opt_c.step()
    opt_d.step()
    assert np.array_equal(cpu.flat_params, dev.flat_params)
    v = dev.params_version
    ref = step(cpu, tokens, targets)
    got = step(dev, tokens, targets)
    st = ane.status()
    assert st["weight_stagings"] == 2 * n_w and st["weight_reuses"] == n_w
    assert dev.params_version == v
    assert_close_per_tensor(cpu, got, ref, 5e-3)
    # writing into params yourself: mark_params_changed() renews the staging
    for m in (cpu, dev):
        m.params["layers.0.attention.wq.weight"][...] *= -3.0
    dev.mark_params_changed()
    ref, got = step(cpu, tokens, targets), step(dev, tokens, targets)
    assert ane.status()["weight_stagings"] == 3 * n_w
    assert_close_per_tensor(cpu, got, ref, 5e-3)


def test_requests_are_made_once_per_weight_surface_not_per_step(emulator, rng):
    """A training loop's steady state makes no request: each staged weight's
    surface gets its request when it is created, and every later version of
    that weight is written into the same surface."""
    tokens, targets = batch(rng)
    dev = ab.Llama(CFG, seed=19, backend="ane")
    opt = ab.AdamW(dev, lr=1e-3)
    made = []
    for _ in range(4):
        step(dev, tokens, targets)
        opt.step()
        made.append(ane.status()["requests"])
    n_w = N_PROJ * CFG.n_layers
    shapes = {shape for name, _, shape in dev._specs if name.startswith("layers.") and len(shape) == 2}
    # the first step: one per program (its own surfaces) and one per staged weight
    assert made[0] == len(shapes) + n_w, made
    assert made[1:] == [made[0]] * 3, f"requests made after the first step: {made}"
    assert ane.status()["weight_stagings"] == 4 * n_w          # while the weights changed every step


def test_params_versions_are_unique_across_models(emulator):
    a, b = ab.Llama(CFG, seed=0, backend="cpu"), ab.Llama(CFG, seed=0, backend="cpu")
    assert a.params_version != b.params_version
    v = a.params_version
    a.init_weights(1)
    assert a.params_version > v


def test_backend_ane_without_an_ane_raises(monkeypatch):
    monkeypatch.setenv("ANEBACKWARD_ANE", "off")
    prev = ane.use_emulator(None)
    try:
        with pytest.raises(ab.AneUnavailableError, match="disabled"):
            ab.Llama(CFG, backend="ane")
    finally:
        ane.use_emulator(prev)


def test_the_reference_kernels_take_no_ane(emulator, rng):
    m = ab.Llama(CFG, seed=0, backend="reference")
    tokens, targets = batch(rng, B=1, S=8)
    m.forward(tokens, targets)
    work = m._workspace(1, 8)
    p, g, w = (ffi.from_buffer("float[]", a) for a in (m.flat_params, m.flat_grads, work))
    ctx = ane._current()[0]
    assert lib.ab_model_backward_ane(m._cfg, p, g, 1, 8, 1.0, 0, w, work.size, ctx, 1, 0) \
        == lib.AB_EINVAL
    assert lib.ab_model_backward_ane(m._cfg, p, g, 1, 8, 1.0, 0, w, work.size, ctx, 1, 7) \
        == lib.AB_EINVAL


def overlap_log(run):
    """run() under the overlap hook (ab_testing.h); its events as
    {kind: {id: seq}} with kinds dx_begin, dx_end, dW_submit, dW_begin, dW_end."""
    lib.ab_ane_testing_overlap(1)
    try:
        run()
        n = ffi.new("int64_t *")
        lib.ab_ane_testing_overlap_log(ffi.NULL, 0, n)
        buf = ffi.new("int64_t[]", 3 * n[0])
        lib.ab_ane_testing_overlap_log(buf, n[0], n)
    finally:
        lib.ab_ane_testing_overlap(0)
    kinds = ["dx_begin", "dx_end", "dW_submit", "dW_begin", "dW_end"]
    ev = {k: {} for k in kinds}
    for seq, kind, i in np.frombuffer(ffi.buffer(buf), dtype=np.int64).reshape(-1, 3):
        ev[kinds[kind]][int(i)] = int(seq)
    return ev


@pytest.mark.parametrize("recompute", [False, True])
def test_backward_runs_each_dW_on_the_cpu_while_the_next_dx_is_on_the_ane(emulator, rng, recompute):
    """The backward queues each projection's dW to the CPU worker after its
    dx and waits for them once, at the end: under the overlap hook (a queued
    dW begins, then holds until a dx call begins; that dx call holds at its
    end until the dW has begun) the event order shows every dW running
    while the next projection's dx is on the ANE — dx of projection i+1
    begins before dW of projection i ends, and dW i begins before dx i+1
    ends — whatever the scheduler does. A backward that waited for each dW
    before the next dx would show no such pair (its dW would be released
    only by its wait). Gradients as on the CPU."""
    tokens, targets = batch(rng)
    ref = step(ab.Llama(CFG, seed=13, backend="cpu"), tokens, targets)
    dev = ab.Llama(CFG, seed=13, backend="ane", recompute=recompute)
    got = []
    ev = overlap_log(lambda: got.append(step(dev, tokens, targets)))
    assert_close_per_tensor(dev, got[0], ref, 5e-3)
    n_dx, n_dw = N_PROJ * CFG.n_layers, 1 + N_PROJ * CFG.n_layers   # dW: the classifier's too
    assert sorted(ev["dx_begin"]) == sorted(ev["dx_end"]) == list(range(n_dx))
    assert sorted(ev["dW_submit"]) == sorted(ev["dW_end"]) == list(range(n_dw))
    dx_begins = sorted(ev["dx_begin"].items(), key=lambda t: t[1])
    overlapped = []
    for j in range(n_dw):
        nxt = [i for i, b in dx_begins if b > ev["dW_submit"][j]]
        if nxt and ev["dW_begin"][j] < ev["dx_end"][nxt[0]] and ev["dx_begin"][nxt[0]] < ev["dW_end"][j]:
            overlapped.append(j)
    # dW order: the classifier's (#0), then per layer w2 w1 w3 wo wq wk wv. One wait at the end:
    # all but layer 0's wq wk wv (no dx after them) overlap the next dx. With recompute the
    # queue is drained before each layer's recompute, which waits out the classifier's and
    # every layer's wq wk wv.
    unpaired = {n_dw - 3, n_dw - 2, n_dw - 1}
    if recompute:
        unpaired |= {0} | {7 * g + d for g in range(CFG.n_layers - 1) for d in (5, 6, 7)}
    assert overlapped == [j for j in range(n_dw) if j not in unpaired], overlapped


def test_platform_errors_raise_with_ane_and_fall_back_with_auto(emulator, rng):
    tokens, targets = batch(rng)
    ref = step(ab.Llama(CFG, seed=17, backend="cpu"), tokens, targets)
    dev = ab.Llama(CFG, seed=17, backend="ane")
    step(dev, tokens, targets)                   # programs compiled and loaded
    lib.ab_ane_emulated_fail_next(b"evaluate", 1, 0)
    dev.forward(tokens, targets)
    with pytest.raises(ab.AnebackwardError, match="Llama.backward"):
        dev.backward()
    lib.ab_ane_emulated_fail_next(ffi.NULL, 0, 0)
    # every queued job was waited for: the next step works and is right
    assert_close_per_tensor(dev, step(dev, tokens, targets), ref, 5e-3)
    ane.configure(min_flops=0)
    auto = ab.Llama(CFG, seed=17, backend="auto")
    lib.ab_ane_emulated_fail_next(b"evaluate", 1, 0)
    try:
        got = step(auto, tokens, targets)
    finally:
        lib.ab_ane_emulated_fail_next(ffi.NULL, 0, 0)
    assert auto.ane_reason is None and ane.status()["fallbacks"]["error"] >= 1
    assert_close_per_tensor(auto, got, ref, 5e-3)
