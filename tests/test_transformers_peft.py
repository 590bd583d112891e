"""anebackward.transformers under peft: a patched HF model wrapped by peft's
plain LoRA keeps the one-call path (the C model with adapters, the base
frozen), with loss and adapter gradients equal to unpatched HF + peft, also
after optimizer steps; everything else peft does runs HF's path, with the
same result as unpatched HF + peft."""
import copy

import pytest

from conftest import import_hf_test
from test_transformers import assert_same, batch, build, rel, step

pytestmark = pytest.mark.usefixtures("keep_blas_threads")  # apply() sets the package's threads

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def peft(hf):
    return import_hf_test("peft")


@pytest.fixture
def one_calls(abt, monkeypatch):
    """How many calls ran as the one-call path."""
    from anebackward.transformers import _layers
    n = [0]
    inner = _layers._one_call

    def counted(*a, **k):
        res = inner(*a, **k)
        n[0] += res is not None
        return res
    monkeypatch.setattr(_layers, "_one_call", counted)
    return n


def lora(peft, targets=ALL7, **kw):
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 12)
    # B random too (peft's default is zero): every adapter gradient is then nonzero
    kw.setdefault("init_lora_weights", False)
    return peft.LoraConfig(target_modules=list(targets), lora_dropout=kw.pop("lora_dropout", 0.0),
                           **kw)


def pair(hf, peft, abt, kind, cfg, apply_first=True, **build_kw):
    """(unpatched HF + peft in float64, patched HF + peft) with equal
    weights; the patch applied before peft wraps the model (apply_first)
    or after."""
    import torch
    base = build(hf, kind, **build_kw)
    torch.manual_seed(7)
    ref = peft.get_peft_model(copy.deepcopy(base), cfg)
    if apply_first:
        torch.manual_seed(7)
        pat = peft.get_peft_model(abt.apply(copy.deepcopy(base)), cfg)
    else:
        pat = abt.apply(copy.deepcopy(ref))
    for (n, a), (m, b) in zip(ref.named_parameters(), pat.named_parameters()):
        assert n == m and torch.equal(a, b)
    return ref.double(), pat   # the oracle: HF + peft in float64


def engine_of(pat):
    return pat.get_base_model()._anebackward_slot.engine


def train(ref, pat, ids, labels, steps, **kw):
    """steps AdamW steps on both models: the losses alike (and changing);
    then, at equal weights (the patched model's adapters copied into the
    reference: AdamW amplifies float32 rounding of tiny gradient entries,
    so the two trajectories' weights drift apart by more than 1e-5 in
    relative terms even between two float32 runs of HF + peft itself), the
    loss and adapter gradients as HF + peft's."""
    import torch
    losses = []
    for model in (ref, pat):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses.append([])
        for _ in range(steps):
            out, g = step(model, input_ids=ids, labels=labels, **kw)
            losses[-1].append(out.loss.detach())
            opt.step()
    assert all(rel(a, b) < 1e-5 for a, b in zip(*losses)), losses
    trained = {n: p for n, p in pat.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if p.requires_grad:
                assert not torch.equal(p, trained[n].detach())   # the steps changed them
                p.copy_(trained[n])
    r, rg = step(ref, input_ids=ids, labels=labels, **kw)
    p, pg = step(pat, input_ids=ids, labels=labels, **kw)
    assert rel(r.loss.detach(), losses[0][0]) > 1e-3      # the steps changed the loss
    assert_same(r, rg, p, pg)
    return pg


LORA_CASES = [("llama", dict(llama3=True), ALL7, False),         # GQA, all seven projections
              ("llama", dict(tied=True), ["q_proj", "v_proj", "down_proj"], True),   # rsLoRA
              ("qwen3", dict(), ALL7, True),
              ("qwen3", dict(tied=True), ["k_proj", "o_proj", "gate_proj", "up_proj"], False)]


@pytest.mark.parametrize("kind,kw,targets,rslora", LORA_CASES,
                         ids=["llama-gqa-all7", "llama-tied-qvdown-rslora", "qwen3-all7-rslora",
                              "qwen3-tied-kogateup"])
def test_peft_lora_takes_one_call_and_matches_hf_peft(hf, peft, abt, one_calls, kind, kw, targets,
                                                      rslora):
    """Loss and adapter gradients as unpatched HF + peft, on the one-call
    path, also after optimizer steps (the adapters view the engine's buffer:
    torch's AdamW updates what the C model reads)."""
    import torch
    ref, pat = pair(hf, peft, abt, kind, lora(peft, targets, use_rslora=rslora), **kw)
    ids, labels = batch(torch)
    pg = train(ref, pat, ids, labels, 3)
    assert one_calls[0] == 4
    assert all(".lora_" in n for n in pg) and len(pg) == 2 * len(targets) * 2
    eng = engine_of(pat)
    assert eng.lora is not None and eng.n_grads < eng.n_params   # the base is frozen in C
    lo, hi = eng.flat_params.ctypes.data, eng.flat_params.ctypes.data + eng.flat_params.nbytes
    assert all(lo <= q.data_ptr() < hi for q in pat.parameters())   # zero-copy views
    want = 12 / (4 ** 0.5 if rslora else 4)
    assert eng.lora.scale == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_patch_applied_to_a_peft_model_and_padded_batch(hf, peft, abt, one_calls, kind):
    """The patch applied to a peft model (get_peft_model, then apply) and a
    padded batch (left and right padding): the one-call path, as HF + peft."""
    import torch
    ref, pat = pair(hf, peft, abt, kind, lora(peft), apply_first=False)
    ids, labels = batch(torch)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, 8:] = 0
    labels = labels.masked_fill(mask == 0, -100)
    train(ref, pat, ids, labels, 2, attention_mask=mask)
    assert one_calls[0] == 3


