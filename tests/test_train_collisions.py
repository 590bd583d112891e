"""No run lost when runs collide or the system fails under them: two
trainers on one --out, --resume against a live run, a symlinked --out,
leftovers of killed saves, a signal on an evaluation step or inside a long
gradient accumulation, a full disk, corrupt saved settings and weights,
hostile data and flags. Settings: --config tiny --seq-len 32 --batch-size 4
and few steps."""
import errno
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
from anebackward.atomicfile import atomic_write
from anebackward.runlock import Lock, RunInUse
from anebackward.tokenizer import Tokenizer

from test_train_safety import _edit_extra, log_records, saved_step, train_losses, wait_for

TINY = ["--config", "tiny", "--seq-len", "32", "--batch-size", "4", "--quiet"]


def train(argv):
    return main(["train"] + TINY + argv)


def spawn(argv, cwd, tiny=True):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "anebackward", "train"]
                            + (TINY if tiny else ["--quiet"]) + argv,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(cwd))


def assert_consistent(out, steps):
    """A complete run: one record per step 0..steps-1, the save at steps,
    the model and optimizer from the same save (a resume accepts them)."""
    recs = log_records(out)
    assert [r["step"] for r in recs if "loss" in r] == list(range(steps))
    assert saved_step(out) == steps
    assert main(["train", "--resume", out, "--quiet"]) == 0      # "already at step": pairs check


def leftovers(d):
    return sorted(n for n in os.listdir(d) if n.startswith("."))


# -- one writer per run --------------------------------------------------------

def test_two_trainers_started_together_on_one_new_out(tmp_path):
    """The old code let the second replace the first's published run (one
    died with ENOENT, or the folder mixed two runs). Now exactly one trains;
    the other is refused, naming the winner's pid."""
    out = str(tmp_path / "run")
    argv = ["--steps", "40", "--eval-every", "10", "--out", out]
    procs = [spawn(argv, tmp_path) for _ in range(2)]
    res = [(p.pid, p.wait(timeout=120), p.communicate()) for p in procs]
    ok = [r for r in res if r[1] == 0]
    refused = [r for r in res if r[1] != 0]
    assert len(ok) == 1 and len(refused) == 1, res
    err = refused[0][2][1].decode()
    # refused by the lock while the winner runs, or (if it had already
    # finished) by the rule that a run's --out is never reused silently
    assert f"in use by another trainer (pid {ok[0][0]}" in err or "already holds files" in err, err
    assert_consistent(out, 40)
    assert os.listdir(tmp_path) == ["run"]       # no staging directory or lock file left


def test_resume_overwrite_and_new_runs_against_a_live_run_are_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    proc = spawn(["--steps", "1000000", "--eval-every", "4", "--out", out], tmp_path)
    try:
        wait_for(lambda: os.path.exists(os.path.join(out, "optimizer.bin")), proc)
        for argv in (["--resume", out, "--quiet"], ["--resume", out, "--out", str(tmp_path / "b"),
                                                     "--quiet"],
                     TINY + ["--overwrite", "--out", out], TINY + ["--out", out]):
            assert main(["train"] + argv) == 1, argv
            err = capsys.readouterr().err
            assert f"in use by another trainer (pid {proc.pid}" in err, (argv, err)
        assert not (tmp_path / "b").exists()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, proc.communicate()
    finally:
        proc.kill()
    k = saved_step(out)     # the live run lost nothing: a record for every saved step
    assert [r["step"] for r in log_records(out) if "loss" in r] == list(range(k))
    assert main(["train", "--resume", out, "--steps", str(k + 2), "--quiet"]) == 0
    assert len(train_losses(out)) == k + 2


def test_a_lock_names_its_holder_and_is_released(tmp_path):
    path = str(tmp_path / ".x.lock")
    lk = Lock(path, "--out x")
    with pytest.raises(RunInUse, match=f"pid {os.getpid()}"):
        Lock(path, "--out x")       # flock locks conflict between open files, in one process too
    lk.release()
    assert not os.path.exists(path)
    Lock(path, "--out x").release()


@pytest.mark.parametrize("locked", [True, False])
def test_publishing_never_replaces_a_run_that_became_live(tmp_path, monkeypatch, capsys, locked):
    """A run that appeared in --out (locked by a live trainer, or files
    written there by hand) after this one started is not swapped away: this
    run stays, saved, in its staging directory."""
    import anebackward.train as T
    out = tmp_path / "run"
    real = T._RunDir.publish
    held = []

    def publish(self):
        if self.staging and not held:
            out.mkdir()
            (out / "model.bin").write_bytes(b"another run")
            held.append(Lock(str(out / ".lock"), "--out run") if locked else None)
        return real(self)
    monkeypatch.setattr(T._RunDir, "publish", publish)
    try:
        assert train(["--steps", "2", "--out", str(out)]) == 1
    finally:
        if held[0] is not None:
            held[0].release()
    err = capsys.readouterr().err
    assert ("now in use by another trainer" if locked else "files appeared in --out") in err
    assert "kept, saved, in" in err
    assert (out / "model.bin").read_bytes() == b"another run"
    staged = [n for n in os.listdir(tmp_path) if n.startswith(".run.partial-")]
    assert len(staged) == 1 and (tmp_path / staged[0] / "optimizer.bin").exists()


