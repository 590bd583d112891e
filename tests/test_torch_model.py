"""anebackward.torch.Transformer against a plain-PyTorch Llama written in
llama2.c's model.py style (anebackward/bench/torch_llama.py, the project's
one plain-PyTorch Llama): same init, same
state_dict, same loss and every parameter gradient, AdamW training."""
import copy

import pytest

pytestmark = pytest.mark.usefixtures("keep_blas_threads")

MHA = dict(dim=48, n_layers=2, n_heads=4, n_kv_heads=None, vocab_size=67, multiple_of=16,
           max_seq_len=32)
GQA = dict(MHA, n_heads=6, n_kv_heads=2, hidden_dim=80)


@pytest.fixture
def at(torch):
    import anebackward.torch as at
    return at


@pytest.fixture
def ref(torch):
    from anebackward.bench import torch_llama
    return torch_llama


def _pair(torch, at, ref, cfg, seed=0, **kw):
    torch.manual_seed(seed)
    ours = at.Transformer(at.ModelArgs(**cfg), **kw)
    torch.manual_seed(seed)
    theirs = ref.Transformer(**cfg)
    return ours, theirs


def _batch(torch, cfg, B=2, S=17, seed=1):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, cfg["vocab_size"], (B, S), generator=g)
    tgt = torch.randint(0, cfg["vocab_size"], (B, S), generator=g)
    tgt[0, 0] = tgt[-1, 5] = -1  # llama2.c's ignore_index
    return tok, tgt


def _rel(torch, a, e):
    a, e = a.detach().double(), e.detach().double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["MHA", "GQA"])
def test_same_init_names_and_state_dict_as_llama2c(torch, at, ref, cfg):
    ours, theirs = _pair(torch, at, ref, cfg)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    names = [n for n, _ in ours.named_parameters()]
    assert names == [n for n, _ in theirs.named_parameters()]
    assert "output.weight" in ours.state_dict() and "tok_embeddings.weight" in names
    assert ours.output.weight is ours.tok_embeddings.weight  # tied
    for (n, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.equal(p, q), f"{n}: same seed, different init"
    # state_dicts load both ways, ties kept
    torch.manual_seed(5)
    other = at.Transformer(**cfg)
    other.load_state_dict(theirs.state_dict())
    assert other.output.weight is other.tok_embeddings.weight
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), theirs.parameters()))
    theirs.load_state_dict(at.Transformer(**cfg).state_dict())
    assert torch.equal(ours.freqs_cos, theirs.freqs_cos) and torch.equal(ours.freqs_sin, theirs.freqs_sin)


def test_hidden_dim_rule(torch, at):
    m = at.Transformer(dim=288, n_layers=1, n_heads=6, vocab_size=10, multiple_of=32, max_seq_len=8)
    assert m.layers[0].feed_forward.w1.weight.shape == (768, 288)  # stories15M
    m = at.Transformer(dim=64, n_layers=1, n_heads=4, vocab_size=10, multiple_of=256, max_seq_len=8)
    assert m.layers[0].feed_forward.w2.weight.shape == (64, 256)
    assert m.params.hidden_dim is None  # the ModelArgs is not mutated


@pytest.mark.parametrize("linear", ["torch", "anebackward"])
@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["MHA", "GQA"])
def test_loss_and_every_gradient_match_pytorch_llama(torch, at, ref, cfg, linear):
    ours, theirs = _pair(torch, at, ref, cfg, linear=linear)
    theirs = theirs.double()  # float64 autograd is the oracle
    tok, tgt = _batch(torch, cfg)
    logits = ours(tok, tgt)
    ours.last_loss.backward()
    logits_ref = theirs(tok, tgt)
    theirs.last_loss.backward()
    assert logits.shape == logits_ref.shape == (2, 17, cfg["vocab_size"])
    assert abs(ours.last_loss.item() - theirs.last_loss.item()) < 1e-5
    assert _rel(torch, logits, logits_ref) < 1e-5
    n = 0
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert p.grad is not None, name
        err = _rel(torch, p.grad, q.grad)
        assert err < 2e-5, f"{name}: relative gradient error {err:.2e}"
        n += 1
    assert n == 9 * cfg["n_layers"] + 2


def test_float64_model_is_refused_with_the_way_out(torch, at, ref):
    """The kernels are float32; a float64 model is plain torch's (the tests'
    oracle), so .double() raises a TypeError that says to convert."""
    ours, _ = _pair(torch, at, ref, GQA)
    ours = ours.double()
    tok, tgt = _batch(torch, GQA, B=1, S=9)
    with pytest.raises(TypeError, match=r"must be float32, got torch.float64; convert with"):
        ours(tok, tgt)


