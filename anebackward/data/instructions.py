"""Instruction data: JSONL files of {"prompt": str, "completion": str} lines,
tokenized into documents whose loss counts the completion only, and batched
into the varlen form the C model runs (anebackward.batch.Batch).

A document is BOS + prompt tokens + completion tokens + EOS (BOS and EOS as
the tokenizer's encode() adds them). Token t predicts token t+1 of its own
document; the target is -1 (not counted) where t+1 is a prompt token and at
the document's last token, so the loss is over the completion (and its EOS)
only. A document longer than seq_len tokens is truncated to seq_len (the
count is reported by the reader so the caller can say so once).

Step i's batch depends only on (seed, i): documents are drawn with a
generator seeded by (seed, i), so a resumed run sees the same batches.
"""
from __future__ import annotations

import json
from typing import List, Tuple

import numpy as np

from ..batch import Batch, varlen


class InstructionDataError(ValueError):
    """A JSONL instruction file that cannot be read (names file and line)."""


def read_jsonl(path) -> List[Tuple[str, str]]:
    """[(prompt, completion)] from a JSONL file; a clear error naming the
    file and line for anything that is not an object with string "prompt"
    and "completion"."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InstructionDataError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line "
                                           f'must be {{"prompt": "...", "completion": "..."}}') from None
            if not isinstance(obj, dict):
                raise InstructionDataError(f"{path}:{lineno}: expected a JSON object with "
                                           f'"prompt" and "completion", got {type(obj).__name__}')
            for key in ("prompt", "completion"):
                if not isinstance(obj.get(key), str):
                    raise InstructionDataError(f'{path}:{lineno}: "{key}" must be a string '
                                               f"(got {type(obj.get(key)).__name__})")
            if not obj["completion"]:
                raise InstructionDataError(f'{path}:{lineno}: "completion" is empty: nothing to learn')
            pairs.append((obj["prompt"], obj["completion"]))
    if not pairs:
        raise InstructionDataError(f"{path}: no instruction lines (empty file); each line must be "
                                   f'{{"prompt": "...", "completion": "..."}}')
    return pairs


def tokenize(pairs, tokenizer, seq_len):
    """(docs, n_truncated): docs a list of (tokens int32, targets int32),
    targets -1 on the prompt and at the last token."""
    docs, n_trunc = [], 0
    for prompt, completion in pairs:
        p = list(tokenizer.encode(prompt, bos=True, eos=False))
        c = list(tokenizer.encode(completion, bos=False, eos=True))
        tok = np.asarray(p + c, dtype=np.int32)
        tgt = np.full(tok.size, -1, dtype=np.int32)
        tgt[max(len(p) - 1, 0):-1] = tok[max(len(p), 1):]
        if tok.size > seq_len:
            tok, tgt = tok[:seq_len].copy(), tgt[:seq_len].copy()
            tgt[-1] = -1
            n_trunc += 1
        docs.append((tok, tgt))
    return docs, n_trunc


def _pick(n_docs, step, batch_size, seed):
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n_docs, size=batch_size)


def padded_batch(docs, step, batch_size, seed=0) -> Batch:
    """batch_size documents for step `step`, one segment each (padding is
    never given to the C model)."""
    idx = _pick(len(docs), step, batch_size, seed)
    toks = [docs[i][0] for i in idx]
    tgts = [docs[i][1] for i in idx]
    cu = np.concatenate([[0], np.cumsum([t.size for t in toks])]).astype(np.int64)
    return varlen(np.concatenate(toks), cu, targets=np.concatenate(tgts), fn="padded_batch")


def packed_batch(docs, step, batch_size, seq_len, seed=0) -> Batch:
    """Documents drawn for step `step` concatenated into batch_size rows of
    at most seq_len tokens; each document its own segment (positions restart,
    attention stays inside it)."""
    rng = np.random.default_rng([seed, step])
    toks, tgts, lens, rows_used, room = [], [], [], 1, seq_len
    while True:
        tok, tgt = docs[int(rng.integers(0, len(docs)))]
        if tok.size > room:
            if rows_used == batch_size:
                break
            rows_used, room = rows_used + 1, seq_len
        toks.append(tok); tgts.append(tgt); lens.append(tok.size); room -= tok.size
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return varlen(np.concatenate(toks), cu, targets=np.concatenate(tgts), fn="packed_batch")


class InstructionData:
    """A JSONL instruction file ready for training: documents tokenized with
    `tokenizer`, every 20th document (index % 20 == 19) held out for
    validation when there are at least 20, so the split is deterministic.
    batch(step, B, S, seed) is a Batch for step `step` (packed rows when
    pack=True, else one segment per document)."""

    def __init__(self, path, tokenizer, seq_len, pack=False):
        docs, self.n_truncated = tokenize(read_jsonl(path), tokenizer, seq_len)
        held = [i for i in range(len(docs)) if len(docs) >= 20 and i % 20 == 19]
        self.val = [docs[i] for i in held]
        held_set = set(held)
        self.train = [d for i, d in enumerate(docs) if i not in held_set]
        self.pack, self.seq_len, self.path = pack, seq_len, path

    def max_token(self):
        return int(max(int(t.max()) for t, _ in self.train + self.val))

    def batch(self, step, batch_size, seq_len, seed=0, split="train") -> Batch:
        docs = self.train if split == "train" or not self.val else self.val
        if self.pack:
            return packed_batch(docs, step, batch_size, seq_len, seed)
        return padded_batch(docs, step, batch_size, seed)
