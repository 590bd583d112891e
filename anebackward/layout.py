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


def c_config(config, reference=False, recompute=False, precision="fp32"):
    """The C struct ab_model_config of a LlamaConfig (reference=True: the seed
    loops; recompute=True: activation recomputation; precision "bf16": bf16
    matmul operands). The last three are how the model runs, not what it is."""
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
    return c


def param_layout(config: LlamaConfig) -> Dict[str, int]:
    """The flat-buffer offsets (in floats) of each tensor kind, from C: a dict
    with tok_embeddings, wq, wk, wv, wo, w1, w2, w3, output, attention_norm,
    ffn_norm, norm, q_norm, k_norm, n_decay, n_params (64-bit, no overflow at any size)."""
    lay = ffi.new("ab_model_layout *")
    check(lib.ab_model_param_layout(c_config(config), lay), "param_layout")
    keys = ("tok_embeddings", "wq", "wk", "wv", "wo", "w1", "w2", "w3", "output",
            "attention_norm", "ffn_norm", "norm", "q_norm", "k_norm", "n_decay", "n_params")
    return {k: int(getattr(lay, k)) for k in keys}


def tensor_specs(config: LlamaConfig) -> List[Tuple[str, int, Tuple[int, ...]]]:
    """[(name, offset, shape)] of every parameter, in flat-buffer order.
    Per-kind stacks: layer i of wq is at layout["wq"] + i * q_dim * dim."""
    c, lay = config, param_layout(config)
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
    return specs


def views(flat, specs):
    """name -> view of flat for each (name, offset, shape) of specs."""
    return {name: flat[off:off + math.prod(shape)].reshape(shape) for name, off, shape in specs}
