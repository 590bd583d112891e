"""A Llama-2 model (llama2.c's model.py architecture) trained through the C
core: LlamaConfig, Llama, AdamW and the cosine learning-rate schedule.

All parameters live in ONE flat float32 buffer (`model.flat_params`) and all
gradients in another (`model.flat_grads`); `model.params[name]` and
`model.grads[name]` are views into them, named like llama2.c's PyTorch state
dict. The flat layout (anebackward/layout.py, from C) puts every 2-D weight
first and the 1-D RMSNorm weights last:

    tok_embeddings | wq | wk | wv | wo | w1 | w2 | w3 | output (untied) || norms

so AdamW's weight decay (2-D weights only, like llama2.c's train.py) is the
prefix `flat[:n_decay]` and the update is one pass over two contiguous
regions. A tied classifier has no `output.weight`: it IS
`tok_embeddings.weight`, with one gradient and one update.

    model = Llama(LlamaConfig.preset("stories15M"), seed=0)
    loss = model.forward(tokens)      # tokens [S] or [B, S]: t predicts t+1
    model.backward()                  # fills model.grads (one C call)
    model.clip_grad_norm(1.0)
    opt.step()
"""
from __future__ import annotations

import itertools
import math
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from . import _checks as C
from . import checkpoint
from ._backend import resolve
from ._native import check, ffi, fptr, iptr, lib
from .config import PRESETS, LlamaConfig
from .kernels.optim import check_adamw_hparams, check_adamw_step, clip_grad_norm, grad_norm
from .layout import c_config, param_layout, tensor_specs, views
from .types import Backend, F32Array, Tokens

# Parameter versions: the ANE's key for its fp16 copies of the weights. One
# process-wide count, so a new model whose buffer lands at a freed model's
# address never meets that model's staged weights.
_param_versions = itertools.count(1)


