"""Instruction JSONL reader and its padded/packed batches."""
import numpy as np
import pytest

from anebackward.data.instructions import InstructionDataError, draw, read_jsonl, tokenize


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
    docs, lengths = tokenize([("ab", "cd")], ByteTok(), seq_len=64)
    tok, tgt = docs[0]
    assert lengths == [6]
    # BOS a b | c d EOS: counted targets are the predictions of c, d, EOS
    assert tok.tolist() == [1, ord("a") + 3, ord("b") + 3, ord("c") + 3, ord("d") + 3, 2]
    assert tgt.tolist() == [-1, -1, ord("c") + 3, ord("d") + 3, 2, -1]


def test_documents_longer_than_seq_len_are_dropped_not_cut():
    docs, lengths = tokenize([("ab", "cdefgh"), ("a", "b")], ByteTok(), seq_len=5)
    assert docs[0] is None and lengths[0] == 10
    assert docs[1][0].tolist() == [1, ord("a") + 3, ord("b") + 3, 2]


def test_batches_deterministic_per_step_and_segmented():
    pairs = [("p" * i, "c" * (i + 1)) for i in range(1, 9)]
    docs, _ = tokenize(pairs, ByteTok(), seq_len=32)
    (a,), (b,) = draw(docs, 7, 4, 32, seed=3), draw(docs, 7, 4, 32, seed=3)
    assert np.array_equal(a.tokens, b.tokens) and a.n_seq == 4
    (p,) = draw(docs, 7, 2, 32, seed=3, pack=True)
    assert np.array_equal(p.tokens, draw(docs, 7, 2, 32, seed=3, pack=True)[0].tokens)
    # positions restart in every document; no segment longer than a row
    for s in range(p.n_seq):
        lo, hi = p.cu_seqlens[s], p.cu_seqlens[s + 1]
        assert p.positions[lo:hi].tolist() == list(range(hi - lo))
    assert p.max_seqlen <= 32


def _model():
    from anebackward import Llama, LlamaConfig
    cfg = LlamaConfig(dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=260,
                      max_seq_len=64)
    return Llama(cfg, seed=1)


def test_packed_and_padded_same_documents_same_loss():
    from anebackward.batch import varlen
    docs, _ = tokenize([("hello ", "world"), ("a", "bcd"), ("xyz", "w")], ByteTok(), seq_len=64)
    model = _model()
    cu = np.concatenate([[0], np.cumsum([d[0].size for d in docs])])
    one_row = model.forward(varlen(np.concatenate([d[0] for d in docs]), cu,
                                   targets=np.concatenate([d[1] for d in docs])), want_grad=False)
    # the same documents, one segment each, counted tokens only: the mean over
    # the counted tokens of every document equals the per-document sums pooled
    sums = [model.forward(varlen(t, [0, t.size], targets=g), want_grad=False) * (g >= 0).sum()
            for t, g in docs]
    n = sum(int((g >= 0).sum()) for _, g in docs)
    assert one_row == pytest.approx(sum(sums) / n, rel=1e-5)


def test_loss_depends_on_completion_targets_only():
    from anebackward.batch import varlen
    (tok, tgt), = tokenize([("prompt text", "answer")], ByteTok(), seq_len=64)[0]
    model = _model()
    base = model.forward(varlen(tok, [0, tok.size], targets=tgt), want_grad=False)
    assert (tgt[:len("prompt text")] == -1).all()   # BOS + prompt: no prediction counted
    changed = tgt.copy()
    changed[-2] = (changed[-2] + 1) % 260   # a completion target changed
    assert model.forward(varlen(tok, [0, tok.size], targets=changed), want_grad=False) != base


def test_instruction_data_split_and_batches(tmp_path):
    from anebackward.data.instructions import InstructionData
    import json
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n"
                         for i in range(40)))
    d = InstructionData(p, ByteTok(), seq_len=16)
    assert len(d.train) == 38 and len(d.val) == 2 and d.n_dropped == 0
    assert d.batch(3, 4, seed=1).n_seq == 4
    assert InstructionData(p, ByteTok(), 16, pack=True).batch(3, 2, seed=1).max_seqlen <= 16


def test_a_document_with_nothing_before_its_completion_is_refused():
    class NoBos(ByteTok):
        def encode(self, text, bos=True, eos=False):
            return super().encode(text, bos=False, eos=False)
    with pytest.raises(InstructionDataError, match="x.jsonl:1: no completion token can be"):
        tokenize([("", "a")], NoBos(), seq_len=8, where=["x.jsonl:1"])


def test_reader_refuses_non_utf8_lines_and_fifos(tmp_path):
    import os
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n')
    with pytest.raises(InstructionDataError, match="x.jsonl:2: not UTF-8 text"):
        read_jsonl(p)
    os.mkfifo(tmp_path / "f.jsonl")
    with pytest.raises(InstructionDataError, match="f.jsonl: cannot read it: .* FIFO"):
        read_jsonl(tmp_path / "f.jsonl")
