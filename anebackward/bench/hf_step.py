"""One training step (forward + backward + AdamW) of a Hugging Face
LlamaForCausalLM: unpatched ("sdpa", "eager") vs patched by
anebackward.transformers.apply, side by side in one process.

    python -m anebackward.bench.hf_step --threads 2 --repeats 8
    python -m anebackward.bench.hf_step --shape llama512 --fused --variants sdpa,patched

The model is built locally from a config, random weights, the same for
every variant: --shape stories15M (dim 288, 6 layers, 6 heads, hidden 768,
vocab 32000, tied; seq 256, batch 1; the default) or llama512 (dim 512, 4
layers, 8 heads, hidden 1536 (llama2.c's rule), vocab 8000, untied; seq 256, batch 4).
--fused: torch.optim.AdamW(fused=True) for every variant. Variants run round-robin (one step each
per round) so that load from other processes hits them alike; medians are
reported, with each variant's ratio to "sdpa".

Under torch.autocast("cpu", torch.bfloat16): "sdpa-bf16" (unpatched) and
"patched-bf16" (the one-call path at precision "bf16"); their ratio column is
to "sdpa-bf16". "patched-bf16-switched" is patched-bf16 with an untimed fp32
forward on the same model before each timed step, so each timed step
includes switching the engine back to bf16 (its cost: the difference to
patched-bf16).

    python -m anebackward.bench.hf_step --threads 2 --repeats 15 --fused \
        --variants sdpa-bf16,patched-bf16,patched-bf16-switched
"""
import argparse
import copy
import statistics
import time

import torch

from . import env

VARIANTS = ("sdpa", "eager", "patched", "sdpa-bf16", "patched-bf16", "patched-bf16-switched")
DEFAULT_VARIANTS = ("sdpa", "eager", "patched")


SHAPES = {
    "stories15M": dict(hidden_size=288, intermediate_size=768, num_hidden_layers=6,
                       num_attention_heads=6, vocab_size=32000, tie_word_embeddings=True, batch=1),
    "llama512": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                     num_attention_heads=8, vocab_size=8000, tie_word_embeddings=False, batch=4),
}


def build(variant, S, V=None, shape="stories15M"):
    from transformers import LlamaConfig, LlamaForCausalLM
    c = {k: v for k, v in SHAPES[shape].items() if k != "batch"}
    if V is not None:
        c["vocab_size"] = V
    cfg = LlamaConfig(num_key_value_heads=c["num_attention_heads"], max_position_embeddings=S, **c)
    cfg._attn_implementation = "eager" if variant == "eager" else "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).train()
    if variant.startswith("patched"):
        import anebackward.transformers
        anebackward.transformers.apply(model)
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--warmup-calls", dest="warmup", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--shape", choices=list(SHAPES), default="stories15M")
    ap.add_argument("--fused", action="store_true", help="torch.optim.AdamW(fused=True)")
    a = ap.parse_args(argv)
    variants = a.variants.split(",")
    if any(v not in VARIANTS for v in variants):
        ap.error(f"variants: choose from {', '.join(VARIANTS)}")
    V, B = SHAPES[a.shape]["vocab_size"], SHAPES[a.shape]["batch"]
    print(f"{env.machine_load()}; torch {torch.__version__}; --threads {a.threads}")
    torch.set_num_threads(a.threads)  # the patched model sets the package's to 1 (apply's "auto")
    if any("-bf16" in v for v in variants):
        from anebackward import bf16
        print(f"bf16 path: {bf16.describe()}")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, a.seq), generator=g)
    setups = {}
    for v in variants:
        m = build(v, a.seq, shape=a.shape)
        setups[v] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4, fused=a.fused or None))

    def step(v):
        m, opt = setups[v]
        if v.endswith("-switched"):  # the engine to fp32 (untimed): the step switches it back
            with torch.no_grad():
                m(input_ids=ids, labels=ids)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled="-bf16" in v):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, loss.item()

    first = {v: step(v)[1] for v in variants}  # same weights: the same first loss
    for _ in range(a.warmup - 1):
        for v in variants:
            step(v)
    times = {v: [] for v in variants}
    for _ in range(a.repeats):
        for v in variants:
            times[v].append(step(v)[0])
    base = {b: statistics.median(times[b]) for b in ("sdpa", "sdpa-bf16") if b in times}
    print(f"HF LlamaForCausalLM, {a.shape} shape, seq {a.seq}, batch {B}, "
          f"{'fused ' if a.fused else ''}AdamW; {a.repeats} timed steps each after {a.warmup} "
          f"warm-up; ratio: sdpa/this (fp32), sdpa-bf16/this (autocast bf16)")
    print(f"  {'variant':<22} {'median ms':>10} {'min ms':>8} {'ratio':>7}  first-step loss")
    for v in variants:
        med = statistics.median(times[v])
        b = base.get("sdpa-bf16" if "-bf16" in v else "sdpa")
        rel = f"{b / med:6.2f}x" if b else ""
        print(f"  {v:<22} {med * 1e3:10.1f} {min(times[v]) * 1e3:8.1f} {rel:>7}  {first[v]:.6f}")
    for v in variants:   # what the one-call engine ran at its last step
        slot = setups[v][0].__dict__.get("_anebackward_slot")
        if slot is not None:
            eng = slot.engine
            print(f"  {v}: {'engine precision ' + eng.precision if eng else 'per-op/HF path'}")
    print(f"load avg after: {env.load_avg()}")
    return times


if __name__ == "__main__":
    main()
