"""One rank of the 2-process DDP test (tests/test_torch_ddp.py).

usage: python ddp_worker.py RANK WORLD PORT OUT.pt BATCH.pt
Builds anebackward.torch.Transformer from a fixed seed, wraps it in
DistributedDataParallel (gloo, TCP on 127.0.0.1), runs forward/backward on
its shard of the batch, takes one AdamW step, and (rank 0) saves the
all-reduced gradients and the updated parameters."""
import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import anebackward.torch as at

CFG = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=53, multiple_of=16,
           max_seq_len=16)


def build(one_call=False):
    """one_call=True: the one-call path (the default); False: the per-op path."""
    torch.manual_seed(0)
    return at.Transformer(**CFG, one_call="auto" if one_call else False)


def main():
    rank, world, port, out, batch = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), \
        sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    print(f"rank {rank}: joining on port {port}", flush=True)
    # a rendezvous that cannot complete fails in 60 s instead of hanging
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    print(f"rank {rank}: joined", flush=True)
    try:
        tok, tgt = torch.load(batch)
        shard = tok.shape[0] // world
        sl = slice(rank * shard, (rank + 1) * shard)
        one_call = os.environ.get("ANEBACKWARD_TEST_ONE_CALL") == "1"
        model = DDP(build(one_call))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        model(tok[sl], tgt[sl])
        loss = model.module.last_loss
        taken = type(loss.grad_fn).__name__ == "ModelFunctionBackward"
        assert taken == one_call, f"one-call path taken: {taken}, wanted {one_call}"
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.module.named_parameters()}
        opt.step()
        if rank == 0:
            params = {n: p.detach().clone() for n, p in model.module.named_parameters()}
            torch.save({"grads": grads, "params": params, "loss": loss.item()}, out)
        dist.barrier()  # nobody tears down gloo while the other rank still talks
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
