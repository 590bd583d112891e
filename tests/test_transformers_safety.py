"""The patched HF model is exact or takes HF's code: forwards outstanding
before their backwards, sums of losses, retain_graph, hooks, replaced
modules, an edited rotary buffer, logits carrying gradient."""
import copy

import pytest

from test_transformers import assert_same, batch, build, rel, step

pytestmark = pytest.mark.usefixtures("keep_blas_threads")


def _grads(m):
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_two_forwards_then_backwards_sum_and_retain_graph(hf, abt, kind):
    import torch
    ref = build(hf, kind)
    pat = abt.apply(copy.deepcopy(ref))
    (i1, l1), (i2, l2) = batch(torch, seed=1), batch(torch, seed=2)
    for m in (ref, pat):
        m.zero_grad(set_to_none=True)
        a = m(input_ids=i1, labels=l1).loss
        b = m(input_ids=i2, labels=l2).loss
        (a + 2 * b).backward(retain_graph=True)
        a.backward()          # a second backward through a retained graph
    g_ref, g_pat = _grads(ref), _grads(pat)
    assert set(g_ref) == set(g_pat)
    for n in g_ref:
        assert rel(g_pat[n], g_ref[n]) < 1e-5, n


def _same_after_edit(hf, abt, kind, edit, bind_first=True):
    """An HF model and its patched copy (bound to the engine by one step
    first, unless bind_first is False), then edit(model) on each: their next
    steps agree (loss and every gradient)."""
    import torch
    ref = build(hf, kind)
    pat = abt.apply(copy.deepcopy(ref))
    ids, labels = batch(torch)
    if bind_first:
        step(pat, input_ids=ids, labels=labels)
    for m in (ref, pat):
        edit(m)
    assert_same(*step(ref, input_ids=ids, labels=labels), *step(pat, input_ids=ids, labels=labels))


def test_forward_hook_neftune_style_takes_the_hook(hf, abt):
    import torch

    def noise(mod, inp, out):
        return out + 0.1 * torch.sin(out * 7.0)
    _same_after_edit(hf, abt, "llama", lambda m: m.model.embed_tokens.register_forward_hook(noise))


def test_replaced_module_after_binding(hf, abt):
    import torch

    def replace(m):   # a module replaced after binding (as adapters do)
        old = m.model.layers[0].mlp.up_proj
        new = torch.nn.Linear(old.in_features, old.out_features, bias=False)
        torch.manual_seed(4)
        new.weight.data.normal_(0, 0.3)
        m.model.layers[0].mlp.up_proj = new
    _same_after_edit(hf, abt, "llama", replace)


def test_edited_inv_freq(hf, abt):
    _same_after_edit(hf, abt, "qwen3", lambda m: m.model.rotary_emb.inv_freq.mul_(0.5))


def _logits_backward(hf, abt, checkpointing=False):
    """HF Llama and its patched copy asked for logits (checkpointing on both
    if asked), one backward of loss + mean(logits²) on each: the patched
    model, the batch, and (output, gradients) of HF's and of the patched."""
    import torch
    ref = build(hf, "llama")
    pat = abt.apply(copy.deepcopy(ref), skip_logits=False)
    if checkpointing:
        for m in (ref, pat):
            _checkpointing_on(m, "gradient_checkpointing_enable")
    ids, labels = batch(torch)
    outs = []
    for m in (ref, pat):
        m.zero_grad(set_to_none=True)
        o = m(input_ids=ids, labels=labels)
        (o.loss + (o.logits ** 2).mean()).backward()
        outs.append((o, _grads(m)))
    return pat, ids, labels, outs


def test_logits_carry_gradient(hf, abt):
    pat, ids, labels, ((r, rg), (p, pg)) = _logits_backward(hf, abt)
    assert type(pat(input_ids=ids, labels=labels).loss.grad_fn).__name__ == "ModelFunctionBackward"
    assert rel(p.logits.detach(), r.logits.detach()) < 1e-5
    for n in rg:
        assert rel(pg[n], rg[n]) < 1e-5, n


def test_gradient_checkpointing_both_paths(hf, abt):
    import torch
    ref = build(hf, "llama")
    ids, labels = batch(torch)
    r = step(ref, input_ids=ids, labels=labels)
    for one_call in (True, False):
        pat = abt.apply(copy.deepcopy(ref), one_call=one_call)
        pat.gradient_checkpointing_enable()
        assert_same(*r, *step(pat, input_ids=ids, labels=labels))


