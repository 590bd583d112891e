"""`anebackward sample MODEL.bin`: generate text from a llama2.c v0 checkpoint
the way llama2.c's run.c does.

The prompt is encoded like run.c (BOS, dummy-prefix space, merges by score,
byte fallback); `--steps` counts positions including the prompt (run.c's
-n); generation stops at BOS; temperature 0 is greedy (argmax, first index
on ties), otherwise softmax(logits / temperature) with top-p (nucleus)
sampling. The printed text follows run.c's decode (leading space dropped
after BOS, <0xXX> pieces as bytes, unprintable ASCII control bytes skipped).
"""
import math
import os
import sys
import time

import numpy as np


def add_arguments(p):
    from .__main__ import old_spelling
    p.add_argument("model", help="a llama2.c v0 checkpoint (e.g. runs/default/model.bin) or a "
                   "Hugging Face model directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--prompt", default="", help="text to continue (default: empty)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="positions to run, prompt included (default 256, at most max_seq_len)")
    old_spelling(p, "--steps", "max_tokens", type=int)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="0 = greedy; default 1.0")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9; "
                   "1 = plain sampling)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: time)")
    p.add_argument("--tokenizer", help="tokenizer.bin (default: tokenizer.bin next to the model)")


def _pick(logits, temperature, top_p, rng):
    if temperature == 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if 0.0 < top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[:int(np.searchsorted(cum, top_p)) + 1]
        q = p[keep] / p[keep].sum()
        return int(keep[np.searchsorted(np.cumsum(q), rng.random(), side="right").clip(0, len(q) - 1)])
    return int(np.searchsorted(np.cumsum(p), rng.random(), side="right").clip(0, len(p) - 1))


def _check_sampling(prefix, temperature, top_p, names=("temperature", "top_p")):
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"{prefix}{names[0]} must be a finite number >= 0 (0 = greedy), got "
                         f"{temperature}")
    if not 0 < top_p <= 1:     # NaN fails this too
        raise ValueError(f"{prefix}{names[1]} must be in (0, 1] (1 = plain sampling), got {top_p}")


def generate(model, tokenizer, prompt="", steps=256, temperature=0.0, top_p=0.9, seed=0,
             on_token=None):
    """run.c's generate loop. Returns the list of tokens after the first
    (prompt tokens after BOS, then generated ones). on_token(prev, token) is
    called for each, e.g. to print it."""
    _check_sampling("generate: ", temperature, top_p)
    steps = min(int(steps), model.config.max_seq_len)
    prompt_tokens = tokenizer.encode(prompt, bos=True, eos=False)
    if len(prompt_tokens) > steps:
        raise ValueError(f"generate: the prompt is {len(prompt_tokens)} tokens, more than --steps "
                         f"{steps} (max_seq_len {model.config.max_seq_len})")
    rng = np.random.default_rng(seed)
    dec = model.decoder(max_positions=steps)
    seq = [prompt_tokens[0]]
    out = []
    pos = 0
    while pos < steps:
        logits = dec.step(seq[-1], pos)   # run.c forwards every position, prompt included
        if pos < len(prompt_tokens) - 1:
            nxt = prompt_tokens[pos + 1]
        else:
            nxt = _pick(logits, temperature, top_p, rng)
        pos += 1
        if nxt in getattr(tokenizer, "stop_ids", (1,)):   # BOS delimits sequences (HF: EOS)
            break
        if on_token:
            on_token(seq[-1], nxt)
        seq.append(nxt)
        out.append(nxt)
    return out


def run(args):
    from .errors import CheckpointError
    from .model import Llama
    from .tokenizer import Tokenizer

    try:    # the options first: a bad one is reported before any file is read
        _check_sampling("", args.temperature, args.top_p, ("--temperature", "--top-p"))
        if args.max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
        if args.seed is not None and not 0 <= args.seed < 2**64:
            raise ValueError(f"--seed must be in [0, 2**64), got {args.seed}")
    except ValueError as e:
        print(f"anebackward sample: {e}", file=sys.stderr)
        return 1
    from . import hf
    try:
        if hf.is_hf_dir(args.model):       # a Hugging Face directory and its tokenizer.json
            model = Llama.from_pretrained(args.model)
            tok_path = args.tokenizer or os.path.join(args.model, hf.TOKENIZER)
            if not os.path.exists(tok_path):
                raise CheckpointError(f"no tokenizer at {tok_path}: pass --tokenizer PATH")
            tokenizer = (hf.HFTokenizer.from_dir(args.model) if not args.tokenizer else
                         hf.HFTokenizer(tok_path) if tok_path.endswith(".json") else
                         Tokenizer.load(tok_path, vocab_size=model.config.vocab_size))
        else:
            tok_path = args.tokenizer or os.path.join(
                os.path.dirname(os.path.abspath(args.model)), "tokenizer.bin")
            model = Llama.load(args.model)
            if not os.path.exists(tok_path):
                raise CheckpointError(f"no tokenizer at {tok_path}: pass --tokenizer PATH")
            tokenizer = (hf.HFTokenizer(tok_path) if tok_path.endswith(".json") else
                         Tokenizer.load(tok_path, vocab_size=model.config.vocab_size))
    except CheckpointError as e:
        print(f"anebackward sample: {e}", file=sys.stderr)
        return 1
    seed = args.seed if args.seed is not None else time.time_ns() % (1 << 32)
    out = sys.stdout.buffer

    def emit(prev, token):
        piece = tokenizer.decode_piece(prev, token)
        if len(piece) == 1 and piece[0] < 0x80 and not (0x20 <= piece[0] < 0x7F
                                                         or piece in b"\t\n\v\f\r"):
            return  # run.c's safe_printf skips control bytes
        out.write(piece)
        out.flush()

    t0 = time.perf_counter()
    try:
        toks = generate(model, tokenizer, args.prompt, args.max_tokens, args.temperature, args.top_p,
                        seed, on_token=emit)
    except ValueError as e:
        print(f"anebackward sample: {e}", file=sys.stderr)
        return 1
    out.write(b"\n")
    out.flush()
    dt = time.perf_counter() - t0
    if len(toks) > 1:
        print(f"achieved tok/s: {len(toks) / dt:.1f}", file=sys.stderr)
    return 0
