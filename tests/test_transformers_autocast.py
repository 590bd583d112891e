"""torch.autocast on the one-call path of the Hugging Face drop-in and of
anebackward.torch.Transformer: bfloat16 autocast runs the engine at
precision "bf16", autocast off runs fp32, any other autocast takes the
fallback path; never one precision while the caller asked for the other.

Oracles: an independent anebackward.Llama (precision "bf16" or "fp32") on
the same weights and batch — the one-call path must be bit-equal to it —
and the unpatched model under the same autocast (HF's LlamaForCausalLM,
llama2.c's model.py), which rounds at other points (every matmul output
and the attention in bf16 as well), so it is only close."""
import copy

import numpy as np
import pytest

from conftest import bf16_runnable
from test_transformers import batch, build, calls, rel  # noqa: F401 - calls is a fixture

pytestmark = pytest.mark.usefixtures("keep_blas_threads", "bf16_runs")

# Unpatched PyTorch under autocast rounds every matmul output (and, for HF,
# RoPE and the attention) to bf16 as well; the engine keeps them fp32.
# Measured on these tiny models: loss within 3e-5 relative, gradients within
# 1.0e-2 relative (L2 over each tensor, worst tensor). An fp32 step is as
# close to the autocast reference (9e-3 .. 1.2e-2), so these bounds check
# closeness only; the bit-equality against the bf16 engine checks precision.
LOSS_RTOL, GRAD_RTOL = 2e-4, 2e-2


@pytest.fixture(scope="module")
def bf16_runs():
    """bf16 matmuls on every machine: oneDNN where present, else the
    portable path (the same rounded operands)."""
    with bf16_runnable():
        yield


def _autocast(torch, dtype=None):
    return torch.autocast("cpu", dtype=dtype or torch.bfloat16)


def _engine_for_hf(model, precision):
    """An independent anebackward.Llama holding the HF model's weights."""
    import torch
    from anebackward import Llama
    from anebackward.hf import config_from_hf, hf_name
    from anebackward.layout import tensor_specs
    cfg = config_from_hf(model.config.to_dict())
    eng = Llama(cfg, init=False, precision=precision)
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, _, _ in tensor_specs(cfg):
            eng.params[name][...] = own[hf_name(name)].detach().numpy()
    eng.mark_params_changed()
    return eng


def _hf_targets(labels):
    t = np.full(labels.shape, -1, np.int32)
    t[:, :-1] = labels[:, 1:].numpy()
    t[t == -100] = -1
    return t


def _engine_step(eng, ids, targets):
    """The engine's loss and gradients by HF parameter name."""
    from anebackward.hf import hf_name
    eng.zero_grad()
    loss = eng.forward(ids.numpy().astype(np.int32), targets)
    eng.backward()
    return loss, {hf_name(n): g.copy() for n, g in eng.grads.items()}


def _hf_step(model, ids, labels, autocast_dtype=None, enabled=True):
    import torch
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=enabled):
        out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out, {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters()
                 if p.grad is not None}


def _assert_bit_equal(loss, grads, ref_loss, ref_grads):
    assert np.float32(loss) == np.float32(ref_loss), (loss, ref_loss)
    assert set(grads) == set(ref_grads)
    for n in ref_grads:
        assert np.array_equal(grads[n], ref_grads[n]), n


def _max_grad_rel(g, ref):
    import torch
    return max(rel(torch.from_numpy(g[n]), torch.from_numpy(ref[n])) for n in ref)


# ------------------------------------------------------ Hugging Face ----
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_hf_bf16_autocast_runs_the_bf16_engine(hf, abt, calls, kind):
    import torch
    ref = build(hf, kind)
    pat = abt.apply(copy.deepcopy(ref))
    ids, labels = batch(torch)
    out, g = _hf_step(pat, ids, labels)
    assert calls == {"one_call": 1} and out.loss.dtype == torch.float32
    assert pat._anebackward_slot.engine.precision == "bf16"
    tgt = _hf_targets(labels)
    b_loss, b_g = _engine_step(_engine_for_hf(ref, "bf16"), ids, tgt)
    _assert_bit_equal(out.loss.item(), g, b_loss, b_g)
    # an fp32 step would fail the line above: the two precisions differ
    f_loss, f_g = _engine_step(_engine_for_hf(ref, "fp32"), ids, tgt)
    assert np.float32(f_loss) != np.float32(b_loss)
    assert all(not np.array_equal(f_g[n], b_g[n]) for n in b_g if n.endswith("proj.weight"))
    # close to HF's own autocast step (other rounding points)
    r, rg = _hf_step(ref, ids, labels)
    assert rel(out.loss.detach(), r.loss.detach()) < LOSS_RTOL
    assert _max_grad_rel(g, rg) < GRAD_RTOL


