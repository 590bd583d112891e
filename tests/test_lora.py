"""Frozen tensors and LoRA adapters in the C model.

Oracles: the same model computing every gradient (frozen tensors must give
bit-identical gradients for the rest), and Hugging Face transformers + peft
in float64 through PyTorch autograd (LoRA forward, adapter gradients, peft's
adapter directories both ways)."""
import math
import os

import numpy as np
import pytest

import anebackward as ab
from anebackward.lora import LoraConfig
from conftest import import_hf
from oracle import assert_close


def import_peft():
    """peft (in the hf extra): the adapters' oracle; required like transformers."""
    import_hf()
    try:
        import peft
    except ImportError as e:
        if "1" in (os.environ.get("ANEBACKWARD_REQUIRE_HF"),
                   os.environ.get("ANEBACKWARD_REQUIRE_TORCH")):
            pytest.fail(f"ANEBACKWARD_REQUIRE_HF/TORCH=1 but peft cannot be imported: {e}")
        pytest.skip("peft is not installed (pip install -e '.[hf,hf-test]')")
    return peft

CFG = ab.LlamaConfig(dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=53,
                     max_seq_len=24, shared_classifier=False)


def _tokens(B=2, S=13, V=53, seed=0):
    return np.random.default_rng(seed).integers(0, V, (B, S)).astype(np.int32)


def _randomize_adapters(model, seed=5):
    """B away from its zero init so dA and the adapters' effect are not zero."""
    rng = np.random.default_rng(seed)
    for n, p in model.params.items():
        if ".lora_" in n:
            p[...] = (0.2 * rng.standard_normal(p.shape)).astype(np.float32)
    model.mark_params_changed()


# ---- frozen tensors --------------------------------------------------------------
TRAINABLE = [
    pytest.param(lambda n: ".wq." in n or n == "norm.weight", id="wq+norm"),
    pytest.param(["layers.1.feed_forward.w2.weight", "model.embed_tokens.weight"], id="w2+emb(hf)"),
    pytest.param(lambda n: n.startswith("model.layers.0.") and "proj" in n, id="hf-layer0-proj"),
    pytest.param(lambda n: "norm" in n, id="norms"),
    pytest.param(["output.weight"], id="classifier"),
]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("trainable", TRAINABLE)
def test_frozen_tensors_give_bit_identical_gradients(tied, recompute, trainable):
    cfg = CFG.replace(shared_classifier=tied)
    if tied and isinstance(trainable, list) and "output.weight" in trainable:
        trainable = ["tok_embeddings.weight"]
    full = ab.Llama(cfg, seed=3, recompute=recompute)
    part = ab.Llama(cfg, seed=3, recompute=recompute, trainable=trainable)
    tok = _tokens()
    for m in (full, part):
        m.forward(tok)
        m.backward()
    assert 0 < part.n_grads < full.n_grads
    assert part.n_grads == sum(g.size for g in part.grads.values())
    assert set(part.grads) == set(part.trainable)
    for name, g in part.grads.items():
        assert np.abs(g).max() > 0, name
        np.testing.assert_array_equal(g, full.grads[name], err_msg=name)
    # accumulate and grad_scale through the offset table too
    for m in (full, part):
        m.forward(tok)
        m.backward(accumulate=True, grad_scale=0.5)
    for name, g in part.grads.items():
        np.testing.assert_array_equal(g, full.grads[name], err_msg=name)


def test_adamw_steps_only_trainable_tensors_exactly_as_a_full_step():
    cfg = CFG
    names = ["layers.0.attention.wk.weight", "layers.1.ffn_norm.weight", "output.weight"]
    full = ab.Llama(cfg, seed=3)
    part = ab.Llama(cfg, seed=3, trainable=names)
    before = {n: p.copy() for n, p in part.params.items()}
    ofull, opart = ab.AdamW(full, lr=1e-2), ab.AdamW(part, lr=1e-2)
    assert opart.m.size == part.n_grads
    tok = _tokens()
    for _ in range(2):
        for m, o in ((full, ofull), (part, opart)):
            m.forward(tok)
            m.backward()
            o.step()
    for n, p in part.params.items():
        if n in names:
            assert not np.array_equal(p, before[n]), n
        else:
            np.testing.assert_array_equal(p, before[n], err_msg=n)
    # the trainable tensors' trajectory is the full model's as long as the
    # frozen ones would not have moved: compare the first step only
    full2, part2 = ab.Llama(cfg, seed=3), ab.Llama(cfg, seed=3, trainable=names)
    for m in (full2, part2):
        m.forward(tok)
        m.backward()
        ab.AdamW(m, lr=1e-2).step()
    for n in names:
        np.testing.assert_array_equal(part2.params[n], full2.params[n], err_msg=n)


