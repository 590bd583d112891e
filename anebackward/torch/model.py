"""A llama2.c-compatible Llama whose transformer-specific forward and backward
run in anebackward's C kernels.

Same constructor arguments (ModelArgs), module tree, parameter names,
initialisation (same RNG draws in the same order, so one seed gives the same
weights), state_dict keys and forward(tokens, targets=None) behaviour as
llama2.c's model.py, so a llama2.c trainer swaps

    from model import Transformer, ModelArgs
for
    from anebackward.torch import Transformer, ModelArgs

and nothing else. RMSNorm, RoPE, causal attention (MHA/GQA), SwiGLU and the
fused classifier + cross-entropy are anebackward Functions; the embedding is
torch's. The dense projections are torch's F.linear by default, so that
torch.set_num_threads alone governs the heavy work (measured on the 2-core
AMD dev machine: a whole step about even at 2 threads; single-threaded the
package's OpenBLAS sgemm was 10-25 % faster than MKL; docs/performance.md);
Transformer(..., linear="anebackward") routes them to the package's linear
kernels instead.

One-call path: every call with targets runs the whole forward and backward
as ONE C call each (ab_model_forward/backward, the engine of
anebackward.Llama), wrapped as one autograd Function over all parameters;
the parameters are views of the C model's one flat buffer (zero-copy). The
returned logits (return_logits=True, llama2.c's `logits = model(X, Y)`)
carry gradient into the same C backward: a backward from the loss alone is
the plain C backward, a loss built from the logits adds its gradient.
Anything that path cannot do (inference without targets, parameters
moved out of the buffer by .to(), a hook on a
submodule or a replaced module, one_call=False) takes the per-op path
above, chosen per call.

Autocast: under torch.autocast("cpu", torch.bfloat16) the one-call path
runs the engine at precision "bf16" (anebackward.bf16's policy: matmul
operands rounded to bf16, fp32 accumulation, loss, norms, softmax and
gradients; the engine is switched per call when its precision differs) and
returns the logits as bfloat16, as an autocast model's classifier does;
with CPU autocast off it runs fp32. A call under CPU autocast that cannot
take it (float16, bf16 where anebackward.bf16.available() is False, no
targets, a hook) raises a TypeError: the per-op kernels compute float32
only (never a silent fp32 step under autocast).

Differences from llama2.c, each deliberate:
  - dropout > 0 in training mode raises NotImplementedError (the attention
    kernel has no dropout on the probabilities); eval mode ignores dropout as
    llama2.c does.
  - RoPE angles are computed by the kernel from the position (identical
    formula); the freqs_cos/freqs_sin buffers exist for compatibility but are
    not read.
  - return_logits=False (keyword) makes forward(tokens, targets) return None
    instead of the logits, so the step keeps one vocab-sized buffer instead
    of two.
  - float32 on the CPU only (float64 raises TypeError); bfloat16 through
    autocast on the one-call path (above).
  - configure_optimizers returns anebackward.torch.AdamW (torch.optim.AdamW's
    math and state_dict, fused C update) instead of torch.optim.AdamW.
"""
import math
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

import anebackward

from ..batch import Batch
from ..layout import tensor_specs
from ..config import LlamaConfig
from .optim import AdamW
from .functions import (AttentionWorkspace, attention, classifier_cross_entropy, linear,
                        rmsnorm, rope, swiglu)

LINEAR_CHOICES = ("torch", "anebackward")


@dataclass
class ModelArgs:
    # llama2.c's fields and defaults (the Llama 7B shape)
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = 32000
    hidden_dim: Optional[int] = None
    multiple_of: int = 256  # FFN hidden size is rounded up to a multiple of this
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    dropout: float = 0.0


