"""Hugging Face model directories: read and write them for anebackward.Llama.

A directory holds config.json and model.safetensors (or shards listed by
model.safetensors.index.json). model_type "llama" (Llama 2/3, SmolLM2) and
"qwen3" are the same network as the C model with HF's switches: rotate-half
RoPE, rope_theta, Llama-3 rope scaling, head_dim, Qwen3's q/k norms.

Tensors are read with the safetensors package (NumPy API): float32, float16
and bfloat16 are converted to float32 as they are copied into the model's one
flat buffer. (numpy has no bfloat16: a file holding bfloat16 tensors is read
whole through safetensors.deserialize, one transient copy of that file.)

Writing: float32 model.safetensors + config.json, each atomically, and the
tokenizer the model goes with (TokenizerFiles: the tokenizer files of the
directory it was loaded from, or the one passed to save_pretrained). A llama2.c
(interleaved-RoPE) model is written in HF's rotate-half layout by permuting
the rows of wq and wk inside each head, which gives the same network (the
attention scores are invariant to one permutation applied to q and k).

Anything this module cannot represent exactly — another model_type, an
attention bias, sliding-window attention, partial rotary, another rope type,
missing / extra / misshaped tensors, a truncated file — is a CheckpointError
naming the file and the reason.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .atomicfile import atomic_write
from .config import LlamaConfig
from .errors import CheckpointError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None}

# our tensor names (anebackward.layout) -> HF's, per layer and global
_LAYER = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
          "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
          "attention.q_norm": "self_attn.q_norm", "attention.k_norm": "self_attn.k_norm",
          "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
          "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
          "ffn_norm": "post_attention_layernorm"}
_GLOBAL = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}


def hf_name(name: str) -> str:
    """HF's name of one of our tensors ("layers.3.attention.wq.weight" ->
    "model.layers.3.self_attn.q_proj.weight"; a LoRA adapter
    "layers.3.attention.wq.lora_A.weight" -> "model.layers.3.self_attn.q_proj.lora_A.weight",
    peft's module path)."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    _, i, rest = name.split(".", 2)
    stem = rest[:-len('.weight')]
    if ".lora_" in stem:
        kind, ab = stem.split(".lora_")
        return f"model.layers.{i}.{_LAYER[kind]}.lora_{ab}.weight"
    return f"model.layers.{i}.{_LAYER[stem]}.weight"


def is_hf_dir(path: str | os.PathLike) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))


# ---- config ------------------------------------------------------------------
def _bad(path, why):
    return CheckpointError(f"{path}: {why}")


MAX_SIZE = 2**31 - 1          # any size field (the C core's dims are int)
MAX_POSITIONS = 1 << 24       # max_position_embeddings (RoPE positions; 1M-context models fit)
_MISSING = object()


def _field(d, path, name, kind, default=_MISSING):
    """d[name] checked to be of `kind` ("bool", "int", "number", "str",
    "dict", "list"); absent or null gives default (absent without a default:
    CheckpointError "missing config field"). Each mistake is a
    CheckpointError naming the file and the field."""
    v = d.get(name)
    if v is None:
        if default is _MISSING:
            raise _bad(path, f"missing config field {name}")
        return default
    ok = {"bool": isinstance(v, bool),
          "int": isinstance(v, int) and not isinstance(v, bool),
          "number": isinstance(v, (int, float)) and not isinstance(v, bool),
          "str": isinstance(v, str), "dict": isinstance(v, dict),
          "list": isinstance(v, list)}[kind]
    if not ok:
        what = {"bool": "a JSON boolean (true/false)", "int": "an integer",
                "number": "a number", "str": "a string", "dict": "a JSON object",
                "list": "a JSON array"}[kind]
        raise _bad(path, f"config field {name} must be {what}, got {v!r}")
    if kind == "int" and not 1 <= v <= MAX_SIZE:
        raise _bad(path, f"config field {name} must be in [1, {MAX_SIZE}], got {v}")
    if kind == "number" and not math.isfinite(v):
        raise _bad(path, f"config field {name} must be finite, got {v!r}")
    return v


