"""One training step (forward + backward + AdamW) of a llama2.c-style Llama:
plain PyTorch eager vs the same model on anebackward.torch.

    python -m anebackward.bench.torch_step            # small shape and stories15M
    python -m anebackward.bench.torch_step --shape small --repeats 20
    python -m anebackward.bench.torch_step --threads 2 --shape stories15M --variants plain,ab

"plain" is PyTorch eager written as llama2.c's model.py (its flash path:
F.scaled_dot_product_attention(is_causal=True), F.cross_entropy: the
project's one plain-PyTorch Llama, anebackward/bench/torch_llama.py); the other
rows are anebackward.torch.Transformer with the same weights, with the dense
projections in torch (MKL) or in the package's linear kernels (OpenBLAS), and
the optimizer its configure_optimizers returns (anebackward.torch.AdamW)
unless the variant says otherwise.
Variants run round-robin (one step each per round) so that load from other
processes on a shared machine hits them alike; the medians are reported.
"""
import argparse
import os
import platform
import statistics
import time

import torch

import anebackward
import anebackward.torch as at

from . import env
from .torch_llama import Transformer as PlainLlama

SHAPES = {
    "small": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=None, vocab_size=2048,
                  hidden_dim=352, max_seq_len=128, batch=4),
    "stories15M": dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=None, vocab_size=32000,
                       hidden_dim=768, max_seq_len=256, batch=1),
}


# name: (model, linear, return_logits, torch threads, anebackward threads);
# "T" = --threads. PyTorch's and OpenBLAS's thread pools both busy-wait, so
# each variant gives the threads to whoever runs the matmuls. "ab-onecall"
# and "ab-default" (Transformer's defaults: one_call="auto", return_logits=True,
# the logits carrying gradient into the C backward) take Transformer's one-call
# path (the whole step in C).
VARIANTS = {
    "plain": ("plain", "torch", True, "T", 1),
    "ab": ("ab", "torch", True, "T", 1),
    "ab-torchopt": ("ab", "torch", True, "T", 1),  # ab with torch.optim.AdamW
    "ab-nologits": ("ab", "torch", False, "T", 1),
    "ab-2pools": ("ab", "torch", True, "T", "T"),
    "ab-linear": ("ab", "anebackward", True, 1, "T"),
    "ab-onecall": ("ab", "torch", False, 1, "T"),
    "ab-default": ("ab", "torch", True, "T", "T"),  # Transformer() as llama2.c's train.py builds it
}


def optimizer_for(variant, model):
    """llama2.c's configure_optimizers groups: torch.optim.AdamW for plain
    (and ab-torchopt), anebackward.torch.AdamW (the fused C update, what
    anebackward.torch.Transformer.configure_optimizers returns) otherwise."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    nodecay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": nodecay, "weight_decay": 0.0}]
    cls = torch.optim.AdamW if variant in ("plain", "ab-torchopt") else at.AdamW
    return cls(groups, lr=1e-4, betas=(0.9, 0.95))


def threads_of(variant, T):
    _, _, _, tt, at_ = VARIANTS[variant]
    return (T if tt == "T" else tt), (T if at_ == "T" else at_)


def build(shape, variant):
    c = SHAPES[shape]
    kind, linear, return_logits, _, _ = VARIANTS[variant]
    args = {k: v for k, v in c.items() if k != "batch"}
    torch.manual_seed(0)
    ours = at.Transformer(at.ModelArgs(**args), linear=linear, return_logits=return_logits,
                          blas_threads=None,  # each variant sets its threads per step
                          one_call={"ab-onecall": True, "ab-default": "auto"}.get(variant, False))
    if kind == "plain":
        plain = PlainLlama(**args)
        plain.load_state_dict(ours.state_dict())
        return plain
    return ours


def step(model, opt, X, Y):
    model(X, Y)
    model.last_loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model.last_loss.item()


def run_shape(shape, variants, repeats, warmup, T):
    c = SHAPES[shape]
    g = torch.Generator().manual_seed(1)
    X = torch.randint(0, c["vocab_size"], (c["batch"], c["max_seq_len"]), generator=g)
    Y = torch.randint(0, c["vocab_size"], (c["batch"], c["max_seq_len"]), generator=g)
    setups = {}
    for v in variants:
        m = build(shape, v)
        setups[v] = (m, optimizer_for(v, m))

    def timed_step(v):
        tt, abt = threads_of(v, T)
        torch.set_num_threads(tt)
        anebackward.set_num_threads(abt)
        m, o = setups[v]
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step(m, o, X, Y)
        return (time.perf_counter() - t0, time.process_time() - c0), loss

    first = {v: timed_step(v)[1] for v in variants}  # same weights: same first loss
    for _ in range(warmup - 1):
        for v in variants:
            timed_step(v)
    times = {v: [] for v in variants}
    for _ in range(repeats):
        for v in variants:
            times[v].append(timed_step(v)[0])
    n_params = sum(p.numel() for p in setups[variants[0]][0].parameters())
    print(f"\n{shape}: dim {c['dim']}, {c['n_layers']} layers, {c['n_heads']} heads, hidden "
          f"{c['hidden_dim']}, vocab {c['vocab_size']}, seq {c['max_seq_len']}, batch {c['batch']} "
          f"({n_params / 1e6:.1f}M params); {repeats} timed steps each after {warmup} warm-up")
    wall = {v: [w for w, _ in ts] for v, ts in times.items()}
    cpu = {v: [c for _, c in ts] for v, ts in times.items()}
    base = statistics.median(wall["plain"]) if "plain" in wall else None
    print(f"  {'variant':<12} {'threads':>8} {'median ms':>10} {'min ms':>8} {'cpu ms':>8} "
          f"{'plain/this':>11}  first-step loss")
    for v in variants:
        med, mn = statistics.median(wall[v]), min(wall[v])
        tt, abt = threads_of(v, T)
        rel = f"{base / med:10.2f}x" if base else ""
        print(f"  {v:<12} {f'{tt}+{abt}':>8} {med * 1e3:10.1f} {mn * 1e3:8.1f} "
              f"{statistics.median(cpu[v]) * 1e3:8.1f} {rel:>11}  {first[v]:.6f}")
    print("  threads = torch + anebackward(OpenBLAS); ms = wall-clock per step (median, min);\n"
          "  cpu ms = median process CPU time per step (includes busy-waiting threads);\n"
          "  plain/this = ratio of wall medians, > 1 means anebackward.torch is faster")
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup-calls", dest="warmup", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma list of: plain (PyTorch eager), ab (package kernels + torch "
                         "matmuls + anebackward.torch.AdamW), ab-torchopt (ab with "
                         "torch.optim.AdamW), ab-nologits (ab, return_logits=False), ab-2pools (ab with "
                         "both thread pools at --threads), ab-linear (package linear kernels too), "
                         "ab-onecall (return_logits=False on the one-call path: the whole step "
                         "in C), ab-default (Transformer() defaults, as llama2.c's train.py: "
                         "one-call, logits returned)")
    a = ap.parse_args()
    info = anebackward.blas_info()
    print(f"machine: {platform.machine()} {env.machine_load()}")
    print(f"torch {torch.__version__}; anebackward BLAS {info['blas']} core {info['corename']}; "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}; --threads {a.threads}")
    variants = a.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")
    for shape in (SHAPES if a.shape == "all" else [a.shape]):
        run_shape(shape, variants, a.repeats, a.warmup, a.threads)


if __name__ == "__main__":
    main()
