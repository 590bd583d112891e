"""torch.autograd.Functions over the C kernels, and functional wrappers.

Each Function runs the C kernels on CPU float32 tensors, zero-copy
(anebackward.kernels.*), backend= passed on; other dtypes raise TypeError.
The tests check every one against torch autograd of plain torch ops in
float64. Backward is first-order only (double backward raises).

Shapes follow the kernels: token-major rows, x[..., D] or [B, S, D]; weights
[out, in] like nn.Linear.weight.
"""
from __future__ import annotations

import itertools
import threading
from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch.autograd.function import once_differentiable

import anebackward as ab
from anebackward import _checks as _C
from anebackward._native import lib as _lib

from ..types import Backend
from ._bridge import F32, float32_check, grad_view, np_view, targets_check


MATMULS = ("torch", "anebackward")

# torch.compile cannot trace into cffi calls: under torch.compile each
# Function runs eagerly (a graph break) and the code around it is compiled.
_compiler = getattr(torch, "compiler", None)
_eager_only = getattr(_compiler, "disable", None) or (lambda fn: fn)


def _needs_grad(*tensors):
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"anebackward.torch: argument {i} must be a torch.Tensor, got "
                            f"{type(t).__name__}; for NumPy arrays use the anebackward.* kernels")
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _run_forward(ctx, kernel, inputs, y, backend, **options):
    """Save the tensor inputs and backend= for the backward, then run
    kernel(*inputs, out=y, backend=backend, **options) over their NumPy
    views (no copies); returns y."""
    ctx.backend = backend
    ctx.save_for_backward(*inputs)
    kernel(*map(np_view, inputs), out=np_view(y), backend=backend, **options)
    return y


def _run_backward(ctx, kernel, dy, grad_names, **options):
    """The gradients of the saved inputs from one backward kernel that
    computes them all: kernel(dy, *inputs, backend=ctx.backend, **options)
    with grad_names[i]= a fresh buffer for input i. Returns one entry per
    forward argument: the gradient where autograd asked for it, else None."""
    inputs = ctx.saved_tensors
    grads = [torch.empty_like(t) for t in inputs]
    kernel(np_view(grad_view(dy)), *map(np_view, inputs), backend=ctx.backend, **options,
           **{name: np_view(g) for name, g in zip(grad_names, grads)})
    return tuple(g if need else None for g, need in
                 itertools.zip_longest(grads, ctx.needs_input_grad))


# ---------------------------------------------------------------- linear ----
class LinearFunction(torch.autograd.Function):
    """y = x·Wᵀ with the package's BLAS-backed linear kernels."""

    @staticmethod
    def forward(ctx, x, weight, backend):
        float32_check("linear", x=x, weight=weight)
        if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
            raise ValueError(f"linear: weight must be [out, in] with in = x.shape[-1]; got x "
                             f"{tuple(x.shape)}, weight {tuple(weight.shape)}")
        y = torch.empty(x.shape[:-1] + (weight.shape[0],), dtype=F32)
        return _run_forward(ctx, ab.linear, (x, weight), y, backend)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = grad_view(dy)
        dx = dW = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            ab.linear_backward_dx(np_view(dy), np_view(weight), dx=np_view(dx), backend=ctx.backend)
        if ctx.needs_input_grad[1]:
            dW = torch.empty_like(weight)
            ab.linear_backward_dW(np_view(dy), np_view(x), dW=np_view(dW), backend=ctx.backend)
        return dx, dW, None


@_eager_only
def linear(x: torch.Tensor, weight: torch.Tensor, *, backend: Backend = None) -> torch.Tensor:
    """y[..., out] = x[..., in] · weight[out, in]ᵀ (no bias)."""
    return LinearFunction.apply(x, weight, backend)


