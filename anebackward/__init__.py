"""anebackward — the backward pass of a Llama-style transformer in C,
correct and fast, callable from NumPy with zero-copy float32 buffers.

Kernels (each returns its results and accepts preallocated outputs):
  linear, linear_backward_dx, linear_backward_dW     (anebackward.kernels.linear)
  rmsnorm, rmsnorm_backward                          (.rmsnorm)
  rope, rope_backward, rope_inv_freq                 (.rope)
  attention, attention_backward                      (.attention)
  swiglu, swiglu_backward                            (.swiglu)
  cross_entropy, cross_entropy_backward              (.cross_entropy)
  embedding, embedding_backward                      (.embedding)
  clip_grad_norm, grad_norm, adamw_step              (.optim)
The whole model (anebackward.model; C forward/backward in csrc/model):
  LlamaConfig, Llama (flat params/grads, llama2.c checkpoints), AdamW, cosine_lr
  Batch: padded, packed and prompt-masked batches (anebackward.batch)
Every kernel takes backend= ("auto", "cpu", "reference", "ane"; default from
ANEBACKWARD_BACKEND, else "cpu"; the ANE is opt-in: docs/ane.md).
"""
import os as _os

from ._version import __version__
from ._native import ffi as _ffi, lib as _lib
from .errors import AnebackwardError, AneUnavailableError, Bf16UnavailableError, CheckpointError
from .kernels.attention import attention, attention_backward, attention_workspace
from .kernels.cross_entropy import cross_entropy, cross_entropy_backward
from .kernels.embedding import embedding, embedding_backward
from .kernels.linear import linear, linear_backward_dW, linear_backward_dx
from .kernels.optim import adamw_step, clip_grad_norm, grad_norm
from .kernels.rmsnorm import rmsnorm, rmsnorm_backward
from .kernels.rope import rope, rope_backward, rope_inv_freq
from .kernels.swiglu import swiglu, swiglu_backward
from . import ane
from . import bf16
from .model import AdamW, Llama, LlamaConfig, cosine_lr
from .batch import Batch
from .lora import LoraConfig
from .capi import get_include, get_lib_dir, get_library

def blas_info() -> dict:
    """The package version, which BLAS the C core calls, the kernel core it
    picked, its threads, and the C compiler flags of this build."""
    s = lambda p: _ffi.string(p).decode()  # noqa: E731
    return {
        "version": __version__,
        "blas": s(_lib.ab_blas_name()),
        "corename": s(_lib.ab_blas_corename()),
        "threads": int(_lib.ab_blas_get_num_threads()),
        "build_flags": s(_lib.ab_build_flags()),
        "bf16": bf16.describe(),   # the path precision="bf16" takes (anebackward.bf16)
    }


MAX_THREADS = 256   # the C core's cap (AB_MAX_THREADS in csrc/ab_internal.h)


def set_num_threads(n: int) -> None:
    """Set the package's one thread count: its own worker threads and the
    BLAS's together use at most n cores (results do not depend on n).
    Default: $ANEBACKWARD_NUM_THREADS, else the BLAS's default (the cores)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_THREADS:
        raise ValueError(f"set_num_threads: n must be an int in [1, {MAX_THREADS}], got {n!r}")
    _lib.ab_set_num_threads(n)


def get_num_threads() -> int:
    """The package's thread count (see set_num_threads)."""
    return int(_lib.ab_get_num_threads())


def _check_env_threads() -> None:
    v = _os.environ.get("ANEBACKWARD_NUM_THREADS", "")
    if v and not (v.isdigit() and 1 <= int(v) <= MAX_THREADS):
        raise ValueError(f"ANEBACKWARD_NUM_THREADS must be an integer in [1, {MAX_THREADS}], "
                         f"got {v!r}; "
                         "unset it or fix its value")


_check_env_threads()


__all__ = [
    "AnebackwardError", "AneUnavailableError", "Bf16UnavailableError", "CheckpointError",
    "linear", "linear_backward_dx", "linear_backward_dW",
    "rmsnorm", "rmsnorm_backward", "rope", "rope_backward", "rope_inv_freq",
    "attention", "attention_backward", "attention_workspace",
    "swiglu", "swiglu_backward", "cross_entropy", "cross_entropy_backward",
    "embedding", "embedding_backward", "clip_grad_norm", "grad_norm", "adamw_step",
    "blas_info", "set_num_threads", "get_num_threads", "MAX_THREADS", "ane", "bf16",
    "LlamaConfig", "Llama", "AdamW", "cosine_lr", "Batch", "LoraConfig",
    "get_include", "get_lib_dir", "get_library",
]
