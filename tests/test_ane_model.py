"""The model with its layer projections on the (emulated) ANE — forward
y = x·Wᵀ and backward dx, fused where projections share an input: losses
and gradients against the CPU (fp16 tolerance; bit-identical when the ANE
is not used), weight staging keyed to params_version (reused across
backwards of one step, renewed after AdamW.step), requests, the overlap of
dW with dx, routing."""
import numpy as np
import pytest

import anebackward as ab
from anebackward import ane
from anebackward._native import ffi, lib

CFG = ab.LlamaConfig(dim=128, hidden_dim=192, n_layers=2, n_heads=4, n_kv_heads=2,
                     vocab_size=97, max_seq_len=64)
N_PROJ = 7                       # wq wk wv wo w1 w2 w3 per layer: one forward evaluation each
N_DX = 4                         # dx evaluations per layer: w2; w1+w3; wo; wq+wk+wv (fused)
N_EVAL = N_PROJ + N_DX           # per layer and step


def pad(v):
    return -(-v // 64) * 64


def programs(cfg, S=64):
    """The distinct programs (S, result width, contracted width) a step compiles."""
    D, Hd = cfg.dim, cfg.hidden_dim
    hd = cfg.head_dim or D // cfg.n_heads
    qd, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    fwd = {(S, pad(o), pad(i)) for o, i in [(qd, D), (kv, D), (D, qd), (Hd, D), (D, Hd)]}
    dx = {(S, pad(Hd), pad(D)), (S, pad(D), pad(2 * Hd)), (S, pad(qd), pad(D)),
          (S, pad(D), pad(qd + 2 * kv))}
    return fwd | dx


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
    assert ane.status()["tiles_ane"] - before == N_EVAL * CFG.n_layers
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
    assert auto.ane_reason is None and ane.status()["tiles_ane"] == N_EVAL * CFG.n_layers
    assert_close_per_tensor(auto, got, ref, 5e-3)


def test_forward_projections_on_the_ane_at_stories15m_shapes(emulator, rng):
    """ab_model_forward_ane at stories15M's layer shapes (dim 288, hidden 768,
    6 heads; two layers and a small vocabulary keep it fast): every layer
    projection is one ANE evaluation per 256-row tile, and the logits and the
    loss are within the documented fp16 bound of the CPU's (docs/ane.md:
    each projection within ~4e-4 relative; logits 5e-3, loss 1e-3)."""
    cfg = ab.LlamaConfig(dim=288, hidden_dim=768, n_layers=2, n_heads=6, n_kv_heads=6,
                         vocab_size=256, max_seq_len=256)
    t = rng.integers(0, cfg.vocab_size, size=(1, 257)).astype(np.int32)
    cpu, dev = ab.Llama(cfg, seed=2, backend="cpu"), ab.Llama(cfg, seed=2, backend="ane")
    ref_loss, got_loss = cpu.forward(t[:, :-1], t[:, 1:]), dev.forward(t[:, :-1], t[:, 1:])
    st = ane.status()
    assert st["tiles_ane"] == N_PROJ * cfg.n_layers and st["tiles_cpu"] == 0
    assert got_loss != ref_loss and abs(got_loss - ref_loss) < 1e-3 * ref_loss
    ref, got = cpu.logits(t[:, :-1]), dev.logits(t[:, :-1])
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert 0 < err < 5e-3, err
    # the same projection through the Python entry, against float64
    x = rng.standard_normal((256, cfg.dim)).astype(np.float32)
    W = dev.params["layers.0.feed_forward.w1.weight"]
    y = ane.linear(x, W)
    y64 = x.astype(np.float64) @ W.T.astype(np.float64)
    assert np.linalg.norm(y - y64) / np.linalg.norm(y64) < 1e-3


def test_fifty_training_steps_on_the_ane_follow_the_cpus_loss_curve(emulator):
    """50 AdamW steps with forward and backward projections on the emulated
    ANE against the same 50 on the CPU. Training is chaotic, so the bound is
    fp16's own: the ANE curve departs from the CPU's by at most twice as much
    as a CPU run whose initial weights were rounded to fp16 once (measured:
    0.36 against 0.51); before the loss falls steeply (10 steps) they agree
    within 1e-3, and the ANE run learns as the CPU run does."""
    g = np.random.default_rng(5)
    seqs = np.empty((50, 2, 65), np.int32)
    start = g.integers(0, CFG.vocab_size, size=(50, 2))
    for t in range(65):                          # a learnable rule: next = 3 * token + 1 mod V
        seqs[:, :, t] = start
        start = (3 * start + 1) % CFG.vocab_size

    def curve(backend, round_init=False):
        m = ab.Llama(CFG, seed=1, backend=backend)
        if round_init:
            m.flat_params[:] = m.flat_params.astype(np.float16)
            m.mark_params_changed()
        opt = ab.AdamW(m, lr=3e-3)
        losses = []
        for s in seqs:
            losses.append(m.forward(s[:, :-1], s[:, 1:]))
            m.backward()
            opt.step()
        return np.array(losses)

    cpu, dev, cpu16 = curve("cpu"), curve("ane"), curve("cpu", round_init=True)
    assert ane.status()["tiles_cpu"] == 0 and ane.status()["tiles_ane"] == 50 * N_EVAL * CFG.n_layers
    assert np.all(np.abs(dev[:10] - cpu[:10]) <= 1e-3 * cpu[:10]), dev[:10] - cpu[:10]
    bound = np.max(np.abs(cpu16 - cpu))
    assert np.max(np.abs(dev - cpu)) <= 2 * bound, (np.max(np.abs(dev - cpu)), bound)
    assert dev[-5:].mean() < 0.3 * dev[0] and cpu[-5:].mean() < 0.3 * cpu[0]


def test_a_fused_side_wider_than_the_origin_ran_is_split(emulator, rng):
    """w1+w3 of hidden 1600 would stack 3200 channels (> 3072, the widest the
    origin ran): they run as one dx evaluation each, accumulating; wq+wk+wv
    (192 channels) stay fused. Gradients as on the CPU."""
    cfg = ab.LlamaConfig(dim=64, hidden_dim=1600, n_layers=1, n_heads=2, n_kv_heads=1,
                         vocab_size=61, max_seq_len=64)
    assert not ane.fused(2 * 1600) and ane.fused(64 + 2 * 32)
    t = rng.integers(0, cfg.vocab_size, size=(1, 65)).astype(np.int32)
    cpu, dev = ab.Llama(cfg, seed=4, backend="cpu"), ab.Llama(cfg, seed=4, backend="ane")
    ref = step(cpu, t[:, :-1], t[:, 1:])
    dev.forward(t[:, :-1], t[:, 1:])
    before = ane.status()["tiles_ane"]
    dev.backward()
    assert ane.status()["tiles_ane"] - before == N_DX + 1        # w2; w1; w3; wo; wq+wk+wv
    assert_close_per_tensor(dev, dev.flat_grads, ref, 5e-3)


def test_forward_and_fused_dx_fall_back_to_the_cpu_whole(emulator, rng):
    """An evaluation that fails in the forward (backend="auto") or in a fused
    dx (the second ANE call of the backward: w1+w3) leaves that call's whole
    result to the CPU — both projections of the fused call — and the step
    stays right; a forward whose fp16 result overflows does too."""
    tokens, targets = batch(rng)
    ane.configure(min_flops=0)
    cpu, auto = ab.Llama(CFG, seed=23, backend="cpu"), ab.Llama(CFG, seed=23, backend="auto")
    ref = step(cpu, tokens, targets)
    lib.ab_ane_emulated_fail_next(b"evaluate", 1, 0)               # the forward's first call
    try:
        assert abs(auto.forward(tokens, targets) - cpu.last_loss) < 1e-3 * cpu.last_loss
        assert ane.status()["fallbacks"]["error"] == 1
        lib.ab_ane_emulated_fail_next(b"evaluate", 2, 0)           # dx of w2, then of w1+w3
        auto.backward()
    finally:
        lib.ab_ane_emulated_fail_next(ffi.NULL, 0, 0)
    assert ane.status()["fallbacks"]["error"] == 3 and auto.ane_reason is None
    assert_close_per_tensor(auto, auto.flat_grads, ref, 5e-3)
    # overflow: x far beyond fp16 with loss scaling off
    ane.configure(loss_scaling=False)
    x = np.full((64, 64), 300.0, np.float32)
    W = np.full((96, 64), 4.0, np.float32)                            # every y = 64 * 1200 > 65504
    y = ane.linear(x, W)
    assert ane.last_call()["fallback"] == "fp16 overflow or saturation"
    assert np.array_equal(y, ab.linear(x, W, backend="cpu"))


def test_staging_is_reused_within_a_step_and_renewed_after_adamw_step(emulator, rng):
    tokens, targets = batch(rng)
    cpu = ab.Llama(CFG, seed=11, backend="cpu")
    dev = ab.Llama(CFG, seed=11, backend="ane")
    n_w = N_EVAL * CFG.n_layers     # staged: each weight's Wᵀ (forward), each dx group's W
    step(dev, tokens, targets)
    st = ane.status()
    assert st["weight_stagings"] == n_w and st["weight_reuses"] == 0
    # one program per distinct shape, shared by every layer, forward and dx alike
    assert st["compiles"] == len(programs(CFG))
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
    n_w = N_EVAL * CFG.n_layers
    # the first step: one per program (its own surfaces) and one per staged surface
    assert made[0] == len(programs(CFG)) + n_w, made
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
    dev.forward(tokens, targets)
    ev = overlap_log(dev.backward)
    assert_close_per_tensor(dev, dev.flat_grads, ref, 5e-3)
    # ANE calls: the fused dx (and, with recompute, each layer's forward projections but w2,
    # whose output X[l+1] the recompute does not need)
    n_dx = (N_DX + (N_PROJ - 1 if recompute else 0)) * CFG.n_layers
    n_dw = 1 + N_PROJ * CFG.n_layers                                 # dW: the classifier's too
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
    dev.forward(tokens, targets)
    lib.ab_ane_emulated_fail_next(b"evaluate", 1, 0)
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
