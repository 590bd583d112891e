"""Token embedding: gather and scatter-add gradient (csrc/kernels/embedding.c).

tokens: integer ids [...] (int32 used as is; int64/uint16 converted);
E, dE: [vocab, D]; x, dx: [..., D].
"""
from __future__ import annotations

from .. import _checks as C
from .._backend import cfunc
from .._native import check, fptr, iptr
from ..types import Backend, F32Array, Tokens


def embedding(tokens: Tokens, E: F32Array, *, out: F32Array | None = None,
              backend: Backend = None) -> F32Array:
    """x[..., D] = E[tokens]. Returns x."""
    fn = "embedding"
    C.f32(fn, "E", E, 2)
    V, D = E.shape
    tok = C.tokens(fn, "tokens", tokens, V)
    out = C.out(fn, "out", out, tok.shape + (D,), ("E", E))
    check(cfunc(fn, "embedding_forward", backend)(fptr(out), fptr(E), iptr(tok), tok.size, V, D), fn)
    return out


def embedding_backward(dx: F32Array, tokens: Tokens, *, dE: F32Array,
                       accumulate: bool = False, backend: Backend = None) -> F32Array:
    """dE[tokens[t]] += dx[t] for every position (repeats add up), into dE
    (required: its shape gives the vocabulary) overwritten first, or added
    to with accumulate=True. Returns dE."""
    fn = "embedding_backward"
    C.f32(fn, "dE", dE, 2)
    V, D = dE.shape
    tok = C.tokens(fn, "tokens", tokens, V)
    C.f32(fn, "dx", dx)
    C.same_shape(fn, "dx", dx, tok.shape + (D,), "tokens.shape + (dE.shape[1],)")
    C.out(fn, "dE", dE, (V, D), ("dx", dx))
    if not accumulate:
        dE[...] = 0.0   # the C kernel scatter-adds
    check(cfunc(fn, "embedding_backward", backend)(fptr(dE), fptr(dx), iptr(tok), tok.size, V, D), fn)
    return dE

