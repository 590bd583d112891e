"""The patched forwards of HF's Llama / Qwen3 modules.

Each forward takes the package's C kernels when the call is one they compute
exactly, and otherwise calls the module class's original (HF) forward for
that call, so a patched model never gives a silently different result:

  kernel path                         falls back to HF's code when
  RMSNorm (incl. Qwen3 q_norm/k_norm) input not CPU float32
  SwiGLU MLP                          input not CPU float32, hidden_act not silu
  attention (causal, MHA/GQA)         the model call is not plain causal (below),
                                      dropout > 0 in training, output_attentions,
                                      a sliding window shorter than the sequence,
                                      a non-default attention scaling
  classifier + cross-entropy          not training, no labels, logits_to_keep,
                                      hidden states not CPU float32

One-call path (the default for training calls with labels): input_ids as
full rows, or padded (attention_mask zeros, left or right), packed
(position_ids restarting inside a row, HF's DataCollatorWithFlattening) or
prompt-masked (labels -100) — the C model then runs the real tokens only, as
HF's masking defines them (anebackward.batch.from_padded) —, no cache in, no
extra outputs asked, a config the C model speaks (anebackward.hf.config_from_hf):
the whole model runs as one C call forward and one backward
(anebackward.torch.model.ModelFunction over an anebackward.Llama whose flat
buffer the HF parameters then view); it returns the loss only (logits,
cache and hidden states None). A model wrapped by peft's plain LoRA binds
to the C model with adapters (anebackward/transformers/_peft.py; whatever
else peft does takes the per-op path around peft's layers). Everything
else takes the per-op path above.

Autocast: under torch.autocast("cpu", torch.bfloat16) the one-call path
runs the engine at precision "bf16" (matmul operands rounded to bf16, fp32
accumulation, loss, norms, softmax, gradients and master weights; the bf16
weight copy is made again at every call, so an optimizer step in between is
seen), returning logits (when asked) as bfloat16 like HF's autocast
classifier and the loss as float32; with CPU autocast off it runs fp32. The
per-op kernels (RMSNorm, SwiGLU, attention, classifier + cross-entropy) are
float32 only: under any CPU autocast, a call the one-call path does not
take runs HF's own forward, as does every call under an autocast the engine
does not compute (float16, or bf16 where anebackward.bf16.available() is
False).

"Plain causal" is decided once per model call from what the caller passed:
attention_mask None or all ones, position_ids None or consecutive in each
row (restarting positions = packed sequences), and no tokens already in the
cache (a prefill or training step). It lives in a ContextVar for the call.
"""
import functools
import inspect

import torch

from ..torch.functions import (AttentionWorkspace, attention, chunked_classifier_cross_entropy,
                               rmsnorm, rope, swiglu)
from ..torch.model import (EngineSlot, autocast_precision, bind_parameters, own_forward,
                           precision_step)

_WORKSPACE = AttentionWorkspace()
_IGNORE_INDEX = -100  # HF's label ignore index; the kernel's is -1


def original(cls):
    """The class's HF forward (before any class-level patch)."""
    return cls.__dict__.get("_anebackward_original_forward") or cls.forward


def _cpu_f32(*tensors):
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def _fast(*tensors):
    """CPU float32 tensors outside autocast (under torch.autocast the kernels
    would compute in float32 what HF computes in the lower precision)."""
    return _cpu_f32(*tensors) and not torch.is_autocast_enabled("cpu")


# ---------------------------------------------------------------- RMSNorm ----
@own_forward
def rms_norm_forward(self, hidden_states):
    if not _fast(hidden_states, self.weight):
        return original(type(self))(self, hidden_states)
    return rmsnorm(hidden_states.contiguous(), self.weight, self.variance_epsilon)


# ---------------------------------------------------------------- SwiGLU ----
@own_forward
def swiglu_forward(self, x):
    if not _fast(x) or self.config.hidden_act not in ("silu", "swish"):
        return original(type(self))(self, x)
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


# ------------------------------------------------------------- attention ----
def _plain_causal(attention_mask, position_ids, cache):
    if isinstance(attention_mask, dict):  # a per-layer-type mask mapping (generate's static cache)
        return False
    if attention_mask is not None:
        if attention_mask.dim() != 2 or not bool(attention_mask.bool().all()):
            return False
    if position_ids is not None and position_ids.shape[-1] > 1:
        if not bool((position_ids.diff(dim=-1) == 1).all()):
            return False
    if cache is not None and cache.get_seq_length() > 0:
        return False
    return True