def test_held_gradients_survive_the_next_backward(hf, abt):
    """The one-call backward reuses its gradient buffer only when nothing
    views it: gradients a caller still holds after zero_grad(set_to_none=True)
    keep their values, and accumulation (set_to_none=False) adds up."""
    import torch
    ref = build(hf, "llama")
    pat = abt.apply(copy.deepcopy(ref))
    (i1, l1), (i2, l2) = batch(torch, seed=1), batch(torch, seed=2)
    held = {}
    for i, l in ((i1, l1), (i2, l2), (i1, l1)):
        pat(input_ids=i, labels=l).loss.backward()
        held = {n: p.grad for n, p in pat.named_parameters()}       # no copy
        kept = {n: g.clone() for n, g in held.items()}
        pat.zero_grad(set_to_none=True)
        pat(input_ids=i2, labels=l2).loss.backward()
        assert all(torch.equal(held[n], kept[n]) for n in held)
        pat.zero_grad(set_to_none=True)
    for m in (ref, pat):
        m.zero_grad(set_to_none=False)
        for i, l in ((i1, l1), (i2, l2)):
            m(input_ids=i, labels=l).loss.backward()
    g_ref, g_pat = _grads(ref), _grads(pat)
    for n in g_ref:
        assert rel(g_pat[n], g_ref[n]) < 1e-5, n


def _checkpointing_on(m, api):
    import warnings
    with warnings.catch_warnings():   # 5.23: gradient_checkpointing_enable is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        getattr(m, api)()


@pytest.mark.parametrize("api", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_gradient_checkpointing_takes_one_call_with_recompute(hf, abt, kind, api):
    """HF's checkpointing (its input-grads hook on the embeddings included)
    runs as the one-call engine with recompute on, exactly; turned off
    again, the engine drops recompute."""
    import torch
    ref = build(hf, kind)
    if not hasattr(ref, api):
        pytest.skip(f"transformers {hf.__version__} has no {api}")
    pat = abt.apply(copy.deepcopy(ref))
    ids, labels = batch(torch)
    r = step(ref, input_ids=ids, labels=labels)
    _checkpointing_on(pat, api)
    out = step(pat, input_ids=ids, labels=labels)
    assert_same(*r, *out)
    assert type(out[0].loss.grad_fn).__name__ == "ModelFunctionBackward"
    engine = pat._anebackward_slot.engine
    assert engine.recompute
    pat.gradient_checkpointing_disable() if api.startswith("gradient") else \
        pat.activation_checkpointing_disable()
    out = step(pat, input_ids=ids, labels=labels)
    assert_same(*r, *out)
    assert type(out[0].loss.grad_fn).__name__ == "ModelFunctionBackward"
    assert not engine.recompute


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_gradient_checkpointing_under_peft(hf, abt, kind):
    """Checkpointing on a patched peft (LoRA) model: loss and adapter
    gradients as HF + peft with checkpointing."""
    import torch
    peft = pytest.importorskip("peft")
    ref = build(hf, kind)
    pat = abt.apply(copy.deepcopy(ref))
    ids, labels = batch(torch)
    res = []
    for m in (ref, pat):
        torch.manual_seed(3)
        lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                               init_lora_weights=False)
        pm = peft.get_peft_model(m, lora)
        _checkpointing_on(pm, "gradient_checkpointing_enable")
        res.append(step(pm, input_ids=ids, labels=labels))
    assert len([n for n in res[1][1] if "lora_" in n]) == 6 * ref.config.num_hidden_layers
    assert_same(*res[0], *res[1])


def test_gradient_checkpointing_shrinks_the_engine_workspace(hf, abt):
    """The memory checkpointing saves on the one-call path: the engine's
    workspace after a checkpointed step is smaller than after a plain one
    (per-layer activations kept as each layer's input only)."""
    import torch
    torch.manual_seed(0)
    cfg = hf.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=6,
                         num_attention_heads=6, num_key_value_heads=2)
    cfg._attn_implementation = "sdpa"
    ref = hf.LlamaForCausalLM(cfg).train()
    ids, labels = batch(torch, S=64)
    sizes = []
    for on in (False, True):
        pat = abt.apply(copy.deepcopy(ref))
        if on:
            _checkpointing_on(pat, "gradient_checkpointing_enable")
        step(pat, input_ids=ids, labels=labels)
        sizes.append(pat._anebackward_slot.engine._ws[2].nbytes)
    assert sizes[1] < 0.6 * sizes[0], sizes


def test_a_hook_like_hfs_input_grads_hook_still_takes_the_hook(hf, abt):
    """Only HF's own input-grads hook is exempt: a user's hook of the same
    name (another module) runs, through HF's path."""
    def make_inputs_require_grads(mod, inp, out):
        return out * 1.5
    make_inputs_require_grads.__qualname__ = (
        "PreTrainedModel.enable_input_require_grads.<locals>.make_inputs_require_grads")
    _same_after_edit(hf, abt, "llama",
                     lambda m: m.model.embed_tokens.register_forward_hook(make_inputs_require_grads),
                     bind_first=False)