def config_from_hf(d: Dict[str, Any], path: str = CONFIG) -> LlamaConfig:
    """The LlamaConfig of an HF config.json dict (transformers 4 or 5 style).
    Every field is type-checked (booleans must be JSON booleans) and every
    size bounded; a mistake is a CheckpointError naming the file and field.
    The sizes are checked against the tensors by load_pretrained."""
    if not isinstance(d, dict):
        raise _bad(path, "not a JSON object")
    mt = d.get("model_type")
    if not isinstance(mt, str) or mt not in MODEL_TYPES:
        raise _bad(path, f"unsupported model_type {mt!r} (supported: {', '.join(MODEL_TYPES)})")
    f = lambda name, kind, default=_MISSING: _field(d, path, name, kind, default)  # noqa: E731
    layer_types = f("layer_types", "list", [])
    if not all(isinstance(t, str) for t in layer_types):
        raise _bad(path, f"config field layer_types must be a list of strings, got "
                         f"{layer_types!r}")
    unsupported = [   # (field, is it unsupported here, why)
        ("hidden_act", f("hidden_act", "str", "silu") not in ("silu", "swish"),
         "only silu (SwiGLU) is implemented"),
        ("attention_bias", f("attention_bias", "bool", False), "no attention biases"),
        ("mlp_bias", f("mlp_bias", "bool", False), "no MLP biases"),
        ("use_sliding_window", f("use_sliding_window", "bool", False),
         "no sliding-window attention"),
        ("layer_types", any(t != "full_attention" for t in layer_types),
         "only full_attention layers"),
        ("attention_dropout", f("attention_dropout", "number", 0.0) != 0.0,
         "no attention dropout"),
    ]
    for field, bad, why in unsupported:
        if bad:
            raise _bad(path, f"unsupported config field {field}={d.get(field)!r} ({why})")
    rp = f("rope_parameters", "dict", {})
    if rp and "rope_type" not in rp and "rope_theta" not in rp:
        raise _bad(path, "per-layer rope_parameters are not supported")
    theta = _field(rp, path, "rope_theta", "number", None) if "rope_theta" in rp else \
        f("rope_theta", "number", 10000.0)
    if rp.get("rope_type", "default") != "default":
        scaling = rp
    else:
        scaling = f("rope_scaling", "dict", None)
    prf = _field(scaling, path, "partial_rotary_factor", "number", None) if scaling else None
    if float(prf if prf is not None else f("partial_rotary_factor", "number", 1.0)) != 1.0:
        raise _bad(path, "unsupported config field partial_rotary_factor (partial RoPE)")
    tie = f("tie_word_embeddings", "bool", False)
    H = f("num_attention_heads", "int")
    positions = f("max_position_embeddings", "int", 2048)
    if positions > MAX_POSITIONS:
        raise _bad(path, f"config field max_position_embeddings must be at most "
                         f"{MAX_POSITIONS}, got {positions}")
    try:
        return LlamaConfig(
            dim=f("hidden_size", "int"), hidden_dim=f("intermediate_size", "int"),
            n_layers=f("num_hidden_layers", "int"), n_heads=H,
            n_kv_heads=f("num_key_value_heads", "int", H), vocab_size=f("vocab_size", "int"),
            max_seq_len=positions, shared_classifier=tie,
            norm_eps=f("rms_norm_eps", "number", 1e-6), head_dim=f("head_dim", "int", None),
            qk_norm=(mt == "qwen3"), rope_theta=theta, rope_scaling=scaling, rope_layout="half")
    except NotImplementedError as e:
        raise _bad(path, f"unsupported rope scaling: {e}") from None
    except (TypeError, ValueError) as e:
        raise _bad(path, f"invalid config: {e}") from None


