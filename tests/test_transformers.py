"""anebackward.transformers: patched vs unpatched Hugging Face models (tiny,
random-init, built locally), the kernels actually taken, and each fallback to
HF's own code."""
import copy

import pytest

from conftest import import_hf_test

RTOL = 1e-5
pytestmark = pytest.mark.usefixtures("keep_blas_threads")  # apply() sets the package's threads


@pytest.fixture
def calls(abt, monkeypatch):
    """Counts the kernel Functions the patched forwards call."""
    from anebackward.transformers import _layers
    n = {}
    for name in ("attention", "rmsnorm", "rope", "swiglu", "chunked_classifier_cross_entropy"):
        fn = getattr(_layers, name)

        def counted(*a, _fn=fn, _name=name, **k):
            n[_name] = n.get(_name, 0) + 1
            return _fn(*a, **k)
        monkeypatch.setattr(_layers, name, counted)
    one_call = _layers._one_call

    def counted_one_call(*a, **k):
        loss = one_call(*a, **k)
        if loss is not None:
            n["one_call"] = n.get("one_call", 0) + 1
        return loss
    monkeypatch.setattr(_layers, "_one_call", counted_one_call)
    return n


ROPE_LLAMA3 = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}


def build(hf, kind, tied=False, llama3=False, heads=(6, 2), seed=0, **extra):
    import torch
    torch.manual_seed(seed)
    H, KV = heads
    if kind == "llama":
        kw = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=H, num_key_value_heads=KV, tie_word_embeddings=tied)
        if llama3:
            kw["rope_parameters"] = dict(ROPE_LLAMA3)
        cfg, cls = hf.LlamaConfig(**kw, **extra), hf.LlamaForCausalLM
    else:  # Qwen3: head_dim independent of hidden_size (q width 64, hidden 32), QK-norm
        cfg = hf.Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=80,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16, tie_word_embeddings=tied, **extra)
        cls = hf.Qwen3ForCausalLM
    if "attn_implementation" not in extra:
        cfg._attn_implementation = "sdpa"
    m = cls(cfg).float()
    # random norms, so that a wrong norm weight gradient would show
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return m.train()


def step(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return out, grads


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_same(ref_out, ref_g, out, g):
    assert rel(out.loss.detach(), ref_out.loss.detach()) < RTOL, (out.loss, ref_out.loss)
    assert set(g) == set(ref_g)
    worst = max(ref_g, key=lambda n: rel(g[n], ref_g[n]))
    assert rel(g[worst], ref_g[worst]) < RTOL, (worst, rel(g[worst], ref_g[worst]))


def batch(torch, B=3, S=11, V=97, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, S), generator=gen)
    labels = ids.clone()
    labels[0, :4] = -100          # a prompt masked out
    labels[B - 1, 7:] = -100
    return ids, labels


CASES = [("llama", dict(tied=False, llama3=True)),            # GQA, untied, Llama-3 rope
         ("llama", dict(tied=True, heads=(4, 4))),             # MHA, tied
         ("qwen3", dict(tied=True)),                           # GQA, QK-norm, head_dim 16
         ("qwen3", dict(tied=False))]


@pytest.mark.parametrize("kind,kw", CASES, ids=["llama-gqa-untied-llama3", "llama-mha-tied",
                                                "qwen3-tied", "qwen3-untied"])
def test_patched_matches_hf(hf, abt, calls, kind, kw):
    """The per-op path (one_call=False): each layer's kernels under autograd."""
    import torch
    ref = build(hf, kind, **kw)
    pat = abt.apply(copy.deepcopy(ref), one_call=False)
    ids, labels = batch(torch)
    r, rg = step(ref, input_ids=ids, labels=labels)
    p, pg = step(pat, input_ids=ids, labels=labels)
    assert_same(r, rg, p, pg)
    assert p.logits is None  # training with labels: the logits never exist in full
    L = ref.config.num_hidden_layers
    assert calls["attention"] == L and calls["swiglu"] == L and calls["rope"] == 2 * L
    assert calls["rmsnorm"] == (2 * L + 1) + (2 * L if kind == "qwen3" else 0)
    assert calls["chunked_classifier_cross_entropy"] == 1


