"""anebackward.transformers — Hugging Face transformers models on the
package's C kernels (the CPU counterpart of Liger Kernel).

    import anebackward.transformers
    model = anebackward.transformers.apply(model)   # an instantiated HF model

or, before the model is built (patches the modeling classes):

    anebackward.transformers.apply_to_llama()       # or apply_to_qwen3()

Supported: LlamaForCausalLM (model_type "llama") and Qwen3ForCausalLM
("qwen3"). What runs where, and when a call falls back to HF's own code, is
in anebackward/transformers/_layers.py and docs/huggingface.md.
In training with labels the patched forward returns the loss and
logits=None: the [tokens, vocab] logits are never held in full (unless
asked for: skip_logits=False). Documentation: docs/huggingface.md.
"""
import types

try:    # PyTorch is not in the hf extra: installed first, its CPU build on a CPU (README)
    import torch as _torch  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without torch
    raise ImportError("anebackward.transformers needs PyTorch: pip install torch==2.13.0 "
                      "--index-url https://download.pytorch.org/whl/cpu (the CPU build; "
                      "see the README's Install section)") from e
try:
    import transformers as _hf  # noqa: F401  (the Hugging Face package)
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("anebackward.transformers needs Hugging Face transformers: "
                      "pip install 'anebackward[hf]'") from e

from . import _layers

SUPPORTED = ("llama", "qwen3")


def _modeling(model_type):
    if model_type == "llama":
        from transformers.models.llama import modeling_llama as m
        return m, "Llama"
    if model_type == "qwen3":
        from transformers.models.qwen3 import modeling_qwen3 as m
        return m, "Qwen3"
    raise NotImplementedError(f"anebackward.transformers: model_type {model_type!r} is not "
                              f"supported; supported: {', '.join(SUPPORTED)}")


def _targets(m, prefix, rms_norm, attention, swiglu, fused_linear_cross_entropy):
    """(class, new forward) pairs for the switches that are on."""
    pairs = []
    if rms_norm:
        pairs.append((getattr(m, prefix + "RMSNorm"), _layers.rms_norm_forward))
    if swiglu:
        pairs.append((getattr(m, prefix + "MLP"), _layers.swiglu_forward))
    if attention:
        model_cls = getattr(m, prefix + "Model")
        pairs.append((getattr(m, prefix + "Attention"), _layers.attention_forward))
        pairs.append((model_cls, _layers.model_forward_wrapper(_layers.original(model_cls))))
    if fused_linear_cross_entropy:
        lm_cls = getattr(m, prefix + "ForCausalLM")
        pairs.append((lm_cls, _layers.causal_lm_forward_wrapper(_layers.original(lm_cls))))
    return pairs


def _threads(blas_threads, one_call):
    """The package's thread pool and PyTorch's both spin on the same cores.
    On the one-call path the package does all the work: "auto" leaves its
    threads alone. On the per-op path the dense projections run in PyTorch,
    so "auto" gives the package 1 thread (measured: a per-op patched
    stories15M-shaped step 1870 ms at 1 vs 2541 ms at 2 package threads,
    torch at 2, loaded 2-core machine)."""
    if blas_threads == "auto":
        blas_threads = None if one_call else 1
    if blas_threads is not None:
        import anebackward
        anebackward.set_num_threads(blas_threads)


def _apply(model_type, rms_norm, rope, attention, swiglu, fused_linear_cross_entropy, model,
           blas_threads, one_call, skip_logits):
    m, prefix = _modeling(model_type)
    pairs = _targets(m, prefix, rms_norm, attention, swiglu, fused_linear_cross_entropy)
    attn_cls = getattr(m, prefix + "Attention")
    lm_cls = getattr(m, prefix + "ForCausalLM")
    # one_call: training steps of the whole model as one C call each (needs
    # every switch on: it is all of them at once)
    one_call = bool(one_call and rms_norm and rope and attention and swiglu
                    and fused_linear_cross_entropy)
    _threads(blas_threads, one_call)
    if model is None:  # patch the classes: every model built afterwards
        for cls, fn in pairs:
            if "_anebackward_original_forward" not in cls.__dict__:
                cls._anebackward_original_forward = cls.forward
            cls.forward = fn
        attn_cls._anebackward_rope = bool(rope)  # RoPE runs inside the patched attention
        lm_cls._anebackward_one_call = one_call
        lm_cls._anebackward_skip_logits = bool(skip_logits)
        return None
    for mod in model.modules():  # patch this model's modules only
        for cls, fn in pairs:
            if type(mod) is cls:
                mod.forward = types.MethodType(fn, mod)
        if type(mod) is attn_cls:
            mod._anebackward_rope = bool(rope)
        if type(mod) is lm_cls:
            mod._anebackward_one_call = one_call
            mod._anebackward_skip_logits = bool(skip_logits)
    return model


def apply_to_llama(*, rms_norm=True, rope=True, attention=True, swiglu=True,
                   fused_linear_cross_entropy=True, one_call=True, model=None,
                   blas_threads="auto", skip_logits=True):
    """Patch HF's Llama modeling classes (model=None: every Llama built after
    this call) or one instantiated model's modules (model=...).
    one_call: training calls the C model takes run as one C call each (the
    default; False: always the per-op path).
    blas_threads: the package's (process-wide) thread count: "auto" leaves it
    alone with one_call, else sets 1 (PyTorch runs the dense projections on
    its own threads); an int sets it; None leaves it alone.
    skip_logits: training calls with labels return logits=None (the default;
    the [tokens, vocab] logits are never held in full); False returns them,
    carrying gradient (a call's skip_logits= keyword overrides this)."""
    return _apply("llama", rms_norm, rope, attention, swiglu, fused_linear_cross_entropy, model,
                  blas_threads, one_call, skip_logits)


def apply_to_qwen3(*, rms_norm=True, rope=True, attention=True, swiglu=True,
                   fused_linear_cross_entropy=True, one_call=True, model=None,
                   blas_threads="auto", skip_logits=True):
    """Patch HF's Qwen3 modeling classes (model=None) or one model (model=...)."""
    return _apply("qwen3", rms_norm, rope, attention, swiglu, fused_linear_cross_entropy, model,
                  blas_threads, one_call, skip_logits)


def apply(model, **switches):
    """Patch an instantiated HF model in place and return it (dispatch on
    model.config.model_type: 'llama' or 'qwen3'); switches as apply_to_llama."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    _modeling(model_type)  # NotImplementedError naming the supported types
    fn = apply_to_llama if model_type == "llama" else apply_to_qwen3
    return fn(model=model, **switches)


__all__ = ["apply", "apply_to_llama", "apply_to_qwen3", "SUPPORTED"]
