"""`anebackward train --data x.jsonl [--pack]`: instruction data through the
trainer. The first step's loss is checked against PyTorch float64 over
exactly the completion tokens (and the EOS) of the drawn documents, pooled
over the step's micro-batches, and on an HF directory against unpatched
transformers with the prompt labels -100; packed and padded runs that see
the same documents agree; a resumed run equals an uninterrupted one to the
bit; bad input is refused naming the file and line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from anebackward import Llama, LlamaConfig
from anebackward.__main__ import main
from anebackward.data.instructions import InstructionData, encode_pair
from anebackward.tokenizer import Tokenizer
from conftest import import_hf
from test_train import run_train

NAMES = ["Tom", "Lily", "Sam", "Mia", "Ben", "Sue", "Max", "Ann"]
THINGS = ["a red ball", "a small dog", "a big tree", "a blue car", "a pink box", "the moon"]


def qa_pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        who, what = NAMES[rng.integers(len(NAMES))], THINGS[rng.integers(len(THINGS))]
        out.append((f"Q{i % 7}: What did {who} see?\nA:", f" {who} saw {what}."))
    return out


def write_jsonl(path, pairs):
    with open(path, "w") as f:
        for p, c in pairs:
            f.write(json.dumps({"prompt": p, "completion": c}) + "\n")
    return str(path)


def log_of(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    steps = [{k: r[k] for k in ("step", "loss", "lr", "grad_norm")} for r in recs if "loss" in r]
    return steps, {r["step"]: r["val_loss"] for r in recs if "val_loss" in r}


TINY = ["--config", "tiny", "--seq-len", "64", "--warmup", "2", "--lr", "3e-3", "--quiet"]


def test_instruction_run_reduces_the_loss_and_logs_validation(tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_pairs(60))
    out = str(tmp_path / "run")
    res = run_train(TINY + ["--data", data, "--steps", "40", "--batch-size", "4",
                            "--eval-every", "20", "--out", out])
    steps, val = log_of(out)
    assert res["status"] == "ok" and len(steps) == 40 and len(val) == 2
    losses = [s["loss"] for s in steps]
    assert np.mean(losses[-5:]) < losses[0] - 1.0
    assert val[39] < val[19]
    assert Llama.load(os.path.join(out, "model.bin")).config.vocab_size == 259


# ---- the first step against PyTorch float64 ----
def _byte_doc(prompt, completion):
    """The byte-level tokenizer's document, written out here: BOS, the
    dummy-prefix space once, the bytes + 3, EOS; and the number of prompt
    tokens (BOS, the space, the prompt's bytes)."""
    body = [b + 3 for b in (prompt + completion).encode()]
    return np.array([1, 3 + 32] + body + [2]), 2 + len(prompt.encode())


def _stream(n, key, seed):
    """The documented draw: indices one at a time from default_rng([seed, key])."""
    rng = np.random.default_rng([seed, key])
    while True:
        yield int(rng.integers(0, n))


def _oracle(torch, model, docs):
    """Sum of the float64 cross-entropy over the counted targets of each
    document run alone (positions 0..), and the count; with all=True every
    prediction counts (what a prompt mask that leaked would give)."""
    from test_model import torch_model
    ref = torch_model(torch, model.config, model.params)
    sums = {"completion": 0.0, "all": 0.0}
    counts = {"completion": 0, "all": 0}
    for tok, n_prompt in docs:
        for kind in sums:
            tgt = np.full(tok.size, -1)
            lo = n_prompt - 1 if kind == "completion" else 0
            tgt[lo:-1] = tok[lo + 1:]
            with torch.no_grad():
                ref(torch.tensor(tok[None]), torch.tensor(tgt[None]))
            n = int((tgt >= 0).sum())
            sums[kind] += ref.last_loss.item() * n
            counts[kind] += n
    return sums, counts


@pytest.mark.parametrize("accum", [1, 3])
def test_first_step_loss_is_float64_over_the_completion_tokens(tmp_path, torch, accum):
    from test_model import randomize
    cfg = LlamaConfig(dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=259,
                      max_seq_len=64)
    model = Llama(cfg, seed=1)
    randomize(model, np.random.default_rng(5), norm_spread=0.2)
    model.save(tmp_path / "start.bin")     # no tokenizer.bin beside it: byte-level
    pairs = qa_pairs(30)
    data = write_jsonl(tmp_path / "qa.jsonl", pairs)
    B, seed = 3, 4
    res = run_train(["--init-from", str(tmp_path / "start.bin"), "--data", data, "--steps", "1",
                     "--batch-size", str(B), "--grad-accum", str(accum), "--seed", str(seed),
                     "--seq-len", "64", "--eval-every", "0", "--quiet",
                     "--out", str(tmp_path / "run")])
    train_pairs = [p for i, p in enumerate(pairs) if i % 20 != 19]   # every 20th held out
    drawn, per_micro = [], []
    for micro in range(accum):
        s = _stream(len(train_pairs), micro, seed)
        docs = [_byte_doc(*train_pairs[next(s)]) for _ in range(B)]
        drawn += docs
        sums, counts = _oracle(torch, model, docs)
        per_micro.append(sums["completion"] / counts["completion"])
    sums, counts = _oracle(torch, model, drawn)
    want = sums["completion"] / counts["completion"]
    assert res["first_loss"] == pytest.approx(want, rel=2e-6)
    # the test can fail: a prompt token counted, or each micro-batch's own mean
    # averaged, would be off by far more than the tolerance
    assert abs(sums["all"] / counts["all"] - want) > 1e-3 * want
    if accum > 1:
        assert abs(np.mean(per_micro) - want) > 1e-4 * want


def test_first_step_on_an_hf_directory_equals_hf_with_prompt_labels_ignored(tmp_path):
    """The HF path end to end: tokenizer.json documents (BOS = config's EOS
    for this Qwen3, EOS appended), prompt labels -100, right padding: the
    first step's loss is unpatched transformers' over the same batch."""
    transformers = import_hf()
    import torch
    from tokenizers import Tokenizer as HFTok
    from test_hf import hf_dir_with_tokenizer
    d, _ = hf_dir_with_tokenizer(tmp_path)
    pairs = [(f"Once upon a time there was a little {w}", f" who liked to {v} in the park.")
             for w in ("cat", "dog", "bird", "girl") for v in ("run", "play", "sing", "jump")]
    data = write_jsonl(tmp_path / "sft.jsonl", pairs)
    B, seed = 3, 2
    res = run_train(["--init-from", str(d), "--data", data, "--steps", "1", "--batch-size",
                     str(B), "--seed", str(seed), "--seq-len", "32", "--eval-every", "0",
                     "--quiet", "--out", str(tmp_path / "run")])
    raw = HFTok.from_file(str(d / "tokenizer.json"))
    eos = 1     # config.json's eos_token_id, also the BOS (no bos_token_id)
    s = _stream(len(pairs), 0, seed)    # fewer than 20 documents: none held out
    rows = []
    for p, c in (pairs[next(s)] for _ in range(B)):
        ids = [eos] + raw.encode(p + c).ids + [eos]
        n_prompt = 1 + len(raw.encode(p).ids)    # the boundary is a space: no merge across
        rows.append((ids, [-100] * n_prompt + ids[n_prompt:]))
    S = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r[0] + [0] * (S - len(r[0])) for r in rows])
    labels = torch.tensor([r[1] + [-100] * (S - len(r[1])) for r in rows])
    mask = torch.tensor([[1] * len(r[0]) + [0] * (S - len(r[0])) for r in rows])
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    assert res["first_loss"] == pytest.approx(want, rel=1e-5)


