"""No run is ever lost: an existing --out, a --resume that would
go backwards, Ctrl-C / SIGTERM / kill -9, a validation split that is too
short, a failing evaluation, a diverged loss, corrupt saved settings, and
out-of-range numbers on the command line."""
import json
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from anebackward import CheckpointError, Llama
from anebackward.__main__ import main
from anebackward.checkpoint import OPT_MAGIC
from anebackward.data import default_corpus, load_data
from anebackward.tokenizer import Tokenizer

TINY = ["--config", "tiny", "--batch-size", "2", "--seq-len", "16", "--quiet"]


def train(argv):
    return main(["train"] + TINY + argv)


def log_records(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(out):
    return [r["loss"] for r in log_records(out) if "loss" in r]


def saved_step(out):
    raw = open(os.path.join(out, "optimizer.bin"), "rb").read()
    (n,) = struct.unpack("<Q", raw[8:16])
    return json.loads(raw[16:16 + n])["extra"]["step"]


def snapshot(d):
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))}


# -- an existing --out ---------------------------------------------------------

def test_a_non_empty_out_is_refused_and_left_alone(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train(["--steps", "3", "--out", out]) == 0
    before = snapshot(out)
    with pytest.raises(SystemExit, match="--resume .* --overwrite"):
        train(["--steps", "5", "--out", out])
    assert snapshot(out) == before       # the old code truncated log.jsonl at once


@pytest.mark.parametrize("swap", ["renameat2", "two renames"])
def test_overwrite_replaces_the_run_whole_at_the_first_save(tmp_path, monkeypatch, swap):
    import anebackward.train as T
    if swap == "two renames":       # systems without an atomic directory swap
        monkeypatch.setattr(T, "_exchange", lambda a, b: False)
    out = str(tmp_path / "run")
    assert train(["--steps", "3", "--out", out]) == 0
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("from the old run")
    assert train(["--steps", "4", "--seed", "5", "--overwrite", "--out", out]) == 0
    assert sorted(os.listdir(out)) == sorted(["log.jsonl", "model.bin", "optimizer.bin",
                                              "tokenizer.bin"] + (["loss.png"] if _has_mpl() else []))
    assert len(train_losses(out)) == 4 and saved_step(out) == 4
    assert os.listdir(tmp_path) == ["run"]          # no staging or old copy left behind


def test_overwrite_keeps_the_old_run_until_the_new_one_saves(tmp_path, monkeypatch):
    """A new run that fails before its first save must not have touched the
    old one (the old code wrote into --out from the start)."""
    out = str(tmp_path / "run")
    assert train(["--steps", "3", "--out", out]) == 0
    before = snapshot(out)
    real = Llama.forward
    monkeypatch.setattr(Llama, "forward", lambda self, *a, **k: real(self, *a, **k) * np.nan)
    assert train(["--steps", "4", "--overwrite", "--out", out]) == 1     # diverged at step 1
    assert snapshot(out) == before
    assert os.listdir(tmp_path) == ["run"]


def test_a_failed_check_creates_no_out_directory(tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(SystemExit):
        train(["--steps", "0", "--out", str(out)])
    assert not out.exists() and not out.parent.exists()


def _has_mpl():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


# -- --resume --steps below the saved step -------------------------------------

def test_resume_below_the_saved_step_is_an_error(tmp_path):
    out = str(tmp_path / "run")
    assert train(["--steps", "6", "--out", out]) == 0
    before = snapshot(out)
    with pytest.raises(SystemExit, match="below the step 6"):
        main(["train", "--resume", out, "--steps", "4", "--quiet"])
    assert snapshot(out) == before       # the old code saved step 4 on the 6-step weights


# -- SIGINT / SIGTERM / kill -9 ------------------------------------------------

def _spawn(argv, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "anebackward", "train"] + TINY + argv,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=str(tmp_path))


def wait_for(pred, proc, timeout=60, what="timed out"):
    """Poll pred() until true while the run `proc` goes on; an early end of
    the run or the timeout (AssertionError: `what`) fails the test."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()}")
        time.sleep(0.02)
    raise AssertionError(what)


def _steps_logged(path):
    try:
        with open(path) as f:
            return sum('"loss"' in line for line in f)
    except FileNotFoundError:
        return 0


def _wait_for_steps(path, n, proc, timeout=60):
    wait_for(lambda: _steps_logged(path) >= n, proc, timeout, "the run did not get going")


def _log_path(tmp_path, out):
    """log.jsonl of the running job: in --out once saved, before that in the
    staging directory beside it."""
    for d in [out] + [str(tmp_path / n) for n in os.listdir(tmp_path) if n.startswith(".run.")]:
        p = os.path.join(d, "log.jsonl")
        if os.path.exists(p):
            return p
    return os.path.join(out, "log.jsonl")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_resumable_checkpoint_and_exits_130(tmp_path, sig):
    out = str(tmp_path / "run")
    common = ["--lr", "3e-3", "--warmup", "2", "--decay-steps", "400", "--eval-every", "0"]
    # far more steps than it can take before the signal: it must still be training
    proc = _spawn(common + ["--steps", "1000000", "--out", out], tmp_path)
    deadline = time.time() + 60
    while time.time() < deadline and not os.path.exists(_log_path(tmp_path, out)):
        time.sleep(0.05)
    _wait_for_steps(_log_path(tmp_path, out), 3, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr.decode()
    lines = [ln for ln in stdout.decode().splitlines() if "Resume with" in ln]
    assert len(lines) == 1 and f"anebackward train --resume {out}" in lines[0]
    k = saved_step(out)
    assert 3 <= k < 1000000 and len(train_losses(out)) == k
    # resuming gives the curve of a run that was never stopped
    assert main(["train", "--resume", out, "--steps", str(k + 2), "--quiet"]) == 0
    ref = str(tmp_path / "ref")
    assert train(common + ["--steps", str(k + 2), "--out", ref]) == 0
    np.testing.assert_allclose(train_losses(out), train_losses(ref), rtol=1e-6)


def test_ctrl_c_before_training_starts_is_a_clean_exit_130(tmp_path, monkeypatch, capsys):
    import anebackward.data as D

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(D, "load_data", interrupted)
    out = tmp_path / "run"
    assert train(["--steps", "3", "--out", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err and not out.exists()


def test_kill_9_loses_at_most_the_save_interval(tmp_path):
    """Saves happen at every evaluation by default (the old default saved only
    at the end, so a kill lost the whole run)."""
    out = str(tmp_path / "run")
    proc = _spawn(["--steps", "1000000", "--eval-every", "5", "--out", out], tmp_path)
    deadline = time.time() + 60
    while time.time() < deadline and not os.path.exists(os.path.join(out, "optimizer.bin")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    _wait_for_steps(os.path.join(out, "log.jsonl"), 7, proc)
    proc.kill()
    proc.wait()
    k = saved_step(out)      # 5 below the real one if killed between the two renames
    assert k % 5 == 0 and k >= 5
    assert main(["train", "--resume", out, "--steps", str(k + 6), "--quiet"]) == 0
    assert len(train_losses(out)) == k + 6 == saved_step(out)


def test_resume_completes_a_save_killed_between_its_two_renames(tmp_path):
    """model.bin renamed into place, optimizer.bin not yet: the new optimizer
    state is still in .optimizer.bin.next; --resume finishes the save
    instead of refusing the run (the old save wrote in place, so a kill there
    left an unresumable pair)."""
    import shutil
    d, e = str(tmp_path / "d"), str(tmp_path / "e")
    assert train(["--steps", "4", "--eval-every", "2", "--decay-steps", "20", "--out", d]) == 0
    shutil.copytree(d, e)
    assert main(["train", "--resume", e, "--steps", "6", "--quiet"]) == 0
    for name, to in (("model.bin", "model.bin"), ("optimizer.bin", ".optimizer.bin.next"),
                     ("log.jsonl", "log.jsonl")):
        shutil.copy(os.path.join(e, name), os.path.join(d, to))
    assert saved_step(d) == 4
    assert main(["train", "--resume", d, "--steps", "8", "--quiet"]) == 0
    assert saved_step(d) == 8 and not os.path.exists(os.path.join(d, ".optimizer.bin.next"))
    assert main(["train", "--resume", e, "--steps", "8", "--quiet"]) == 0
    assert train_losses(d) == train_losses(e) and len(train_losses(d)) == 8


# -- a short validation split, a failing evaluation ----------------------------

def test_a_validation_split_shorter_than_a_window_is_caught_before_training(tmp_path, capsys):
    text = tmp_path / "small.txt"
    text.write_text("\n\n".join(default_corpus(3, seed=1)))   # 5 % of it: < 49 tokens
    tok = Tokenizer.byte_level()
    data = load_data(str(text), tok)
    assert 0 < data.longest("val") < 49 < data.longest("train")
    out = str(tmp_path / "run")
    # the old code trained every step, then failed in the final evaluation: no model.bin
    assert train(["--data", str(text), "--seq-len", "48", "--steps", "3", "--out", out]) == 0
    assert "no validation loss" in capsys.readouterr().out
    assert Llama.load(os.path.join(out, "model.bin")) is not None
    text.write_text("tiny")     # too short to train on at all: refused up front
    assert main(["train"] + TINY + ["--data", str(text), "--out", str(tmp_path / "r3")]) == 1
    assert "fewer than seq_len + 1" in capsys.readouterr().err
    assert not (tmp_path / "r3").exists()


def test_an_evaluation_failure_never_discards_the_weights(tmp_path, monkeypatch, capsys):
    import anebackward.train as T

    def broken(*a, **k):
        raise ValueError("evaluation exploded")
    monkeypatch.setattr(T, "_evaluate", broken)
    out = str(tmp_path / "run")
    assert train(["--steps", "4", "--eval-every", "2", "--out", out]) == 0
    assert "evaluation failed" in capsys.readouterr().out
    assert saved_step(out) == 4 and len(train_losses(out)) == 4


# -- a diverged loss -----------------------------------------------------------

def test_a_diverged_run_stops_keeps_the_last_good_checkpoint_and_fails(tmp_path, monkeypatch,
                                                                       capsys):
    out = str(tmp_path / "run")
    real = Llama.forward
    calls = []

    def forward(self, *a, **k):
        calls.append(1)
        loss = real(self, *a, **k)
        return float("nan") if len(calls) > 5 and k.get("want_grad", True) else loss
    monkeypatch.setattr(Llama, "forward", forward)
    assert train(["--steps", "20", "--eval-every", "0", "--save-every", "4", "--out", out]) == 1
    msg = capsys.readouterr().out
    assert "diverged" in msg and "step 4" in msg and "--lr" in msg
    assert saved_step(out) == 4
    m = Llama.load(os.path.join(out, "model.bin"))      # the good weights, loadable
    assert np.isfinite(m.flat_params).all()


# -- every saved setting is checked on --resume --------------------------------

def _edit_extra(path, edit):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[8:16])
    meta = json.loads(raw[16:16 + n])
    edit(meta["extra"])
    text = json.dumps(meta).encode()
    open(path, "wb").write(OPT_MAGIC + struct.pack("<Q", len(text)) + text + raw[16 + n:])


@pytest.mark.parametrize("edit,text", [
    (lambda e: e["settings"].update(eval_batches=2**62), "settings.eval_batches"),  # hung
    (lambda e: e["settings"].update(batch_size="16"), "settings.batch_size"),
    (lambda e: e["settings"].update(lr=None), "settings.lr"),
    (lambda e: e["settings"].update(beta2=1.5), "settings.beta2: beta2 must be < 1.0"),
    (lambda e: e["settings"].update(seq_len=10**6), "settings.seq_len"),
    (lambda e: e["settings"].pop("grad_clip"), "lacks grad_clip"),          # was a KeyError
    (lambda e: e.update(settings=[1]), "settings must be a JSON object"),   # AttributeError
    (lambda e: e.update(step=2**63), "step must be in"),
    (lambda e: e.pop("step"), "step must be an int"),
    # checked like the command line
    (lambda e: e["settings"].update(format="weird"), "settings.format must be one of"),
    (lambda e: e["settings"].update(min_lr=1.0), "settings.min_lr .* is above settings.lr"),
    (lambda e: e["settings"].update(config="nope"), "settings.config must be a preset"),
    (lambda e: e["settings"].update(extra_knob=1), "unknown keys 'extra_knob'"),
    (lambda e: e.update(params_difest=e.pop("params_digest")), "unknown keys 'params_difest'"),
])
def test_corrupt_saved_settings_are_a_checkpoint_error(tmp_path, edit, text):
    out = str(tmp_path / "run")
    assert train(["--steps", "2", "--out", out]) == 0
    _edit_extra(os.path.join(out, "optimizer.bin"), edit)
    with pytest.raises(CheckpointError, match=text):
        from anebackward.train import add_arguments, train as train_fn
        import argparse
        p = argparse.ArgumentParser()
        add_arguments(p)
        train_fn(p.parse_args(["--resume", out, "--steps", "3", "--quiet"]))


# -- range checks of every numeric option --------------------------------------

@pytest.mark.parametrize("opt,value", [
    ("--steps", "0"), ("--batch-size", "0"), ("--seq-len", "0"), ("--grad-accum", "0"),
    ("--warmup", "-1"), ("--decay-steps", "0"), ("--eval-every", "-1"), ("--save-every", "-1"),
    ("--threads", "0"), ("--seed", "-1"), ("--lr", "nan"), ("--lr", "-1"), ("--min-lr", "inf"),
    ("--weight-decay", "-0.1"), ("--grad-clip", "nan"), ("--steps", str(2**40)),
])
def test_out_of_range_train_options_are_refused_before_anything_is_written(tmp_path, opt, value):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=opt):
        main(["train", opt, value, "--out", str(out), "--quiet"])
    assert not out.exists()


@pytest.mark.parametrize("opt,value", [("--temperature", "nan"), ("--temperature", "-1"),
                                       ("--temperature", "inf"), ("--top-p", "nan"),
                                       ("--top-p", "1.5"), ("--top-p", "0"), ("--max-tokens", "0"),
                                       ("--seed", "-1")])
def test_out_of_range_sample_options_are_refused(tmp_path, capsysbinary, opt, value):
    out = str(tmp_path / "run")
    assert train(["--steps", "1", "--out", out]) == 0
    capsysbinary.readouterr()
    assert main(["sample", os.path.join(out, "model.bin"), opt, value]) == 1
    res = capsysbinary.readouterr()
    assert opt.encode() in res.err and res.out == b""


# -- preset-dependent defaults -------------------------------------------------

def test_config_tiny_works_with_its_own_defaults(tmp_path):
    out = str(tmp_path / "run")
    assert main(["train", "--config", "tiny", "--steps", "1", "--batch-size", "2",
                 "--out", out, "--quiet"]) == 0
    assert Llama.load(os.path.join(out, "model.bin")).config.max_seq_len == 64


# -- reader messages -----------------------------------------------------------

def test_data_reader_messages_name_the_file(tmp_path):
    tok = Tokenizer.byte_level()
    with pytest.raises(ValueError, match=r"nope\.txt: no such file"):
        load_data(str(tmp_path / "nope.txt"), tok)
    with pytest.raises(ValueError, match=r"nope\.bin: no such file"):
        load_data(str(tmp_path / "nope.bin"), tok)
    shards = tmp_path / "shards"
    shards.mkdir()
    np.arange(100, dtype=np.uint16).tofile(shards / "a.bin")
    (shards / "b.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"b\.bin: the token shard is empty"):
        load_data(str(shards), tok)
    (shards / "b.bin").unlink()
    (shards / "c.bin").mkdir()
    with pytest.raises(ValueError, match=r"c\.bin: not a file"):
        load_data(str(shards), tok)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        load_data(str(tmp_path / "latin1.txt"), tok)
