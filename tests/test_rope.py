"""rope / rope_backward vs float64 NumPy (llama2.c angles) and finite differences."""
import numpy as np
import pytest

import anebackward as ab
from conftest import import_hf
from oracle import assert_close, f64, numeric_vjp, rope as rope_ref, rope_inv_freq as oracle_inv_freq

CASES = [((1, 8), 8, 0), ((37, 12), 6, 0), ((2, 37, 12), 4, 5), ((3, 5, 16), 16, 1000)]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("shape,head_dim,pos", CASES)
def test_rope_matches_float64(rng, backend, shape, head_dim, pos):
    x = rng.standard_normal(shape, dtype=np.float32)
    assert_close(ab.rope(x, head_dim=head_dim, pos_offset=pos, backend=backend),
                 rope_ref(x, head_dim, pos), what="rope")
    dy = rng.standard_normal(shape, dtype=np.float32)
    dx = ab.rope_backward(dy, head_dim=head_dim, pos_offset=pos, backend=backend)
    assert_close(dx, numeric_vjp(lambda x_: rope_ref(x_, head_dim, pos), x, f64(dy)),
                 rtol=1e-4, atol=1e-5, what="rope_backward vs FD")


def test_backward_inverts_forward_and_works_in_place(rng):
    x = rng.standard_normal((2, 9, 24), dtype=np.float32)
    y = ab.rope(x, head_dim=8, pos_offset=3)
    z = y.copy()
    assert ab.rope_backward(z, head_dim=8, pos_offset=3, dx=z) is z
    assert_close(z, x, atol=1e-5, what="inverse rotation")


def test_position_zero_is_identity_and_pairs_are_interleaved():
    x = np.arange(8, dtype=np.float32)[None, :].repeat(2, 0)
    y = ab.rope(x, head_dim=8)
    assert np.array_equal(y[0], x[0])
    # position 1, pair 0 rotates by exactly 1 radian (freq 1): (x0, x1) = (0, 1)
    assert_close(y[1, :2], [-np.sin(1.0), np.cos(1.0)], atol=1e-6, what="pair 0 at pos 1")


# ---- Hugging Face switches: layout, theta, Llama-3 scaling ----
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
SWITCHES = [("interleaved", 10000.0, None), ("half", 10000.0, None), ("half", 1e6, None),
            ("half", 500000.0, LLAMA3), ("interleaved", 500000.0, LLAMA3)]


@pytest.mark.parametrize("head_dim", [8, 64, 128])
@pytest.mark.parametrize("theta,scaling", [(10000.0, None), (1e6, None), (500000.0, LLAMA3),
                                           (10000.0, dict(LLAMA3, original_max_position_embeddings=8192))])
def test_inv_freq_matches_float64(head_dim, theta, scaling):
    got = ab.rope_inv_freq(head_dim, theta=theta, scaling=scaling)
    want = oracle_inv_freq(head_dim, theta, scaling)
    assert_close(got, want, rtol=2e-6, atol=0, what="inv_freq")


def test_llama3_scaling_covers_all_three_bands():
    # at this shape the 64 frequencies fall in all three bands (kept, blended, divided)
    f = oracle_inv_freq(128, 500000.0, None)
    w = 2 * np.pi / f
    L = LLAMA3["original_max_position_embeddings"]
    assert (w < L / 4).any() and (w > L).any() and ((w >= L / 4) & (w <= L)).any()
    got = ab.rope_inv_freq(128, theta=500000.0, scaling=LLAMA3)
    plain = ab.rope_inv_freq(128, theta=500000.0)
    short, long_ = w < L / 4, w > L
    assert np.array_equal(got[short], plain[short])                     # kept
    assert_close(got[long_], f[long_] / 8.0, rtol=2e-6, atol=0, what="long waves / factor")
    mid = ~short & ~long_
    assert (got[mid] < plain[mid]).all() and (got[mid] > plain[mid] / 8).all()   # blended


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("layout,theta,scaling", SWITCHES)
def test_rope_switches_match_float64(rng, backend, layout, theta, scaling):
    hd = 16
    x = rng.standard_normal((2, 11, 3 * hd), dtype=np.float32)
    f = oracle_inv_freq(hd, theta, scaling).astype(np.float32)
    kw = dict(head_dim=hd, pos_offset=7, layout=layout, theta=theta, scaling=scaling, backend=backend)
    assert_close(ab.rope(x, **kw), rope_ref(x, hd, 7, layout=layout, inv_freq=f), what="rope")
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    assert_close(ab.rope_backward(dy, **kw),
                 numeric_vjp(lambda x_: rope_ref(x_, hd, 7, layout=layout, inv_freq=f), x, f64(dy)),
                 rtol=1e-4, atol=1e-5, what="rope_backward vs FD")