def test_validation_loss_is_float64_over_the_held_out_completions(tmp_path, torch):
    pairs = qa_pairs(45, seed=3)
    data = write_jsonl(tmp_path / "qa.jsonl", pairs)
    out = str(tmp_path / "run")
    res = run_train(TINY + ["--data", data, "--steps", "2", "--batch-size", "3", "--out", out])
    model = Llama.load(os.path.join(out, "model.bin"))   # the weights evaluated at the end
    held = [_byte_doc(*pairs[i]) for i in (19, 39)]       # every 20th document
    sums, counts = _oracle(torch, model, held)
    assert res["val_loss"] == pytest.approx(sums["completion"] / counts["completion"], rel=2e-6)


def test_packed_and_padded_runs_agree_when_they_see_the_same_documents(tmp_path):
    # every document has 22..32 tokens: a packed row of 64 holds two of them,
    # so --pack --batch-size 2 takes the first four documents drawn, the ones
    # a padded --batch-size 4 takes
    pairs = [(f"Q{i}: hi {i % 5}?\n", f"A: yes {i % 3}.") for i in range(24)]
    lens = [encode_pair(Tokenizer.byte_level(), p, c)[0].size for p, c in pairs]
    assert min(lens) > 64 // 3 and max(lens) <= 64 // 2
    data = write_jsonl(tmp_path / "d.jsonl", pairs)
    common = TINY + ["--data", data, "--steps", "3", "--eval-every", "0"]
    packed, padded = str(tmp_path / "packed"), str(tmp_path / "padded")
    run_train(common + ["--pack", "--batch-size", "2", "--out", packed])
    run_train(common + ["--batch-size", "4", "--out", padded])
    assert log_of(packed)[0][0]["loss"] == log_of(padded)[0][0]["loss"]
    d = InstructionData(data, Tokenizer.byte_level(), 64, pack=True)
    b = d.batch(0, 2)
    assert b.n_seq == 4 and sorted(np.diff(b.cu_seqlens)) == sorted(
        np.diff(InstructionData(data, Tokenizer.byte_level(), 64).batch(0, 4).cu_seqlens))


