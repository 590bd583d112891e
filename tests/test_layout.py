"""C's table of the model's tensors (ab_model_tensors, read by
anebackward.layout.tensors) against an expectation written out here from the
documented layout: names, order, offsets, shapes, gradient offsets, gradient
groups and decay, for tied/untied, GQA, qk_norm, an independent head_dim,
LoRA target subsets and frozen tensors."""
import math

import numpy as np
import pytest

import anebackward as ab
from anebackward._native import ffi, lib
from anebackward.layout import c_config, param_layout, tensor_specs, tensors

CONFIGS = {
    "untied": ab.LlamaConfig(dim=16, hidden_dim=40, n_layers=2, n_heads=4, n_kv_heads=4,
                             vocab_size=37, max_seq_len=8, shared_classifier=False),
    "tied_gqa": ab.LlamaConfig(dim=16, hidden_dim=24, n_layers=3, n_heads=4, n_kv_heads=2,
                               vocab_size=29, max_seq_len=8, shared_classifier=True),
    "qk_norm_head_dim": ab.LlamaConfig(dim=12, hidden_dim=20, n_layers=2, n_heads=3,
                                       n_kv_heads=1, vocab_size=33, max_seq_len=8,
                                       head_dim=6, qk_norm=True, shared_classifier=False,
                                       rope_layout="half"),
}
LORAS = {"none": None, "qv": ab.LoraConfig(r=3, targets=("q", "v")),
         "mlp": ab.LoraConfig(r=2, targets=("gate", "down")),
         "all": ab.LoraConfig(r=4)}

# llama2.c's kinds with their shapes from (dim, hidden, q width, kv width, head_dim)
LAYER_2D = [("attention.wq", lambda D, H, q, kv: (q, D)),
            ("attention.wk", lambda D, H, q, kv: (kv, D)),
            ("attention.wv", lambda D, H, q, kv: (kv, D)),
            ("attention.wo", lambda D, H, q, kv: (D, q)),
            ("feed_forward.w1", lambda D, H, q, kv: (H, D)),
            ("feed_forward.w2", lambda D, H, q, kv: (D, H)),
            ("feed_forward.w3", lambda D, H, q, kv: (H, D))]
TARGET_OF = {"q": 0, "k": 1, "v": 2, "o": 3, "gate": 4, "down": 5, "up": 6}


def expected(cfg, lora):
    """[(name, layer, shape, group, decay)] in the documented buffer order."""
    D, H, L, V = cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.vocab_size
    hd = cfg.head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    out = [("tok_embeddings.weight", -1, (V, D), -1, True)]
    for kind, shape in LAYER_2D:
        out += [(f"layers.{i}.{kind}.weight", i, shape(D, H, q, kv), i, True) for i in range(L)]
    if not cfg.shared_classifier:
        out.append(("output.weight", -1, (V, D), L, True))
    out += [(f"layers.{i}.attention_norm.weight", i, (D,), i, False) for i in range(L)]
    out += [(f"layers.{i}.ffn_norm.weight", i, (D,), i, False) for i in range(L)]
    out.append(("norm.weight", -1, (D,), L, False))
    if cfg.qk_norm:
        out += [(f"layers.{i}.attention.q_norm.weight", i, (hd,), i, False) for i in range(L)]
        out += [(f"layers.{i}.attention.k_norm.weight", i, (hd,), i, False) for i in range(L)]
    if lora is not None:
        ts = sorted(TARGET_OF[t] for t in lora.targets)
        for ab_ in ("A", "B"):
            for t in ts:
                kind, shape = LAYER_2D[t]
                o, n = shape(D, H, q, kv)
                s = (lora.r, n) if ab_ == "A" else (o, lora.r)
                out += [(f"layers.{i}.{kind}.lora_{ab_}.weight", i, s, i, True)
                        for i in range(L)]
    return out


@pytest.mark.parametrize("lname", sorted(LORAS))
@pytest.mark.parametrize("cname", sorted(CONFIGS))
def test_tensor_table_matches_the_documented_layout(cname, lname):
    cfg, lora = CONFIGS[cname], LORAS[lname]
    want = expected(cfg, lora)
    got = tensors(cfg, lora)
    assert [t.name for t in got] == [w[0] for w in want]
    off = 0
    for t, (name, layer, shape, group, decay) in zip(got, want):
        assert (t.layer, t.shape, t.group, t.decay) == (layer, shape, group, decay), name
        assert t.offset == off and t.grad_offset == off, name   # packed, in order
        off += math.prod(shape)
    lay = param_layout(cfg, lora)
    assert lay["n_params"] == off
    # the decayed 2-D base weights are the prefix [0, n_decay)
    n_base_2d = sum(math.prod(w[2]) for w in want if w[4] and ".lora_" not in w[0])
    assert lay["n_decay"] == n_base_2d
    assert tensor_specs(cfg, lora) == [(t.name, t.offset, t.shape) for t in got]


