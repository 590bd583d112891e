"""llama2.c v0 checkpoints: round trip, an independent writer, bad files,
atomic saves, optimizer state."""
import os
import struct

import numpy as np
import pytest

from anebackward import AdamW, CheckpointError, Llama, LlamaConfig
from anebackward.checkpoint import load_optimizer, read_header, save_optimizer


def write_v0(path, dims, tensors, tied):
    """A minimal v0 writer written from llama2.c's legacy_export description,
    independent of anebackward: header, embedding, per-kind stacks, final
    norm, freq_cis real/imag, classifier if untied. Returns nothing."""
    dim, hidden, L, H, KV, V, seq = dims
    hd = dim // H
    with open(path, "wb") as f:
        f.write(struct.pack("7i", dim, hidden, L, H, KV, V if tied else -V, seq))

        def put(a):
            a = np.asarray(a, dtype="<f4")
            f.write(struct.pack(f"<{a.size}f", *a.ravel().tolist()))
        put(tensors["tok_embeddings.weight"])
        for kind in ("attention_norm", "attention.wq", "attention.wk", "attention.wv",
                     "attention.wo", "ffn_norm", "feed_forward.w1", "feed_forward.w2",
                     "feed_forward.w3"):
            for i in range(L):
                put(tensors[f"layers.{i}.{kind}.weight"])
        put(tensors["norm.weight"])
        # freq_cis tables: recognisable values, never to be read as weights
        put(np.full((seq, hd // 2), 7.0))
        put(np.full((seq, hd // 2), -7.0))
        if not tied:
            put(tensors["output.weight"])


def random_tensors(rng, dims, tied):
    dim, hidden, L, H, KV, V, seq = dims
    kv = dim // H * KV
    t = {"tok_embeddings.weight": rng.standard_normal((V, dim)), "norm.weight": rng.random(dim)}
    for i in range(L):
        p = f"layers.{i}."
        t.update({p + "attention_norm.weight": rng.random(dim), p + "ffn_norm.weight": rng.random(dim),
                  p + "attention.wq.weight": rng.standard_normal((dim, dim)),
                  p + "attention.wk.weight": rng.standard_normal((kv, dim)),
                  p + "attention.wv.weight": rng.standard_normal((kv, dim)),
                  p + "attention.wo.weight": rng.standard_normal((dim, dim)),
                  p + "feed_forward.w1.weight": rng.standard_normal((hidden, dim)),
                  p + "feed_forward.w2.weight": rng.standard_normal((dim, hidden)),
                  p + "feed_forward.w3.weight": rng.standard_normal((hidden, dim))})
    if not tied:
        t["output.weight"] = rng.standard_normal((V, dim))
    return {k: v.astype(np.float32) for k, v in t.items()}


@pytest.mark.parametrize("tied", [True, False])
def test_independent_v0_writer_loads(tmp_path, rng, tied):
    dims = (16, 40, 2, 4, 2, 37, 12)
    tensors = random_tensors(rng, dims, tied)
    path = tmp_path / "m.bin"
    write_v0(path, dims, tensors, tied)
    m = Llama.load(path)
    c = m.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size,
            c.max_seq_len) == dims
    assert c.shared_classifier == tied
    assert set(m.params) == set(tensors)
    for name, a in tensors.items():
        np.testing.assert_array_equal(m.params[name], a, err_msg=name)
    if not tied:  # the freq_cis tables (7, -7) were skipped, not read as the classifier
        assert not np.isin(m.params["output.weight"], (7.0, -7.0)).any()


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_round_trip_is_bit_exact(tmp_path, rng, tied):
    cfg = LlamaConfig(dim=24, hidden_dim=40, n_layers=3, n_heads=6, n_kv_heads=3, vocab_size=50,
                      max_seq_len=20, shared_classifier=tied)
    m = Llama(cfg, seed=3)
    m.flat_params[:] = rng.standard_normal(m.n_params).astype(np.float32)
    path = tmp_path / "model.bin"
    m.save(path)
    m2 = Llama.load(path)
    assert m2.config == cfg
    np.testing.assert_array_equal(m2.flat_params, m.flat_params)
    assert m2.flat_params.tobytes() == m.flat_params.tobytes()
    # the file is the v0 layout: header, then the embedding right after it
    raw = open(path, "rb").read()
    assert struct.unpack("7i", raw[:28]) == (24, 40, 3, 6, 3, 50 if tied else -50, 20)
    emb = np.frombuffer(raw[28:28 + 4 * 50 * 24], dtype="<f4")
    np.testing.assert_array_equal(emb, m.params["tok_embeddings.weight"].ravel())
    # freq_cis_real starts with cos(0) = 1 for every pair at position 0
    cos_off = 28 + 4 * (m.n_params - (0 if tied else 50 * 24))
    np.testing.assert_array_equal(np.frombuffer(raw[cos_off:cos_off + 4 * 2], "<f4"), [1.0, 1.0])
    if not tied:
        tail = np.frombuffer(raw[-4 * 50 * 24:], "<f4")
        np.testing.assert_array_equal(tail, m.params["output.weight"].ravel())


def test_truncated_and_oversized_files_raise(tmp_path):
    m = Llama(LlamaConfig.preset("tiny"), seed=0)
    path = tmp_path / "m.bin"
    m.save(path)
    raw = open(path, "rb").read()
    bad = tmp_path / "bad.bin"
    for cut, pattern in ((len(raw) - 4, "truncated"), (10, "truncated"), (0, "truncated")):
        bad.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match=pattern):
            Llama.load(bad)
    bad.write_bytes(raw + b"\0" * 8)
    with pytest.raises(CheckpointError, match="longer"):
        Llama.load(bad)


def test_corrupt_header_and_values_raise(tmp_path):
    m = Llama(LlamaConfig.preset("tiny"), seed=0)
    path = tmp_path / "m.bin"
    m.save(path)
    raw = bytearray(open(path, "rb").read())
    bad = tmp_path / "bad.bin"
    hdr = list(struct.unpack("7i", raw[:28]))
    for i, val, pattern in ((3, 5, "corrupt header"), (0, -3, "corrupt header"),
                            (4, 3, "corrupt header")):
        h = hdr.copy()
        h[i] = val
        bad.write_bytes(struct.pack("7i", *h) + raw[28:])
        with pytest.raises(CheckpointError, match=pattern):
            Llama.load(bad)
    bad.write_bytes(struct.pack("<I", 0x616B3432) + raw[4:])
    with pytest.raises(CheckpointError, match="version-1"):
        Llama.load(bad)
    nan = bytearray(raw)
    nan[28 + 4 * 5:28 + 4 * 6] = struct.pack("<f", float("nan"))
    bad.write_bytes(bytes(nan))
    with pytest.raises(CheckpointError, match="tok_embeddings.*non-finite"):
        Llama.load(bad)
    with pytest.raises(CheckpointError, match="cannot read"):
        Llama.load(tmp_path / "missing.bin")


def test_save_is_atomic(tmp_path, monkeypatch):
    m = Llama(LlamaConfig.preset("tiny"), seed=0)
    path = tmp_path / "model.bin"
    m.save(path)
    before = open(path, "rb").read()
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask   # not mkstemp's 0600
    m.flat_params[:] = 0.5
    import anebackward.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")
    # fail inside the temporary-file write, after part of the new file was written
    monkeypatch.setattr(ck.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        m.save(path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["model.bin"]   # no temporary left behind
    monkeypatch.undo()
    m.save(path)                                   # and a save that succeeds replaces it
    assert open(path, "rb").read() != before


def test_optimizer_state_round_trip(tmp_path, rng):
    cfg = LlamaConfig.preset("tiny")
    m = Llama(cfg, seed=0)
    opt = AdamW(m, lr=3e-3, weight_decay=0.05)
    m.flat_grads[:] = rng.standard_normal(m.n_params).astype(np.float32)
    opt.step()
    opt.step()
    path = tmp_path / "optimizer.bin"
    save_optimizer(opt, path, extra={"step": 2, "seed": 9})
    opt2 = AdamW(Llama(cfg, seed=1))
    assert load_optimizer(opt2, path) == {"step": 2, "seed": 9}
    assert opt2.step_count == 2 and opt2.lr == 3e-3 and opt2.weight_decay == 0.05
    np.testing.assert_array_equal(opt2.m, opt.m)
    np.testing.assert_array_equal(opt2.v, opt.v)
    raw = open(path, "rb").read()
    (tmp_path / "cut.bin").write_bytes(raw[:-4])
    with pytest.raises(CheckpointError, match="truncated"):
        load_optimizer(opt2, tmp_path / "cut.bin")
    other = AdamW(Llama(cfg.replace(n_layers=1)))
    with pytest.raises(CheckpointError, match="parameters"):
        load_optimizer(other, path)
    (tmp_path / "junk.bin").write_bytes(b"hello world, not a state file")
    with pytest.raises(CheckpointError, match="magic"):
        load_optimizer(opt2, tmp_path / "junk.bin")


def test_read_header_only(tmp_path):
    m = Llama(LlamaConfig.preset("tiny", shared_classifier=False))
    m.save(tmp_path / "m.bin")
    assert read_header(tmp_path / "m.bin") == m.config
