"""anebackward.transformers' one-call path over real fine-tuning batches:
right- and left-padded (attention_mask zeros), packed (position_ids
restarting inside a row, as HF's DataCollatorWithFlattening makes them) and
prompt-masked (labels -100) — loss and every gradient within 1e-5 of
unpatched HF, Llama (GQA, Llama-3 rope scaling; MHA tied) and Qwen3."""
import copy

import pytest

from test_transformers import assert_same, build, calls, step  # noqa: F401 (calls: a fixture)

pytestmark = pytest.mark.usefixtures("keep_blas_threads")

MODELS = [("llama", dict(tied=False, llama3=True)),     # GQA 3, untied, Llama-3 rope
          ("llama", dict(tied=True, heads=(4, 4))),      # MHA, tied
          ("llama", dict(heads=(8, 2))),                 # GQA 4
          ("qwen3", dict(tied=True)),                    # GQA, QK-norm, head_dim 16
          ("qwen3", dict(tied=False))]
IDS = ["llama-gqa3-llama3", "llama-mha-tied", "llama-gqa4", "qwen3-tied", "qwen3-untied"]


def _padded(torch, lengths, S, side, V=97, seed=3, prompt=2):
    """Rows of the given lengths padded to S on `side`; labels -100 on the
    padding and on each row's first `prompt` tokens (the prompt)."""
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    ids = torch.zeros(B, S, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    labels = torch.full((B, S), -100, dtype=torch.long)
    for i, n in enumerate(lengths):
        sl = slice(0, n) if side == "right" else slice(S - n, S)
        ids[i, sl] = torch.randint(1, V, (n,), generator=gen)
        mask[i, sl] = 1
        labels[i, sl] = ids[i, sl]
        start = sl.start
        labels[i, start:start + prompt] = -100
    return ids, mask, labels


def _packed(torch, docs_per_row, V=97, seed=4):
    """Rows of documents packed end to end, position_ids restarting at each
    document, labels -100 at each document's first token (as
    DataCollatorWithFlattening) and on a prompt of 2 more."""
    gen = torch.Generator().manual_seed(seed)
    rows_ids, rows_pos, rows_lab = [], [], []
    for docs in docs_per_row:
        ids = torch.randint(1, V, (sum(docs),), generator=gen)
        pos = torch.cat([torch.arange(n) for n in docs])
        lab = ids.clone()
        lab[pos < 3] = -100
        rows_ids.append(ids), rows_pos.append(pos), rows_lab.append(lab)
    return torch.stack(rows_ids), torch.stack(rows_pos), torch.stack(rows_lab)


def _compare(hf, abt, calls, kind, kw, inputs, one_call=True):
    calls.clear()
    ref = build(hf, kind, **kw)
    pat = abt.apply(copy.deepcopy(ref))
    assert_same(*step(ref, **inputs), *step(pat, **inputs))
    assert (calls.get("one_call", 0) == 1) == one_call, calls
    return ref, pat


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind,kw", MODELS, ids=IDS)
def test_padded_batch_one_call_matches_hf(hf, abt, calls, kind, kw, side):
    import torch
    ids, mask, labels = _padded(torch, (13, 7, 1, 10), 13, side)
    _compare(hf, abt, calls, kind, kw, dict(input_ids=ids, attention_mask=mask, labels=labels))


@pytest.mark.parametrize("kind,kw", MODELS, ids=IDS)
def test_packed_batch_one_call_matches_hf(hf, abt, calls, kind, kw):
    """use_cache=False: HF's masks keep each packed document apart."""
    import torch
    ids, pos, labels = _packed(torch, [(5, 1, 9, 3), (11, 7)])
    _compare(hf, abt, calls, kind, kw,
             dict(input_ids=ids, position_ids=pos, labels=labels, use_cache=False))


@pytest.mark.parametrize("kind,kw", [MODELS[0], MODELS[4]], ids=[IDS[0], IDS[4]])
def test_packed_rows_follow_hf_use_cache_rule(hf, abt, calls, kind, kw):
    """With the config's use_cache=True HF makes a cache object in training
    too, and its sdpa/eager masks then do not split packed rows (positions
    restart, attention crosses documents); gradient checkpointing turns
    use_cache off. Each way the same loss and gradients as HF."""
    import torch
    ids, pos, labels = _packed(torch, [(5, 1, 9, 3), (11, 7)])
    inputs = dict(input_ids=ids, position_ids=pos, labels=labels)
    ref, pat = _compare(hf, abt, calls, kind, kw, inputs)
    split = _compare(hf, abt, calls, kind, kw, dict(inputs, use_cache=False))[1]
    assert step(pat, **inputs)[0].loss != step(split, **dict(inputs, use_cache=False))[0].loss


@pytest.mark.parametrize("kind,kw", [MODELS[0], MODELS[3]], ids=[IDS[0], IDS[3]])
def test_left_padding_with_generate_style_positions(hf, abt, calls, kind, kw):
    """position_ids = cumsum(mask) - 1 (what generate passes): the real
    tokens at 0.. whatever the padding."""
    import torch
    ids, mask, labels = _padded(torch, (9, 4, 12), 12, "left")
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    _compare(hf, abt, calls, kind, kw,
             dict(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels))


def test_packed_rows_with_cross_document_labels(hf, abt, calls):
    """Labels not -100 at document starts: HF then counts the prediction of a
    document's first token from the previous document's last; so do we."""
    import torch
    ids, pos, _ = _packed(torch, [(6, 6, 4)])
    _compare(hf, abt, calls, "llama", MODELS[0][1],
             dict(input_ids=ids, position_ids=pos, labels=ids.clone(), use_cache=False))


def test_all_ones_mask_with_restarting_positions_is_one_segment_as_hf(hf, abt, calls):
    """With an attention_mask HF does not split packed rows (only positions
    restart): the same here."""
    import torch
    ids, pos, labels = _packed(torch, [(5, 8)])
    _compare(hf, abt, calls, "qwen3", MODELS[3][1],
             dict(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids),
                  labels=labels))