@pytest.mark.parametrize("kind,kw", CASES, ids=["llama-gqa-untied-llama3", "llama-mha-tied",
                                                "qwen3-tied", "qwen3-untied"])
def test_one_call_matches_hf(hf, abt, calls, kind, kw):
    """The default path for plain training calls: the whole model as one C
    call forward and one backward, the HF parameters viewing the C model's
    flat buffer; loss and every gradient as HF's, also with num_items_in_batch."""
    import torch
    ref = build(hf, kind, **kw)
    pat = abt.apply(copy.deepcopy(ref))
    ids, labels = batch(torch)
    r, rg = step(ref, input_ids=ids, labels=labels)
    p, pg = step(pat, input_ids=ids, labels=labels)
    assert_same(r, rg, p, pg)
    assert calls == {"one_call": 1} and p.logits is None
    flat = pat._anebackward_slot.engine.flat_params
    lo, hi = flat.ctypes.data, flat.ctypes.data + flat.nbytes
    assert all(lo <= q.data_ptr() < hi for q in pat.parameters())  # zero-copy views
    n = torch.tensor(57)
    assert_same(*step(ref, input_ids=ids, labels=labels, num_items_in_batch=n),
                *step(pat, input_ids=ids, labels=labels, num_items_in_batch=n))
    assert calls == {"one_call": 2}


def test_num_items_in_batch(hf, abt, calls):
    """HF Trainer's gradient-accumulation divisor: sum of losses / num_items_in_batch."""
    import torch
    ref = build(hf, "llama")
    pat = abt.apply(copy.deepcopy(ref), one_call=False)
    ids, labels = batch(torch)
    n = torch.tensor(57)
    r, rg = step(ref, input_ids=ids, labels=labels, num_items_in_batch=n)
    p, pg = step(pat, input_ids=ids, labels=labels, num_items_in_batch=n)
    assert_same(r, rg, p, pg)
    assert calls["chunked_classifier_cross_entropy"] == 1


def test_all_ones_mask_and_explicit_positions_take_the_kernels(hf, abt, calls):
    import torch
    ref = build(hf, "qwen3")
    pat = abt.apply(copy.deepcopy(ref))
    ids, labels = batch(torch)
    inputs = dict(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids),
                  position_ids=torch.arange(ids.shape[1]).expand(ids.shape[0], -1))
    assert_same(*step(ref, **inputs), *step(pat, **inputs))
    assert calls == {"one_call": 1}
    abt.apply(pat, one_call=False)
    assert_same(*step(ref, **inputs), *step(pat, **inputs))
    assert calls["attention"] == 2


@pytest.mark.parametrize("offsets,rope_switch,kernel_rope", [((3, 3, 3), True, True),
                                                            ((0, 4, 9), True, False),
                                                            ((0, 0, 0), False, False)])
def test_rope_kernel_or_hf_cos_sin(hf, abt, calls, offsets, rope_switch, kernel_rope):
    """position_ids starting at one offset p0 (and rope=True) take the RoPE
    kernel; rows at different offsets, or rope=False, apply HF's cos/sin in
    torch; attention is the kernel's either way."""
    import torch
    ref = build(hf, "llama", llama3=True)
    pat = abt.apply(copy.deepcopy(ref), rope=rope_switch, one_call=False)
    ids, labels = batch(torch)
    pos = torch.stack([torch.arange(o, o + ids.shape[1]) for o in offsets])
    inputs = dict(input_ids=ids, labels=labels, position_ids=pos)
    assert_same(*step(ref, **inputs), *step(pat, **inputs))
    assert calls["attention"] == 2 and ("rope" in calls) == kernel_rope


