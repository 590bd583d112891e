"""Bad input for every public kernel: wrong dtype, layout, shape, range,
read-only or overlapping outputs, unknown backends. Each must raise a clear
TypeError/ValueError naming the argument — never crash or compute garbage."""
import numpy as np
import pytest

import anebackward as ab

f = np.float32
S, D, V, H, HD = 6, 8, 10, 2, 4


def arrs():
    r = np.random.default_rng(0)
    a = lambda *s: r.standard_normal(s).astype(f)  # noqa: E731
    return dict(x=a(S, D), W=a(5, D), dy5=a(S, 5), w=a(D), dy=a(S, D), h=a(S, D),
                q=a(S, H * HD), k=a(S, H * HD), v=a(S, H * HD), logits=a(S, V),
                tok=np.arange(S) % V, E=a(V, D))


# name -> (callable taking the dict of arrays, argument to corrupt)
CALLS = {
    "linear": (lambda A, **kw: ab.linear(A["x"], A["W"], **kw), "x"),
    "linear_backward_dx": (lambda A, **kw: ab.linear_backward_dx(A["dy5"], A["W"], **kw), "dy5"),
    "linear_backward_dW": (lambda A, **kw: ab.linear_backward_dW(A["dy5"], A["x"], **kw), "x"),
    "rmsnorm": (lambda A, **kw: ab.rmsnorm(A["x"], A["w"], **kw), "x"),
    "rmsnorm_backward": (lambda A, **kw: ab.rmsnorm_backward(A["dy"], A["x"], A["w"], **kw), "dy"),
    "rope": (lambda A, **kw: ab.rope(A["q"], head_dim=HD, **kw), "q"),
    "rope_backward": (lambda A, **kw: ab.rope_backward(A["q"], head_dim=HD, **kw), "q"),
    "attention": (lambda A, **kw: ab.attention(A["q"], A["k"], A["v"], n_heads=H, **kw), "k"),
    "attention_backward": (lambda A, **kw: ab.attention_backward(A["q"], A["q"], A["k"], A["v"],
                                                                 n_heads=H, **kw), "v"),
    "swiglu": (lambda A, **kw: ab.swiglu(A["h"], A["x"], **kw), "h"),
    "swiglu_backward": (lambda A, **kw: ab.swiglu_backward(A["dy"], A["h"], A["x"], **kw), "h"),
    "cross_entropy": (lambda A, **kw: ab.cross_entropy(A["logits"], A["tok"], **kw), "logits"),
    "cross_entropy_backward": (lambda A, **kw: ab.cross_entropy_backward(A["logits"], A["tok"], **kw),
                               "logits"),
    "embedding": (lambda A, **kw: ab.embedding(A["tok"], A["E"], **kw), "E"),
    "embedding_backward": (lambda A, **kw: ab.embedding_backward(A["x"], A["tok"], dE=A["E"], **kw, accumulate=True), "x"),
    "clip_grad_norm": (lambda A, **kw: ab.clip_grad_norm([A["x"], A["w"]], 1.0, **kw), "w"),
    "grad_norm": (lambda A, **kw: ab.grad_norm([A["x"]], **kw), "x"),
    "adamw_step": (lambda A, **kw: ab.adamw_step(A["x"], A["dy"], A["h"], np.zeros((S, D), f),
                                                 step=1, lr=1e-3, **kw), "dy"),
}


def _flat(result):
    if result is None:
        return []
    if isinstance(result, (tuple, list)):
        return [a for r in result for a in _flat(r)]
    return [np.asarray(result, dtype=np.float64)]


@pytest.mark.parametrize("name", sorted(CALLS))
def test_valid_call_works(name):
    """The valid call of each table entry runs, gives finite numbers, and
    gives what the reference loops give (outputs and in-place arguments)."""
    fast, ref = arrs(), arrs()
    got = _flat(CALLS[name][0](fast)) + [np.asarray(a, np.float64) for a in fast.values()]
    want = _flat(CALLS[name][0](ref, backend="reference")) + [np.asarray(a, np.float64)
                                                             for a in ref.values()]
    assert len(got) == len(want) and len(got) > len(fast)
    for g, w in zip(got, want):
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)


