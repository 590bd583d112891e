"""The whole model against PyTorch autograd in float64 on the same weights.

The reference is the project's one plain-PyTorch Llama in llama2.c's model.py
style (anebackward/bench/torch_llama.py: RMSNorm, RoPE with freqs_cos/sin,
repeat_kv for GQA, SwiGLU, tied or untied classifier).
"""
import math

import numpy as np
import pytest

from anebackward import Llama, LlamaConfig
from anebackward.layout import tensor_specs


def torch_model(torch, cfg, params, norm=None):
    """The project's plain-PyTorch Llama (anebackward/bench/torch_llama.py,
    llama2.c's model.py) in float64, holding a copy of params (name -> array).
    norm(x, w, layer_input) may replace RMSNorm (the seed-defect tests plug
    in the seed's wrong backward)."""
    from anebackward.bench.torch_llama import Transformer
    torch.manual_seed(0)
    return Transformer.from_config(cfg, norm_fn=norm).double().load_arrays(params)


def torch_grads(torch, model, tokens, targets, norm=None):
    ref = torch_model(torch, model.config, model.params, norm)
    ref(torch.tensor(tokens, dtype=torch.long), torch.tensor(targets, dtype=torch.long))
    ref.last_loss.backward()
    return ref.last_loss.item(), {n: p.grad.numpy() for n, p in ref.named_parameters()}


def randomize(model, rng, norm_spread=0.5):
    """Weights away from the init's symmetric point: norms not all 1, and
    residual-stream scales far from 1 so that rms^2 vs rms^3 matters."""
    model.flat_params[:model.n_decay] = (rng.standard_normal(model.n_decay) * 0.3).astype(np.float32)
    model.flat_params[model.n_decay:] = (
        1.0 + norm_spread * rng.standard_normal(model.n_params - model.n_decay)).astype(np.float32)


def shifted(tokens):
    t = np.atleast_2d(tokens)
    tgt = np.full_like(t, -1)
    tgt[:, :-1] = t[:, 1:]
    return tgt


def assert_grads_match(model, ref, tol=1e-3):
    """Every gradient within tol of its tensor's largest reference entry."""
    assert set(model.grads) == set(ref)
    for name, g in model.grads.items():
        r = ref[name]
        scale = np.abs(r).max()
        assert scale > 0, f"{name}: reference gradient is all zero (test would be vacuous)"
        err = np.abs(g - r).max()
        assert err <= tol * scale, \
            f"{name}: max |ours - torch| = {err:.3g}, max |torch| = {scale:.3g}"


CASES = [
    # dim, hidden, layers, heads, kv_heads, vocab, tied, B
    pytest.param(24, 40, 2, 3, 3, 37, True, 1, id="mha-tied-b1"),
    pytest.param(24, 40, 2, 3, 3, 37, False, 3, id="mha-untied-b3"),
    pytest.param(32, 48, 2, 4, 2, 41, True, 3, id="gqa2-tied-b3"),
    pytest.param(32, 48, 3, 4, 1, 41, False, 1, id="gqa4-untied-b1"),
]


@pytest.mark.parametrize("dim,hidden,L,H,KV,V,tied,B", CASES)
def test_loss_and_every_gradient_match_torch_float64(torch, rng, dim, hidden, L, H, KV, V, tied, B):
    cfg = LlamaConfig(dim=dim, hidden_dim=hidden, n_layers=L, n_heads=H, n_kv_heads=KV,
                      vocab_size=V, max_seq_len=24, shared_classifier=tied)
    model = Llama(cfg, seed=1)
    randomize(model, rng)
    S = 19
    tokens = rng.integers(0, V, size=(B, S)) if B > 1 else rng.integers(0, V, size=S)
    loss = model.forward(tokens)
    model.backward()
    ref_loss, ref = torch_grads(torch, model, np.atleast_2d(tokens), shifted(tokens))
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert ("output.weight" in model.grads) == (not tied)
    assert_grads_match(model, ref)


