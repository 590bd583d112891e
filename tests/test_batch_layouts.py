"""Real batch layouts: varlen attention (cu_seqlens), RoPE at per-row
positions, cross-entropy over a caller's denominator, and the C model over
padded / packed batches — against float64 NumPy, finite differences,
PyTorch float64 per document, the reference loops, and at every thread
count."""
import numpy as np
import pytest

import anebackward as ab
from anebackward import Llama, LlamaConfig
from anebackward.batch import from_padded, varlen
from oracle import (assert_close, attention as att_ref, cross_entropy as ce_ref,
                    cross_entropy_grad, f64, numeric_vjp, rope as rope_ref)
from test_attention import _vjp_float64
from test_model import randomize, torch_grads

# segment lengths: odd, length 1, empty, longer than one 64-row block
SEGMENTS = [[5], [1, 1, 1], [7, 1, 0, 12], [3, 70, 1, 9], [33, 0, 65]]
HEADS = [(1, 1, 6), (4, 2, 4), (4, 1, 6), (8, 2, 4)]   # MHA, GQA 2, GQA 4, GQA 4


def _cu(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _qkv(rng, N, H, KV, hd):
    f = lambda w: rng.standard_normal((N, w), dtype=np.float32)  # noqa: E731
    return f(H * hd), f(KV * hd), f(KV * hd)


def _per_segment(cu, fn, *arrays):
    """fn applied to each segment's rows (the full-row oracle), concatenated."""
    outs = []
    for a, b in zip(cu[:-1], cu[1:]):
        if b > a:
            outs.append(fn(*(x[a:b] for x in arrays)))
    n = len(outs[0]) if isinstance(outs[0], tuple) else None
    if n is None:
        return np.concatenate(outs)
    return tuple(np.concatenate([o[i] for o in outs]) for i in range(n))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("H,KV,hd", HEADS)
@pytest.mark.parametrize("lengths", SEGMENTS, ids=str)
def test_varlen_attention_matches_float64_per_segment(rng, backend, lengths, H, KV, hd):
    cu = _cu(lengths)
    q, k, v = _qkv(rng, int(cu[-1]), H, KV, hd)
    out = ab.attention(q, k, v, n_heads=H, n_kv_heads=KV, cu_seqlens=cu, backend=backend)
    want = _per_segment(cu, lambda a, b, c: att_ref(a, b, c, H, KV), q, k, v)
    assert_close(out, want, atol=2e-5, what="out")
    dout = rng.standard_normal(q.shape, dtype=np.float32)
    got = ab.attention_backward(dout, q, k, v, n_heads=H, n_kv_heads=KV, cu_seqlens=cu,
                                backend=backend)
    want = _per_segment(cu, lambda a, b, c, d: _vjp_float64(a, b, c, d, H, KV), q, k, v, dout)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_close(g, w, rtol=1e-4, atol=5e-5, what=name)


def test_varlen_attention_backward_matches_finite_differences(rng):
    H, KV, hd, cu = 4, 2, 3, _cu([3, 1, 4])
    q, k, v = _qkv(rng, int(cu[-1]), H, KV, hd)
    dout = rng.standard_normal(q.shape)

    def run(qq, kk, vv):   # the float64 forward, each segment alone
        return _per_segment(cu, lambda a, b, c: att_ref(a, b, c, H, KV), qq, kk, vv)

    dq, dk, dv = ab.attention_backward(dout.astype(np.float32), q, k, v, n_heads=H, n_kv_heads=KV,
                                       cu_seqlens=cu)
    assert_close(dq, numeric_vjp(lambda x: run(x, f64(k), f64(v)), q, dout), atol=1e-4,
                 what="dq")
    assert_close(dk, numeric_vjp(lambda x: run(f64(q), x, f64(v)), k, dout), atol=1e-4,
                 what="dk")
    assert_close(dv, numeric_vjp(lambda x: run(f64(q), f64(k), x), v, dout), atol=1e-4,
                 what="dv")


@pytest.mark.parametrize("B,S", [(1, 1), (3, 19), (2, 130)])
def test_full_rows_are_the_varlen_case_bit_for_bit(rng, B, S):
    H, KV, hd = 4, 2, 8
    q, k, v = _qkv(rng, B * S, H, KV, hd)
    do = rng.standard_normal(q.shape, dtype=np.float32)
    cu = np.arange(B + 1, dtype=np.int64) * S
    full = ab.attention(q.reshape(B, S, -1), k.reshape(B, S, -1), v.reshape(B, S, -1),
                        n_heads=H, n_kv_heads=KV)
    var = ab.attention(q, k, v, n_heads=H, n_kv_heads=KV, cu_seqlens=cu)
    assert np.array_equal(full.reshape(B * S, -1), var)
    g_full = ab.attention_backward(do.reshape(B, S, -1), q.reshape(B, S, -1), k.reshape(B, S, -1),
                                   v.reshape(B, S, -1), n_heads=H, n_kv_heads=KV)
    g_var = ab.attention_backward(do, q, k, v, n_heads=H, n_kv_heads=KV, cu_seqlens=cu)
    for a, b in zip(g_full, g_var):
        assert np.array_equal(a.reshape(B * S, -1), b)


@pytest.mark.usefixtures("keep_blas_threads")
def test_varlen_kernels_do_not_depend_on_the_thread_count(rng):
    cu = _cu([130, 1, 77, 0, 64, 65, 3])
    H, KV, hd = 8, 2, 16
    q, k, v = _qkv(rng, int(cu[-1]), H, KV, hd)
    do = rng.standard_normal(q.shape, dtype=np.float32)
    pos = rng.integers(0, 5000, int(cu[-1])).astype(np.int32)
    x = rng.standard_normal((int(cu[-1]), H * hd), dtype=np.float32)
    logits = rng.standard_normal((300, 700), dtype=np.float32)
    tg = rng.integers(-1, 700, 300).astype(np.int32)
    results = []
    for n in (1, 2, 3, 4):
        ab.set_num_threads(n)
        r = [ab.attention(q, k, v, n_heads=H, n_kv_heads=KV, cu_seqlens=cu)]
        r += ab.attention_backward(do, q, k, v, n_heads=H, n_kv_heads=KV, cu_seqlens=cu)
        r += [ab.rope(x, head_dim=hd, positions=pos, layout="half"),
              ab.rope_backward(x, head_dim=hd, positions=pos)]
        loss, dl = ab.cross_entropy_backward(logits, tg, loss_denominator=1234.0)
        r += [np.float64(loss), dl]
        results.append(r)
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_rope_at_per_row_positions(rng, backend, layout):
    hd, H = 8, 3
    pos = np.array([0, 1, 2, 7, 3, 0, 4095, 1, 1], np.int32)
    x = rng.standard_normal((pos.size, H * hd), dtype=np.float32)
    y = ab.rope(x, head_dim=hd, positions=pos, layout=layout, backend=backend)
    want = np.concatenate([rope_ref(x[i:i + 1], hd, int(p), layout=layout)
                           for i, p in enumerate(pos)])
    assert_close(y, want, atol=2e-6, what="rope")
    back = ab.rope_backward(y, head_dim=hd, positions=pos, layout=layout, backend=backend)
    assert_close(back, x, atol=5e-6, what="rope_backward(rope(x))")
    # positions pos_offset + s are the pos_offset path, bit for bit
    xs = rng.standard_normal((2, 5, H * hd), dtype=np.float32)
    p2 = np.broadcast_to(np.arange(3, 8, dtype=np.int32), (2, 5))
    assert np.array_equal(ab.rope(xs, head_dim=hd, positions=p2, layout=layout, backend=backend),
                          ab.rope(xs, head_dim=hd, pos_offset=3, layout=layout, backend=backend))


def test_rope_positions_bad_input(rng):
    x = rng.standard_normal((4, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="positions must have shape"):
        ab.rope(x, head_dim=8, positions=np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="positions must be in"):
        ab.rope(x, head_dim=8, positions=np.array([0, 1, -2, 3]))
    with pytest.raises(ValueError, match="positions or pos_offset"):
        ab.rope(x, head_dim=8, positions=np.zeros(4, np.int32), pos_offset=2)


def test_varlen_attention_bad_input(rng):
    q, k, v = _qkv(rng, 6, 2, 2, 4)
    for cu, msg in (([0, 3], "end at the number of tokens"), ([1, 6], "start at 0"),
                    ([0, 4, 2, 6], "non-decreasing"), ([6], r"\[n_seq \+ 1\]")):
        with pytest.raises(ValueError, match=msg):
            ab.attention(q, k, v, n_heads=2, cu_seqlens=np.array(cu))
    with pytest.raises(ValueError, match=r"\[N, heads\*head_dim\]"):
        ab.attention(q[None], k[None], v[None], n_heads=2, cu_seqlens=np.array([0, 6]))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_cross_entropy_with_a_denominator(rng, backend):
    logits = rng.standard_normal((11, 17), dtype=np.float32)
    tg = rng.integers(0, 17, 11).astype(np.int32)
    tg[[0, 4, 5]] = -1
    loss, dl = ab.cross_entropy_backward(logits, tg, loss_denominator=37.0, grad_scale=2.0,
                                         backend=backend)
    n = (tg >= 0).sum()
    assert abs(loss - ce_ref(logits, tg) * n / 37.0) < 1e-6
    assert_close(dl, cross_entropy_grad(logits, tg) * n / 37.0 * 2.0, atol=1e-7, what="dlogits")
    assert abs(ab.cross_entropy(logits, tg, loss_denominator=37.0, backend=backend) - loss) < 1e-12
    with pytest.raises(ValueError, match="loss_denominator must be > 0"):
        ab.cross_entropy(logits, tg, loss_denominator=0.0)


# ---------------------------------------------------------------- model ----
def _docs_model(rng, tied=False, KV=2, **kw):
    cfg = LlamaConfig(dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=KV, vocab_size=41,
                      max_seq_len=80, shared_classifier=tied)
    model = Llama(cfg, seed=1, **kw)
    randomize(model, rng)
    return model


def _docs_reference(torch, model, docs):
    """Loss and gradients of documents each run alone as a full row at
    positions 0.. (PyTorch float64), combined as one mean over all counted
    targets."""
    total = sum(len(d) - 1 for d in docs)
    loss, grads = 0.0, None
    for d in docs:
        t = np.asarray(d)[None]
        tgt = np.full_like(t, -1)
        tgt[:, :-1] = t[:, 1:]
        lo, g = torch_grads(torch, model, t, tgt)
        w = (len(d) - 1) / total
        loss += lo * w
        grads = {n: w * a for n, a in g.items()} if grads is None else \
            {n: grads[n] + w * a for n, a in g.items()}
    return loss, grads


def _assert_grads(model, ref, tol=1e-4):
    for name, g in model.grads.items():
        scale = np.abs(ref[name]).max()
        assert scale > 0
        err = np.abs(g - ref[name]).max()
        assert err <= tol * scale, f"{name}: {err:.3g} vs {scale:.3g}"


@pytest.mark.parametrize("KV,tied", [(4, True), (2, False), (1, False)])
def test_packed_documents_equal_each_document_alone(torch, rng, KV, tied):
    model = _docs_model(rng, tied=tied, KV=KV)
    docs = [rng.integers(0, 41, n) for n in (7, 2, 70, 13)]
    tok = np.concatenate(docs)
    loss = model.forward(tok, cu_seqlens=_cu([len(d) for d in docs]))
    model.backward()
    ref_loss, ref = _docs_reference(torch, model, docs)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    _assert_grads(model, ref)


def test_padded_and_packed_rows_are_the_compact_batch(rng):
    """Right padding, left padding (positions from the mask's index, as HF),
    packed rows (restarting positions) all reduce to one compact batch: the
    same loss and gradients as that batch given compact."""
    model = _docs_model(rng)
    S = 20
    lengths = (7, 13, 1, 12, 7)
    docs = [rng.integers(0, 41, n) for n in lengths]
    # right-padded rows
    tok = np.zeros((5, S), np.int64)
    mask = np.zeros((5, S), np.int64)
    for i, d in enumerate(docs):
        tok[i, :len(d)], mask[i, :len(d)] = d, 1
    loss_pad = model.forward(tok, attention_mask=mask)
    model.backward()
    g_pad = model.flat_grads.copy()
    loss_c = model.forward(np.concatenate(docs), cu_seqlens=_cu(lengths))
    model.backward()
    assert loss_pad == loss_c
    assert np.array_equal(g_pad, model.flat_grads)
    # packed: two rows of 20 with restarting positions (no mask)
    packed = np.concatenate(docs)   # 40 tokens: rows [7 + 13], [1 + 12 + 7]
    pos = np.concatenate([np.arange(n) for n in lengths])
    loss_pk = model.forward(packed.reshape(2, 20), positions=pos.reshape(2, 20))
    model.backward()
    assert loss_pk == loss_c
    assert np.array_equal(model.flat_grads, g_pad)


def test_left_padding_uses_the_row_index_positions(rng):
    """A left-padded row without positions runs at positions pad..S-1 (HF's
    default): equal to the compact form at those positions."""
    model = _docs_model(rng)
    d = rng.integers(0, 41, 9)
    tok = np.zeros((1, 14), np.int64)
    tok[0, 5:] = d
    mask = (np.arange(14) >= 5).astype(np.int64)[None]
    l1 = model.forward(tok, attention_mask=mask)
    model.backward()
    g1 = model.flat_grads.copy()
    l2 = model.forward(d, cu_seqlens=[0, 9], positions=np.arange(5, 14))
    model.backward()
    assert l1 == l2 and np.array_equal(g1, model.flat_grads)
    l3 = model.forward(d, cu_seqlens=[0, 9])   # positions 0..8: close, not the same angles
    assert l3 != l1 and abs(l3 - l1) < 1e-3


def test_masked_targets_and_denominator(torch, rng):
    """Prompt-masked targets (-1) and loss = sum / num_items_in_batch."""
    model = _docs_model(rng)
    docs = [rng.integers(0, 41, n) for n in (9, 15)]
    tok = np.concatenate(docs)
    cu = _cu([9, 15])
    tgt = varlen(tok, cu).targets.copy()
    tgt[:4] = -1            # the first document's prompt
    tgt[9:9 + 6] = -1       # the second's
    loss = model.forward(tok, tgt, cu_seqlens=cu, loss_denominator=50.0)
    model.backward()
    n = int((tgt >= 0).sum())
    ref_loss, ref_g = 0.0, None
    for d, (a, b) in zip(docs, ((0, 9), (9, 24))):
        t = np.asarray(d)[None]
        lo, g = torch_grads(torch, model, t, tgt[a:b][None])
        w = int((tgt[a:b] >= 0).sum()) / 50.0
        ref_loss += lo * w
        ref_g = {k: w * v for k, v in g.items()} if ref_g is None else \
            {k: ref_g[k] + w * v for k, v in g.items()}
    assert n == 12   # (8 - 4) + (14 - 6) counted
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    _assert_grads(model, ref_g)


@pytest.mark.usefixtures("keep_blas_threads")
def test_model_varlen_is_thread_independent_and_recompute_exact(rng):
    docs = [rng.integers(0, 41, n) for n in (33, 2, 70, 1, 40)]
    tok, cu = np.concatenate(docs), _cu([len(d) for d in docs])
    pos = rng.integers(0, 300, tok.size)
    runs = []
    for n, recompute in ((1, False), (2, False), (3, True), (4, False)):
        ab.set_num_threads(n)
        m = _docs_model(np.random.default_rng(7), recompute=recompute)
        loss = m.forward(tok, cu_seqlens=cu, positions=pos)
        m.backward()
        runs.append((loss, m.flat_grads.copy()))
    for loss, g in runs[1:]:
        assert loss == runs[0][0] and np.array_equal(g, runs[0][1])


def test_model_varlen_reference_matches_fast(rng):
    docs = [rng.integers(0, 41, n) for n in (5, 1, 11)]
    tok, cu = np.concatenate(docs), _cu([5, 1, 11])
    pos = np.array([3, 4, 5, 6, 7, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    fast = _docs_model(np.random.default_rng(3))
    ref = _docs_model(np.random.default_rng(3), backend="reference")
    l1 = fast.forward(tok, cu_seqlens=cu, positions=pos, loss_denominator=9.0)
    l2 = ref.forward(tok, cu_seqlens=cu, positions=pos, loss_denominator=9.0)
    fast.backward()
    ref.backward()
    assert abs(l1 - l2) < 1e-5
    scale = np.abs(ref.flat_grads).max()
    assert np.abs(fast.flat_grads - ref.flat_grads).max() <= 1e-4 * scale


def test_batch_logits_scatter_and_compact(rng):
    model = _docs_model(rng)
    docs = [rng.integers(0, 41, n) for n in (4, 6)]
    tok = np.zeros((2, 6), np.int64)
    mask = np.zeros((2, 6), np.int64)
    tok[0, 2:], mask[0, 2:] = docs[0], 1          # left padding
    tok[1], mask[1] = docs[1], 1
    lg = model.logits(tok, attention_mask=mask)
    assert lg.shape == (2, 6, 41) and not lg[0, :2].any()
    compact = model.logits(np.concatenate(docs), cu_seqlens=[0, 4, 10],
                           positions=[2, 3, 4, 5, 0, 1, 2, 3, 4, 5])
    assert np.array_equal(lg[mask.astype(bool)], compact)
    # a document alone as a full row has the same logits (same positions 0..)
    full = model.logits(docs[1][None])
    np.testing.assert_allclose(compact[4:], full[0], rtol=1e-5, atol=1e-5)


def test_batch_layout_bad_input(rng):
    model = _docs_model(rng)
    tok = rng.integers(0, 41, (2, 6))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        model.forward(tok, attention_mask=np.ones((2, 5), np.int64))
    with pytest.raises(ValueError, match="marks no token"):
        model.forward(tok, attention_mask=np.zeros((2, 6), np.int64))
    t = np.full((2, 6), -1)
    t[0, 5] = 3
    m = np.ones((2, 6), np.int64)
    m[0, 5] = 0
    with pytest.raises(ValueError, match=r"position \(0, 5\) is padding"):
        model.forward(tok, t, attention_mask=m)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model.forward(rng.integers(0, 41, 100), cu_seqlens=[0, 100])
    with pytest.raises(ValueError, match="loss_denominator must be > 0"):
        model.forward(tok, loss_denominator=0)
    with pytest.raises(ValueError, match="not both"):
        model.forward(tok.ravel(), cu_seqlens=[0, 12], attention_mask=np.ones(12))
    with pytest.raises(ValueError, match="tokens must be in"):
        model.forward(np.array([1, 2, 99]), cu_seqlens=[0, 3])


def test_from_padded_follows_hf_rules():
    tok = np.arange(1, 9)[None]
    # packed: cut where position_ids do not step by one
    b = from_padded(tok, position_ids=np.array([[0, 1, 2, 0, 1, 5, 6, 0]]))
    assert b.cu_seqlens.tolist() == [0, 3, 5, 7, 8]
    assert b.targets.tolist() == [2, 3, -1, 5, -1, 7, -1, -1]
    # with a mask, a row's real tokens are one segment whatever the positions
    b = from_padded(tok, attention_mask=np.array([[0, 1, 1, 1, 1, 1, 1, 0]]),
                    position_ids=np.array([[0, 0, 1, 2, 0, 1, 2, 0]]))
    assert b.cu_seqlens.tolist() == [0, 6] and b.positions.tolist() == [0, 1, 2, 0, 1, 2]
    # HF labels: shifted inside the row, -100 dropped
    lab = np.array([[-100, -100, 3, 4, 5, 6, 7, -100]])
    b = from_padded(tok, attention_mask=np.array([[1, 1, 1, 1, 1, 1, 1, 0]]), labels=lab)
    assert b.targets.tolist() == [-1, 3, 4, 5, 6, 7, -1]


def test_c_guards_of_the_batch_layout(rng):
    """ab_model_forward_batch checks its layout before touching the
    workspace: an error code, never a crash or a silent result."""
    from anebackward._native import ffi, fptr, iptr, lib
    from anebackward.batch import i64ptr
    model = _docs_model(rng)
    B, S = 2, 8
    total = ffi.new("int64_t *")
    assert lib.ab_model_workspace_floats(model._cfg, B, S, total, ffi.NULL) == 0
    work = np.zeros(total[0], np.float32)
    tok = rng.integers(0, 41, 10).astype(np.int32)
    tgt = np.roll(tok, -1).astype(np.int32)
    pos = np.arange(10, dtype=np.int32)
    loss = ffi.new("double *")

    def run(cu, n_tokens=10, positions=pos, den=0.0, bs=(B, S)):
        cu = np.asarray(cu, np.int64)
        lay = ffi.new("ab_batch_layout *")
        lay.n_tokens, lay.n_seq = n_tokens, cu.size - 1
        lay.cu_seqlens = i64ptr(cu) if cu.size else ffi.NULL
        lay.positions = iptr(positions) if positions is not None else ffi.NULL
        lay.loss_denominator = den
        return lib.ab_model_forward_batch(loss, model._cfg, fptr(model.flat_params), iptr(tok),
                                          iptr(tgt), bs[0], bs[1], lay, 1, fptr(work), work.size)

    assert run([0, 4, 10]) == 0 and np.isfinite(loss[0])
    assert run([0, 4, 10], positions=None) == 0
    assert run([1, 4, 10]) == lib.AB_EINVAL            # does not start at 0
    assert run([0, 6, 4, 10]) == lib.AB_EINVAL         # decreasing
    assert run([0, 4, 9]) == lib.AB_EINVAL             # does not end at n_tokens
    assert run([0, 10]) == lib.AB_EINVAL               # a segment longer than S
    assert run([0, 4, 10], n_tokens=17, bs=(2, 8)) == lib.AB_EINVAL   # more rows than B*S
    assert run([0, 4, 10], den=-1.0) == lib.AB_EINVAL
    assert run([0, 4, 10], den=float("nan")) == lib.AB_EINVAL
    bad = pos.copy()
    bad[3] = -1
    assert run([0, 4, 10], positions=bad) == lib.AB_EINVAL
    assert run([]) == lib.AB_EINVAL                    # n_seq 0
    lay = ffi.new("ab_batch_layout *")
    lay.n_tokens, lay.n_seq = 10, 2
    assert lib.ab_model_forward_batch(loss, model._cfg, fptr(model.flat_params), iptr(tok),
                                      iptr(tgt), B, S, lay, 1, fptr(work),
                                      work.size) == lib.AB_ENULL   # cu_seqlens NULL
    # the refused calls left the workspace alone: the last good forward's
    # backward runs, once
    args = (model._cfg, fptr(model.flat_params), fptr(model.flat_grads), B, S, 1.0, 0,
            fptr(work), work.size)
    assert lib.ab_model_backward(*args) == 0 and np.isfinite(model.flat_grads).all()
    assert lib.ab_model_backward(*args) == lib.AB_EINVAL