def _fallback(hf, abt, calls, kind, inputs, *, kernel_attention, model_kw=None, dtype=None):
    import torch
    ref = build(hf, kind, **(model_kw or {}))
    if dtype is not None:
        ref = ref.to(dtype)
    pat = abt.apply(copy.deepcopy(ref))
    torch.manual_seed(5)
    r, rg = step(ref, **inputs)
    torch.manual_seed(5)
    p, pg = step(pat, **inputs)
    assert_same(r, rg, p, pg)
    assert (calls.get("attention", 0) > 0) == kernel_attention
    return r, p


def test_fallback_padding_mask(hf, abt, calls):
    import torch
    ids, labels = batch(torch)
    mask = torch.ones_like(ids)
    mask[2, :3] = 0  # left padding
    labels[2, :3] = -100
    _fallback(hf, abt, calls, "llama", dict(input_ids=ids, labels=labels, attention_mask=mask),
              kernel_attention=False)
    assert calls["chunked_classifier_cross_entropy"] == 1  # the loss is still fused


def test_fallback_non_causal_4d_mask(hf, abt, calls):
    """A caller's own 4-D mask (here: every position sees every position) is HF's business."""
    import torch
    ids, labels = batch(torch)
    B, S = ids.shape
    mask = torch.ones(B, 1, S, S, dtype=torch.bool)
    _fallback(hf, abt, calls, "llama", dict(input_ids=ids, labels=labels, attention_mask=mask),
              kernel_attention=False, model_kw=dict(attn_implementation="eager"))


def test_fallback_packed_sequences(hf, abt, calls):
    """position_ids restarting inside a row: HF masks the packed sequences apart."""
    import torch
    ids, labels = batch(torch, B=1, S=12)
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    _fallback(hf, abt, calls, "qwen3", dict(input_ids=ids, labels=labels, position_ids=pos),
              kernel_attention=False)


def test_fallback_dropout_in_training(hf, abt, calls):
    import torch
    ids, labels = batch(torch)
    _fallback(hf, abt, calls, "llama", dict(input_ids=ids, labels=labels),
              kernel_attention=False, model_kw=dict(attention_dropout=0.3))


def test_fallback_bfloat16(hf, abt, calls):
    import torch
    ids, labels = batch(torch)
    r, p = _fallback(hf, abt, calls, "qwen3", dict(input_ids=ids, labels=labels),
                     kernel_attention=False, dtype=torch.bfloat16)
    assert calls == {}
    assert p.logits is not None  # HF's own forward for the whole call


def test_fallback_output_attentions(hf, abt, calls):
    import torch
    ids, labels = batch(torch)
    r, p = _fallback(hf, abt, calls, "llama", dict(input_ids=ids, labels=labels,
                                                    output_attentions=True),
                     kernel_attention=False, model_kw=dict(attn_implementation="eager"))
    assert len(p.attentions) == 2


def test_eval_returns_logits(hf, abt, calls):
    """Outside training the patched CausalLM is HF's forward (logits for the
    caller), with the kernels for norms, attention and MLP."""
    import torch
    ref = build(hf, "llama").eval()
    pat = abt.apply(copy.deepcopy(ref))
    ids, labels = batch(torch)
    with torch.no_grad():
        r, p = ref(input_ids=ids, labels=labels), pat(input_ids=ids, labels=labels)
    assert rel(p.logits, r.logits) < RTOL and rel(p.loss, r.loss) < RTOL
    assert calls["attention"] == 2 and "chunked_classifier_cross_entropy" not in calls


def test_generate_with_cache_matches(hf, abt, calls):
    """The prefill runs the kernels and fills HF's cache; decoding steps (tokens
    already cached) fall back to HF's attention."""
    import torch
    ref = build(hf, "llama").eval()
    pat = abt.apply(copy.deepcopy(ref))
    ids, _ = batch(torch, B=1, S=6)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ref.generate(ids, **kw), pat.generate(ids, **kw))
    assert calls["attention"] == 2  # the prefill only