@pytest.mark.parametrize("cname", sorted(CONFIGS))
def test_tensor_table_gives_frozen_tensors_no_gradient_and_packs_the_rest(cname):
    cfg = CONFIGS[cname]
    lora = LORAS["qv"]
    recs = tensors(cfg, lora)
    L = cfg.n_layers
    rng = np.random.default_rng(0)
    train = {t.name for t in recs if rng.random() < 0.5} | {"norm.weight"}
    flags = np.zeros(int(lib.AB_TENSOR_KINDS) * L, dtype=np.uint8)
    for t in recs:
        if t.name in train:
            flags[t.slot(L)] = 1
    if cfg.shared_classifier and "tok_embeddings.weight" in train:
        flags[int(lib.AB_TENSOR_OUTPUT) * L] = 1
    goff = np.zeros(flags.size, dtype=np.int64)
    n = ffi.new("int64_t *")
    assert lib.ab_model_grad_layout(c_config(cfg, lora=lora), ffi.from_buffer("uint8_t[]", flags),
                                    ffi.from_buffer("int64_t[]", goff), n) == 0
    g = 0
    for t in tensors(cfg, lora, goff):   # trainable ones packed in parameter order
        if t.name in train:
            assert t.grad_offset == g, t.name
            g += math.prod(t.shape)
        else:
            assert t.grad_offset == -1, t.name
    assert g == n[0]


def test_tensor_table_count_query_and_too_small_capacity():
    cfg = CONFIGS["tied_gqa"]
    c = c_config(cfg)
    n = ffi.new("int64_t *")
    assert lib.ab_model_tensors(c, ffi.NULL, 0, n) == 0
    assert n[0] == len(expected(cfg, None))
    recs = ffi.new("ab_model_tensor[]", int(n[0]) - 1)
    assert lib.ab_model_tensors(c, recs, int(n[0]) - 1, n) == lib.AB_EINVAL
    msg = ffi.string(lib.ab_last_error()).decode()
    assert msg.startswith("ab_model_tensors: ") and "capacity" in msg, msg   # the public name


def test_c_config_fills_struct_size_and_c_refuses_a_wrong_one():
    """The config's and the options' first member is the caller's sizeof:
    c_config sets both; an unset or unknown size is AB_EINVAL with a message
    naming the field, from the check and from a function that takes it."""
    c = c_config(CONFIGS["untied"], lora=LORAS["qv"], recompute=True, precision="bf16")
    assert c.struct_size == ffi.sizeof("ab_model_config") > 0
    assert c.options.struct_size == ffi.sizeof("ab_model_options") > 0
    assert (c.options.recompute, c.options.precision) == (1, lib.AB_PRECISION_BF16)
    assert lib.ab_model_config_check(c) == lib.AB_OK
    c.options.struct_size = 0
    assert lib.ab_model_config_check(c) == lib.AB_EINVAL
    assert "ab_model_options.struct_size is 0" in ffi.string(lib.ab_last_error()).decode()
    c.options = ffi.NULL           # no options: the defaults
    assert lib.ab_model_config_check(c) == lib.AB_OK
    lay = ffi.new("ab_model_layout *")
    for size in (0, ffi.sizeof("ab_model_config") - 8, ffi.sizeof("ab_model_config") + 8):
        c.struct_size = size
        lib.ab_clear_error()
        assert lib.ab_model_config_check(c) == lib.AB_EINVAL
        assert lib.ab_model_param_layout(c, lay) == lib.AB_EINVAL
        msg = ffi.string(lib.ab_last_error()).decode()
        assert msg.startswith("ab_model_param_layout: ab_model_config.struct_size is "
                              f"{size}"), msg
        assert f"sizeof(ab_model_config) = {ffi.sizeof('ab_model_config')}" in msg, msg


def test_llama_reads_its_views_groups_and_decay_from_the_table():
    cfg = CONFIGS["qk_norm_head_dim"]
    m = ab.Llama(cfg, trainable=lambda n: "norm" in n or "wq" in n)
    recs = {t.name: t for t in tensors(cfg)}
    for name, view in m.params.items():
        assert view.shape == recs[name].shape
        assert np.shares_memory(view, m.flat_params[recs[name].offset:])
    L = cfg.n_layers
    groups = m.grad_groups()
    # groups in the backward's order: [L], L-1 ... 0, [-1], from each tensor's group
    want = {g: [] for g in [L, *range(L - 1, -1, -1), -1]}
    for name in m.trainable:
        g0 = m.grads[name]
        start = (g0.__array_interface__["data"][0]
                 - m.flat_grads.__array_interface__["data"][0]) // 4
        want[recs[name].group].append((start, start + g0.size))
    assert groups == [sorted(want[g]) for g in [L, *range(L - 1, -1, -1), -1]]