def test_explicit_targets_with_ignored_positions(torch, rng):
    cfg = LlamaConfig(dim=16, hidden_dim=24, n_layers=1, n_heads=2, vocab_size=23, max_seq_len=16,
                      shared_classifier=False)
    model = Llama(cfg, seed=3)
    randomize(model, rng)
    tokens = rng.integers(0, 23, size=(2, 9))
    targets = rng.integers(0, 23, size=(2, 9))
    targets[0, 3] = targets[1, 0] = -1
    loss = model.forward(tokens, targets)
    model.backward()
    ref_loss, ref = torch_grads(torch, model, tokens, targets)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert_grads_match(model, ref)


def test_reference_backend_matches_fast(rng):
    cfg = LlamaConfig(dim=16, hidden_dim=40, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=29,
                      max_seq_len=16)
    fast, ref = Llama(cfg, seed=5), Llama(cfg, seed=5, backend="reference")
    tokens = rng.integers(0, 29, size=(2, 11))
    l1, l2 = fast.forward(tokens), ref.forward(tokens)
    fast.backward()
    ref.backward()
    assert abs(l1 - l2) < 1e-5
    np.testing.assert_allclose(fast.flat_grads, ref.flat_grads, rtol=1e-3, atol=1e-6)


def test_gradient_accumulation_equals_one_big_batch(rng):
    cfg = LlamaConfig.preset("tiny")
    model = Llama(cfg, seed=2)
    tokens = rng.integers(0, cfg.vocab_size, size=(4, 17))
    model.forward(tokens)
    model.backward()
    whole = model.flat_grads.copy()
    for i, part in enumerate((tokens[:2], tokens[2:])):
        model.forward(part)
        model.backward(accumulate=i > 0, grad_scale=0.5)
    np.testing.assert_allclose(model.flat_grads, whole, rtol=1e-4, atol=1e-7)


def test_backward_overwrites_unless_accumulating(rng):
    model = Llama(LlamaConfig.preset("tiny", shared_classifier=False), seed=2)
    tokens = rng.integers(0, 259, size=12)
    model.forward(tokens)
    model.backward()
    g = model.flat_grads.copy()
    model.forward(tokens)
    model.backward()
    np.testing.assert_array_equal(model.flat_grads, g)
    model.forward(tokens)
    model.backward(accumulate=True)
    np.testing.assert_allclose(model.flat_grads, 2 * g, rtol=1e-5, atol=1e-10)


def test_params_and_grads_are_views_into_flat_buffers():
    cfg = LlamaConfig.preset("tiny", shared_classifier=False)
    model = Llama(cfg)
    n = 0
    for name, p in model.params.items():
        assert np.shares_memory(p, model.flat_params), name
        assert np.shares_memory(model.grads[name], model.flat_grads), name
        n += p.size
    assert n == model.n_params == model.flat_params.size
    assert model.params["layers.1.attention.wk.weight"].shape == (cfg.kv_dim, cfg.dim)
    assert model.params["layers.0.feed_forward.w2.weight"].shape == (cfg.dim, cfg.hidden_dim)
    # the 2-D weights are exactly the prefix [0, n_decay)
    for name, off, shape in tensor_specs(cfg):
        assert (len(shape) == 2) == (off < model.n_decay), name


def test_init_like_llama2c():
    cfg = LlamaConfig(dim=64, hidden_dim=192, n_layers=4, n_heads=4, vocab_size=300, max_seq_len=8)
    m = Llama(cfg, seed=0)
    assert np.std(m.params["tok_embeddings.weight"]) == pytest.approx(0.02, rel=0.05)
    assert np.std(m.params["layers.0.attention.wq.weight"]) == pytest.approx(0.02, rel=0.05)
    assert np.std(m.params["layers.0.feed_forward.w1.weight"]) == pytest.approx(0.02, rel=0.05)
    small = 0.02 / math.sqrt(2 * 4)
    for k in ("attention.wo", "feed_forward.w3"):
        assert np.std(m.params[f"layers.2.{k}.weight"]) == pytest.approx(small, rel=0.05)
    assert np.std(m.params["layers.2.feed_forward.w2.weight"]) == pytest.approx(0.02, rel=0.05)
    assert (m.params["norm.weight"] == 1).all()
    np.testing.assert_array_equal(Llama(cfg, seed=0).flat_params, m.flat_params)
    assert not np.array_equal(Llama(cfg, seed=1).flat_params, m.flat_params)


