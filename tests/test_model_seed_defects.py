"""One test per defect of the seed's model_backward / model_adam_step
(docs/model.md). Each test checks the package against the float64 torch
oracle AND shows that the seed's behaviour, plugged into the same oracle,
misses by far more than the tolerance: so the test would catch the defect.
(The checkpoint freq_cis defect is tested in test_checkpoint.py.)
"""
import numpy as np

from anebackward import AdamW, Llama, LlamaConfig
from anebackward.layout import param_layout, tensor_specs
from test_model import assert_grads_match, randomize, shifted, torch_grads, torch_model

CFG = LlamaConfig(dim=16, hidden_dim=32, n_layers=2, n_heads=2, vocab_size=31, max_seq_len=16)


def seed_norm(torch, eps, *, rms_power=3, use_layer_input=False, weight_grad=True):
    """RMSNorm whose backward is the seed's: correction over D·rms^rms_power,
    evaluated at the layer input instead of x when use_layer_input, and no
    weight gradient unless weight_grad."""
    class SeedRMSNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, xb):
            ctx.save_for_backward(x, w, xb)
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

        @staticmethod
        def backward(ctx, dy):
            x, w, xb = ctx.saved_tensors
            D = x.shape[-1]
            rms = torch.sqrt(xb.pow(2).mean(-1, keepdim=True) + eps)
            dot = (dy * w * xb).sum(-1, keepdim=True) / (D * rms ** rms_power)
            dx = dy * w / rms - xb * dot
            dw = (dy * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)).sum((0, 1)) \
                if weight_grad else torch.zeros_like(w)
            return dx, dw, None

    def norm(x, w, layer_input):
        xb = layer_input if (use_layer_input and layer_input is not None) else x
        return SeedRMSNorm.apply(x, w, xb)
    return norm