def _ffn_hidden_dim(dim, hidden_dim, multiple_of):
    """llama2.c's rule: 2/3 of 4·dim, rounded up to a multiple of multiple_of."""
    if hidden_dim is not None:
        return hidden_dim
    h = int(2 * (4 * dim) / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [end, dim/2] as llama2.c builds them (kept as buffers)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    ang = torch.outer(torch.arange(end).float(), freqs)
    return torch.cos(ang), torch.sin(ang)


def _project(module, x, linear_impl):
    if linear_impl == "anebackward":
        return linear(x, module.weight)
    return F.linear(x, module.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rmsnorm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
        if args.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({args.n_heads})")
        if args.dim % args.n_heads or (args.dim // args.n_heads) % 2:
            raise ValueError(f"dim ({args.dim}) must be n_heads ({args.n_heads}) times an even "
                             f"head_dim (RoPE rotates pairs)")
        self.n_local_heads = args.n_heads
        self.n_local_kv_heads = self.n_kv_heads
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.attn_dropout = nn.Dropout(args.dropout)
        self.resid_dropout = nn.Dropout(args.dropout)
        self.dropout = args.dropout
        self.workspace = AttentionWorkspace()  # Transformer shares one across layers
        self.linear_impl = "torch"

    def forward(self, x, freqs_cos=None, freqs_sin=None):
        # freqs_cos/freqs_sin: accepted for llama2.c's call signature; the kernel
        # computes the same angles from the positions 0..S-1.
        lin = self.linear_impl
        xq = rope(_project(self.wq, x, lin), self.head_dim)
        xk = rope(_project(self.wk, x, lin), self.head_dim)
        xv = _project(self.wv, x, lin)
        out = attention(xq, xk, xv, self.n_local_heads, self.n_local_kv_heads,
                        workspace=self.workspace)
        return _project(self.wo, out, lin)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, multiple_of: int, dropout: float):
        super().__init__()
        hidden_dim = _ffn_hidden_dim(dim, hidden_dim, multiple_of)
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.linear_impl = "torch"

    def forward(self, x):
        lin = self.linear_impl
        return _project(self.w2, swiglu(_project(self.w1, x, lin), _project(self.w3, x, lin)), lin)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.dim = args.dim
        self.head_dim = args.dim // args.n_heads
        self.attention = Attention(args)
        self.feed_forward = FeedForward(dim=args.dim, hidden_dim=args.hidden_dim,
                                        multiple_of=args.multiple_of, dropout=args.dropout)
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, freqs_cos=None, freqs_sin=None):
        h = x + self.attention(self.attention_norm(x), freqs_cos, freqs_sin)
        return h + self.feed_forward(self.ffn_norm(h))


def _storage_refs(t):
    """How many tensors (and arrays) hold t's storage, or None when this
    torch cannot tell."""
    try:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)
    except Exception:  # noqa: BLE001 - a private torch API: without it, never reuse
        return None


_GRAD_BUFFERS: "weakref.WeakKeyDictionary[Any, torch.Tensor]" = weakref.WeakKeyDictionary()
_ALONE = _storage_refs(torch.empty(1))  # the count of a tensor nobody else views


def _grad_buffer(engine):
    """The flat buffer a one-call backward writes its gradients into (the
    parameters' gradients are views of it): the engine's kept buffer when no
    tensor views it any more (its gradients were dropped, as by
    zero_grad(set_to_none=True)), else a fresh one, not kept, so that a
    model whose .grad stay allocated holds no second copy. A fresh buffer
    costs page faults and a free each step (measured at the stories15M
    shape, 60 MB: ~9 ms in the backward, ~3 ms in zero_grad)."""
    flat = _GRAD_BUFFERS.get(engine)
    if flat is not None and flat.numel() == engine.n_grads:
        if _ALONE is not None and _storage_refs(flat) == _ALONE:
            return flat
        # still viewed (e.g. it is .grad under zero_grad(set_to_none=False)):
        # a fresh buffer, not kept (autograd adds it into .grad and drops it)
        return torch.empty(engine.n_grads, dtype=torch.float32)
    flat = _GRAD_BUFFERS[engine] = torch.empty(engine.n_grads, dtype=torch.float32)
    return flat


def _note_params_changed(slot):
    """Tell the engine its parameters may have changed since its last call
    (torch updates the bound views in place). With adapters the base weights
    are usually frozen: when no tensor viewing the base region (the
    parameters passed to the step and the frozen ones bound beside them)
    has a new torch version, only the adapters are marked, so the bf16 copy
    of the base is not made again at every step."""
    engine = slot.engine
    if engine.lora is None:
        engine.mark_params_changed()
        return
    lo = engine.flat_params.ctypes.data
    hi = lo + 4 * engine.n_base
    key = (lo, tuple((p.data_ptr(), p._version) for p in (*slot.params, *slot.frozen)
                     if lo <= p.data_ptr() < hi))
    if slot.base_key == key:
        engine._mark_adapters_changed()
    else:
        engine.mark_params_changed()
        slot.base_key = key


