"""Data-parallel training over torch.distributed (gloo) for `anebackward train`.

    torchrun --nproc_per_node N -m anebackward train --batch-size B ...

(or across hosts with torchrun's usual --nnodes/--rdzv flags) trains with a
global batch of N·B: step i's batch is the one a single process with
--batch-size N·B would draw, and rank r takes rows [r·B, (r+1)·B). After each
backward the flat gradient buffer is all-reduced (mean) in one call, the
losses likewise, so every rank takes the same AdamW step on the same
weights; rank 0 writes the run's files, the other ranks write to a throwaway
directory. Without torchrun's environment (WORLD_SIZE unset or 1) nothing
changes and torch is never imported: it stays an optional dependency.
"""
import atexit
import os
import shutil
import tempfile


class _Single:
    """Not distributed: every hook is a no-op."""
    rank, world = 0, 1

    def wrap(self, model, data):
        return None


class DataParallel:
    def __init__(self, rank, world):
        import torch
        import torch.distributed as dist
        self.torch, self.dist, self.rank, self.world = torch, dist, rank, world
        if not dist.is_initialized():
            dist.init_process_group("gloo")     # torchrun's MASTER_ADDR/PORT, RANK, WORLD_SIZE

    def _mean(self, a):
        """In-place mean over the ranks of a float ndarray (zero-copy)."""
        t = self.torch.from_numpy(a)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM)
        t /= self.world

    def wrap(self, model, data):
        """Hook the model's forward/backward and the data's batches (instance
        attributes; the classes are untouched)."""
        import numpy as np
        forward, backward, batch = model.forward, model.backward, data.batch
        rank, world = self.rank, self.world

        def rank_batch(step, batch_size, seq_len, seed=0, split="train"):
            x, y = batch(step, batch_size * world, seq_len, seed, split)
            sl = slice(rank * batch_size, (rank + 1) * batch_size)
            return x[sl], y[sl]

        def mean_forward(*a, **k):
            loss = np.array([forward(*a, **k)], dtype=np.float64)
            self._mean(loss)
            return float(loss[0])

        def mean_backward(*a, **k):
            backward(*a, **k)
            # with accumulation the buffer already holds the mean of earlier
            # micro-batches, identical on every rank: averaging again keeps it
            self._mean(model.flat_grads)

        data.batch, model.forward, model.backward = rank_batch, mean_forward, mean_backward
        return None


def from_env(args):
    """The process's role from torchrun's environment. Ranks > 0 write their
    files to a temporary directory and print nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return _Single()
    rank = int(os.environ["RANK"])
    if rank > 0:
        args.out = tempfile.mkdtemp(prefix=f"anebackward-rank{rank}-")
        args.quiet = True
        atexit.register(shutil.rmtree, args.out, True)
    return DataParallel(rank, world)
