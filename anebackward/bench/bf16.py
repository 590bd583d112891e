"""bf16 benchmarks: the linear kernels and the full training step.

    python -m anebackward.bench.bf16 linear --threads 2
    python -m anebackward.bench.bf16 step --shape stories15M --threads 2 --repeats 15
    python -m anebackward.bench.bf16 step --shape stories15M --variants fp32,bf16,torch-bf16

linear: each product of a linear layer (forward y = x Wᵀ, dx = dy W,
dW = dyᵀ x) at the stories15M / stories110M shapes, in GFLOP/s: the
package's fp32 kernel, its bf16 kernel on operands already in bf16
(ab_gemm_bf16: the model's case) with the default threading (fixed tiles on
the package's pool, one oneDNN thread each) and oneDNN's own rate (the same
product as one call threaded by oneDNN's OpenMP), and the one-call
linear(..., precision="bf16") with fp32 inputs (includes the rounding). The
shapes are the model's: the attention projections (dim x dim), the FFN's
(hidden x dim, dim x hidden) and the classifier (vocab x dim); the model
calls ab_gemm_bf16 exactly as the bf16 column does, the weight gradients
dW = dyᵀ·x included (each tile's columns of dy copied into a dense buffer).

step: forward + backward + clip + AdamW of anebackward.Llama (fp32, bf16 on
the pool, bf16 on oneDNN's threads) and of llama2.c's model.py in PyTorch
eager under torch.autocast("cpu", torch.bfloat16) (anebackward/bench/
torch_llama.py, the same initial weights and batch); --compile adds
torch.compile + autocast. "adapter-bf16" is anebackward.torch.Transformer
(the llama2.c drop-in) under the same autocast, its one-call path at
precision "bf16", with anebackward.torch.AdamW. Contenders alternate (one
step each per round) so load from other processes hits them alike; medians
are reported.
"""
import argparse
import statistics
import time

import numpy as np

import anebackward as ab
from anebackward import bf16
from anebackward._native import fptr, lib, u16ptr

SHAPES = {  # rows N (seq 256, batch 1 / seq 1024 for 110M), dim, hidden, vocab
    "stories15M": (256, 288, 768, 32000),
    "stories110M": (1024, 768, 2048, 32000),
    "tiny": (64, 32, 64, 300),            # a smoke test of the bench itself
}


def _rate(fns, flops, repeats, min_s=0.03):
    t = {k: [] for k in fns}
    for f in fns.values():
        f()
        f()
    for r in range(repeats):
        for k, f in (list(fns.items())[r % len(fns):] + list(fns.items())[:r % len(fns)]):
            n, t0 = 0, time.perf_counter()
            while True:
                f()
                n += 1
                if time.perf_counter() - t0 > min_s:
                    break
            t[k].append((time.perf_counter() - t0) / n)
    return {k: flops / statistics.median(v) / 1e9 for k, v in t.items()}


def bench_linear(args):
    rng = np.random.default_rng(0)
    print(f"bf16 path: {bf16.describe()}")
    print(f"{'shape':<12} {'product':<33} {'fp32':>7} {'bf16':>7} {'oneDNN':>7} {'1-call':>7}"
          f" {'bf16/fp32':>9} {'bf16/oneDNN':>11}   (GFLOP/s, medians)")
    for name in args.shapes.split(","):
        N, D, H, V = SHAPES[name]
        for (out, inn) in ((D, D), (H, D), (D, H), (V, D)):
            x = rng.standard_normal((N, inn), dtype=np.float32)
            W = (rng.standard_normal((out, inn), dtype=np.float32) * 0.02).astype(np.float32)
            dy = rng.standard_normal((N, out), dtype=np.float32)
            xb, Wb, dyb = bf16.to_bf16(x), bf16.to_bf16(W), bf16.to_bf16(dy)
            y = np.empty((N, out), np.float32)
            dx = np.empty((N, inn), np.float32)
            dW = np.empty((out, inn), np.float32)
            cases = {
                f"fwd   {N}x{inn}->{out}": (
                    lambda: ab.linear(x, W, out=y),
                    lambda: lib.ab_gemm_bf16(0, 1, N, out, inn, u16ptr(xb), inn, u16ptr(Wb), inn,
                                             0, fptr(y), out),
                    lambda: ab.linear(x, W, out=y, precision="bf16")),
                f"dx    {N}x{out}->{inn}": (
                    lambda: ab.linear_backward_dx(dy, W, dx=dx),
                    lambda: lib.ab_gemm_bf16(0, 0, N, inn, out, u16ptr(dyb), out, u16ptr(Wb), inn,
                                             0, fptr(dx), inn),
                    lambda: ab.linear_backward_dx(dy, W, dx=dx, precision="bf16")),
                f"dW    {out}x{inn} over {N}": (
                    lambda: ab.linear_backward_dW(dy, x, dW=dW),
                    lambda: lib.ab_gemm_bf16(1, 0, out, inn, N, u16ptr(dyb), out, u16ptr(xb), inn,
                                             0, fptr(dW), inn),
                    lambda: ab.linear_backward_dW(dy, x, dW=dW, precision="bf16")),
            }
            for label, (f32, b16, onecall) in cases.items():
                def own(b16=b16):
                    bf16.set_mode(threads="onednn")
                    try:
                        b16()
                    finally:
                        bf16.set_mode(threads="pool")
                r = _rate({"fp32": f32, "bf16": b16, "own": own, "onecall": onecall},
                          2.0 * N * out * inn, args.repeats)
                print(f"{name:<12} {label:<33} {r['fp32']:7.0f} {r['bf16']:7.0f} {r['own']:7.0f}"
                      f" {r['onecall']:7.0f} {r['bf16'] / r['fp32']:9.2f}"
                      f" {r['bf16'] / r['own']:11.2f}")