def _trainer_run(hf, model, neftune_noise_alpha, tmp_path):
    """Two Trainer steps (seed 7): the logged losses and the parameters after."""
    import torch
    ids, labels = batch(torch, B=4)
    data = [dict(input_ids=ids[i], labels=labels[i]) for i in range(4)]
    args = hf.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                logging_steps=1, report_to=[], seed=7, use_cpu=True,
                                neftune_noise_alpha=neftune_noise_alpha, save_strategy="no",
                                learning_rate=1e-3, disable_tqdm=True)
    trainer = hf.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trainer_neftune_runs_the_noise(hf, abt, tmp_path):
    """Trainer(neftune_noise_alpha=5) hooks noise onto the embeddings: the
    patched run's losses and weights are HF's with NEFTune (same seed), and
    differ from the run without it."""
    pytest.importorskip("accelerate")
    ref = build(hf, "llama")
    hf_neft, hf_plain = (_trainer_run(hf, copy.deepcopy(ref), a, tmp_path) for a in (5.0, None))
    pat_neft = _trainer_run(hf, abt.apply(copy.deepcopy(ref)), 5.0, tmp_path)
    assert len(hf_neft[0]) == len(pat_neft[0]) == 2
    assert all(abs(p - r) <= 1e-5 * abs(r) for p, r in zip(pat_neft[0], hf_neft[0]))
    assert all(abs(p - r) > 1e-3 for p, r in zip(hf_neft[0], hf_plain[0]))
    for n, w in hf_neft[1].items():
        assert rel(pat_neft[1][n], w) < 1e-5, n


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_peft_after_a_patched_step(hf, abt, kind):
    """get_peft_model on a patched model that has already trained a step
    (its weights bound to the engine): loss and LoRA gradients as HF+peft."""
    import torch
    peft = pytest.importorskip("peft")
    ref = build(hf, kind)
    pat = abt.apply(copy.deepcopy(ref))
    ids, labels = batch(torch)
    step(pat, input_ids=ids, labels=labels)
    step(ref, input_ids=ids, labels=labels)
    res = []
    for m in (ref, pat):
        torch.manual_seed(3)
        lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        res.append(step(peft.get_peft_model(m, lora), input_ids=ids, labels=labels))
    lora_grads = [n for n in res[1][1] if "lora_" in n]
    assert len(lora_grads) == 4 * ref.config.num_hidden_layers
    assert_same(*res[0], *res[1])


def test_qwen3_generate_static_cache(hf, abt):
    import torch
    ref = build(hf, "qwen3").eval()
    pat = abt.apply(copy.deepcopy(ref))
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    out = [m.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
           for m in (ref, pat)]
    assert out[0].shape == (2, 11)
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_training_step(hf, abt, backend):
    """torch.compile of a patched model in training: the one-call step is
    one opaque op; loss and gradients as the eager patched model's."""
    import torch
    pat = abt.apply(build(hf, "llama"))
    ids, labels = batch(torch)
    eager = step(pat, input_ids=ids, labels=labels)
    compiled = torch.compile(pat, backend=backend)
    for _ in range(2):
        out, g = step(compiled, input_ids=ids, labels=labels)
        assert type(out.loss.grad_fn).__name__ == "ModelFunctionBackward"
        assert_same(*eager, out, {n.replace("_orig_mod.", ""): v for n, v in g.items()})


def test_autocast_per_op_takes_hf(hf, abt):
    """The per-op kernels are float32 only: under autocast HF's code runs
    (the one-call path's autocast: tests/test_transformers_autocast.py)."""
    import torch
    ref = build(hf, "llama")
    pat = abt.apply(copy.deepcopy(ref), one_call=False)
    ids, labels = batch(torch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ref(input_ids=ids, labels=labels).loss, pat(input_ids=ids, labels=labels).loss
    assert a.item() == b.item()


def test_gradient_checkpointing_with_logits_takes_hf_path_and_its_gradients(hf, abt):
    """With checkpointing the C model's classifier runs in chunks and keeps
    no dlogits, so a call that asks for logits (which may carry gradient)
    takes HF's path: the same loss, logits and gradients as HF."""
    _, _, _, ((r, rg), (p, pg)) = _logits_backward(hf, abt, checkpointing=True)
    assert type(p.loss.grad_fn).__name__ != "ModelFunctionBackward"
    assert rel(p.loss.detach(), r.loss.detach()) < 1e-5
    assert rel(p.logits.detach(), r.logits.detach()) < 1e-5
    for n in rg:
        assert rel(pg[n], rg[n]) < 1e-4, n