def max_rel_diff(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def run(torch, model, tokens, norm=None):
    return torch_grads(torch, model, np.atleast_2d(tokens), shifted(tokens), norm)[1]


def make_case(rng, random_weights):
    model = Llama(CFG, seed=0)   # llama2.c init: residual stream rms ~0.02, far from 1
    if random_weights:           # large attention/FFN outputs: the residual moves a lot
        randomize(model, rng)
    tokens = rng.integers(0, CFG.vocab_size, size=(2, 13))
    model.forward(tokens)
    model.backward()
    return model, tokens


def test_rmsnorm_backward_uses_rms_cubed(torch, rng):
    model, tokens = make_case(rng, random_weights=False)
    true = run(torch, model, tokens)
    seed = run(torch, model, tokens, seed_norm(torch, CFG.norm_eps, rms_power=2))
    assert_grads_match(model, true)
    name = "tok_embeddings.weight"
    assert max_rel_diff(seed[name], true[name]) > 0.1   # the seed's D·rms² is far off here


def test_ffn_norm_is_differentiated_at_the_post_attention_residual(torch, rng):
    model, tokens = make_case(rng, random_weights=True)
    true = run(torch, model, tokens)
    seed = run(torch, model, tokens, seed_norm(torch, CFG.norm_eps, use_layer_input=True))
    assert_grads_match(model, true)
    for name in ("tok_embeddings.weight", "layers.0.attention.wv.weight"):
        assert max_rel_diff(seed[name], true[name]) > 0.05, name


def test_every_rmsnorm_weight_gets_its_gradient(torch, rng):
    model, tokens = make_case(rng, random_weights=True)
    true = run(torch, model, tokens)
    norms = [n for n in model.grads if n.endswith("norm.weight")]
    assert len(norms) == 2 * CFG.n_layers + 1
    for name in norms:   # the seed left all of these at zero
        assert np.abs(true[name]).max() > 1e-4, name
        g = model.grads[name]
        assert np.abs(g - true[name]).max() <= 1e-3 * np.abs(true[name]).max(), name


def test_tied_classifier_has_one_gradient_and_one_update(torch, rng):
    """Tied: output.weight IS tok_embeddings.weight. Its gradient is the sum
    of the classifier's and the embedding's; AdamW updates it once. The seed
    kept two gradients and ran Adam twice over the same weights."""
    model = Llama(CFG, seed=0)
    randomize(model, rng)
    assert "output.weight" not in model.params
    tokens = rng.integers(0, CFG.vocab_size, size=(2, 13))
    model.forward(tokens)
    model.backward()
    # torch with the two uses of the weight as separate leaves: both parts nonzero
    W = dict(model.params, **{"output.weight": model.params["tok_embeddings.weight"]})
    ref = torch_model(torch, CFG.replace(shared_classifier=False), W)
    ref(torch.tensor(tokens), torch.tensor(shifted(tokens)))
    ref.last_loss.backward()
    g_cls, g_emb = ref.output.weight.grad.numpy(), ref.tok_embeddings.weight.grad.numpy()
    assert np.abs(g_cls).max() > 0 and np.abs(g_emb).max() > 0
    ours = model.grads["tok_embeddings.weight"]
    scale = np.abs(g_cls + g_emb).max()
    assert np.abs(ours - (g_cls + g_emb)).max() <= 1e-3 * scale
    assert np.abs(ours - g_cls).max() > 0.05 * scale and np.abs(ours - g_emb).max() > 0.05 * scale

    # one AdamW step == torch.optim.AdamW on the single tied tensor; the
    # seed's two Adam passes (one per gradient buffer) land elsewhere
    p0 = model.params["tok_embeddings.weight"].copy()
    AdamW(model, lr=1e-2, weight_decay=0.0).step()
    t = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
    t.grad = torch.tensor(ours, dtype=torch.float64)
    torch.optim.AdamW([t], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0).step()
    expect = t.detach().numpy()
    np.testing.assert_allclose(model.params["tok_embeddings.weight"], expect, rtol=1e-5, atol=1e-6)
    # the seed: Adam over grad_wcls, then again over grad_emb (each step 1)
    twice = p0.astype(np.float64)
    for g in (g_cls, g_emb):
        m, v = 0.1 * g, 0.05 * g * g
        twice -= 1e-2 * (m / 0.1) / (np.sqrt(v / 0.05) + 1e-8)
    assert np.abs(twice - expect).max() > 1e-3


def test_gqa_shapes_and_gradients(torch, rng):
    cfg = LlamaConfig(dim=32, hidden_dim=48, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=29,
                      max_seq_len=16)
    model = Llama(cfg, seed=0)
    randomize(model, rng)
    assert model.params["layers.1.attention.wk.weight"].shape == (8, 32)
    assert model.params["layers.1.attention.wv.weight"].shape == (8, 32)
    tokens = rng.integers(0, 29, size=(3, 11))
    model.forward(tokens)
    model.backward()
    assert_grads_match(model, run(torch, model, tokens))


def test_sizes_are_64_bit():
    """The seed's int index arithmetic overflows past 2^31 elements; the C
    layout must count a 7B-sized model and a huge-vocabulary one exactly."""
    for cfg in (LlamaConfig(dim=4096, hidden_dim=11008, n_layers=32, n_heads=32,
                            vocab_size=32000, max_seq_len=2048, shared_classifier=False),
                LlamaConfig(dim=8192, hidden_dim=16, n_layers=1, n_heads=64,
                            vocab_size=300_000, max_seq_len=16)):
        lay = param_layout(cfg)
        D, Hd, L, V, kv = cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.vocab_size, cfg.kv_dim
        n = V * D * (1 if cfg.shared_classifier else 2) + L * (2 * D * D + 2 * kv * D
                                                                + 3 * D * Hd + 2 * D) + D
        assert lay["n_params"] == n and n > 2**31
        assert lay["norm"] == n - D
        specs = tensor_specs(cfg)
        assert specs[-1][1] + D == n


def test_any_number_of_layers(rng):
    """No compile-time N_LAYERS: 1 and 5 layers both train."""
    for L in (1, 5):
        model = Llama(CFG.replace(n_layers=L), seed=0)
        tokens = rng.integers(0, CFG.vocab_size, size=12)
        model.forward(tokens)
        model.backward()
        assert np.abs(model.grads[f"layers.{L - 1}.feed_forward.w2.weight"]).max() > 0
