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

import dataclasses
import functools
import itertools
import math
import os
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple, Union, overload

import numpy as np

from . import _checks as C
from . import batch as batch_mod
from . import bf16 as _bf16
from . import checkpoint
from .batch import Batch
from ._backend import resolve
from ._native import check, ffi, fptr, iptr, lib
from .config import PRESETS, LlamaConfig
from .kernels.optim import check_adamw_hparams, check_adamw_step, clip_grad_norm, grad_norm
from .layout import c_config, param_layout, tensors, views
from .types import Backend, F32Array, Tokens

# Parameter versions: the ANE's key for its fp16 copies of the weights. One
# process-wide count, so a new model whose buffer lands at a freed model's
# address never meets that model's staged weights.
_param_versions = itertools.count(1)


def _locked(method):
    """Run a Llama method under the model's lock (see Llama's doc)."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)
    return call


class _FixedBuffer:
    """A read-only attribute over the float32 buffer obj._<name>. The C core
    reads these buffers by pointer, so each stays one array for its owner's
    life: change its contents (obj.<name>[...] = ...), never the array."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name, self._attr = name, "_" + name

    @overload
    def __get__(self, obj: None, owner: Optional[type] = None) -> "_FixedBuffer": ...
    @overload
    def __get__(self, obj: object, owner: Optional[type] = None) -> F32Array: ...

    def __get__(self, obj: Any, owner: Optional[type] = None) -> Any:
        return self if obj is None else getattr(obj, self._attr)

    def __set__(self, obj: object, value: object) -> None:
        raise AttributeError(f"{type(obj).__name__}.{self._name} is fixed for the object's life "
                             f"(the C core reads it by pointer); assign its contents instead: "
                             f"{self._name}[...] = ...")