def test_resume_equals_the_uninterrupted_run_bit_for_bit(tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_pairs(45))
    common = TINY + ["--data", data, "--pack", "--batch-size", "2", "--grad-accum", "2",
                     "--eval-every", "3", "--decay-steps", "8"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run_train(common + ["--steps", "8", "--out", full])
    run_train(common + ["--steps", "4", "--out", part])
    run_train(["--resume", part, "--steps", "8", "--quiet"])
    (steps_part, val_part), (steps_full, val_full) = log_of(part), log_of(full)
    assert steps_part == steps_full and len(steps_full) == 8
    # the same validation losses (the shorter run adds one at its own end, step 4)
    assert list(val_full) == [2, 5, 7] and {k: val_part[k] for k in val_full} == val_full
    with open(os.path.join(full, "model.bin"), "rb") as a, \
            open(os.path.join(part, "model.bin"), "rb") as b:
        assert a.read() == b.read()


@pytest.mark.parametrize("how", [["--lora", "4"], ["--pack"]])
def test_fine_tune_of_an_hf_directory_on_jsonl(tmp_path, how):
    from test_hf import hf_dir_with_tokenizer
    d, _ = hf_dir_with_tokenizer(tmp_path)
    pairs = [(f"Once upon a time there was a little {w}", f" who liked to {v} in the park.")
             for w in ("cat", "dog", "bird", "girl", "boy") for v in ("run", "play", "sing")]
    data = write_jsonl(tmp_path / "sft.jsonl", pairs)
    out = str(tmp_path / "lora")
    assert main(["train", "--quiet", "--init-from", str(d), "--data", data, *how,
                 "--steps", "12", "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2",
                 "--warmup", "1", "--eval-every", "0", "--out", out]) == 0
    written = {"adapter_config.json", "adapter_model.safetensors"} if "--lora" in how else \
        {"config.json", "model.safetensors", "tokenizer.json"}
    assert written <= set(os.listdir(out))
    losses = [s["loss"] for s in log_of(out)[0]]
    assert len(losses) == 12 and np.mean(losses[-3:]) < losses[0]


# ---- the tokenizer rule: one text, the completion after the prompt's tokens ----
def test_llama2c_tokenizer_adds_the_dummy_prefix_space_once():
    # byte pieces plus merges " y", " ye", " yes", "A:" (scores make them win)
    base = Tokenizer.byte_level()
    merges = [b" y", b" ye", b" yes", b"A:"]
    tok = Tokenizer(base.pieces + merges, base.scores + [1.0, 2.0, 3.0, 4.0])
    ids, n_prompt = encode_pair(tok, "Q: ok?\nA:", " yes")
    piece = {p: i for i, p in enumerate(tok.pieces)}
    assert ids.tolist() == tok.encode("Q: ok?\nA: yes", bos=True, eos=True)
    assert ids[n_prompt:].tolist() == [piece[b" yes"], 2]     # one space, then EOS
    # what encoding the completion alone would give: a second dummy-prefix space
    alone = tok.encode(" yes", bos=False, eos=True)
    assert alone[0] == piece[b" "] and alone != ids[n_prompt:].tolist()


def test_hf_tokenizer_json_completion_tokens_follow_the_prompt(tmp_path):
    import_hf()
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers
    from anebackward.hf import HFTokenizer
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁Q:": 3, "▁ok?": 4, "A:": 5, "▁yes": 6,
             "▁": 7, "\n": 8, "yes": 9}
    t = HFTok(models.WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=100))
    # sentencepiece-like: "▁" for spaces, prepended once to the text (Llama 2's conversion)
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        pre_tokenizers.Split("\n", "isolated")])
    t.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    t.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer(tmp_path / "tokenizer.json", bos_id=1, stop_ids=[2])
    ids, n_prompt = encode_pair(tok, "Q: ok?\nA:", " yes")
    assert ids.tolist() == [1, 3, 4, 8, 5, 6, 2] and n_prompt == 5
    assert tok.encode("Q: ok?\nA:", bos=True) == ids[:n_prompt].tolist()
    # a completion right after a newline: one text reads "yes"; encoded alone
    # it would get the pre-tokenizer's prefix space ("▁yes")
    ids, n_prompt = encode_pair(tok, "Q: ok?\n", "yes")
    assert ids[n_prompt:].tolist() == [9, 2] and tok.encode("yes", bos=False) == [6]