def test_padded_batch_with_num_items_in_batch(hf, abt, calls):
    import torch
    ids, mask, labels = _padded(torch, (8, 3, 11), 11, "right")
    n = torch.tensor(41)
    _compare(hf, abt, calls, "llama", MODELS[0][1],
             dict(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n))


def test_counted_label_on_padding_takes_hf_path(hf, abt, calls):
    """A label counted at a position whose logits come from padding (labels
    not masked with the padding): the C model does not run padding, so the
    call takes the per-op path — still HF's loss."""
    import torch
    ids, mask, labels = _padded(torch, (8, 5), 8, "right")
    labels[1, 7] = 3   # predicted from position 6, which is padding
    _compare(hf, abt, calls, "llama", MODELS[0][1],
             dict(input_ids=ids, attention_mask=mask, labels=labels), one_call=False)


def test_successive_batches_of_different_layouts(hf, abt, calls):
    """One patched model through padded, packed and full-row batches in
    turn: each step matches HF (the engine's workspace follows the layout)."""
    import torch
    ref = build(hf, "qwen3", tied=False)
    pat = abt.apply(copy.deepcopy(ref))
    ids, mask, labels = _padded(torch, (13, 7, 1, 10), 13, "right")
    pk_ids, pk_pos, pk_lab = _packed(torch, [(5, 1, 9, 3), (11, 7)])
    full = torch.randint(0, 97, (2, 16))
    for inputs in (dict(input_ids=ids, attention_mask=mask, labels=labels),
                   dict(input_ids=pk_ids, position_ids=pk_pos, labels=pk_lab, use_cache=False),
                   dict(input_ids=full, labels=full),
                   dict(input_ids=ids[:2, :9], attention_mask=mask[:2, :9], labels=labels[:2, :9])):
        assert_same(*step(ref, **inputs), *step(pat, **inputs))
    assert calls == {"one_call": 4}


def test_flattened_row_longer_than_max_positions(hf, abt, calls):
    """DataCollatorWithFlattening's one long row: only each document must fit
    max_position_embeddings, as in HF."""
    import torch
    ids, pos, labels = _packed(torch, [(12, 16, 9, 14)])
    _compare(hf, abt, calls, "qwen3", dict(MODELS[4][1], max_position_embeddings=16),
             dict(input_ids=ids, position_ids=pos, labels=labels, use_cache=False))


def _trainer_curve(hf, abt, tmp_path, patched, collate, steps=10, use_cache=True):
    """HF Trainer (gradient accumulation 2: num_items_in_batch in play) on
    documents of 3..14 tokens with a prompt masked, batched by `collate`."""
    import torch

    from conftest import import_hf_test
    import_hf_test("accelerate")  # HF Trainer's own requirement
    model = build(hf, "llama", llama3=True, seed=3)
    model.config.use_cache = use_cache
    if patched:
        abt.apply(model)
    gen = torch.Generator().manual_seed(7)
    rows = []
    for _ in range(steps * 4):
        n = int(torch.randint(3, 15, (1,), generator=gen))
        ids = torch.randint(1, 97, (n,), generator=gen)
        labels = ids.clone()
        labels[: int(torch.randint(0, 3, (1,), generator=gen))] = -100
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    args = hf.TrainingArguments(output_dir=str(tmp_path / ("p" if patched else "u")), use_cpu=True,
                                per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                max_steps=steps, learning_rate=3e-3, logging_steps=1,
                                report_to=[], save_strategy="no", seed=11, data_seed=11,
                                dataloader_num_workers=0, disable_tqdm=True,
                                remove_unused_columns=False)
    trainer = hf.Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _pad_right(features):
    import torch
    S = max(len(f["input_ids"]) for f in features)
    out = {k: torch.full((len(features), S), v, dtype=torch.long)
           for k, v in (("input_ids", 0), ("attention_mask", 0), ("labels", -100))}
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        out["input_ids"][i, :n] = torch.tensor(f["input_ids"])
        out["attention_mask"][i, :n] = 1
        out["labels"][i, :n] = torch.tensor(f["labels"])
    return out


@pytest.mark.parametrize("layout", ["padded", "flattened"])
def test_trainer_loss_curve_on_padded_and_flattened_batches(hf, abt, calls, tmp_path, layout):
    """Trainer with a right-padding collator, and with HF's
    DataCollatorWithFlattening (use_cache off, as packed training sets it):
    the patched model's loss curve is HF's, every micro-batch one C call."""
    collate = _pad_right if layout == "padded" else hf.DataCollatorWithFlattening()
    kw = dict(use_cache=layout == "padded")
    ref = _trainer_curve(hf, abt, tmp_path, False, collate, **kw)
    calls.clear()
    pat = _trainer_curve(hf, abt, tmp_path, True, collate, **kw)
    assert len(ref) == 10 and len(pat) == 10
    assert calls == {"one_call": 20}
    for i, (a, b) in enumerate(zip(pat, ref)):
        assert abs(a - b) <= 1e-4 * abs(b), (i, a, b)