def _config(shape):
    from anebackward.config import PRESETS
    c = PRESETS[shape] if shape in PRESETS else None
    if c is None:
        raise SystemExit(f"unknown shape {shape!r}")
    return c


def bench_step(args):
    import torch
    from .torch_llama import Transformer as PlainLlama
    cfg = _config(args.shape)
    S, B = args.seq, 1
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (B, S + 1)).astype(np.int32)
    X, Y = tokens[:, :-1], tokens[:, 1:]
    T = args.threads
    contenders = {}

    def ab_step(model, opt):
        def step():
            model.forward(X, Y)
            model.backward()
            model.clip_grad_norm(1.0)
            opt.step()
            return model.last_loss
        return step

    variants = args.variants.split(",")
    base = ab.Llama(cfg, seed=0)
    for v in variants:
        if v in ("fp32", "bf16", "bf16-onednn-threads"):
            m = ab.Llama(cfg, seed=0, precision="fp32" if v == "fp32" else "bf16")
            m.flat_params[:] = base.flat_params
            m.mark_params_changed()
            contenders[v] = (ab_step(m, ab.AdamW(m, lr=1e-4)),
                             "onednn" if v == "bf16-onednn-threads" else "pool")
        elif v in ("torch-bf16", "torch-compile-bf16", "torch-fp32"):
            torch.manual_seed(0)
            tm = PlainLlama.from_config(cfg).load_arrays(base.params)
            opt = torch.optim.AdamW(tm.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                                    weight_decay=0.1)
            fwd = torch.compile(tm) if v == "torch-compile-bf16" else tm
            tx, ty = torch.from_numpy(X).long(), torch.from_numpy(Y).long()
            use_bf16 = v != "torch-fp32"

            def tstep(tm=tm, opt=opt, fwd=fwd, tx=tx, ty=ty, use_bf16=use_bf16):
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                    fwd(tx, ty)
                tm.last_loss.backward()
                torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0)
                opt.step()
                return float(tm.last_loss.detach())
            contenders[v] = (tstep, "torch")
        elif v == "adapter-bf16":
            contenders[v] = (_adapter_step(cfg, base, X, Y), "pool")
        else:
            raise SystemExit(f"unknown variant {v!r}")

    def run(v):
        fn, kind = contenders[v]
        if kind == "torch":
            torch.set_num_threads(T)
            ab.set_num_threads(1)
        else:
            torch.set_num_threads(1)
            ab.set_num_threads(T)
            bf16.set_mode(threads="onednn" if kind == "onednn" else "pool")
        t0 = time.perf_counter()
        loss = fn()
        return time.perf_counter() - t0, loss

    print(f"shape {args.shape} seq {S} batch {B} threads {T}; bf16 path: {bf16.describe()}")
    first = {}
    for v in variants:                       # warm-up (torch.compile compiles here)
        for i in range(args.warmup):
            dt, loss = run(v)
            first.setdefault(v, float(loss))
    wall = {v: [] for v in variants}
    for r in range(args.repeats):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            wall[v].append(run(v)[0])
    bf16.set_mode(threads="pool")
    med = {v: statistics.median(wall[v]) for v in variants}
    ref = med.get("fp32")
    print(f"  {'variant':<22} {'median ms':>10} {'min ms':>8} {'fp32/this':>10} {'first loss':>11}")
    for v in variants:
        rel = f"{ref / med[v]:10.2f}" if ref else f"{'':>10}"
        print(f"  {v:<22} {med[v] * 1e3:10.1f} {min(wall[v]) * 1e3:8.1f} {rel} {first[v]:11.5f}")
    for a, b in (("bf16", "torch-bf16"), ("bf16", "torch-compile-bf16"),
                 ("bf16", "bf16-onednn-threads"), ("adapter-bf16", "torch-bf16")):
        if a in med and b in med:
            print(f"  {b}/{a}: {med[b] / med[a]:.2f}")


def _adapter_step(cfg, base, X, Y):
    """One step of anebackward.torch.Transformer (base's weights) under
    torch.autocast("cpu", torch.bfloat16): forward, backward, clip, AdamW."""
    import torch
    from ..torch import AdamW, Transformer
    m = Transformer(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                    n_kv_heads=cfg.n_kv_heads, vocab_size=cfg.vocab_size,
                    hidden_dim=cfg.hidden_dim, max_seq_len=cfg.max_seq_len,
                    norm_eps=cfg.norm_eps, return_logits=False, blas_threads=None)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.from_numpy(base.params[name]))
    opt = AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    tx, ty = torch.from_numpy(X).long(), torch.from_numpy(Y).long()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(tx, ty)
        m.last_loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        if m._slot.engine.precision != "bf16":
            raise RuntimeError(f"adapter-bf16 ran at {m._slot.engine.precision}")
        return float(m.last_loss.detach())
    return step


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m anebackward.bench.bf16", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("linear")
    a.add_argument("--shapes", default="stories15M,stories110M")
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--repeats", type=int, default=7)
    s = sub.add_parser("step")
    s.add_argument("--shape", default="stories15M")
    s.add_argument("--seq", type=int, default=256)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--repeats", type=int, default=15)
    s.add_argument("--warmup-calls", dest="warmup", type=int, default=2)
    s.add_argument("--variants", default="fp32,bf16,bf16-onednn-threads,torch-bf16")
    args = p.parse_args(argv)
    bf16.require("anebackward.bench.bf16")
    ab.set_num_threads(args.threads)
    if args.cmd == "linear":
        bench_linear(args)
    else:
        bench_step(args)


if __name__ == "__main__":
    main()
