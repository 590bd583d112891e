"""`anebackward sample MODEL`: generate text from a llama2.c v0 checkpoint
(model.bin, with tokenizer.bin beside it) the way llama2.c's run.c does, or
from a Hugging Face model directory (config.json, model.safetensors, and its
tokenizer.json, else the tokenizer.bin an `anebackward train` run wrote).

A sequence starts with the tokenizer's BOS (llama2.c: token 1; HF:
config.json's bos_token_id, else its eos_token_id); a tokenizer without one
starts at the prompt's first token (then the prompt must not be empty). The
prompt is encoded like run.c for tokenizer.bin (BOS, dummy-prefix space,
merges by score, byte fallback), by the `tokenizers` package for
tokenizer.json, and printed whole, followed by the generated tokens.
`--max-tokens` counts positions including the prompt and BOS (run.c's -n);
generation stops at BOS (llama2.c) or at config.json's eos_token_id(s) (HF);
temperature 0 is greedy (argmax, first index on ties), otherwise
softmax(logits / temperature) with top-p (nucleus) sampling. The printed
text follows run.c's decode for tokenizer.bin (leading space dropped after
BOS, <0xXX> pieces as bytes, unprintable ASCII control bytes skipped) and
the tokenizer's own decoder for tokenizer.json.
"""
import math
import os
import sys
import time

import numpy as np


def add_arguments(p):
    from .__main__ import old_spelling
    p.description = __doc__.split("\n\n")[0].replace("`", "")
    p.add_argument("model", help="a llama2.c v0 checkpoint (e.g. runs/default/model.bin) or a "
                   "Hugging Face model directory (config.json, model.safetensors, and "
                   "tokenizer.json or tokenizer.bin)")
    p.add_argument("--prompt", default="", help="text to continue (default: empty: start "
                   "from BOS; a tokenizer without BOS needs a prompt)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="positions to run, prompt included (default 256, at most max_seq_len)")
    old_spelling(p, "--steps", "max_tokens", type=int)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="0 = greedy; default 1.0")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9; "
                   "1 = plain sampling)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: time)")
    p.add_argument("--tokenizer", help="a tokenizer.bin or tokenizer.json (default: the HF "
                   "directory's tokenizer.json, else its tokenizer.bin; tokenizer.bin next to a "
                   "llama2.c checkpoint)")


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
    """run.c's generate loop. The sequence starts with the tokenizer's BOS
    (tokenizer.bos_id) when it has one, else with the prompt's first token
    (an empty prompt is then a ValueError). Returns the tokens after BOS:
    the whole prompt, then the generated ones; on_token(prev, token) is
    called for each of them (prev None for a first token without BOS),
    e.g. to print it. Generation stops at any of tokenizer.stop_ids."""
    _check_sampling("generate: ", temperature, top_p)
    steps = min(int(steps), model.config.max_seq_len)
    ids = list(tokenizer.encode(prompt, bos=True, eos=False))
    bos = getattr(tokenizer, "bos_id", None)
    has_bos = bool(ids) and bos is not None and ids[0] == bos
    if not ids:
        raise ValueError("generate: the prompt is empty and the tokenizer has no BOS token to "
                         "start from: give a prompt (--prompt TEXT)")
    if len(ids) > steps:
        raise ValueError(f"generate: the prompt is {len(ids)} tokens"
                         f"{' with BOS' if has_bos else ''}, more than --max-tokens {steps} "
                         f"(max_seq_len {model.config.max_seq_len})")
    rng = np.random.default_rng(seed)
    dec = model.decoder(max_positions=steps)
    stop = set(getattr(tokenizer, "stop_ids", ()))
    out = []
    if not has_bos:     # the first prompt token is printed too: nothing comes before it
        if on_token:
            on_token(None, ids[0])
        out.append(ids[0])
    cur = ids[0]
    pos = 0
    while pos < steps:
        logits = dec.step(cur, pos)   # run.c forwards every position, prompt included
        if pos < len(ids) - 1:
            nxt = ids[pos + 1]        # the prompt, whole
        else:
            nxt = _pick(logits, temperature, top_p, rng)
            if nxt in stop:
                break
        pos += 1
        if on_token:
            on_token(cur, nxt)
        out.append(nxt)
        cur = nxt
    return out


class _TextStream:
    """Incremental text of a tokenizer.json's token sequence: each call
    returns the text the new token adds to the decoded sequence (held back
    while it ends inside a UTF-8 character), so pieces whose spacing depends
    on their neighbours print as the whole sequence decodes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.printed = tokenizer, [], ""

    def __call__(self, token):
        self.tokens.append(int(token))
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd") or not text.startswith(self.printed):
            return b""
        new, self.printed = text[len(self.printed):], text
        return new.encode("utf-8")


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
        if hf.is_hf_dir(args.model):       # a Hugging Face directory and its tokenizer
            model = Llama.from_pretrained(args.model)
            if args.tokenizer:
                tok_path = args.tokenizer
            else:
                names = [n for n in (hf.TOKENIZER, "tokenizer.bin")
                         if os.path.isfile(os.path.join(args.model, n))]
                if not names:
                    raise CheckpointError(f"no tokenizer in {args.model} ({hf.TOKENIZER} or "
                                          "tokenizer.bin): pass --tokenizer PATH")
                tok_path = os.path.join(args.model, names[0])
        else:
            tok_path = args.tokenizer or os.path.join(
                os.path.dirname(os.path.abspath(args.model)), "tokenizer.bin")
            model = Llama.load(args.model)
        if not os.path.exists(tok_path):
            raise CheckpointError(f"no tokenizer at {tok_path}: pass --tokenizer PATH")
        if not tok_path.endswith(".json"):
            tokenizer = Tokenizer.load(tok_path, vocab_size=model.config.vocab_size)
        elif hf.is_hf_dir(args.model):     # with the model's config.json's BOS and EOS
            tokenizer = hf.HFTokenizer.from_dir(args.model, tok_path)
        else:
            tokenizer = hf.HFTokenizer(tok_path)
    except CheckpointError as e:
        print(f"anebackward sample: {e}", file=sys.stderr)
        return 1
    seed = args.seed if args.seed is not None else time.time_ns() % (1 << 32)
    out = sys.stdout.buffer
    stream = _TextStream(tokenizer) if isinstance(tokenizer, hf.HFTokenizer) else None

    def emit(prev, token):
        if stream is not None:
            out.write(stream(token))
            out.flush()
            return
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
