"""Instruction JSONL reader and its padded/packed batches."""
import numpy as np
import pytest

from anebackward.data.instructions import (InstructionDataError, packed_batch, padded_batch,
                                           read_jsonl, tokenize)


class ByteTok:
    def encode(self, text, bos=True, eos=False):
        return ([1] if bos else []) + [b + 3 for b in text.encode()] + ([2] if eos else [])


def _write(tmp_path, text):
    p = tmp_path / "x.jsonl"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,needle", [
    ("", "empty file"),
    ('{"prompt": "a", "completion": "b"}\nnot json\n', "x.jsonl:2: not valid JSON"),
    ('[1, 2]\n', "x.jsonl:1: expected a JSON object"),
    ('{"prompt": 3, "completion": "b"}\n', 'x.jsonl:1: "prompt" must be a string'),
    ('{"prompt": "a"}\n', 'x.jsonl:1: "completion" must be a string'),
    ('{"prompt": "a", "completion": ""}\n', 'x.jsonl:1: "completion" is empty'),
])
def test_reader_errors_name_file_and_line(tmp_path, text, needle):
    with pytest.raises(InstructionDataError, match=needle):
        read_jsonl(_write(tmp_path, text))


def test_targets_count_completion_only():
    docs, n_trunc = tokenize([("ab", "cd")], ByteTok(), seq_len=64)
    tok, tgt = docs[0]
    assert n_trunc == 0
    # BOS a b | c d EOS: counted targets are the predictions of c, d, EOS
    assert tok.tolist() == [1, ord("a") + 3, ord("b") + 3, ord("c") + 3, ord("d") + 3, 2]
    assert tgt.tolist() == [-1, -1, ord("c") + 3, ord("d") + 3, 2, -1]


def test_truncation_counted():
    docs, n_trunc = tokenize([("ab", "cdefgh"), ("a", "b")], ByteTok(), seq_len=5)
    assert n_trunc == 1 and docs[0][0].size == 5 and docs[0][1][-1] == -1


def test_batches_deterministic_per_step_and_segmented():
    pairs = [("p" * i, "c" * (i + 1)) for i in range(1, 9)]
    docs, _ = tokenize(pairs, ByteTok(), seq_len=32)
    a, b = padded_batch(docs, 7, 4, seed=3), padded_batch(docs, 7, 4, seed=3)
    assert np.array_equal(a.tokens, b.tokens) and a.n_seq == 4
    p = packed_batch(docs, 7, 2, 32, seed=3)
    assert np.array_equal(p.tokens, packed_batch(docs, 7, 2, 32, seed=3).tokens)
    # positions restart in every document; no segment longer than a row
    for s in range(p.n_seq):
        lo, hi = p.cu_seqlens[s], p.cu_seqlens[s + 1]
        assert p.positions[lo:hi].tolist() == list(range(hi - lo))
    assert p.max_seqlen <= 32
