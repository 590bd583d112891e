"""LoRA adapters on the C model's projections (docs/lora.md).

A targeted projection y = x W^T becomes y = x W^T + s (x A^T) B^T with
A [r, in], B [out, r] per layer and s = alpha / r (rsLoRA: alpha / sqrt(r)),
the base W frozen. The adapters live in the model's flat parameter buffer
after the norms (csrc/model/model.c); this module holds their description
(LoraConfig), the target names, peft's initialisation and the peft adapter
directory format (save_adapter / load_adapter).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

from .errors import CheckpointError

from .layout import ALL, TARGETS, target_index, tensor_names  # noqa: F401 (the target table)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """r: rank; alpha: scaling numerator (default r, i.e. s = 1); targets:
    names among q, k, v, o, gate, up, down (peft's q_proj ... and llama2.c's
    wq ... are accepted too); use_rslora: s = alpha / sqrt(r) instead of
    alpha / r. dropout must be 0: the C model has no adapter dropout."""
    r: int
    alpha: Optional[float] = None
    targets: Tuple[str, ...] = ALL
    use_rslora: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        fn = "LoraConfig"
        if isinstance(self.r, bool) or not isinstance(self.r, (int, np.integer)) or self.r < 1:
            raise ValueError(f"{fn}: r must be a positive int, got {self.r!r}")
        alpha = float(self.r if self.alpha is None else self.alpha)
        if not math.isfinite(alpha):
            raise ValueError(f"{fn}: alpha must be finite, got {self.alpha!r}")
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "r", int(self.r))
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(t for t in self.targets.split(",") if t))
        idx = sorted({target_index(fn, t) for t in self.targets})
        if not idx:
            raise ValueError(f"{fn}: targets must name at least one projection")
        object.__setattr__(self, "targets", tuple(TARGETS[i][0] for i in idx))
        if self.dropout != 0.0:
            raise ValueError(f"{fn}: lora_dropout={self.dropout!r}: the C model applies no "
                             "dropout to the adapters' input; use lora_dropout=0")

    @property
    def scale(self) -> float:
        alpha = self.r if self.alpha is None else self.alpha   # (__post_init__ fills it in)
        return float(alpha) / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def mask(self) -> int:
        return sum(1 << target_index("LoraConfig", t) for t in self.targets)

    def indices(self) -> Tuple[int, ...]:
        return tuple(target_index("LoraConfig", t) for t in self.targets)


def init_adapters(model, seed: int = 0) -> None:
    """peft's initialisation: A Kaiming-uniform with a = sqrt(5), as
    nn.Linear's default (bound 1/sqrt(in)), B zero; seedable."""
    rng = np.random.default_rng(seed)
    for name, _, ab, _ in tensor_names(model.config, model.lora):
        p = model.params[name]
        if ab == "A":
            bound = 1.0 / math.sqrt(p.shape[1])
            p[...] = rng.uniform(-bound, bound, size=p.shape).astype(np.float32)
        else:
            p[...] = 0.0
    model.mark_params_changed()


def delta(model, base_name: str) -> Optional[np.ndarray]:
    """s B A of the adapter on base weight base_name (float32), or None."""
    a = base_name[:-len(".weight")] + ".lora_A.weight"
    if a not in model.params:
        return None
    b = base_name[:-len(".weight")] + ".lora_B.weight"
    d = model.params[b].astype(np.float64) @ model.params[a].astype(np.float64)
    return (d * model.lora.scale).astype(np.float32)


# ---- peft adapter directories -------------------------------------------------
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def peft_name(name: str) -> str:
    """peft's saved name of one of our adapter tensors."""
    from .hf import hf_name
    return "base_model.model." + hf_name(name)


