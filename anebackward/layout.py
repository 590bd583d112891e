"""Where each parameter lives in the one flat float32 buffer of a Llama.

Everything here comes from C's table of the model's tensors
(csrc/model/model.c, ab_model_tensors: name, offset, shape, gradient
offset, gradient group, decay; 64-bit), the same code that lays out the
buffer: every 2-D weight first, the 1-D RMSNorm weights last,

    tok_embeddings | wq | wk | wv | wo | w1 | w2 | w3 | output (untied) || norms

so weight decay covers the prefix flat[:n_decay]. Per-kind stacks cover all
layers, as in the llama2.c checkpoint file. The names are llama2.c's
("layers.3.attention.wq.weight"); anebackward.hf.hf_name gives HF's.
"""
import math
import weakref
from typing import Dict, List, NamedTuple, Tuple

from ._native import check, ffi, lib
from .config import LlamaConfig


# each config's ab_model_options, alive as long as the config that points to it
_OPTIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def c_config(config, reference=False, recompute=False, precision="fp32", lora=None):
    """The C structs of a LlamaConfig: an ab_model_config (the architecture;
    lora, an anebackward.lora.LoraConfig: the adapters' rank, scale and
    targets) whose .options points to an ab_model_options (how it runs:
    reference=True the seed loops, recompute=True activation recomputation,
    precision "bf16" bf16 matmul operands; .options.lora_merged and
    .options.grad_offsets are the caller's to set). Both struct_size fields
    are set; the options live as long as the returned config."""
    from .kernels.rope import rope_params
    c = ffi.new("ab_model_config *")
    c.struct_size = ffi.sizeof("ab_model_config")
    c.dim, c.hidden_dim, c.n_layers = config.dim, config.hidden_dim, config.n_layers
    c.n_heads, c.n_kv_heads = config.n_heads, config.n_kv_heads
    c.vocab_size, c.max_seq_len = config.vocab_size, config.max_seq_len
    c.shared_classifier = int(config.shared_classifier)
    c.norm_eps = config.norm_eps
    c.head_dim = config.head_dim
    c.qk_norm = int(config.qk_norm)
    c.rope = rope_params("LlamaConfig", config.rope_layout, config.rope_theta, config.rope_scaling)[0]
    if lora is not None:
        c.lora_rank, c.lora_scale, c.lora_targets = lora.r, lora.scale, lora.mask
    o = ffi.new("ab_model_options *")
    o.struct_size = ffi.sizeof("ab_model_options")
    o.reference = int(reference)
    o.recompute = int(recompute)
    o.precision = lib.AB_PRECISION_BF16 if precision == "bf16" else lib.AB_PRECISION_FP32
    c.options = o
    _OPTIONS[c] = o
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


class Tensor(NamedTuple):
    """One record of C's table of the model's tensors (ab_model_tensors)."""
    name: str                 # "tok_embeddings.weight", "layers.3.attention.wq.weight", ...
    kind: int                 # AB_TENSOR_*
    layer: int                # -1: not per layer
    offset: int               # floats into the parameter buffer
    shape: Tuple[int, ...]
    grad_offset: int          # floats into the gradient buffer; -1: frozen
    group: int                # the backward's gradient group (Llama.grad_groups)
    decay: bool               # AdamW decays it (the 2-D tensors)

    def slot(self, n_layers: int) -> int:
        """Its slot in C's gradient offset table (ab_model_grad_layout)."""
        return self.kind * n_layers + max(self.layer, 0)


def tensors(config: LlamaConfig, lora=None, grad_offsets=None) -> List[Tensor]:
    """Every tensor of the model, in flat-buffer order, as C lays them out
    (ab_model_tensors: the one table that the parameter and gradient
    layouts, the gradient groups and every name here come from).
    grad_offsets: the int64 array ab_model_grad_layout filled (frozen
    tensors), or None (every tensor trains: grad_offset == offset)."""
    c = c_config(config, lora=lora)
    if grad_offsets is not None:
        c.options.grad_offsets = ffi.from_buffer("int64_t[]", grad_offsets)
    n = ffi.new("int64_t *")
    check(lib.ab_model_tensors(c, ffi.NULL, 0, n), "tensors")
    recs = ffi.new("ab_model_tensor[]", max(int(n[0]), 1))
    check(lib.ab_model_tensors(c, recs, int(n[0]), n), "tensors")
    return [Tensor(ffi.string(r.name).decode(), int(r.kind), int(r.layer), int(r.offset),
                   tuple(int(x) for x in r.shape[0:r.ndim]), int(r.grad_offset),
                   int(r.group), bool(r.decay)) for r in recs[0:int(n[0])]]


def tensor_specs(config: LlamaConfig, lora=None) -> List[Tuple[str, int, Tuple[int, ...]]]:
    """[(name, offset, shape)] of every parameter, in flat-buffer order (C's
    table, see tensors). Per-kind stacks: layer i of wq is at
    layout["wq"] + i * q_dim * dim. With lora (a LoraConfig) the adapters
    follow: layers.{i}.attention.wq.lora_A.weight [r, in], ...
    lora_B.weight [out, r]."""
    return [(t.name, t.offset, t.shape) for t in tensors(config, lora)]


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
    """[(name, target index, 'A' or 'B', layer)] of the adapter tensors (C's
    table, see tensors)."""
    A, B = int(lib.AB_TENSOR_LORA_A), int(lib.AB_TENSOR_LORA_B)
    return [(t.name, t.kind - (B if t.kind >= B else A), "B" if t.kind >= B else "A", t.layer)
            for t in tensors(config, lora) if t.kind >= A]


def views(flat, specs):
    """name -> view of flat for each (name, offset, shape) of specs."""
    return {name: flat[off:off + math.prod(shape)].reshape(shape) for name, off, shape in specs}