class ModelFunction(torch.autograd.Function):
    """loss (and, with want_logits, the logits [B, S, vocab]) of the whole
    model in one C call forward (ab_model_forward) and one backward
    (ab_model_backward), over an anebackward.Llama engine whose flat buffer
    the parameters view. The gradients come back as views of one fresh flat
    buffer (autograd adds them to .grad as usual: accumulation, DDP hooks and
    tied weights just work). tokens: int [B, S] with targets, or an
    anebackward.Batch (a padded or packed batch in compact form, its own
    targets; targets None, no logits).

    A backward from the loss alone is the C backward as it is; a gradient
    arriving at the logits (a loss built from them) is added to the
    cross-entropy's dlogits before it. The engine holds the activations of
    its last forward only: a backward whose forward is no longer the
    engine's last (several forwards before their backwards, a sum of two
    losses, retain_graph and a second backward) runs that forward again
    first (same tokens, same weights, the forward's precision: bit-identical
    activations). Weights changed in place between the forward and its
    backward raise, as autograd does for a tensor it saved."""

    @staticmethod
    def forward(ctx, engine, specs, tokens, targets, need_grad, want_logits, *params):
        if isinstance(tokens, Batch):   # a padded/packed batch, compact (anebackward.batch)
            if want_logits:
                raise ValueError("ModelFunction: logits are returned for full rows only")
            tok, tgt, logits = tokens, None, None
            loss = engine.forward(tokens, want_grad=need_grad)
        else:
            tok = tokens.detach().cpu().numpy().astype(np.int32)
            tgt = targets.detach().cpu().numpy().astype(np.int32)
            logits = None
            if want_logits:
                logits = torch.empty(*tok.shape, engine.config.vocab_size, dtype=torch.float32)
            loss = engine.forward(tok, tgt, want_grad=need_grad,
                                  logits_out=None if logits is None else logits.numpy())
        ctx.engine, ctx.specs, ctx.tok, ctx.tgt = engine, specs, tok, tgt
        ctx.precision = engine.precision
        ctx.pending = engine._pending          # identifies this forward's engine state
        ctx.versions = [p._version for p in params]
        ctx.params = params
        ctx.set_materialize_grads(False)
        loss = torch.tensor(loss, dtype=torch.float32)
        if logits is None:
            return loss
        return loss, logits

    @staticmethod
    @once_differentiable
    def backward(ctx, dloss, dlogits=None):
        engine = ctx.engine
        if [p._version for p in ctx.params] != ctx.versions:
            raise RuntimeError(
                "anebackward one-call backward: a parameter was modified in place after the "
                "forward that this backward differentiates (e.g. an optimizer step between a "
                "forward and its backward); run the forward again after the update")
        if engine.precision != ctx.precision:   # another call switched it (autocast)
            engine.set_precision(ctx.precision)
        if engine._pending is None or engine._pending is not ctx.pending:
            if isinstance(ctx.tok, Batch):                     # this forward's state again
                engine.forward(ctx.tok, want_grad=True)
            else:
                engine.forward(ctx.tok, ctx.tgt, want_grad=True)
        scale = 0.0 if dloss is None else float(dloss)
        if dlogits is not None:  # d(loss built from the logits): added to the CE's dlogits
            if engine.recompute:
                raise RuntimeError(
                    "anebackward one-call backward: a loss built from the returned logits "
                    "cannot be differentiated with recompute on (gradient checkpointing): "
                    "the classifier runs in chunks and keeps no dlogits; turn recompute off "
                    "or use the returned loss only")
            B, S = ctx.tok.shape
            off, V = engine._ws[3], engine.config.vocab_size
            dl = torch.from_numpy(engine._ws[2][off:off + B * S * V])
            dl.mul_(scale).add_(dlogits.reshape(-1))
            scale = 1.0
        # the trainable tensors' gradients (all of them, or a LoRA engine's
        # adapters): specs are then the engine's grad specs, offsets into them
        flat = _grad_buffer(engine)
        engine.backward(grad_scale=scale, grads=flat.numpy())
        grads = [flat[off:off + math.prod(shape)].view(shape) for _, off, shape in ctx.specs]
        return (None, None, None, None, None, None, *grads)


