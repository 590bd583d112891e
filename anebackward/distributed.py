"""Data-parallel training over torch.distributed (gloo) for `anebackward train`.

    torchrun --nproc_per_node N -m anebackward train --batch-size B ...

(or across hosts with torchrun's usual --nnodes/--rdzv flags) trains with a
global batch of N·B: step i's batch is the one a single process with
--batch-size N·B would draw, and rank r takes rows [r·B, (r+1)·B). The flat
gradient buffer is all-reduced (mean) at each backward, the losses likewise,
so every rank takes the same AdamW step on the same weights; rank 0 writes
the run's files, the other ranks write to a throwaway directory. Without
torchrun's environment (WORLD_SIZE unset or 1) nothing changes and torch is
never imported: it stays an optional dependency.

ANEBACKWARD_ALLREDUCE chooses when the gradients are reduced:
  overlap  during the backward: the model announces each group of gradients
           as it becomes final (the classifier and final norm first, then
           each layer from the last, the embedding last; Llama.backward's
           on_grads_ready), each group's ranges are reduced asynchronously
           on gloo's threads while the backward goes on, and the backward
           then waits for them and divides by N;
  end      one all-reduce of the whole buffer after the backward;
  auto     (default) overlap when the ranks span more than one host
           (WORLD_SIZE > LOCAL_WORLD_SIZE), where it can hide network time
           (not measured: the project has had one host);
           end on one host, where every core already computes and gloo's
           threads would only take turns with the kernels (measured: 2 ranks
           on 2 cores, overlap 9-34 % slower per step, docs/performance.md, "Data-parallel training").
The sums, and so the trained weights, are the same either way.
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


ALLREDUCE_MODES = ("auto", "overlap", "end")


def allreduce_mode(env=None):
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
    def __init__(self, rank, world, mode="overlap"):
        import torch
        import torch.distributed as dist
        self.torch, self.dist, self.rank, self.world = torch, dist, rank, world
        self.mode = mode
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

        # with accumulation the buffer already holds the mean of earlier
        # micro-batches, identical on every rank: averaging again keeps it
        def mean_backward(*a, **k):
            if self.mode == "end":
                backward(*a, **k)
                self._mean(model.flat_grads)
                return
            torch, dist = self.torch, self.dist
            grads, pending = model.flat_grads, []

            def reduce(ranges):
                for lo, hi in ranges:
                    pending.append(dist.all_reduce(torch.from_numpy(grads[lo:hi]),
                                                   op=dist.ReduceOp.SUM, async_op=True))
            try:
                backward(*a, on_grads_ready=reduce, **k)
            finally:            # the buffer must not change under gloo's threads
                for w in pending:
                    w.wait()
            torch.from_numpy(grads).div_(self.world)

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
    return DataParallel(rank, world, allreduce_mode())
