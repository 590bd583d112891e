"""Tokenizers in llama2.c's tokenizer.bin format, encoding like run.c.

tokenizer.bin (llama2.c tokenizer.py export, read by run.c build_tokenizer):
  int32 max_token_length, then for each of vocab_size tokens:
  float32 score, int32 length, the piece's bytes (no terminator).
The file does not store vocab_size; run.c takes it from the model header.

Tokenizer.byte_level() is this package's own vocabulary in the Llama layout:
0 <unk>, 1 <s> (BOS), 2 </s> (EOS), 3 + b for byte b — printable ASCII and
the space stored as the character itself, every other byte as "<0xXX>" (the
sentencepiece byte-fallback spelling run.c decodes). It has no merges, so
run.c's encoder reduces to BOS, " " (the dummy prefix), then byte + 3.

encode() is run.c's encode(): BOS, the dummy-prefix " " token when the text
is not empty, one lookup per UTF-8 code point with byte fallback (+3), then
repeatedly merge the adjacent pair whose concatenation is the
highest-scoring vocabulary entry. decode_piece() is run.c's decode().
"""
import os
import re
import struct

import numpy as np

from .errors import CheckpointError

UNK, BOS, EOS = 0, 1, 2
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{1,2})")


class Tokenizer:
    bos_id = BOS            # starts every sequence (encode(bos=True))
    stop_ids = (BOS,)       # generation stops at BOS (run.c: BOS delimits documents)

    def __init__(self, pieces, scores=None, max_token_length=None):
        self.pieces = [bytes(p) for p in pieces]
        self.scores = [0.0] * len(self.pieces) if scores is None else [float(s) for s in scores]
        if len(self.scores) != len(self.pieces):
            raise ValueError("Tokenizer: pieces and scores must have the same length")
        if len(self.pieces) < 3 + 256:
            raise ValueError(f"Tokenizer: a Llama-layout vocabulary has at least 259 pieces (3 "
                             f"specials + 256 bytes), got {len(self.pieces)}")
        longest = max(len(p) for p in self.pieces)
        self.max_token_length = longest if max_token_length is None else int(max_token_length)
        self._lookup = {}
        for i, p in enumerate(self.pieces):
            self._lookup.setdefault(p, i)   # first of any duplicates, deterministic

    @property
    def vocab_size(self):
        return len(self.pieces)

    @classmethod
    def byte_level(cls):
        """The 259-token byte-level vocabulary (no merges)."""
        pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"]
        for b in range(256):
            pieces.append(bytes([b]) if 0x20 <= b < 0x7F else b"<0x%02X>" % b)
        return cls(pieces)

    @property
    def is_byte_level(self):
        """True when encode() is exactly BOS, " ", byte + 3 (no piece can be
        formed by a merge and every byte token is at 3 + b)."""
        if getattr(self, "_byte_level", None) is None:
            ok = all(self._lookup.get(bytes([b])) in (None, 3 + b) for b in range(256))
            # the encoder's first tokens are byte pieces; no merge may apply to them
            first = set(self.pieces[3:259])
            ok = ok and not any(p[:k] in first and p[k:] in first
                                for p in self.pieces[3:] if len(p) in (2, 7, 12)
                                for k in (1, 6) if k < len(p))
            ok = ok and self._lookup.get(b" ") == 3 + 0x20
            self._byte_level = ok
        return self._byte_level

    # -- file format ---------------------------------------------------------
    @classmethod
    def load(cls, path, vocab_size=None):
        """Read a llama2.c tokenizer.bin: vocab_size tokens, or every token in
        the file when None. CheckpointError for a truncated or corrupt file."""
        path = os.fspath(path)
        from .atomicfile import open_regular
        try:
            with open_regular(path, "tokenizer") as f:
                raw = f.read()
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read tokenizer: {e.strerror or e}") from None
        if len(raw) < 4:
            raise CheckpointError(f"{path}: truncated tokenizer (no max_token_length)")
        (max_len,) = struct.unpack_from("<i", raw, 0)
        if not 0 < max_len < 1 << 16:
            raise CheckpointError(f"{path}: corrupt tokenizer: max_token_length = {max_len}")
        pieces, scores, off = [], [], 4
        while off < len(raw) and (vocab_size is None or len(pieces) < vocab_size):
            if off + 8 > len(raw):
                raise CheckpointError(f"{path}: truncated tokenizer at token {len(pieces)}")
            score, n = struct.unpack_from("<fi", raw, off)
            off += 8
            if n < 0 or n > max_len or off + n > len(raw):
                raise CheckpointError(f"{path}: corrupt or truncated tokenizer at token "
                                      f"{len(pieces)} (length {n}, max_token_length {max_len})")
            pieces.append(raw[off:off + n])
            scores.append(score)
            off += n
        if vocab_size is not None and len(pieces) < vocab_size:
            raise CheckpointError(f"{path}: truncated tokenizer: {len(pieces)} tokens, the model "
                                  f"needs {vocab_size}")
        try:
            return cls(pieces, scores, max_len)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None

    def to_bytes(self):
        """The tokenizer.bin file's bytes."""
        parts = [struct.pack("<i", self.max_token_length)]
        for p, s in zip(self.pieces, self.scores):
            parts.append(struct.pack("<fi", s, len(p)) + p)
        return b"".join(parts)

    def save(self, path):
        """Write tokenizer.bin (atomically) for llama2.c's run.c."""
        from .atomicfile import atomic_write
        data = self.to_bytes()
        atomic_write(path, lambda f: f.write(data))

    def padded(self, vocab_size):
        """This vocabulary extended with never-produced pieces to vocab_size
        entries (run.c reads exactly the model's vocab_size tokens)."""
        if vocab_size < self.vocab_size:
            raise ValueError(f"padded: vocab_size {vocab_size} < {self.vocab_size}")
        extra = [b"<pad%d>" % i for i in range(vocab_size - self.vocab_size)]
        return Tokenizer(self.pieces + extra, self.scores + [0.0] * len(extra))

    # -- encode / decode -----------------------------------------------------
    def encode(self, text, bos=True, eos=False):
        """Token ids of text (str or UTF-8 bytes), as run.c's encode()."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        if b"\0" in data:
            raise ValueError("encode: text must not contain NUL bytes (run.c stops at them)")
        out = [BOS] if bos else []
        if data:
            sp = self._lookup.get(b" ")
            if sp is None:
                raise ValueError("encode: the vocabulary has no ' ' piece for the dummy prefix")
            out.append(sp)
        i, n = 0, len(data)
        while i < n:
            j = i + 1   # a code point: a lead byte and at most 3 continuation bytes
            while j < n and (data[j] & 0xC0) == 0x80 and j - i < 4:
                j += 1
            cp = data[i:j]
            tid = self._lookup.get(cp)
            if tid is not None:
                out.append(tid)
            else:
                out.extend(b + 3 for b in cp)
            i = j
        if not self.is_byte_level:
            out = self._merge(out, 1 if bos else 0)
        if eos:
            out.append(EOS)
        return out

    def _merge(self, toks, start):
        pieces, scores, look = self.pieces, self.scores, self._lookup
        while True:
            best, best_id, best_i = -1e10, -1, -1
            for i in range(len(toks) - 1):
                tid = look.get(pieces[toks[i]] + pieces[toks[i + 1]])
                if tid is not None and scores[tid] > best:
                    best, best_id, best_i = scores[tid], tid, i
            if best_i < 0:
                return toks
            toks[best_i:best_i + 2] = [best_id]

    def encode_documents(self, docs):
        """One int32 stream of many texts, each encoded with BOS (run.c
        style, as llama2.c's pretokenizer does). Fast for byte-level."""
        if self.is_byte_level:
            parts = []
            for d in docs:
                b = d.encode("utf-8")
                head = [BOS, 3 + 0x20] if b else [BOS]
                parts.append(np.array(head, dtype=np.int32))
                parts.append(np.frombuffer(b, dtype=np.uint8).astype(np.int32) + 3)
            return np.concatenate(parts) if parts else np.zeros(0, np.int32)
        return np.array([t for d in docs for t in self.encode(d)], dtype=np.int32)

    def decode_piece(self, prev, token):
        """The bytes run.c prints for `token` after `prev` (leading space
        stripped after BOS, <0xXX> pieces turned into the byte)."""
        piece = self.pieces[token]
        if prev == BOS and piece[:1] == b" ":
            piece = piece[1:]
        m = _BYTE_PIECE.match(piece)
        if m:
            piece = bytes([int(m.group(1), 16)])
        return piece

    def decode(self, tokens, prev=BOS):
        """Text of a token sequence as run.c prints it: pieces in order,
        stopping at BOS, skipping unprintable single bytes (safe_printf)."""
        out = []
        for t in tokens:
            t = int(t)
            if t == BOS:
                break
            p = self.decode_piece(prev, t)
            if len(p) == 1 and not (0x20 <= p[0] < 0x7F or p[0] in b"\t\n\v\f\r"):
                if p[0] < 0x80:
                    prev = t
                    continue
            out.append(p)
            prev = t
        return b"".join(out).decode("utf-8", errors="replace")