class Llama:
    """A Llama-2 model whose forward and backward run in C (one call each).

    Llama(config, seed=0): weights initialised like llama2.c's model.py —
    normal(0, 0.02) for every linear and embedding weight, normal(0,
    0.02/sqrt(2 n_layers)) for the residual projections (names ending in
    w3.weight and wo.weight, as llama2.c selects them), ones for the RMSNorm
    weights (also Qwen3's q_norm/k_norm). backend="reference" runs the seed's
    scalar loops (slow; the baseline). recompute=True keeps only each layer's
    input between forward and backward and recomputes the rest layer by
    layer in the backward: identical gradients, a fraction of the workspace
    (see workspace_bytes), about one more forward per step. backend="ane"
    runs the input gradients (dx) of the layer projections (wq wk wv wo w1 w2
    w3) on the Apple Neural Engine, each overlapped with the CPU's weight
    gradient of the same projection; "auto" does so only where
    anebackward.ane routes every projection's shape there, else all on the
    CPU (ane_reason says why). The ANE keeps fp16 copies of the weights keyed
    to params_version, which AdamW.step bumps: after writing into params
    yourself, call mark_params_changed()."""

    def __init__(self, config: Optional[LlamaConfig] = None, seed: int = 0, *,
                 backend: Backend = None, init: bool = True, recompute: bool = False) -> None:
        if config is None:
            config = PRESETS["default"]
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"Llama: config must be a LlamaConfig, got {type(config).__name__}")
        self.config = config
        self.backend = resolve("Llama", backend)
        self.recompute = bool(recompute)
        self._cfg = c_config(config, reference=self.backend == "reference",
                             recompute=self.recompute)
        self.layout = param_layout(config)
        self.n_params = self.layout["n_params"]
        self.n_decay = self.layout["n_decay"]
        self._flat_params = np.zeros(self.n_params, dtype=np.float32)
        self._flat_grads = np.zeros(self.n_params, dtype=np.float32)
        self._specs = tensor_specs(config)
        self._groups: Optional[Dict[int, Tuple[Tuple[int, int], ...]]] = None
        self._in_backward = False      # inside backward's on_grads_ready callback
        self.params = views(self.flat_params, self._specs)
        self.grads = views(self.flat_grads, self._specs)
        self._ws = None            # (B, S, workspace array, logits offset)
        self._pending = None       # (B, S) of the last want_grad forward, until its backward
        self.last_loss = None
        self.ane_reason = "no backward yet"   # None: the last backward's dx ran on the ANE
        self.mark_params_changed()
        if init:
            self.init_weights(seed)

    def set_recompute(self, recompute: bool) -> None:
        """Switch activation recomputation (see the class doc) on or off."""
        self.recompute = bool(recompute)
        self._cfg = c_config(self.config, reference=self.backend == "reference",
                             recompute=self.recompute)
        self._ws = None
        self._pending = None

    # The C model reads these buffers by the layout above: they are fixed
    # for the model's life (read-only attributes); change their contents, as
    # params[name][...] = ... or flat_params[:] = ... do, never the arrays.
    @property
    def flat_params(self) -> F32Array:
        """All parameters, one float32 buffer (params[name] are views into it)."""
        return self._flat_params

    @property
    def flat_grads(self) -> F32Array:
        """All gradients, one float32 buffer (grads[name] are views into it)."""
        return self._flat_grads

    @property
    def params_version(self) -> int:
        """Changes whenever the parameters do (see mark_params_changed)."""
        return self._params_version

    def mark_params_changed(self) -> None:
        """Say that flat_params changed (AdamW.step and init_weights call
        this): the ANE converts the weights to fp16 again at the next
        backward instead of reusing its staged copies."""
        self._params_version = next(_param_versions)

    # -- initialisation ----------------------------------------------------
    def init_weights(self, seed: int = 0) -> None:
        """Re-initialise every weight like llama2.c's model.py (seedable)."""
        rng = np.random.default_rng(seed)
        lay, c = self.layout, self.config
        w = self.flat_params[:self.n_decay]
        rng.standard_normal(out=w, dtype=np.float32)
        w *= np.float32(0.02)
        resid = np.float32(1.0 / math.sqrt(2 * c.n_layers))
        for key, n in (("wo", c.dim * c.q_dim), ("w3", c.hidden_dim * c.dim)):
            self.flat_params[lay[key]:lay[key] + c.n_layers * n] *= resid
        self.flat_params[self.n_decay:] = 1.0
        self.flat_grads[:] = 0.0
        self._pending = None
        self.mark_params_changed()

    # -- forward / backward ------------------------------------------------
    def _batch(self, fn, tokens, name="tokens"):
        if not isinstance(tokens, np.ndarray):
            try:
                tokens = np.asarray(tokens)
            except Exception:
                raise TypeError(f"{fn}: {name} must be an integer array, got "
                                f"{type(tokens).__name__}") from None
        if tokens.ndim not in (1, 2) or tokens.size == 0:
            raise ValueError(f"{fn}: {name} must be a non-empty [S] or [B, S] array, got shape "
                             f"{tokens.shape}")
        tok = C.tokens(fn, name, tokens, self.config.vocab_size,
                       allow_ignore=(name == "targets"))
        tok = tok.reshape(1, -1) if tok.ndim == 1 else tok
        B, S = tok.shape
        if S > self.config.max_seq_len:
            raise ValueError(f"{fn}: the sequence length {S} exceeds max_seq_len = "
                             f"{self.config.max_seq_len}")
        return tok, B, S

    def _workspace(self, B, S):
        if self._in_backward:
            raise RuntimeError("Llama: forward, backward and logits cannot run inside "
                               "backward's on_grads_ready callback: the backward is still "
                               "using the activation workspace")
        if self._ws is None or self._ws[:2] != (B, S):
            total = ffi.new("int64_t *")
            off = ffi.new("int64_t *")
            check(lib.ab_model_workspace_floats(self._cfg, B, S, total, off), "Llama workspace")
            self._ws = None  # free the old one first
            # zeroed (calloc: lazily mapped pages, no cost): no stale "ready" tag
            self._ws = (B, S, np.zeros(total[0], dtype=np.float32), off[0])
        return self._ws[2]

    def workspace_bytes(self, batch_size: int, seq_len: int) -> int:
        """Bytes of the activation workspace for a [batch_size, seq_len] batch."""
        total = ffi.new("int64_t *")
        check(lib.ab_model_workspace_floats(self._cfg, batch_size, seq_len, total, ffi.NULL),
              "workspace_bytes")
        return total[0] * 4

    def forward(self, tokens: Tokens, targets: Optional[Tokens] = None, *,
                want_grad: bool = True, logits_out: Optional[F32Array] = None) -> float:
        """The mean cross-entropy loss of a batch.

        tokens: int [S] or [B, S] (int32; int64/uint16 are converted).
        targets: same shape, -1 = ignored; default: position t predicts
        tokens[t+1], i.e. the mean over the B*(S-1) predictions (the seed's
        semantics). With want_grad (default) the activations and dlogits are
        kept for backward(). logits_out: a writeable C-contiguous float32
        array of B*S*vocab floats (e.g. [B, S, vocab]) that receives the
        logits too (one copy; loss and gradients are the same)."""
        fn = "Llama.forward"
        tok, B, S = self._batch(fn, tokens)
        if targets is None:
            if S < 2:
                raise ValueError(f"{fn}: tokens must hold at least 2 positions per sequence "
                                 "(position t predicts t+1), or pass targets=")
            tgt = np.empty_like(tok)
            tgt[:, :-1] = tok[:, 1:]
            tgt[:, -1] = -1
        else:
            tgt, Bt, St = self._batch(fn, targets, "targets")
            if (Bt, St) != (B, S):
                raise ValueError(f"{fn}: targets must have the shape of tokens ({B}, {S}), got "
                                 f"({Bt}, {St})")
            if not (tgt >= 0).any():
                raise ValueError(f"{fn}: every target is -1 (ignored); there is nothing to predict")
        if logits_out is not None:
            V = self.config.vocab_size
            if (not isinstance(logits_out, np.ndarray) or logits_out.dtype != np.float32
                    or logits_out.size != B * S * V or not logits_out.flags.c_contiguous
                    or not logits_out.flags.writeable):
                raise ValueError(f"{fn}: logits_out must be a writeable C-contiguous float32 "
                                 f"array of {B}*{S}*{V} floats, got "
                                 f"{getattr(logits_out, 'dtype', type(logits_out).__name__)} "
                                 f"{getattr(logits_out, 'shape', '')}")
        work = self._workspace(B, S)
        loss = ffi.new("double *")
        self._pending = None
        if logits_out is None:
            check(lib.ab_model_forward(loss, self._cfg, fptr(self.flat_params), iptr(tok),
                                       iptr(tgt), B, S, int(bool(want_grad)), fptr(work),
                                       work.size), fn)
        else:
            check(lib.ab_model_forward_logits(loss, fptr(logits_out), self._cfg,
                                              fptr(self.flat_params), iptr(tok), iptr(tgt), B, S,
                                              int(bool(want_grad)), fptr(work), work.size), fn)
        if want_grad:
            self._pending = (B, S)   # C keeps the tokens: the caller may reuse its buffer
        self.last_loss = float(loss[0])
        return self.last_loss

    __call__ = forward

    def backward(self, *, accumulate: bool = False, grad_scale: float = 1.0,
                 grads: Optional[F32Array] = None,
                 on_grads_ready: Optional[Callable[[List[Tuple[int, int]]], None]] = None
                 ) -> None:
        """Fill model.grads with the gradient of the last forward()'s loss
        times grad_scale (overwriting them, or adding to them with
        accumulate=True — gradient accumulation over micro-batches: pass
        grad_scale=1/n_micro). One C call over all layers. grads: another
        float32 buffer of n_params in the same layout to fill instead.

        on_grads_ready(ranges): called during the backward, on this thread,
        each time a group of gradients is final — ranges is a list of
        (start, stop) float offsets into the gradient buffer, groups in the
        order of grad_groups() — so a data-parallel trainer can reduce them
        while the rest is computed (anebackward/distributed.py does). The
        backward never writes a range after announcing it; the gradients are
        bit-identical to a backward without the callback. An exception in the
        callback stops further calls and is raised when the backward returns
        (the gradients are complete); so is the RuntimeError of calling this
        model's forward, backward or logits from inside it (the backward is
        using their workspace). With the ANE backend every group is announced
        after the whole backward."""
        fn = "Llama.backward"
        grads = self.flat_grads if grads is None else C.out(fn, "grads", grads, (self.n_params,),
                                                                 ("flat_params", self.flat_params))
        if on_grads_ready is not None and not callable(on_grads_ready):
            raise TypeError(f"{fn}: on_grads_ready must be callable or None, got "
                            f"{type(on_grads_ready).__name__}")
        if self._pending is None:
            raise RuntimeError(f"{fn}: call forward(tokens) (with want_grad=True) first; each "
                               "forward allows one backward")
        grad_scale = C.finite_float(fn, "grad_scale", grad_scale)
        B, S = self._pending
        self._pending = None  # dlogits are consumed (scaled in place)
        work = self._workspace(B, S)
        ctx = self._ane_context(B * S)
        args = (self._cfg, fptr(self.flat_params), fptr(grads), B, S, grad_scale,
                int(bool(accumulate)), fptr(work), work.size)
        if ctx is None and on_grads_ready is None:
            check(lib.ab_model_backward(*args), fn)
        elif ctx is None:
            hook = _ReadyHook(on_grads_ready, self._group_ranges())
            self._in_backward = True
            try:
                check(lib.ab_model_backward_notify(*args, lib.ab_py_grads_ready, hook.handle), fn)
            finally:
                self._in_backward = False
            hook.finish()
        else:
            flags = lib.AB_ANE_STRICT if self.backend == "ane" else 0
            check(lib.ab_model_backward_ane(*args, ctx, self._params_version, flags), fn)
            if on_grads_ready is not None:
                for ranges in self.grad_groups():
                    on_grads_ready(ranges)

    def grad_groups(self) -> List[List[Tuple[int, int]]]:
        """The groups of gradients backward(on_grads_ready=...) announces, in
        order: [final norm (+ untied output)], layer n_layers-1, ..., layer 0,
        [tok_embeddings (+ tied output)]; each a list of (start, stop) float
        offsets into the flat gradient buffer. Together they cover it once."""
        r = self._group_ranges()
        L = self.config.n_layers
        return [list(r[g]) for g in [L, *range(L - 1, -1, -1), -1]]

    def _group_ranges(self) -> Dict[int, Tuple[Tuple[int, int], ...]]:
        """C's group number (ab_model_backward_notify) -> its ranges."""
        if self._groups is None:
            L, groups = self.config.n_layers, {}
            for name, off, shape in self._specs:
                if name.startswith("layers."):
                    g = int(name.split(".")[1])
                elif name in ("norm.weight", "output.weight"):
                    g = L
                else:               # tok_embeddings (and, tied, the classifier)
                    g = -1
                groups.setdefault(g, []).append((off, off + math.prod(shape)))
            self._groups = {g: tuple(sorted(v)) for g, v in groups.items()}
        return self._groups

    def _ane_context(self, N):
        """The ANE context for a backward over N rows, or None (then
        self.ane_reason says why) — "ane": always (or raise), "auto": when
        every layer projection's dx is routed to the ANE."""
        if self.backend not in ("ane", "auto"):
            self.ane_reason = f"backend={self.backend!r}"
            return None
        from . import ane
        if self.backend == "ane":
            ane.require()
        shapes = {shape for name, _, shape in self._specs if name.startswith("layers.")
                  and len(shape) == 2}
        for n_out, n_in in sorted(shapes):
            self.ane_reason = ane.route_reason(self.backend, "linear_backward_dx",
                                               N=N, n_in=n_in, n_out=n_out)
            if self.ane_reason is not None:
                return None
        return ane._current()[0]

    def logits(self, tokens: Tokens, *, last_only: bool = False) -> F32Array:
        """Logits [B, S, vocab] (a new array) for int tokens [S] or [B, S];
        last_only=True returns only the last position's [B, vocab]."""
        fn = "Llama.logits"
        tok, B, S = self._batch(fn, tokens)
        work = self._workspace(B, S)
        self._pending = None
        check(lib.ab_model_forward(ffi.NULL, self._cfg, fptr(self.flat_params), iptr(tok),
                                   ffi.NULL, B, S, 0, fptr(work), work.size), fn)
        off, V = self._ws[3], self.config.vocab_size
        lg = work[off:off + B * S * V].reshape(B, S, V)
        return lg[:, -1, :].copy() if last_only else lg.copy()

    def decoder(self, max_positions: Optional[int] = None) -> Decoder:
        """A KV-cache decoder for generation, one token per call, like
        llama2.c's run.c: `dec.step(token, pos)` returns the logits [vocab]
        of the next token (a buffer overwritten by the next call). The cache
        holds max_positions positions (default max_seq_len: HF models have
        tens of thousands, so pass what the generation needs)."""
        return Decoder(self, max_positions)

    # -- gradients and parameters ------------------------------------------
    def zero_grad(self) -> None:
        self.flat_grads[:] = 0.0

    def grad_norm(self) -> float:
        return grad_norm(self.flat_grads)

    def clip_grad_norm(self, max_norm: float) -> float:
        """Scale all gradients so that their global L2 norm is at most
        max_norm (one pass over the flat buffer); returns the norm before."""
        return clip_grad_norm(self.flat_grads, max_norm)

    def named_parameters(self) -> List[Tuple[str, F32Array]]:
        return list(self.params.items())

    def num_params(self, *, non_embedding: bool = False) -> int:
        n = self.n_params
        if non_embedding:
            n -= self.config.vocab_size * self.config.dim
        return n

    # -- checkpoints ---------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write a llama2.c v0 checkpoint (atomically)."""
        checkpoint.save_model(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, backend: Backend = None) -> Llama:
        """Read a llama2.c v0 checkpoint."""
        return checkpoint.load_model(path, cls, backend=backend)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, backend: Backend = None,
                        recompute: bool = False) -> Llama:
        """Read a Hugging Face model directory (config.json + model.safetensors,
        or a sharded model.safetensors.index.json) of model_type llama or qwen3;
        float32/bfloat16/float16 weights become float32 (anebackward.hf)."""
        from . import hf
        return hf.load_pretrained(directory, cls, backend=backend, recompute=recompute)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write a Hugging Face model directory (config.json + model.safetensors,
        float32) that transformers' AutoModelForCausalLM.from_pretrained loads."""
        from . import hf
        hf.save_pretrained(self, directory)