def test_lora_with_more_trainable_tensors():
    lc = LoraConfig(2, targets=("q",))
    pred = ab.Llama(CFG, lora=lc, trainable=lambda n: ".lora_" in n or n == "model.norm.weight")
    names = ab.Llama(CFG, lora=lc, trainable=["model.layers.1.self_attn.q_proj.lora_B.weight",
                                              "layers.0.attention.wq.lora_A.weight"])
    assert set(pred.grads) == {n for n in pred.params if ".lora_" in n} | {"norm.weight"}
    assert set(names.grads) == {"layers.1.attention.wq.lora_B.weight",
                                "layers.0.attention.wq.lora_A.weight"}
    full = ab.Llama(CFG, lora=lc, trainable=lambda n: True)
    for m in (pred, names, full):
        _randomize_adapters(m)
        m.forward(_tokens())
        m.backward()
    for m in (pred, names):
        for n, g in m.grads.items():
            np.testing.assert_array_equal(g, full.grads[n], err_msg=n)


def test_trainable_bad_names_raise():
    with pytest.raises(ValueError, match="unknown tensor"):
        ab.Llama(CFG, trainable=["layers.9.attention.wq.weight"])
    with pytest.raises(TypeError, match="str"):
        ab.Llama(CFG, trainable="output.weight")


# ---- LoRA in the C model ---------------------------------------------------------
def test_lora_init_is_peft_like_and_seedable_and_leaves_the_model_unchanged():
    lc = LoraConfig(4, alpha=8, targets=("q", "down"))
    a, b = ab.Llama(CFG, seed=2, lora=lc), ab.Llama(CFG, seed=2, lora=lc)
    base = ab.Llama(CFG, seed=2)
    c = ab.Llama(CFG, seed=7, lora=lc)
    A = a.params["layers.0.attention.wq.lora_A.weight"]
    assert A.shape == (4, 32) and np.abs(A).max() <= 1 / math.sqrt(32) and A.std() > 0.05
    assert a.params["layers.1.feed_forward.w2.lora_A.weight"].shape == (4, 48)
    assert a.params["layers.1.feed_forward.w2.lora_B.weight"].shape == (32, 4)
    assert not a.params["layers.0.attention.wq.lora_B.weight"].any()
    np.testing.assert_array_equal(a.flat_params, b.flat_params)
    assert not np.array_equal(a.flat_params, c.flat_params)
    assert set(a.grads) == {n for n in a.params if ".lora_" in n}
    tok = _tokens()
    assert a.forward(tok) == base.forward(tok)      # B = 0: y + s*0 is y exactly


def test_lora_options_and_errors():
    assert LoraConfig(16, 32).scale == 2.0
    assert LoraConfig(16, 32, use_rslora=True).scale == 8.0
    assert LoraConfig(8, targets="q_proj,wv,up").targets == ("q", "v", "up")
    with pytest.raises(ValueError, match="dropout"):
        LoraConfig(4, dropout=0.1)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        LoraConfig(4, targets=("q", "lm_head"))
    with pytest.raises(ValueError, match="positive int"):
        LoraConfig(0)
    with pytest.raises(ValueError, match="backend='ane'"):
        ab.Llama(CFG, lora=4, backend="ane")
    m = ab.Llama(CFG, lora=4)
    with pytest.raises(ValueError, match="merge"):
        m.decoder()
    with pytest.raises(ValueError, match="merge"):
        m.save("/nonexistent/x.bin")
    m.merge()
    m.forward(_tokens())
    with pytest.raises(RuntimeError, match="unmerge"):
        m.backward()
    with pytest.raises(ValueError, match="already merged"):
        m.merge()