def test_half_layout_pairs_i_with_i_plus_half():
    x = np.zeros((2, 8), np.float32)
    x[:, 0] = 1.0                          # pair 0 of the half layout is (0, 4)
    y = ab.rope(x, head_dim=8, layout="half")
    assert_close(y[1], [np.cos(1.0), 0, 0, 0, np.sin(1.0), 0, 0, 0], atol=1e-6, what="half pair 0")
    yi = ab.rope(x, head_dim=8)            # interleaved: pair 0 is (0, 1)
    assert_close(yi[1, :2], [np.cos(1.0), np.sin(1.0)], atol=1e-6, what="interleaved pair 0")


def test_defaults_are_bit_identical_to_llama2c_entry_point(rng):
    from anebackward._native import fptr, lib
    x = rng.standard_normal((2, 33, 48), dtype=np.float32)
    old = np.empty_like(x)
    assert lib.ab_rope_forward(fptr(old), fptr(x), 2, 33, 4, 12, 999) == 0
    assert np.array_equal(ab.rope(x, head_dim=12, pos_offset=999), old)
    assert np.array_equal(ab.rope(x, head_dim=12, pos_offset=999, theta=10000.0, layout="interleaved"), old)


@pytest.mark.parametrize("layout,theta,scaling", SWITCHES)
def test_rope_switches_same_for_every_thread_count(rng, layout, theta, scaling):
    x = rng.standard_normal((3, 70, 4 * 64), dtype=np.float32)
    kw = dict(head_dim=64, pos_offset=5, layout=layout, theta=theta, scaling=scaling)
    n0 = ab.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3, 4):
            ab.set_num_threads(n)
            outs.append((ab.rope(x, **kw), ab.rope_backward(x, **kw)))
    finally:
        ab.set_num_threads(n0)
    for y, dx in outs[1:]:
        assert np.array_equal(y, outs[0][0]) and np.array_equal(dx, outs[0][1])


@pytest.mark.parametrize("kw,exc,words", [
    (dict(layout="rotate"), ValueError, "layout"),
    (dict(theta=0.5), ValueError, "theta"),
    (dict(theta=float("nan")), ValueError, "theta"),
    (dict(scaling={"rope_type": "yarn", "factor": 2.0}), NotImplementedError, "yarn"),
    (dict(scaling={"rope_type": "llama3", "factor": 8.0}), ValueError, "low_freq_factor"),
    (dict(scaling=dict(LLAMA3, low_freq_factor=4.0, high_freq_factor=1.0)), ValueError, "low_freq_factor"),
    (dict(scaling=dict(LLAMA3, factor=0.5)), ValueError, "factor"),
    (dict(scaling="llama3"), TypeError, "rope_scaling"),
])
def test_rope_switch_errors_name_the_argument(kw, exc, words):
    x = np.zeros((4, 8), np.float32)
    with pytest.raises(exc, match=words):
        ab.rope(x, head_dim=8, **kw)


def test_default_rope_type_is_no_scaling(rng):
    x = rng.standard_normal((9, 16), dtype=np.float32)
    assert np.array_equal(ab.rope(x, head_dim=8, layout="half", scaling={"rope_type": "default"}),
                          ab.rope(x, head_dim=8, layout="half"))


