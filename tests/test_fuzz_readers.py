"""Fuzzed files for every reader of untrusted bytes: llama2.c checkpoints,
tokenizer.bin, optimizer.bin and training data (text files and uint16
shards). Each starts from a valid file and mutates it (truncation, byte
flips, appended junk, and format-aware edits: header ints, JSON fields).
The only acceptable outcomes are a clean load or the documented exception
(CheckpointError for the three binary formats, ValueError for --data);
anything else (IndexError, struct.error, MemoryError, a hang, a crash)
fails. derandomize=True makes each run the same examples (seeded), so a
failure reproduces."""
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings   # the test extra installs it
from hypothesis import strategies as st

import anebackward as ab
from anebackward.checkpoint import OPT_MAGIC, load_optimizer, save_optimizer
from anebackward.data import load_data
from conftest import import_safetensors
from anebackward.tokenizer import Tokenizer

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
SMALL = ab.LlamaConfig(dim=8, hidden_dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                       vocab_size=12, max_seq_len=4)


def _mutations(n):
    """Byte-level edits of an n-byte file."""
    return st.one_of(
        st.tuples(st.just("truncate"), st.integers(0, max(n - 1, 0))),
        st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)),
                                            min_size=1, max_size=8)),
        st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("insert"), st.integers(0, n), st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("int32"), st.integers(0, max(n // 4 - 1, 0)),
                  st.one_of(st.integers(-2**31, 2**31 - 1), st.sampled_from(
                      [0, -1, 1, 2**31 - 1, -2**31, 2**30, 2**16, 259, 65536]))),
    )


def _apply(raw, m):
    raw = bytearray(raw)
    kind = m[0]
    if kind == "truncate":
        return bytes(raw[:m[1]])
    if kind == "flip":
        for i, b in m[1]:
            raw[i] = b
        return bytes(raw)
    if kind == "append":
        return bytes(raw) + m[1]
    if kind == "insert":
        return bytes(raw[:m[1]]) + m[2] + bytes(raw[m[1]:])
    i, v = m[1], m[2]
    raw[4 * i:4 * i + 4] = struct.pack("<i", v)
    return bytes(raw)


# -- llama2.c checkpoint -------------------------------------------------------

@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "model.bin"
    ab.Llama(SMALL, seed=0).save(path)
    return path


def _header_edits():
    # any of the 7 header ints set to an interesting value: the reader must
    # refuse what does not match the file before allocating anything
    return st.tuples(st.just("int32"), st.integers(0, 6), st.one_of(
        st.integers(-2**31, 2**31 - 1),
        st.sampled_from([0, -1, 1, 2, 3, 4, 8, 12, -12, 16, 2**31 - 1, -2**31, 2**16, 2**30])))


@FUZZ
@given(data=st.data())
def test_fuzzed_checkpoints(model_file, data, tmp_path):
    raw = model_file.read_bytes()
    m = data.draw(st.one_of(_header_edits(), _mutations(len(raw))))
    path = tmp_path / "m.bin"
    path.write_bytes(_apply(raw, m))
    try:
        model = ab.Llama.load(path)
    except ab.CheckpointError:
        return
    assert np.isfinite(model.flat_params).all()
    model.forward(np.arange(3) % model.config.vocab_size)   # a loaded model runs


# -- tokenizer.bin ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "tokenizer.bin"
    pieces = Tokenizer.byte_level().pieces + [b"he", b"ll", b"hell", b"o w"]
    Tokenizer(pieces, scores=list(range(len(pieces)))).save(path)
    return path


@FUZZ
@given(data=st.data(), vocab=st.sampled_from([None, 259, 263, 264, 300]))
def test_fuzzed_tokenizers(tokenizer_file, data, vocab, tmp_path):
    raw = tokenizer_file.read_bytes()
    m = data.draw(_mutations(len(raw)))
    path = tmp_path / "t.bin"
    path.write_bytes(_apply(raw, m))
    try:
        tok = Tokenizer.load(path, vocab_size=vocab)
    except ab.CheckpointError:
        return
    try:
        ids = tok.encode("hello world \u00e9\u4e2d!")
    except ValueError:       # documented: a vocabulary without the ' ' piece
        return
    assert all(0 <= i < tok.vocab_size for i in ids)
    tok.decode(ids[1:])