def test_unsupported_model_type(hf, abt):
    cfg = hf.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50)
    with pytest.raises(NotImplementedError, match="llama, qwen3"):
        abt.apply(hf.GPT2LMHeadModel(cfg))


def test_apply_to_classes_before_building(hf, abt, calls):
    """apply_to_qwen3() patches the modeling classes: models built later use
    the kernels; the switches leave the others alone."""
    import torch
    from transformers.models.qwen3 import modeling_qwen3 as mq
    ids, labels = batch(torch)
    ref = step(build(hf, "qwen3"), input_ids=ids, labels=labels)  # before patching the classes
    saved = {c: c.__dict__.get("forward") for c in (mq.Qwen3RMSNorm, mq.Qwen3MLP, mq.Qwen3Attention,
                                                     mq.Qwen3Model, mq.Qwen3ForCausalLM)}
    try:
        abt.apply_to_qwen3(swiglu=False)
        pat = build(hf, "qwen3")
        assert_same(*ref, *step(pat, input_ids=ids, labels=labels))
        assert calls["attention"] == 2 and "swiglu" not in calls
    finally:
        for c, f in saved.items():
            c.forward = f
            c.__dict__.get("_anebackward_original_forward") and delattr(
                c, "_anebackward_original_forward")


def test_negative_label_is_named(hf, abt):
    import torch
    pat = abt.apply(build(hf, "llama"))
    ids, labels = batch(torch)
    labels[1, 2] = -7
    with pytest.raises(ValueError, match="labels"):
        pat(input_ids=ids, labels=labels)


def _trainer_losses(hf, abt, tmp_path, patched, steps=20, ddp=False, **train_kw):
    """20 steps of HF Trainer (use_cpu, gradient accumulation 2, so that
    num_items_in_batch is in play) on a tiny Llama; the logged loss curve.
    train_kw: more TrainingArguments (e.g. bf16=True)."""
    import torch
    import_hf_test("accelerate")  # HF Trainer's own requirement
    model = build(hf, "llama", llama3=True, seed=3)
    if patched:
        abt.apply(model)
    gen = torch.Generator().manual_seed(7)
    rows = []
    for _ in range(steps * 4):
        ids = torch.randint(0, 97, (12,), generator=gen)
        labels = ids.clone()
        labels[: int(torch.randint(0, 6, (1,), generator=gen))] = -100
        rows.append({"input_ids": ids, "labels": labels})
    args = hf.TrainingArguments(output_dir=str(tmp_path / ("p" if patched else "u")), use_cpu=True,
                                per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                max_steps=steps, learning_rate=3e-3, logging_steps=1,
                                report_to=[], save_strategy="no", seed=11, data_seed=11,
                                dataloader_num_workers=0, disable_tqdm=True,
                                **(dict(ddp_backend="gloo") if ddp else {}), **train_kw)
    trainer = hf.Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_same_loss_curve(hf, abt, calls, tmp_path):
    ref = _trainer_losses(hf, abt, tmp_path, patched=False)
    pat = _trainer_losses(hf, abt, tmp_path, patched=True)
    assert len(ref) == 20 and len(pat) == 20
    assert calls["one_call"] == 40  # 20 steps × 2 micro-batches, each the whole model in C
    for i, (a, b) in enumerate(zip(pat, ref)):
        assert abs(a - b) <= 1e-4 * abs(b), (i, a, b)


@pytest.mark.slow   # torchrun, two processes
def test_trainer_torchrun_two_processes(hf, abt, tmp_path):
    """The same 20 Trainer steps as 2 processes under torchrun (gloo, loopback):
    patched and unpatched give the same (rank-averaged) loss curve."""
    import json
    import os
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "curves.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_ddp_worker.py")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(port), worker, str(out)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    c = json.loads(out.read_text())
    assert c["world"] == 2 and len(c["unpatched"]) == 20 == len(c["patched"])
    for i, (a, b) in enumerate(zip(c["patched"], c["unpatched"])):
        assert abs(a - b) <= 1e-4 * abs(b), (i, a, b)