def _strided(a):
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), f)
    big[..., ::2] = a
    return big[..., ::2]


# how an argument is spoiled -> the error it must raise (and its text)
SPOILED = {
    "float64": (lambda a: a.astype(np.float64), TypeError, "float32"),
    "non_contiguous": (_strided, ValueError, "C-contiguous"),
    "list": (lambda a: a.tolist(), TypeError, "numpy.ndarray"),
}


@pytest.mark.parametrize("spoil", sorted(SPOILED))
@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_spoiled_argument_is_a_clear_error(name, spoil):
    call, arg = CALLS[name]
    how, error, text = SPOILED[spoil]
    A = arrs()
    A[arg] = how(A[arg])
    with pytest.raises(error, match=text):
        call(A)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_unknown_and_unavailable_backends(name, monkeypatch):
    call, _ = CALLS[name]
    monkeypatch.setenv("ANEBACKWARD_ANE", "off")     # no ANE, even where one (or the emulator) is on
    with pytest.raises(ValueError, match="backend"):
        call(arrs(), backend="gpu")
    with pytest.raises(ab.AneUnavailableError, match="unavailable"):
        call(arrs(), backend="ane")
    monkeypatch.setenv("ANEBACKWARD_BACKEND", "fast")
    with pytest.raises(ValueError, match="ANEBACKWARD_BACKEND"):
        call(arrs())
    monkeypatch.setenv("ANEBACKWARD_BACKEND", "reference")
    call(arrs())


def _grow_last(a):
    return np.zeros(a.shape[:-1] + (a.shape[-1] + 1,), a.dtype)


def _grow_first(a):
    return np.zeros((a.shape[0] + 1,) + a.shape[1:], a.dtype)


# which argument to give an incompatible shape, and how
WRONG_SHAPE = {name: (arg, _grow_last) for name, (_, arg) in CALLS.items()}
WRONG_SHAPE.update({
    "cross_entropy": ("tok", _grow_first), "cross_entropy_backward": ("tok", _grow_first),
    "embedding": ("tok", lambda a: a.reshape(2, -1)), "linear_backward_dW": ("x", _grow_first),
    "embedding_backward": ("x", _grow_last),
})
del WRONG_SHAPE["clip_grad_norm"], WRONG_SHAPE["grad_norm"]   # any list of shapes is valid


@pytest.mark.parametrize("name", sorted(WRONG_SHAPE))
def test_wrong_shape_is_a_value_error(name):
    arg, corrupt = WRONG_SHAPE[name]
    A = arrs()
    A[arg] = corrupt(A[arg])
    if name == "embedding":   # a 2-D token array is valid: check the out= shape instead
        with pytest.raises(ValueError, match="out must have shape"):
            ab.embedding(A["tok"], A["E"], out=np.zeros((S, D), f))
        return
    with pytest.raises(ValueError, match="shape|axis|axes"):
        CALLS[name][0](A)


def test_shape_messages_say_expected_and_given():
    A = arrs()
    with pytest.raises(ValueError, match=r"W.shape\[1\] = 8.*\(6, 9\)"):
        ab.linear(np.zeros((6, 9), f), A["W"])
    with pytest.raises(ValueError, match=r"out must have shape \(6, 5\).*\(5, 6\)"):
        ab.linear(A["x"], A["W"], out=np.zeros((5, 6), f))
    with pytest.raises(ValueError, match="n_kv_heads"):
        ab.attention(A["q"], A["k"], A["v"], n_heads=2, n_kv_heads=3)
    with pytest.raises(ValueError, match=r"rope: \w+: head_dim must be even "
                                         r"\(pairs rotate\), got 1"):
        ab.rope(A["q"], head_dim=1)      # the C core's message
    with pytest.raises(ValueError, match=r"rope_inv_freq: ab_rope_inv_freq: head_dim must be even "
                                         r"\(pairs rotate\), got 5"):
        ab.rope_inv_freq(5)
    with pytest.raises(ValueError, match="multiple of head_dim"):
        ab.rope(A["q"], head_dim=6)
    with pytest.raises(ValueError, match="k must have shape"):
        ab.attention(A["q"], A["k"][:, :4].copy(), A["v"], n_heads=2)
    with pytest.raises(ValueError, match="3-D"):
        ab.attention(A["q"][None, None], A["k"], A["v"], n_heads=2)