# -- symlinks and leftovers ------------------------------------------------------

@pytest.mark.parametrize("target", ["dangling", "empty dir"])
def test_a_symlinked_out_is_refused_before_step_1(tmp_path, target):
    dest = tmp_path / "dest"
    if target == "empty dir":
        dest.mkdir()
    link = tmp_path / "run"
    link.symlink_to(dest)
    with pytest.raises(SystemExit, match="symbolic link"):
        train(["--steps", "2", "--out", str(link)])
    assert link.is_symlink() and (not dest.exists() or os.listdir(dest) == [])
    assert sorted(os.listdir(tmp_path)) == sorted(["run"] + (["dest"] if dest.exists() else []))


def test_temporary_files_never_follow_a_planted_symlink(tmp_path, monkeypatch):
    import uuid
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=0xabcdef12 << 96))
    tmp = tmp_path / f".model.bin.{os.getpid()}.abcdef12.tmp"
    tmp.symlink_to(victim)
    with pytest.raises(OSError, match="File exists"):
        atomic_write(tmp_path / "model.bin", lambda f: f.write(b"x"))
    assert victim.read_bytes() == b"precious" and not (tmp_path / "model.bin").exists()


def test_a_planted_loss_png_temp_symlink_is_removed_not_followed(tmp_path):
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "run")
    assert train(["--steps", "2", "--eval-every", "1", "--out", out]) == 0
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.symlink(victim, os.path.join(out, "loss.png.tmp.png"))
    assert main(["train", "--resume", out, "--steps", "3", "--quiet"]) == 0
    assert victim.read_bytes() == b"precious"
    assert not os.path.lexists(os.path.join(out, "loss.png.tmp.png"))
    assert os.path.getsize(os.path.join(out, "loss.png")) > 1000


