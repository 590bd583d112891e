"""The Hugging Face round trip as a new user walks it: train from an HF
directory (with or without a tokenizer), run the `sample it:` command the
trainer prints, load the output in transformers (model and tokenizer), and
sample with tokenizers with and without BOS."""
import io
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

import anebackward as ab
from anebackward import hf
from anebackward.__main__ import main
from anebackward.sample import generate
from anebackward.tokenizer import Tokenizer
from conftest import import_hf, import_safetensors
from oracle import assert_close

TEXT = "\n\n".join(f"Once upon a time there was a little {w} who liked to {v} in the park."
                   for w in ("cat", "dog", "bird", "girl", "boy", "fox")
                   for v in ("run", "play", "sing", "jump"))
# text the byte-level tokenizer.json must encode exactly like Tokenizer.encode
# (any text without its special tokens' spellings <unk> <s> </s>, which HF
# tokenizers match as the special tokens themselves)
TEXTS = ["Once upon a time", "", " leading space", "two  spaces\tand a tab\nnewline",
         "caf\u00e9 na\u00efve \u2603 \U0001f600", "<p> looks like markup <s", "\x7f\x01 control"]


def small_qwen3(vocab_size=300):
    return ab.LlamaConfig.preset("qwen3-0.6b", n_layers=2, dim=64, hidden_dim=128, n_heads=4,
                                 n_kv_heads=2, head_dim=32, vocab_size=vocab_size)


def train_printing(argv, capsys):
    """Run `anebackward train` with argv; return its exit code and the
    command it printed after "sample it:"."""
    capsys.readouterr()
    rc = main(["train", "--no-progress", "--batch-size", "2", "--seq-len", "16",
               "--eval-every", "0", "--warmup", "1", "--lr", "1e-3"] + argv)
    out = capsys.readouterr().out
    lines = [l.split("sample it:", 1)[1].strip() for l in out.splitlines() if "sample it:" in l]
    return rc, (lines[0] if lines else None)


