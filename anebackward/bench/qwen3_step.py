"""One training step (forward, backward, AdamW) of a Qwen3-shaped model:
anebackward.Llama (with and without recompute) against transformers'
Qwen3ForCausalLM on torch, one contender per process (their memory would not
fit together), the same thread count.

    python -m anebackward.bench.qwen3_step --impl ours|ours-recompute|hf \\
        [--layers 28] [--seq 256] [--steps 3] [--threads 2]

prints one JSON line: median step seconds, every step's time, the
workspace bytes (ours), peak RSS and the RSS growth of the steps after the
first (the memory a step needs beyond the model's state). Random weights and
tokens: only the time and the memory mean something.
"""
import argparse
import json
import resource
import statistics
import time

import numpy as np


def _rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m anebackward.bench.qwen3_step")
    p.add_argument("--impl", choices=("ours", "ours-recompute", "hf"), required=True)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    import anebackward as ab
    cfg = ab.LlamaConfig.preset("qwen3-0.6b", n_layers=a.layers)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, a.seq))
    times, rec = [], {"impl": a.impl, "layers": a.layers, "seq": a.seq, "batch": 1,
                      "threads": a.threads}
    if a.impl.startswith("ours"):
        ab.set_num_threads(a.threads)
        model = ab.Llama(cfg, seed=0, recompute=a.impl == "ours-recompute")
        opt = ab.AdamW(model, lr=1e-5)
        rec["workspace_bytes"] = model.workspace_bytes(1, a.seq)

        def step():
            model.forward(tokens)
            model.backward()
            opt.step()
    else:
        import torch
        import transformers
        torch.set_num_threads(a.threads)
        ab.set_num_threads(a.threads)
        hc = transformers.Qwen3Config(
            hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim, vocab_size=cfg.vocab_size, rope_theta=cfg.rope_theta,
            rms_norm_eps=cfg.norm_eps, tie_word_embeddings=True, max_position_embeddings=40960)
        model = transformers.Qwen3ForCausalLM(hc).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        ids = torch.from_numpy(tokens)
        rec["attn_implementation"] = model.config._attn_implementation

        def step():
            opt.zero_grad(set_to_none=False)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    rss = []
    for _ in range(a.steps):
        rss.append(_rss_mb())
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    rec.update(step_s_median=round(statistics.median(times[1:] or times), 3),
               step_s=[round(t, 3) for t in times],
               peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               rss_before_step2_mb=round(rss[1]) if len(rss) > 1 else None)
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
