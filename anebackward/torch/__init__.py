"""anebackward.torch — PyTorch autograd Functions and a llama2.c-compatible
Transformer whose transformer-specific backward runs in anebackward's C kernels.

    from anebackward.torch import Transformer, ModelArgs   # instead of llama2.c's model

Functions (zero-copy on contiguous CPU float32 tensors; other dtypes raise
TypeError):
  rmsnorm, rope, attention (MHA/GQA), swiglu, classifier_cross_entropy,
  chunked_classifier_cross_entropy (logits never held in full), linear
Modules: RMSNorm, Attention, FeedForward, TransformerBlock, Transformer.
Optimizer: AdamW (torch.optim.AdamW's interface on the fused C update; what
Transformer.configure_optimizers returns).

Importing anebackward does not import torch; importing anebackward.torch does.
"""
try:
    import torch as _torch  # noqa: F401  (absolute import: PyTorch, not this package)
except ImportError as e:  # pragma: no cover - exercised only without torch
    raise ImportError("anebackward.torch needs PyTorch: pip install torch "
                      "(or pip install 'anebackward[torch]')") from e

from .functions import (AttentionFunction, AttentionWorkspace, ChunkedClassifierCrossEntropyFunction,
                        ClassifierCrossEntropyFunction, LinearFunction, RMSNormFunction, RoPEFunction, SwiGLUFunction, attention,
                        chunked_classifier_cross_entropy, classifier_cross_entropy, linear, rmsnorm, rope, swiglu)
from .optim import AdamW
from .model import (Attention, FeedForward, ModelArgs, RMSNorm, Transformer, TransformerBlock,
                    precompute_freqs_cis)

__all__ = [
    "AttentionFunction", "AttentionWorkspace", "ChunkedClassifierCrossEntropyFunction",
    "ClassifierCrossEntropyFunction", "chunked_classifier_cross_entropy", "LinearFunction",
    "RMSNormFunction", "RoPEFunction", "SwiGLUFunction", "attention", "classifier_cross_entropy",
    "linear", "rmsnorm", "rope", "swiglu", "Attention", "FeedForward", "ModelArgs", "RMSNorm",
    "Transformer", "TransformerBlock", "precompute_freqs_cis", "AdamW",
]
