"""One validation of AdamW's hyper-parameters (kernels/optim.py
check_adamw_hparams) behind every door: adamw_step, anebackward.AdamW (its
constructor, step and load_state_dict), the optimizer.bin reader and
anebackward.torch.AdamW. The same bad value fails the same way everywhere,
and a failed load changes nothing."""
import json
import struct

import numpy as np
import pytest

import anebackward as ab
from conftest import import_torch
from anebackward.checkpoint import OPT_MAGIC, load_optimizer, save_optimizer

GOOD = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
# (field, bad value, exception, text the message must contain)
BAD = [("lr", -1.0, ValueError, "lr must be >= 0"),
       ("lr", float("inf"), ValueError, "lr must be finite"),
       ("lr", float("nan"), ValueError, "lr must be finite"),
       ("lr", True, TypeError, "lr must be a real number"),
       ("lr", "0.001", TypeError, "lr must be a real number"),
       ("betas", (0.9,), TypeError, "betas must be a pair"),
       ("betas", (1.0, 0.9), ValueError, "< 1.0"),
       ("betas", (0.9, -0.1), ValueError, ">= 0.0"),
       ("eps", -1e-8, ValueError, "eps must be >= 0"),
       ("weight_decay", float("nan"), ValueError, "weight_decay must be finite")]


def _model():
    return ab.Llama(ab.LlamaConfig.preset("tiny"), seed=0)


@pytest.mark.parametrize("field,value,exc,text", BAD)
def test_adamw_constructor_and_kernel(field, value, exc, text):
    with pytest.raises(exc, match=text):
        ab.AdamW(_model(), **{**GOOD, field: value})
    p = np.zeros(4, np.float32)
    kw = dict(lr=GOOD["lr"], beta1=0.9, beta2=0.95, eps=GOOD["eps"], weight_decay=0.1)
    if field == "betas":
        if len(value) != 2:
            return
        kw["beta1"], kw["beta2"] = value
    else:
        kw[field] = value
    with pytest.raises(exc):
        ab.adamw_step(p, p.copy(), p.copy(), p.copy(), step=1, **kw)


@pytest.mark.parametrize("field,value,exc,text", BAD)
def test_adamw_load_state_dict_checks_and_changes_nothing(field, value, exc, text):
    """load_state_dict used to copy whatever it was given (lr=nan, betas=1.5)."""
    opt = ab.AdamW(_model(), **GOOD)
    state = {**opt.state_dict(), field: value, "m": np.ones_like(opt.m), "step": 5}
    with pytest.raises(exc, match=text):
        opt.load_state_dict(state)
    assert opt.step_count == 0 and not opt.m.any() and opt.lr == GOOD["lr"]


def test_adamw_load_state_dict_refuses_bad_step_and_moments():
    opt = ab.AdamW(_model(), **GOOD)
    for bad in ({"step": 2**63}, {"step": -1}, {"step": 1.5},
                {"v": -np.ones_like(opt.v)}, {"m": np.full_like(opt.m, np.nan)}):
        with pytest.raises((ValueError, TypeError)):
            opt.load_state_dict({**opt.state_dict(), **bad})
    assert opt.step_count == 0


def test_adamw_step_count_cannot_overflow():
    opt = ab.AdamW(_model(), **GOOD)
    opt.step_count = 2**62
    with pytest.raises(ValueError, match="step"):
        opt.step()


def _saved(tmp_path):
    model = _model()
    opt = ab.AdamW(model, **GOOD)
    model.flat_grads[:] = 0.01
    opt.step()
    path = tmp_path / "optimizer.bin"
    save_optimizer(opt, path, extra={"step": 1})
    return model, path


def _rewrite(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[8:16])
    meta = edit(json.loads(raw[16:16 + n]))
    text = json.dumps(meta).encode()
    path.write_bytes(OPT_MAGIC + struct.pack("<Q", len(text)) + text + raw[16 + n:])


@pytest.mark.parametrize("field,value,text", [
    ("step", 2**63, "step must be in"),            # used to load, then overflow at the next step
    ("step", 1.0, "step must be an int"),
    ("step", True, "step must be an int"),
    ("lr", True, "lr must be a real number"),      # used to load as 1.0
    ("lr", "0.001", "lr must be a real number"),   # used to load as 0.001
    ("lr", 1e400, "lr must be finite"),            # json reads Infinity for 1e400
    ("betas", [0.9, 0.95, 0.99], "betas must be a pair"),
    ("betas", {"a": 1}, "betas must be a pair"),
    ("eps", None, "eps must be a real number"),
    ("weight_decay", [], "weight_decay must be a real number"),
    ("n_params", "771584", "n_params must be"),
    ("extra", [1, 2], "extra must be a JSON object"),   # used to be returned as is
])
def test_optimizer_file_fields_are_each_validated(tmp_path, field, value, text):
    model, path = _saved(tmp_path)
    _rewrite(path, lambda m: {**m, field: value})
    opt = ab.AdamW(model, lr=5e-4)
    with pytest.raises(ab.CheckpointError, match=text):
        load_optimizer(opt, path)
    assert opt.step_count == 0 and opt.lr == 5e-4 and not opt.m.any()


def test_optimizer_file_missing_fields_are_named(tmp_path):
    model, path = _saved(tmp_path)
    _rewrite(path, lambda m: {k: v for k, v in m.items() if k not in ("eps", "n_decay")})
    with pytest.raises(ab.CheckpointError, match="missing eps, n_decay"):
        load_optimizer(ab.AdamW(model), path)


@pytest.mark.parametrize("field,value,exc,text", BAD)
def test_torch_adamw_constructor_and_load_state_dict(field, value, exc, text):
    torch = import_torch()   # required under ANEBACKWARD_REQUIRE_TORCH=1, as everywhere
    from anebackward.torch import AdamW
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(exc, match=text):
        AdamW([p], **{**GOOD, field: value})
    with pytest.raises(exc, match=text):     # a group's own setting
        AdamW([{"params": [p], field: value}], **GOOD)
    opt = AdamW([p], **GOOD)
    state = opt.state_dict()
    state["param_groups"][0][field] = value
    with pytest.raises(exc, match=text):     # torch's own loader copies it unchecked
        opt.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == GOOD["lr"]