# --------------------------------------------------------------- RMSNorm ----
class RMSNormFunction(torch.autograd.Function):
    """y = x / sqrt(mean(x²) + eps) · weight; backward gives dx and dweight."""

    @staticmethod
    def forward(ctx, x, weight, eps, backend):
        float32_check("rmsnorm", x=x, weight=weight)
        if weight.dim() != 1 or x.dim() < 1 or x.shape[-1] != weight.shape[0]:
            raise ValueError(f"rmsnorm: weight must be [D] with D = x.shape[-1]; got x "
                             f"{tuple(x.shape)}, weight {tuple(weight.shape)}")
        ctx.eps = float(eps)
        return _run_forward(ctx, ab.rmsnorm, (x, weight), torch.empty_like(x), backend,
                            eps=ctx.eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        return _run_backward(ctx, ab.rmsnorm_backward, dy, ("dx", "dw"), eps=ctx.eps,
                             accumulate=False)


@_eager_only
def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, *,
            backend: Backend = None) -> torch.Tensor:
    """RMSNorm over the last axis, with gradients for x and weight."""
    return RMSNormFunction.apply(x, weight, eps, backend)


# ------------------------------------------------------------------ RoPE ----
class RoPEFunction(torch.autograd.Function):
    """Rotary embedding of q or k, [S, H·hd] or [B, S, H·hd]; rope= holds the
    kernel's switches (layout, theta, scaling: anebackward.rope's keywords)."""

    @staticmethod
    def forward(ctx, x, head_dim, pos_offset, rope_kw, backend):
        float32_check("rope", x=x)
        ctx.head_dim, ctx.pos_offset, ctx.rope_kw, ctx.backend = head_dim, pos_offset, rope_kw, backend
        y = torch.empty_like(x)
        ab.rope(np_view(x), head_dim=head_dim, pos_offset=pos_offset, out=np_view(y),
                backend=backend, **rope_kw)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        dy = grad_view(dy)
        dx = torch.empty_like(dy)
        ab.rope_backward(np_view(dy), head_dim=ctx.head_dim, pos_offset=ctx.pos_offset,
                         dx=np_view(dx), backend=ctx.backend, **ctx.rope_kw)
        return dx, None, None, None, None


@_eager_only
def rope(x: torch.Tensor, head_dim: int, pos_offset: int = 0, *, layout: str = "interleaved",
         theta: float = 10000.0, scaling: Optional[dict] = None,
         backend: Backend = None) -> torch.Tensor:
    """Rotate each head's pairs by position: llama2.c's interleaved pairs and
    angles 10000^(−2i/head_dim) by default; layout="half", theta= and HF's
    rope_scaling dict (scaling=) give Hugging Face's RoPE (anebackward.rope)."""
    rope_kw = dict(layout=layout, theta=theta, scaling=scaling)
    return RoPEFunction.apply(x, head_dim, pos_offset, rope_kw, backend)


