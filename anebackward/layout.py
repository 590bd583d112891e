"""Where each parameter lives in the one flat float32 buffer of a Llama.

The offsets come from C (csrc/model/model.c, ab_model_param_layout, 64-bit):
every 2-D weight first, the 1-D RMSNorm weights last,

    tok_embeddings | wq | wk | wv | wo | w1 | w2 | w3 | output (untied) || norms

so weight decay covers the prefix flat[:n_decay]. Per-kind stacks cover all
layers, as in the llama2.c checkpoint file.
"""
import math
from typing import Dict, List, Tuple

from ._native import check, ffi, lib
from .config import LlamaConfig


def c_config(config, reference=False, recompute=False, precision="fp32", lora=None):
    """The C struct ab_model_config of a LlamaConfig (reference=True: the seed
    loops; recompute=True: activation recomputation; precision "bf16": bf16
    matmul operands). The last three are how the model runs, not what it is;
    lora (an anebackward.lora.LoraConfig): the adapters' rank, scale and
    targets."""
    from .kernels.rope import rope_params
    c = ffi.new("ab_model_config *")
    c.dim, c.hidden_dim, c.n_layers = config.dim, config.hidden_dim, config.n_layers
    c.n_heads, c.n_kv_heads = config.n_heads, config.n_kv_heads
    c.vocab_size, c.max_seq_len = config.vocab_size, config.max_seq_len
    c.shared_classifier = int(config.shared_classifier)
    c.norm_eps = config.norm_eps
    c.reference = int(reference)
    c.head_dim = config.head_dim
    c.qk_norm = int(config.qk_norm)
    c.rope = rope_params("LlamaConfig", config.rope_layout, config.rope_theta, config.rope_scaling)[0]
    c.recompute = int(recompute)
    c.precision = lib.AB_PRECISION_BF16 if precision == "bf16" else lib.AB_PRECISION_FP32
    if lora is not None:
        c.lora_rank, c.lora_scale, c.lora_targets = lora.r, lora.scale, lora.mask
    return c


def param_layout(config: LlamaConfig, lora=None) -> Dict[str, int]:
    """The flat-buffer offsets (in floats) of each tensor kind, from C: a dict
    with tok_embeddings, wq, wk, wv, wo, w1, w2, w3, output, attention_norm,
    ffn_norm, norm, q_norm, k_norm, n_decay, n_params (64-bit, no overflow at any size)."""
    lay = ffi.new("ab_model_layout *")
    check(lib.ab_model_param_layout(c_config(config, lora=lora), lay), "param_layout")
    keys = ("tok_embeddings", "wq", "wk", "wv", "wo", "w1", "w2", "w3", "output",
            "attention_norm", "ffn_norm", "norm", "q_norm", "k_norm", "n_decay", "n_params")
    out = {k: int(getattr(lay, k)) for k in keys}
    for t in range(7):
        out[f"lora_a{t}"], out[f"lora_b{t}"] = int(lay.lora_a[t]), int(lay.lora_b[t])
    return out


def tensor_specs(config: LlamaConfig, lora=None) -> List[Tuple[str, int, Tuple[int, ...]]]:
    """[(name, offset, shape)] of every parameter, in flat-buffer order.
    Per-kind stacks: layer i of wq is at layout["wq"] + i * q_dim * dim.
    With lora (a LoraConfig) the adapters follow: layers.{i}.attention.wq.lora_A.weight
    [r, in], ... lora_B.weight [out, r]."""
    c, lay = config, param_layout(config, lora)
    D, Hd, V, kv, L, qd, hd = c.dim, c.hidden_dim, c.vocab_size, c.kv_dim, c.n_layers, c.q_dim, c.head_dim
    specs: List[Tuple[str, int, Tuple[int, ...]]] = [("tok_embeddings.weight",
                                                      lay["tok_embeddings"], (V, D))]
    kinds = [("attention.wq", "wq", (qd, D)), ("attention.wk", "wk", (kv, D)),
             ("attention.wv", "wv", (kv, D)), ("attention.wo", "wo", (D, qd)),
             ("feed_forward.w1", "w1", (Hd, D)), ("feed_forward.w2", "w2", (D, Hd)),
             ("feed_forward.w3", "w3", (Hd, D))]
    for sub, key, shape in kinds:
        n = shape[0] * shape[1]
        specs += [(f"layers.{i}.{sub}.weight", lay[key] + i * n, shape) for i in range(L)]
    if not c.shared_classifier:
        specs.append(("output.weight", lay["output"], (V, D)))
    specs += [(f"layers.{i}.attention_norm.weight", lay["attention_norm"] + i * D, (D,))
              for i in range(L)]
    specs += [(f"layers.{i}.ffn_norm.weight", lay["ffn_norm"] + i * D, (D,)) for i in range(L)]
    specs.append(("norm.weight", lay["norm"], (D,)))
    if c.qk_norm:
        specs += [(f"layers.{i}.attention.q_norm.weight", lay["q_norm"] + i * hd, (hd,))
                  for i in range(L)]
        specs += [(f"layers.{i}.attention.k_norm.weight", lay["k_norm"] + i * hd, (hd,))
                  for i in range(L)]
    if lora is not None:
        shapes = {sub: shape for sub, _, shape in kinds}
        for name, t, ab, i in tensor_names(config, lora):
            out, inn = shapes[name.split(".", 2)[2].split(".lora_")[0]]
            shape = (lora.r, inn) if ab == "A" else (out, lora.r)
            base = lay[f"lora_{ab.lower()}{t}"]
            specs.append((name, base + i * shape[0] * shape[1], shape))
    return specs


