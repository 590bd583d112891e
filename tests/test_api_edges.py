"""API edges: cosine_lr's argument checks, the reference cross-entropy of a
very wide row, one Llama shared by several Python threads, and the thread
cap shared by set_num_threads and `anebackward train --threads`."""
import math
import threading

import numpy as np
import pytest

import anebackward as ab
from anebackward import Llama, LlamaConfig, cosine_lr

KW = dict(max_lr=1.0, warmup_steps=10, total_steps=110, min_lr=0.1)


@pytest.mark.parametrize("name,value", [
    ("step", -1), ("warmup_steps", -1), ("total_steps", 0), ("total_steps", -5),
    ("max_lr", -1.0), ("min_lr", -0.1), ("max_lr", float("nan")), ("min_lr", float("inf")),
])
def test_cosine_lr_rejects_negative_and_zero_arguments(name, value):
    args = dict(KW, step=3)
    args[name] = value
    step = args.pop("step")
    with pytest.raises(ValueError, match=name):
        cosine_lr(step, **args)


def test_cosine_lr_rejects_min_lr_above_max_lr_and_keeps_its_values():
    with pytest.raises(ValueError, match="min_lr .* max_lr"):
        cosine_lr(3, max_lr=1e-4, warmup_steps=0, total_steps=10, min_lr=1e-3)
    # warmup_steps=0 stays valid (no warm-up): the old code divided by it for step < 0
    assert cosine_lr(0, max_lr=1.0, warmup_steps=0, total_steps=10) == pytest.approx(1.0)
    assert cosine_lr(60, **KW) == pytest.approx(0.1 + 0.5 * 0.9)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_cross_entropy_of_a_2_pow_26_class_row_matches_float64(backend):
    """A float sum of 2^26 exps stops growing at 2^24: the reference gave
    log(2^24) = 16.64 instead of log(2^26) = 18.02. np.zeros is mapped
    lazily and the row is only read, so the 256 MiB cost little memory.
    The CPU kernel sums float blocks of 2^16 classes in double (it was 0.04
    nats off too); its float exp terms leave ~3e-5 nats."""
    V = 1 << 26
    logits = np.zeros((1, V), np.float32)
    logits[0, 12345] = 3.0
    logits[0, 7] = -2.0
    want = math.log((V - 2) + math.exp(3.0) + math.exp(-2.0)) - 3.0       # float64
    rel = 1e-6 if backend == "reference" else 1e-5
    got = ab.cross_entropy(logits, np.array([12345]), backend=backend)
    assert got == pytest.approx(want, rel=rel)
    assert ab.cross_entropy(logits, np.array([0]), backend=backend) == pytest.approx(want + 3.0,
                                                                                      rel=rel)


def test_the_thread_cap_has_one_source():
    ab.set_num_threads(ab.MAX_THREADS)          # the cap itself is accepted ...
    try:
        with pytest.raises(ValueError, match=str(ab.MAX_THREADS)):
            ab.set_num_threads(ab.MAX_THREADS + 1)     # ... one more is not
    finally:
        ab.set_num_threads(2)
    from anebackward.train import RANGES
    assert RANGES["threads"][1:] == (1, ab.MAX_THREADS)


# -- one model, several Python threads ------------------------------------------

def _batches(V, n, B=2, S=16):
    rng = np.random.default_rng(1)
    return [rng.integers(0, V, (B, S)).astype(np.int32) for _ in range(n)]


def test_a_model_shared_by_four_threads_serializes_its_calls():
    """Four threads call forward (alternating batch shapes, which reallocates
    the workspace), backward, logits and AdamW.step on one model. The old
    model returned wrong losses (another thread's forward overwrote the
    activations), C error -1 and TypeErrors. Every forward-only loss must
    equal the single-threaded one for the same weights; a
    forward/backward pair held under model.lock gives that batch's gradient."""
    cfg = LlamaConfig.preset("tiny")
    model = Llama(cfg, seed=0)
    data = _batches(cfg.vocab_size, 6) + _batches(cfg.vocab_size, 6, B=3, S=9)
    ref = Llama(cfg, seed=0)
    want = [ref.forward(x, want_grad=False) for x in data]
    ref.forward(data[0])
    ref.backward()
    want_grad = ref.flat_grads.copy()
    errors, bad = [], []

    def work(k):
        try:
            for it in range(25):
                i = (k + it) % len(data)
                loss = model.forward(data[i], want_grad=False)
                if loss != want[i]:
                    bad.append((k, it, loss, want[i]))
                lg = model.logits(data[i][:1], last_only=True)
                if not np.isfinite(lg).all():
                    bad.append((k, it, "logits"))
                with model.lock:            # a forward/backward pair from one thread
                    model.forward(data[0])
                    model.backward()
                    if not np.array_equal(model.flat_grads, want_grad):
                        bad.append((k, it, "grads"))
        except Exception as e:      # noqa: BLE001 — reported by the assertion below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not bad, (errors[:3], bad[:3])


def test_adamw_steps_from_several_threads_are_serialized():
    """AdamW.step holds the model's lock: four threads taking 5 steps each
    give the 20 steps of one thread (the gradient is fixed)."""
    cfg = LlamaConfig.preset("tiny")
    a, b = Llama(cfg, seed=0), Llama(cfg, seed=0)
    x = _batches(cfg.vocab_size, 1)[0]
    for m in (a, b):
        m.forward(x)
        m.backward()
    oa, ob = ab.AdamW(a, lr=1e-3), ab.AdamW(b, lr=1e-3)
    for _ in range(20):
        ob.step()
    threads = [threading.Thread(target=lambda: [oa.step() for _ in range(5)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert oa.step_count == 20
    np.testing.assert_array_equal(a.flat_params, b.flat_params)
