"""The memory of one HF training step, for a Qwen3-shaped model (vocab
151,936, seq 1024, hidden 512, tied; 2 layers unless --layers N): the
model's own state (parameters, gradients, AdamW moments), peak RSS during
the second step minus the RSS before it (Linux: VmHWM reset through
clear_refs) and the process's peak RSS (getrusage ru_maxrss). Run each
variant in its own process:

    python -m anebackward.bench.hf_memory unpatched
    python -m anebackward.bench.hf_memory patched
    python -m anebackward.bench.hf_memory patched-checkpointing   # + gradient checkpointing

or compare the one-call path with and without gradient checkpointing, each
in a fresh subprocess:

    python -m anebackward.bench.hf_memory compare --layers 8
"""
import argparse
import resource
import subprocess
import sys

import torch

VARIANTS = ("unpatched", "patched", "patched-checkpointing")


def _status(key):
    """A /proc/self/status field in MB (VmRSS: now; VmHWM: peak since reset)."""
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key} (Linux only)")


def _max_rss_mb():
    """This process's peak RSS in MB (ru_maxrss: kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(variant, layers):
    """One variant's numbers (a dict), measured in this process."""
    import warnings
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.set_num_threads(2)
    V, S = 151936, 1024
    cfg = Qwen3Config(vocab_size=V, hidden_size=512, intermediate_size=1536,
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                      head_dim=64, tie_word_embeddings=True, max_position_embeddings=S)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    m = Qwen3ForCausalLM(cfg).train()
    if variant != "unpatched":
        import anebackward.transformers
        anebackward.transformers.apply(m)
    if variant == "patched-checkpointing":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            m.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    ids = torch.randint(0, V, (1, S))

    def step():
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # gradients stay allocated: part of the state
        return out

    out = step()
    path = type(out.loss.grad_fn).__name__
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    step()
    peak = _status("VmHWM")
    state = sum(p.numel() for p in m.parameters()) * 4 * 4 / 2**20
    slot = m.__dict__.get("_anebackward_slot")
    ws = None if slot is None or slot.engine is None else slot.engine.workspace_bytes(1, S) / 2**20
    return dict(variant=variant, layers=layers, state=state, before=before, peak=peak,
                extra=peak - before, max_rss=_max_rss_mb(), path=path, workspace=ws)


def _line(r):
    return (f"{r['variant']}: state {r['state']:.0f} MB (params, grads, 2 AdamW moments), RSS "
            f"before step 2 {r['before']:.0f} MB, peak in step 2 {r['peak']:.0f} MB, extra "
            f"{r['extra']:.0f} MB, process peak (ru_maxrss) {r['max_rss']:.0f} MB, loss from "
            f"{r['path']}" + ("" if r.get("workspace") is None else
                              f", C model workspace {r['workspace']:.0f} MB"))


def compare(layers):
    """patched vs patched-checkpointing, each in a fresh subprocess."""
    import json
    rows = []
    for v in ("patched", "patched-checkpointing"):
        p = subprocess.run([sys.executable, "-m", "anebackward.bench.hf_memory", v, "--layers",
                            str(layers), "--json"], capture_output=True, text=True, check=True)
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(_line(rows[-1]))
    a, b = rows
    print(f"Qwen3-shaped step (vocab 151936, seq 1024, hidden 512, {layers} layers), one-call path:"
          f" checkpointing lowers the process peak RSS by "
          f"{100 * (1 - b['max_rss'] / a['max_rss']):.0f} % ({a['max_rss']:.0f} -> "
          f"{b['max_rss']:.0f} MB) and the peak above the model state by "
          f"{100 * (1 - (b['max_rss'] - b['state']) / (a['max_rss'] - a['state'])):.0f} % "
          f"({a['max_rss'] - a['state']:.0f} -> {b['max_rss'] - b['state']:.0f} MB); the C "
          f"model's workspace by {100 * (1 - b['workspace'] / a['workspace']):.0f} % "
          f"({a['workspace']:.0f} -> {b['workspace']:.0f} MB, of which the [1024, 151936] logits "
          f"are {1024 * 151936 * 4 / 2**20:.0f} MB)")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m anebackward.bench.hf_memory",
                                 description="Memory of one Qwen3-shaped HF training step.")
    ap.add_argument("variant", choices=VARIANTS + ("compare",))
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    ap.add_argument("--json", action="store_true", help="print the numbers as one JSON line")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.variant == "compare":
        return compare(args.layers)
    r = measure(args.variant, args.layers)
    if args.json:
        import json
        print(json.dumps(r))
    else:
        print(_line(r))


if __name__ == "__main__":
    main()
