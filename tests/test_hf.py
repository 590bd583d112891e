"""Hugging Face directories and architectures: tiny random-init transformers
models (built here, no downloads) against anebackward.Llama."""
import json
import os

import numpy as np
import pytest

import anebackward as ab
from anebackward.errors import CheckpointError
from conftest import assert_bit_identical_at_threads, import_hf
from oracle import assert_close

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def hf_model(kind, tied, dtype="float32", seed=0):
    transformers = import_hf()
    import torch
    torch.manual_seed(seed)
    common = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                  max_position_embeddings=64, tie_word_embeddings=tied, rms_norm_eps=1e-6)
    if kind == "llama":
        cfg = transformers.LlamaConfig(rope_theta=500000.0, rope_scaling=dict(LLAMA3), **common)
        m = transformers.LlamaForCausalLM(cfg)
    else:   # Qwen3: head_dim 16 so the q width 64 differs from hidden 48, q/k norms
        cfg = transformers.Qwen3Config(head_dim=16, rope_theta=1e6, **common)
        m = transformers.Qwen3ForCausalLM(cfg)
    with torch.no_grad():   # norms away from 1 so their gradients and effects are visible
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    m.config._attn_implementation = "eager"
    return m.to(getattr(torch, dtype)).eval()


def tokens_for(m, B=2, S=24, seed=1):
    return np.random.default_rng(seed).integers(0, m.config.vocab_size, (B, S)).astype(np.int32)


def hf_loss_and_grads(m, tok):
    import_hf()   # skip/fail first: torch is part of the hf oracle
    import torch
    m.zero_grad()
    ids = torch.from_numpy(tok.astype(np.int64))
    out = m(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().numpy().copy() for n, p in m.named_parameters()}
    return float(out.loss.detach()), out.logits.detach().numpy(), grads


CASES = [("llama", False), ("llama", True), ("qwen3", True), ("qwen3", False)]


@pytest.mark.parametrize("kind,tied", CASES)
def test_from_pretrained_matches_hf_loss_logits_grads(tmp_path, kind, tied):
    m = hf_model(kind, tied)
    m.save_pretrained(tmp_path)
    ours = ab.Llama.from_pretrained(tmp_path)
    c = ours.config
    assert c.rope_layout == "half" and c.shared_classifier == tied and c.qk_norm == (kind == "qwen3")
    tok = tokens_for(m)
    loss, logits, grads = hf_loss_and_grads(m, tok)
    assert_close(ours.logits(tok), logits, rtol=1e-5, atol=1e-5, what="logits")
    assert abs(ours.forward(tok) - loss) <= 1e-5 * abs(loss)
    ours.backward()
    from anebackward.hf import hf_name
    for name, g in ours.grads.items():
        want = grads[hf_name(name)]
        scale = np.abs(want).max()
        assert_close(g, want, rtol=1e-4, atol=1e-4 * scale, what=f"grad {name}")


def test_recompute_gives_identical_gradients_and_less_memory(tmp_path):
    m = hf_model("qwen3", True)
    m.save_pretrained(tmp_path)
    a = ab.Llama.from_pretrained(tmp_path)
    b = ab.Llama.from_pretrained(tmp_path, recompute=True)
    tok = tokens_for(m, B=2, S=32)
    la, lb = a.forward(tok), b.forward(tok)
    a.backward()
    b.backward()
    assert la == lb and np.array_equal(a.flat_grads, b.flat_grads)
    assert b.workspace_bytes(2, 32) < a.workspace_bytes(2, 32)
    for cfg in (ab.LlamaConfig.preset("tiny"), ab.LlamaConfig.preset("tiny", qk_norm=True, head_dim=16)):
        x, y = ab.Llama(cfg, seed=3), ab.Llama(cfg, seed=3, recompute=True)
        t = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 20))
        assert x.forward(t) == y.forward(t)
        x.backward()
        y.backward()
        assert np.array_equal(x.flat_grads, y.flat_grads)