def config_to_hf(c: LlamaConfig, model_type: str | None = None) -> Dict[str, Any]:
    """config.json for a LlamaConfig (rope written in rotate-half form).
    model_type: "qwen3" iff the model has q/k norms, else "llama"."""
    mt = model_type or ("qwen3" if c.qk_norm else "llama")
    if (mt == "qwen3") != c.qk_norm:
        raise ValueError(f"config_to_hf: model_type {mt!r} needs qk_norm={mt == 'qwen3'}")
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        rope = dict(c.rope_scaling, rope_theta=c.rope_theta)
    d = {"architectures": [MODEL_TYPES[mt]], "model_type": mt, "hidden_size": c.dim,
         "intermediate_size": c.hidden_dim, "num_hidden_layers": c.n_layers,
         "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
         "head_dim": c.head_dim, "vocab_size": c.vocab_size,
         "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps,
         "tie_word_embeddings": c.shared_classifier, "hidden_act": "silu",
         "attention_bias": False, "attention_dropout": 0.0, "rope_parameters": rope,
         "dtype": "float32", "use_cache": True}
    if mt == "llama":
        d["mlp_bias"] = False
    else:
        d["use_sliding_window"] = False
        d["layer_types"] = ["full_attention"] * c.n_layers
    return d


# ---- RoPE layout of q/k rows ----------------------------------------------------
def interleaved_to_half(w: np.ndarray, head_dim: int) -> np.ndarray:
    """Rows of a q/k projection (or a q/k norm weight) reordered inside each
    head from llama2.c's pairs (2i, 2i+1) to HF's (i, i + head_dim/2)."""
    lead = w.shape[0] // head_dim
    return w.reshape(lead, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def half_to_interleaved(w: np.ndarray, head_dim: int) -> np.ndarray:
    lead = w.shape[0] // head_dim
    return w.reshape(lead, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_QK = ("attention.wq.weight", "attention.wk.weight", "attention.q_norm.weight",
       "attention.k_norm.weight")


# ---- reading -----------------------------------------------------------------------
def _weight_files(directory: str) -> Dict[Optional[str], str]:
    """HF tensor name -> file, from the index (sharded) or the one file
    (then the one key None: every tensor)."""
    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):
        d = _read_json(index)
        if not isinstance(d, dict) or "weight_map" not in d:
            raise _bad(index, "missing field weight_map")
        wm = d["weight_map"]
        if not isinstance(wm, dict):
            raise _bad(index, f"field weight_map must be a JSON object (tensor name -> file), "
                              f"got {type(wm).__name__}")
        for k, v in wm.items():
            if not isinstance(v, str) or not v or os.path.basename(v) != v or v in (".", ".."):
                raise _bad(index, f"field weight_map[{k!r}] must be a file name in the "
                                  f"directory, got {v!r}")
        return {k: os.path.join(directory, v) for k, v in wm.items()}
    single = os.path.join(directory, WEIGHTS)
    if not os.path.isfile(single):
        raise _bad(directory, f"no {WEIGHTS} and no {INDEX}")
    return {None: single}


class _Reader:
    """One safetensors file: names, dtypes, shapes, and float32 copies."""

    def __init__(self, path):
        from safetensors import SafetensorError, safe_open
        import stat
        self.path, self._raw = path, None
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise _bad(path, "not a regular file (a FIFO or a device?)")
        except OSError as e:
            raise _bad(path, f"cannot read: {e.strerror or e}") from None
        try:
            self._f = safe_open(path, framework="np")
            self.names = list(self._f.keys())
            self.info = {}
            for k in self.names:
                sl = self._f.get_slice(k)
                self.info[k] = (sl.get_dtype(), tuple(sl.get_shape()))
        except (SafetensorError, OSError) as e:
            raise _bad(path, f"not a readable safetensors file (truncated or corrupt?): {e}") from None

    def copy_into(self, name, dst):
        dtype, shape = self.info[name]
        if dtype not in _DTYPES:
            raise _bad(self.path, f"{name} has dtype {dtype}; supported: F32, F16, BF16")
        try:
            if dtype == "BF16":
                if self._raw is None:
                    import safetensors
                    with open(self.path, "rb") as f:
                        self._raw = dict(safetensors.deserialize(f.read()))
                bits = np.frombuffer(self._raw[name]["data"], dtype="<u2")
                dst.reshape(-1).view(np.uint32)[:] = bits.astype(np.uint32) << 16
            else:
                dst[...] = self._f.get_tensor(name).reshape(dst.shape)
        except Exception as e:   # the package's errors (truncation) carry no common type
            if isinstance(e, CheckpointError):
                raise
            raise _bad(self.path, f"cannot read {name} (truncated or corrupt?): {e}") from None
        if not np.isfinite(dst).all():
            raise _bad(self.path, f"{name} holds non-finite values")


def _read_json(path, limit=64 << 20):
    """A JSON file (a regular file of at most `limit` bytes, UTF-8)."""
    from .atomicfile import open_regular
    try:
        with open_regular(path, "JSON file") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise _bad(path, f"{size:,} bytes: larger than any config or index "
                                 f"({limit:,} at most)")
            return json.loads(f.read(size).decode("utf-8"))
    except OSError as e:
        raise _bad(path, f"cannot read: {e.strerror or e}") from None
    except ValueError as e:         # UnicodeDecodeError too
        raise _bad(path, f"not JSON: {e}") from None


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def _check_against_tensors(config, where, cpath):
    """The config's sizes checked against the tensor shapes in the
    safetensors headers, before anything of the model's size is allocated
    (a config can claim any size; the files on disk cannot). Returns
    HF name -> (our name, shape) of every tensor the model needs."""
    layers = {int(m.group(1)) for k in where for m in [_LAYER_RE.match(k)] if m}
    if config.n_layers > len(layers):
        raise _bad(cpath, f"config field num_hidden_layers is {config.n_layers}, the "
                          f"safetensors files hold {len(layers)} layers")

    def shape(k):
        r, name = where[k]
        return r.info[name][1]
    probes = [("model.embed_tokens.weight", (config.vocab_size, config.dim),
               "vocab_size, hidden_size"),
              ("model.layers.0.mlp.gate_proj.weight", (config.hidden_dim, config.dim),
               "intermediate_size, hidden_size"),
              ("model.layers.0.self_attn.q_proj.weight", (config.q_dim, config.dim),
               "num_attention_heads x head_dim, hidden_size"),
              ("model.layers.0.self_attn.k_proj.weight", (config.kv_dim, config.dim),
               "num_key_value_heads x head_dim, hidden_size")]
    for k, want, fields in probes:
        if k in where and tuple(shape(k)) != want:
            raise _bad(cpath, f"config fields {fields} give {k} the shape {list(want)}; the "
                              f"file {where[k][0].path} holds {list(shape(k))}")
    from .layout import tensor_specs
    try:
        specs = tensor_specs(config)
    except (ValueError, RuntimeError) as e:     # sizes whose products overflow the C layout
        raise _bad(cpath, f"invalid config: {e}") from None
    wanted = {hf_name(n): (n, shp) for n, _, shp in specs}
    for hk, (_, shp) in wanted.items():
        if hk in where and tuple(shape(hk)) != tuple(shp):
            raise _bad(where[hk][0].path, f"{hk} has shape {list(shape(hk))}, the config needs "
                                          f"{list(shp)}")
    return wanted


def load_pretrained(directory, model_class, *, backend=None, recompute=False, **model_args):
    """A model_class (Llama) from an HF directory; see the module doc."""
    directory = os.fspath(directory)
    cpath = os.path.join(directory, CONFIG)
    d = _read_json(cpath)
    if not isinstance(d, dict):
        raise _bad(cpath, "not a JSON object")
    config = config_from_hf(d, cpath)
    files = _weight_files(directory)
    readers: Dict[str, _Reader] = {}
    where: Dict[str, Tuple[_Reader, str]] = {}
    for name, path in files.items():
        if path not in readers:
            readers[path] = _Reader(path)
        if name is not None and name not in readers[path].info:
            raise _bad(path, f"{name} is listed in {INDEX} but missing from the file")
    for r in readers.values():
        for k in r.names:
            if None in files or files.get(k) == r.path:
                where[k] = (r, k)
    wanted = {hk: n for hk, (n, _) in _check_against_tensors(config, where, cpath).items()}
    ignorable = {"lm_head.weight"} if config.shared_classifier else set()
    extra = sorted(k for k in where if k not in wanted and k not in ignorable
                   and not k.endswith("rotary_emb.inv_freq"))
    if extra:
        r = where[extra[0]][0]
        raise _bad(r.path, f"unexpected tensors {', '.join(extra[:5])}"
                           f"{' ...' if len(extra) > 5 else ''} (not part of a {d['model_type']} "
                           "model with this config)")
    missing = sorted(k for k in wanted if k not in where)
    if missing:
        raise _bad(directory, f"missing tensors {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''}")
    model = model_class(config, backend=backend, init=False, recompute=recompute, **model_args)
    for hk, ours in wanted.items():
        r, k = where[hk]
        dst = model.params[ours]
        if r.info[k][1] != dst.shape:
            raise _bad(r.path, f"{k} has shape {list(r.info[k][1])}, the config needs "
                               f"{list(dst.shape)}")
        r.copy_into(k, dst)
    model.flat_grads[:] = 0.0
    model.tokenizer_files = TokenizerFiles.read(directory, d)
    return model


# ---- writing -----------------------------------------------------------------------
def hf_state(model) -> Dict[str, np.ndarray]:
    """HF name -> float32 array of a model, in rotate-half layout (llama2.c
    models are permuted; other arrays are the model's own views)."""
    c = model.config
    out = {}
    for name, a in model.params.items():
        if ".lora_" in name:     # adapters: folded in unless the model is merged already
            continue
        if model.lora is not None and not model.lora_merged:
            d = model.lora_delta(name)
            a = a if d is None else a + d
        if c.rope_layout == "interleaved" and name.endswith(_QK):
            a = interleaved_to_half(a, c.head_dim)
        out[hf_name(name)] = a
    return out


def save_pretrained(model, directory, tokenizer: Any = None) -> None:
    """config.json + model.safetensors (float32) in directory (created if
    needed), and the tokenizer (see TokenizerFiles.of; None: the model's
    own tokenizer_files, those of the directory it was loaded from); each
    file replaced atomically, the weights first and config.json last."""
    from safetensors.numpy import save
    directory = os.fspath(directory)
    files = model.tokenizer_files if tokenizer is None else \
        TokenizerFiles.of(tokenizer, model.config.vocab_size)
    os.makedirs(directory, exist_ok=True)
    c = model.config
    cfg = config_to_hf(c.replace(rope_layout="half"))
    if c.rope_layout == "interleaved":
        cfg["anebackward_converted_from"] = "llama2c interleaved RoPE (q/k rows permuted)"
    if files is not None:
        cfg.update(files.token_ids)
    data = save(hf_state(model), metadata={"format": "pt"})
    atomic_write(os.path.join(directory, WEIGHTS), lambda f: f.write(data))
    if files is not None:
        files.write(directory)
    text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    atomic_write(os.path.join(directory, CONFIG), lambda f: f.write(text.encode()))


# ---- tokenizer files -------------------------------------------------------------
TOKENIZER = "tokenizer.json"
# the files of an HF directory that belong to its tokenizer (and its generation
# settings); copied whole by TokenizerFiles
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json",
                   "tokenizer.bin")
