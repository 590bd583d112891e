"""llama2.c checkpoints ("v0", legacy_export in llama2.c's export.py, read by
run.c) and the optimizer state file that sits beside them.

v0 layout, little-endian, all float32 after the header:
  header   7 x int32: dim, hidden_dim, n_layers, n_heads, n_kv_heads,
           vocab_size (negative = untied classifier), max_seq_len
  tok_embeddings [vocab, dim]
  attention_norm [L, dim], wq [L, dim, dim], wk [L, kv_dim, dim],
  wv [L, kv_dim, dim], wo [L, dim, dim],
  ffn_norm [L, dim], w1 [L, hidden, dim], w2 [L, dim, hidden], w3 [L, hidden, dim]
  norm [dim]
  freq_cis_real [max_seq_len, head_dim/2], freq_cis_imag [same]
  output [vocab, dim]  only when untied
Each per-kind stack is one contiguous region of Llama.flat_params, so a load
is one readinto() per stack straight into the model's buffer (no copies) and
a save one write() per stack. run.c ignores the freq_cis tables (it
recomputes RoPE); we write them like export.py and skip them on load —
before the untied classifier, which is what the origin project got wrong.

Saves are atomic: the file is written under a temporary name in the same
directory, flushed, fsynced and renamed over the target (os.replace).
"""
import json
import os
import struct

import numpy as np

from . import _checks as C
from .atomicfile import atomic_write, open_regular
from .config import LlamaConfig
from .errors import CheckpointError
from .kernels.optim import check_adamw_hparams, check_adamw_step
from .layout import param_layout

HEADER = struct.Struct("<7i")
V1_MAGIC = 0x616B3432   # llama2.c export.py version >= 1 files start with "ak42"
OPT_MAGIC = b"ABOPT01\n"


def freq_cis(max_seq_len, head_dim):
    """The two RoPE tables export.py writes (llama2.c precompute_freqs_cis,
    float32): cos and sin of t * 10000^(-2i/head_dim), [max_seq_len, head_dim/2]."""
    freqs = (1.0 / (np.float32(10000.0) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                           / np.float32(head_dim)))).astype(np.float32)
    ang = np.outer(np.arange(max_seq_len, dtype=np.float32), freqs).astype(np.float32)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def _regions(model):
    """(name, flat start, n floats) of each stored stack, in v0 file order;
    ("freq_cis", None, n) marks the skipped RoPE tables."""
    c, lay = model.config, model.layout
    L, D, Hd, V, kv = c.n_layers, c.dim, c.hidden_dim, c.vocab_size, c.kv_dim
    regions = [("tok_embeddings", lay["tok_embeddings"], V * D),
               ("attention_norm", lay["attention_norm"], L * D),
               ("wq", lay["wq"], L * D * D), ("wk", lay["wk"], L * kv * D),
               ("wv", lay["wv"], L * kv * D), ("wo", lay["wo"], L * D * D),
               ("ffn_norm", lay["ffn_norm"], L * D),
               ("w1", lay["w1"], L * Hd * D), ("w2", lay["w2"], L * D * Hd),
               ("w3", lay["w3"], L * Hd * D), ("norm", lay["norm"], D),
               ("freq_cis", None, c.max_seq_len * c.head_dim)]
    if not c.shared_classifier:
        regions.append(("output", lay["output"], V * D))
    return regions


def expected_size(config):
    """Bytes of a v0 file for this configuration."""
    lay = param_layout(config)
    return HEADER.size + 4 * (lay["n_params"] + config.max_seq_len * config.head_dim)


def read_header(path):
    """The LlamaConfig of a v0 checkpoint (header only)."""
    try:
        with open_regular(path, "checkpoint") as f:
            raw = f.read(HEADER.size)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(raw) < HEADER.size:
        raise CheckpointError(f"{path}: truncated: the header needs {HEADER.size} bytes, the file "
                              f"has {len(raw)}")
    vals = HEADER.unpack(raw)
    if vals[0] == V1_MAGIC:
        raise CheckpointError(f"{path}: this is a llama2.c version-1+ file (magic 'ak42'); only the "
                              "v0 format is supported: export with `python export.py --version 0`")
    dim, hidden, L, H, KV, vocab, seq = vals
    try:
        config = LlamaConfig(dim=dim, hidden_dim=hidden, n_layers=L, n_heads=H, n_kv_heads=KV,
                             vocab_size=abs(vocab), max_seq_len=seq, shared_classifier=vocab > 0)
        expected_size(config)   # sizes the C layout accepts (no overflow, BLAS-sized dims)
        return config
    except (ValueError, TypeError) as e:
        names = "dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len"
        raise CheckpointError(f"{path}: corrupt header ({names} = {vals}): {e}") from None