# ------------------------------------------------------------- attention ----
class AttentionWorkspace:
    """Reusable attention scratch (2·S² floats), one array per thread, grown
    on demand: the forward and backward of every layer reuse it instead of
    allocating S×S memory per call. Copies and pickles start empty."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, S):
        need = max(int(_lib.ab_attention_workspace_floats(S)), 1)
        a = getattr(self._local, "array", None)
        if a is None or a.size < need:
            a = np.empty(need, dtype=np.float32)
            self._local.array = a
        return a

    def __reduce__(self):
        return (AttentionWorkspace, ())


def _attn_dims(fn, q, k, v, n_heads, n_kv_heads):
    if q.dim() not in (2, 3):
        raise ValueError(f"{fn}: q must be [S, n_heads*head_dim] or [B, S, n_heads*head_dim], "
                         f"got {tuple(q.shape)}")
    if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads or q.shape[-1] % n_heads:
        raise ValueError(f"{fn}: need n_kv_heads ({n_kv_heads}) dividing n_heads ({n_heads}) "
                         f"dividing q.shape[-1] ({q.shape[-1]})")
    hd = q.shape[-1] // n_heads
    kv = tuple(q.shape[:-1]) + (n_kv_heads * hd,)
    if tuple(k.shape) != kv or tuple(v.shape) != kv:
        raise ValueError(f"{fn}: k and v must have shape {kv}, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    return hd


class AttentionFunction(torch.autograd.Function):
    """Causal softmax attention, MHA and GQA: q[.., S, H·hd], k, v[.., S, KV·hd]."""

    @staticmethod
    def forward(ctx, q, k, v, n_heads, n_kv_heads, workspace, backend):
        float32_check("attention", q=q, k=k, v=v)
        hd = _attn_dims("attention", q, k, v, n_heads, n_kv_heads)
        ctx.dims, ctx.workspace = (n_heads, n_kv_heads, hd), workspace
        ws = workspace.get(q.shape[-2]) if workspace is not None else None
        return _run_forward(ctx, ab.attention, (q, k, v), torch.empty_like(q), backend,
                            n_heads=n_heads, n_kv_heads=n_kv_heads, workspace=ws)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        H, KV, hd = ctx.dims
        ws = ctx.workspace.get(dout.shape[-2]) if ctx.workspace is not None else None
        return _run_backward(ctx, ab.attention_backward, dout, ("dq", "dk", "dv"), n_heads=H,
                             n_kv_heads=KV, workspace=ws)


@_eager_only
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int,
              n_kv_heads: Optional[int] = None, *, workspace: Optional[AttentionWorkspace] = None,
              backend: Backend = None) -> torch.Tensor:
    """Causal attention (scale 1/√head_dim); n_kv_heads < n_heads is GQA.
    workspace: an AttentionWorkspace to reuse scratch across calls."""
    n_heads = _C.positive_int("anebackward.torch.attention", "n_heads", n_heads)
    n_kv_heads = (n_heads if n_kv_heads is None else
                  _C.positive_int("anebackward.torch.attention", "n_kv_heads", n_kv_heads))
    return AttentionFunction.apply(q, k, v, n_heads, n_kv_heads, workspace, backend)


# ---------------------------------------------------------------- SwiGLU ----
class SwiGLUFunction(torch.autograd.Function):
    """y = silu(h1)·h3 (the Llama FFN gate)."""

    @staticmethod
    def forward(ctx, h1, h3, backend):
        float32_check("swiglu", h1=h1, h3=h3)
        if h1.shape != h3.shape:
            raise ValueError(f"swiglu: h1 and h3 must have one shape, got {tuple(h1.shape)} and "
                             f"{tuple(h3.shape)}")
        return _run_forward(ctx, ab.swiglu, (h1, h3), torch.empty_like(h1), backend)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        return _run_backward(ctx, ab.swiglu_backward, dy, ("dh1", "dh3"))


@_eager_only
def swiglu(h1: torch.Tensor, h3: torch.Tensor, *, backend: Backend = None) -> torch.Tensor:
    """silu(h1)·h3 with its gradients for h1 and h3."""
    return SwiGLUFunction.apply(h1, h3, backend)


# ------------------------------------------- classifier + cross-entropy ----
class ClassifierCrossEntropyFunction(torch.autograd.Function):
    """loss = cross_entropy(x·Wᵀ, targets, ignore_index=-1), mean over counted rows.

    The forward computes the logits, then the loss and dlogits in one fused
    pass. With return_logits=False dlogits overwrites the logits in place, so
    the step holds ONE vocab-sized buffer; with return_logits=True the logits
    are returned (and may be used in further differentiable code) and dlogits
    is a second buffer. Without grad (eval), only the loss is computed."""

    @staticmethod
    def forward(ctx, x, weight, targets, return_logits, need_grad, matmul, backend):
        float32_check("classifier_cross_entropy", x=x, weight=weight)
        if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
            raise ValueError(f"classifier_cross_entropy: weight must be [vocab, D] with "
                             f"D = x.shape[-1]; got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
        V = weight.shape[0]
        tg = targets_check("classifier_cross_entropy", "targets", targets, x.shape[:-1])
        if matmul not in MATMULS:
            raise ValueError(f"classifier_cross_entropy: matmul must be one of {MATMULS}, "
                             f"got {matmul!r}")
        ctx.set_materialize_grads(False)
        ctx.backend, ctx.matmul = backend, matmul
        logits = torch.empty(x.shape[:-1] + (V,), dtype=F32)
        la = np_view(logits)
        if matmul == "torch":
            torch.mm(x.reshape(-1, x.shape[-1]), weight.t(), out=logits.view(-1, V))
        else:
            ab.linear(np_view(x), np_view(weight), out=la, backend=backend)
        if need_grad:
            dl = logits if not return_logits else torch.empty_like(logits)
            dla = la if dl is logits else np_view(dl)  # the same array: written in place
            loss_f, _ = ab.cross_entropy_backward(la, tg, dlogits=dla, backend=backend)
        else:
            dl = None
            loss_f = ab.cross_entropy(la, tg, backend=backend)
        loss = torch.tensor(loss_f, dtype=F32)
        if need_grad:  # saved tensors are freed by autograd right after backward
            ctx.save_for_backward(x, weight, dl)
        if return_logits:
            return loss, logits
        del logits  # the buffer lives on as the saved dlogits (in place) or is freed
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, dloss, dlogits_out=None):
        if len(ctx.saved_tensors) != 3:
            raise RuntimeError("classifier_cross_entropy: backward through a forward that ran "
                               "without grad")
        x, W, dl = ctx.saved_tensors
        s = 0.0 if dloss is None else dloss
        if dlogits_out is not None:  # the returned logits were used downstream too
            dl = dl * s + grad_view(dlogits_out)  # new buffer: dl may be needed again (retain_graph)
            s = 1.0
        N, V, D = dl.numel() // dl.shape[-1], W.shape[0], W.shape[1]
        dx = dW = None
        scale = float(s)
        use_torch = ctx.matmul == "torch"
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            if use_torch:
                torch.mm(dl.view(N, V), W, out=dx.view(N, D))
            else:
                ab.linear_backward_dx(np_view(dl), np_view(W), dx=np_view(dx), backend=ctx.backend)
            if scale != 1.0:
                dx.mul_(scale)
        if ctx.needs_input_grad[1]:
            dW = torch.empty_like(W)
            if use_torch:
                torch.mm(dl.view(N, V).t(), x.view(N, D), out=dW)
            else:
                ab.linear_backward_dW(np_view(dl), np_view(x), dW=np_view(dW), backend=ctx.backend)
            if scale != 1.0:
                dW.mul_(scale)
        return dx, dW, None, None, None, None, None


@_eager_only
def classifier_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                             return_logits: bool = False, matmul: str = "torch",
                             backend: Backend = None
                             ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Mean cross-entropy of logits = x·weightᵀ against targets (−1 = ignored),
    fused so that the logits' gradient reuses the logits buffer.

    Returns loss, or (loss, logits) with return_logits=True (costs a second
    vocab-sized buffer while grad is needed). matmul: who runs the three
    vocab-sized matmuls, "torch" (its BLAS, written into our buffers) or
    "anebackward" (the package's linear kernels); the softmax/loss/dlogits
    pass is the package's fused cross-entropy kernel either way."""
    need = _needs_grad(x, weight)
    return ClassifierCrossEntropyFunction.apply(x, weight, targets, bool(return_logits), need,
                                                matmul, backend)