def test_hf_autocast_off_after_autocast_is_fp32_again(hf, abt, calls):
    import torch
    ref = build(hf, "llama")
    pat = abt.apply(copy.deepcopy(ref))
    ids, labels = batch(torch)
    tgt = _hf_targets(labels)
    _hf_step(pat, ids, labels)
    out, g = _hf_step(pat, ids, labels, enabled=False)
    assert calls == {"one_call": 2} and pat._anebackward_slot.engine.precision == "fp32"
    _assert_bit_equal(out.loss.item(), g, *_engine_step(_engine_for_hf(ref, "fp32"), ids, tgt))
    out, g = _hf_step(pat, ids, labels)           # and bf16 once more
    _assert_bit_equal(out.loss.item(), g, *_engine_step(_engine_for_hf(ref, "bf16"), ids, tgt))


def test_hf_float16_autocast_takes_hf(hf, abt, calls):
    import torch
    ref = build(hf, "llama")
    pat = abt.apply(copy.deepcopy(ref))
    ids, labels = batch(torch)
    r, rg = _hf_step(ref, ids, labels, autocast_dtype=torch.float16)
    p, pg = _hf_step(pat, ids, labels, autocast_dtype=torch.float16)
    assert calls == {} and p.logits is not None        # HF's forward for the whole call
    _assert_bit_equal(p.loss.item(), pg, r.loss.item(), rg)


def test_hf_bf16_autocast_without_bf16_matmuls_takes_hf(hf, abt, calls, monkeypatch):
    import torch
    from anebackward import bf16
    monkeypatch.setattr(bf16, "available", lambda: False)
    ref = build(hf, "llama")
    pat = abt.apply(copy.deepcopy(ref))
    ids, labels = batch(torch)
    r, rg = _hf_step(ref, ids, labels)
    p, pg = _hf_step(pat, ids, labels)
    assert calls == {}
    _assert_bit_equal(p.loss.item(), pg, r.loss.item(), rg)


def test_hf_bf16_autocast_call_the_engine_cannot_take_runs_hf(hf, abt, calls):
    """A hook inside the model: no one-call path, and the per-op kernels
    (fp32) step aside too: HF's own autocast forward, exactly."""
    import torch
    ref = build(hf, "llama")
    pat = abt.apply(copy.deepcopy(ref))
    ids, labels = batch(torch)
    _hf_step(pat, ids, labels)                      # bound to the engine first
    for m in (ref, pat):
        m.model.embed_tokens.register_forward_hook(lambda mod, inp, out: out * 1.5)
    calls.clear()
    r, rg = _hf_step(ref, ids, labels)
    p, pg = _hf_step(pat, ids, labels)
    assert calls == {}
    _assert_bit_equal(p.loss.item(), pg, r.loss.item(), rg)


def test_hf_optimizer_step_between_autocast_calls_is_seen(hf, abt, calls):
    """The engine's bf16 weight copy is made again after an in-place update
    of the HF parameters (torch's fused AdamW)."""
    import torch
    ref = build(hf, "llama")
    pat = abt.apply(copy.deepcopy(ref))
    opt = torch.optim.AdamW(pat.parameters(), lr=1e-2, fused=True)
    ids, labels = batch(torch)
    tgt = _hf_targets(labels)
    for _ in range(2):
        _hf_step(pat, ids, labels)
        opt.step()
    out, g = _hf_step(pat, ids, labels)
    assert calls == {"one_call": 3}
    # a fresh engine on the updated weights (its bf16 copy made from them)
    _assert_bit_equal(out.loss.item(), g, *_engine_step(_engine_for_hf(pat, "bf16"), ids, tgt))


