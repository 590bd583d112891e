"""Data-parallel training over torch.distributed (gloo) for `anebackward train`.

    torchrun --nproc_per_node N -m anebackward train --batch-size B ...

(or across hosts with torchrun's usual --nnodes/--rdzv flags) trains with a
global batch of N·B: step i's batch is the one a single process with
--batch-size N·B would draw, and rank r takes rows [r·B, (r+1)·B). The flat
gradient buffer is all-reduced (mean) once per optimizer step, the losses likewise,
so every rank takes the same AdamW step on the same weights; rank 0 writes
the run's files, the other ranks write to a throwaway directory. The trainer
calls this module (batch, mean, backward): with --grad-accum the gradients
are reduced once per optimizer step, after the last micro-batch. Without
torchrun's environment (WORLD_SIZE unset or 1) nothing changes and torch is
never imported: it stays an optional dependency.

ANEBACKWARD_ALLREDUCE chooses how the gradients are reduced:
  overlap  during the step's last backward: the model announces each group of gradients
           as it becomes final (the classifier and final norm first, then
           each layer from the last, the embedding last; Llama.backward's
           on_grads_ready), each group's ranges are reduced asynchronously
           on gloo's threads while the backward goes on, and the backward
           then waits for them and divides by N;
  end      one all-reduce of the whole buffer after the step's last backward;
  auto     (default) overlap when the ranks span more than one host
           (WORLD_SIZE > LOCAL_WORLD_SIZE), where it can hide network time
           (not measured across hosts);
           end on one host, where every core already computes and gloo's
           threads would only take turns with the kernels (measured: 2 ranks
           on 2 cores, overlap 9-34 % slower per step, docs/performance.md, "Data-parallel training").
The sums, and so the trained weights, are the same either way.
"""
import argparse
import atexit
import os
import shutil
import tempfile
from typing import Any, Mapping, Optional, Tuple, Union

import numpy as np

Batch = Tuple[np.ndarray, np.ndarray]   # (tokens, targets) of one micro-batch


class _Single:
    """Not distributed: the whole batch here, nothing to reduce."""
    rank, world = 0, 1

    def batch(self, data: Any, step: int, batch_size: int, seq_len: int, seed: int = 0,
              split: str = "train") -> Batch:
        x, y = data.batch(step, batch_size, seq_len, seed, split)
        return x, y

    def mean(self, value: float) -> float:
        return value

    def backward(self, model: Any, *, reduce: bool, **kw: Any) -> None:
        model.backward(**kw)


ALLREDUCE_MODES = ("auto", "overlap", "end")


def allreduce_mode(env: Optional[Mapping[str, str]] = None) -> str:
    """overlap or end, from ANEBACKWARD_ALLREDUCE (auto, overlap, end; default
    auto) and torchrun's WORLD_SIZE / LOCAL_WORLD_SIZE; anything else is an error."""
    env = os.environ if env is None else env
    given = env.get("ANEBACKWARD_ALLREDUCE", "")
    mode = given.strip().lower() or "auto"
    if mode not in ALLREDUCE_MODES:
        raise ValueError(f"ANEBACKWARD_ALLREDUCE must be one of {', '.join(ALLREDUCE_MODES)}, "
                         f"got {given!r}")
    if mode == "auto":
        world = int(env.get("WORLD_SIZE", "1") or 1)
        local = int(env.get("LOCAL_WORLD_SIZE", str(world)) or world)
        mode = "overlap" if world > local else "end"
    return mode


class DataParallel:
    """The trainer's side of data parallelism: this rank's rows of a global
    batch, the mean of a number over the ranks, and a backward whose
    gradients are reduced when asked (the trainer asks once per optimizer
    step, on its last micro-batch)."""

    def __init__(self, rank: int, world: int, mode: str = "overlap") -> None:
        import torch
        import torch.distributed as dist
        self.torch, self.dist, self.rank, self.world = torch, dist, rank, world
        self.mode = mode
        if not dist.is_initialized():
            dist.init_process_group("gloo")     # torchrun's MASTER_ADDR/PORT, RANK, WORLD_SIZE

    def _mean(self, a: np.ndarray) -> None:
        """In-place mean over the ranks of a float ndarray (zero-copy)."""
        t = self.torch.from_numpy(a)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM)
        t /= self.world

    def batch(self, data: Any, step: int, batch_size: int, seq_len: int, seed: int = 0,
              split: str = "train") -> Batch:
        """Rows [rank·B, (rank+1)·B) of the batch a single process with
        batch_size·world would draw."""
        x, y = data.batch(step, batch_size * self.world, seq_len, seed, split)
        sl = slice(self.rank * batch_size, (self.rank + 1) * batch_size)
        return x[sl], y[sl]

    def mean(self, value: float) -> float:
        """The mean over the ranks of a float (one all-reduce)."""
        a = np.array([value], dtype=np.float64)
        self._mean(a)
        return float(a[0])

    def backward(self, model: Any, *, reduce: bool, **kw: Any) -> None:
        """model.backward(**kw); with reduce=True the gradient buffer then
        holds its mean over the ranks: one all-reduce of the buffer after the
        backward ("end"), or one per group of gradients as the backward
        finishes it ("overlap")."""
        if not reduce:
            model.backward(**kw)
            return
        if self.mode == "end":
            model.backward(**kw)
            self._mean(model.flat_grads)
            return
        torch, dist = self.torch, self.dist
        grads, pending = model.flat_grads, []

        def reduce_ranges(ranges: Any) -> None:
            for lo, hi in ranges:
                pending.append(dist.all_reduce(torch.from_numpy(grads[lo:hi]),
                                               op=dist.ReduceOp.SUM, async_op=True))
        try:
            model.backward(on_grads_ready=reduce_ranges, **kw)
        finally:            # the buffer must not change under gloo's threads
            for w in pending:
                w.wait()
        torch.from_numpy(grads).div_(self.world)


def from_env(args: argparse.Namespace) -> Union[_Single, DataParallel]:
    """The process's role from torchrun's environment. Ranks > 0 write their
    files to a temporary directory and print nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return _Single()
    rank = int(os.environ["RANK"])
    if rank > 0:
        args.out = tempfile.mkdtemp(prefix=f"anebackward-rank{rank}-")
        args.no_progress = True
        atexit.register(shutil.rmtree, args.out, True)
    return DataParallel(rank, world, allreduce_mode())