def test_rope_matches_transformers(rng):
    """HF's own rotary embedding + apply_rotary_pos_emb, float32, Llama-3 scaled."""
    import_hf()          # skip/fail first: torch is part of the hf oracle
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    hd, H, S = 32, 3, 40
    for theta, scaling in [(10000.0, None), (1e6, None), (500000.0, dict(LLAMA3))]:
        cfg = LlamaConfig(hidden_size=hd * H, num_attention_heads=H, rope_theta=theta,
                          rope_scaling=scaling, max_position_embeddings=256)
        emb = LlamaRotaryEmbedding(cfg)
        x = rng.standard_normal((2, S, H * hd), dtype=np.float32)
        xt = torch.from_numpy(x).view(2, S, H, hd).transpose(1, 2)      # [B, H, S, hd]
        pos = torch.arange(5, 5 + S)[None].expand(2, S)
        cos, sin = emb(xt, pos)
        want, _ = apply_rotary_pos_emb(xt, xt, cos, sin)
        want = want.transpose(1, 2).reshape(2, S, H * hd).numpy()
        got = ab.rope(x, head_dim=hd, pos_offset=5, layout="half", theta=theta, scaling=scaling)
        assert_close(got, want, rtol=1e-5, atol=1e-5, what=f"rope vs HF theta={theta} {scaling}")
        assert_close(ab.rope_inv_freq(hd, theta=theta, scaling=scaling), emb.inv_freq.numpy(),
                     rtol=1e-6, atol=0, what="inv_freq vs HF")


def test_c_rope_params_are_checked_and_null_means_llama2c(rng):
    from anebackward._native import ffi, fptr, lib
    x = rng.standard_normal((5, 16), dtype=np.float32)
    y, z = np.empty_like(x), np.empty_like(x)
    assert lib.ab_rope_forward_ex(fptr(y), fptr(x), 1, 5, 2, 8, 3, ffi.NULL) == 0
    zero = ffi.new("ab_rope_params *")            # all zero = llama2.c's defaults too
    assert lib.ab_rope_forward_ex(fptr(z), fptr(x), 1, 5, 2, 8, 3, zero) == 0
    assert np.array_equal(y, ab.rope(x, head_dim=8, pos_offset=3)) and np.array_equal(y, z)
    for bad in (dict(layout=2), dict(theta=-1.0), dict(theta=float("inf")),
                dict(factor=0.5, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8),
                dict(factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0,
                     original_max_position_embeddings=8),
                dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=0)):
        p = ffi.new("ab_rope_params *", bad)
        assert lib.ab_rope_params_check(p) == lib.AB_EINVAL, bad
        assert lib.ab_rope_forward_ex(fptr(y), fptr(x), 1, 5, 2, 8, 3, p) == lib.AB_EINVAL
        assert lib.ab_ref_rope_backward_ex(fptr(y), fptr(x), 1, 5, 2, 8, 3, p) == lib.AB_EINVAL


def test_c_model_config_checks_head_dim():
    from anebackward._native import ffi, lib
    good = dict(struct_size=ffi.sizeof("ab_model_config"), dim=24, hidden_dim=40, n_layers=2,
                n_heads=4, n_kv_heads=2, vocab_size=11, max_seq_len=8, shared_classifier=1,
                norm_eps=1e-5)
    lay = ffi.new("ab_model_layout *")
    assert lib.ab_model_param_layout(ffi.new("ab_model_config *", good), lay) == 0
    assert lay.q_norm == lay.k_norm == lay.n_params          # no q/k norms: empty
    for bad in (dict(head_dim=3), dict(head_dim=-2), dict(dim=26),      # 26/4 not integral
                dict(rope={"layout": 5})):
        assert lib.ab_model_config_check(ffi.new("ab_model_config *", {**good, **bad})) == lib.AB_EINVAL
    ok = ffi.new("ab_model_config *", {**good, "dim": 26, "head_dim": 8, "qk_norm": 1})
    assert lib.ab_model_param_layout(ok, lay) == 0 and lay.k_norm - lay.q_norm == 2 * 8