@torch._dynamo.disable   # a one-time side effect on the module tree, never traced
def bind_parameters(slot, root, cfg, own, lora=None, trainable=None):
    """The one binding of torch parameters to a C engine (the llama2.c
    adapter, the HF drop-in, HF under peft). own maps every tensor name of
    the engine (layout.tensor_specs(cfg, lora)) to the torch parameter that
    holds it. A fresh anebackward.Llama(cfg, lora=, trainable=) gets their
    values once; then every parameter views its place in the engine's flat
    buffer (no second copy) and the slot binds the trainable ones. The
    engine, or None (the parameters are not exactly the engine's tensors,
    or not CPU float32): the caller then takes its own path."""
    specs = tensor_specs(cfg, lora)
    if set(own) != {n for n, _, _ in specs}:
        return None
    if not all(p.device.type == "cpu" and p.dtype == torch.float32 for p in own.values()):
        return None   # e.g. bfloat16 weights: the per-op / HF path
    engine = anebackward.Llama(cfg, init=False, lora=lora, trainable=trainable)
    with torch.no_grad():
        for name, _, _ in specs:
            view = torch.from_numpy(engine.params[name])
            view.copy_(own[name])
            own[name].data = view
    slot.bind(engine, engine._grad_specs, [own[n] for n, _, _ in engine._grad_specs], root)
    return engine


@torch._dynamo.disable
def model_step(slot, tokens, targets, want_logits=False):
    """ModelFunction over an EngineSlot: the loss, or (loss, logits). One
    opaque step for torch.compile (dynamo does not trace into the C engine)."""
    need = torch.is_grad_enabled() and any(p.requires_grad for p in slot.params)
    # torch's optimizers update the parameter views in place, unseen by the
    # engine's weight copies (the ANE's staging, the bf16 copy)
    _note_params_changed(slot)
    return ModelFunction.apply(slot.engine, slot.specs, tokens, targets, need, bool(want_logits),
                               *slot.params)


def autocast_precision(engine=None):
    """The precision torch.autocast asks of a one-call step on CPU tensors:
    "fp32" when CPU autocast is off (autocast on another device leaves CPU
    ops alone), "bf16" under torch.autocast("cpu", torch.bfloat16) when the
    engine can run it (anebackward.bf16.available(), a CPU backend), else
    None: an autocast the engine does not compute (float16, or bf16 without
    the bf16 matmuls), for which the caller takes its fallback path."""
    if not torch.is_autocast_enabled("cpu"):
        return "fp32"
    if torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return None
    from .. import bf16
    if (engine is not None and engine.backend in ("reference", "ane")) or not bf16.available():
        return None
    return "bf16"


def precision_step(slot, precision, tokens, targets, want_logits=False):
    """model_step with the engine at `precision` ("fp32" or "bf16", from
    autocast_precision), switched first when it differs (the switch drops the
    engine's workspace and bf16 weight copy; both are made again at this
    forward). Under bf16 the logits come back as bfloat16, the dtype of an
    autocast model's classifier output; the loss stays float32."""
    if slot.engine.precision != precision:
        slot.engine.set_precision(precision)
    out = model_step(slot, tokens, targets, want_logits=want_logits)
    if want_logits and precision == "bf16":
        loss, logits = out
        return loss, logits.to(torch.bfloat16)
    return out


ONE_CALL_CHOICES = ("auto", True, False)


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def own_forward(fn):
    """Marks a function as one of the package's module forwards (a module
    whose instance forward is one of these still runs as the engine does)."""
    fn._anebackward_forward = True
    return fn


def _foreign_forward(m):
    f = m.__dict__.get("forward")
    return f is not None and not getattr(getattr(f, "__func__", f), "_anebackward_forward", False)


def _inert_hook(fn):
    """Hugging Face's enable_input_require_grads() hook (registered by
    gradient/activation checkpointing and for adapters): it only marks the
    embeddings' output as requiring grad, which the engine's backward does
    not need (it computes every parameter's gradient itself). Recognised by
    its exact module and qualified name, nothing looser."""
    return (getattr(fn, "__module__", None) == "transformers.modeling_utils"
            and getattr(fn, "__qualname__", None) ==
            "PreTrainedModel.enable_input_require_grads.<locals>.make_inputs_require_grads")