def test_logits_match_forward_loss(rng):
    cfg = LlamaConfig.preset("tiny")
    m = Llama(cfg, seed=4)
    tokens = rng.integers(0, 259, size=(2, 10))
    lg = m.logits(tokens).astype(np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    picked = np.take_along_axis(lg[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    assert m.forward(tokens) == pytest.approx(float((lse[:, :-1] - picked).mean()), rel=1e-5)
    np.testing.assert_array_equal(m.logits(tokens, last_only=True), m.logits(tokens)[:, -1])


def test_logits_of_one_sequence_have_no_batch_axis(rng):
    cfg = LlamaConfig.preset("tiny")
    m = Llama(cfg, seed=4)
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 10))
    batch = m.logits(tokens)
    one = m.logits(tokens[1])
    assert one.shape == (10, cfg.vocab_size) and batch.shape == (2, 10, cfg.vocab_size)
    np.testing.assert_allclose(one, batch[1], rtol=1e-5, atol=1e-6)
    last = m.logits(tokens[1], last_only=True)
    assert last.shape == (cfg.vocab_size,)
    np.testing.assert_array_equal(last, one[-1])


def test_bad_input_raises(rng):
    m = Llama(LlamaConfig.preset("tiny"))
    with pytest.raises(ValueError, match="tokens must be in"):
        m.forward(np.array([1, 2, 259]))
    with pytest.raises(ValueError, match="max_seq_len"):
        m.forward(np.zeros(65, dtype=np.int32))
    with pytest.raises(ValueError, match="at least 2"):
        m.forward(np.array([3]))
    with pytest.raises(TypeError, match="integer dtype"):
        m.forward(np.array([1.0, 2.0]))
    with pytest.raises(RuntimeError, match="forward"):
        m.backward()
    m.forward(np.array([1, 2, 3]))
    m.backward()
    with pytest.raises(RuntimeError, match="forward"):
        m.backward()
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        LlamaConfig(dim=32, hidden_dim=8, n_layers=1, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="even"):
        LlamaConfig(dim=12, hidden_dim=8, n_layers=1, n_heads=4)
    with pytest.raises(TypeError):
        Llama({"dim": 3})


@pytest.mark.parametrize("tied", [True, False])
def test_kv_cache_decoder_matches_full_forward(rng, tied):
    cfg = LlamaConfig(dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=41,
                      max_seq_len=12, shared_classifier=tied)
    m = Llama(cfg, seed=0)
    randomize(m, rng, norm_spread=0.2)
    m.flat_params[:m.n_decay] *= 0.5
    tokens = rng.integers(0, 41, size=12)
    full = m.logits(tokens)
    dec = m.decoder()
    for pos, t in enumerate(tokens):
        np.testing.assert_allclose(dec.step(int(t)), full[pos], rtol=1e-4,
                                   atol=1e-4 * np.abs(full[pos]).max())
    with pytest.raises(ValueError, match="max_seq_len"):
        dec.step(1)
    with pytest.raises(ValueError, match="token"):
        m.decoder().step(41)
    with pytest.raises(ValueError, match="skips"):
        m.decoder().step(1, pos=3)


def test_c_backward_refuses_without_a_grad_forward(rng):
    """The C entry point itself (not only the Python guard) refuses a
    backward whose dlogits were not produced, or were already used."""
    from anebackward._native import fptr, lib
    m = Llama(LlamaConfig.preset("tiny"), seed=0)
    tokens = rng.integers(0, 259, size=(1, 8)).astype(np.int32)

    def c_backward():
        work = m._ws[2]
        return lib.ab_model_backward(m._cfg, fptr(m.flat_params), fptr(m.flat_grads),
                                     1, 8, 1.0, 0, fptr(work), work.size)
    m.logits(tokens)                       # fresh workspace, no forward with want_grad yet
    assert c_backward() == lib.AB_EINVAL
    m.forward(tokens, want_grad=False)
    assert c_backward() == lib.AB_EINVAL
    m.forward(tokens)
    assert c_backward() == 0
    assert c_backward() == lib.AB_EINVAL   # twice: the dlogits were used
