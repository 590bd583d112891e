"""Instruction data: JSONL files of {"prompt": str, "completion": str} lines,
tokenized into documents whose loss counts the completion only, and batched
into the varlen form the C model runs (anebackward.batch.Batch).

A document is prompt + completion encoded as ONE text (with the tokenizer's
BOS, and its EOS appended), so it is tokenized as the model will read it at
inference: no separator is added (put the one you want, such as "\\n" or
" ", at the end of the prompt). The prompt's tokens are the longest common
prefix of that encoding and the prompt's own encoding; every later token is
a completion token. So the llama2.c tokenizer's dummy-prefix space is added
once, before the prompt, never again before the completion; and a token that
a merge forms across the boundary (prompt end + completion start) counts as
completion. Token t predicts token t+1 of its own document; the target is -1
(not counted) where t+1 is a prompt token and at the document's last token:
the loss is over the completion tokens and the EOS.

A document longer than seq_len tokens is dropped, never truncated (a cut
document would teach a completion without its end, or have none left); the
reader counts them so the caller says so, and refuses a file where none fits.

Every 20th document of the file (line order, index % 20 == 19) is held out
for validation when the file has at least 20, so the split does not depend
on seq_len or on the seed.

The micro-batch of key k (the trainer's step * grad_accum + micro-step)
depends only on (seed, k): documents are drawn with a generator seeded by
(seed, k), so a resumed run sees the same batches. With world > 1 ranks the
draw is the one a single process with batch_size * world would make, split
into world parts (rank r: documents, or packed rows, [r*B, (r+1)*B)).
"""
from __future__ import annotations

import json
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..batch import Batch, varlen

HOLD_OUT = 20   # every HOLD_OUT-th document is a validation one


class InstructionDataError(ValueError):
    """A JSONL instruction file that cannot be read (names file and line)."""


def read_jsonl(path) -> List[Tuple[str, str]]:
    """[(prompt, completion)] from a JSONL file; a clear error naming the
    file and line for anything that is not an object with string "prompt"
    and "completion"."""
    return [(p, c) for p, c, _ in _read(path)]


