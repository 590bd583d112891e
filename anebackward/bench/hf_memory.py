"""The memory one HF training step needs beyond the model's own state
(parameters, gradients, AdamW moments), for a Qwen3-shaped model (vocab
151,936, seq 1024, 2 layers, hidden 512, tied): peak RSS during the second
step minus the RSS before it (Linux: VmHWM reset through clear_refs). Run
each variant in its own process:

    python -m anebackward.bench.hf_memory unpatched
    python -m anebackward.bench.hf_memory patched
"""
import sys

import torch


def _status(key):
    """A /proc/self/status field in MB (VmRSS: now; VmHWM: peak since reset)."""
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key} (Linux only)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv not in (["patched"], ["unpatched"]):
        raise SystemExit("usage: python -m anebackward.bench.hf_memory patched|unpatched")
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.set_num_threads(2)
    V, S = 151936, 1024
    cfg = Qwen3Config(vocab_size=V, hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                      tie_word_embeddings=True, max_position_embeddings=S)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    m = Qwen3ForCausalLM(cfg).train()
    if argv[0] == "patched":
        import anebackward.transformers
        anebackward.transformers.apply(m)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    ids = torch.randint(0, V, (1, S))

    def step():
        m(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # gradients stay allocated: part of the state

    step()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    step()
    peak = _status("VmHWM")
    state = sum(p.numel() for p in m.parameters()) * 4 * 4 / 2**20
    print(f"{argv[0]}: state {state:.0f} MB (params, grads, 2 AdamW moments), RSS before step 2 "
          f"{before:.0f} MB, peak in step 2 {peak:.0f} MB, extra {peak - before:.0f} MB")


if __name__ == "__main__":
    main()