def test_peft_on_a_model_that_trained_rebinds(hf, peft, abt, one_calls):
    """A patched model that took one-call steps, then wrapped by peft: the
    call binds again (now with adapters) and matches HF + peft."""
    import torch
    base = build(hf, "llama")
    pat_base = abt.apply(copy.deepcopy(base))
    ids, labels = batch(torch)
    for model in (base, pat_base):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        step(model, input_ids=ids, labels=labels)
        opt.step()
    assert one_calls[0] == 1
    first = pat_base._anebackward_slot.engine
    assert first.lora is None
    cfg = lora(peft)
    torch.manual_seed(3)
    ref = peft.get_peft_model(base, cfg)
    torch.manual_seed(3)
    pat = peft.get_peft_model(pat_base, cfg)
    train(ref, pat, ids, labels, 2)
    assert one_calls[0] == 4
    assert engine_of(pat) is not first and engine_of(pat).lora is not None


# ---- what the C model does not compute: HF's path, HF + peft's result ----------
def stepped_pair(hf, peft, abt, kind, one_calls):
    """HF + peft (LoRA on every projection) and the patched copy after one
    step on the one-call path, as HF + peft's: (ref, pat, ids, labels)."""
    import torch
    ref, pat = pair(hf, peft, abt, kind, lora(peft))
    ids, labels = batch(torch)
    same_step(ref, pat, ids, labels)
    assert one_calls[0] == 1
    return ref, pat, ids, labels


def same_step(ref, pat, ids, labels, seed=None):
    """One step on each (the same dropout draws with a seed): loss and
    gradients as HF + peft's."""
    import torch
    if seed is not None:
        torch.manual_seed(seed)
    r, rg = step(ref, input_ids=ids, labels=labels)
    if seed is not None:
        torch.manual_seed(seed)
    p, pg = step(pat, input_ids=ids, labels=labels)
    assert rg
    assert_same(r, rg, p, pg)


FALLBACKS = {
    "dora": lambda peft: lora(peft, use_dora=True),
    "lora-bias": lambda peft: lora(peft, lora_bias=True),
    "dropout": lambda peft: lora(peft, lora_dropout=0.25),
    "modules-to-save": lambda peft: lora(peft, ["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    "layers-to-transform": lambda peft: lora(peft, ["q_proj"], layers_to_transform=[1]),
    "rank-pattern": lambda peft: lora(peft, ["q_proj", "v_proj"], rank_pattern={"v_proj": 2}),
    "lm-head-target": lambda peft: lora(peft, ["q_proj", "lm_head"]),
    "embedding-target": lambda peft: lora(peft, ["v_proj", "embed_tokens"]),
    "ia3": lambda peft: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                       feedforward_modules=["down_proj"], init_ia3_weights=False),
    "loha": lambda peft: peft.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"],
                                         init_weights=False),
}


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("what", sorted(FALLBACKS))
def test_peft_beyond_plain_lora_takes_hf_path(hf, peft, abt, one_calls, what, kind):
    import torch
    ref, pat = pair(hf, peft, abt, kind, FALLBACKS[what](peft))
    ids, labels = batch(torch)
    same_step(ref, pat, ids, labels, seed=5)
    same_step(ref, pat, ids, labels, seed=6)
    assert one_calls[0] == 0


def test_several_adapters_take_hf_path(hf, peft, abt, one_calls):
    """A second adapter loaded (one active, then both active): HF's path."""
    import torch
    ref, pat, ids, labels = stepped_pair(hf, peft, abt, "llama", one_calls)
    for model in (ref, pat):
        torch.manual_seed(11)
        model.add_adapter("second", lora(peft, ["q_proj", "up_proj"], r=2))
    same_step(ref, pat, ids, labels)
    for model in (ref, pat):
        model.base_model.set_adapter(["default", "second"])
    same_step(ref, pat, ids, labels)
    assert one_calls[0] == 1


def test_disabled_adapter_takes_hf_path_then_one_call_again(hf, peft, abt, one_calls):
    import torch
    ref, pat, ids, labels = stepped_pair(hf, peft, abt, "qwen3", one_calls)
    with ref.disable_adapter(), pat.disable_adapter():
        r = ref(input_ids=ids, labels=labels)
        p = pat(input_ids=ids, labels=labels)
        assert rel(p.loss.detach(), r.loss.detach()) < 1e-5
        assert one_calls[0] == 1
    same_step(ref, pat, ids, labels)
    assert one_calls[0] == 2


