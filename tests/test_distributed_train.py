"""`torchrun --nproc_per_node 2 -m anebackward train` (gloo on loopback):
two ranks of batch B give the loss curve of one process with batch 2B,
within float32 noise (without the gradient all-reduce 4 of the 6 losses
differ), and rank 0 writes the run's files."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ARGS = ["--config", "tiny", "--seq-len", "32", "--steps", "6", "--warmup", "2", "--lr", "1e-2",
        "--eval-every", "3", "--threads", "1", "--quiet"]


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return ([r["loss"] for r in recs if "loss" in r], [r["val_loss"] for r in recs if "val_loss" in r])


def _run(cmd, env):
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.slow   # torchrun, two processes
def test_two_ranks_match_one_process_with_twice_the_batch(tmp_path, torch):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _run([sys.executable, "-m", "anebackward", "train", *ARGS, "--batch-size", "4", "--out", one],
         env)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "anebackward", "train", *ARGS, "--batch-size", "2", "--out", two], env)
    (l1, v1), (l2, v2) = _log(one), _log(two)
    assert len(l1) == len(l2) == 6 and len(v1) == len(v2) == 2
    np.testing.assert_allclose(l2, l1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(v2, v1, rtol=1e-4, atol=1e-5)
    assert os.path.exists(os.path.join(two, "model.bin"))
    # the all-reduce overlapped with the backward (per layer group; the
    # default across hosts) gives the same bits as one all-reduce after it
    # (the default on one host, as above): two ranks' sums are the same in
    # any order
    over = str(tmp_path / "overlap")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "anebackward", "train", *ARGS, "--batch-size", "2", "--out", over],
         dict(env, ANEBACKWARD_ALLREDUCE="overlap"))
    assert _log(over) == _log(two)
    with open(os.path.join(over, "model.bin"), "rb") as a, \
            open(os.path.join(two, "model.bin"), "rb") as b:
        assert a.read() == b.read()


def test_allreduce_mode_overlaps_across_hosts_only_unless_told():
    from anebackward.distributed import allreduce_mode
    one_host = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    two_hosts = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    assert allreduce_mode(one_host) == "end" and allreduce_mode(two_hosts) == "overlap"
    assert allreduce_mode(dict(one_host, ANEBACKWARD_ALLREDUCE="Overlap")) == "overlap"
    assert allreduce_mode(dict(two_hosts, ANEBACKWARD_ALLREDUCE="end")) == "end"
    assert allreduce_mode(dict(two_hosts, ANEBACKWARD_ALLREDUCE="auto")) == "overlap"
    with pytest.raises(ValueError, match="ANEBACKWARD_ALLREDUCE must be one of auto, overlap, "
                                         "end, got 'later'"):
        allreduce_mode(dict(one_host, ANEBACKWARD_ALLREDUCE="later"))


def test_without_torchrun_nothing_is_imported():
    code = ("import sys, argparse; from anebackward import distributed as d; "
            "dp = d.from_env(argparse.Namespace(out='x')); assert dp.mean(1.5) == 1.5; "
            "print(type(dp).__name__, 'torch' in sys.modules)")
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.stdout.split() == ["_Single", "False"], r.stderr


@pytest.mark.slow   # torchrun, two processes (about 4 s a mode)
@pytest.mark.parametrize("mode", ["end", "overlap"])
def test_grad_accum_reduces_the_gradients_once_per_optimizer_step(tmp_path, torch, mode):
    """2 ranks, --grad-accum 4, 3 steps: the gradient buffer is reduced once
    per optimizer step (after the last micro-batch; in groups that together
    cover it once under overlap), the loss once per step, plus one
    reduction for the final validation loss."""
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "allreduce_count_worker.py")
    count = str(tmp_path / "count")
    env = dict(os.environ, OMP_NUM_THREADS="1", COUNT_OUT=count, ANEBACKWARD_ALLREDUCE=mode)
    steps = 3
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          worker, "--config", "tiny", "--seq-len", "16", "--batch-size", "1", "--grad-accum", "4",
          "--steps", str(steps), "--eval-every", "0", "--threads", "1",
          "--quiet", "--out", str(tmp_path / "run")], env)
    import anebackward as ab
    n_params = ab.Llama.load(str(tmp_path / "run" / "model.bin")).n_params
    for rank in (0, 1):
        with open(f"{count}.{rank}") as f:
            rec = json.load(f)
        assert rec["rc"] == 0
        grads = [n for n in rec["calls"] if n > 1]
        scalars = [n for n in rec["calls"] if n == 1]
        assert len(scalars) == steps + 1            # the step losses, the validation loss
        assert sum(grads) == steps * n_params       # each step's buffer once, no more
        if mode == "end":
            assert grads == [n_params] * steps