def save_adapter(model, directory, base_model_name_or_path: Optional[str] = None) -> None:
    """adapter_config.json + adapter_model.safetensors (peft's names,
    float32) that peft.PeftModel.from_pretrained loads."""
    from safetensors.numpy import save
    from .atomicfile import atomic_write
    if model.lora is None:
        raise ValueError("save_adapter: the model has no LoRA adapters")
    if model.config.rope_layout != "half":
        raise ValueError("save_adapter: peft adapters are for HF models (rotate-half RoPE); this "
                         "model uses llama2.c's interleaved RoPE")
    lc = model.lora
    state = {peft_name(n): np.ascontiguousarray(model.params[n])
             for n, _, _, _ in tensor_names(model.config, lc)}
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lc.r, "lora_alpha": lc.alpha,
           "lora_dropout": 0.0, "use_rslora": lc.use_rslora, "bias": "none",
           "target_modules": sorted(TARGETS[t][2] for t in lc.indices()),
           "fan_in_fan_out": False, "inference_mode": True, "use_dora": False,
           "base_model_name_or_path": base_model_name_or_path, "modules_to_save": None,
           "init_lora_weights": True, "layers_to_transform": None, "rank_pattern": {},
           "alpha_pattern": {}}
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    data = save(state, metadata={"format": "pt"})
    atomic_write(os.path.join(directory, ADAPTER_WEIGHTS), lambda f: f.write(data))
    text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    atomic_write(os.path.join(directory, ADAPTER_CONFIG), lambda f: f.write(text.encode()))


def read_adapter_config(directory) -> LoraConfig:
    """The LoraConfig of a peft adapter directory (CheckpointError for what
    the C model cannot run: DoRA, biases, dropout, per-module ranks, ...)."""
    path = os.path.join(os.fspath(directory), ADAPTER_CONFIG)
    try:
        with open(path) as f:
            d = json.load(f)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: not JSON: {e}") from None
    if not isinstance(d, dict) or d.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: not a LoRA adapter config")
    why = [(k, v) for k, v in (("use_dora", d.get("use_dora")), ("bias", d.get("bias")),
                               ("fan_in_fan_out", d.get("fan_in_fan_out")),
                               ("rank_pattern", d.get("rank_pattern")),
                               ("alpha_pattern", d.get("alpha_pattern")),
                               ("modules_to_save", d.get("modules_to_save")),
                               ("layers_to_transform", d.get("layers_to_transform")))
           if v not in (None, False, "none", {}, [])]
    if why:
        raise CheckpointError(f"{path}: {why[0][0]}={why[0][1]!r} is not supported by the C "
                              "model's LoRA (plain LoRA/rsLoRA on the projections only)")
    tm = d.get("target_modules")
    if isinstance(tm, str) or not tm:
        raise CheckpointError(f"{path}: target_modules must be a list of projection names, "
                              f"got {tm!r}")
    try:
        return LoraConfig(r=d["r"], alpha=d.get("lora_alpha", 8), targets=tuple(tm),
                          use_rslora=bool(d.get("use_rslora", False)),
                          dropout=float(d.get("lora_dropout", 0.0) or 0.0))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_adapter_weights(model, directory) -> None:
    """Copy a peft adapter_model.safetensors into model's adapters (names
    and shapes checked; anything missing or extra is a CheckpointError)."""
    from safetensors.numpy import load_file
    path = os.path.join(os.fspath(directory), ADAPTER_WEIGHTS)
    try:
        state = load_file(path)
    except Exception as e:   # safetensors raises its own error types
        raise CheckpointError(f"{path}: cannot read: {e}") from None
    # peft's saved names drop the adapter name ("default")
    want = {peft_name(n): n for n, _, _, _ in tensor_names(model.config, model.lora)}
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing or extra:
        raise CheckpointError(f"{path}: tensors do not match the adapter config "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for k, ours in want.items():
        dst = model.params[ours]
        if state[k].shape != dst.shape:
            raise CheckpointError(f"{path}: {k} has shape {list(state[k].shape)}, expected "
                                  f"{list(dst.shape)}")
        dst[...] = state[k].astype(np.float32)
    model.mark_params_changed()