def test_token_range_and_dtype():
    A = arrs()
    with pytest.raises(ValueError, match=r"tokens must be in \[0, 10\).*tokens.flat\[2\] = 10"):
        ab.embedding(np.array([1, 2, 10]), A["E"])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        ab.embedding(np.array([-1, 2]), A["E"])
    with pytest.raises(ValueError, match="targets"):
        ab.cross_entropy(A["logits"], np.array([0, 1, 2, 3, 4, 10]))
    with pytest.raises(ValueError, match="targets"):
        ab.cross_entropy(A["logits"], np.array([0, 1, 2, 3, 4, -2]))
    with pytest.raises(ValueError, match=r"tokens must be in"):
        ab.embedding(np.array([2**40]), A["E"])      # int64 beyond int32: no wrap-around
    with pytest.raises(TypeError, match="integer dtype"):
        ab.embedding(np.array([1.0, 2.0]), A["E"])
    with pytest.raises(ValueError, match="targets must have shape"):
        ab.cross_entropy(A["logits"], np.arange(5))
    dE = A["E"].copy()
    before = dE.copy()
    with pytest.raises(ValueError):
        ab.embedding_backward(A["x"], np.array([0, 1, 2, 3, 4, 99]), dE=dE, accumulate=True)
    assert np.array_equal(dE, before), "a rejected call must not write anything"


def test_read_only_and_overlapping_outputs():
    A = arrs()
    ro = np.zeros((S, 5), f)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        ab.linear(A["x"], A["W"], out=ro)
    with pytest.raises(ValueError, match="overlaps x"):
        ab.rmsnorm(A["x"], A["w"], out=A["x"])
    with pytest.raises(ValueError, match="overlaps"):
        ab.attention(A["q"], A["k"], A["v"], n_heads=2, out=A["q"])
    big = np.zeros(2 * S * D, f)
    with pytest.raises(ValueError, match="overlaps"):
        ab.swiglu(big[:S * D].reshape(S, D), A["x"], out=big[S * D // 2:S * D * 3 // 2].reshape(S, D))
    with pytest.raises(ValueError, match="overlap"):
        ab.adamw_step(A["x"], A["dy"], A["x"], A["h"], step=1, lr=1.0)
    with pytest.raises(ValueError, match="accumulate=True needs"):
        ab.linear_backward_dx(A["dy5"], A["W"], accumulate=True)


@pytest.mark.parametrize("kw,match", [(dict(step=0), "step"), (dict(lr=-1.0), "lr"),
                                      (dict(beta1=1.0), "beta1"), (dict(beta2=-0.1), "beta2"),
                                      (dict(eps=float("nan")), "eps"), (dict(weight_decay=-1), "weight_decay")])
def test_adamw_hyperparameters(kw, match):
    p, g, m, v = (np.zeros(4, f) for _ in range(4))
    args = dict(step=1, lr=1e-3)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        ab.adamw_step(p, g, m, v, **args)


def test_scalar_arguments():
    A = arrs()
    with pytest.raises(ValueError, match="max_norm"):
        ab.clip_grad_norm(A["x"], 0.0)
    with pytest.raises(ValueError, match="eps"):
        ab.rmsnorm(A["x"], A["w"], eps=-1.0)
    with pytest.raises(ValueError, match="pos_offset"):
        ab.rope(A["q"], head_dim=HD, pos_offset=-1)
    with pytest.raises(ValueError, match="n_heads"):
        ab.attention(A["q"], A["k"], A["v"], n_heads=0)
    with pytest.raises(ValueError, match="workspace"):
        ab.attention(A["q"], A["k"], A["v"], n_heads=2, workspace=np.zeros(3, f))
    with pytest.raises(TypeError, match="grads"):
        ab.clip_grad_norm(3.0, 1.0)