def test_merged_adapter_takes_hf_path_then_one_call_again(hf, peft, abt, one_calls):
    """merge_adapter() writes into the base weights (the engine's buffer):
    HF's path while merged; unmerged, the one-call path again, as HF + peft."""
    import torch
    ref, pat, ids, labels = stepped_pair(hf, peft, abt, "llama", one_calls)
    for model in (ref, pat):
        model.merge_adapter()
    with torch.no_grad():
        r = ref(input_ids=ids, labels=labels)
        p = pat(input_ids=ids, labels=labels)
    assert rel(p.loss, r.loss) < 1e-5
    assert one_calls[0] == 1
    for model in (ref, pat):
        model.unmerge_adapter()
    same_step(ref, pat, ids, labels)
    assert one_calls[0] == 2


def test_changed_peft_state_after_binding_takes_hf_path(hf, peft, abt, one_calls):
    """Changed after binding without a new module (a new scale, a base
    weight unfrozen): HF's path; a replaced dropout module: the tree binds
    again, or is refused (p > 0) — each as HF + peft."""
    import torch
    ref, pat, ids, labels = stepped_pair(hf, peft, abt, "llama", one_calls)
    up = [m.base_model.model.model.layers[1].mlp.up_proj for m in (ref, pat)]
    for layer in up:
        layer.scaling["default"] = 0.5
    same_step(ref, pat, ids, labels)
    assert one_calls[0] == 1
    for layer in up:
        layer.scaling["default"] = 3.0            # peft's own: 12 / 4
    same_step(ref, pat, ids, labels)
    assert one_calls[0] == 2
    for model in (ref, pat):
        model.base_model.model.model.norm.weight.requires_grad_(True)
    same_step(ref, pat, ids, labels)
    assert one_calls[0] == 2
    q = [m.base_model.model.model.layers[0].self_attn.q_proj for m in (ref, pat)]
    for layer in q:
        layer.lora_dropout["default"] = torch.nn.Dropout(0.3)
    same_step(ref, pat, ids, labels, seed=2)
    assert one_calls[0] == 2
    for layer in q:
        layer.lora_dropout["default"] = torch.nn.Identity()
    same_step(ref, pat, ids, labels)     # bound again: the unfrozen norm trains in C too
    assert one_calls[0] == 3
    assert "norm.weight" in engine_of(pat).trainable


def test_adapter_trained_on_one_call_path_saves_and_loads_in_peft(hf, peft, abt, one_calls,
                                                                   tmp_path):
    """save_pretrained of the patched peft model (parameters viewing the
    engine's buffer) writes the trained adapters; peft loads them unchanged."""
    import torch
    _, pat = pair(hf, peft, abt, "qwen3", lora(peft))
    ids, labels = batch(torch)
    opt = torch.optim.AdamW([p for p in pat.parameters() if p.requires_grad], lr=1e-2)
    step(pat, input_ids=ids, labels=labels)
    opt.step()
    assert one_calls[0] == 1
    pat.save_pretrained(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(build(hf, "qwen3"), tmp_path / "adapter")
    want = {k: v for k, v in pat.state_dict().items() if ".lora_" in k}
    got = loaded.state_dict()
    assert len(want) == 2 * 7 * 2
    assert all(torch.equal(v, got[k]) for k, v in want.items())


@pytest.mark.parametrize("when", ["before-peft", "after-peft"])
def test_gradient_checkpointing_under_peft_matches_hf_peft(hf, peft, abt, when):
    """Gradient checkpointing enabled before or after peft wraps the model
    (peft then hooks the embedding to make its output require grad): the
    result of HF + peft, whichever path runs."""
    import torch
    base = build(hf, "llama")
    if when == "before-peft":
        base.gradient_checkpointing_enable()
    torch.manual_seed(7)
    ref = peft.get_peft_model(copy.deepcopy(base), lora(peft))
    torch.manual_seed(7)
    pat = peft.get_peft_model(abt.apply(copy.deepcopy(base)), lora(peft))
    if when == "after-peft":
        ref.gradient_checkpointing_enable()
        pat.gradient_checkpointing_enable()
    ids, labels = batch(torch)
    same_step(ref.double(), pat, ids, labels)


def test_peft_inference_mode_adapters_take_one_call_with_nothing_trainable(hf, peft, abt,
                                                                            one_calls):
    """peft's inference_mode (every parameter frozen, adapters too): the
    engine binds with no trainable tensor; the training-mode loss as HF +
    peft's, with no gradient to any parameter."""
    import torch
    ref, pat = pair(hf, peft, abt, "qwen3", lora(peft, inference_mode=True))
    assert not any(p.requires_grad for p in pat.parameters())
    ids, labels = batch(torch)
    r = ref(input_ids=ids, labels=labels)
    p = pat(input_ids=ids, labels=labels)
    assert one_calls[0] == 1 and engine_of(pat).n_grads == 0
    assert not p.loss.requires_grad
    assert rel(p.loss, r.loss) < 1e-5
