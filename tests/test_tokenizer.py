"""Tokenizers: the byte-level vocabulary, tokenizer.bin read/write, run.c's
encoding (checked on the real llama2.c tokenizer.bin when it is present)."""
import os
import struct

import pytest

from anebackward import CheckpointError
from anebackward.tokenizer import BOS, EOS, Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# llama2.c's own tokenizer.bin (Llama 2's 32,000 sentencepiece pieces) is not
# shipped with the package: the tests that compare against it read it from
# $ANEBACKWARD_LLAMA2C_TOKENIZER, else from a data folder beside the checkout
REAL = os.environ.get("ANEBACKWARD_LLAMA2C_TOKENIZER") or \
    os.path.join(REPO, "..", "shared", "data", "llama2c-tokenizer.bin")


@pytest.fixture
def real():
    if not os.path.exists(REAL):
        pytest.skip("optional: these tests compare with llama2.c's own tokenizer.bin, which is not "
                    "part of this package; to run them, download "
                    "https://github.com/karpathy/llama2.c/raw/master/tokenizer.bin and set "
                    "ANEBACKWARD_LLAMA2C_TOKENIZER=/path/to/tokenizer.bin")
    return Tokenizer.load(REAL)


TEXTS = ["Once upon a time, Lily saw a big red ball.", "tab\tnew\nline <0x41> <s>",
         "héllo wörld €1 😀", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_round_trip(text):
    tok = Tokenizer.byte_level()
    ids = tok.encode(text)
    raw = text.encode()
    assert ids == ([BOS, 3 + 32] if raw else [BOS]) + [b + 3 for b in raw]
    assert tok.decode(ids[1:]) == text


def test_byte_level_layout():
    tok = Tokenizer.byte_level()
    assert tok.vocab_size == 259
    assert tok.pieces[0] == b"<unk>" and tok.pieces[3 + ord("A")] == b"A"
    assert tok.pieces[3 + 10] == b"<0x0A>" and tok.pieces[3 + 0xE9] == b"<0xE9>"
    assert tok.is_byte_level
    assert tok.encode("ab", eos=True)[-1] == EOS


def test_tokenizer_bin_round_trip(tmp_path):
    tok = Tokenizer.byte_level().padded(300)
    tok.scores[10] = -1.5
    path = tmp_path / "tokenizer.bin"
    tok.save(path)
    raw = open(path, "rb").read()
    assert struct.unpack_from("<i", raw)[0] == 7          # max_token_length: "<pad40>"
    assert struct.unpack_from("<fi", raw, 4) == (0.0, 5)  # score, len of "<unk>"
    back = Tokenizer.load(path)
    assert back.pieces == tok.pieces and back.scores == tok.scores
    assert Tokenizer.load(path, vocab_size=259).pieces == tok.pieces[:259]
    with pytest.raises(CheckpointError, match="truncated"):
        Tokenizer.load(path, vocab_size=301)
    (tmp_path / "cut.bin").write_bytes(raw[:-3])
    with pytest.raises(CheckpointError, match="truncated"):
        Tokenizer.load(tmp_path / "cut.bin")


def test_fast_document_encoding_equals_run_c_encoding():
    tok = Tokenizer.byte_level()
    docs = ["One day, a cat sat.", "", "Ünïcode\nand\ttabs"]
    fast = tok.encode_documents(docs)

    class Generic(Tokenizer):   # force the general path, merges included
        is_byte_level = False
    slow = Generic(tok.pieces)
    assert fast.tolist() == [t for d in docs for t in slow.encode(d)]


def test_merges_by_score_on_a_small_vocabulary():
    pieces = Tokenizer.byte_level().pieces + [b"ab", b"bc", b"abc", b" a"]
    scores = [0.0] * 259 + [1.0, 2.0, 3.0, 0.5]
    tok = Tokenizer(pieces, scores)
    assert not tok.is_byte_level
    b, sp = 3 + ord("b"), 3 + ord(" ")
    # [" ", a, b, c]: "bc" (2.0) beats "ab" (1.0) and " a" (0.5); then
    # "a"+"bc" = "abc" (3.0) beats " a"; " abc" is no piece: done
    assert tok.encode("abc") == [BOS, sp, 261]
    # [" ", a, b]: "ab" (1.0) beats " a" (0.5)
    assert tok.encode("ab") == [BOS, sp, 259]
    assert tok.encode("b", bos=False) == [sp, b]


def test_real_tokenizer_encodes_like_run_c(real):
    assert real.vocab_size == 32000
    # expected ids from llama2.c's test.c (Meta's Llama 2 example prompts)
    assert real.encode("") == [1]
    assert real.encode("I believe the meaning of life is") == [1, 306, 4658, 278, 6593, 310, 2834, 338]
    assert real.encode("Simply put, the theory of relativity states that ") == \
        [1, 3439, 17632, 1925, 29892, 278, 6368, 310, 14215, 537, 5922, 393, 29871]
    ids = real.encode("Once upon a time, there was a cat.\n")
    assert real.decode(ids[1:]) == "Once upon a time, there was a cat.\n"
    x = real.encode("x")
    assert len(x) == 2 and real.pieces[x[1]] == b" x"           # dummy prefix merged
    assert real.decode_piece(BOS, x[1]) == b"x"                 # and stripped after BOS


def test_real_tokenizer_byte_fallback(real):
    ids = real.encode("\x01")
    assert ids[-1] == 3 + 1 and real.pieces[4] == b"<0x01>"
    assert real.decode_piece(5, 4) == b"\x01"


def test_bad_tokenizer_input(tmp_path):
    with pytest.raises(ValueError, match="259"):
        Tokenizer([b"a", b"b"])
    (tmp_path / "t.bin").write_bytes(struct.pack("<i", -1))
    with pytest.raises(CheckpointError, match="max_token_length"):
        Tokenizer.load(tmp_path / "t.bin")
    with pytest.raises(CheckpointError, match="cannot read"):
        Tokenizer.load(tmp_path / "nope.bin")
    with pytest.raises(ValueError, match="NUL"):
        Tokenizer.byte_level().encode("a\0b")
