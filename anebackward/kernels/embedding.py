"""Token embedding: gather and scatter-add gradient (csrc/kernels/embedding.c).

tokens: integer ids [...] (int32 used as is; int64/uint16 converted);
E, dE: [vocab, D]; x, dx: [..., D].
"""
from .. import _checks as C
from .._backend import cfunc
from .._native import check, fptr, iptr


def embedding(tokens, E, *, out=None, backend=None):
    """x[..., D] = E[tokens]. Returns x."""
    fn = "embedding"
    C.f32(fn, "E", E, 2)
    V, D = E.shape
    tok = C.tokens(fn, "tokens", tokens, V)
    out = C.out(fn, "out", out, tok.shape + (D,), ("E", E))
    check(cfunc(fn, "embedding_forward", backend)(fptr(out), fptr(E), iptr(tok), tok.size, V, D), fn)
    return out


def embedding_backward(dx, tokens, *, dE, backend=None):
    """dE[tokens[t]] += dx[t] for every position (repeats add up). Accumulates
    into dE, which is required (it is your gradient buffer). Returns dE."""
    fn = "embedding_backward"
    C.f32(fn, "dE", dE, 2)
    V, D = dE.shape
    tok = C.tokens(fn, "tokens", tokens, V)
    C.f32(fn, "dx", dx)
    C.same_shape(fn, "dx", dx, tok.shape + (D,), "tokens.shape + (dE.shape[1],)")
    C.out(fn, "dE", dE, (V, D), ("dx", dx))
    check(cfunc(fn, "embedding_backward", backend)(fptr(dE), fptr(dx), iptr(tok), tok.size, V, D), fn)
    return dE