_CALL = "_anebackward_call"  # the decoder model's decision, passed down to each attention


def _rope_buffer_ok(model):
    """The rotary embedding's inv_freq buffer is what HF computes from the
    config (what the RoPE kernel and the C model compute) and its cos/sin
    are unscaled; checked again whenever the buffer changes."""
    rot = getattr(model, "rotary_emb", None)
    inv = getattr(rot, "inv_freq", None)
    if inv is None:
        return False
    key = (id(inv), inv.data_ptr(), inv._version)
    seen = rot.__dict__.get("_anebackward_inv_freq")
    if seen is not None and seen[0] == key:
        return seen[1]
    ok = False
    try:
        rope_type = getattr(rot, "rope_type", "default")
        if rope_type == "default":
            init = rot.compute_default_rope_parameters
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
            init = ROPE_INIT_FUNCTIONS[rope_type]
        expect, scaling = init(rot.config)
        ok = (float(getattr(rot, "attention_scaling", 1.0)) == 1.0 and float(scaling) == 1.0
              and torch.equal(inv.detach().cpu().float(), expect.float()))
    except Exception:  # noqa: BLE001 - anything unexpected: HF's cos/sin
        ok = False
    rot.__dict__["_anebackward_inv_freq"] = (key, ok)
    return ok


def model_forward_wrapper(orig):
    """Wraps a decoder model's forward (LlamaModel, Qwen3Model): decides
    from the caller's inputs whether the call is "plain causal", and whether
    the rotary buffer is the one the RoPE kernel computes, and hands both
    to each attention through the keyword arguments HF passes down to it (so
    a layer recomputed by gradient checkpointing sees the same decision)."""
    sig = inspect.signature(orig)

    @own_forward
    @functools.wraps(orig)
    def forward(self, *args, **kwargs):
        a = sig.bind_partial(self, *args, **kwargs).arguments
        kw = a.get("kwargs", {})
        cache = next((d[n] for d in (a, kw) for n in ("cache", "past_key_values")
                      if d.get(n) is not None), None)
        plain = _plain_causal(a.get("attention_mask"), a.get("position_ids"), cache)
        kwargs[_CALL] = (plain, _rope_buffer_ok(self))
        return orig(self, *args, **kwargs)

    return forward


