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


def test_c_backward_refuses_a_different_batch_shape_before_touching_gradients():
    """The C backward takes no tokens (the forward keeps them with B and S):
    a B or S other than the forward's is refused before any gradient (or the
    saved dlogits) is written. On the old API the backward trusted its B, S
    and tokens arguments."""
    from anebackward._native import fptr, lib
    model = ab.Llama(ab.LlamaConfig.preset("tiny"), seed=0)
    tok = ((np.arange(12, dtype=np.int32) * 3) % model.config.vocab_size).reshape(2, 6)
    model.forward(tok)
    expect_grads = None
    work = model._ws[2]
    for B, S in ((1, 12), (3, 4), (2, 5), (1, 6)):   # same N, or a smaller workspace
        model.flat_grads[:] = 7.0
        rc = lib.ab_model_backward(model._cfg, fptr(model.flat_params), fptr(model.flat_grads),
                                   B, S, 1.0, 0, fptr(work), work.size)
        assert rc == lib.AB_EINVAL, (B, S)
        assert (model.flat_grads == 7.0).all()
    model.backward()                      # the forward's dlogits are still there
    expect_grads = model.flat_grads.copy()
    model.forward(tok)
    model.backward()
    np.testing.assert_array_equal(model.flat_grads, expect_grads)


def test_c_forward_keeps_a_copy_of_its_tokens():
    """Writing the caller's token buffer between the C forward and the C
    backward changes nothing: the backward reads the forward's copy."""
    from anebackward._native import fptr, iptr, lib
    model = ab.Llama(ab.LlamaConfig.preset("tiny"), seed=0)
    tok = (np.arange(10, dtype=np.int32) * 5) % model.config.vocab_size
    model.forward(tok)
    model.backward()
    expect = model.flat_grads.copy()
    work = model._ws[2]
    tgt = np.append(tok[1:], -1).astype(np.int32)
    loss = ab._ffi.new("double *")
    buf = tok.copy()
    assert lib.ab_model_forward(loss, model._cfg, fptr(model.flat_params), iptr(buf), iptr(tgt),
                                1, 10, 1, fptr(work), work.size) == 0
    buf[:] = model.config.vocab_size + 5   # garbage ids in the caller's buffer
    assert lib.ab_model_backward(model._cfg, fptr(model.flat_params), fptr(model.flat_grads),
                                 1, 10, 1.0, 0, fptr(work), work.size) == 0
    np.testing.assert_array_equal(model.flat_grads, expect)


def test_decode_sizes_come_back_through_an_out_parameter():
    """ab_model_kv_cache_floats / ab_model_decode_workspace_floats return an
    error code (they returned -1 as a size before) and the size in *out."""
    from anebackward._native import ffi, lib
    good = dict(struct_size=ffi.sizeof("ab_model_config"), dim=8, hidden_dim=12, n_layers=3,
                n_heads=4, n_kv_heads=2, vocab_size=11, max_seq_len=5, shared_classifier=1,
                norm_eps=1e-5)
    out = ffi.new("int64_t *")
    cfg = ffi.new("ab_model_config *", good)
    assert lib.ab_model_kv_cache_floats(cfg, out) == lib.AB_OK
    assert out[0] == 2 * 3 * 5 * (8 // 4 * 2)
    assert lib.ab_model_decode_workspace_floats(cfg, out) == lib.AB_OK
    assert out[0] == 4 * 8 + 2 * 12 + 5
    assert lib.ab_model_kv_cache_floats(cfg, ffi.NULL) == lib.AB_ENULL
    assert lib.ab_model_decode_workspace_floats(cfg, ffi.NULL) == lib.AB_ENULL
    out[0] = 123
    for bad in (dict(dim=0), dict(n_layers=2**61, max_seq_len=2**40)):
        cfg = ffi.new("ab_model_config *", {**good, **bad})
        assert lib.ab_model_kv_cache_floats(cfg, out) < 0
        assert lib.ab_model_decode_workspace_floats(cfg, out) < 0
        assert out[0] == 123          # untouched on error


def test_c_version_is_the_python_version():
    from anebackward._native import ffi, lib
    assert ffi.string(lib.ab_version()).decode() == ab.__version__
