"""The one-call path of a patched HF model wrapped by peft's LoRA.

peft.get_peft_model(model, peft.LoraConfig(...)) replaces each targeted
nn.Linear (q_proj ... down_proj) by a peft lora.Linear holding the original
layer as `base_layer` and the adapter as `lora_A[name]` / `lora_B[name]`.
The C model computes that layer exactly when it is plain LoRA:
y = x W^T + s (x A^T) B^T. bind() then binds the model to an
anebackward.Llama with adapters (anebackward.lora.LoraConfig):

  - every HF parameter (base weights, norms, embeddings and the lora_A /
    lora_B weights) becomes a view of the engine's flat parameter buffer
    (values copied once), so an optimizer step on the adapters is what
    the next C call reads;
  - the engine's trainable tensors are exactly the HF parameters with
    requires_grad (peft: the adapters), so the frozen base gets no
    weight-gradient matmul; the engine returns the gradients of those only
    (its grad specs), and they are the parameters ModelFunction differentiates;
  - the scale s is read from the peft layers' scaling[adapter] (as peft
    computed it: lora_alpha / r, or / sqrt(r) with rsLoRA), the same in
    every layer; the rank is the adapters' one;
  - the targets are the projections peft wrapped, the same in every layer.

Anything else peft does is not the C model's, so bind() refuses the model
(HF's path runs, through the patched per-op forwards): DoRA, an adapter
bias (lora_bias), fan_in_fan_out, another adapter type (IA3, LoHa, ...),
modules_to_save, several adapters loaded, layers or ranks that differ,
lora_dropout > 0 (its dropout module).

What can change after binding without changing the module tree is checked
at every call (state(), the slot's check): the active adapter, merged
adapters (merge_adapter()), disabled adapters (`with
model.disable_adapter()`), the dropout module and its p, use_dora,
lora_bias, the scaling (set_scale) and which parameters require
gradients; also that every bound parameter still sits in the flat buffer.
A change makes the call take HF's path (exact: the HF parameters are the
engine's); a changed tree (an adapter added, peft applied after binding)
binds again, or is refused.
"""
import re

import torch

_ADAPTER = re.compile(r"^(.*)\.lora_([AB])\.([^.]+)\.weight$")


def _lora_linear():
    try:
        from peft.tuners.lora.layer import Linear
    except Exception:  # noqa: BLE001 - peft missing or changed: no LoRA binding
        return None
    return Linear


def _layer_state(layer, adapter):
    """What decides whether one peft LoRA layer is plain LoRA on `adapter`
    now (compared at each call with the state seen at binding)."""
    drop = layer.lora_dropout[adapter] if adapter in layer.lora_dropout else None
    return (tuple(layer.active_adapters), bool(layer.disable_adapters), tuple(layer.merged_adapters),
            type(drop), getattr(drop, "p", 0.0), bool(layer.use_dora.get(adapter, False)),
            bool(getattr(layer, "lora_bias", {}).get(adapter, False)),
            float(layer.scaling.get(adapter, float("nan"))))


def _plain(layer, adapter):
    """One peft LoRA layer is y = x W^T + s (x A^T) B^T on `adapter` alone."""
    if (tuple(layer.active_adapters) != (adapter,) or layer.disable_adapters
            or layer.merged_adapters or getattr(layer, "fan_in_fan_out", False)
            or layer.use_dora.get(adapter, False) or getattr(layer, "lora_bias", {}).get(adapter)
            or adapter in getattr(layer, "lora_variant", {})):
        return False
    if set(layer.lora_A) != {adapter} or set(layer.lora_B) != {adapter}:
        return False
    a, b = layer.lora_A[adapter], layer.lora_B[adapter]
    if type(a) is not torch.nn.Linear or type(b) is not torch.nn.Linear \
            or a.bias is not None or b.bias is not None:
        return False
    if type(layer.base_layer) is not torch.nn.Linear or layer.base_layer.bias is not None:
        return False
    drop = layer.lora_dropout[adapter]
    if not (type(drop) is torch.nn.Identity
            or (type(drop) is torch.nn.Dropout and drop.p == 0.0)):
        return False
    return True