def _kernel_rope(config, position_ids, S):
    """(pos_offset, theta, scaling) when the RoPE kernel computes HF's angles
    exactly for this call (every row at positions p0..p0+S-1, rope type
    default or llama3), else None (then HF's cos/sin are applied in torch)."""
    rp = getattr(config, "rope_parameters", None) or {}
    scaling = rp if rp.get("rope_type", "default") != "default" else None
    theta = rp.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None or (scaling is not None and scaling.get("rope_type") != "llama3"):
        return None
    p0 = 0
    if position_ids is not None:
        p0 = int(position_ids.reshape(-1)[0])
        if p0 < 0 or not torch.equal(position_ids, (torch.arange(S) + p0).expand_as(position_ids)):
            return None
    return p0, float(theta), scaling


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rope_half(x, cos, sin):
    """HF's rotate-half RoPE on [B, S, H, hd] with cos/sin [B, S, hd]."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + _rotate_half(x) * sin


@own_forward
def attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                      **kwargs):
    plain, rope_ok = kwargs.pop(_CALL, (False, False))
    # the KV cache is `past_key_values` up to transformers 5.23 and `cache` from 5.24
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    B, S = hidden_states.shape[:2]
    hd = self.head_dim
    sliding = getattr(self, "sliding_window", None)
    if (not plain or not _fast(hidden_states) or position_embeddings is None
            or (self.training and self.attention_dropout > 0.0)
            or kwargs.get("output_attentions") or (sliding is not None and sliding < S)
            or abs(self.scaling - hd ** -0.5) > 1e-12 * hd ** -0.5):
        return original(type(self))(self, hidden_states, position_embeddings=position_embeddings,
                                    attention_mask=attention_mask, **kwargs)
    cfg = self.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    q = self.q_proj(hidden_states).view(B, S, H, hd)
    k = self.k_proj(hidden_states).view(B, S, KV, hd)
    v = self.v_proj(hidden_states)
    if hasattr(self, "q_norm"):  # Qwen3: RMSNorm of each head over head_dim
        q, k = self.q_norm(q), self.k_norm(k)
    kr = (_kernel_rope(cfg, kwargs.get("position_ids"), S)
          if self._anebackward_rope and rope_ok else None)
    if kr is not None:  # the kernel's rotate-half layout, HF's theta and Llama-3 scaling
        p0, theta, scaling = kr
        sw = dict(layout="half", theta=theta, scaling=scaling)
        q = rope(q.reshape(B, S, H * hd), hd, p0, **sw).view(B, S, H, hd)
        k = rope(k.reshape(B, S, KV * hd), hd, p0, **sw).view(B, S, KV, hd)
    else:
        cos, sin = position_embeddings
        q, k = _rope_half(q, cos, sin), _rope_half(k, cos, sin)
    if cache is not None:  # an empty cache (prefill): store the keys/values as HF does
        cache.update(k.transpose(1, 2), v.view(B, S, KV, hd).transpose(1, 2), self.layer_idx)
    out = attention(q.reshape(B, S, H * hd), k.reshape(B, S, KV * hd), v, H, KV,
                    workspace=_WORKSPACE)
    return self.o_proj(out), None


# ------------------------------------------- classifier + cross-entropy ----
def _shifted_targets(labels, shift_labels):
    """HF's causal-LM shift: position t predicts labels[t+1]; the last
    position predicts nothing. -100 (HF's ignore index) becomes the kernel's -1."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=_IGNORE_INDEX)[..., 1:]
    t = shift_labels.reshape(-1)
    bad = (t < 0) & (t != _IGNORE_INDEX)
    if bool(bad.any()):
        raise ValueError(f"labels: negative label {int(t[bad][0])}; only {_IGNORE_INDEX} "
                         f"(ignored) may be negative")
    return torch.where(t == _IGNORE_INDEX, -1, t)


def _bind(model, slot):
    """Bind the model's parameters to a fresh C engine (values copied once,
    then every parameter views the engine's flat buffer); False when the
    C model does not take this model as it is now."""
    from ..hf import config_from_hf, hf_name
    from ..layout import tensor_specs
    try:
        cfg = config_from_hf(model.config.to_dict())
    except Exception:  # noqa: BLE001 - any config the C model does not speak: per-op path
        return False
    own = dict(model.named_parameters())
    names = {n: hf_name(n) for n, _, _ in tensor_specs(cfg)}
    if sorted(own) != sorted(names.values()):
        from . import _peft   # peft's LoRA layers: the engine with adapters, or refused
        return _peft.bind(model, slot, cfg)
    return bind_parameters(slot, model, cfg, {n: own[h] for n, h in names.items()}) is not None


def _one_call_slot(model):
    """The model's C engine (anebackward.Llama from its HF config) with every
    parameter viewing the engine's flat buffer, bound on first use and bound
    again when the module tree changed (a module or parameter replaced);
    None when this call cannot run as the engine: a config or tree the C
    model does not take (e.g. peft's DoRA), a hook on a submodule, a
    parameter moved out of the buffer."""
    slot = model.__dict__.get("_anebackward_slot")
    if slot is None:
        slot = model._anebackward_slot = EngineSlot()
    if slot.engine is not None and slot.current(model):
        return slot
    if slot.engine is not None and slot.in_place() and slot.same_tree(model):
        return None  # the bound tree, with a hook or a replaced forward in it
    tree = tuple(model.modules())
    refused = model.__dict__.get("_anebackward_refused")
    if refused is not None and len(refused) == len(tree) and all(
            a is b for a, b in zip(refused, tree)):
        return None  # this very tree was refused before
    if not _bind(model, slot):
        model._anebackward_refused = tree
        return None
    model._anebackward_refused = None
    return slot if slot.current(model) else None


def _full_rows(mask, pos, S):
    """True when the call is B full rows at positions 0..S-1 (no padding,
    no packing): the C model's plain [B, S] batch."""
    return ((mask is None or (mask.dim() == 2 and bool(mask.bool().all())))
            and (pos is None or torch.equal(pos, torch.arange(S).expand_as(pos))))


def _splits_packed(model, a):
    """Whether HF's own masks cut this call's rows into packed documents:
    create_causal_mask does so only with position_ids, no attention_mask and
    no cache object, and LlamaModel/Qwen3Model make a cache whenever the
    effective use_cache is on (the call's, else the config's; off in
    training under gradient checkpointing)."""
    use_cache = a.get("use_cache")
    if use_cache is None:
        use_cache = getattr(model.config, "use_cache", False)
    if use_cache and model.training and getattr(model.model, "gradient_checkpointing", False):
        use_cache = False
    return a.get("attention_mask") is None and not use_cache


def _layout_batch(ids, mask, pos, targets, n_items, split_packed):
    """A padded (attention_mask zeros, left or right), packed (position_ids
    restarting inside a row) or prompt-masked call as the compact batch the
    C model runs (anebackward.batch.from_padded: HF's own masking rules, so
    loss and gradients are HF's); None when the call is not one it speaks
    (then HF's code runs): a mask that is not a 2-D 0/1 tensor, position_ids
    not [B or 1, S], or a counted label predicted from a padded position."""
    from ..batch import from_padded
    B, S = ids.shape
    if mask is not None:
        if not torch.is_tensor(mask) or mask.dim() != 2 or tuple(mask.shape) != (B, S):
            return None
        if mask.is_floating_point() or mask.is_complex():
            return None
        if not bool(((mask == 0) | (mask == 1)).all()):
            return None
        real = mask.bool()
        if bool((~real & (targets != -1)).any()) or not bool(real.any()):
            return None
    if pos is not None:
        if not torch.is_tensor(pos) or pos.dim() != 2 or pos.shape[-1] != S \
                or pos.shape[0] not in (1, B) or bool((pos < 0).any()):
            return None
    np_ = lambda t: None if t is None else t.detach().cpu().numpy()  # noqa: E731
    b = from_padded(np_(ids), attention_mask=np_(mask), position_ids=np_(pos),
                    targets=np_(targets), split_packed=split_packed,
                    fn="anebackward.transformers")
    if n_items is not None:
        import dataclasses
        b = dataclasses.replace(b, loss_denominator=float(n_items))
    return b


def _checkpointing(modules):
    """HF's gradient_checkpointing_enable() sets gradient_checkpointing on
    the decoder layers (and the decoder model), as instance attributes (read
    from __dict__: nn.Module.__getattr__ on every module costs ~70 us a call)."""
    return any(m.__dict__.get("gradient_checkpointing") is True for m in modules)


def _one_call(model, a, kw, labels, shift_labels, n_items, want_logits):
    """The loss (and, with want_logits, the logits) of the whole model as
    one C call forward and one backward (anebackward.torch.model.ModelFunction)
    when this call allows it: input ids on the CPU, full rows or a padded /
    packed / prompt-masked batch (_layout_batch; its logits: HF's path), no
    cache in or out needed, no extra outputs asked, no hook inside the model,
    CPU autocast off (fp32) or to bfloat16 (the engine at precision "bf16",
    anebackward.torch.model.autocast_precision); else None (then the per-op
    path or HF's forward runs).
    Gradient checkpointing on the model runs the engine with recompute
    (logits asked for then take HF's path: the chunked classifier keeps none
    of their gradient)."""
    ids = a.get("input_ids")
    if (not model._anebackward_one_call or ids is None or ids.dim() != 2
            or a.get("inputs_embeds") is not None or ids.device.type != "cpu"
            or autocast_precision() is None
            or any(kw.get(k) for k in ("output_attentions", "output_hidden_states"))
            or set(kw) - {"output_attentions", "output_hidden_states", "return_dict"}):
        return None
    S = ids.shape[1]
    if any(a.get(k) is not None for k in ("cache", "past_key_values")) or \
            kw.get("past_key_values") is not None:
        return None
    pos, mask = a.get("position_ids"), a.get("attention_mask")
    if model.config.attention_dropout and model.training:
        return None
    if not _rope_buffer_ok(model.model):
        return None
    targets = _shifted_targets(labels, shift_labels).view(ids.shape)
    counted = int((targets != -1).sum())
    if counted == 0:
        return None
    batch = None
    if not (torch.is_tensor(mask) or mask is None) or not _full_rows(mask, pos, S):
        if want_logits:    # the logits of a padded/packed call: HF's path
            return None
        batch = _layout_batch(ids, mask, pos, targets, n_items, _splits_packed(model, a))
        # the C model's documents are at most max_seq_len (= max_position_embeddings) long
        if batch is None or batch.max_seqlen > model.config.max_position_embeddings:
            return None
    elif S > model.config.max_position_embeddings:
        return None
    slot = _one_call_slot(model)
    if slot is None:
        return None
    precision = autocast_precision(slot.engine)
    if precision is None:
        return None
    recompute = _checkpointing(slot.tree)
    if recompute and want_logits:   # recompute keeps no dlogits for a loss built from them
        return None
    if slot.engine.recompute != recompute:
        slot.engine.set_recompute(recompute)
    if batch is not None:  # the denominator is the batch's (n_items or its counted targets)
        return precision_step(slot, precision, batch, None), None
    out = precision_step(slot, precision, ids, targets, want_logits=want_logits)
    loss, logits = out if want_logits else (out, None)
    if n_items is not None:  # HF: sum / num_items_in_batch; the C model gives the mean
        loss = loss * (counted / n_items)
    return loss, logits


def _hooked(module):
    return any(getattr(module, h) for h in ("_forward_hooks", "_forward_pre_hooks",
                                            "_backward_hooks", "_backward_pre_hooks"))


def _plain_head(head):
    """The fused loss reads lm_head.weight itself: only for a plain
    nn.Linear without bias (not one wrapped, e.g. by peft's LoRA on lm_head,
    whose .weight is the base weight alone), unhooked, forward not replaced."""
    return (type(head) is torch.nn.Linear and head.bias is None and not _hooked(head)
            and "forward" not in head.__dict__ and _cpu_f32(head.weight))


def causal_lm_forward_wrapper(orig):
    """Wraps LlamaForCausalLM / Qwen3ForCausalLM.forward: in training with
    labels, the loss comes from the whole model in C (one call) or, per-op,
    from the chunked fused classifier + cross-entropy, and the returned
    logits are None (as Liger Kernel does) unless asked for: skip_logits=False
    in the call (Liger's keyword) or apply(..., skip_logits=False). Logits
    asked for come from the one-call path (carrying gradient into its C
    backward) or from HF's own forward. Any other call is HF's own forward."""
    sig = inspect.signature(orig)

    @own_forward
    @functools.wraps(orig)
    def forward(self, *args, **kwargs):
        skip = kwargs.pop("skip_logits", None)
        if skip is None:
            skip = getattr(self, "_anebackward_skip_logits", True)
        a = sig.bind_partial(self, *args, **kwargs).arguments
        kw = dict(a.pop("kwargs", {}))
        labels = a.get("labels")
        shift_labels = kw.pop("shift_labels", None)
        keep = a.get("logits_to_keep", 0)
        if (not self.training or (labels is None and shift_labels is None)
                or not (isinstance(keep, int) and keep == 0)
                or kwargs.get("return_dict") is False or not _plain_head(self.lm_head)
                or autocast_precision() is None):
            return orig(self, *args, **kwargs)
        n_items = kw.pop("num_items_in_batch", None)
        if torch.is_tensor(n_items):
            n_items = float(n_items.item())
        a.pop("self")
        a.pop("labels", None)
        a.pop("logits_to_keep", None)
        from transformers.modeling_outputs import CausalLMOutputWithPast
        res = _one_call(self, a, kw, labels, shift_labels, n_items, not skip)
        if res is not None:  # the whole model in C: no hidden states, no cache to return
            return CausalLMOutputWithPast(loss=res[0], logits=res[1])
        if not skip or torch.is_autocast_enabled("cpu"):  # the per-op kernels are fp32
            return orig(self, *args, **kwargs)
        out = self.model(**a, **kw)
        h = out.last_hidden_state
        if not _fast(h):
            raise TypeError(f"anebackward.transformers: the decoder returned {h.dtype} hidden "
                            f"states on {h.device}; the fused loss needs CPU float32")
        targets = _shifted_targets(labels, shift_labels)
        loss = chunked_classifier_cross_entropy(h.reshape(-1, h.shape[-1]), self.lm_head.weight,
                                                targets, n_items=n_items)
        res = CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=out.hidden_states,
                                     attentions=out.attentions)
        cache_field = "cache" if hasattr(out, "cache") else "past_key_values"
        res[cache_field] = getattr(out, cache_field)
        return res

    return forward