# ---- bad input ----
def test_bad_instruction_input_is_refused_clearly(tmp_path, capsys):
    base = ["train", "--quiet", "--config", "tiny", "--seq-len", "64", "--steps", "1",
            "--out", str(tmp_path / "out")]
    txt = tmp_path / "corpus.txt"
    txt.write_text("hello world\n\nanother document\n")
    for extra in ([], ["--data", str(txt)]):
        with pytest.raises(SystemExit, match=r"--pack packs instruction documents.*\.jsonl"):
            main(base + ["--pack"] + extra)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a" "completion": "b"}\n')
    assert main(base + ["--data", str(bad)]) == 1
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err
    bad.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "answer": "b"}\n')
    assert main(base + ["--data", str(bad)]) == 1
    assert f'{bad}:3: "completion" must be a string' in capsys.readouterr().err
    long = write_jsonl(tmp_path / "long.jsonl", [("x" * 80, "y" * 10)] * 3)
    assert main(base + ["--data", long]) == 1
    err = capsys.readouterr().err
    assert "no training document fits seq_len = 64" in err and "the shortest has 93" in err
    assert main(base + ["--data", str(tmp_path / "missing.jsonl")]) == 1
    assert "missing.jsonl: no such file or directory" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_documents_longer_than_seq_len_are_dropped_and_reported(tmp_path, capsys):
    pairs = qa_pairs(30) + [("z" * 70, "!")]
    data = write_jsonl(tmp_path / "qa.jsonl", pairs)
    d = InstructionData(data, Tokenizer.byte_level(), 64)
    assert d.n_dropped == 1 and d.longest == 74 and len(d.train) + len(d.val) == 30
    assert all(not (t == ord("z") + 3).any() for t, _ in d.train + d.val)
    assert main(["train", "--config", "tiny", "--seq-len", "64", "--steps", "1", "--data", data,
                 "--batch-size", "2", "--eval-every", "0", "--out", str(tmp_path / "o")]) == 0
    assert ("1 of the 31 documents of " + data + " have more than seq_len = 64 tokens "
            "(the longest 74) and are left out") in capsys.readouterr().out


@pytest.mark.slow   # torchrun, two processes
def test_two_ranks_match_one_process_with_twice_the_batch(tmp_path, torch):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_pairs(60))
    args = TINY + ["--data", data, "--pack", "--steps", "4", "--grad-accum", "2",
                   "--eval-every", "2", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    for cmd in ([sys.executable, "-m", "anebackward", "train", *args, "--batch-size", "4",
                 "--out", one],
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", "2", "-m", "anebackward", "train", *args,
                 "--batch-size", "2", "--out", two]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (s1, v1), (s2, v2) = log_of(one), log_of(two)
    assert len(s1) == len(s2) == 4 and len(v1) == len(v2) == 2
    np.testing.assert_allclose([s["loss"] for s in s2], [s["loss"] for s in s1], rtol=1e-5)
    assert list(v1) == list(v2) == [1, 3]
    np.testing.assert_allclose(list(v2.values()), list(v1.values()), rtol=1e-5)
