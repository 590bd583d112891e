"""LoRA benchmarks: the training step and its peak memory.

    python -m anebackward.bench.lora step --shape stories110M --seq 256 --threads 2 --repeats 7
    python -m anebackward.bench.lora rss --shape qwen3-0.6b --seq 256

step: one training step (forward + backward + clip + AdamW) of
anebackward.Llama with full fine-tuning and with LoRA (rank --rank, alpha
2*rank, the seven projections, base frozen), random weights, one batch of
--batch x --seq tokens (--precision: ours; with bf16 the HF contenders run
under torch.autocast("cpu", torch.bfloat16) — the patched one's engine then
computes bf16 — and HF + peft unpatched runs both plain fp32 and under that
autocast). --hf-peft adds the same LoRA step in Hugging Face
transformers + peft, unpatched (sdpa attention, torch's fused AdamW over the
adapters, the same weights saved and loaded as an HF directory) and the same
model patched by anebackward.transformers before peft wraps it
(hf-peft-patched: the whole model as one C call forward and one backward,
the base frozen in C, torch's fused AdamW over the adapters that view the
engine's buffer). The contenders alternate (one step each per round) so load from other processes
hits them alike; medians are reported.

rss: the peak resident memory (ru_maxrss) of one training step with
--recompute, full fine-tuning and LoRA, each in a fresh subprocess.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

import anebackward as ab
from anebackward.lora import LoraConfig


def _model(shape, lora, rank, recompute=False, precision="fp32"):
    cfg = ab.LlamaConfig.preset(shape)
    lc = LoraConfig(rank, alpha=2 * rank) if lora else None
    return ab.Llama(cfg, seed=0, lora=lc, recompute=recompute, precision=precision)


def _step(model, opt, tok):
    model.forward(tok)
    model.backward()
    model.clip_grad_norm(1.0)
    opt.step()


class _HFPeft:
    """The LoRA step in HF transformers + peft, unpatched: a model and its
    optimizer, called like (model, opt, tokens) -> one step."""

    def __init__(self, model, rank, tok, patched=False, bf16=False):
        import tempfile
        import peft
        import torch
        import transformers
        d = tempfile.mkdtemp()
        model.save_pretrained(d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa",
                                                               dtype=torch.float32)
        if patched:
            import anebackward.transformers as abt
            abt.apply(hf, blas_threads=None)
        lc = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                             "gate_proj", "up_proj", "down_proj"])
        self.model = peft.get_peft_model(hf, lc)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-5, fused=True)
        self.tok = torch.from_numpy(tok.astype(np.int64))
        self.torch = torch
        self.patched = patched
        self.bf16 = bf16

    def on_one_call_path(self):
        """The patched model's last step ran as the C model with adapters."""
        slot = self.model.get_base_model().__dict__.get("_anebackward_slot")
        return slot is not None and slot.engine is not None and slot.engine.lora is not None \
            and slot.current(self.model.get_base_model())

    def __call__(self):
        with self.torch.autocast("cpu", dtype=self.torch.bfloat16, enabled=self.bf16):
            out = self.model(input_ids=self.tok, labels=self.tok)
        out.loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def step(args):
    ab.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    runs = {}
    for name, lora in (("full", False), (f"lora-r{args.rank}", True)):
        m = _model(args.shape, lora, args.rank, precision=args.precision)
        tok = rng.integers(0, m.config.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
        runs[name] = (lambda m=m, o=ab.AdamW(m, lr=1e-5), t=tok[:, :args.seq]: _step(m, o, t))
        runs[name]()                                             # warm-up
    if args.hf_peft:
        import torch
        torch.set_num_threads(args.threads)
        base = _model(args.shape, False, args.rank)
        bf16 = args.precision == "bf16"
        hf_runs = [(f"hf-peft-r{args.rank}", False, False), ("hf-peft-patched", True, bf16)]
        if bf16:
            hf_runs.append((f"hf-peft-r{args.rank}-autocast", False, True))
        for k, patched, autocast in hf_runs:
            runs[k] = _HFPeft(base, args.rank, tok[:, :args.seq], patched=patched, bf16=autocast)
            runs[k]()                                            # warm-up
        patched = runs["hf-peft-patched"]
        if not patched.on_one_call_path():
            raise RuntimeError("bench: the patched HF + peft model did not take the one-call path")
        engine = patched.model.get_base_model()._anebackward_slot.engine
        if engine.precision != args.precision:
            raise RuntimeError(f"bench: the patched engine ran {engine.precision}, "
                               f"not {args.precision}")
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[k].append(1e3 * (time.perf_counter() - t0))
    full = statistics.median(times["full"])
    print(f"{args.shape}, batch {args.batch} x seq {args.seq}, {args.threads} threads, "
          f"precision {args.precision}, {args.repeats} alternating rounds after a warm-up")
    for k, t in times.items():
        med = statistics.median(t)
        print(f"  {k:16s} median {med:8.1f} ms  (min {min(t):.1f}, max {max(t):.1f})  "
              f"ratio to full {med / full:.3f}")
    hf = f"hf-peft-r{args.rank}"
    if hf in times:
        ours = statistics.median(times[f"lora-r{args.rank}"])
        print(f"  hf-peft / lora (ours): {statistics.median(times[hf]) / ours:.2f}x")
        print(f"  hf-peft / hf-peft-patched: "
              f"{statistics.median(times[hf]) / statistics.median(times['hf-peft-patched']):.2f}x")
    if f"{hf}-autocast" in times:
        ratio = statistics.median(times[hf + "-autocast"]) / statistics.median(
            times["hf-peft-patched"])
        print(f"  hf-peft under autocast bf16 / hf-peft-patched (bf16): {ratio:.2f}x")


def _one(args):
    """One step in this process; prints its peak RSS as JSON."""
    ab.set_num_threads(args.threads)
    m = _model(args.shape, args.which == "lora", args.rank, recompute=True)
    opt = ab.AdamW(m, lr=1e-5)
    tok = np.random.default_rng(0).integers(0, m.config.vocab_size, (1, args.seq)).astype(np.int32)
    t0 = time.perf_counter()
    _step(m, opt, tok)
    print(json.dumps({"which": args.which, "maxrss_mb": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024, "step_s": time.perf_counter() - t0,
        "n_params": m.n_params, "n_grads": m.n_grads}))


def rss(args):
    res = {}
    for which in ("full", "lora"):
        out = subprocess.run([sys.executable, "-m", "anebackward.bench.lora", "_one", which,
                              "--shape", args.shape, "--seq", str(args.seq), "--rank",
                              str(args.rank), "--threads", str(args.threads)],
                             check=True, capture_output=True, text=True).stdout
        res[which] = json.loads(out.strip().splitlines()[-1])
    print(f"{args.shape}, seq {args.seq}, batch 1, --recompute, one step (fresh process each)")
    for k, r in res.items():
        print(f"  {k:5s} peak RSS {r['maxrss_mb']:9.0f} MB  params {r['n_params']:,}  "
              f"trainable {r['n_grads']:,}  step {r['step_s']:.1f} s")
    print(f"  LoRA / full peak RSS: {res['lora']['maxrss_mb'] / res['full']['maxrss_mb']:.3f}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m anebackward.bench.lora")
    p.add_argument("what", choices=("step", "rss", "_one"))
    p.add_argument("which", nargs="?", choices=("full", "lora"))
    p.add_argument("--shape", default="stories110M")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--hf-peft", action="store_true",
                   help="step: add HF transformers + peft, unpatched (needs the hf extra, peft)")
    args = p.parse_args(argv)
    {"step": step, "rss": rss, "_one": _one}[args.what](args)


if __name__ == "__main__":
    main()