# ------------------------- classifier + cross-entropy, chunked over rows ----
def _chunk_rows(V, chunk_rows):
    """Rows per chunk: about 8 Mi logits (32 MB) at a time, at least 16 rows."""
    if chunk_rows is None:
        return max(16, (1 << 23) // V)
    return _C.positive_int("chunked_classifier_cross_entropy", "chunk_rows", chunk_rows)


class ChunkedClassifierCrossEntropyFunction(torch.autograd.Function):
    """loss = Σ_counted CE(x·Wᵀ, targets) / n_items, one chunk of rows at a time.

    Only a [chunk, vocab] logits buffer ever exists: each chunk's logits are
    turned into dlogits in place by the fused cross-entropy kernel (scaled so
    that every chunk shares the global divisor n_items) and immediately folded
    into dx and dW. The gradients are thus computed in the forward and only
    scaled by the incoming dloss in the backward (as Liger Kernel's fused
    linear cross-entropy does), so no activation of vocab size is saved."""

    @staticmethod
    def forward(ctx, x, weight, targets, n_items, need_grad, chunk_rows, backend):
        float32_check("chunked_classifier_cross_entropy", x=x, weight=weight)
        if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
            raise ValueError(f"chunked_classifier_cross_entropy: need x [N, D] and weight "
                             f"[vocab, D]; got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
        N, D, V = x.shape[0], x.shape[1], weight.shape[0]
        tg = targets_check("chunked_classifier_cross_entropy", "targets", targets, (N,))
        tg = _C.tokens("chunked_classifier_cross_entropy", "targets", tg, V, allow_ignore=True)
        counted = tg != -1
        if n_items is None:
            n_items = int(counted.sum())
        n_items = float(n_items)
        C = min(N, _chunk_rows(V, chunk_rows))
        buf = torch.empty(C, V, dtype=F32)
        dx = torch.zeros_like(x) if need_grad else None
        dW = torch.zeros_like(weight) if need_grad else None
        total = 0.0
        for r0 in range(0, N, C):
            r1 = min(N, r0 + C)
            nc = int(counted[r0:r1].sum())
            if nc == 0:
                continue  # nothing counted: no loss, zero gradient rows
            xc, lg = x[r0:r1], buf[:r1 - r0]
            torch.mm(xc, weight.t(), out=lg)
            la = np_view(lg)
            if need_grad:  # dlogits = (softmax − onehot)/n_items, over the logits in place
                lc, _ = ab.cross_entropy_backward(la, tg[r0:r1], dlogits=la,
                                                  grad_scale=nc / n_items, backend=backend)
                torch.mm(lg, weight, out=dx[r0:r1])
                dW.addmm_(lg.t(), xc)
            else:
                lc = ab.cross_entropy(la, tg[r0:r1], backend=backend)
            total += lc * nc
        del buf
        if need_grad:
            ctx.save_for_backward(dx, dW)
        # nothing counted at all: NaN without num_items_in_batch, like torch's mean
        loss = total / n_items if n_items > 0 else float("nan")
        return torch.tensor(loss, dtype=F32)

    @staticmethod
    @once_differentiable
    def backward(ctx, dloss):
        if not ctx.saved_tensors:
            raise RuntimeError("chunked_classifier_cross_entropy: backward through a forward "
                               "that ran without grad")
        dx, dW = ctx.saved_tensors
        s = float(dloss)
        if s != 1.0:
            dx, dW = dx * s, dW * s
        return (dx if ctx.needs_input_grad[0] else None, dW if ctx.needs_input_grad[1] else None,
                None, None, None, None, None)


@_eager_only
def chunked_classifier_cross_entropy(x, weight, targets, *, n_items=None, chunk_rows=None,
                                     backend=None):
    """Σ cross-entropy(x·weightᵀ, targets) / n_items over the rows whose target
    is not −1, with the [N, vocab] logits never held in full (chunk_rows at a
    time; default about 32 MB of logits). n_items defaults to the number of
    counted rows (the mean); pass HF's num_items_in_batch to divide by that.
    x [N, D] float32, weight [vocab, D], targets [N] integer ids.
    The gradients are computed during the forward (dx and dW held until the
    backward): call it only when a backward follows, or under no_grad."""
    need = _needs_grad(x, weight)
    return ChunkedClassifierCrossEntropyFunction.apply(x, weight, targets, n_items, need,
                                                       chunk_rows, backend)