def _torch_lora_reference(torch, model, tok):
    """Our model + adapters in float64 PyTorch autograd, written out here:
    each targeted projection x W^T + s (x A^T) B^T."""
    from anebackward.bench.torch_llama import Transformer
    import torch.nn.functional as F
    base = {n: a for n, a in model.params.items() if ".lora_" not in n}
    ref = Transformer.from_config(model.config).double().load_arrays(base)
    s = model.lora.scale
    adapters = {}
    for mod_name, mod in ref.named_modules():
        key = mod_name + ".weight"
        a = key[:-len(".weight")] + ".lora_A.weight"
        if isinstance(mod, torch.nn.Linear) and a in model.params:
            A = torch.tensor(model.params[a], dtype=torch.float64, requires_grad=True)
            B = torch.tensor(model.params[a.replace("lora_A", "lora_B")], dtype=torch.float64,
                             requires_grad=True)
            adapters[a], adapters[a.replace("lora_A", "lora_B")] = A, B
            mod.forward = (lambda m, A, B: lambda x: F.linear(x, m.weight)
                           + s * F.linear(F.linear(x, A), B))(mod, A, B)
    for p in ref.parameters():
        p.requires_grad_(False)
    t = torch.tensor(tok, dtype=torch.long)
    tgt = t.clone()
    tgt[:, :-1] = t[:, 1:]
    tgt[:, -1] = -1
    ref(t, tgt)
    ref.last_loss.backward()
    return ref.last_loss.item(), {n: v.grad.numpy() for n, v in adapters.items()}


@pytest.mark.parametrize("targets", [("q", "k", "v", "o", "gate", "up", "down"), ("v", "down"),
                                     ("o", "gate")])
@pytest.mark.parametrize("recompute", [False, True])
def test_lora_gradients_match_torch_float64(torch, targets, recompute):
    m = ab.Llama(CFG, seed=4, recompute=recompute,
                 lora=LoraConfig(3, alpha=5, targets=targets))
    _randomize_adapters(m)
    tok = _tokens(B=2, S=11)
    loss = m.forward(tok)
    m.backward()
    want_loss, want = _torch_lora_reference(torch, m, tok)
    assert abs(loss - want_loss) <= 1e-5 * abs(want_loss)
    assert set(m.grads) == set(want)
    for n, g in m.grads.items():
        scale = np.abs(want[n]).max()
        assert scale > 0, n
        assert_close(g, want[n], rtol=1e-4, atol=1e-5 * scale, what=n)


def test_lora_recompute_varlen_and_threads_are_bit_identical():
    lc = LoraConfig(4, alpha=8)
    tok = _tokens(B=2, S=12)
    out = {}
    for threads in (1, 3):
        ab.set_num_threads(threads)
        for rc in (False, True):
            m = ab.Llama(CFG, seed=4, recompute=rc, lora=lc)
            _randomize_adapters(m)
            m.forward(tok)
            m.backward()
            out[threads, rc] = m.flat_grads.copy()
    ab.set_num_threads(2)
    for k, v in out.items():
        np.testing.assert_array_equal(v, out[1, False], err_msg=str(k))
    # a varlen batch (padded rows) equals each document alone, summed by hand
    m = ab.Llama(CFG, seed=4, lora=lc)
    _randomize_adapters(m)
    mask = np.ones((2, 12), dtype=np.int32)
    mask[1, 8:] = 0
    m.forward(tok, attention_mask=mask, loss_denominator=1.0)
    m.backward()
    got = m.flat_grads.copy()
    acc = np.zeros_like(got)
    for row, n in ((0, 12), (1, 8)):
        t = tok[row:row + 1, :n]
        tgt = np.full_like(t, -1)
        tgt[:, :-1] = t[:, 1:]
        m.forward(t, tgt)
        m.backward(grad_scale=float(n - 1))
        acc += m.flat_grads
    assert_close(got, acc, rtol=1e-4, atol=1e-5 * np.abs(acc).max(), what="varlen vs rows")


@pytest.mark.usefixtures("bf16_ready")
def test_lora_bf16_is_close_to_fp32():
    lc = LoraConfig(4, alpha=8)
    tok = _tokens()
    res = {}
    for prec in ("fp32", "bf16"):
        m = ab.Llama(CFG, seed=4, lora=lc, precision=prec)
        _randomize_adapters(m)
        res[prec] = (m.forward(tok), m.backward(), m.flat_grads.copy())
    assert abs(res["bf16"][0] - res["fp32"][0]) < 2e-2 * res["fp32"][0]
    g32, g16 = res["fp32"][2], res["bf16"][2]
    assert np.linalg.norm(g16 - g32) < 5e-2 * np.linalg.norm(g32)


