"""With recompute the classifier runs in row chunks: the workspace holds one
chunk of logits, the backward computes each chunk's logits again. Loss and
gradients against the float64 PyTorch oracle and against the run without
recompute, for a vocabulary (8192: 128-row chunks) and row counts that need
several chunks, the last one partial."""
import numpy as np
import pytest

import anebackward as ab
from anebackward import Llama, LlamaConfig
from test_model import assert_grads_match, randomize, shifted, torch_grads

pytestmark = pytest.mark.usefixtures("bf16_ready")   # bf16 on the portable path without oneDNN

V = 8192
CHUNK = 128     # rows per chunk for this vocabulary (csrc/model/model.c: cls_chunk_rows)


def _cfg(tied, n_layers=2, **kw):
    return LlamaConfig(dim=32, hidden_dim=48, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                       vocab_size=V, max_seq_len=160, shared_classifier=tied, **kw)


def _model(cfg, recompute, **kw):
    m = Llama(cfg, seed=1, recompute=recompute, **kw)
    randomize(m, np.random.default_rng(5), norm_spread=0.2)
    m.flat_params[:m.n_decay] *= 0.5
    m.mark_params_changed()
    return m


def _assert_close_to(a, b, tol):
    """a's gradients within tol of b's (the run without recompute), each
    tensor against its largest entry. Not bit-identical: the classifier's dW
    is summed chunk by chunk (another order), and the matmul of a chunk's
    few rows may take another kernel path than that of all N rows (dx)."""
    for name, g in a.grads.items():
        r = b.grads[name]
        scale = np.abs(r).max()
        assert scale > 0, name
        assert np.abs(g - r).max() <= tol * scale, name


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_classifier_matches_float64_oracle_and_the_unchunked_run(torch, rng, tied):
    cfg = _cfg(tied)
    tokens = rng.integers(0, V, size=(2, 150))          # 300 rows: chunks 128, 128, 44
    tgt = shifted(tokens)
    tgt[0, 5:40] = -1                                   # ignored rows inside a chunk
    full, chunked = _model(cfg, False), _model(cfg, True)
    l_full = full.forward(tokens, tgt)
    full.backward()
    l_chunk = chunked.forward(tokens, tgt)
    chunked.backward(grad_scale=1.0)
    ref_loss, ref = torch_grads(torch, chunked, tokens, tgt)
    assert abs(l_chunk - ref_loss) <= 1e-5 * abs(ref_loss)
    assert_grads_match(chunked, ref, tol=1e-4)
    # the same sums in another order (the loss and the classifier's dW are
    # added chunk by chunk): float32 rounding apart, nothing more
    assert abs(l_chunk - l_full) <= 1e-6 * abs(l_full)
    _assert_close_to(chunked, full, 1e-5)


def test_chunked_classifier_grad_scale_and_accumulate(rng):
    cfg = _cfg(False)
    tokens = rng.integers(0, V, size=(1, 150))
    a, b = _model(cfg, True), _model(cfg, False)
    for m in (a, b):
        m.forward(tokens)
        m.backward(grad_scale=0.5)
        m.forward(tokens)
        m.backward(grad_scale=2.0, accumulate=True)      # 2.5 x the gradient
    _assert_close_to(a, b, 1e-5)


