"""One rank of the all-reduce counting test (tests/test_distributed_train.py),
started by torchrun: counts this rank's torch.distributed.all_reduce calls
(and the floats each reduces) while `anebackward train ARGS...` runs, and
writes them as JSON to $COUNT_OUT.RANK."""
import json
import os
import sys

import torch.distributed as dist

from anebackward.__main__ import main

calls = []
real = dist.all_reduce


def counting(tensor, *a, **k):
    calls.append(int(tensor.numel()))
    return real(tensor, *a, **k)


dist.all_reduce = counting
rc = main(["train", *sys.argv[1:]])
with open(f"{os.environ['COUNT_OUT']}.{os.environ['RANK']}", "w") as f:
    json.dump({"rc": rc, "calls": calls}, f)