def load_model(path, model_class, *, backend=None):
    """A model_class (anebackward.Llama) from a llama2.c v0 checkpoint.
    CheckpointError names what is wrong with a truncated, oversized, corrupt
    or unreadable file. (The class is passed in: this module reads and writes
    the format and imports no model.)"""
    path = os.fspath(path)
    config = read_header(path)
    want = expected_size(config)
    size = os.path.getsize(path)
    if size != want:
        what = "truncated" if size < want else "longer than its header says"
        raise CheckpointError(
            f"{path}: {what}: the file has {size} bytes, the header (dim={config.dim}, "
            f"hidden_dim={config.hidden_dim}, n_layers={config.n_layers}, n_heads={config.n_heads}, "
            f"n_kv_heads={config.n_kv_heads}, vocab_size={config.vocab_size}, "
            f"max_seq_len={config.max_seq_len}, "
            f"{'tied' if config.shared_classifier else 'untied'} classifier) needs {want}")
    model = model_class(config, init=False, backend=backend)
    with open_regular(path, "checkpoint") as f:
        f.seek(HEADER.size)
        for name, start, n in _regions(model):
            if start is None:
                f.seek(4 * n, os.SEEK_CUR)
                continue
            dst = model.flat_params[start:start + n]
            got = f.readinto(memoryview(dst).cast("B"))
            if got != 4 * n:
                raise CheckpointError(f"{path}: truncated while reading {name} ({got} of {4 * n} "
                                      "bytes)")
            if not np.isfinite(dst).all():
                bad = int(np.flatnonzero(~np.isfinite(dst))[0])
                raise CheckpointError(f"{path}: corrupt: {name} holds a non-finite value "
                                      f"({dst[bad]} at element {bad})")
    return model


def save_model(model, path):
    """Write model as a llama2.c v0 checkpoint, atomically. A Hugging Face
    model whose only difference from llama2.c is the rotate-half RoPE layout
    is written with its q/k rows permuted back to interleaved pairs (the same
    network; through a converted copy of the model). Anything else the v0
    format cannot hold (head_dim != dim/n_heads, q/k norms, another rope
    theta or scaling, norm_eps != 1e-5) is a CheckpointError."""
    c = model.config
    if c.rope_layout == "half" and c.replace(rope_layout="interleaved").is_llama2c:
        from .hf import half_to_interleaved
        conv = type(model)(c.replace(rope_layout="interleaved"), init=False)
        for name, a in model.params.items():
            if ".lora_" in name:     # merged into the base weights (Llama.save checks)
                continue
            qk = name.endswith((".wq.weight", ".wk.weight"))
            conv.params[name][...] = half_to_interleaved(a, c.head_dim) if qk else a
        model, c = conv, conv.config
    if not c.is_llama2c:
        raise CheckpointError(
            f"{path}: the llama2.c v0 format cannot hold this model (it needs head_dim = dim / "
            f"n_heads, no q/k norms, rope_theta 10000, no rope scaling and norm_eps 1e-5; this "
            f"one has head_dim={c.head_dim}, qk_norm={c.qk_norm}, rope_theta={c.rope_theta:g}, "
            f"rope_scaling={c.rope_scaling}, norm_eps={c.norm_eps:g}); write a Hugging Face directory instead "
            "(save_pretrained, --format hf)")
    vocab = c.vocab_size if c.shared_classifier else -c.vocab_size
    header = HEADER.pack(c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, vocab,
                         c.max_seq_len)
    cos, sin = freq_cis(c.max_seq_len, c.head_dim)

    def write(f):
        f.write(header)
        for _, start, n in _regions(model):
            if start is None:
                f.write(memoryview(cos).cast("B"))
                f.write(memoryview(sin).cast("B"))
            else:
                f.write(memoryview(model.flat_params[start:start + n]).cast("B"))
    atomic_write(path, write)