def bind(model, slot, cfg):
    """Bind a peft-wrapped LlamaForCausalLM / Qwen3ForCausalLM (the module
    peft's LoraModel holds) to an anebackward.Llama with adapters; False
    when the model is not plain LoRA on the projections (see the module doc)."""
    from ..torch.model import bind_parameters
    from ..hf import hf_name
    from ..layout import TARGETS, tensor_specs
    from ..lora import LoraConfig
    Linear = _lora_linear()
    if Linear is None:
        return False
    peft_kinds = {t[2]: t[0] for t in TARGETS}   # q_proj -> q, ...
    layers = {}   # module path -> peft LoRA layer
    for name, mod in model.named_modules():
        if type(mod) is Linear:
            layers[name] = mod
        elif type(mod).__module__.startswith("peft."):
            if not any(name.startswith(n + ".") for n in layers):
                return False     # another peft module: modules_to_save, IA3, LoHa, ...
    if not layers:
        return False
    adapters = {tuple(l.active_adapters) for l in layers.values()}
    if len(adapters) != 1 or len(next(iter(adapters))) != 1:
        return False
    adapter = next(iter(adapters))[0]
    if not all(_plain(l, adapter) for l in layers.values()):
        return False
    ranks = {l.r.get(adapter) for l in layers.values()}
    scales = {float(l.scaling[adapter]) for l in layers.values()}
    if len(ranks) != 1 or len(scales) != 1:
        return False
    r, s = ranks.pop(), scales.pop()
    kinds = {}      # layer index -> targeted kinds
    for name in layers:
        m = re.fullmatch(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)", name)
        if m is None or m.group(2) not in peft_kinds:
            return False
        kinds.setdefault(int(m.group(1)), set()).add(peft_kinds[m.group(2)])
    targets = {frozenset(k) for k in kinds.values()}
    if len(kinds) != cfg.n_layers or len(targets) != 1:
        return False
    try:   # alpha from peft's scale: s = alpha / r (computed in float64, stored as C float)
        lc = LoraConfig(r=int(r), alpha=s * r, targets=tuple(sorted(targets.pop())))
    except (ValueError, TypeError):
        return False
    if (float(torch.tensor(lc.scale, dtype=torch.float32))
            != float(torch.tensor(s, dtype=torch.float32))):
        return False     # alpha * r / r rounded away from peft's scale (the C model's float)
    # the HF parameters by our names
    by_ours = {}
    for n, p in model.named_parameters():
        a = _ADAPTER.match(n)
        if a is not None:
            if a.group(3) != adapter:
                return False
            key = f"{a.group(1)}.lora_{a.group(2)}.weight"
        else:
            key = n.replace(".base_layer.", ".")
        if key in by_ours:
            return False
        by_ours[key] = p
    specs = tensor_specs(cfg, lc)
    hf = {hf_name(n): n for n, _, _ in specs}
    if set(hf) != set(by_ours):
        return False     # e.g. DoRA's magnitude, an adapter bias
    own = {n: by_ours[h] for h, n in hf.items()}
    trainable = [n for n, _, _ in specs if own[n].requires_grad]
    engine = bind_parameters(slot, model, cfg, own, lora=lc, trainable=trainable)
    if engine is None:
        return False
    every = [(own[n], int(engine.params[n].ctypes.data)) for n, _, _ in specs]
    seen = _state(layers, adapter, own)

    def check():
        return (all(p.data_ptr() == ptr and p.dtype == torch.float32 and p.device.type == "cpu"
                    for p, ptr in every)
                and _state(layers, adapter, own) == seen)

    slot.check = check
    return True


def _state(layers, adapter, own):
    return (tuple(_layer_state(l, adapter) for l in layers.values()),
            tuple(p.requires_grad for p in own.values()))
