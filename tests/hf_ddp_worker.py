"""One rank of the torchrun test of anebackward.transformers
(tests/test_transformers.py::test_trainer_torchrun_two_processes).

usage: python -m torch.distributed.run --nproc_per_node 2 ... hf_ddp_worker.py OUT.json
HF Trainer (use_cpu, gloo on loopback) trains the tiny Llama of
test_transformers.py 20 steps unpatched, then a fresh copy patched; rank 0
writes both logged loss curves (Trainer averages them over the ranks)."""
import json
import os
import pathlib
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import transformers  # noqa: E402

import anebackward.transformers as abt  # noqa: E402
from test_transformers import _trainer_losses  # noqa: E402


def main():
    torch.set_num_threads(1)
    tmp = pathlib.Path(tempfile.mkdtemp())
    curves = {p: _trainer_losses(transformers, abt, tmp, patched=p, ddp=True)
              for p in (False, True)}
    if int(os.environ.get("RANK", "0")) == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"unpatched": curves[False], "patched": curves[True],
                       "world": int(os.environ["WORLD_SIZE"])}, f)
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # nobody tears down gloo while the other rank still talks
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