# config.json's fields that name tokens (written beside the model's own fields)
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _token_ids(d: Any) -> Dict[str, Any]:
    """The TOKEN_ID_FIELDS of a config.json dict that hold a token id or a
    list of them."""
    out: Dict[str, Any] = {}
    for k in TOKEN_ID_FIELDS:
        v = d.get(k) if isinstance(d, dict) else None
        ok = lambda t: isinstance(t, int) and not isinstance(t, bool) and t >= 0  # noqa: E731
        if ok(v) or (isinstance(v, list) and v and all(ok(t) for t in v)):
            out[k] = v
    return out


class TokenizerFiles:
    """The tokenizer of a model directory: files (name -> bytes, copied as
    they are) and the token ids config.json names (bos_token_id,
    eos_token_id, pad_token_id). save_pretrained writes both."""

    def __init__(self, files: Dict[str, bytes], token_ids: Optional[Dict[str, Any]] = None):
        self.files = dict(files)
        self.token_ids = dict(token_ids or {})

    @classmethod
    def read(cls, directory: str | os.PathLike,
             config: Optional[Dict[str, Any]] = None) -> Optional["TokenizerFiles"]:
        """The TOKENIZER_FILES present in an HF directory and its config.json's
        token ids; None when it has no tokenizer file."""
        from .atomicfile import open_regular
        directory = os.fspath(directory)
        files = {}
        for name in TOKENIZER_FILES:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                try:
                    with open_regular(path, "tokenizer file") as f:
                        files[name] = f.read()
                except OSError as e:
                    raise _bad(path, f"cannot read: {e.strerror or e}") from None
        if not files:
            return None
        if config is None:
            try:
                config = _read_json(os.path.join(directory, CONFIG))
            except CheckpointError:
                config = {}
        return cls(files, _token_ids(config))

    @classmethod
    def of(cls, tokenizer: Any, vocab_size: Optional[int] = None) -> Optional["TokenizerFiles"]:
        """The files of `tokenizer`: False (none), an HF directory (its
        tokenizer files), a TokenizerFiles, an HFTokenizer (the directory
        it was read from, or its tokenizer.json), or a llama2.c Tokenizer
        (tokenizer.bin; the byte-level vocabulary also as tokenizer.json,
        tokenizer_config.json, for transformers' AutoTokenizer). vocab_size:
        the model's (a llama2.c tokenizer is padded to it, as
        anebackward train writes it)."""
        from .tokenizer import Tokenizer
        if tokenizer is False:
            return None
        if isinstance(tokenizer, TokenizerFiles):
            return tokenizer
        if isinstance(tokenizer, (str, os.PathLike)):
            if not os.path.isdir(tokenizer):
                raise ValueError(f"tokenizer={os.fspath(tokenizer)!r}: not a directory (pass an "
                                 "HF directory, an HFTokenizer or an anebackward Tokenizer)")
            files = cls.read(tokenizer)
            if files is None:
                raise ValueError(f"tokenizer={os.fspath(tokenizer)!r}: no tokenizer file there "
                                 f"({', '.join(TOKENIZER_FILES)})")
            return files
        if isinstance(tokenizer, HFTokenizer):
            if tokenizer.directory is not None:
                return cls.read(tokenizer.directory)
            with open(tokenizer.path, "rb") as f:
                data = f.read()
            ids: Dict[str, Any] = {}
            if tokenizer.bos_id is not None:
                ids["bos_token_id"] = tokenizer.bos_id
            if tokenizer.stop_ids:
                ids["eos_token_id"] = sorted(tokenizer.stop_ids)
            return cls({TOKENIZER: data}, ids)
        if isinstance(tokenizer, Tokenizer):
            if vocab_size is not None and vocab_size > tokenizer.vocab_size:
                tokenizer = tokenizer.padded(vocab_size)
            written: Dict[str, bytes] = {"tokenizer.bin": tokenizer.to_bytes()}
            if _is_byte_level_layout(tokenizer):
                written.update(_byte_level_json(tokenizer))
            # llama2.c's convention: BOS starts every document and ends generation
            return cls(written, {"bos_token_id": 1, "eos_token_id": 1})
        raise TypeError(f"tokenizer must be an HF directory, an HFTokenizer, an anebackward "
                        f"Tokenizer, a TokenizerFiles or False, got {type(tokenizer).__name__}")

    def write(self, directory: str | os.PathLike) -> None:
        """Every file into directory, each atomically."""
        for name, data in self.files.items():
            atomic_write(os.path.join(os.fspath(directory), name), _writer(data))