def test_merge_and_unmerge():
    m = ab.Llama(CFG, seed=4, lora=LoraConfig(4, alpha=8, use_rslora=True))
    _randomize_adapters(m)
    tok = _tokens(B=1, S=10)
    before = m.flat_params.copy()
    lg = m.logits(tok)
    m.merge()
    assert not np.array_equal(m.flat_params[:m.n_base], before[:m.n_base])
    assert_close(m.logits(tok), lg, rtol=1e-4, atol=1e-5, what="merged logits")
    dec = m.decoder()
    for t in range(tok.shape[1]):
        step = dec.step(int(tok[0, t]))
    assert_close(step, lg[0, -1], rtol=1e-4, atol=1e-4, what="decoder")
    m.unmerge()
    assert_close(m.flat_params, before, rtol=0, atol=1e-6, what="unmerged")
    np.testing.assert_array_equal(m.logits(tok), m.logits(tok))
    m.forward(tok)
    m.backward()


# ---- peft interop ------------------------------------------------------------------
def _hf_pair(tmp_path, kind, lc, tied=False):
    from test_hf import hf_model
    hf = hf_model(kind, tied)
    hf.save_pretrained(tmp_path / "base")
    ours = ab.Llama.from_pretrained(tmp_path / "base", lora=lc)
    _randomize_adapters(ours)
    return hf, ours


@pytest.mark.parametrize("kind,rslora", [("llama", False), ("qwen3", True)])
def test_saved_adapter_loads_in_peft_with_equal_logits_and_gradients(tmp_path, kind, rslora):
    peft = import_peft()
    import torch
    lc = LoraConfig(4, alpha=6, targets=("q", "k", "v", "o", "gate", "up", "down"),
                    use_rslora=rslora)
    hf, ours = _hf_pair(tmp_path, kind, lc)
    ours.save_adapter(tmp_path / "adapter")
    pm = peft.PeftModel.from_pretrained(hf.double(), tmp_path / "adapter", is_trainable=True)
    pm = pm.double()
    tok = np.random.default_rng(1).integers(0, 97, (2, 16)).astype(np.int32)
    ids = torch.from_numpy(tok.astype(np.int64))
    out = pm(input_ids=ids, labels=ids)
    out.loss.backward()
    assert_close(ours.logits(tok), out.logits.detach().numpy(), rtol=1e-5, atol=1e-5,
                 what="logits vs peft")
    assert abs(ours.forward(tok) - out.loss.item()) <= 1e-5 * out.loss.item()
    ours.backward()
    pg = {n: p.grad.numpy() for n, p in pm.named_parameters() if p.grad is not None}
    from anebackward.lora import peft_name
    assert len(pg) == len(ours.grads)
    for n, g in ours.grads.items():
        want = pg[peft_name(n).replace(".weight", ".default.weight")]
        assert_close(g, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), what=n)
        assert np.abs(g - want).max() <= 1e-5, n       # and within 1e-5 absolute


def test_peft_adapter_directory_loads_into_llama_and_merged_dir_loads_in_hf(tmp_path):
    transformers = import_hf()
    peft = import_peft()
    import torch
    from test_hf import hf_model
    hf = hf_model("llama", True)
    hf.save_pretrained(tmp_path / "base")
    pcfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"],
                           lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(3)
    pm = peft.get_peft_model(hf, pcfg)
    pm.save_pretrained(tmp_path / "adapter")
    tok = np.random.default_rng(2).integers(0, 97, (1, 12)).astype(np.int32)
    with torch.no_grad():
        want = pm(input_ids=torch.from_numpy(tok.astype(np.int64))).logits.numpy()
    ours = ab.Llama.from_pretrained(tmp_path / "base", adapter=tmp_path / "adapter")
    assert ours.lora.targets == ("q", "v", "down") and ours.lora.scale == 3.0
    assert_close(ours.logits(tok), want, rtol=1e-5, atol=1e-5, what="peft adapter in Llama")
    ours.save_pretrained(tmp_path / "merged", merged=True)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = merged(input_ids=torch.from_numpy(tok.astype(np.int64))).logits.numpy()
    assert_close(got, want, rtol=1e-4, atol=1e-4, what="merged dir in HF")
    with pytest.raises(ValueError, match="holds"):
        ab.Llama.from_pretrained(tmp_path / "base", lora=LoraConfig(8)).load_adapter(
            tmp_path / "adapter")


