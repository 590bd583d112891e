"""The main job: `anebackward train` and `anebackward sample` (tiny settings)."""
import argparse
import io
import json
import os

import numpy as np
import pytest

from anebackward import Llama
from anebackward.__main__ import main
from anebackward.data import default_corpus, load_data
from anebackward.sample import generate
from anebackward.tokenizer import Tokenizer
from anebackward.train import add_arguments, train

TINY = ["--config", "tiny", "--batch-size", "4", "--seq-len", "32", "--eval-every", "0",
        "--quiet"]


def run_train(argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return train(p.parse_args(argv), stream=io.StringIO())


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [r["loss"] for r in recs if "loss" in r], [r for r in recs if "val_loss" in r]


def test_training_on_the_default_corpus_reduces_the_loss(tmp_path):
    out = str(tmp_path / "run")
    res = run_train(TINY + ["--steps", "40", "--lr", "3e-3", "--warmup", "5", "--out", out])
    train_losses, val = losses(out)
    assert len(train_losses) == 40
    assert train_losses[0] == pytest.approx(np.log(259), abs=0.1)     # uniform at init
    assert np.mean(train_losses[-5:]) < train_losses[0] - 1.5
    assert val and val[-1]["val_loss"] < train_losses[0] - 1.5
    for name in ("model.bin", "tokenizer.bin", "optimizer.bin", "log.jsonl"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    m = Llama.load(os.path.join(out, "model.bin"))
    np.testing.assert_array_equal(m.flat_params, res["model"].flat_params)
    assert Tokenizer.load(os.path.join(out, "tokenizer.bin")).vocab_size == m.config.vocab_size
    try:
        import matplotlib  # noqa: F401
        assert os.path.getsize(os.path.join(out, "loss.png")) > 1000
    except ImportError:
        assert not os.path.exists(os.path.join(out, "loss.png"))


def test_resume_continues_the_same_loss_curve(tmp_path):
    common = TINY + ["--lr", "3e-3", "--warmup", "3", "--decay-steps", "16"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run_train(common + ["--steps", "16", "--out", full])
    run_train(common + ["--steps", "8", "--out", part])
    run_train(["--resume", part, "--steps", "16", "--quiet"])
    a, _ = losses(full)
    b, _ = losses(part)
    assert len(a) == len(b) == 16
    np.testing.assert_allclose(b, a, rtol=1e-6)
    np.testing.assert_allclose(Llama.load(os.path.join(part, "model.bin")).flat_params,
                               Llama.load(os.path.join(full, "model.bin")).flat_params,
                               rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_and_text_data(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(default_corpus(200, seed=7)))
    out = str(tmp_path / "run")
    run_train(TINY + ["--data", str(text), "--steps", "3", "--grad-accum", "2", "--out", out])
    tl, _ = losses(out)
    assert len(tl) == 3 and all(np.isfinite(tl))


def test_llama2c_token_shards(tmp_path):
    tok = Tokenizer.byte_level()
    stream = tok.encode_documents(default_corpus(300, seed=3)).astype(np.uint16)
    shards = tmp_path / "shards"
    shards.mkdir()
    stream[: len(stream) // 4].tofile(shards / "data00.bin")     # validation shard
    stream[len(stream) // 4:].tofile(shards / "data01.bin")
    data = load_data(str(shards), tok)
    assert data.n_train_tokens == len(stream) - len(stream) // 4
    x, y = data.batch(3, 2, 16)
    assert x.dtype == np.int32 and x.shape == (2, 16)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    x2, _ = data.batch(3, 2, 16)
    np.testing.assert_array_equal(x, x2)   # batches depend only on (seed, step)
    tok.save(tmp_path / "tok.bin")
    out = str(tmp_path / "run")
    run_train(TINY + ["--data", str(shards), "--tokenizer", str(tmp_path / "tok.bin"),
                      "--steps", "2", "--out", out])
    assert len(losses(out)[0]) == 2


def test_cli_train_then_sample_greedy(tmp_path, capsysbinary):
    out = str(tmp_path / "run")
    assert main(["train"] + TINY + ["--steps", "30", "--lr", "3e-3", "--out", out]) == 0
    capsysbinary.readouterr()
    argv = ["sample", os.path.join(out, "model.bin"), "--prompt", "Once upon", "--temperature",
            "0", "--steps", "40"]
    assert main(argv) == 0
    text = capsysbinary.readouterr().out.decode()
    assert text.startswith("Once upon")
    assert main(argv) == 0
    assert capsysbinary.readouterr().out.decode() == text      # greedy is deterministic
    # the same tokens as an explicit argmax loop over the model's logits
    m = Llama.load(os.path.join(out, "model.bin"))
    tok = Tokenizer.load(os.path.join(out, "tokenizer.bin"))
    got = generate(m, tok, "Once upon", steps=40, temperature=0.0)
    seq = tok.encode("Once upon")
    while len(seq) < 41:   # run.c: --steps positions, each yields a token after BOS
        nxt = int(np.argmax(m.logits(np.array(seq), last_only=True)))
        if nxt == 1:
            break
        seq.append(nxt)
    assert got == seq[1:]
    assert text.rstrip("\n") == tok.decode(got)


def test_cli_errors(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "nope.bin")]) == 1
    assert "cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--config", "nosuch", "--out", str(tmp_path / "x"), "--quiet"])
    with pytest.raises(SystemExit):
        main(["train", "--config", "tiny", "--seq-len", "999", "--out", str(tmp_path / "x"),
              "--quiet"])


def test_resume_refuses_a_model_and_optimizer_from_different_saves(tmp_path, capsys):
    """A crash between the two atomic renames leaves model.bin from one save
    and optimizer.bin from another: resume must say so, not train on."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_train(TINY + ["--steps", "2", "--out", a])
    run_train(TINY + ["--steps", "3", "--out", b])
    os.replace(os.path.join(b, "model.bin"), os.path.join(a, "model.bin"))
    assert main(["train", "--resume", a, "--steps", "4", "--quiet"]) == 1
    assert "different saves" in capsys.readouterr().err