# -- optimizer.bin ---------------------------------------------------------------

@pytest.fixture(scope="module")
def opt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "optimizer.bin"
    model = ab.Llama(SMALL, seed=0)
    opt = ab.AdamW(model)
    model.flat_grads[:] = 0.5
    opt.step()
    save_optimizer(opt, path, extra={"step": 1, "settings": {"lr": 1e-3}})
    return path


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers(-2**70, 2**70)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8)


@st.composite
def _meta_edit(draw, raw):
    (n,) = struct.unpack("<Q", raw[8:16])
    meta = json.loads(raw[16:16 + n])
    key = draw(st.sampled_from(sorted(meta) + ["extra", "unknown"]))
    if draw(st.booleans()):
        meta.pop(key, None)
    else:
        meta[key] = draw(json_values)
    text = json.dumps(meta).encode()
    return ("raw", OPT_MAGIC + struct.pack("<Q", len(text)) + text + raw[16 + n:])


@FUZZ
@given(data=st.data(), metadata=st.booleans())
def test_fuzzed_optimizer_states(opt_file, data, metadata, tmp_path):
    """Half the examples edit one JSON field (drop it, or any JSON value),
    half the bytes."""
    raw = opt_file.read_bytes()
    m = data.draw(_meta_edit(raw) if metadata else _mutations(len(raw)))
    path = tmp_path / "o.bin"
    path.write_bytes(m[1] if m[0] == "raw" else _apply(raw, m))
    model = ab.Llama(SMALL, seed=0)
    opt = ab.AdamW(model)
    try:
        extra = load_optimizer(opt, path)
    except ab.CheckpointError:
        assert opt.step_count == 0 and not opt.m.any()     # nothing half-loaded
        return
    assert isinstance(extra, dict)
    assert np.isfinite(opt.m).all() and (opt.v >= 0).all()
    model.flat_grads[:] = 0.1
    opt.step()                                              # a loaded state steps


# -- training data ---------------------------------------------------------------

@FUZZ
@given(shards=st.lists(st.binary(max_size=80), min_size=1, max_size=3),
       text=st.one_of(st.binary(max_size=200),
                      st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))),
       seq_len=st.integers(1, 12))
def test_fuzzed_training_data(shards, text, seq_len, tmp_path):
    tok = Tokenizer.byte_level()
    d = tmp_path / "shards"
    d.mkdir(exist_ok=True)
    for old in d.iterdir():
        old.unlink()
    for i, s in enumerate(shards):
        (d / f"data{i:02d}.bin").write_bytes(s)
    (tmp_path / "corpus.txt").write_bytes(text)
    for path in (d, d / "data00.bin", tmp_path / "corpus.txt"):
        try:
            data = load_data(str(path), tok)
            x, y = data.batch(3, 2, seq_len)
        except ValueError:
            continue
        assert x.shape == y.shape == (2, seq_len) and x.dtype == np.int32
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])


# -- Hugging Face directories: hostile config.json and index -----------------------

HF_SMALL = SMALL.replace(rope_layout="half", max_seq_len=16)


class _SizeChecked(ab.Llama):
    """A Llama that fails the test if it is asked to allocate more than the
    tensors on disk can fill: the reader must check config sizes against the
    safetensors headers before it allocates."""
    disk_bytes = 0

    def __init__(self, config, *a, **k):
        from anebackward.layout import param_layout
        assert 4 * param_layout(config)["n_params"] <= 2 * self.disk_bytes + 4096, config
        super().__init__(config, *a, **k)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    import_safetensors()
    d = tmp_path_factory.mktemp("fuzz") / "hf"
    ab.Llama(HF_SMALL, seed=0).save_pretrained(d)
    return d