def test_leftovers_of_killed_saves_are_cleaned_at_resume_and_start(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(["--steps", "2", "--eval-every", "1", "--out", str(out)]) == 0
    for name in ("..model.bin.next.4242.0badcafe.tmp", ".optimizer.bin.next.77.12345678.tmp",
                 ".model.bin.next"):
        (out / name).write_bytes(b"junk")
    dead = tmp_path / ".run.partial-abcd1234"          # a run killed before its first save
    dead.mkdir()
    (dead / "log.jsonl").write_text("")
    (dead / ".lock").write_text("1\n")
    live = tmp_path / ".run.partial-live0000"          # one whose trainer still holds its lock
    live.mkdir()
    lock = Lock(str(live / ".lock"), "--out run")
    try:
        assert main(["train", "--resume", str(out), "--steps", "3", "--quiet"]) == 0
        assert leftovers(out) == []
        msg = capsys.readouterr().out
        assert "removed 3 file(s) left by an interrupted save" in msg
        assert f"removed {dead}, left by a stopped run" in msg
        assert not dead.exists() and live.exists()
        assert train(["--steps", "2", "--overwrite", "--out", str(out)]) == 0
        assert live.exists()
    finally:
        lock.release()
    assert_consistent(str(out), 2)


def test_a_leftover_holding_the_only_copy_of_a_run_is_listed_not_deleted(tmp_path, capsys):
    """Killed between the two renames of an --overwrite (systems without an
    atomic swap): --out is gone, the old run is in .run.old-*/run."""
    src = tmp_path / "src"
    assert train(["--steps", "2", "--out", str(src)]) == 0
    old = tmp_path / ".run.old-zz99zz99"
    old.mkdir()
    os.rename(src, old / "run")
    out = str(tmp_path / "run")
    assert train(["--steps", "2", "--out", out]) == 0
    assert "may be the only copy" in capsys.readouterr().out
    assert (old / "run" / "optimizer.bin").exists()
    assert train(["--steps", "3", "--overwrite", "--out", out]) == 0     # --out whole now
    assert not old.exists()


# -- every promised record -------------------------------------------------------

def _signal_at_training_forward(monkeypatch, n, sig):
    """The n-th training forward (want_grad) sends `sig` to this process
    (the trainer's handler only records it); returns the real forward."""
    real, calls = Llama.forward, []

    def forward(self, *a, **k):
        if k.get("want_grad", True):
            calls.append(1)
            if len(calls) == n:
                os.kill(os.getpid(), sig)
        return real(self, *a, **k)
    monkeypatch.setattr(Llama, "forward", forward)
    return real


def test_a_run_stopped_on_an_evaluation_step_logs_that_evaluation_at_resume(tmp_path,
                                                                             monkeypatch):
    """SIGTERM during step 4 of --eval-every 2 (an evaluation step): the old
    code saved and stopped and never wrote step 4's val_loss, not even
    after --resume."""
    common = ["--eval-every", "2", "--warmup", "1", "--decay-steps", "6", "--lr", "3e-3"]
    ref = str(tmp_path / "ref")
    assert train(common + ["--steps", "6", "--out", ref]) == 0
    out = str(tmp_path / "run")
    real = _signal_at_training_forward(monkeypatch, 4, signal.SIGTERM)
    assert train(common + ["--steps", "6", "--out", out]) == 130
    monkeypatch.setattr(Llama, "forward", real)
    assert saved_step(out) == 4
    assert [r["step"] for r in log_records(out) if "val_loss" in r] == [1]
    assert main(["train", "--resume", out, "--quiet"]) == 0
    want = [(r["step"], r["val_loss"]) for r in log_records(ref) if "val_loss" in r]
    got = [(r["step"], r["val_loss"]) for r in log_records(out) if "val_loss" in r]
    assert got == want and [s for s, _ in got] == [1, 3, 5]


def test_a_final_evaluation_missed_by_a_signal_is_run_at_resume(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    real = _signal_at_training_forward(monkeypatch, 3, signal.SIGINT)
    assert train(["--steps", "3", "--eval-every", "0", "--out", out]) == 130
    monkeypatch.setattr(Llama, "forward", real)
    assert not any("val_loss" in r for r in log_records(out))
    assert main(["train", "--resume", out, "--quiet"]) == 0
    assert [r["step"] for r in log_records(out) if "val_loss" in r] == [2]


def test_a_signal_stops_a_long_gradient_accumulation_at_the_next_micro_batch(tmp_path):
    """--grad-accum 10^6: one step would take hours; the old code ran it to
    its end after SIGTERM."""
    out = str(tmp_path / "run")
    proc = spawn(["--steps", "3", "--grad-accum", "1000000", "--out", out], tmp_path)
    try:
        wait_for(lambda: any(n.startswith(".run.partial-") and os.path.exists(
            tmp_path / n / "log.jsonl") for n in os.listdir(tmp_path)), proc)
        time.sleep(0.3)                  # inside the accumulation of step 0
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err.decode()
    assert time.time() - t0 < 20
    assert saved_step(out) == 0 and train_losses(out) == []


def _fail_fsync_after(monkeypatch, n_ok):
    """os.fsync raises ENOSPC (as a full disk does) after n_ok calls."""
    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) > n_ok:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


def test_a_full_disk_names_the_path_and_what_is_kept(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    # fsyncs: tokenizer.bin, log.jsonl, then 2 per save (model, optimizer): the
    # save of step 2 succeeds, the one of step 4 fails
    _fail_fsync_after(monkeypatch, 4)
    assert train(["--steps", "6", "--eval-every", "2", "--out", out]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and os.path.join(out, ".model.bin.next") in err
    assert "the checkpoint of step 2 is kept in" in err and f"--resume {out}" in err
    monkeypatch.undo()
    assert saved_step(out) == 2 and leftovers(out) == []
    assert main(["train", "--resume", out, "--steps", "6", "--quiet"]) == 0
    assert_consistent(out, 6)
    assert leftovers(out) == []


def test_a_full_disk_before_the_first_save_says_nothing_was_saved(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    _fail_fsync_after(monkeypatch, 2)
    assert train(["--steps", "4", "--eval-every", "2", "--out", out]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "nothing was saved yet" in err
    assert os.listdir(tmp_path) == []


def test_a_finished_run_whose_loss_png_hits_a_full_disk_exits_0(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    def savefig(self, f, **k):
        f.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(Figure, "savefig", savefig)
    out = str(tmp_path / "run")
    assert train(["--steps", "2", "--out", out]) == 0
    msg = capsys.readouterr().out
    assert "warning: loss.png not written" in msg and "No space left" in msg
    assert sorted(os.listdir(out)) == ["log.jsonl", "model.bin", "optimizer.bin",
                                       "tokenizer.bin"]


# -- saved settings and weights ----------------------------------------------------

def test_a_saved_batch_size_beyond_memory_is_refused_saying_how_much(tmp_path):
    out = str(tmp_path / "run")
    assert train(["--steps", "2", "--out", out]) == 0
    _edit_extra(os.path.join(out, "optimizer.bin"),
                lambda e: e["settings"].update(batch_size=2**31 - 1))
    with pytest.raises(SystemExit, match=r"settings.batch_size 2147483647 x seq_len 32 needs"):
        main(["train", "--resume", out, "--steps", "3", "--quiet"])


def test_a_weight_bit_flip_is_reported_as_corruption(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train(["--steps", "2", "--out", out]) == 0
    path = os.path.join(out, "model.bin")
    raw = bytearray(open(path, "rb").read())
    raw[28 + 4 * 1000] ^= 0x01           # the lowest mantissa bit of a tok_embeddings weight
    open(path, "wb").write(raw)
    assert main(["train", "--resume", out, "--steps", "3", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "model.bin is corrupt: tok_embeddings.weight (1 of" in err
    assert "different saves" not in err


def test_an_n_decay_mismatch_says_what_differs(tmp_path):
    from anebackward.checkpoint import OPT_MAGIC, load_optimizer
    from anebackward import AdamW
    out = str(tmp_path / "run")
    assert train(["--steps", "1", "--out", out]) == 0
    path = os.path.join(out, "optimizer.bin")
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[8:16])
    meta = json.loads(raw[16:16 + n])
    meta["n_decay"] -= 1
    text = json.dumps(meta).encode()
    open(path, "wb").write(OPT_MAGIC + struct.pack("<Q", len(text)) + text + raw[16 + n:])
    model = Llama.load(os.path.join(out, "model.bin"))
    with pytest.raises(CheckpointError, match=f"{model.n_decay - 1} decay, the model has "
                                              f"{model.n_params} of which {model.n_decay} "
                                              r"decay \(n_decay differs\)"):
        load_optimizer(AdamW(model), path)


# -- data and files ------------------------------------------------------------------

def test_shard_ids_beyond_the_tokenizer_are_refused_naming_shard_and_id(tmp_path, capsys):
    tok = tmp_path / "tok.bin"
    Tokenizer.byte_level().save(str(tok))
    shard = tmp_path / "data.bin"
    ids = (np.arange(4000) % 200).astype(np.uint16)
    ids[1234] = 60000
    ids.tofile(shard)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=rf"{shard}: token id 60000 is beyond the vocabulary "
                                         r"\(259\) of --tokenizer"):
        train(["--data", str(shard), "--tokenizer", str(tok), "--steps", "2", "--out", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "fifo-shard"])
def test_special_files_as_data_are_refused_without_reading(tmp_path, kind):
    if kind == "dev-zero":
        path = "/dev/zero"
        if not os.path.exists(path):
            pytest.skip("no /dev/zero here")
    else:
        path = str(tmp_path / ("data.bin" if kind == "fifo-shard" else "data.txt"))
        os.mkfifo(path)
    from anebackward.data import load_data
    with pytest.raises(ValueError, match="regular file"):
        load_data(path, Tokenizer.byte_level())


def test_a_fifo_as_model_bin_is_refused_without_blocking(tmp_path):
    out = tmp_path / "run"
    assert train(["--steps", "1", "--out", str(out)]) == 0
    os.unlink(out / "model.bin")
    os.mkfifo(out / "model.bin")
    with pytest.raises(CheckpointError, match="regular file, this is a FIFO"):
        Llama.load(out / "model.bin")


def test_a_log_with_invalid_utf8_does_not_block_resume(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train(["--steps", "2", "--out", out]) == 0
    with open(os.path.join(out, "log.jsonl"), "ab") as f:
        f.write(b'{"step": 1, "note": "\xff\xfe"}\n')
    assert main(["train", "--resume", out, "--steps", "3", "--quiet"]) == 0
    assert "log.jsonl: dropped 1 corrupt line" in capsys.readouterr().out
    assert len(train_losses(out)) == 3


# -- flags ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv,text", [
    (["--batch-size", "10000000"], r"--batch-size 10000000 x seq_len 32 needs an activation "
                                   r"workspace of [\d,.]+ GiB"),
    (["--threads", "1000"], r"--threads must be an integer in \[1, 256\]"),
    (["--min-lr", "1e-2", "--lr", "1e-3"], r"--min-lr \(0.01\) is above --lr \(0.001\)"),
    (["--out", ""], "names no directory"),
])
def test_bad_flags_are_refused_before_anything_is_written(tmp_path, argv, text):
    out = tmp_path / "run"
    args = argv if "--out" in argv else argv + ["--out", str(out)]
    with pytest.raises(SystemExit, match=text):
        train(["--steps", "1"] + args)
    assert os.listdir(tmp_path) == []


def test_a_small_lr_lowers_the_default_min_lr(tmp_path):
    out = str(tmp_path / "run")
    assert train(["--steps", "2", "--lr", "5e-5", "--out", out]) == 0
    assert all(r["lr"] <= 5e-5 for r in log_records(out) if "lr" in r)
