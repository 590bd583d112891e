"""Llama.backward(on_grads_ready=...) / ab_model_backward_notify: each group
of gradients is announced once, in backward order, only when it is final,
and the gradients are bit-identical to a backward without the callback —
what the data-parallel trainer's overlapped all-reduce relies on
(anebackward/distributed.py, tests/test_distributed_train.py)."""
import numpy as np
import pytest

from anebackward import Llama, LlamaConfig
from anebackward._native import ffi, fptr, lib

CONFIGS = {
    "tied": dict(shared_classifier=True),
    "untied": dict(shared_classifier=False),
    "qk_norm_gqa": dict(shared_classifier=False, n_kv_heads=2, head_dim=12, qk_norm=True),
}


def _model(kind, rng, recompute=False):
    cfg = LlamaConfig(dim=32, hidden_dim=72, n_layers=3, n_heads=4, vocab_size=61,
                      max_seq_len=16, **{"n_kv_heads": 4, **CONFIGS[kind]})
    m = Llama(cfg, seed=3, recompute=recompute)
    m.flat_params[:] += (0.05 * rng.standard_normal(m.n_params)).astype(np.float32)
    return m


def _plain(m, tokens, **kw):
    m.forward(tokens)
    m.backward(**kw)
    return m.flat_grads.copy()


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_groups_come_in_order_cover_every_gradient_once_and_are_final(rng, kind, recompute):
    m = _model(kind, rng, recompute)
    tokens = rng.integers(0, 61, size=(2, 9))
    want = _plain(m, tokens)
    m.flat_grads[:] = np.nan          # anything not written by this backward shows
    seen, snapshots = [], []

    def ready(ranges):
        seen.append(ranges)
        # at announcement every announced float already holds its final value
        snapshots.append([m.flat_grads[lo:hi].copy() for lo, hi in ranges])

    m.forward(tokens)
    m.backward(on_grads_ready=ready)
    np.testing.assert_array_equal(m.flat_grads, want)          # bit-identical
    assert seen == m.grad_groups() and len(seen) == m.config.n_layers + 2
    covered = np.zeros(m.n_params, dtype=np.int64)
    for ranges, snap in zip(seen, snapshots):
        for (lo, hi), s in zip(ranges, snap):
            covered[lo:hi] += 1
            np.testing.assert_array_equal(s, want[lo:hi])
    assert (covered == 1).all(), "every gradient float in exactly one group"
    # the first group is the head, the last the embedding (with a tied classifier)
    lay = m._specs
    emb = next((off, off + np.prod(sh)) for n, off, sh in lay if n == "tok_embeddings.weight")
    assert tuple(emb) in [tuple(r) for r in seen[-1]]


def test_layer_groups_hold_exactly_that_layers_tensors(rng):
    m = _model("qk_norm_gqa", rng)
    groups = m.grad_groups()
    L = m.config.n_layers
    for i, l in enumerate(range(L - 1, -1, -1)):
        want = sorted((off, off + int(np.prod(sh))) for n, off, sh in m._specs
                      if n.startswith(f"layers.{l}."))
        assert groups[1 + i] == want and len(want) == 11   # 7 weights, 2 norms, q/k norms
    assert groups[0] == sorted((off, off + int(np.prod(sh))) for n, off, sh in m._specs
                               if n in ("norm.weight", "output.weight"))


def test_accumulate_and_scale_are_unchanged_by_the_callback(rng):
    m = _model("untied", rng)
    a, b = rng.integers(0, 61, size=(2, 7)), rng.integers(0, 61, size=(2, 7))
    _plain(m, a, grad_scale=0.5)
    want = _plain(m, b, grad_scale=0.5, accumulate=True)
    calls = []
    m.forward(a)
    m.backward(grad_scale=0.5, on_grads_ready=calls.append)
    m.forward(b)
    m.backward(grad_scale=0.5, accumulate=True, on_grads_ready=calls.append)
    np.testing.assert_array_equal(m.flat_grads, want)
    assert len(calls) == 2 * (m.config.n_layers + 2)


def test_an_exception_in_the_callback_is_raised_after_a_complete_backward(rng):
    m = _model("tied", rng)
    tokens = rng.integers(0, 61, size=(1, 12))
    want = _plain(m, tokens)
    calls = []

    def boom(ranges):
        calls.append(ranges)
        raise KeyError("from the callback")

    m.forward(tokens)
    with pytest.raises(KeyError, match="from the callback"):
        m.backward(on_grads_ready=boom)
    assert len(calls) == 1                      # no call after the first exception
    np.testing.assert_array_equal(m.flat_grads, want)
    m.forward(tokens)                           # the model is usable afterwards
    m.backward(on_grads_ready=lambda r: None)
    np.testing.assert_array_equal(m.flat_grads, want)


def test_bad_callback_is_refused_before_the_backward(rng):
    m = _model("tied", rng)
    m.forward(rng.integers(0, 61, size=(1, 5)))
    with pytest.raises(TypeError, match="on_grads_ready must be callable"):
        m.backward(on_grads_ready=3)
    m.backward()                                # the forward was not consumed


def test_c_entry_with_null_callback_is_ab_model_backward(rng):
    m = _model("untied", rng)
    tokens = rng.integers(0, 61, size=(2, 6))
    want = _plain(m, tokens)
    m.forward(tokens)
    m._pending = None
    work = m._workspace(2, 6)
    g = np.full(m.n_params, np.nan, dtype=np.float32)
    assert lib.ab_model_backward_notify(m._cfg, fptr(m.flat_params), fptr(g), 2, 6, 1.0, 0,
                                        fptr(work), work.size, ffi.NULL, ffi.NULL) == 0
    np.testing.assert_array_equal(g, want)


def test_the_model_refuses_to_run_inside_its_own_callback(rng):
    m = _model("untied", rng)
    tokens = rng.integers(0, 61, size=(1, 8))
    want = _plain(m, tokens)

    def nested(ranges):
        m.forward(tokens)          # would overwrite the activations the backward reads

    m.forward(tokens)
    with pytest.raises(RuntimeError, match="cannot run inside backward's on_grads_ready"):
        m.backward(on_grads_ready=nested)
    np.testing.assert_array_equal(m.flat_grads, want)
    m.forward(tokens)              # and runs again once the backward has returned
    m.backward()
    np.testing.assert_array_equal(m.flat_grads, want)


def test_a_frozen_group_is_announced_empty_and_the_rest_is_unchanged(rng):
    cfg = LlamaConfig(dim=32, hidden_dim=72, n_layers=3, n_heads=4, n_kv_heads=4,
                      vocab_size=61, max_seq_len=16, shared_classifier=False)
    m = Llama(cfg, seed=3, trainable=lambda n: n.startswith("layers.1.") or n == "norm.weight")
    tokens = rng.integers(0, 61, size=(2, 9))
    want = _plain(m, tokens)
    seen = []
    m.forward(tokens)
    m.backward(on_grads_ready=seen.append)
    np.testing.assert_array_equal(m.flat_grads, want)
    assert seen == m.grad_groups()
    # [norm], layer 2 (frozen), layer 1, layer 0 (frozen), [tok_embeddings] (frozen)
    assert [len(g) > 0 for g in seen] == [True, False, True, False, False]
    covered = sorted(r for g in seen for r in g)
    assert covered[0][0] == 0 and covered[-1][1] == m.n_grads
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