# -- optimizer state -----------------------------------------------------------
# File layout (our own): 8-byte magic "ABOPT01\n", uint64 length of a UTF-8
# JSON object (step, lr, betas, eps, weight_decay, n_params, n_decay, config,
# extra, n_grads), the JSON, then m and v as float32[n_grads] each (n_grads:
# the trainable tensors' floats, n_params unless some are frozen; files
# without it hold n_params).

def save_optimizer(opt, path, extra=None):
    """Write AdamW state (moments, step, hyperparameters) and a JSON-able
    `extra` dict (e.g. the trainer's position) atomically."""
    m = opt.model
    meta = {"step": opt.step_count, "lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps,
            "weight_decay": opt.weight_decay, "n_params": m.n_params, "n_decay": m.n_decay,
            "n_grads": m.n_grads,
            "config": {k: getattr(m.config, k) for k in (
                "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                "max_seq_len", "shared_classifier", "norm_eps")},
            "extra": extra or {}}
    blob = json.dumps(meta, sort_keys=True).encode()

    def write(f):
        f.write(OPT_MAGIC)
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        f.write(memoryview(opt.m).cast("B"))
        f.write(memoryview(opt.v).cast("B"))
    atomic_write(path, write)


def load_optimizer(opt, path):
    """Restore AdamW state saved by save_optimizer into opt (whose model must
    have the same configuration). Returns the saved `extra` dict."""
    path = os.fspath(path)
    try:
        f = open_regular(path, "optimizer state")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read optimizer state: {e.strerror or e}") from None
    with f:
        head = f.read(16)
        if len(head) < 16 or head[:8] != OPT_MAGIC:
            raise CheckpointError(f"{path}: not an anebackward optimizer state file (bad magic or "
                                  "truncated header)")
        (n,) = struct.unpack("<Q", head[8:])
        if n > 1 << 20:
            raise CheckpointError(f"{path}: corrupt: metadata length {n}")
        try:
            meta = json.loads(f.read(n).decode())
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt metadata: {e}") from None
        model = opt.model
        fn = "optimizer metadata"
        try:   # every field checked before anything of opt is touched
            if not isinstance(meta, dict):
                raise ValueError("the metadata is not a JSON object")
            missing = [k for k in ("step", "lr", "betas", "eps", "weight_decay", "n_params",
                                   "n_decay") if k not in meta]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
            step = check_adamw_step(fn, meta["step"], lo=0)
            lr, betas, eps, wd = check_adamw_hparams(fn, lr=meta["lr"], betas=meta["betas"],
                                                     eps=meta["eps"],
                                                     weight_decay=meta["weight_decay"])
            meta.setdefault("n_grads", meta["n_params"])
            for k in ("n_params", "n_decay", "n_grads"):
                C.nonneg_int(fn, k, meta[k])
            extra = meta.get("extra", {})
            if not isinstance(extra, dict):
                raise ValueError(f"extra must be a JSON object, got {type(extra).__name__}")
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt metadata: {e}") from None
        if meta["n_params"] != model.n_params or meta["n_decay"] != model.n_decay:
            raise CheckpointError(
                f"{path}: optimizer state is for {meta['n_params']} parameters of which "
                f"{meta['n_decay']} decay, the model has {model.n_params} of which "
                f"{model.n_decay} decay (" + ("n_params" if meta["n_params"] != model.n_params
                                               else "n_decay") + " differs)")
        if meta["n_grads"] != model.n_grads:
            raise CheckpointError(f"{path}: optimizer state is for {meta['n_grads']} trainable "
                                  f"parameters, the model trains {model.n_grads}")
        want = 16 + n + 8 * model.n_grads
        size = os.fstat(f.fileno()).st_size
        if size != want:
            raise CheckpointError(f"{path}: {'truncated' if size < want else 'oversized'}: "
                                  f"{size} bytes, expected {want}")
        m = np.empty_like(opt.m)
        v = np.empty_like(opt.v)
        for a in (m, v):   # size checked above
            if f.readinto(memoryview(a).cast("B")) != a.nbytes:
                raise CheckpointError(f"{path}: truncated optimizer moments")
        if not (np.isfinite(m).all() and np.isfinite(v).all() and (v >= 0).all()):
            raise CheckpointError(f"{path}: corrupt: non-finite moments (or negative second moments)")
    opt.m[:] = m
    opt.v[:] = v
    opt.step_count = step
    opt.lr = lr
    opt.betas = betas
    opt.eps = eps
    opt.weight_decay = wd
    return extra