def _writer(data: bytes) -> Any:
    """atomic_write's callback writing data."""
    return lambda f: f.write(data)


def _is_byte_level_layout(tok: Any) -> bool:
    """Is tok Tokenizer.byte_level(), possibly padded (no merges)?"""
    from .tokenizer import Tokenizer
    base = Tokenizer.byte_level().pieces
    return tok.pieces[:len(base)] == base and all(
        re.fullmatch(rb"<pad\d+>", p) for p in tok.pieces[len(base):])


def _byte_level_json(tok: Any) -> Dict[str, bytes]:
    """tokenizer.json + tokenizer_config.json of the byte-level vocabulary:
    a BPE without merges over its pieces with byte fallback, the space as
    sentencepiece's "\u2581" prepended to non-empty text, BOS added: the
    same ids as Tokenizer.encode (tests/test_hf_roundtrip.py) for any text
    that does not spell a special token (<unk>, <s>, </s>: HF tokenizers
    read those as the token itself).""" 
    try:
        from tokenizers import AddedToken, Tokenizer as _Tok, decoders, models, normalizers
        from tokenizers import processors
    except ImportError:
        return {}
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {}
    for i, p in enumerate(tok.pieces):
        vocab[specials[i] if i < 3 else "\u2581" if p == b" " else p.decode("latin-1")] = i
    t = _Tok(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True,
                        fuse_unk=True))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                         normalizers.Replace(" ", "\u2581")])
    t.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                   decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    t.add_special_tokens([AddedToken(s, special=True) for s in specials])
    # BOS (<s>) both starts and ends documents (llama2.c's data): the eos token too
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
              "eos_token": "<s>", "unk_token": "<unk>", "model_max_length": 1 << 30}
    return {TOKENIZER: t.to_str().encode("utf-8"),
            "tokenizer_config.json": (json.dumps(config, indent=2) + "\n").encode("utf-8")}