def test_hf_bf16_autocast_logits_are_bf16_and_carry_gradient(hf, abt, calls):
    import torch
    ref = build(hf, "llama")
    pat = abt.apply(copy.deepcopy(ref))
    ids, labels = batch(torch)
    with _autocast(torch):
        r = ref(input_ids=ids, labels=labels)
        p = pat(input_ids=ids, labels=labels, skip_logits=False)
    assert calls == {"one_call": 1}
    assert p.logits.dtype == r.logits.dtype == torch.bfloat16 and p.loss.dtype == torch.float32
    eng = _engine_for_hf(ref, "bf16")
    logits = np.empty((*ids.shape, eng.config.vocab_size), np.float32)
    eng.forward(ids.numpy().astype(np.int32), _hf_targets(labels), logits_out=logits)
    assert torch.equal(p.logits, torch.from_numpy(logits).to(torch.bfloat16))
    # a loss built from the bf16 logits reaches the weights through the C backward
    pat.zero_grad(set_to_none=True)
    p.logits.float().square().mean().backward()
    assert pat.lm_head.weight.grad is not None and bool(pat.lm_head.weight.grad.abs().sum() > 0)


def test_hf_backward_reruns_at_its_forwards_precision(hf, abt, calls):
    """A bf16 forward, then an fp32 forward, then the first one's backward:
    the engine re-runs the first forward at bf16 before differentiating it."""
    import torch
    ref = build(hf, "llama")
    pat = abt.apply(copy.deepcopy(ref))
    ids, labels = batch(torch)
    i2, l2 = batch(torch, seed=2)
    pat.zero_grad(set_to_none=True)
    with _autocast(torch):
        a = pat(input_ids=ids, labels=labels).loss
    b = pat(input_ids=i2, labels=l2).loss
    a.backward()
    g = {n: p.grad.numpy().copy() for n, p in pat.named_parameters()}
    assert calls == {"one_call": 2}
    _assert_bit_equal(a.item(), g, *_engine_step(_engine_for_hf(ref, "bf16"), ids,
                                                 _hf_targets(labels)))
    del b


def test_hf_padded_batch_under_bf16_autocast(hf, abt, calls):
    """A padded call (the compact-batch one-call path) runs bf16 as well."""
    import torch
    from anebackward.batch import from_padded
    ref = build(hf, "llama")
    pat = abt.apply(copy.deepcopy(ref))
    ids, labels = batch(torch)
    mask = torch.ones_like(ids)
    mask[2, :3] = 0                  # left padding, its labels and the first real one ignored
    labels[2, :4] = -100
    pat.zero_grad(set_to_none=True)
    with _autocast(torch):
        out = pat(input_ids=ids, labels=labels, attention_mask=mask)
    assert calls == {"one_call": 1}
    tgt = _hf_targets(labels)
    losses = {}
    for prec in ("bf16", "fp32"):
        eng = _engine_for_hf(ref, prec)
        b = from_padded(ids.numpy(), attention_mask=mask.numpy(), targets=tgt,
                        fn="test")
        losses[prec] = eng.forward(b)
    assert np.float32(out.loss.item()) == np.float32(losses["bf16"]) != np.float32(losses["fp32"])


# ------------------------------------- anebackward.torch.Transformer ----
def _transformer(seed=0):
    import torch
    from anebackward.torch import Transformer
    torch.manual_seed(seed)
    return Transformer(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=97,
                       multiple_of=16, max_seq_len=32)


def _engine_for_transformer(model, precision):
    import torch
    from anebackward import Llama
    eng = Llama(model._slot.engine.config, init=False, precision=precision)
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name in eng.params:
            eng.params[name][...] = own[name].detach().numpy()
    eng.mark_params_changed()
    return eng


def _t_batch(torch, seed=1):
    gen = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, 97, (2, 17), generator=gen)
    return tok[:, :-1], tok[:, 1:]


def _t_step(model, X, Y, autocast_dtype=None, enabled=True):
    import torch
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=enabled):
        logits = model(X, Y)
    model.last_loss.backward()
    return logits, model.last_loss, {n: p.grad.numpy().copy()
                                      for n, p in model.named_parameters()}


def _t_engine_step(eng, X, Y):
    eng.zero_grad()
    loss = eng.forward(X.numpy().astype(np.int32), Y.numpy().astype(np.int32))
    eng.backward()
    return loss, {n: g.copy() for n, g in eng.grads.items()}