# ---- LoRA targets (anebackward.lora builds on these) ----
# target index (C's AB_LORA_* bit 1 << index) -> (short name, llama2.c kind, peft module)
TARGETS: Tuple[Tuple[str, str, str], ...] = (
    ("q", "attention.wq", "q_proj"), ("k", "attention.wk", "k_proj"),
    ("v", "attention.wv", "v_proj"), ("o", "attention.wo", "o_proj"),
    ("gate", "feed_forward.w1", "gate_proj"), ("down", "feed_forward.w2", "down_proj"),
    ("up", "feed_forward.w3", "up_proj"))
ALL = ("q", "k", "v", "o", "gate", "up", "down")
_ALIASES = {}
for _i, (_s, _k, _p) in enumerate(TARGETS):
    for _a in (_s, _p, _k.split(".")[1]):
        _ALIASES[_a] = _i


def target_index(fn: str, name: str) -> int:
    try:
        return _ALIASES[name]
    except (KeyError, TypeError):
        raise ValueError(f"{fn}: unknown LoRA target {name!r}; use any of "
                         f"{', '.join(ALL)} (or peft's q_proj ... / llama2.c's wq ...)") from None


def tensor_names(config: LlamaConfig, lora) -> List[Tuple[str, int, str, int]]:
    """[(name, target index, 'A' or 'B', layer)] of the adapter tensors."""
    out = []
    for ab in ("A", "B"):
        for t in sorted(lora.indices()):
            out += [(f"layers.{i}.{TARGETS[t][1]}.lora_{ab}.weight", t, ab, i)
                    for i in range(config.n_layers)]
    return out



# tensor kinds in C's order (AB_TENSOR_*): the slot of tensor (kind, layer)
# in the gradient offset table is kind * n_layers + layer
_KIND = {"tok_embeddings": 0, "attention.wq": 1, "attention.wk": 2, "attention.wv": 3,
         "attention.wo": 4, "feed_forward.w1": 5, "feed_forward.w2": 6, "feed_forward.w3": 7,
         "output": 8, "attention_norm": 9, "ffn_norm": 10, "norm": 11, "attention.q_norm": 12,
         "attention.k_norm": 13}


def tensor_slot(config: LlamaConfig, name: str) -> int:
    """The slot of a tensor name in C's gradient offset table."""
    L = config.n_layers
    stem = name[:-len(".weight")]
    if not stem.startswith("layers."):
        return _KIND[stem] * L
    _, i, rest = stem.split(".", 2)
    if ".lora_" in rest:
        kind, ab = rest.split(".lora_")
        t = target_index("tensor_slot", kind.split(".")[1])
        return (int(lib.AB_TENSOR_LORA_A if ab == "A" else lib.AB_TENSOR_LORA_B) + t) * L + int(i)
    return _KIND[rest] * L + int(i)


def views(flat, specs):
    """name -> view of flat for each (name, offset, shape) of specs."""
    return {name: flat[off:off + math.prod(shape)].reshape(shape) for name, off, shape in specs}