class Llama:
    """A Llama-2 model whose forward and backward run in C (one call each).

    Llama(config, seed=0): weights initialised like llama2.c's model.py —
    normal(0, 0.02) for every linear and embedding weight, normal(0,
    0.02/sqrt(2 n_layers)) for the residual projections (names ending in
    w3.weight and wo.weight, as llama2.c selects them), ones for the RMSNorm
    weights (also Qwen3's q_norm/k_norm). backend="reference" runs the seed's
    scalar loops (slow; the baseline). recompute=True keeps only each layer's
    input between forward and backward and recomputes the rest layer by
    layer in the backward, and runs the classifier in row chunks (its logits
    computed again in the backward, never all held at once): the layers'
    gradients identical, the loss and the classifier's gradient equal up to
    float32 rounding (summed chunk by chunk), a fraction of the workspace
    (see workspace_bytes), about one more forward per step. backend="ane"
    runs the layer projections (wq wk wv wo w1 w2 w3) of the forward and
    their input gradients (dx) on the Apple Neural Engine (fp16 operands,
    docs/ane.md) while a CPU thread computes the weight
    gradients queued behind them (one wait, at the end of the backward);
    "auto" does so only where
    anebackward.ane routes every projection's shape there, else all on the
    CPU (ane_reason says why). The ANE keeps fp16 copies of the weights keyed
    to params_version, which AdamW.step bumps: after writing into params
    yourself, call mark_params_changed().

    precision="bf16" runs every matmul (layer projections and classifier,
    forward and backward) with bf16 operands and fp32 accumulation
    (anebackward.bf16: oneDNN, or the portable path); the parameters, their
    gradients, AdamW, the norms, softmax, cross-entropy and the residual
    stream stay fp32. The bf16 copy of the weights is made again at the first
    forward after params_version changes (AdamW.step, mark_params_changed).
    Not with backend "reference" or "ane"; generation (decoder) runs fp32.

    trainable: which tensors get gradients and AdamW updates — None (all;
    with lora: the adapters only), an iterable of names, or a predicate
    called with each tensor's name; names are ours (llama2.c's,
    "layers.0.attention.wq.weight") or HF's ("model.layers.0.self_attn.q_proj.weight").
    A frozen tensor gets no weight-gradient product, no gradient storage and
    no optimizer state; gradients still flow through it. model.grads holds
    the trainable tensors only.

    lora (anebackward.lora.LoraConfig, or an int rank): LoRA adapters on the
    targeted projections (docs/lora.md), initialised like peft (A
    Kaiming-uniform from `seed`, B zero). merge()/unmerge() fold them into
    the base weights and back; save_adapter(dir) writes a peft directory.

    Threads: a model may be shared by several Python threads. Its
    forward, backward, logits, grad_norm, clip_grad_norm, zero_grad,
    init_weights and set_recompute, AdamW.step and Decoder.step all hold
    `model.lock` (a re-entrant lock) while they run, so concurrent calls
    take turns (each result is that of the call alone; the C kernels
    still use all the package's threads inside each call). A backward
    belongs to the last forward: a thread that needs its own
    forward/backward pair holds the lock around both
    (`with model.lock: model.forward(x); model.backward()`)."""

    _params_version: int     # see mark_params_changed
    _base_version: int       # the params version of the frozen base weights

    def __init__(self, config: Optional[LlamaConfig] = None, seed: int = 0, *,
                 backend: Backend = None, init: bool = True, recompute: bool = False,
                 precision: Optional[str] = None, trainable: Any = None,
                 lora: Any = None) -> None:
        if config is None:
            config = PRESETS["default"]
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"Llama: config must be a LlamaConfig, got {type(config).__name__}")
        self.config = config
        self.lock = threading.RLock()
        if lora is not None and backend == "ane":
            raise ValueError("Llama: LoRA adapters run on the CPU kernels; backend='ane' has no "
                             "adapter path (use 'cpu' or 'auto')")
        self.backend = resolve("Llama", backend)
        self.recompute = bool(recompute)
        self.precision = "fp32"
        from . import lora as lora_mod
        if lora is not None and not isinstance(lora, lora_mod.LoraConfig):
            lora = lora_mod.LoraConfig(r=lora)
        self.lora = lora
        self.lora_merged = False
        self.layout = param_layout(config, lora)
        self.n_params = self.layout["n_params"]
        self.n_decay = self.layout["n_decay"]
        # the base model's parameters: [0, n_base); the adapters follow
        self.n_base = min(self.layout[f"lora_a{t}"] for t in range(7))
        self._flat_params = np.zeros(self.n_params, dtype=np.float32)
        self._tensors = tensors(config, lora)
        self._specs = [(t.name, t.offset, t.shape) for t in self._tensors]
        self._grad_table(trainable)
        self._wbf_key = None       # (workspace, base and params versions) of the bf16 copy
        self.set_precision(precision)
        self._groups: Optional[Dict[int, Tuple[Tuple[int, int], ...]]] = None
        self._in_backward = False      # inside backward's on_grads_ready callback
        self.params = views(self.flat_params, self._specs)
        self._ws: Any = None       # (B, S, workspace array, logits offset)
        # (B, S, rows) of the last want_grad forward, until its backward
        self._pending: Optional[Tuple[int, int, int]] = None
        self.last_loss: Optional[float] = None
        self.ane_reason = "no step yet"   # None: the last step's projections ran on the ANE
        # the tokenizer save_pretrained writes (hf.TokenizerFiles; from_pretrained
        # keeps that of the directory it read)
        self.tokenizer_files: Any = None
        self.mark_params_changed()
        if init:
            self.init_weights(seed)
        elif lora is not None:
            lora_mod.init_adapters(self, seed)

    def _grad_table(self, trainable) -> None:
        """Which tensors train, and where their gradients live. C's
        ab_model_grad_layout computes the offsets (the same table the C
        backward reads through options.grad_offsets), so the views here and
        the backward's writes cannot disagree."""
        from .hf import hf_name
        names = [n for n, _, _ in self._specs]
        if trainable is None:
            chosen = [n for n in names if self.lora is None or ".lora_" in n]
        elif callable(trainable):
            chosen = [n for n in names if trainable(n) or trainable(hf_name(n))]
        else:
            if isinstance(trainable, str):
                raise TypeError("Llama: trainable must be a list of tensor names or a "
                                "predicate, got a str (wrap it in a list)")
            hf = {hf_name(n): n for n in names}
            chosen = []
            for t in trainable:
                if t in hf:
                    chosen.append(hf[t])
                elif t in set(names):
                    chosen.append(t)
                else:
                    raise ValueError(f"Llama: trainable names an unknown tensor {t!r} (names are "
                                     f"like {names[1]!r} or {hf_name(names[1])!r})")
        chosen_set = set(chosen)
        self.trainable = tuple(n for n in names if n in chosen_set)
        L = self.config.n_layers
        flags = np.zeros(int(lib.AB_TENSOR_KINDS) * L, dtype=np.uint8)
        for t in self._tensors:
            if t.name in chosen_set:
                flags[t.slot(L)] = 1
        if self.config.shared_classifier and "tok_embeddings.weight" in chosen_set:
            flags[int(lib.AB_TENSOR_OUTPUT) * L] = 1
        self._goff = np.zeros(flags.size, dtype=np.int64)
        n_grads = ffi.new("int64_t *")
        cfg = c_config(self.config, lora=self.lora)
        check(lib.ab_model_grad_layout(cfg, ffi.from_buffer("uint8_t[]", flags),
                                       ffi.from_buffer("int64_t[]", self._goff), n_grads),
              "Llama (trainable)")
        self.n_grads = int(n_grads[0])
        self._all_trainable = len(self.trainable) == len(names)
        self._flat_grads = np.zeros(self.n_grads, dtype=np.float32)
        # C's table again, now with the gradient offsets: the trainable tensors
        self._grad_tensors = [t for t in tensors(self.config, self.lora, self._goff)
                              if t.grad_offset >= 0]
        self._grad_specs = [(t.name, t.grad_offset, t.shape) for t in self._grad_tensors]
        self.grads = views(self._flat_grads, self._grad_specs)

    def _make_cfg(self):
        cfg = c_config(self.config, reference=self.backend == "reference",
                       recompute=self.recompute, precision=self.precision, lora=self.lora)
        cfg.options.lora_merged = int(self.lora_merged)
        if not self._all_trainable:   # the array lives as long as the model
            cfg.options.grad_offsets = ffi.from_buffer("int64_t[]", self._goff)
        return cfg

    @_locked
    def set_precision(self, precision: str) -> None:
        """Switch the matmuls between "fp32" and "bf16" (see the class doc)."""
        precision = _bf16.check_precision("Llama.set_precision", precision)
        if precision == "bf16":
            if self.backend in ("reference", "ane"):
                raise ValueError(f"Llama: precision='bf16' runs on the CPU kernels; "
                                 f"backend={self.backend!r} has no bf16 path (use 'cpu' or 'auto')")
            _bf16.require("Llama")
        self.precision = precision
        self._cfg = self._make_cfg()
        self._ws = None
        self._pending = None
        self._wbf_key = None

    @_locked
    def set_recompute(self, recompute: bool) -> None:
        """Switch activation recomputation (see the class doc) on or off."""
        self.recompute = bool(recompute)
        self._cfg = self._make_cfg()
        self._ws = None
        self._pending = None

    # The C model reads these buffers by the layout above (params[name][...] = ...
    # and flat_params[:] = ... change their contents; see _FixedBuffer)
    flat_params = _FixedBuffer()
    """All parameters, one float32 buffer (params[name] are views into it)."""
    flat_grads = _FixedBuffer()
    """All gradients, one float32 buffer (grads[name] are views into it)."""

    @property
    def params_version(self) -> int:
        """Changes whenever the parameters do (see mark_params_changed)."""
        return self._params_version

    def _mark_adapters_changed(self) -> None:
        """Only the adapters changed (AdamW.step with a frozen base): the
        bf16 copy of the base weights stays valid."""
        base = self._base_version
        self.mark_params_changed()
        self._base_version = base

    def mark_params_changed(self) -> None:
        """Say that flat_params changed (AdamW.step and init_weights call
        this): the ANE converts the weights to fp16 again at the next
        backward instead of reusing its staged copies."""
        self._params_version = next(_param_versions)
        self._base_version = self._params_version

    # -- initialisation ----------------------------------------------------
    @_locked
    def init_weights(self, seed: int = 0) -> None:
        """Re-initialise every weight like llama2.c's model.py (seedable);
        adapters as peft does."""
        rng = np.random.default_rng(seed)
        lay, c = self.layout, self.config
        w = self.flat_params[:self.n_decay]
        rng.standard_normal(out=w, dtype=np.float32)
        w *= np.float32(0.02)
        resid = np.float32(1.0 / math.sqrt(2 * c.n_layers))
        for key, n in (("wo", c.dim * c.q_dim), ("w3", c.hidden_dim * c.dim)):
            self.flat_params[lay[key]:lay[key] + c.n_layers * n] *= resid
        self.flat_params[self.n_decay:self.n_base] = 1.0
        self.flat_grads[:] = 0.0
        if self.lora is not None:
            from . import lora as lora_mod
            lora_mod.init_adapters(self, seed)
        self._pending = None
        self.mark_params_changed()

    # -- forward / backward ------------------------------------------------
    def _batch(self, fn, tokens, name="tokens"):
        tokens = C.int_array(fn, name, tokens)
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
            self._wbf_key = None
            # zeroed (calloc: lazily mapped pages, no cost): no stale "ready" tag
            self._ws = (B, S, np.zeros(total[0], dtype=np.float32), off[0])
        work = self._ws[2]
        key = (id(work), self._base_version, self._params_version)
        if self.precision == "bf16" and self._wbf_key != key:
            # the weights' bf16 copy (in the workspace), once per params
            # version; only the adapters' when the base has not changed
            if self._wbf_key is not None and self._wbf_key[:2] == key[:2]:
                check(lib.ab_model_bf16_refresh_adapters(self._cfg, fptr(self.flat_params),
                                                         fptr(work), work.size),
                      "Llama (bf16 adapters)")
            else:
                check(lib.ab_model_bf16_refresh(self._cfg, fptr(self.flat_params), fptr(work),
                                                work.size), "Llama (bf16 weights)")
            self._wbf_key = key
        return work

    def workspace_bytes(self, batch_size: int, seq_len: int) -> int:
        """Bytes of the activation workspace for a [batch_size, seq_len] batch."""
        total = ffi.new("int64_t *")
        check(lib.ab_model_workspace_floats(self._cfg, batch_size, seq_len, total, ffi.NULL),
              "workspace_bytes")
        return total[0] * 4

    @_locked
    def forward(self, tokens: Union[Tokens, Batch], targets: Optional[Tokens] = None, *,
                cu_seqlens: Optional[Tokens] = None, positions: Optional[Tokens] = None,
                attention_mask: Optional[Tokens] = None,
                loss_denominator: Optional[float] = None, want_grad: bool = True,
                logits_out: Optional[F32Array] = None) -> float:
        """The mean cross-entropy loss of a batch.

        tokens: int [S] or [B, S] (int32; int64/uint16 are converted).
        targets: same shape, -1 = ignored; default: position t predicts
        tokens[t+1], i.e. the mean over the B*(S-1) predictions (the seed's
        semantics). With want_grad (default) the activations and dlogits are
        kept for backward().

        Real batch layouts (anebackward.batch; the C model then runs the
        real tokens only, padding costs nothing):
          attention_mask [B, S] (0 = padding, left or right) and/or
            positions [B, S] (RoPE positions; restarting inside a row
            without a mask = packed documents, as HF's position_ids);
          cu_seqlens [n_seq+1] with tokens [N] the real tokens only, one
            document per segment (positions [N]: default index in the
            segment);
          an anebackward.Batch as tokens.
        Default targets then stay inside each document.
        loss_denominator: the loss is sum / loss_denominator instead of the
        mean (HF Trainer's num_items_in_batch).
        logits_out (full rows only): a writeable C-contiguous float32 array
        of B*S*vocab floats (e.g. [B, S, vocab]) that receives the logits too
        (one copy; loss and gradients are the same)."""
        fn = "Llama.forward"
        batch = self._as_batch(fn, tokens, targets, cu_seqlens, positions, attention_mask,
                               loss_denominator)
        if batch is not None:
            if logits_out is not None:
                raise ValueError(f"{fn}: logits_out applies to full rows only; use "
                                 "Llama.logits(...) for a batch layout")
            return self._forward_batch(fn, batch, want_grad)
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
        self._forward_c(fn, loss, tok, tgt, B, S, want_grad, work, logits_out)
        if want_grad:
            self._pending = (B, S, B * S)   # C keeps the tokens: the caller may reuse its buffer
        self.last_loss = value = float(loss[0])
        return value

    def _as_batch(self, fn, tokens, targets, cu_seqlens, positions, attention_mask,
                  loss_denominator):
        """The call's Batch, or None for plain full rows."""
        if loss_denominator is not None:
            loss_denominator = C.finite_float(fn, "loss_denominator", loss_denominator, lo=0.0,
                                              lo_open=True)
        if isinstance(tokens, Batch):
            extra = [n for n, v in (("targets", targets), ("cu_seqlens", cu_seqlens),
                                    ("positions", positions),
                                    ("attention_mask", attention_mask)) if v is not None]
            if extra:
                raise ValueError(f"{fn}: a Batch carries its own layout; do not pass "
                                 f"{', '.join(extra)} with it")
            b = tokens
        elif cu_seqlens is not None:
            if attention_mask is not None:
                raise ValueError(f"{fn}: pass cu_seqlens (compact real tokens) or "
                                 "attention_mask (a padded batch), not both")
            b = batch_mod.varlen(tokens, cu_seqlens, targets=targets, positions=positions, fn=fn)
        elif attention_mask is not None or positions is not None or loss_denominator is not None:
            b = batch_mod.from_padded(tokens, attention_mask=attention_mask,
                                      position_ids=positions, targets=targets, fn=fn)
        else:
            return None
        if loss_denominator is not None:
            b = dataclasses.replace(b, loss_denominator=loss_denominator)
        return b

    def _batch_workspace(self, b: Batch):
        """A workspace geometry (B, S) that holds this batch: the current
        one when it fits, else the batch's padded shape, else rows of its
        longest segment."""
        N, longest = b.n_tokens, b.max_seqlen
        if self._ws is not None and self._ws[0] * self._ws[1] >= N and self._ws[1] >= longest:
            return self._ws[0], self._ws[1], self._workspace(self._ws[0], self._ws[1])
        if b.shape is not None and b.shape[1] <= self.config.max_seq_len:
            B, S = b.shape
        else:
            B, S = -(-N // longest), longest
        return B, S, self._workspace(B, S)

    def _run_batch(self, fn, b: Batch, with_targets: bool, want_grad: bool):
        V = self.config.vocab_size
        tok = C.tokens(fn, "tokens", b.tokens, V)
        tgt = None
        if with_targets:
            if b.targets is None:
                raise ValueError(f"{fn}: the batch has no targets")
            tgt = C.tokens(fn, "targets", b.targets, V, allow_ignore=True)
            if not (tgt >= 0).any():
                raise ValueError(f"{fn}: every target is -1 (ignored); there is nothing to "
                                 "predict")
        if b.max_seqlen > self.config.max_seq_len:
            raise ValueError(f"{fn}: a segment of {b.max_seqlen} tokens exceeds max_seq_len = "
                             f"{self.config.max_seq_len}")
        B, S, work = self._batch_workspace(b)
        cu = np.ascontiguousarray(b.cu_seqlens, dtype=np.int64)
        pos = np.ascontiguousarray(b.positions, dtype=np.int32)
        lay = ffi.new("ab_batch_layout *")
        lay.n_tokens, lay.n_seq = tok.size, cu.size - 1
        lay.cu_seqlens = batch_mod.i64ptr(cu)
        lay.positions = iptr(pos)
        lay.loss_denominator = b.loss_denominator or 0.0
        loss = ffi.new("double *")
        self._pending = None
        check(lib.ab_model_forward_batch(loss if with_targets else ffi.NULL, self._cfg,
                                         fptr(self.flat_params), iptr(tok),
                                         iptr(tgt) if with_targets else ffi.NULL, B, S, lay,
                                         int(bool(want_grad)), fptr(work), work.size), fn)
        return B, S, work, float(loss[0])

    def _forward_batch(self, fn, b: Batch, want_grad: bool) -> float:
        B, S, _, loss = self._run_batch(fn, b, True, want_grad)
        if want_grad:
            self._pending = (B, S, b.n_tokens)   # the layout is in the workspace, for the backward
        self.last_loss = loss
        return loss

    __call__ = forward

    @_locked
    def backward(self, *, accumulate: bool = False, grad_scale: float = 1.0,
                 grads: Optional[F32Array] = None,
                 on_grads_ready: Optional[Callable[[List[Tuple[int, int]]], None]] = None
                 ) -> None:
        """Fill model.grads with the gradient of the last forward()'s loss
        times grad_scale (overwriting them, or adding to them with
        accumulate=True — gradient accumulation over micro-batches: pass
        grad_scale=1/n_micro). One C call over all layers. grads: another
        float32 buffer of n_grads (the trainable tensors' floats) in the
        layout of flat_grads to fill instead.

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
        if self.lora_merged:
            raise RuntimeError(f"{fn}: the adapters are merged into the base weights; call "
                               "unmerge() before training")
        grads = self.flat_grads if grads is None else C.out(fn, "grads", grads, (self.n_grads,),
                                                                 ("flat_params", self.flat_params))
        if on_grads_ready is not None and not callable(on_grads_ready):
            raise TypeError(f"{fn}: on_grads_ready must be callable or None, got "
                            f"{type(on_grads_ready).__name__}")
        if self._pending is None:
            raise RuntimeError(f"{fn}: call forward(tokens) (with want_grad=True) first; each "
                               "forward allows one backward")
        grad_scale = C.finite_float(fn, "grad_scale", grad_scale)
        B, S, rows = self._pending
        self._pending = None  # dlogits are consumed (scaled in place)
        work = self._workspace(B, S)
        ctx = self._ane_context(rows)
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
        offsets into the flat gradient buffer. A group whose tensors are all frozen is
        empty. Together they cover the buffer once."""
        r = self._group_ranges()
        L = self.config.n_layers
        return [list(r[g]) for g in [L, *range(L - 1, -1, -1), -1]]

    def _group_ranges(self) -> Dict[int, Tuple[Tuple[int, int], ...]]:
        """C's group number (ab_model_backward_notify) -> its ranges."""
        if self._groups is None:
            # every group the backward announces, empty when all of it is frozen
            groups: Dict[int, List[Tuple[int, int]]] = {
                g: [] for g in range(-1, self.config.n_layers + 1)}
            for t in self._grad_tensors:    # C's table gives each tensor's group
                off = t.grad_offset
                groups[t.group].append((off, off + math.prod(t.shape)))
            self._groups = {g: tuple(sorted(v)) for g, v in groups.items()}
        return self._groups

    def _forward_c(self, fn, loss, tok, tgt, B, S, want_grad, work, logits_out=None):
        """The C forward: the layer projections on the ANE where the backend
        routes them (_ane_context), else everything on the CPU; with
        logits_out (on the CPU) the logits are copied there too."""
        args = (loss, self._cfg, fptr(self.flat_params), iptr(tok),
                ffi.NULL if tgt is None else iptr(tgt), B, S, int(bool(want_grad)), fptr(work),
                work.size)
        if logits_out is not None:
            lo = logits_out
            if not (isinstance(lo, np.ndarray) and lo.dtype == np.float32
                    and lo.flags.c_contiguous and lo.flags.writeable
                    and lo.size == B * S * self.config.vocab_size):
                raise ValueError(f"{fn}: logits_out must be a writeable C-contiguous float32 "
                                 f"array of {B * S * self.config.vocab_size} floats")
            check(lib.ab_model_forward_logits(loss, fptr(lo), *args[1:]), fn)
            return
        ctx = self._ane_context(B * S)
        if ctx is None:
            check(lib.ab_model_forward(*args), fn)
        else:
            flags = lib.AB_ANE_STRICT if self.backend == "ane" else 0
            check(lib.ab_model_forward_ane(*args, ctx, self._params_version, flags), fn)

    def _ane_context(self, N):
        """The ANE context for a forward or backward over N rows, or None
        (then self.ane_reason says why) — "ane": always (or raise), "auto":
        when every layer projection's forward and dx, fused ones included,
        is routed to the ANE."""
        if self.backend not in ("ane", "auto"):
            self.ane_reason = f"backend={self.backend!r}"
            return None
        if self.precision == "bf16":
            self.ane_reason = "precision='bf16' (the ANE path is fp16/fp32)"
            return None
        if self.lora is not None:
            self.ane_reason = "LoRA adapters (the ANE path has none)"
            return None
        from . import ane
        if self.backend == "ane":
            ane.require()
        calls = []
        for n_out, n_in in {shape for name, _, shape in self._specs if name.startswith("layers.")
                            and len(shape) == 2}:
            calls += [("linear", n_in, n_out), ("linear_backward_dx", n_in, n_out)]
        c = self.config
        hd = c.head_dim or c.dim // c.n_heads
        for fused in (2 * c.hidden_dim, (c.n_heads + 2 * c.n_kv_heads) * hd):   # w1+w3, wq+wk+wv
            if ane.fused(fused):
                calls.append(("linear_backward_dx", c.dim, fused))
        for kernel, n_in, n_out in sorted(calls):
            self.ane_reason = ane.route_reason(self.backend, kernel, N=N, n_in=n_in, n_out=n_out)
            if self.ane_reason is not None:
                return None
        return ane.context()

    @_locked
    def logits(self, tokens: Union[Tokens, Batch], *, last_only: bool = False,
               cu_seqlens: Optional[Tokens] = None, positions: Optional[Tokens] = None,
               attention_mask: Optional[Tokens] = None) -> F32Array:
        """Logits (a new array): [S, vocab] for int tokens [S], [B, S, vocab]
        for [B, S]; last_only=True keeps only the last position ([vocab] or
        [B, vocab]).
        With a batch layout (as forward): compact tokens (cu_seqlens) give
        [N, vocab]; a padded batch gives [B, S, vocab] with zeros at the
        padded positions (nothing is computed there)."""
        fn = "Llama.logits"
        b = self._as_batch(fn, tokens, None, cu_seqlens, positions, attention_mask, None)
        if b is not None:
            if last_only:
                raise ValueError(f"{fn}: last_only applies to full rows only")
            if self.recompute:
                raise ValueError(f"{fn}: with recompute the workspace holds one chunk of "
                                 f"logits; for a batch layout's logits call "
                                 f"set_recompute(False) first")
            _, _, work, _ = self._run_batch(fn, b, False, False)
            off, V = self._ws[3], self.config.vocab_size
            lg = work[off:off + b.n_tokens * V].reshape(b.n_tokens, V).copy()
            return lg if b.rows is None else b.scatter(lg)
        tok, B, S = self._batch(fn, tokens)
        work = self._workspace(B, S)
        self._pending = None
        V = self.config.vocab_size
        if self.recompute:   # the workspace holds one chunk of them: straight into an array
            lg = np.empty((B, S, V), dtype=np.float32)
            self._forward_c(fn, ffi.NULL, tok, None, B, S, False, work, logits_out=lg)
        else:
            self._forward_c(fn, ffi.NULL, tok, None, B, S, False, work)
            off = self._ws[3]
            lg = work[off:off + B * S * V].reshape(B, S, V)
        lg = lg[:, -1, :] if last_only else lg
        one_row = not isinstance(tokens, Batch) and np.ndim(tokens) == 1
        return (lg[0] if one_row else lg).copy()

    def decoder(self, max_positions: Optional[int] = None) -> Decoder:
        """A KV-cache decoder for generation, one token per call, like
        llama2.c's run.c: `dec.step(token, pos)` returns the logits [vocab]
        of the next token (a buffer overwritten by the next call). The cache
        holds max_positions positions (default max_seq_len: HF models have
        tens of thousands, so pass what the generation needs)."""
        return Decoder(self, max_positions)

    # -- gradients and parameters ------------------------------------------
    @_locked
    def zero_grad(self) -> None:
        self.flat_grads[:] = 0.0

    @_locked
    def grad_norm(self) -> float:
        return grad_norm(self.flat_grads)

    @_locked
    def clip_grad_norm(self, max_norm: float) -> float:
        """Scale all gradients so that their global L2 norm is at most
        max_norm (one pass over the flat buffer); returns the norm before."""
        return clip_grad_norm(self.flat_grads, max_norm)

    def layout_offset(self, name: str) -> int:
        """Offset (floats) of tensor `name` in flat_params."""
        if not hasattr(self, "_offsets"):
            self._offsets = {n: off for n, off, _ in self._specs}
        return self._offsets[name]

    # -- LoRA ----------------------------------------------------------------
    def merge(self) -> None:
        """Fold every adapter into its base weight (W += s B A, float32); the
        forward then skips the adapters and the decoder may run. unmerge()
        subtracts the same product (W returns to within float32 rounding)."""
        self._fold(+1)

    def unmerge(self) -> None:
        """Undo merge() (see there) so the adapters can train again."""
        self._fold(-1)

    def _fold(self, sign):
        from . import lora as lora_mod
        fn = "Llama.merge" if sign > 0 else "Llama.unmerge"
        if self.lora is None:
            raise ValueError(f"{fn}: the model has no LoRA adapters")
        if self.lora_merged == (sign > 0):
            raise ValueError(f"{fn}: the adapters are already {'merged' if sign > 0 else 'unmerged'}")
        for name, _, _ in self._specs:
            d = None if ".lora_" in name else lora_mod.delta(self, name)
            if d is not None:
                self.params[name][...] += sign * d
        self.lora_merged = sign > 0
        self._pending = None
        self._cfg = self._make_cfg()
        self.mark_params_changed()

    def lora_delta(self, name: str) -> Optional[F32Array]:
        """s B A of the adapter on base weight `name` (float32), or None."""
        from . import lora as lora_mod
        return lora_mod.delta(self, name)

    def save_adapter(self, directory: str | os.PathLike,
                     base_model_name_or_path: Optional[str] = None) -> None:
        """Write the adapters as a peft directory (adapter_config.json +
        adapter_model.safetensors) for peft.PeftModel.from_pretrained."""
        from . import lora as lora_mod
        lora_mod.save_adapter(self, directory, base_model_name_or_path)

    def load_adapter(self, directory: str | os.PathLike) -> None:
        """Read a peft adapter directory's weights into this model's adapters
        (its adapter_config.json must match model.lora)."""
        from . import lora as lora_mod
        lc = lora_mod.read_adapter_config(directory)
        if self.lora is None or (lc.r, lc.targets, lc.scale) != (self.lora.r, self.lora.targets,
                                                                 self.lora.scale):
            raise ValueError(f"Llama.load_adapter: {os.fspath(directory)} holds {lc}, the model "
                             f"has {self.lora}; build the model with lora=read_adapter_config(dir)"
                             " or Llama.from_pretrained(hf_dir, adapter=dir)")
        lora_mod.load_adapter_weights(self, directory)

    def named_parameters(self) -> List[Tuple[str, F32Array]]:
        return list(self.params.items())

    def num_params(self, *, non_embedding: bool = False) -> int:
        n = self.n_params
        if non_embedding:
            n -= self.config.vocab_size * self.config.dim
        return n

    # -- checkpoints ---------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write a llama2.c v0 checkpoint (atomically; the base model only:
        merge() adapters first to keep them)."""
        self._base_only("Llama.save")
        checkpoint.save_model(self, path)

    def _base_only(self, fn):
        if self.lora is not None and not self.lora_merged:
            raise ValueError(f"{fn}: the model has unmerged LoRA adapters; call merge() first "
                             "(or save_pretrained(dir, merged=True)), or save_adapter(dir)")

    @classmethod
    def load(cls, path: str | os.PathLike, *, backend: Backend = None) -> Llama:
        """Read a llama2.c v0 checkpoint."""
        return checkpoint.load_model(path, cls, backend=backend)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, backend: Backend = None,
                        recompute: bool = False, lora: Any = None,
                        adapter: Optional[str | os.PathLike] = None, trainable: Any = None,
                        seed: int = 0) -> Llama:
        """Read a Hugging Face model directory (config.json + model.safetensors,
        or a sharded model.safetensors.index.json) of model_type llama or qwen3;
        float32/bfloat16/float16 weights become float32 (anebackward.hf).
        lora: new adapters (LoraConfig or rank; peft's init from seed);
        adapter: a peft adapter directory to load instead."""
        from . import hf
        from . import lora as lora_mod
        if adapter is not None:
            if lora is not None:
                raise ValueError("Llama.from_pretrained: pass lora (new adapters) or adapter "
                                 "(a saved one), not both")
            lora = lora_mod.read_adapter_config(adapter)
        model = hf.load_pretrained(directory, cls, backend=backend, recompute=recompute,
                                   lora=lora, trainable=trainable, seed=seed)
        if adapter is not None:
            lora_mod.load_adapter_weights(model, adapter)
        return model

    def save_pretrained(self, directory: str | os.PathLike, *, merged: bool = False,
                        tokenizer: Any = None) -> None:
        """Write a Hugging Face model directory (config.json + model.safetensors,
        float32) that transformers' AutoModelForCausalLM.from_pretrained loads,
        with its tokenizer: None writes model.tokenizer_files (those of the
        directory from_pretrained read, if it had any); or pass an HF
        directory, an HFTokenizer, an anebackward Tokenizer (tokenizer.bin;
        the byte-level one also as tokenizer.json), or False for none
        (anebackward.hf.TokenizerFiles.of). merged=True: with the adapters
        folded into the weights (the model itself is left as it is)."""
        from . import hf
        if not merged:
            self._base_only("Llama.save_pretrained")
        hf.save_pretrained(self, directory, tokenizer)


class Decoder:
    """Incremental inference over a Llama (see Llama.decoder). Positions must
    be fed in order 0, 1, 2, ...; the cache holds max_positions positions
    (default max_seq_len)."""

    def __init__(self, model: Llama, max_positions: Optional[int] = None) -> None:
        if model.lora is not None and not model.lora_merged:
            raise ValueError("Llama.decoder: the decoder runs the base weights only; call "
                             "model.merge() first (unmerge() before training again)")
        self.model = model
        T = model.config.max_seq_len
        if max_positions is not None:
            T = min(C.positive_int("Llama.decoder", "max_positions", max_positions), T)
        self.max_positions = T
        # the same model with a cache of T positions (the parameter layout
        # does not depend on max_seq_len)
        cfg = model._cfg if T == model.config.max_seq_len else c_config(
            model.config.replace(max_seq_len=T), reference=model.backend == "reference",
            lora=model.lora)
        cfg.options.lora_merged = int(model.lora_merged)
        self._cfg = cfg
        n = ffi.new("int64_t *")
        check(lib.ab_model_kv_cache_floats(cfg, n), "Llama.decoder")
        self.kv_cache = np.zeros(n[0], dtype=np.float32)
        check(lib.ab_model_decode_workspace_floats(cfg, n), "Llama.decoder")
        self._work = np.zeros(n[0], dtype=np.float32)
        self._logits = np.zeros(model.config.vocab_size, dtype=np.float32)
        self.pos = 0

    @property
    def lock(self) -> threading.RLock:
        """The model's lock (step() holds it; see Llama's doc)."""
        return self.model.lock

    @_locked
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
    at total_steps, min_lr after.

    step and warmup_steps are ints >= 0, total_steps an int >= 1, and
    0 <= min_lr <= max_lr (finite); anything else is a ValueError (TypeError
    for a non-number) naming the argument."""
    fn = "cosine_lr"
    step = C.nonneg_int(fn, "step", step)
    warmup_steps = C.nonneg_int(fn, "warmup_steps", warmup_steps)
    total_steps = C.positive_int(fn, "total_steps", total_steps)
    max_lr = C.finite_float(fn, "max_lr", max_lr, lo=0.0)
    min_lr = C.finite_float(fn, "min_lr", min_lr, lo=0.0)
    if min_lr > max_lr:
        raise ValueError(f"{fn}: min_lr ({min_lr:g}) must not exceed max_lr ({max_lr:g})")
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
        self._m = np.zeros(model.n_grads, dtype=np.float32)
        self._v = np.zeros(model.n_grads, dtype=np.float32)
        self.step_count = 0
        # (param start, grad start, size, decays) of each run of trainable
        # tensors contiguous in both buffers; 2-D tensors decay (all
        # trainable: the prefix [0, n_decay) and the rest, as before)
        runs: List[List[int]] = []
        for t in model._grad_tensors:
            off, goff = t.offset, t.grad_offset
            n, wd = math.prod(t.shape), int(t.decay)
            if runs and runs[-1][0] + runs[-1][2] == off and runs[-1][1] + runs[-1][2] == goff \
                    and runs[-1][3] == wd:
                runs[-1][2] += n
            else:
                runs.append([off, goff, n, wd])
        self._runs = [tuple(r) for r in runs]

    @property
    def lock(self) -> threading.RLock:
        """The model's lock (step() holds it; see Llama's doc)."""
        return self.model.lock

    m = _FixedBuffer()
    """First moments, one float32 buffer laid out like model.flat_grads."""
    v = _FixedBuffer()
    """Second moments, one float32 buffer laid out like model.flat_grads."""

    @_locked
    def step(self, lr: Optional[float] = None) -> None:
        """One update of every parameter from model.flat_grads; lr overrides
        self.lr for this step (and becomes self.lr)."""
        if lr is not None:
            self.lr = check_adamw_hparams("AdamW.step", lr=lr)[0]
        check_adamw_step("AdamW.step", self.step_count + 1)
        self.step_count += 1
        m = self.model
        if m.lora_merged:
            raise RuntimeError("AdamW.step: the model's adapters are merged; unmerge() first")
        b1, b2 = self.betas
        for p, g, n, decays in self._runs:
            wd = self.weight_decay if decays else 0.0
            check(lib.ab_adamw(fptr(m.flat_params[p:p + n]), fptr(m.flat_grads[g:g + n]),
                               fptr(self.m[g:g + n]), fptr(self.v[g:g + n]), n,
                               self.step_count, self.lr, b1, b2, self.eps, wd), "AdamW.step")
        if all(p >= m.n_base for p, _, _, _ in self._runs):
            m._mark_adapters_changed()       # the base is frozen: its bf16 copy stays
        else:
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
            if (not isinstance(a, np.ndarray) or a.shape != (self.model.n_grads,)
                    or a.dtype != np.float32):
                raise ValueError(f"{fn}: {name} must be a float32 array of shape "
                                 f"({self.model.n_grads},), got {getattr(a, 'dtype', type(a))} "
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

