"""Rotary position embedding (csrc/kernels/rope.c): llama2.c's convention by
default, Hugging Face's with keyword switches.

x is [S, H*head_dim] or [B, S, H*head_dim]; each head's rotation pairs rotate
by (pos_offset + s)·f_k with f_k = theta^(−2k/head_dim). The backward is the
inverse rotation. out may be x itself (in place).

  positions=           int [rows] (x.shape[:-1]): each row's own position
                        instead of pos_offset + s (varlen batches, left
                        padding, packed documents; anebackward.batch)
  layout="interleaved"  pairs (2k, 2k+1), llama2.c (the default)
  layout="half"         pairs (k, k + head_dim/2), HF's rotate_half
  theta                 the frequency base (HF's rope_theta; default 10000)
  scaling               None, or HF's rope_scaling dict: {"rope_type": "llama3",
                        "factor", "low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings"}; {"rope_type":
                        "default"} is no scaling; other types NotImplementedError.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

import numpy as np

from .. import _checks as C
from .._backend import cfunc
from .._native import check, ffi, fptr, iptr, lib
from ..types import Backend, F32Array, Tokens

LAYOUTS = {"interleaved": 0, "half": 1}
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def normalize_scaling(fn: str, scaling: Mapping[str, Any] | None) -> dict | None:
    """HF's rope_scaling (or rope_parameters) dict reduced to what the kernels
    use: None (no scaling) or a checked llama3 dict. Raises naming the field."""
    if scaling is None:
        return None
    if not isinstance(scaling, Mapping):
        raise TypeError(f"{fn}: rope_scaling must be None or a dict like HF's, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise NotImplementedError(f"{fn}: rope_scaling rope_type {kind!r} is not supported "
                                  "(supported: 'default', 'llama3')")
    missing = [k for k in LLAMA3_KEYS if scaling.get(k) is None]
    if missing:
        raise ValueError(f"{fn}: rope_scaling of rope_type 'llama3' needs {', '.join(missing)}")
    out: Dict[str, Any] = {"rope_type": "llama3",
           "factor": C.finite_float(fn, "rope_scaling['factor']", scaling["factor"], lo=1.0),
           "low_freq_factor": C.finite_float(fn, "rope_scaling['low_freq_factor']",
                                             scaling["low_freq_factor"], lo=0.0, lo_open=True),
           "high_freq_factor": C.finite_float(fn, "rope_scaling['high_freq_factor']",
                                              scaling["high_freq_factor"], lo=0.0, lo_open=True),
           "original_max_position_embeddings": C.positive_int(
               fn, "rope_scaling['original_max_position_embeddings']",
               scaling["original_max_position_embeddings"])}
    if out["low_freq_factor"] >= out["high_freq_factor"]:
        raise ValueError(f"{fn}: rope_scaling needs low_freq_factor < high_freq_factor, got "
                         f"{out['low_freq_factor']} and {out['high_freq_factor']}")
    return out


def rope_params(fn: str, layout: str = "interleaved", theta: float = 10000.0,
                scaling: Mapping[str, Any] | None = None):
    """The C ab_rope_params for these switches (checked, errors name the argument)."""
    if layout not in LAYOUTS:
        raise ValueError(f"{fn}: layout must be 'interleaved' (llama2.c) or 'half' (Hugging "
                         f"Face rotate_half), got {layout!r}")
    theta = C.finite_float(fn, "theta", theta, lo=1.0, lo_open=True)
    sc = normalize_scaling(fn, scaling)
    p = ffi.new("ab_rope_params *")
    p.layout = LAYOUTS[layout]
    p.theta = theta
    if sc is not None:
        p.factor = sc["factor"]
        p.low_freq_factor = sc["low_freq_factor"]
        p.high_freq_factor = sc["high_freq_factor"]
        p.original_max_position_embeddings = sc["original_max_position_embeddings"]
    check(lib.ab_rope_params_check(p), fn)
    return p


def rope_inv_freq(head_dim: int, *, layout: str = "interleaved", theta: float = 10000.0,
                  scaling: Mapping[str, Any] | None = None) -> F32Array:
    """The head_dim/2 frequencies f_k the kernels rotate pair k by (per position)."""
    head_dim = C.positive_int("rope_inv_freq", "head_dim", head_dim)
    p = rope_params("rope_inv_freq", layout, theta, scaling)
    out = np.empty(head_dim // 2, np.float32)
    check(lib.ab_rope_inv_freq(fptr(out), head_dim, p), "rope_inv_freq")
    return out


def _dims(fn, name, x, head_dim, pos_offset):
    C.f32(fn, name, x, (2, 3))
    head_dim = C.positive_int(fn, "head_dim", head_dim)
    pos_offset = C.nonneg_int(fn, "pos_offset", pos_offset)
    width = x.shape[-1]
    if width % head_dim or width == 0:
        raise ValueError(f"{fn}: the last axis of {name} ({width}) must be a positive multiple of "
                         f"head_dim = {head_dim}")
    B, S = (1, x.shape[0]) if x.ndim == 2 else x.shape[:2]
    if pos_offset > 2**63 - 1 - S:
        raise ValueError(f"{fn}: pos_offset + sequence length must stay below 2**63, got "
                         f"pos_offset={pos_offset} with {S} positions")
    return B, S, width // head_dim, head_dim, pos_offset


def _run(fn, cname, name, x, head_dim, pos_offset, layout, theta, scaling, out, backend,
         out_name="out", positions=None):
    B, S, H, hd, pos_offset = _dims(fn, name, x, head_dim, pos_offset)
    p = rope_params(fn, layout, theta, scaling)
    out = C.out(fn, out_name, out, x.shape, (name, x), may_alias=(name,))
    if positions is not None:
        from ..batch import check_positions
        if pos_offset:
            raise ValueError(f"{fn}: pass positions or pos_offset, not both")
        pos = check_positions(fn, positions, x.shape[:-1])
        check(cfunc(fn, cname.replace("_ex", "_pos"), backend)(
            fptr(out), fptr(x), B * S, H, hd, iptr(pos), p), fn)
        return out
    check(cfunc(fn, cname, backend)(fptr(out), fptr(x), B, S, H, hd, pos_offset, p), fn)
    return out


def rope(x: F32Array, *, head_dim: int, pos_offset: int = 0, layout: str = "interleaved",
         theta: float = 10000.0, scaling: Mapping[str, Any] | None = None,
         out: F32Array | None = None, backend: Backend = None,
         positions: Tokens | None = None) -> F32Array:
    """Rotate q or k by their positions. Returns the rotated array."""
    return _run("rope", "rope_forward_ex", "x", x, head_dim, pos_offset, layout, theta, scaling,
                out, backend, positions=positions)


def rope_backward(dy: F32Array, *, head_dim: int, pos_offset: int = 0,
                  layout: str = "interleaved", theta: float = 10000.0,
                  scaling: Mapping[str, Any] | None = None, dx: F32Array | None = None,
                  backend: Backend = None, positions: Tokens | None = None) -> F32Array:
    """Gradient of rope: rotate dy back by the same angles. Returns dx (dx=
    may be dy itself)."""
    return _run("rope_backward", "rope_backward_ex", "dy", dy, head_dim, pos_offset, layout, theta,
                scaling, dx, backend, "dx", positions=positions)