def test_return_logits_false_keeps_loss_and_grads(torch, at, ref):
    a, _ = _pair(torch, at, ref, MHA)
    b, _ = _pair(torch, at, ref, MHA, return_logits=False, one_call=False)
    tok, tgt = _batch(torch, MHA)
    a(tok, tgt)
    assert b(tok, tgt) is None
    assert torch.equal(a.last_loss, b.last_loss)
    a.last_loss.backward()
    b.last_loss.backward()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-7)


def test_inference_returns_last_position_logits(torch, at, ref):
    ours, theirs = _pair(torch, at, ref, GQA)
    tok, _ = _batch(torch, GQA)
    ours.eval()
    with torch.no_grad():
        logits = ours(tok)
        assert ours.last_loss is None and logits.shape == (2, 1, GQA["vocab_size"])
        assert _rel(torch, logits, theirs.double()(tok)) < 1e-5
    theirs.float()
    torch.manual_seed(3)
    g1 = ours.generate(tok[:, :4], 5, temperature=0.0)
    assert g1.shape == (2, 9) and torch.equal(g1[:, :4], tok[:, :4])
    assert torch.equal(g1, ours.generate(tok[:, :4], 5, temperature=0.0))
    assert ours.generate(tok[:, :4], 3, temperature=0.8, top_k=5).shape == (2, 7)


def test_adamw_training_matches_pytorch_llama(torch, at, ref):
    """llama2.c's configure_optimizers + a few AdamW steps: same trajectory."""
    ours, theirs = _pair(torch, at, ref, GQA)
    opt = ours.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cpu")
    decay = [p for p in theirs.parameters() if p.dim() >= 2]
    nodecay = [p for p in theirs.parameters() if p.dim() < 2]
    opt_ref = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                 {"params": nodecay, "weight_decay": 0.0}], lr=3e-3, betas=(0.9, 0.95))
    tok, tgt = _batch(torch, GQA)
    before = [p.detach().clone() for p in ours.parameters()]
    losses, losses_ref = [], []
    for _ in range(4):
        for m, o, out in ((ours, opt, losses), (theirs, opt_ref, losses_ref)):
            m(tok, tgt)
            m.last_loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            o.step()
            o.zero_grad(set_to_none=True)
            out.append(m.last_loss.item())
    assert losses[-1] < losses[0] - 0.05, losses  # it trains
    assert max(abs(a - b) for a, b in zip(losses, losses_ref)) < 2e-4, (losses, losses_ref)
    for p, p0 in zip(ours.parameters(), before):
        assert not torch.equal(p, p0)  # every parameter (the RMSNorm weights too) moved


def test_gradient_accumulation_and_retain_graph(torch, at, ref):
    ours, _ = _pair(torch, at, ref, MHA)
    tok, tgt = _batch(torch, MHA)
    ours(tok, tgt)
    ours.last_loss.backward(retain_graph=True)
    g1 = [p.grad.clone() for p in ours.parameters()]
    ours.last_loss.backward()
    for p, g in zip(ours.parameters(), g1):
        assert torch.allclose(p.grad, 2 * g, rtol=1e-6, atol=1e-9)


def test_deepcopy_and_threads_do_not_share_scratch(torch, at, ref):
    import threading
    ours, _ = _pair(torch, at, ref, MHA)
    twin = copy.deepcopy(ours)
    assert twin.workspace is not ours.workspace
    assert twin.layers[1].attention.workspace is twin.workspace
    tok, tgt = _batch(torch, MHA)
    ours(tok, tgt)
    expect = ours.last_loss.item()
    results = []

    def run():
        results.append(twin(tok, tgt) is not None and twin.last_loss.item())
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expect, expect]


def test_unsupported_configurations_raise_clearly(torch, at):
    cfg = dict(MHA, dropout=0.1)
    m = at.Transformer(**cfg)
    tok = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(NotImplementedError, match="dropout=0.0"):
        m(tok, tok)
    m.eval()
    m(tok)  # dropout is a no-op in eval mode, as in llama2.c
    m = at.Transformer(**MHA)
    with pytest.raises(TypeError, match="float32"):
        copy.deepcopy(m).half()(tok)
    with pytest.raises(TypeError, match="float32"):
        copy.deepcopy(m).bfloat16()(tok, tok)
    with pytest.raises(NotImplementedError, match="CPU"):
        copy.deepcopy(m).to("meta")(tok.to("meta"))
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="batch, seqlen"):
        m(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="n_kv_heads"):
        at.Transformer(**dict(MHA, n_kv_heads=3))
    with pytest.raises(ValueError, match="linear"):
        at.Transformer(**MHA, linear="mkl")
    with pytest.raises(TypeError, match="either"):
        at.Transformer(at.ModelArgs(), dim=8)