def _read(path):
    """[(prompt, completion, "file:line")]."""
    from ..atomicfile import open_regular
    rows = []
    try:
        f = open_regular(path, "instruction file")    # a FIFO or a device is refused
    except OSError as e:
        raise InstructionDataError(f"{path}: cannot read it: {e.strerror or e}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InstructionDataError(f"{path}:{lineno}: not UTF-8 text ({e.reason})") \
                    from None
            if line.strip():
                rows.append(_parse(path, lineno, line))
    if not rows:
        raise InstructionDataError(f"{path}: no instruction lines (empty file); each line must be "
                                   f'{{"prompt": "...", "completion": "..."}}')
    return rows


def _parse(path, lineno, line):
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
    return obj["prompt"], obj["completion"], f"{path}:{lineno}"


def encode_pair(tokenizer, prompt: str, completion: str) -> Tuple[np.ndarray, int]:
    """(tokens int32, n_prompt): prompt + completion encoded as one text with
    BOS and EOS; the first n_prompt tokens are the prompt's (the longest
    common prefix with the prompt's own encoding, module docstring)."""
    full = list(tokenizer.encode(prompt + completion, bos=True, eos=True))
    alone = list(tokenizer.encode(prompt, bos=True, eos=False))
    k = 0
    while k < min(len(full), len(alone)) and full[k] == alone[k]:
        k += 1
    return np.asarray(full, dtype=np.int32), k


def tokenize(pairs, tokenizer, seq_len, where: Optional[Sequence[str]] = None):
    """(docs, lengths): docs[i] the (tokens int32, targets int32) of pair i,
    targets -1 on the prompt and at the last token, or None when it has more
    than seq_len tokens (dropped); lengths[i] its token count. where[i]
    names pair i ("file:line") in errors."""
    docs, lengths = [], []
    for i, (prompt, completion) in enumerate(pairs):
        tok, k = encode_pair(tokenizer, prompt, completion)
        tgt = np.full(tok.size, -1, dtype=np.int32)
        tgt[max(k - 1, 0):-1] = tok[max(k, 1):]
        if not (tgt >= 0).any():
            name = where[i] if where is not None else f"document {i}"
            raise InstructionDataError(
                f"{name}: no completion token can be predicted: the document encodes to "
                f"{tok.size} token(s) with none before the completion's first (no BOS, and the "
                "prompt is empty or merged into the completion); give a prompt that ends in a "
                "space or a newline")
        docs.append((tok, tgt) if tok.size <= seq_len else None)
        lengths.append(int(tok.size))
    return docs, lengths


def _concat(docs, fn):
    cu = np.concatenate([[0], np.cumsum([d[0].size for d in docs])]).astype(np.int64)
    return varlen(np.concatenate([d[0] for d in docs]), cu,
                  targets=np.concatenate([d[1] for d in docs]), fn=fn)


def _stream(n_docs, key, seed):
    """The documents of key `key`: indices drawn one at a time (with
    replacement) by the (seed, key) generator. Padded batches take the first
    ones, packed rows as many as fit, so both see the same documents first."""
    rng = np.random.default_rng([seed, key])
    while True:
        yield int(rng.integers(0, n_docs))


def _pack_rows(docs, key, n_rows, seq_len, seed):
    """n_rows lists of document indices: the documents of _stream fill each
    row in turn until the next one does not fit; the one that does not fit
    in the last row is left out."""
    rows, room = [[]], seq_len
    for i in _stream(len(docs), key, seed):
        n = docs[i][0].size
        if n > seq_len:
            raise ValueError(f"draw: a document of {n} tokens does not fit a row of {seq_len}")
        if n > room:
            if len(rows) == n_rows:
                return rows
            rows.append([])
            room = seq_len
        rows[-1].append(i)
        room -= n
    raise AssertionError("unreachable: _stream never ends")


def draw(docs, key, batch_size, seq_len, seed=0, world=1, pack=False) -> List[Batch]:
    """The micro-batch of key `key` for each of `world` ranks: padded
    (pack=False), batch_size documents each, one segment per document (the
    padding is never given to the C model); packed, batch_size rows of at
    most seq_len tokens each, every document its own segment (positions
    restart, attention stays inside it). Rank r's part is [r*B, (r+1)*B) of
    the batch_size * world documents (or rows) of _stream(seed, key)."""
    if pack:
        rows = _pack_rows(docs, key, batch_size * world, seq_len, seed)
        parts = [[i for row in rows[r * batch_size:(r + 1) * batch_size] for i in row]
                 for r in range(world)]
    else:
        stream = _stream(len(docs), key, seed)
        idx = [next(stream) for _ in range(batch_size * world)]
        parts = [idx[r * batch_size:(r + 1) * batch_size] for r in range(world)]
    return [_concat([docs[i] for i in p], "draw") for p in parts]


def _counted(docs):
    return int(sum(int((d[1] >= 0).sum()) for d in docs))


class InstructionData:
    """A JSONL instruction file ready for training (module docstring):
    documents tokenized with `tokenizer`, those longer than seq_len dropped
    (n_dropped of n_docs; longest: the most tokens of any), every 20th held
    out for validation when there are at least 20. batch(step, B, seed) is
    the Batch of key `step` (packed rows of seq_len tokens when pack=True,
    else one segment per document)."""

    def __init__(self, path, tokenizer, seq_len, pack=False):
        rows = _read(path)
        docs, lengths = tokenize([(p, c) for p, c, _ in rows], tokenizer, seq_len,
                                 [w for _, _, w in rows])
        self.n_docs = len(docs)
        self.n_dropped = sum(d is None for d in docs)
        self.longest = max(lengths)
        held = len(docs) >= HOLD_OUT
        is_val = [held and i % HOLD_OUT == HOLD_OUT - 1 for i in range(len(docs))]
        self.val = [d for d, v in zip(docs, is_val) if d is not None and v]
        self.train = [d for d, v in zip(docs, is_val) if d is not None and not v]
        if not self.train:
            raise InstructionDataError(
                f"{path}: no training document fits seq_len = {seq_len} tokens (the shortest "
                f"has {min(n for n, v in zip(lengths, is_val) if not v)}); pass a larger "
                "--seq-len")
        self.pack, self.seq_len, self.path = pack, seq_len, path
        self.description = (f"instruction file {path} ({len(self.train)} training, "
                            f"{len(self.val)} validation documents, "
                            + ("packed" if pack else "one per sequence") + ")")

    @property
    def n_train_tokens(self):
        return int(sum(t.size for t, _ in self.train))

    @property
    def n_train_counted(self):
        return _counted(self.train)

    def max_token(self):
        return int(max(int(t.max()) for t, _ in self.train + self.val))

    def find_token(self, limit):
        """(where, id) of the first token id >= limit, or None."""
        for t, _ in self.train + self.val:
            big = np.flatnonzero(t >= limit)
            if big.size:
                return str(self.path), int(t[big[0]])
        return None

    def batch(self, step, batch_size, seed=0, split="train", rank=0, world=1) -> Batch:
        """Rank's part of the micro-batch of key `step` (module docstring)."""
        return self.draw(step, batch_size, seed, split, world)[rank]

    def draw(self, step, batch_size, seed=0, split="train", world=1) -> List[Batch]:
        """The micro-batch of key `step` for every rank (a single process:
        one), so each rank knows the counted tokens of all of them."""
        docs = self.train if split == "train" or not self.val else self.val
        return draw(docs, step, batch_size, self.seq_len, seed, world, self.pack)

    def eval_batches(self, batch_size, n_batches, rank=0, world=1):
        """(batches, n_counted): the validation documents of this rank, in
        batches of at most batch_size documents (one segment each), and the
        counted tokens of all ranks'. The validation set is the first
        n_batches * batch_size * world held-out documents (all of them when
        fewer), document j on rank j % world."""
        docs = self.val[:n_batches * batch_size * world]
        mine = docs[rank::world]
        batches = [_concat(mine[i:i + batch_size], "InstructionData.eval_batches")
                   for i in range(0, len(mine), batch_size)]
        return batches, _counted(docs)
