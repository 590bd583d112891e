"""LlamaConfig: the hyperparameters of a Llama-2 model, and the named presets.

Plain data with its own checks: the layout, checkpoint and model modules all
read it, and it imports none of them.
"""
import dataclasses
from typing import Any, Optional

from . import _checks as C


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The hyperparameters of a Llama-2 model (the llama2.c v0 header plus
    the classifier tying and the RMSNorm epsilon)."""
    dim: int = 128
    hidden_dim: int = 352
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None   # None: n_heads (multi-head attention)
    vocab_size: int = 259
    max_seq_len: int = 128
    shared_classifier: bool = True
    norm_eps: float = 1e-5

    def __post_init__(self):
        fn = "LlamaConfig"
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                     "max_seq_len"):
            object.__setattr__(self, name, C.positive_int(fn, name, getattr(self, name)))
        if self.dim % self.n_heads:
            raise ValueError(f"{fn}: dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"{fn}: the head size dim/n_heads = {self.dim // self.n_heads} must be "
                             "even (RoPE rotates pairs)")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{fn}: n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                             f"({self.n_kv_heads})")
        object.__setattr__(self, "norm_eps", C.finite_float(fn, "norm_eps", self.norm_eps, lo=0.0))
        object.__setattr__(self, "shared_classifier", bool(self.shared_classifier))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * (self.n_kv_heads or self.n_heads)   # set in __post_init__

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "LlamaConfig":
        """A named configuration: one of PRESETS, with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"LlamaConfig.preset: unknown preset {name!r}; choose one of "
                             f"{', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def replace(self, **changes: Any) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)


PRESETS = {
    # the main job's model: byte-level vocabulary, trains in about a minute on 2 cores
    "default": LlamaConfig(dim=128, hidden_dim=352, n_layers=4, n_heads=4, n_kv_heads=2,
                           vocab_size=259, max_seq_len=128),
    # a model small enough for tests
    "tiny": LlamaConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        vocab_size=259, max_seq_len=64),
    # llama2.c's TinyStories checkpoints (Llama 2 vocabulary)
    "stories15M": LlamaConfig(dim=288, hidden_dim=768, n_layers=6, n_heads=6, n_kv_heads=6,
                              vocab_size=32000, max_seq_len=256),
    "stories42M": LlamaConfig(dim=512, hidden_dim=1376, n_layers=8, n_heads=8, n_kv_heads=8,
                              vocab_size=32000, max_seq_len=1024),
    "stories110M": LlamaConfig(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, n_kv_heads=12,
                               vocab_size=32000, max_seq_len=1024),
}
