"""Absurd sizes are refused before any size arithmetic can overflow, from
the Python API and from a crafted checkpoint header; bad state files raise
CheckpointError without touching the optimizer; model buffers cannot be
swapped for arrays the C layout does not describe."""
import json
import struct

import numpy as np
import pytest

import anebackward as ab
from anebackward.checkpoint import OPT_MAGIC, load_optimizer, save_optimizer


@pytest.mark.parametrize("changes", [dict(n_layers=2**61), dict(max_seq_len=2**62),
                                     dict(dim=2**30, n_heads=2**29, n_kv_heads=2**29, vocab_size=7,
                                          hidden_dim=1431655764)])
def test_sizes_that_would_overflow_int64_are_refused(changes):
    base = dict(dim=2, hidden_dim=2, n_layers=1, n_heads=1, n_kv_heads=1, vocab_size=4, max_seq_len=4)
    base.update(changes)
    with pytest.raises(ValueError, match="too large"):
        ab.Llama(ab.LlamaConfig(**base))


@pytest.mark.parametrize("header", [(2**30, 1431655764, 4, 2**29, 2**29, 7, 1),
                                    (8, 8, 1, 2, 2, -2**31, 4), (2, 2, 2**30, 1, 1, 4, 2**30)])
def test_crafted_headers_are_checkpoint_errors(tmp_path, header):
    p = tmp_path / "model.bin"
    p.write_bytes(struct.pack("<7i", *header))
    with pytest.raises(ab.CheckpointError, match="corrupt header"):
        ab.Llama.load(p)


def _opt(tmp_path):
    model = ab.Llama(ab.LlamaConfig.preset("tiny"), seed=0)
    opt = ab.AdamW(model, lr=1e-3)
    model.forward(np.arange(9) % model.config.vocab_size)
    model.backward()
    opt.step()
    path = tmp_path / "opt.bin"
    save_optimizer(opt, path)
    return model, opt, path


def _rewrite_meta(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[8:16])
    meta = json.loads(raw[16:16 + n])
    meta = edit(meta)
    text = json.dumps(meta).encode()
    path.write_bytes(OPT_MAGIC + struct.pack("<Q", len(text)) + text + raw[16 + n:])


@pytest.mark.parametrize("edit", [lambda m: [m], lambda m: {k: v for k, v in m.items() if k != "step"},
                                  lambda m: {**m, "betas": None}, lambda m: {**m, "lr": "fast"},
                                  lambda m: {**m, "lr": float("nan")}, lambda m: {**m, "betas": [1.5, 0.9]}])
def test_bad_optimizer_metadata_is_a_checkpoint_error_and_changes_nothing(tmp_path, edit):
    model, opt, path = _opt(tmp_path)
    _rewrite_meta(path, edit)
    opt2 = ab.AdamW(model, lr=5e-4)
    with pytest.raises(ab.CheckpointError, match="corrupt metadata"):
        load_optimizer(opt2, path)
    assert opt2.step_count == 0 and not opt2.m.any() and not opt2.v.any() and opt2.lr == 5e-4


def test_non_finite_moments_are_refused(tmp_path):
    model, opt, path = _opt(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-4:] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(raw))
    opt2 = ab.AdamW(model)
    with pytest.raises(ab.CheckpointError, match="non-finite"):
        load_optimizer(opt2, path)
    assert not opt2.v.any()


def test_model_buffers_cannot_be_replaced():
    model = ab.Llama(ab.LlamaConfig.preset("tiny"), seed=0)
    opt = ab.AdamW(model)
    for obj, name in ((model, "flat_params"), (model, "flat_grads"), (opt, "m"), (opt, "v")):
        with pytest.raises(AttributeError):
            setattr(obj, name, np.zeros(16, np.float32))


def test_backward_uses_the_tokens_of_its_forward():
    model = ab.Llama(ab.LlamaConfig.preset("tiny"), seed=0)
    tok = (np.arange(12, dtype=np.int32) * 7) % model.config.vocab_size
    model.forward(tok)
    model.backward()
    expect = model.flat_grads.copy()
    model.forward(tok)
    tok[:] = 0          # the caller reuses its buffer between forward and backward
    model.backward()
    np.testing.assert_array_equal(model.flat_grads, expect)


def test_c_backward_checks_tokens_before_touching_gradients():
    """The C API takes the tokens again in the backward: bad ones must be
    refused before any gradient (or the saved dlogits) is written."""
    from anebackward._native import fptr, iptr, lib
    model = ab.Llama(ab.LlamaConfig.preset("tiny"), seed=0)
    tok = (np.arange(10, dtype=np.int32) * 3) % model.config.vocab_size
    model.forward(tok)
    model.flat_grads[:] = 7.0
    work = model._ws[2]
    bad = tok.copy()
    bad[4] = model.config.vocab_size
    rc = lib.ab_model_backward(model._cfg, fptr(model.flat_params), fptr(model.flat_grads),
                               iptr(bad), 1, 10, 1.0, 0, fptr(work), work.size)
    assert rc == lib.AB_ERANGE
    assert (model.flat_grads == 7.0).all()
    model.backward()                      # the forward's dlogits are still there
    assert np.isfinite(model.flat_grads).all() and not (model.flat_grads == 7.0).all()