def test_native_adamw_steps_then_hf_loads_the_result(tmp_path):
    transformers = import_hf()   # skip/fail first: torch is part of the hf oracle
    import torch
    m = hf_model("llama", False)
    m.save_pretrained(tmp_path / "in")
    ours = ab.Llama.from_pretrained(tmp_path / "in")
    opt = ab.AdamW(ours, lr=1e-3)
    tok = tokens_for(m)
    first = ours.forward(tok)
    for _ in range(10):
        ours.forward(tok)
        ours.backward()
        opt.step()
    assert ours.forward(tok) < first
    ours.save_pretrained(tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        want = back(input_ids=torch.from_numpy(tok.astype(np.int64))).logits.numpy()
    assert_close(ours.logits(tok), want, rtol=1e-5, atol=1e-5, what="logits after save")


def test_llama2c_model_saves_as_hf_with_permuted_rows(tmp_path):
    """interleaved RoPE -> rotate-half: the same network in HF."""
    transformers = import_hf()   # skip/fail first: torch is part of the hf oracle
    import torch
    cfg = ab.LlamaConfig.preset("tiny", shared_classifier=False)
    ours = ab.Llama(cfg, seed=5)
    ours.flat_params[ours.n_decay:] += np.random.default_rng(0).standard_normal(
        ours.n_params - ours.n_decay).astype(np.float32) * 0.2
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tok = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 30)).astype(np.int32)
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(tok.astype(np.int64))).logits.numpy()
    assert_close(ours.logits(tok), want, rtol=1e-5, atol=1e-5, what="llama2.c model in HF")
    again = ab.Llama.from_pretrained(tmp_path)
    assert_close(again.logits(tok), want, rtol=1e-5, atol=1e-5, what="reloaded")


def test_bf16_and_fp16_checkpoints_load(tmp_path):
    import_hf()   # skip/fail first: torch is part of the hf oracle
    import torch
    for dtype in ("bfloat16", "float16"):
        m = hf_model("qwen3", True, dtype=dtype)
        d = tmp_path / dtype
        m.save_pretrained(d)
        ours = ab.Llama.from_pretrained(d)
        for n, p in m.named_parameters():
            if n == "lm_head.weight":
                continue
            ours_name = {v: k for k, v in ((k, __import__("anebackward.hf", fromlist=["x"]).hf_name(k))
                                            for k in ours.params)}[n]
            assert np.array_equal(ours.params[ours_name], p.detach().float().numpy()), n


def test_sharded_checkpoint_loads(tmp_path):
    m = hf_model("llama", False)
    m.save_pretrained(tmp_path / "one")
    m.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    a = ab.Llama.from_pretrained(tmp_path / "one")
    b = ab.Llama.from_pretrained(tmp_path / "sharded")
    assert np.array_equal(a.flat_params, b.flat_params)


def test_greedy_decode_equals_hf_generate(tmp_path):
    import_hf()   # skip/fail first: torch is part of the hf oracle
    import torch
    for kind, tied in (("llama", False), ("qwen3", True)):
        m = hf_model(kind, tied)
        d = tmp_path / kind
        m.save_pretrained(d)
        ours = ab.Llama.from_pretrained(d)
        prompt = [3, 14, 15, 9]
        with torch.no_grad():
            want = m.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                              pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
        dec = ours.decoder()
        got, tok = [], None
        for pos, t in enumerate(prompt):
            logits = dec.step(t, pos)
        for pos in range(len(prompt), len(prompt) + 32):
            tok = int(np.argmax(logits))
            got.append(tok)
            logits = dec.step(tok, pos)
        assert got == want, kind