def test_chunked_classifier_varlen_batch_with_a_denominator(torch, rng):
    from test_batch_layouts import _cu
    cfg = _cfg(True)
    docs = [rng.integers(0, V, n) for n in (150, 3, 120, 40)]   # 313 rows: 3 chunks
    tok, cu = np.concatenate(docs), _cu([len(d) for d in docs])
    full, chunked = _model(cfg, False), _model(cfg, True)
    runs = []
    for m in (full, chunked):
        loss = m.forward(tok, cu_seqlens=cu, loss_denominator=400.0)
        m.backward()
        runs.append(loss)
    # the oracle: each document alone at positions 0.., summed over 400
    ref_loss, ref = 0.0, None
    for d in docs:
        t = np.asarray(d)[None]
        lo, g = torch_grads(torch, chunked, t, shifted(t))
        w = (len(d) - 1) / 400.0
        ref_loss += lo * w
        ref = {k: w * v for k, v in g.items()} if ref is None else \
            {k: ref[k] + w * v for k, v in g.items()}
    assert abs(runs[1] - ref_loss) <= 1e-5 * abs(ref_loss)
    assert_grads_match(chunked, ref, tol=1e-4)
    assert abs(runs[1] - runs[0]) <= 1e-6 * abs(runs[0])
    _assert_close_to(chunked, full, 1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_classifier_bf16_matches_the_bf16_oracle(torch, rng, tied):
    from test_bf16 import _bf16_torch_model, _grads
    cfg = _cfg(tied)
    tokens = rng.integers(0, V, size=(2, 150))
    m = _model(cfg, True, precision="bf16")
    loss = m.forward(tokens)
    m.backward()
    ref_loss, ref = _grads(torch, _bf16_torch_model(torch, m), tokens, shifted(tokens))
    assert abs(loss - ref_loss) <= 2e-4 * abs(ref_loss)
    for name, g in m.grads.items():
        scale = np.abs(ref[name]).max()
        assert scale > 0, name
        assert np.abs(g - ref[name]).max() <= 1e-2 * scale, name
    # and close to the bf16 run without recompute
    full = _model(cfg, False, precision="bf16")
    l_full = full.forward(tokens)
    full.backward()
    assert abs(loss - l_full) <= 1e-6 * abs(l_full)
    _assert_close_to(m, full, 1e-2)


@pytest.mark.usefixtures("keep_blas_threads")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_chunked_classifier_is_bit_identical_at_1_2_3_threads(rng, precision):
    cfg = _cfg(True)
    tokens = rng.integers(0, V, size=(2, 150))
    runs = []
    for n in (1, 2, 3):
        ab.set_num_threads(n)
        m = _model(cfg, True, precision=precision)
        loss = m.forward(tokens)
        m.backward()
        runs.append((loss, m.flat_grads.copy()))
    for loss, g in runs[1:]:
        assert loss == runs[0][0]
        assert np.array_equal(g, runs[0][1])


def test_recompute_workspace_holds_one_chunk_of_logits():
    # one layer: recompute keeps the same single slot of layer activations,
    # so the difference is the classifier's alone: (N - CHUNK) rows of
    # logits fewer, plus the targets' copy (N) and the denominator (2 floats)
    cfg = _cfg(False, n_layers=1)
    B, S = 2, 150
    N = B * S
    full = Llama(cfg, seed=0).workspace_bytes(B, S)
    chunked = Llama(cfg, seed=0, recompute=True).workspace_bytes(B, S)
    assert full - chunked == 4 * ((N - CHUNK) * V - N - 2)
    # fewer rows than a chunk: one chunk of N rows
    small = Llama(cfg, seed=0, recompute=True).workspace_bytes(1, 100)
    assert Llama(cfg, seed=0).workspace_bytes(1, 100) - small == -4 * (100 + 2)


def test_logits_with_recompute_equal_the_unchunked_ones(rng):
    cfg = _cfg(False)
    tokens = rng.integers(0, V, size=(2, 150))
    full, chunked = _model(cfg, False), _model(cfg, True)
    a, b = full.logits(tokens), chunked.logits(tokens)
    assert b.shape == (2, 150, V)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    # forward(logits_out=) with recompute: the same logits and the loss of
    # forward(), and a backward after it
    out = np.empty((2 * 150 * V,), np.float32)
    loss = chunked.forward(tokens, logits_out=out)
    assert np.array_equal(out.reshape(2, 150, V), b)
    assert loss == chunked.forward(tokens)
    chunked.forward(tokens, logits_out=out)
    chunked.backward()
    g = chunked.flat_grads.copy()
    chunked.forward(tokens)
    chunked.backward()
    assert np.array_equal(g, chunked.flat_grads)


def test_batch_logits_with_recompute_raise_a_clear_error(rng):
    from test_batch_layouts import _cu
    m = _model(_cfg(False), True)
    with pytest.raises(ValueError, match="set_recompute"):
        m.logits(rng.integers(0, V, 10), cu_seqlens=_cu([4, 6]))


def test_one_call_logits_with_recompute_refuse_a_loss_built_from_them(torch):
    """The one-call torch step with recompute: its loss differentiates (as
    without recompute), a loss built from its logits raises (no dlogits are
    kept) with the fix in the message."""
    import anebackward.torch as at
    cfg = dict(dim=32, n_layers=1, n_heads=4, vocab_size=67, multiple_of=16, max_seq_len=16)
    tok = torch.randint(0, 67, (2, 16), generator=torch.Generator().manual_seed(1))
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        m = at.Transformer(at.ModelArgs(**cfg))
        m(tok, tok)                                 # binds the engine
        m._slot.engine.set_recompute(recompute)
        m.zero_grad(set_to_none=True)
        m(tok, tok)
        m.last_loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
        if recompute:
            logits = m(tok, tok)
            with pytest.raises(RuntimeError, match="recompute"):
                (m.last_loss + (logits ** 2).mean()).backward()
    assert (grads[1] - grads[0]).abs().max() <= 1e-5 * grads[0].abs().max()


def test_chunked_classifier_on_the_emulated_ane_path(emulator, rng):
    """backend="ane" with recompute and more classifier chunks (9) than the
    queue has room for dW jobs in one backward (1 + 7 per layer): each
    chunk's dW is queued to the context's worker and waited for before the
    next chunk overwrites its dlogits; the gradients as the CPU's to fp16
    tolerance."""
    from test_ane_model import assert_close_per_tensor
    cfg = LlamaConfig(dim=128, hidden_dim=192, n_layers=1, n_heads=4, n_kv_heads=2,
                      vocab_size=V, max_seq_len=64)
    t = rng.integers(0, V, size=(17, 65)).astype(np.int32)     # 1088 rows: 9 chunks
    tokens, targets = t[:, :-1].copy(), t[:, 1:].copy()
    grads = []
    for backend in ("cpu", "ane"):
        m = Llama(cfg, seed=13, backend=backend, recompute=True)
        m.forward(tokens, targets)
        m.backward()
        if backend == "ane":
            assert m.ane_reason is None
        grads.append(m.flat_grads.copy())
    assert not np.array_equal(grads[0], grads[1])               # fp16 went through
    assert_close_per_tensor(m, grads[1], grads[0], 5e-3)



def test_chunked_classifier_with_no_counted_target_as_without_recompute(rng):
    """Every target ignored (the C entry points take it; Llama.forward
    refuses it first): NaN loss and zero gradients, with and without
    recompute."""
    from anebackward._native import ffi, lib
    cfg = _cfg(False)
    tokens = rng.integers(0, V, size=(2, 150)).astype(np.int32)
    tgt = np.full_like(tokens, -1)
    runs = []
    for recompute in (False, True):
        m = _model(cfg, recompute)
        work = m._workspace(2, 150)
        m._pending = None
        loss = ffi.new("double *")
        p, g, w = (ffi.from_buffer("float[]", a) for a in (m.flat_params, m.flat_grads, work))
        tk, tg = (ffi.from_buffer("int32_t[]", a) for a in (tokens, tgt))
        assert lib.ab_model_forward(loss, m._cfg, p, tk, tg, 2, 150, 1, w, work.size) == 0
        assert lib.ab_model_backward(m._cfg, p, g, 2, 150, 1.0, 0, w, work.size) == 0
        runs.append((loss[0], m.flat_grads.copy()))
    assert np.isnan(runs[0][0]) and np.isnan(runs[1][0])
    assert not runs[0][1].any()                  # no counted row: no gradient at all
    assert np.array_equal(runs[1][1], runs[0][1])