class Decoder:
    """Incremental inference over a Llama (see Llama.decoder). Positions must
    be fed in order 0, 1, 2, ...; the cache holds max_positions positions
    (default max_seq_len)."""

    def __init__(self, model: Llama, max_positions: Optional[int] = None) -> None:
        self.model = model
        T = model.config.max_seq_len
        if max_positions is not None:
            T = min(C.positive_int("Llama.decoder", "max_positions", max_positions), T)
        self.max_positions = T
        # the same model with a cache of T positions (the parameter layout
        # does not depend on max_seq_len)
        cfg = model._cfg if T == model.config.max_seq_len else c_config(
            model.config.replace(max_seq_len=T), reference=model.backend == "reference")
        self._cfg = cfg
        n = ffi.new("int64_t *")
        check(lib.ab_model_kv_cache_floats(cfg, n), "Llama.decoder")
        self.kv_cache = np.zeros(n[0], dtype=np.float32)
        check(lib.ab_model_decode_workspace_floats(cfg, n), "Llama.decoder")
        self._work = np.zeros(n[0], dtype=np.float32)
        self._logits = np.zeros(model.config.vocab_size, dtype=np.float32)
        self.pos = 0

    def step(self, token: int, pos: Optional[int] = None) -> F32Array:
        fn = "Decoder.step"
        pos = self.pos if pos is None else C.nonneg_int(fn, "pos", pos)
        if pos > self.pos:
            raise ValueError(f"{fn}: pos {pos} skips positions; the next position is {self.pos}")
        if pos >= self.max_positions:
            raise ValueError(f"{fn}: pos {pos} >= the decoder's max_positions {self.max_positions} "
                             f"(max_seq_len {self.model.config.max_seq_len})")
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or \
                not 0 <= token < self.model.config.vocab_size:
            raise ValueError(f"{fn}: token must be an int in [0, {self.model.config.vocab_size}), "
                             f"got {token!r}")
        check(lib.ab_model_decode(fptr(self._logits), self._cfg,
                                  fptr(self.model.flat_params), int(token), pos,
                                  fptr(self.kv_cache), fptr(self._work), self._work.size), fn)
        self.pos = pos + 1
        return self._logits


