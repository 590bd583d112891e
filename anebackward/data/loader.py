"""Token streams for training: the default corpus, a text file, or llama2.c
pretokenized shards (flat little-endian uint16 token ids, one file per shard,
as llama2.c's tinystories.py pretokenize writes them; memory-mapped).

Batches are random windows of seq_len + 1 tokens (x = window[:-1],
y = window[1:]). The windows of step i come from a generator seeded with
(seed, i), so a resumed run sees exactly the batches of an uninterrupted one.
"""
import glob
import os
import stat

import numpy as np

MAX_TEXT_BYTES = 1 << 30    # a text --data is read whole; larger corpora go in token shards


class TokenData:
    """Train and validation token streams (lists of 1-D integer arrays)."""

    def __init__(self, train, val, description):
        self.train = [s for s in train if len(s) > 1]
        self.val = [s for s in val if len(s) > 1]
        self.description = description
        if not self.train:
            raise ValueError(f"{description}: no training tokens")

    @property
    def n_train_tokens(self):
        return int(sum(len(s) for s in self.train))

    def longest(self, split="train"):
        """Tokens in the longest stream of a split (a batch window needs
        seq_len + 1)."""
        streams = self.train if split == "train" else self.val
        return max((len(s) for s in streams), default=0)

    def max_token(self):
        return int(max(int(s.max()) for s in self.train + self.val))

    def find_token(self, limit):
        """(where, id) of the first token id >= limit (where: the shard's
        path, else the data's description), or None."""
        for s in self.train + self.val:
            big = np.flatnonzero(s >= limit)
            if big.size:
                return getattr(s, "filename", None) or self.description, int(s[big[0]])
        return None

    def batch(self, step, batch_size, seq_len, seed=0, split="train"):
        """(x, y) int32 [batch_size, seq_len] for this step (deterministic)."""
        streams = self.train if split == "train" or not self.val else self.val
        lens = np.array([len(s) - seq_len - 1 for s in streams])
        if lens.max() < 0:
            raise ValueError(f"{self.description}: the {split} data has fewer than seq_len + 1 = "
                             f"{seq_len + 1} tokens in every stream; use a smaller --seq-len")
        r = np.random.default_rng([seed, step, 0 if split == "train" else 1])
        ok = np.flatnonzero(lens >= 0)
        weights = (lens[ok] + 1) / (lens[ok] + 1).sum()
        which = r.choice(ok, size=batch_size, p=weights)
        xy = np.empty((batch_size, seq_len + 1), dtype=np.int32)
        for b, k in enumerate(which):
            start = int(r.integers(0, lens[k] + 1))
            xy[b] = streams[k][start:start + seq_len + 1]
        return xy[:, :-1], xy[:, 1:]


def _split(stream, val_fraction):
    n_val = int(len(stream) * val_fraction)
    return [stream[:len(stream) - n_val]], ([stream[len(stream) - n_val:]] if n_val else [])


def load_data(path, tokenizer, val_fraction=0.05):
    """TokenData from None (the embedded corpus), a text file (documents
    separated by blank lines, each encoded with BOS like run.c), a llama2.c
    .bin shard, or a directory of .bin shards (the first shard is held out
    for validation when there are several, as llama2.c does)."""
    if path is None:
        from .corpus import default_corpus
        stream = tokenizer.encode_documents(default_corpus())
        return TokenData(*_split(stream, val_fraction), "the embedded default corpus")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"--data {path}: no such file or directory")
    if os.path.isdir(path):
        shards = sorted(glob.glob(os.path.join(path, "*.bin")))
        if not shards:
            raise ValueError(f"--data {path}: the directory holds no .bin token shards")
    elif path.endswith(".bin"):
        shards = [path]
    else:
        from ..atomicfile import open_regular
        try:
            with open_regular(path, "--data file") as f:
                size = os.fstat(f.fileno()).st_size
                if size > MAX_TEXT_BYTES:
                    raise ValueError(f"--data {path}: a text file of {size:,} bytes; text is read "
                                     f"whole (at most {MAX_TEXT_BYTES:,} bytes): pretokenize a "
                                     "corpus this large into .bin token shards")
                text = f.read(size).decode("utf-8")      # bounded: the size stat gave
        except OSError as e:
            raise ValueError(f"--data {path}: cannot read it: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"--data {path}: not UTF-8 text ({e}); a token shard must be "
                             "named *.bin") from None
        docs = [d.strip() for d in text.split("\n\n") if d.strip()]
        if not docs:
            raise ValueError(f"--data {path}: the file holds no text")
        stream = tokenizer.encode_documents(docs)
        return TokenData(*_split(stream, val_fraction), f"text file {path}")
    maps = []
    for s in shards:
        try:
            mode = os.stat(s).st_mode
        except OSError as e:
            raise ValueError(f"--data {s}: cannot read it: {e.strerror or e}") from None
        if not stat.S_ISREG(mode):      # a FIFO would hang, /dev/zero never ends
            what = "not a file" if stat.S_ISDIR(mode) else "not a regular file (a FIFO or a device)"
            raise ValueError(f"--data {s}: {what}; a .bin token shard is a file of uint16 "
                             "token ids")
        size = os.path.getsize(s)
        if size == 0:
            raise ValueError(f"--data {s}: the token shard is empty")
        if size % 2:
            raise ValueError(f"--data {s}: not a uint16 token shard (odd number of bytes)")
        try:
            maps.append(np.memmap(s, dtype="<u2", mode="r"))
        except OSError as e:
            raise ValueError(f"--data {s}: cannot read it: {e.strerror or e}") from None
    if len(maps) > 1:
        return TokenData(maps[1:], maps[:1], f"{len(maps)} token shards in {path}")
    return TokenData(*_split(maps[0], val_fraction), f"token shard {path}")