def test_torch_compile_runs_the_kernels_eagerly(torch, at, ref):
    """llama2.c's train.py compiles by default: dynamo must not trace into the
    cffi calls (each Function is a graph break) and the results must not change.
    backend="eager" exercises dynamo without a C++ toolchain for inductor."""
    import torch._dynamo
    torch._dynamo.reset()
    ours, _ = _pair(torch, at, ref, GQA)
    twin = copy.deepcopy(ours)
    tok, tgt = _batch(torch, GQA)
    compiled = torch.compile(ours, backend="eager")
    compiled(tok, tgt)
    ours.last_loss.backward()
    twin(tok, tgt)
    twin.last_loss.backward()
    assert torch.equal(ours.last_loss, twin.last_loss)
    for p, q in zip(ours.parameters(), twin.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-9)
    torch._dynamo.reset()


def test_blas_threads_setting(torch, at):
    import anebackward
    before = anebackward.get_num_threads()
    if before == 0:
        pytest.skip("this BLAS does not report or take a thread count (Accelerate)")
    try:
        at.Transformer(**MHA)  # training takes the one-call path: the package owns the cores
        assert anebackward.get_num_threads() == before
        at.Transformer(**MHA, one_call=False)  # linear="torch": PyTorch owns the cores
        assert anebackward.get_num_threads() == 1
        at.Transformer(**MHA, blas_threads=2)
        assert anebackward.get_num_threads() == 2
        at.Transformer(**MHA, linear="anebackward")  # "auto" leaves it alone
        assert anebackward.get_num_threads() == 2
        at.Transformer(**MHA, blas_threads=None)
        assert anebackward.get_num_threads() == 2
    finally:
        anebackward.set_num_threads(before)


def test_reference_backend_through_torch(torch, at, ref, monkeypatch):
    """ANEBACKWARD_BACKEND=reference routes every kernel call of the model to
    the seed's scalar loops (math corrected); they agree with the fast ones
    (the per-op path: its Functions read the setting at each call)."""
    fast, _ = _pair(torch, at, ref, GQA, linear="anebackward", one_call=False)
    slow = copy.deepcopy(fast)
    tok, tgt = _batch(torch, GQA, B=1, S=9)
    fast(tok, tgt)
    fast.last_loss.backward()
    monkeypatch.setenv("ANEBACKWARD_BACKEND", "reference")
    slow(tok, tgt)
    slow.last_loss.backward()
    assert abs(fast.last_loss.item() - slow.last_loss.item()) < 1e-5
    for (name, p), q in zip(fast.named_parameters(), slow.parameters()):
        assert _rel(torch, q.grad, p.grad) < 2e-5, name
    monkeypatch.setenv("ANEBACKWARD_BACKEND", "gpu")
    with pytest.raises(ValueError, match="ANEBACKWARD_BACKEND"):
        slow(tok, tgt)


def test_llama2c_train_loop_flow(torch, at, tmp_path):
    """The calls llama2.c's train.py makes, in its order: ModelArgs(**dict),
    Transformer(args), configure_optimizers, GradScaler (disabled on CPU),
    gradient accumulation, clipping, estimate_mfu, checkpoint save/resume."""
    model_args = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=41,
                      multiple_of=16, max_seq_len=16, dropout=0.0)
    model = at.Transformer(at.ModelArgs(**model_args))
    optimizer = model.configure_optimizers(0.1, 5e-3, (0.9, 0.95), "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(3)
    X = torch.randint(0, 41, (4, 16), generator=g)
    Y = torch.roll(X, -1, dims=1)
    first = None
    for it in range(6):
        for micro in range(2):
            logits = model(X[2 * micro:2 * micro + 2], Y[2 * micro:2 * micro + 2])
            loss = model.last_loss / 2
            scaler.scale(loss).backward()
        assert logits.shape == (2, 16, 41)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        first = first if first is not None else loss.item() * 2
    assert loss.item() * 2 < first
    assert 0 < model.estimate_mfu(4, 0.5) < 1
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_args": model_args,
                "optimizer": optimizer.state_dict()}, ckpt)
    c = torch.load(ckpt)
    resumed = at.Transformer(at.ModelArgs(**c["model_args"]))
    resumed.load_state_dict(c["model"])
    model.eval()
    resumed.eval()
    with torch.no_grad():
        assert torch.equal(model(X), resumed(X))
        model(X, Y)
        resumed(X, Y)
    assert torch.equal(model.last_loss, resumed.last_loss)