# ---- the trainer ----------------------------------------------------------------------
def test_train_lora_writes_a_peft_dir_resumes_and_merges(tmp_path, capsys):
    transformers = import_hf()
    peft = import_peft()
    import torch
    from test_hf import _losses, _train, hf_dir_with_tokenizer
    d, _ = hf_dir_with_tokenizer(tmp_path)
    data = str(tmp_path / "data.txt")
    lora = ["--init-from", str(d), "--data", data, "--lora", "4", "--lora-alpha", "8",
            "--lora-targets", "q,v,down", "--lr", "1e-2"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert _train(lora + ["--steps", "6", "--out", str(full), "--merge"]) == 0
    files = set(os.listdir(full))
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.bin",
            "tokenizer.json", "merged"} <= files and "model.safetensors" not in files
    # the base is untouched; the adapters moved; peft reads them with our logits
    ours = ab.Llama.from_pretrained(d, adapter=full)
    np.testing.assert_array_equal(ours.flat_params[:ours.n_base],
                                  ab.Llama.from_pretrained(d).flat_params)
    assert np.abs(ours.params["layers.0.attention.wq.lora_B.weight"]).max() > 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    pm = peft.PeftModel.from_pretrained(hf, full).eval()
    tok = np.arange(1, 20, dtype=np.int32)[None]
    with torch.no_grad():
        want = pm(input_ids=torch.from_numpy(tok.astype(np.int64))).logits.numpy()
        merged = transformers.AutoModelForCausalLM.from_pretrained(full / "merged").eval()
        got_merged = merged(input_ids=torch.from_numpy(tok.astype(np.int64))).logits.numpy()
    assert_close(ours.logits(tok), want, rtol=1e-5, atol=1e-5, what="trained adapter in peft")
    assert_close(got_merged, want, rtol=1e-4, atol=1e-4, what="merged directory")
    # a run stopped at step 3 and resumed gives the same losses and adapters
    assert _train(lora + ["--steps", "3", "--decay-steps", "6", "--out", str(part)]) == 0
    from anebackward.__main__ import main
    assert main(["train", "--quiet", "--resume", str(part), "--steps", "6"]) == 0
    assert _losses(part) == _losses(full)
    back = ab.Llama.from_pretrained(d, adapter=part)
    np.testing.assert_array_equal(back.flat_params, ours.flat_params)
    # flags that need --lora, and --lora without an HF --init-from
    with pytest.raises(SystemExit, match="add --lora"):
        _train(["--init-from", str(d), "--data", data, "--lora-alpha", "3", "--out",
                str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--init-from HFDIR"):
        _train(["--config", "tiny", "--lora", "4", "--out", str(tmp_path / "y")])


def test_a_signal_saves_a_resumable_adapter_run(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    import_peft()
    from test_hf import _losses, _train, hf_dir_with_tokenizer
    from test_train_safety import _log_path, _wait_for_steps
    d, _ = hf_dir_with_tokenizer(tmp_path)
    out = str(tmp_path / "run")
    common = ["--init-from", str(d), "--data", str(tmp_path / "data.txt"), "--lora", "4",
              "--decay-steps", "400"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "anebackward", "train", "--quiet", "--batch-size", "2",
         "--seq-len", "16", "--eval-every", "0", "--warmup", "1", "--lr", "1e-3"] + common
        + ["--steps", "1000000", "--out", out], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=str(tmp_path))
    deadline = time.time() + 60
    while time.time() < deadline and not os.path.exists(_log_path(tmp_path, out)):
        time.sleep(0.05)
    _wait_for_steps(_log_path(tmp_path, out), 3, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr.decode()
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
    k = len(_losses(out))
    assert k >= 3
    from anebackward.__main__ import main
    assert main(["train", "--quiet", "--resume", out, "--steps", str(k + 2)]) == 0
    ref = str(tmp_path / "ref")
    assert _train(common + ["--steps", str(k + 2), "--out", ref]) == 0
    assert _losses(out) == _losses(ref)


@pytest.mark.usefixtures("bf16_ready")
def test_bf16_lora_steps_refresh_only_the_adapters_and_match_full_refreshes():
    lc = LoraConfig(4, alpha=8)
    tok = _tokens()
    runs = []
    for full_refresh in (False, True):
        m = ab.Llama(CFG, seed=4, lora=lc, precision="bf16")
        opt = ab.AdamW(m, lr=1e-2)
        out = []
        for _ in range(3):
            out.append(m.forward(tok))
            m.backward()
            opt.step()
            if full_refresh:
                m.mark_params_changed()      # forces the whole bf16 copy again
        out.append(m.flat_params.copy())
        runs.append(out)
    assert runs[0][:3] == runs[1][:3]
    np.testing.assert_array_equal(runs[0][3], runs[1][3])
    assert len(set(runs[0][:3])) == 3          # the adapters moved: the loss changed


def test_c_guards_of_adapters_and_frozen_tensors():
    from anebackward._native import ffi, lib
    from anebackward.layout import c_config
    lc = LoraConfig(4)
    n = int(lib.AB_TENSOR_KINDS) * CFG.n_layers
    flags = ffi.new("uint8_t[]", n)
    goff = ffi.new("int64_t[]", n)
    ng = ffi.new("int64_t *")
    cfg = c_config(CFG, lora=lc)
    assert lib.ab_model_grad_layout(cfg, ffi.NULL, goff, ng) != 0
    assert lib.ab_model_grad_layout(cfg, flags, ffi.NULL, ng) != 0
    assert lib.ab_model_grad_layout(cfg, flags, goff, ng) == 0 and ng[0] == 0
    assert all(goff[i] == -1 for i in range(n))
    lay = ffi.new("ab_model_layout *")
    for field, value in (("lora_rank", -1), ("lora_targets", 0), ("lora_targets", 128),
                         ("lora_scale", float("nan"))):
        bad = c_config(CFG, lora=lc)
        setattr(bad, field, value)
        assert lib.ab_model_param_layout(bad, lay) != 0, field
    # decode refuses unmerged adapters; the backward refuses merged ones
    m = ab.Llama(CFG, lora=lc)
    kv = ffi.new("int64_t *")
    assert lib.ab_model_kv_cache_floats(m._cfg, kv) == 0
    cache = np.zeros(kv[0], np.float32)
    assert lib.ab_model_decode_workspace_floats(m._cfg, kv) == 0
    work = np.zeros(kv[0], np.float32)
    logits = np.zeros(CFG.vocab_size, np.float32)
    fp = lambda a: ffi.cast("float *", a.ctypes.data)   # noqa: E731
    assert lib.ab_model_decode(fp(logits), m._cfg, fp(m.flat_params), 1, 0, fp(cache), fp(work),
                               work.size) == lib.AB_EINVAL
    tok = _tokens()
    m.forward(tok)
    merged = c_config(CFG, lora=lc)
    merged.options.lora_merged = 1
    B, S, ws, _ = m._ws
    assert lib.ab_model_backward(merged, fp(m.flat_params), fp(m.flat_grads), B, S, 1.0, 0,
                                 fp(ws), ws.size) == lib.AB_EINVAL
    m.backward()             # the refused call left the forward's workspace alone
    assert np.abs(m.flat_grads).max() > 0


def test_the_lora_bench_runs_ours_and_hf_peft(capsys):
    import_hf()
    if os.environ.get("ANEBACKWARD_REQUIRE_HF") != "1":
        pytest.importorskip("peft", reason="peft (the hf extra) is the contender")
    from anebackward.bench import lora as bench
    before = ab.get_num_threads()
    try:
        bench.main(["step", "--shape", "tiny", "--seq", "16", "--repeats", "1", "--threads", "1",
                    "--hf-peft"])
    finally:
        ab.set_num_threads(before)
    out = capsys.readouterr().out
    assert "lora-r16" in out and "hf-peft-r16" in out and "hf-peft / lora (ours)" in out
    # the patched HF + peft model ran (the bench raises unless it took the one-call path)
    assert "hf-peft-patched" in out and "hf-peft / hf-peft-patched" in out