# ---- malformed inputs: CheckpointError naming the file and the reason ----
def _corrupt(tmp_path, edit_config=None, edit_tensors=None, truncate=None):
    from safetensors.numpy import load_file, save_file
    m = hf_model("qwen3", True)
    m.save_pretrained(tmp_path)
    if edit_config:
        cpath = tmp_path / "config.json"
        d = json.loads(cpath.read_text())
        edit_config(d)
        cpath.write_text(json.dumps(d))
    if edit_tensors:
        w = tmp_path / "model.safetensors"
        t = load_file(w)
        edit_tensors(t)
        save_file(t, w, metadata={"format": "pt"})
    if truncate:
        w = tmp_path / "model.safetensors"
        data = w.read_bytes()
        w.write_bytes(data[:truncate(len(data))])


@pytest.mark.parametrize("what,kw,words", [
    ("model_type", dict(edit_config=lambda d: d.update(model_type="mistral")), "model_type 'mistral'"),
    ("attention_bias", dict(edit_config=lambda d: d.update(attention_bias=True)), "attention_bias"),
    ("sliding window", dict(edit_config=lambda d: d.update(use_sliding_window=True)), "use_sliding_window"),
    ("sliding layers", dict(edit_config=lambda d: d.update(layer_types=["sliding_attention"] * 2)),
     "layer_types"),
    ("dropout", dict(edit_config=lambda d: d.update(attention_dropout=0.1)), "attention_dropout"),
    ("activation", dict(edit_config=lambda d: d.update(hidden_act="gelu")), "hidden_act"),
    ("partial rotary", dict(edit_config=lambda d: d.update(partial_rotary_factor=0.5)),
     "partial_rotary_factor"),
    ("rope type", dict(edit_config=lambda d: d.update(rope_parameters={"rope_type": "yarn", "factor": 2.0,
                                                                        "rope_theta": 1e4})), "yarn"),
    ("missing field", dict(edit_config=lambda d: d.pop("hidden_size")), "hidden_size"),
    ("missing tensor", dict(edit_tensors=lambda t: t.pop("model.layers.1.self_attn.k_norm.weight")),
     "missing tensors model.layers.1.self_attn.k_norm.weight"),
    ("extra tensor", dict(edit_tensors=lambda t: t.update({"model.layers.0.self_attn.q_proj.bias":
                                                          np.zeros(64, np.float32)})),
     "unexpected tensors model.layers.0.self_attn.q_proj.bias"),
    ("misshaped", dict(edit_tensors=lambda t: t.update({"model.norm.weight": np.ones(47, np.float32)})),
     r"model.norm.weight has shape \[47\]"),
    ("truncated", dict(truncate=lambda n: n - 100), "truncated"),
    ("truncated header", dict(truncate=lambda n: 20), "safetensors"),
])
def test_malformed_directories_raise_checkpoint_error(tmp_path, what, kw, words):
    import_hf()          # the directories are written with transformers + safetensors
    _corrupt(tmp_path, **kw)
    with pytest.raises(CheckpointError, match=words) as e:
        ab.Llama.from_pretrained(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_missing_directory_and_weights(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        ab.Llama.from_pretrained(tmp_path / "nothing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="missing config field"):
        ab.Llama.from_pretrained(tmp_path)


def test_presets_have_the_hf_shapes():
    q = ab.Llama(ab.LlamaConfig.preset("qwen3-0.6b", n_layers=1, vocab_size=1000), init=False)
    assert q.params["layers.0.attention.wq.weight"].shape == (2048, 1024)
    assert q.params["layers.0.attention.wo.weight"].shape == (1024, 2048)
    assert q.params["layers.0.attention.q_norm.weight"].shape == (128,)
    # the q/k norms are in the no-decay tail
    assert q.layout["q_norm"] >= q.n_decay and q.layout["k_norm"] >= q.n_decay
    full = ab.LlamaConfig.preset("qwen3-0.6b")
    n = ab.Llama(full.replace(n_layers=1), init=False).n_params
    per_layer = n - 151936 * 1024 - 1024
    assert 151936 * 1024 + 28 * per_layer + 1024 == 596049920   # Qwen3-0.6B's parameter count
    assert ab.LlamaConfig.preset("llama3.2-1b").rope_scaling["factor"] == 32.0
    assert ab.LlamaConfig.preset("smollm2-135m").n_kv_heads == 3


def test_llama2c_save_converts_half_layout_and_refuses_the_rest(tmp_path):
    transformers = import_hf()   # skip/fail first: torch is part of the hf oracle
    import torch
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                                   max_position_embeddings=32, rope_theta=10000.0,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    ours = ab.Llama.from_pretrained(tmp_path / "hf")
    ours.save(tmp_path / "m.bin")
    back = ab.Llama.load(tmp_path / "m.bin")
    assert back.config.rope_layout == "interleaved"
    tok = np.arange(20, dtype=np.int32) % 50
    assert_close(back.logits(tok), ours.logits(tok), rtol=1e-5, atol=1e-6, what="v0 round trip")
    q = hf_model("qwen3", True)
    q.save_pretrained(tmp_path / "q")
    with pytest.raises(CheckpointError, match="v0 format cannot hold"):
        ab.Llama.from_pretrained(tmp_path / "q").save(tmp_path / "q.bin")
    assert not os.path.exists(tmp_path / "q.bin")


# ---- the CLI: train --init-from, --format, --recompute; sample ----
TEXT = "\n\n".join(f"Once upon a time there was a little {w} who liked to {v} in the park."
                   for w in ("cat", "dog", "bird", "girl", "boy", "fox") for v in ("run", "play", "sing", "jump"))


def hf_dir_with_tokenizer(tmp_path):
    """A tiny Qwen3 directory with a tokenizer.json trained here."""
    import_hf()
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=90, special_tokens=["<unk>", "<eos>"]))
    m = hf_model("qwen3", True)
    d = tmp_path / "qwen"
    m.config.eos_token_id = 1
    m.save_pretrained(d)
    tok.save(str(d / "tokenizer.json"))
    (tmp_path / "data.txt").write_text(TEXT)
    return d, m


def _train(argv):
    from anebackward.__main__ import main
    return main(["train", "--quiet", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0",
                 "--warmup", "1", "--lr", "1e-3"] + argv)


def _losses(out):
    return [json.loads(l)["loss"] for l in open(os.path.join(out, "log.jsonl")) if '"loss"' in l]


def test_train_init_from_hf_dir_writes_hf_that_transformers_and_sample_read(tmp_path, capsys):
    transformers = import_hf()   # skip/fail first: torch is part of the hf oracle
    import torch
    d, m = hf_dir_with_tokenizer(tmp_path)
    out = tmp_path / "ft"
    assert _train(["--init-from", str(d), "--data", str(tmp_path / "data.txt"), "--steps", "4",
                   "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "optimizer.bin"} <= set(os.listdir(out))
    assert not os.path.exists(out / "model.bin")
    ours = ab.Llama.from_pretrained(out)
    assert not np.array_equal(ours.flat_params, ab.Llama.from_pretrained(d).flat_params)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = np.arange(1, 20, dtype=np.int32)[None]
    with torch.no_grad():
        want = back(input_ids=torch.from_numpy(tok.astype(np.int64))).logits.numpy()
    assert_close(ours.logits(tok), want, rtol=1e-5, atol=1e-5, what="fine-tuned model in HF")
    # --recompute: the same run, the same losses
    out2 = tmp_path / "ft2"
    assert _train(["--init-from", str(d), "--data", str(tmp_path / "data.txt"), "--steps", "4",
                   "--out", str(out2), "--recompute"]) == 0
    assert _losses(out) == _losses(out2)
    # resume an hf-format run, then sample it
    from anebackward.__main__ import main
    assert main(["train", "--quiet", "--resume", str(out), "--steps", "5"]) == 0
    assert len(_losses(out)) == 5
    capsys.readouterr()
    assert main(["sample", str(out), "--prompt", "Once upon", "--steps", "12",
                 "--temperature", "0"]) == 0
    assert len(capsys.readouterr().out.strip()) > 0


def test_train_init_from_llama2c_bin_and_format_hf(tmp_path, capsys):
    import_hf()
    from anebackward.__main__ import main
    base = tmp_path / "base"
    assert main(["train", "--quiet", "--config", "tiny", "--steps", "2", "--eval-every", "0",
                 "--out", str(base)]) == 0
    out = tmp_path / "ft"
    assert _train(["--init-from", str(base / "model.bin"), "--steps", "2", "--out", str(out)]) == 0
    assert os.path.isfile(out / "model.bin") and os.path.isfile(out / "tokenizer.bin")
    out_hf = tmp_path / "ft_hf"
    assert _train(["--init-from", str(base / "model.bin"), "--steps", "2", "--out", str(out_hf),
                   "--format", "hf"]) == 0
    a, b = ab.Llama.load(out / "model.bin"), ab.Llama.from_pretrained(out_hf)
    tok = np.arange(3, 40, dtype=np.int32)
    assert_close(b.logits(tok), a.logits(tok), rtol=1e-5, atol=1e-5, what="same run, two formats")
    capsys.readouterr()
    assert main(["sample", str(out / "model.bin"), "--steps", "8", "--temperature", "0"]) == 0


def test_decode_threads_and_model_threads_deterministic(tmp_path):
    m = hf_model("qwen3", False)
    m.save_pretrained(tmp_path)
    model = ab.Llama.from_pretrained(tmp_path)
    tok = tokens_for(m, B=2, S=40)

    def step(setting):
        loss = model.forward(tok)
        model.backward()
        return loss, model.flat_grads.copy()
    assert_bit_identical_at_threads(step, ((1,), (2,), (3,), (4,)))


@pytest.mark.parametrize("tied", [True, False])
def test_hf_switches_native_paths_agree_without_torch(tied):
    """Fast vs reference kernels, recompute on/off, KV-cache decode vs full
    forward, for a model using every switch (head_dim 12 with dim 32, q/k
    norms, rotate-half, Llama-3 scaling): no torch, so it also runs under the
    sanitizer build."""
    rng = np.random.default_rng(0)
    cfg = ab.LlamaConfig(dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12,
                         vocab_size=41, max_seq_len=24, shared_classifier=tied, qk_norm=True,
                         rope_theta=5e5, rope_layout="half", rope_scaling=LLAMA3, norm_eps=1e-6)
    fast, ref = ab.Llama(cfg, seed=1), ab.Llama(cfg, seed=1, backend="reference")
    rec = ab.Llama(cfg, seed=1, recompute=True)
    spread = (1 + 0.3 * rng.standard_normal(fast.n_params - fast.n_decay)).astype(np.float32)
    for m in (fast, ref, rec):
        m.flat_params[m.n_decay:] = spread
    tokens = rng.integers(0, 41, size=(2, 20))
    losses = [m.forward(tokens) for m in (fast, ref, rec)]
    for m in (fast, ref, rec):
        m.backward()
    assert abs(losses[0] - losses[1]) < 1e-5 and losses[0] == losses[2]
    np.testing.assert_allclose(fast.flat_grads, ref.flat_grads, rtol=1e-3, atol=1e-6)
    assert np.array_equal(fast.flat_grads, rec.flat_grads)
    assert np.abs(fast.grads["layers.1.attention.q_norm.weight"]).max() > 0
    full = fast.logits(tokens[0])
    for m in (fast, ref):
        dec = m.decoder(max_positions=20)
        for pos, t in enumerate(tokens[0]):
            np.testing.assert_allclose(dec.step(int(t)), full[pos], rtol=1e-4,
                                       atol=1e-4 * np.abs(full[pos]).max())
