"""Fine-tuning batches with padding and packing: where the work goes.

    python -m anebackward.bench.hf_padded --threads 2 --repeats 6

An SFT-like batch at the stories15M shape (dim 288, 6 layers, 6 heads,
hidden 768, vocab 32000, tied): 8 documents of lengths uniform in 32..256,
the first 30 % of each (the prompt) masked with -100. Contenders, one step
each per round (round-robin, so load from other processes hits them alike),
medians reported:

  hf-padded       unpatched HF (sdpa), the documents right-padded to 256
  patched-padded  the same model patched by anebackward.transformers.apply
  hf-packed       unpatched HF, the documents flattened into one row with
                  restarting position_ids (DataCollatorWithFlattening's
                  form; use_cache=False so HF keeps documents apart)
  patched-packed  the same, patched
  (HF steps: forward + backward + fused torch.optim.AdamW)
  llama-padded    anebackward.Llama forward + backward on the padded batch
                  (attention_mask: the C model runs the real tokens only)
  llama-full      the same [8, 256] as full rows (every position computed)

llama-padded / llama-full against real tokens / (8 * 256) shows that the
padding costs no work.
"""
import argparse
import copy
import statistics
import time

import numpy as np
import torch

from . import env
from .hf_step import build

B, S, V = 8, 256, 32000


def make_batch(seed=1):
    """(padded ids, mask, labels [B, S]; packed ids, position_ids, labels [1, N])."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(32, S + 1, B)
    ids = torch.zeros(B, S, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    labels = torch.full((B, S), -100, dtype=torch.long)
    docs = []
    for i, n in enumerate(lengths):
        d = torch.from_numpy(rng.integers(1, V, n))
        ids[i, :n], mask[i, :n] = d, 1
        labels[i, int(0.3 * n):n] = d[int(0.3 * n):]
        docs.append(d)
    flat = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    flab = torch.cat([labels[i, :n] for i, n in enumerate(lengths)])[None]
    return lengths, (ids, mask, labels), (flat, pos, flab)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--warmup-calls", dest="warmup", type=int, default=1)
    a = ap.parse_args(argv)
    import anebackward
    from anebackward import Llama, LlamaConfig
    print(f"{env.machine_load()}; torch {torch.__version__}; --threads {a.threads}")
    torch.set_num_threads(a.threads)
    anebackward.set_num_threads(a.threads)
    lengths, (ids, mask, labels), (flat, pos, flab) = make_batch()
    n_real = int(lengths.sum())
    print(f"batch {B} x {S}: lengths {sorted(lengths.tolist())}, {n_real} real tokens "
          f"({n_real / (B * S):.0%} of {B * S}), prompt 30 % masked")

    hf = {}
    for name, variant in (("hf", "sdpa"), ("patched", "patched")):
        m = build(variant, S, V, shape="stories15M")   # the shape of the batch above
        hf[name] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True))
    padded = dict(input_ids=ids, attention_mask=mask, labels=labels)
    packed = dict(input_ids=flat, position_ids=pos, labels=flab, use_cache=False)

    def hf_step(name, inputs):
        m, opt = hf[name]
        loss = m(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    cfg = LlamaConfig(dim=288, hidden_dim=768, n_layers=6, n_heads=6, n_kv_heads=6,
                      vocab_size=V, max_seq_len=S, shared_classifier=True)
    llama = Llama(cfg, seed=0)
    np_ids, np_mask = ids.numpy(), mask.numpy()
    tgt = np.full((B, S), -1, np.int64)
    tgt[:, :-1] = labels.numpy()[:, 1:]
    tgt[tgt == -100] = -1
    full_tgt = np.full((B, S), -1, np.int64)
    full_tgt[:, :-1] = np_ids[:, 1:]

    def llama_step(padded_layout):
        if padded_layout:
            loss = llama.forward(np_ids, tgt, attention_mask=np_mask)
        else:
            loss = llama.forward(np_ids, full_tgt)
        llama.backward()
        return loss

    contenders = {
        "hf-padded": lambda: hf_step("hf", padded),
        "patched-padded": lambda: hf_step("patched", padded),
        "hf-packed": lambda: hf_step("hf", packed),
        "patched-packed": lambda: hf_step("patched", packed),
        "llama-padded": lambda: llama_step(True),
        "llama-full": lambda: llama_step(False),
    }
    first = {}
    for name, fn in contenders.items():
        first[name] = fn()
        for _ in range(a.warmup - 1):
            fn()
    times = {n: [] for n in contenders}
    names = list(contenders)
    for r in range(a.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:   # rotating order
            t0 = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"{a.repeats} timed steps each after {a.warmup} warm-up, medians:")
    for n in names:
        print(f"  {n:<15} {med[n] * 1e3:9.1f} ms  (min {min(times[n]) * 1e3:8.1f})  "
              f"first loss {first[n]:.5f}")
    print(f"  patched-padded: {med['hf-padded'] / med['patched-padded']:.2f}x unpatched HF; "
          f"patched-packed: {med['hf-packed'] / med['patched-packed']:.2f}x unpatched HF")
    print(f"  llama-padded / llama-full = {med['llama-padded'] / med['llama-full']:.2f} "
          f"(real tokens / all positions = {n_real / (B * S):.2f})")
    return med


if __name__ == "__main__":
    main()
