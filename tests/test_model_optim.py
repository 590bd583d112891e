"""Clipping, AdamW (2-D weights decayed only) and the cosine schedule
against torch.optim.AdamW / clip_grad_norm_ / llama2.c's get_lr."""
import math

import numpy as np
import pytest

from anebackward import AdamW, Llama, LlamaConfig, cosine_lr

CFG = LlamaConfig(dim=16, hidden_dim=24, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=23,
                  max_seq_len=16, shared_classifier=False)


def test_adamw_and_clip_match_torch_over_several_steps(torch, rng):
    model = Llama(CFG, seed=0)
    W = {n: torch.tensor(p, dtype=torch.float64, requires_grad=True) for n, p in model.params.items()}
    decay = [W[n] for n, p in model.params.items() if p.ndim >= 2]
    nodecay = [W[n] for n, p in model.params.items() if p.ndim < 2]
    assert len(nodecay) == 2 * CFG.n_layers + 1
    topt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": nodecay, "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    opt = AdamW(model, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(4):
        g = rng.standard_normal(model.n_params).astype(np.float32) * (3.0 if step % 2 else 0.01)
        model.flat_grads[:] = g
        for n, t in W.items():
            t.grad = torch.tensor(model.grads[n], dtype=torch.float64)
        norm = model.clip_grad_norm(1.0)
        tnorm = torch.nn.utils.clip_grad_norm_(list(W.values()), 1.0)
        assert norm == pytest.approx(float(tnorm), rel=1e-6)
        lr = cosine_lr(step, max_lr=1e-2, warmup_steps=1, total_steps=4)
        for grp in topt.param_groups:
            grp["lr"] = lr
        topt.step()
        opt.step(lr=lr)
        for n, t in W.items():
            np.testing.assert_allclose(model.params[n], t.detach().numpy(), rtol=2e-5, atol=2e-6,
                                       err_msg=n)
    # the norms were not decayed: with zero gradients the decayed ones shrink, norms stay
    before = model.flat_params.copy()
    model.flat_grads[:] = 0
    opt.m[:] = 0
    opt.v[:] = 0
    opt.step(lr=0.1)
    np.testing.assert_array_equal(model.flat_params[model.n_decay:], before[model.n_decay:])
    np.testing.assert_allclose(model.flat_params[:model.n_decay],
                               before[:model.n_decay] * np.float32(1 - 0.1 * 0.1), rtol=1e-6)


def test_cosine_schedule_like_llama2c():
    kw = dict(max_lr=1.0, warmup_steps=10, total_steps=110, min_lr=0.1)
    assert cosine_lr(0, **kw) == 0.0
    assert cosine_lr(5, **kw) == pytest.approx(0.5)
    assert cosine_lr(10, **kw) == pytest.approx(1.0)
    assert cosine_lr(60, **kw) == pytest.approx(0.1 + 0.5 * 0.9)
    assert cosine_lr(110, **kw) == pytest.approx(0.1)
    assert cosine_lr(500, **kw) == 0.1
    xs = [cosine_lr(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(xs, xs[1:]))
    assert math.isclose(cosine_lr(35, **kw), 0.1 + 0.5 * (1 + math.cos(math.pi * 0.25)) * 0.9)


def test_clip_leaves_small_gradients_alone():
    model = Llama(CFG, seed=0)
    model.flat_grads[:] = 1e-4
    norm = model.clip_grad_norm(1.0)
    assert norm == pytest.approx(1e-4 * math.sqrt(model.n_params), rel=1e-5)
    assert (model.flat_grads == np.float32(1e-4)).all()


def test_adamw_rejects_bad_arguments():
    model = Llama(CFG)
    with pytest.raises(TypeError):
        AdamW(object())
    with pytest.raises(ValueError, match="betas"):
        AdamW(model, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="lr"):
        AdamW(model, lr=-1)