def _runs_hooks(m):
    """m has a hook the engine would skip (any but _inert_hook)."""
    if m._forward_hooks and not all(_inert_hook(f) for f in m._forward_hooks.values()):
        return True
    return any(getattr(m, h) for h in _MODULE_HOOKS if h != "_forward_hooks")


class EngineSlot:
    """The one-call engine of a model and the parameters bound to its flat
    buffer. Copies and pickles start empty (fresh): the C model's buffers
    are not copied along; the copy binds its own on first use.

    bind() also records the model's module tree (every module and where each
    parameter sits in it); current(root) tells whether a call may still run
    as the engine: the same modules holding the same parameters (no module
    replaced, e.g. by peft's adapters; no parameter re-assigned), no hook on
    any submodule nor a global module hook (they would not run: the engine
    calls no module), no forward replaced on an instance."""

    def __init__(self):
        self.engine, self.specs, self.params, self.ptrs, self.fresh = None, None, (), (), True
        self.tree, self.owners, self.check = (), (), None
        self.frozen, self.base_key = (), None

    def bind(self, engine, specs, params, root=None, check=None):
        """check: None, or a callable saying whether the model's state outside
        its tree still is the bound one (peft's adapter flags, see
        anebackward/transformers/_peft.py); current() asks it at each call."""
        self.engine, self.specs, self.params, self.check = engine, specs, params, check
        self.ptrs = [int(engine.params[name].ctypes.data) for name, _, _ in specs]
        if root is not None:
            self.tree = tuple(root.modules())
            self.owners = tuple((m, k, p) for m in self.tree for k, p in m._parameters.items())
        # the bound tensors not passed to the step (a frozen base under
        # adapters): their versions still tell whether the base changed
        lo = int(engine.flat_params.ctypes.data)
        hi = lo + 4 * engine.flat_params.size
        passed = {id(p) for p in params}
        self.frozen = tuple(p for _, _, p in self.owners if p is not None and id(p) not in passed
                            and lo <= p.data_ptr() < hi)
        self.base_key = None

    def in_place(self):
        """Every parameter still CPU float32 at its place in the flat buffer
        (not re-allocated by .to(), .double(), ...)."""
        return self.engine is not None and all(
            p.dtype == torch.float32 and p.device.type == "cpu" and p.data_ptr() == ptr
            for p, ptr in zip(self.params, self.ptrs))

    def same_tree(self, root):
        """root's modules and their parameters are the bound ones."""
        tree = tuple(root.modules())
        return (len(tree) == len(self.tree) and all(a is b for a, b in zip(tree, self.tree))
                and all(m._parameters.get(k) is p for m, k, p in self.owners))

    def current(self, root):
        """The bound tree, unhooked, with parameters in place (see the class doc)."""
        if any(getattr(torch.nn.modules.module, h) for h in _GLOBAL_HOOKS):
            return False
        if not self.same_tree(root):
            return False
        for m in self.tree[1:]:
            if _runs_hooks(m) or _foreign_forward(m):
                return False
        return self.in_place() and (self.check is None or bool(self.check()))

    def __reduce__(self):
        return (EngineSlot, ())


def _per_op_autocast_check():
    """The per-op kernels compute float32 only: under CPU autocast a call
    that cannot take the one-call path raises instead of running fp32."""
    if torch.is_autocast_enabled("cpu"):
        from .. import bf16
        dt = str(torch.get_autocast_dtype("cpu")).replace("torch.", "")
        need = "" if dt != "bfloat16" or bf16.available() else \
            f" (the bf16 matmuls are not available: {bf16.INSTALL_HINT})"
        raise TypeError(
            f"Transformer.forward: torch.autocast('cpu', {dt}) is on, but this call takes the "
            f"per-op kernels, which compute float32 only; under autocast only calls with "
            f"targets run, on the one-call path, for bfloat16{need}. Call it outside autocast, "
            f"or use llama2.c's model.py for {dt}")