# ------------------------------------------------------- the one-call path
def _one_call_taken(loss):
    return type(loss.grad_fn).__name__ == "ModelFunctionBackward"


@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["MHA", "GQA"])
def test_one_call_path_matches_pytorch_llama(torch, at, ref, cfg):
    """return_logits=False in training: one C call forward and backward, loss
    and every gradient against float64 autograd of the plain-PyTorch Llama;
    the parameters are views of the C model's flat buffer."""
    ours, theirs = _pair(torch, at, ref, cfg, return_logits=False)
    theirs = theirs.double()
    flat = ours._slot.engine.flat_params
    lo, hi = flat.ctypes.data, flat.ctypes.data + flat.nbytes
    assert all(lo <= p.data_ptr() < hi for p in ours.parameters())  # zero-copy views
    tok, tgt = _batch(torch, cfg)
    assert ours(tok, tgt) is None
    assert _one_call_taken(ours.last_loss)
    (ours.last_loss * 0.5).backward()  # dloss != 1 reaches grad_scale
    theirs(tok, tgt)
    (theirs.last_loss * 0.5).backward()
    assert abs(ours.last_loss.item() - theirs.last_loss.item()) < 1e-5
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        err = _rel(torch, p.grad, q.grad)
        assert err < 2e-5, f"{name}: relative gradient error {err:.2e}"


def test_one_call_training_matches_per_op(torch, at, ref):
    """Five AdamW steps with gradient accumulation over two micro-batches:
    the one-call path and the per-op path give the same losses and weights
    (the optimizer updates the flat buffer in place, the C model reads it)."""
    runs = []
    for one_call in (True, False):
        m, _ = _pair(torch, at, ref, GQA, return_logits=False, one_call=one_call)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
        losses = []
        for step in range(5):
            for micro in range(2):
                tok, tgt = _batch(torch, GQA, seed=10 * step + micro)
                m(tok, tgt)
                if one_call:
                    assert _one_call_taken(m.last_loss)
                (m.last_loss / 2).backward()
                losses.append(m.last_loss.item())
            opt.step()
            opt.zero_grad(set_to_none=step % 2 == 0)
        runs.append((losses, [p.detach().clone() for p in m.parameters()]))
    (la, pa), (lb, pb) = runs
    assert la == pytest.approx(lb, rel=1e-5)
    for p, q in zip(pa, pb):
        assert _rel(torch, p, q) < 1e-4


def test_one_call_chosen_per_call(torch, at, ref):
    """What the one-call path cannot do runs per-op: inference without
    targets, parameters moved out of the buffer; one_call=True says so.
    Logits wanted (return_logits=True) stay on the one-call path."""
    m, _ = _pair(torch, at, ref, MHA, return_logits=False)
    tok, tgt = _batch(torch, MHA)
    with torch.no_grad():                       # eval loss: one forward call, no graph
        m(tok, tgt)
        assert m.last_loss.grad_fn is None
        evl = m.last_loss.item()
    m(tok, tgt)
    assert _one_call_taken(m.last_loss) and abs(m.last_loss.item() - evl) < 1e-6
    assert m(tok).shape == (2, 1, MHA["vocab_size"])  # inference: last position's logits
    m.return_logits = True
    assert m(tok, tgt).shape == (2, 17, MHA["vocab_size"])
    assert _one_call_taken(m.last_loss)
    m.return_logits = False
    sd = copy.deepcopy(m.state_dict())
    m.load_state_dict(sd)                       # copies in place: still the flat buffer
    m(tok, tgt)
    assert _one_call_taken(m.last_loss)
    m.double()                                   # float64: refused, the kernels are float32
    with pytest.raises(TypeError, match="float32"):
        m(tok, tgt)
    m.float()                                    # parameters re-allocated: per-op
    m(tok, tgt)
    assert not _one_call_taken(m.last_loss)
    m.last_loss = None                           # a non-leaf tensor cannot be deep-copied
    twin = copy.deepcopy(m)                      # a copy binds its own buffer on first use
    twin(tok, tgt)
    assert _one_call_taken(twin.last_loss)
    assert twin._slot.engine is not m._slot.engine
    m.one_call = True
    with pytest.raises(ValueError, match="one_call=True"):
        m(tok, tgt)
    with pytest.raises(ValueError, match="one_call"):
        at.Transformer(**MHA, one_call="yes")