def _load_hf(d):
    import os
    _SizeChecked.disk_bytes = sum(os.path.getsize(d / n) for n in os.listdir(d)
                                  if n.endswith(".safetensors"))
    try:
        model = _SizeChecked.from_pretrained(d)
    except ab.CheckpointError:
        return None
    assert np.isfinite(model.flat_params).all()
    model.forward(np.arange(3) % model.config.vocab_size)
    return model


hostile_values = st.one_of(
    json_values,
    st.sampled_from([0, -1, 1, 2, 3, 7, 10**4, 10**6, 10**8, 10**9, 2**31, 2**63, 2**70,
                     "no", "yes", "true", "abc", "", [1, 2], {"a": 1}, [], {}, 1.5, -0.0,
                     True, False, None]))
HF_KEYS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
           "rms_norm_eps", "tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias",
           "attention_dropout", "rope_parameters", "rope_theta", "rope_scaling",
           "partial_rotary_factor", "layer_types", "use_sliding_window", "model_type"]


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(HF_KEYS), st.booleans(), hostile_values),
                      min_size=1, max_size=3))
def test_fuzzed_hf_configs(hf_dir, edits, tmp_path):
    """Each example drops or sets 1-3 config.json fields to a hostile value
    (huge or negative sizes, strings for booleans and numbers, lists for
    objects): a clean load or a CheckpointError, never an allocation the
    tensors on disk do not justify, never another exception."""
    import shutil
    d = tmp_path / "hf"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    for key, drop, value in edits:
        if drop:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    _load_hf(d)


@FUZZ
@given(value=hostile_values, where=st.sampled_from(["weight_map", "entry", "top"]))
def test_fuzzed_hf_indexes(hf_dir, value, where, tmp_path):
    import shutil
    d = tmp_path / "hf"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(hf_dir, d)
    from safetensors import safe_open
    with safe_open(str(d / "model.safetensors"), framework="np") as f:
        names = list(f.keys())
    index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in names}}
    if where == "weight_map":
        index["weight_map"] = value
    elif where == "entry":
        index["weight_map"][names[0]] = value
    else:
        index = value
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    _load_hf(d)


@pytest.mark.parametrize("edit,field", [
    # an 8B-shaped config beside a small file used to allocate 28 GiB
    (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
          num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
     "num_hidden_layers is 32, the safetensors files hold 1"),
    (dict(num_hidden_layers=10**6), "num_hidden_layers"),
    (dict(hidden_size=10**9), "hidden_size"),
    (dict(vocab_size=10**8), "vocab_size"),
    (dict(rope_parameters=[1, 2]), "rope_parameters"),
    (dict(layer_types=5), "layer_types"),
    (dict(attention_dropout="abc"), "attention_dropout"),
    (dict(tie_word_embeddings="no"), "tie_word_embeddings"),
    (dict(attention_bias="false"), "attention_bias"),
    (dict(max_position_embeddings=2**40), "max_position_embeddings"),
])
def test_hostile_hf_config_fields_name_file_and_field(hf_dir, tmp_path, edit, field):
    import shutil
    d = tmp_path / "hf"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(edit)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ab.CheckpointError, match=rf"config\.json: .*{field}"):
        _SizeChecked.disk_bytes = (d / "model.safetensors").stat().st_size
        _SizeChecked.from_pretrained(d)


@pytest.mark.parametrize("weight_map", [["model.safetensors"], {"model.norm.weight": 5},
                                        {"model.norm.weight": "../x.safetensors"}])
def test_a_malformed_weight_map_is_a_checkpoint_error(hf_dir, tmp_path, weight_map):
    import shutil
    d = tmp_path / "hf"
    shutil.copytree(hf_dir, d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ab.CheckpointError, match=r"index\.json: field weight_map"):
        ab.Llama.from_pretrained(d)