class Transformer(nn.Module):
    """llama2.c's Transformer over anebackward kernels.

    Transformer(params: ModelArgs) as in llama2.c, or Transformer(dim=..., ...)
    with ModelArgs' fields as keywords. Keyword-only extras:
      return_logits=True   False: forward(tokens, targets) returns None (one
                           vocab-sized buffer fewer); last_loss is set as usual.
      linear="torch"       or "anebackward": who runs the dense projections.
      blas_threads="auto"  threads of anebackward's OpenBLAS (a process-wide
                           setting, applied here once): "auto" = 1 when
                           PyTorch runs the matmuls (linear="torch"), since
                           both pools busy-wait and two pools on the same
                           cores slow each other down several-fold; an int
                           sets it; None leaves it alone. The one-call path
                           (training calls) runs everything in the package,
                           so "auto" leaves it alone unless one_call=False.
      one_call="auto"      the one-call path when the call allows it (see the
                           module docstring); False: always per-op; True:
                           raise when a training call cannot take it."""

    last_loss: Optional[torch.Tensor]

    def __init__(self, params: Optional[ModelArgs] = None, *, return_logits: bool = True,
                 linear: str = "torch", blas_threads: Union[str, int, None] = "auto",
                 one_call: Union[str, bool] = "auto", **kwargs: Any) -> None:
        super().__init__()
        if params is None:
            params = ModelArgs(**kwargs)
        elif kwargs:
            raise TypeError(f"Transformer: pass either a ModelArgs or its fields as keywords, "
                            f"not both (got extra {sorted(kwargs)})")
        if linear not in LINEAR_CHOICES:
            raise ValueError(f"Transformer: linear must be one of {LINEAR_CHOICES}, got {linear!r}")
        if one_call not in ONE_CALL_CHOICES:
            raise ValueError(f"Transformer: one_call must be 'auto', True or False, got {one_call!r}")
        if not 0.0 <= params.dropout < 1.0:
            raise ValueError(f"Transformer: dropout must be in [0, 1), got {params.dropout}")
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        self.return_logits = bool(return_logits)

        # Same modules, registered and initialised in the same order as
        # llama2.c, so torch.manual_seed(s) gives the same weights.
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.dropout = nn.Dropout(params.dropout)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        self.tok_embeddings.weight = self.output.weight  # tied, as llama2.c

        freqs_cos, freqs_sin = precompute_freqs_cis(params.dim // params.n_heads, params.max_seq_len)
        self.register_buffer("freqs_cos", freqs_cos, persistent=False)
        self.register_buffer("freqs_sin", freqs_sin, persistent=False)

        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("w3.weight") or pn.endswith("wo.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * params.n_layers))
        self.last_loss = None

        self.workspace = AttentionWorkspace()
        self.linear = linear
        self.one_call = one_call
        self._slot = EngineSlot()
        self._slot.fresh = False
        self._one_call_bind()
        if blas_threads == "auto":
            blas_threads = 1 if linear == "torch" and not one_call else None
        if blas_threads is not None:
            anebackward.set_num_threads(blas_threads)

    @property
    def linear(self) -> str:
        return self._linear

    @linear.setter
    def linear(self, impl: str) -> None:
        if impl not in LINEAR_CHOICES:
            raise ValueError(f"Transformer.linear must be one of {LINEAR_CHOICES}, got {impl!r}")
        self._linear = impl
        for layer in self.layers:
            layer.attention.linear_impl = impl
            layer.feed_forward.linear_impl = impl
            layer.attention.workspace = self.workspace

    def _one_call_bind(self):
        """An anebackward.Llama of this shape, in self._slot; every parameter
        becomes a view of its flat buffer (values copied once, here: at
        construction, and on the first one-call forward of a copied or
        unpickled model). Leaves the slot empty for shapes the C model does
        not take (then the per-op path runs)."""
        p = self.params
        try:
            cfg = LlamaConfig(dim=p.dim, hidden_dim=self.layers[0].feed_forward.w1.weight.shape[0],
                              n_layers=p.n_layers, n_heads=p.n_heads,
                              n_kv_heads=p.n_kv_heads or p.n_heads, vocab_size=p.vocab_size,
                              max_seq_len=p.max_seq_len, shared_classifier=True,
                              norm_eps=p.norm_eps)
        except ValueError:
            return
        bind_parameters(self._slot, self, cfg, dict(self.named_parameters()))

    def _one_call_ok(self, tokens, targets):
        """Whether this call can take the one-call path."""
        if self.one_call is False or targets is None:
            return False
        if tokens.device.type != "cpu" or targets.device.type != "cpu":
            return False
        if self._slot.engine is None and self._slot.fresh:  # a copy: bind its own buffer
            if not all(p.dtype == torch.float32 and p.device.type == "cpu"
                       for p in self.parameters()):
                return False  # e.g. .bfloat16(): the per-op path says what it takes
            self._slot.fresh = False
            self._one_call_bind()
        return self._slot.current(self) and autocast_precision(self._slot.engine) is not None

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor,
                targets: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        if self.training and self.params.dropout > 0.0 and torch.is_grad_enabled():
            raise NotImplementedError(
                f"anebackward.torch.Transformer: dropout={self.params.dropout} in training mode is "
                f"not supported (no dropout in the attention kernel). Train with dropout=0.0 "
                f"(llama2.c's default), or use llama2.c's model.py for dropout")
        if tokens.dim() != 2:
            raise ValueError(f"Transformer.forward: tokens must be [batch, seqlen], got shape "
                             f"{tuple(tokens.shape)}")
        _bsz, seqlen = tokens.shape
        if seqlen > self.params.max_seq_len:
            raise ValueError(f"Transformer.forward: seqlen {seqlen} exceeds max_seq_len "
                             f"{self.params.max_seq_len}; crop the tokens (as generate() does)")
        if self._one_call_ok(tokens, targets):
            prec = autocast_precision(self._slot.engine)
            if not self.return_logits:
                self.last_loss = precision_step(self._slot, prec, tokens, targets)
                return None
            self.last_loss, logits = precision_step(self._slot, prec, tokens, targets,
                                                    want_logits=True)
            return logits
        if self.one_call is True and targets is not None and torch.is_grad_enabled():
            raise ValueError("Transformer.forward: one_call=True but this call cannot take the "
                             "one-call path (it needs targets, CPU float32 parameters still in "
                             "the model's flat buffer, no hook or replaced module inside "
                             "the model, and no autocast other than CPU bfloat16)")
        _per_op_autocast_check()
        h = self.tok_embeddings(tokens)
        freqs_cos, freqs_sin = self.freqs_cos[:seqlen], self.freqs_sin[:seqlen]
        for layer in self.layers:
            h = layer(h, freqs_cos, freqs_sin)
        h = self.norm(h)

        if targets is not None:
            out = classifier_cross_entropy(h, self.output.weight, targets,
                                           return_logits=self.return_logits, matmul=self._linear)
            if self.return_logits:
                self.last_loss, logits = out
            else:
                self.last_loss, logits = out, None
        else:
            # inference: only the last position's logits (time axis kept)
            logits = F.linear(h[:, [-1], :], self.output.weight)
            self.last_loss = None
        return logits

    # ---- llama2.c's helpers, same signatures ----
    def configure_optimizers(self, weight_decay: float, learning_rate: float,
                             betas: Tuple[float, float], device_type: str) -> AdamW:
        """AdamW with weight decay on the ≥2-D parameters only (as llama2.c),
        as anebackward.torch.AdamW: torch.optim.AdamW's math and state_dict,
        the update in one fused C pass per parameter."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        nodecay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": nodecay, "weight_decay": 0.0}]
        print(f"num decayed parameter tensors: {len(decay)}, with "
              f"{sum(p.numel() for p in decay):,} parameters")
        print(f"num non-decayed parameter tensors: {len(nodecay)}, with "
              f"{sum(p.numel() for p in nodecay):,} parameters")
        print("using fused AdamW: True (anebackward's C kernel)")
        return AdamW(groups, lr=learning_rate, betas=betas)

    def estimate_mfu(self, fwdbwd_per_iter: int, dt: float) -> float:
        """Model flops utilisation against an A100's bf16 peak (llama2.c's formula)."""
        N = sum(p.numel() for p in self.parameters())
        cfg = self.params
        L, H, Q, T = cfg.n_layers, cfg.n_heads, cfg.dim // cfg.n_heads, cfg.max_seq_len
        flops_per_iter = (6 * N + 12 * L * H * Q * T) * T * fwdbwd_per_iter
        return flops_per_iter / dt / 312e12

    @torch.inference_mode()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None) -> torch.Tensor:
        """Sample max_new_tokens continuations of idx [B, T] (no KV cache)."""
        for _ in range(max_new_tokens):
            ctx = idx if idx.size(1) <= self.params.max_seq_len else idx[:, -self.params.max_seq_len:]
            logits = self(ctx)[:, -1, :]
            if temperature == 0.0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, nxt), dim=1)
        return idx