def run_printed(command, capsys):
    """The printed command, run as printed (its words through main)."""
    words = shlex.split(command)
    assert words[0] == "anebackward"
    capsys.readouterr()
    rc = main(words[1:] + ["--max-tokens", "16"])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def bpe_tokenizer_json(path, bos):
    """A byte-level BPE tokenizer.json (GPT-2 style, decodes exactly) trained
    on TEXT; with bos, its post-processor adds <|bos|> (id 1) to every text."""
    from tokenizers import Tokenizer as T, decoders, models, pre_tokenizers, processors, trainers
    tok = T(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=290, special_tokens=["<|eos|>", "<|bos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A",
                                                           special_tokens=[("<|bos|>", 1)])
    tok.save(str(path))
    return tok


def hf_dir(tmp_path, name, bos, config_ids=None):
    """A small Qwen3 directory (random weights) with a byte-level BPE
    tokenizer.json; config_ids: bos/eos ids written into config.json."""
    import_safetensors()
    d = tmp_path / name
    ab.Llama(small_qwen3(), seed=0).save_pretrained(d, tokenizer=False)
    bpe_tokenizer_json(d / "tokenizer.json", bos)
    if config_ids:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(config_ids)
        (d / "config.json").write_text(json.dumps(cfg))
    return d


# ---- the trainer's printed command ----------------------------------------------------------
def test_printed_sample_command_works_after_init_from_an_hf_dir_without_tokenizer(tmp_path,
                                                                                  capsys):
    """An HF directory with no tokenizer trains with the byte-level one; the
    run's directory holds it as tokenizer.bin and as an equivalent
    tokenizer.json, so the printed command, transformers' AutoTokenizer and
    AutoModelForCausalLM all read it."""
    transformers = import_hf()
    import torch
    src = tmp_path / "qwen-small"
    ab.Llama(small_qwen3(), seed=0).save_pretrained(src)
    assert not (src / "tokenizer.json").exists()
    (tmp_path / "data.txt").write_text(TEXT)
    out = tmp_path / "runs" / "qwen"
    rc, cmd = train_printing(["--init-from", str(src), "--data", str(tmp_path / "data.txt"),
                              "--steps", "3", "--out", str(out)], capsys)
    assert rc == 0 and cmd is not None
    assert {"config.json", "model.safetensors", "tokenizer.bin", "tokenizer.json",
            "tokenizer_config.json"} <= set(os.listdir(out))
    rc, text, err = run_printed(cmd, capsys)
    assert rc == 0, err
    assert text.startswith("Once upon")
    # transformers reads the directory whole: its tokenizer gives run.c's ids
    auto = transformers.AutoTokenizer.from_pretrained(out)
    bl = Tokenizer.byte_level()
    for t in TEXTS:
        ids = auto(t)["input_ids"]
        assert ids == bl.encode(t), t
        assert auto.decode(ids, skip_special_tokens=True) == t
    assert auto.bos_token_id == 1 and auto.eos_token_id == 1   # llama2.c: BOS ends documents
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = bl.encode("Once upon a time")
    with torch.no_grad():
        want = back(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert_close(ab.Llama.from_pretrained(out).logits(np.array(ids, np.int32)), want,
                 rtol=1e-5, atol=1e-5, what="the run's model in transformers")
    # --resume continues with the tokenizer it trained with (tokenizer.bin)
    capsys.readouterr()
    assert main(["train", "--no-progress", "--resume", str(out), "--steps", "4"]) == 0


@pytest.mark.parametrize("fmt", ["llama2c", "hf"])
def test_printed_sample_command_works_for_a_new_run_in_each_format(tmp_path, capsys, fmt):
    if fmt == "hf":
        import_safetensors()
    out = tmp_path / "a run dir"       # a space: the printed path must be quoted
    rc, cmd = train_printing(["--config", "tiny", "--steps", "2", "--format", fmt,
                              "--out", str(out)], capsys)
    assert rc == 0 and cmd is not None
    rc, text, err = run_printed(cmd, capsys)
    assert rc == 0, err
    assert text.startswith("Once upon")


def test_printed_sample_command_runs_as_a_shell_command(tmp_path, capsys):
    """The printed line itself, through a shell (python -m anebackward for
    the console script, which may not be on PATH in a test run)."""
    import_safetensors()
    out = tmp_path / "it's here"
    rc, cmd = train_printing(["--config", "tiny", "--steps", "1", "--format", "hf",
                              "--out", str(out)], capsys)
    assert rc == 0
    shell = cmd.replace("anebackward", f"{shlex.quote(sys.executable)} -m anebackward", 1)
    r = subprocess.run(shell + " --max-tokens 16", shell=True, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon")


def test_hf_run_writes_every_tokenizer_file_of_its_input(tmp_path, capsys):
    """The output of a run from an HF directory is an HF directory: the
    input's tokenizer files byte for byte, its token ids in config.json;
    transformers loads model and tokenizer, and the printed command samples
    it (--lora --merge: the merged directory too)."""
    transformers = import_hf()
    src = hf_dir(tmp_path, "base", bos=False, config_ids={"eos_token_id": 0})
    extra = {"tokenizer_config.json": json.dumps({
                 "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|eos|>",
                 "model_max_length": 64}),
             "special_tokens_map.json": json.dumps({"eos_token": "<|eos|>"}),
             "generation_config.json": json.dumps({"eos_token_id": 0, "max_new_tokens": 5})}
    for name, text in extra.items():
        (src / name).write_text(text)
    (tmp_path / "data.txt").write_text(TEXT)
    for argv, where in ((["--out", str(tmp_path / "ft")], "ft"),
                        (["--out", str(tmp_path / "lora"), "--lora", "2", "--merge"],
                         os.path.join("lora", "merged"))):
        rc, cmd = train_printing(["--init-from", str(src), "--data", str(tmp_path / "data.txt"),
                                  "--steps", "2"] + argv, capsys)
        assert rc == 0
        out = tmp_path / where
        for name in ["tokenizer.json"] + list(extra):
            assert (out / name).read_bytes() == (src / name).read_bytes(), name
        assert json.loads((out / "config.json").read_text())["eos_token_id"] == 0
        auto, want = (transformers.AutoTokenizer.from_pretrained(d) for d in (out, src))
        for t in TEXTS[:5]:
            ids = auto(t)["input_ids"]
            assert ids == want(t)["input_ids"] and auto.decode(ids) == t
        transformers.AutoModelForCausalLM.from_pretrained(out)
        assert os.path.join(str(tmp_path), where) in cmd
        rc, text, err = run_printed(cmd, capsys)
        assert rc == 0, err
        assert text.startswith("Once upon")


# ---- sample: BOS or none, the prompt kept whole -----------------------------------------------
@pytest.mark.parametrize("bos", [False, True])
def test_generate_keeps_the_whole_prompt_with_and_without_bos(tmp_path, bos):
    """Without BOS the prompt's first token is position 0 and is returned;
    with BOS it is position 1. The first generated token is the argmax of
    the model's logits over that sequence (an independent forward)."""
    import_safetensors()
    d = hf_dir(tmp_path, "m", bos=bos)
    model = ab.Llama.from_pretrained(d)
    tok = hf.HFTokenizer.from_dir(d)
    assert tok.bos_id is None       # config.json names none: the sequence is what encode gives
    from tokenizers import Tokenizer as T
    prompt_ids = T.from_file(str(d / "tokenizer.json")).encode("Once upon", add_special_tokens=False).ids
    seq = ([1] if bos else []) + prompt_ids
    got = generate(model, tok, "Once upon", steps=len(seq) + 3, temperature=0.0)
    assert got[:len(seq)] == seq
    want = int(np.argmax(model.logits(np.array(seq, np.int32))[-1]))
    assert got[len(seq)] == want
    assert tok.decode(got).startswith("Once upon")


def test_sample_without_bos_prints_the_prompt_whole(tmp_path, capsys):
    import_safetensors()
    d = hf_dir(tmp_path, "m", bos=False)
    capsys.readouterr()
    assert main(["sample", str(d), "--prompt", "Once upon", "--max-tokens", "8",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("Once upon")


def test_empty_prompt_without_bos_is_a_clear_error(tmp_path, capsys):
    import_safetensors()
    d = hf_dir(tmp_path, "m", bos=False)
    capsys.readouterr()
    assert main(["sample", str(d), "--prompt", "", "--max-tokens", "8"]) == 1
    err = capsys.readouterr().err
    assert "no BOS" in err and "--prompt" in err
    with pytest.raises(ValueError, match="no BOS"):
        generate(ab.Llama.from_pretrained(d), hf.HFTokenizer.from_dir(d), "", steps=4)


@pytest.mark.parametrize("config_ids", [{"bos_token_id": 1}, {"eos_token_id": 0}])
def test_empty_prompt_starts_from_the_config_bos_or_eos(tmp_path, capsys, config_ids):
    """config.json's bos_token_id starts the sequence, else its eos_token_id
    (Qwen3 has no BOS); an empty prompt then samples from it."""
    import_safetensors()
    d = hf_dir(tmp_path, "m", bos=False, config_ids=config_ids)
    start = next(iter(config_ids.values()))
    model, tok = ab.Llama.from_pretrained(d), hf.HFTokenizer.from_dir(d)
    got = generate(model, tok, "", steps=1, temperature=0.0)
    want = int(np.argmax(model.logits(np.array([start], np.int32))[-1]))
    assert got == ([] if want in tok.stop_ids else [want])
    capsys.readouterr()
    assert main(["sample", str(d), "--prompt", "", "--max-tokens", "6", "--temperature",
                 "0"]) == 0


def test_empty_prompt_llama2c_starts_from_bos(tmp_path, capsys):
    out = tmp_path / "run"
    rc, _ = train_printing(["--config", "tiny", "--steps", "1", "--out", str(out)], capsys)
    assert rc == 0
    model = ab.Llama.load(out / "model.bin")
    tok = Tokenizer.load(out / "tokenizer.bin", vocab_size=model.config.vocab_size)
    got = generate(model, tok, "", steps=1, temperature=0.0)
    want = int(np.argmax(model.logits(np.array([1], np.int32))[-1]))
    assert got == ([] if want == 1 else [want])
    # the command line (its output is whatever bytes the model makes: read as bytes)
    r = subprocess.run([sys.executable, "-m", "anebackward", "sample", str(out / "model.bin"),
                        "--prompt", "", "--max-tokens", "6"], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_sample_help_describes_both_checkpoint_kinds(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("llama2.c", "Hugging Face", "tokenizer.json", "tokenizer.bin", "BOS"):
        assert words in text, words


# ---- save_pretrained's tokenizer ---------------------------------------------------------------
def test_save_pretrained_writes_the_tokenizer_it_was_loaded_with(tmp_path):
    import_safetensors()
    src = hf_dir(tmp_path, "src", bos=True, config_ids={"bos_token_id": 1, "eos_token_id": 0})
    (src / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    model = ab.Llama.from_pretrained(src)
    model.save_pretrained(tmp_path / "a")                     # carried from from_pretrained
    model.save_pretrained(tmp_path / "b", tokenizer=src)      # an HF directory
    model.save_pretrained(tmp_path / "c", tokenizer=hf.HFTokenizer.from_dir(src))
    for d in "abc":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (tmp_path / d / name).read_bytes() == (src / name).read_bytes()
        cfg = json.loads((tmp_path / d / "config.json").read_text())
        assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 0)
    model.save_pretrained(tmp_path / "none", tokenizer=False)
    assert sorted(os.listdir(tmp_path / "none")) == ["config.json", "model.safetensors"]
    assert "eos_token_id" not in json.loads((tmp_path / "none" / "config.json").read_text())
    with pytest.raises(ValueError, match="no tokenizer file"):
        model.save_pretrained(tmp_path / "x", tokenizer=tmp_path / "none")
    with pytest.raises(TypeError, match="tokenizer must be"):
        model.save_pretrained(tmp_path / "x", tokenizer=42)


def test_byte_level_tokenizer_json_encodes_like_run_c(tmp_path):
    """save_pretrained(tokenizer=Tokenizer.byte_level()): tokenizer.bin
    (padded to the model's vocabulary) and a tokenizer.json whose ids are
    Tokenizer.encode's for any text (byte fallback, dummy prefix, BOS)."""
    import_safetensors()
    from tokenizers import Tokenizer as T
    model = ab.Llama(small_qwen3(), seed=0)
    model.save_pretrained(tmp_path, tokenizer=Tokenizer.byte_level())
    bl = Tokenizer.byte_level()
    assert Tokenizer.load(tmp_path / "tokenizer.bin").pieces == bl.padded(300).pieces
    t = T.from_file(str(tmp_path / "tokenizer.json"))
    rng = np.random.default_rng(0)
    texts = TEXTS + ["".join(chr(int(c)) for c in rng.integers(1, 0x3000, 40))
                     for _ in range(20)]
    for text in texts:
        assert t.encode(text).ids == bl.encode(text), repr(text)
        assert t.decode(bl.encode(text), skip_special_tokens=True) == text
    assert t.get_vocab_size() == 300


def test_printed_resume_command_of_a_diverged_run_works(tmp_path, monkeypatch, capsys):
    """A diverged run prints the --resume command of its last good save;
    run as printed (a path with a space: quoted), it continues the run."""
    from anebackward.model import Llama
    out = tmp_path / "my run"
    real, calls = Llama.forward, []

    def forward(self, *a, **k):
        calls.append(1)
        loss = real(self, *a, **k)
        return float("nan") if len(calls) > 3 and k.get("want_grad", True) else loss
    monkeypatch.setattr(Llama, "forward", forward)
    capsys.readouterr()
    assert main(["train", "--no-progress", "--config", "tiny", "--steps", "6", "--eval-every",
                 "0", "--save-every", "2", "--out", str(out)]) == 1
    msg = capsys.readouterr().out
    monkeypatch.undo()
    start = msg.index("anebackward train --resume")
    words = shlex.split(msg[start:].split(", or start again")[0])
    assert words[:3] == ["anebackward", "train", "--resume"] and words[3] == str(out)
    assert main(words[1:] + ["--no-progress"]) == 0
    assert sum('"loss"' in line for line in open(out / "log.jsonl")) == 6