def test_transformer_bf16_autocast_runs_the_bf16_engine(torch):
    from anebackward.bench.torch_llama import Transformer as PlainLlama
    m = _transformer()
    X, Y = _t_batch(torch)
    logits, loss, g = _t_step(m, X, Y)
    assert m._slot.engine.precision == "bf16"
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    b_loss, b_g = _t_engine_step(_engine_for_transformer(m, "bf16"), X, Y)
    _assert_bit_equal(loss.item(), g, b_loss, b_g)
    f_loss, f_g = _t_engine_step(_engine_for_transformer(m, "fp32"), X, Y)
    assert np.float32(f_loss) != np.float32(b_loss)
    assert all(not np.array_equal(f_g[n], b_g[n]) for n in b_g if n.endswith("w1.weight"))
    # llama2.c's model.py on the same weights under the same autocast
    ref = PlainLlama.from_config(m._slot.engine.config).load_arrays(m._slot.engine.params)
    rl, rloss, rg = _t_step(ref, X, Y)
    assert rl.dtype == logits.dtype
    assert rel(loss.detach(), rloss.detach()) < LOSS_RTOL
    assert _max_grad_rel(g, rg) < GRAD_RTOL


def test_transformer_autocast_off_after_autocast_is_fp32_again(torch):
    m = _transformer()
    X, Y = _t_batch(torch)
    _t_step(m, X, Y)
    logits, loss, g = _t_step(m, X, Y, enabled=False)
    assert m._slot.engine.precision == "fp32" and logits.dtype == torch.float32
    _assert_bit_equal(loss.item(), g, *_t_engine_step(_engine_for_transformer(m, "fp32"), X, Y))


def test_transformer_float16_autocast_raises(torch):
    """The per-op kernels are float32 only: no silent fp32 step."""
    m = _transformer()
    X, Y = _t_batch(torch)
    with pytest.raises(TypeError, match="autocast"):
        _t_step(m, X, Y, autocast_dtype=torch.float16)
    with _autocast(torch), pytest.raises(TypeError, match="autocast"):
        m(X)                                     # inference takes the per-op path


def test_transformer_optimizer_step_between_autocast_calls_is_seen(torch):
    m = _transformer()
    opt = m.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    X, Y = _t_batch(torch)
    for _ in range(2):
        _t_step(m, X, Y)
        opt.step()
    _, loss, g = _t_step(m, X, Y)
    _assert_bit_equal(loss.item(), g, *_t_engine_step(_engine_for_transformer(m, "bf16"), X, Y))


def test_transformer_bf16_autocast_without_logits_and_per_op(torch):
    from anebackward.torch import Transformer
    m = _transformer()
    X, Y = _t_batch(torch)
    m.return_logits = False
    assert _t_step(m, X, Y)[0] is None
    b_loss, _ = _t_engine_step(_engine_for_transformer(m, "bf16"), X, Y)
    assert np.float32(m.last_loss.item()) == np.float32(b_loss)
    torch.manual_seed(0)
    per_op = Transformer(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=97,
                         multiple_of=16, max_seq_len=32, one_call=False,
                         linear="anebackward", blas_threads=None)
    with pytest.raises(TypeError, match="autocast"):   # fp32 kernels: no silent fp32 step
        _t_step(per_op, X, Y)



def test_hf_bf16_autocast_with_gradient_checkpointing(hf, abt, calls):
    """Under checkpointing either the engine runs with recompute at bf16
    (bit-equal to Llama(precision="bf16", recompute=True)) or HF's own
    autocast forward runs (bit-equal to the unpatched model): never fp32."""
    import torch
    ref = build(hf, "llama")
    pat = abt.apply(copy.deepcopy(ref))
    ids, labels = batch(torch)
    out, g = _hf_step(pat, ids, labels)             # bound to the engine first
    for m in (ref, pat):
        m.gradient_checkpointing_enable()
    calls.clear()
    out, g = _hf_step(pat, ids, labels)
    if calls.get("one_call"):
        eng = pat._anebackward_slot.engine
        assert eng.precision == "bf16" and eng.recompute
        oracle = _engine_for_hf(ref, "bf16")
        oracle.set_recompute(True)
        _assert_bit_equal(out.loss.item(), g, *_engine_step(oracle, ids, _hf_targets(labels)))
    else:
        assert calls == {}
        r, rg = _hf_step(ref, ids, labels)
        _assert_bit_equal(out.loss.item(), g, r.loss.item(), rg)