class HFTokenizer:
    """An HF tokenizer.json (through the `tokenizers` package) with the
    interface the trainer and the sampler use (anebackward.tokenizer's).
    Documents are encoded with the tokenizer's own special tokens; a
    sequence starts with bos_id (config.json's bos_token_id, else its
    eos_token_id: Qwen3 has no BOS) when the tokenizer adds none,
    encode(..., eos=True) ends it with the first of config.json's
    eos_token_id(s), and generation stops at any of them."""
    filename = TOKENIZER    # its name in a run directory (anebackward train)

    def __init__(self, path, bos_id=None, stop_ids=()):
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError:
            raise ImportError("reading tokenizer.json needs the tokenizers package: "
                              "pip install 'anebackward[hf]'") from None
        self.path = os.fspath(path)
        try:
            self._tok = _Tok.from_file(self.path)
        except Exception as e:   # the package raises a bare Exception on bad files
            raise _bad(self.path, f"not a readable tokenizer.json: {e}") from None
        self.directory: Optional[str] = None    # the HF directory it was read from (from_dir)
        self.bos_id = bos_id
        self.eos_id = next(iter(stop_ids), None)    # the first of config.json's eos_token_id
        self.stop_ids = set(stop_ids)
        self.is_byte_level = False

    @classmethod
    def from_dir(cls, directory, path=None):
        """The tokenizer.json of an HF directory (None if it has none), or
        the one at `path` with the directory's config.json ids."""
        own = path is None
        path = os.path.join(directory, TOKENIZER) if own else os.fspath(path)
        if not os.path.isfile(path):
            return None
        try:
            d = _read_json(os.path.join(directory, CONFIG))
        except CheckpointError:
            d = {}
        d = d if isinstance(d, dict) else {}
        eos = d.get("eos_token_id")
        eos = [eos] if isinstance(eos, int) else [e for e in (eos or []) if isinstance(e, int)]
        bos = d.get("bos_token_id")
        tok = cls(path, bos if isinstance(bos, int) else (eos[0] if eos else None), eos)
        tok.directory = os.fspath(directory) if own else None
        return tok

    @property
    def vocab_size(self):
        return self._tok.get_vocab_size(with_added_tokens=True)

    def padded(self, vocab_size):
        return self     # the model's vocabulary may be larger (HF pads it too)

    def encode(self, text, bos=True, eos=False):
        ids = self._tok.encode(text, add_special_tokens=bos).ids
        if bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids = ids + [self.eos_id]
        return ids

    def encode_documents(self, docs):
        return np.array([t for d in docs for t in self.encode(d)], dtype=np.int32)

    def decode_piece(self, prev, token):
        return self._tok.decode([int(token)], skip_special_tokens=True).encode("utf-8")

    def decode(self, tokens, prev=None):
        return self._tok.decode([int(t) for t in tokens], skip_special_tokens=True)

    def save(self, path):
        """Copy tokenizer.json to path (atomically), and the other tokenizer
        files of the directory it was read from beside it."""
        files = TokenizerFiles.of(self)
        assert files is not None
        for name, data in files.files.items():
            target = path if name == TOKENIZER else os.path.join(os.path.dirname(
                os.path.abspath(path)), name)
            atomic_write(target, _writer(data))