def cosine_lr(step: int, *, max_lr: float, warmup_steps: int, total_steps: int,
              min_lr: float = 0.0) -> float:
    """The learning rate at `step` (counting from 0) as llama2.c's train.py
    get_lr: linear warm-up from 0 over warmup_steps, cosine decay to min_lr
    at total_steps, min_lr after."""
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    if step > total_steps:
        return min_lr
    span = max(total_steps - warmup_steps, 1)
    ratio = (step - warmup_steps) / span
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


class AdamW:
    """AdamW over a Llama's flat buffers, one fused C pass per step.

    Decoupled weight decay (torch.optim.AdamW semantics) applies only to the
    2-D weights, as llama2.c's train.py configures its optimiser: embeddings
    and every linear weight decay; RMSNorm weights do not. The flat layout
    keeps the decayed weights in the prefix flat[:model.n_decay], so a step is
    ab_adamw over that prefix with weight_decay and over the rest with 0. A
    tied classifier is one tensor and is updated once."""

    def __init__(self, model: Llama, lr: float = 5e-4, betas: Tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1) -> None:
        fn = "AdamW"
        if not isinstance(model, Llama):
            raise TypeError(f"{fn}: model must be an anebackward.Llama, got {type(model).__name__}")
        self.model = model
        self.lr, self.betas, self.eps, self.weight_decay = check_adamw_hparams(
            fn, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self._m = np.zeros(model.n_params, dtype=np.float32)
        self._v = np.zeros(model.n_params, dtype=np.float32)
        self.step_count = 0

    @property
    def m(self) -> F32Array:
        """First moments, one float32 buffer laid out like model.flat_params."""
        return self._m

    @property
    def v(self) -> F32Array:
        """Second moments, one float32 buffer laid out like model.flat_params."""
        return self._v

    def step(self, lr: Optional[float] = None) -> None:
        """One update of every parameter from model.flat_grads; lr overrides
        self.lr for this step (and becomes self.lr)."""
        if lr is not None:
            self.lr = check_adamw_hparams("AdamW.step", lr=lr)[0]
        check_adamw_step("AdamW.step", self.step_count + 1)
        self.step_count += 1
        m, nd = self.model, self.model.n_decay
        b1, b2 = self.betas
        for lo, hi, wd in ((0, nd, self.weight_decay), (nd, m.n_params, 0.0)):
            check(lib.ab_adamw(fptr(m.flat_params[lo:hi]), fptr(m.flat_grads[lo:hi]),
                               fptr(self.m[lo:hi]), fptr(self.v[lo:hi]), hi - lo,
                               self.step_count, self.lr, b1, b2, self.eps, wd), "AdamW.step")
        m.mark_params_changed()

    def state_dict(self) -> Dict[str, Any]:
        return {"step": self.step_count, "lr": self.lr, "betas": list(self.betas),
                "eps": self.eps, "weight_decay": self.weight_decay, "m": self.m, "v": self.v}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a state_dict(); every entry is checked before anything of
        self changes (ValueError/TypeError naming the entry, KeyError for a
        missing one)."""
        fn = "AdamW.load_state_dict"
        for name in ("m", "v"):
            a = state[name]
            if (not isinstance(a, np.ndarray) or a.shape != (self.model.n_params,)
                    or a.dtype != np.float32):
                raise ValueError(f"{fn}: {name} must be a float32 array of shape "
                                 f"({self.model.n_params},), got {getattr(a, 'dtype', type(a))} "
                                 f"{getattr(a, 'shape', '')}")
            if not np.isfinite(a).all():
                raise ValueError(f"{fn}: {name} holds non-finite values")
        if (state["v"] < 0).any():
            raise ValueError(f"{fn}: v (second moments) holds negative values")
        step = check_adamw_step(fn, state["step"], lo=0)
        lr, betas, eps, wd = check_adamw_hparams(fn, lr=state["lr"], betas=state["betas"],
                                                 eps=state["eps"],
                                                 weight_decay=state["weight_decay"])
        self.m[:] = state["m"]
        self.v[:] = state["v"]
        self.step_count, self.lr, self.betas, self.eps, self.weight_decay = step, lr, betas, eps, wd


class _ReadyHook:
    """One backward's on_grads_ready: C calls ab_py_grads_ready(handle, group)
    on the calling thread; the first exception is kept, stops further calls,
    and is raised by finish() once the C call has returned."""

    def __init__(self, fn, ranges):
        self.fn, self.ranges, self.error = fn, ranges, None
        self.handle = ffi.new_handle(self)

    def finish(self):
        if self.error is not None:
            raise self.error


@ffi.def_extern()
def ab_py_grads_ready(user, group):
    hook = ffi.from_handle(user)
    if hook.error is not None:
        return
    try:
        hook.fn(list(hook.ranges[group]))
    except BaseException as e:      # noqa: B036 — re-raised by finish(), never swallowed
        hook.error = e