def test_hf_trainer_bf16_runs_the_bf16_engine(hf, abt, calls, tmp_path, monkeypatch):
    """Trainer(bf16=True) on the CPU wraps each step in torch.autocast("cpu",
    torch.bfloat16): every micro-batch runs the engine at bf16, and the loss
    curve stays close to unpatched HF's under the same Trainer."""
    from anebackward.transformers import _layers
    from test_transformers import _trainer_losses
    seen = []
    step = _layers.precision_step

    def recorded(slot, precision, *a, **k):
        seen.append(precision)
        return step(slot, precision, *a, **k)
    monkeypatch.setattr(_layers, "precision_step", recorded)
    ref = _trainer_losses(hf, abt, tmp_path, patched=False, bf16=True)
    pat = _trainer_losses(hf, abt, tmp_path, patched=True, bf16=True)
    assert len(ref) == len(pat) == 20
    assert calls["one_call"] == 40 and seen == ["bf16"] * 40
    worst = max(abs(a - b) / abs(b) for a, b in zip(pat, ref))
    assert worst < 2e-3, worst        # measured 2.5e-4 over the 20 logged losses


def test_hf_peft_lora_under_bf16_autocast(hf, abt):
    """A peft (LoRA) model under bf16 autocast: the engine with adapters at
    bf16 (its loss differs from the same model's fp32 step), close to HF +
    peft under the same autocast."""
    import torch
    peft = pytest.importorskip("peft")
    ref = build(hf, "llama")
    ids, labels = batch(torch)
    outs = []
    for m in (copy.deepcopy(ref), abt.apply(copy.deepcopy(ref))):
        torch.manual_seed(3)
        lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        outs.append((peft.get_peft_model(m, lora), m))
    (r_model, _), (p_model, p_base) = outs
    r, rg = _hf_step(r_model, ids, labels)
    p, pg = _hf_step(p_model, ids, labels)
    assert type(p.loss.grad_fn).__name__ == "ModelFunctionBackward"
    assert p_base._anebackward_slot.engine.precision == "bf16"
    assert set(pg) == set(rg) and all("lora_" in n for n in pg)
    assert rel(p.loss.detach(), r.loss.detach()) < LOSS_RTOL
    assert _max_grad_rel(pg, rg) < GRAD_RTOL
    f, _ = _hf_step(p_model, ids, labels, enabled=False)
    assert p_base._anebackward_slot.engine.precision == "fp32"
    assert f.loss.item() != p.loss.item()


def test_hf_peft_bf16_copy_of_the_frozen_base_is_made_once(hf, abt):
    """Under bf16 autocast with a frozen base, an optimizer step on the
    adapters re-rounds only the adapters (the base's bf16 copy is kept:
    the engine's base version does not move), and the step that follows is
    bit-equal to one after a full re-rounding; a base weight changed in
    place is seen (its bf16 copy is made again)."""
    import torch
    peft = pytest.importorskip("peft")
    ids, labels = batch(torch)
    base = abt.apply(build(hf, "llama"))
    torch.manual_seed(3)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                      init_lora_weights=False))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _hf_step(model, ids, labels)
    engine = base._anebackward_slot.engine
    assert engine.precision == "bf16" and engine.lora is not None
    opt.step()
    v = engine._base_version
    out, grads = _hf_step(model, ids, labels)
    assert type(out.loss.grad_fn).__name__ == "ModelFunctionBackward"
    assert engine._base_version == v            # only the adapters were re-rounded
    engine.mark_params_changed()                # the oracle: everything re-rounded
    ref, ref_grads = _hf_step(model, ids, labels)
    _assert_bit_equal(out.loss.item(), grads, ref.loss.item(), ref_grads)
    with torch.no_grad():
        base.model.layers[0].mlp.up_proj.weight.mul_(1.5)   # a frozen base weight
    v = engine._base_version
    moved, _ = _hf_step(model, ids, labels)
    assert type(moved.loss.grad_fn).__name__ == "ModelFunctionBackward"
    assert engine._base_version != v and moved.loss.item() != ref.loss.item()
