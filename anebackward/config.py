"""LlamaConfig: the hyperparameters of a Llama model (llama2.c's Llama 2 and
the Hugging Face Llama 3 / Qwen3 shapes), and the named presets.

Plain data with its own checks: the layout, checkpoint and model modules all
read it, and it imports none of them.
"""
import dataclasses
from typing import Any, Dict, Optional

from . import _checks as C


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The hyperparameters of a Llama model: the llama2.c v0 header plus the
    classifier tying and the RMSNorm epsilon, and the switches of the Hugging
    Face architectures (their defaults are llama2.c's):

      head_dim      per-head width; None: dim // n_heads (Qwen3: 128 with dim 1024,
                    so q is n_heads*head_dim = 2048 wide)
      qk_norm       Qwen3's per-head RMSNorm of q and k before RoPE
      rope_theta    the RoPE base (HF rope_theta)
      rope_scaling  None or HF's rope_scaling dict (rope_type "llama3")
      rope_layout   "interleaved" (llama2.c pairs 2i, 2i+1) or "half" (HF
                    rotate_half pairs i, i + head_dim/2)"""
    dim: int = 128
    hidden_dim: int = 352
    n_layers: int = 4
    n_heads: int = 4
    # None: n_heads (multi-head attention); an int once constructed
    n_kv_heads: int = None  # type: ignore[assignment]
    vocab_size: int = 259
    max_seq_len: int = 128
    shared_classifier: bool = True
    norm_eps: float = 1e-5
    head_dim: int = None  # type: ignore[assignment]  # None: dim // n_heads; an int once built
    qk_norm: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = dataclasses.field(default=None, hash=False)
    rope_layout: str = "interleaved"

    def __post_init__(self) -> None:
        fn = "LlamaConfig"
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                     "max_seq_len"):
            object.__setattr__(self, name, C.positive_int(fn, name, getattr(self, name)))
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"{fn}: dim ({self.dim}) must be a multiple of n_heads "
                                 f"({self.n_heads}), or give head_dim")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        object.__setattr__(self, "head_dim", C.positive_int(fn, "head_dim", self.head_dim))
        if self.head_dim % 2:
            raise ValueError(f"{fn}: the head size head_dim = {self.head_dim} must be even "
                             "(RoPE rotates pairs)")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{fn}: n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                             f"({self.n_kv_heads})")
        object.__setattr__(self, "norm_eps", C.finite_float(fn, "norm_eps", self.norm_eps, lo=0.0))
        object.__setattr__(self, "shared_classifier", bool(self.shared_classifier))
        object.__setattr__(self, "qk_norm", bool(self.qk_norm))
        from .kernels.rope import LAYOUTS, normalize_scaling
        if self.rope_layout not in LAYOUTS:
            raise ValueError(f"{fn}: rope_layout must be 'interleaved' (llama2.c) or 'half' "
                             f"(Hugging Face), got {self.rope_layout!r}")
        object.__setattr__(self, "rope_theta", C.finite_float(fn, "rope_theta", self.rope_theta,
                                                              lo=1.0, lo_open=True))
        object.__setattr__(self, "rope_scaling", normalize_scaling(fn, self.rope_scaling))

    @property
    def q_dim(self) -> int:
        """The width of q and of the attention output: n_heads * head_dim."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.head_dim * (self.n_kv_heads or self.n_heads)   # set in __post_init__

    @property
    def is_llama2c(self) -> bool:
        """True when llama2.c's v0 format and run.c can express this model."""
        return (self.head_dim * self.n_heads == self.dim and not self.qk_norm
                and self.rope_theta == 10000.0 and self.rope_scaling is None
                and self.rope_layout == "interleaved" and self.norm_eps == 1e-5)

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
    # Hugging Face shapes (structure only: weights are random unless loaded
    # with Llama.from_pretrained); max_seq_len is HF's max_position_embeddings
    "qwen3-0.6b": LlamaConfig(dim=1024, hidden_dim=3072, n_layers=28, n_heads=16, n_kv_heads=8,
                              head_dim=128, vocab_size=151936, max_seq_len=40960, norm_eps=1e-6,
                              qk_norm=True, rope_theta=1000000.0, rope_layout="half"),
    "llama3.2-1b": LlamaConfig(dim=2048, hidden_dim=8192, n_layers=16, n_heads=32, n_kv_heads=8,
                               vocab_size=128256, max_seq_len=131072, norm_eps=1e-5,
                               rope_theta=500000.0, rope_layout="half",
                               rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 8192}),
    "smollm2-135m": LlamaConfig(dim=576, hidden_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3,
                                vocab_size=49152, max_seq_len=8192, norm_eps=1e-5,
                                rope_theta=100000.0, rope_layout="half"),
}
