"""`anebackward train`: train a Llama with the C forward/backward.

With no arguments it trains the small "default" model on the embedded
corpus for about a minute on a 2-core machine and writes, in --out DIR
(default runs/default):
  model.bin       llama2.c v0 checkpoint (run.c and `anebackward sample` read it)
  tokenizer.bin   llama2.c tokenizer for it
  optimizer.bin   AdamW moments and trainer position (for --resume)
  log.jsonl       one JSON object per step: step, loss, lr, ms, tok_s, grad_norm
                  (and {"step", "val_loss"} lines at evaluations)
  loss.png        the loss curve (needs matplotlib: pip install anebackward[plot])

The learning rate follows llama2.c's schedule (linear warm-up, cosine decay
to --min-lr at --decay-steps), gradients are clipped to --grad-clip, AdamW
decays the 2-D weights only. --resume DIR continues a run from its last save:
the batches of step i depend only on (seed, i), so the loss curve continues
as if the run had not stopped.
"""
import hashlib
import json
import math
import os
import sys
import time

import numpy as np

DEFAULTS = dict(config="default", steps=500, batch_size=16, seq_len=128, lr=2e-3, min_lr=1e-4,
                warmup=50, decay_steps=None, weight_decay=0.1, beta1=0.9, beta2=0.95,
                grad_clip=1.0, grad_accum=1, seed=0, eval_every=100, eval_batches=4,
                save_every=0, data=None, tokenizer=None)


def add_arguments(p):
    a = p.add_argument
    a("--data", help="training data: a UTF-8 text file (documents separated by blank lines, "
      "byte-level tokens), a llama2.c .bin token shard or a directory of them "
      "(default: the embedded corpus)")
    a("--tokenizer", help="a llama2.c tokenizer.bin to use (e.g. with llama2.c token shards); "
      "default: the byte-level tokenizer for text")
    a("--config", help="model preset: default, tiny, stories15M, stories42M, stories110M "
      "(vocab_size follows the tokenizer)")
    a("--steps", type=int, help="optimizer steps in total (default 500)")
    a("--batch-size", type=int, help="sequences per micro-batch (default 16)")
    a("--seq-len", type=int, help="tokens per sequence (default 128; at most the preset's "
      "max_seq_len)")
    a("--lr", type=float, help="peak learning rate (default 2e-3)")
    a("--min-lr", type=float, help="final learning rate of the cosine decay (default 1e-4)")
    a("--warmup", type=int, help="warm-up steps (default 50)")
    a("--decay-steps", type=int, help="step at which the cosine reaches --min-lr "
      "(default: --steps)")
    a("--weight-decay", type=float, help="AdamW weight decay of the 2-D weights (default 0.1)")
    a("--grad-clip", type=float, help="clip the global gradient norm (0 = off; default 1.0)")
    a("--grad-accum", type=int, help="micro-batches per step (default 1)")
    a("--seed", type=int, help="seed of the weights and of the batches (default 0)")
    a("--eval-every", type=int, help="validation loss every N steps (0 = only at the end)")
    a("--save-every", type=int, help="save model and optimizer every N steps (0 = at the end)")
    a("--resume", metavar="DIR", help="continue the run saved in DIR (its settings are kept; "
      "--steps may extend it)")
    a("--out", metavar="DIR", help="output directory (default runs/default, or the --resume DIR)")
    a("--threads", type=int, help="BLAS threads (default: the BLAS default)")
    a("--quiet", action="store_true", help="no progress bar")


class Progress:
    """A plain-text progress bar: redrawn in place on a terminal, a line every
    `every` steps otherwise."""

    def __init__(self, total, stream=sys.stdout, quiet=False):
        self.total, self.stream, self.quiet = total, stream, quiet
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.every = max(1, total // 20)

    def update(self, step, loss, lr, ms, tok_s):
        if self.quiet:
            return
        n = step + 1
        width = 24
        fill = int(width * n / self.total)
        line = (f"step {n:>{len(str(self.total))}}/{self.total} [{'#' * fill}{'.' * (width - fill)}]"
                f" loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | {ms:.1f} ms/step")
        if self.tty:
            self.stream.write("\r" + line)
            if n == self.total:
                self.stream.write("\n")
        elif n % self.every == 0 or n == self.total or n == 1:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text):
        if self.tty and not self.quiet:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()


def _settings(args):
    """The run's settings: defaults < saved settings (resume) < command line."""
    s = dict(DEFAULTS)
    saved = None
    out = args.out
    if args.resume:
        path = os.path.join(args.resume, "optimizer.bin")
        if not os.path.exists(path):
            raise SystemExit(f"anebackward train: --resume {args.resume}: no optimizer.bin there")
        saved = path
        out = out or args.resume
    given = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}
    return s, given, saved, out or os.path.join("runs", "default")


def _evaluate(model, data, st, step):
    losses = [model.forward(*data.batch(10_000_000 + i, st["batch_size"], st["seq_len"],
                                        st["seed"], split="val"), want_grad=False)
              for i in range(st["eval_batches"])]
    return float(np.mean(losses))


def _plot(out, log_path, say):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is not installed (pip install 'anebackward[plot]'); skipped loss.png")
        return None
    steps, losses, vsteps, vlosses = [], [], [], []
    with open(log_path) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                steps.append(r["step"])
                losses.append(r["loss"])
            if "val_loss" in r:
                vsteps.append(r["step"])
                vlosses.append(r["val_loss"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="train (per step)")
    if len(losses) >= 20:
        k = max(5, len(losses) // 50)
        sm = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], sm, lw=1.5, label=f"train ({k}-step mean)")
    if vlosses:
        ax.plot(vsteps, vlosses, "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title("anebackward train")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "loss.png")
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)
    return path


def train(args, stream=sys.stdout):
    """Run the training job described by argparse-style args; returns a dict
    with the final losses and output paths."""
    from . import checkpoint
    from .data import load_data
    from .model import AdamW, Llama, LlamaConfig, cosine_lr
    from .tokenizer import Tokenizer
    from . import distributed, set_num_threads

    if getattr(args, "threads", None):
        set_num_threads(args.threads)
    dp = distributed.from_env(args)   # torchrun: data-parallel ranks (anebackward/distributed.py)
    st, given, saved_opt, out = _settings(args)
    os.makedirs(out, exist_ok=True)
    progress = Progress(1, stream, quiet=getattr(args, "quiet", False))
    say = progress.message

    resume_extra = None
    if saved_opt:
        model = Llama.load(os.path.join(args.resume, "model.bin"))
        opt = AdamW(model)
        resume_extra = checkpoint.load_optimizer(opt, saved_opt)
        digest = resume_extra.get("params_digest")
        if digest is not None and digest != _params_digest(model):
            raise checkpoint.CheckpointError(
                f"{args.resume}: model.bin and optimizer.bin are from different saves (a run "
                "stopped between writing them); resume from a directory saved whole, or start anew")
        st.update(resume_extra["settings"])
        if "steps" in given:
            st["steps"] = given["steps"]
        ignored = sorted(k for k in given if k != "steps" and given[k] != st[k])
        if ignored:
            say("--resume keeps the saved run's settings; ignoring "
                + ", ".join("--" + k.replace("_", "-") for k in ignored))
        tokenizer = Tokenizer.load(os.path.join(args.resume, "tokenizer.bin"),
                                   vocab_size=model.config.vocab_size)
        start = int(resume_extra["step"])
        say(f"resuming {args.resume} at step {start} of {st['steps']}")
    else:
        st.update(given)
        tokenizer = (Tokenizer.load(st["tokenizer"]) if st["tokenizer"]
                     else Tokenizer.byte_level())
        start = 0
    for k in ("steps", "batch_size", "seq_len", "grad_accum", "warmup"):
        if not isinstance(st[k], int) or st[k] < (0 if k == "warmup" else 1):
            raise SystemExit(f"anebackward train: --{k.replace('_', '-')} must be a positive "
                             f"integer, got {st[k]!r}")
    data = load_data(st["data"], tokenizer)

    if not saved_opt:
        try:
            base = LlamaConfig.preset(st["config"])
        except ValueError as e:
            raise SystemExit(f"anebackward train: --config: {e}") from None
        if st["seq_len"] > base.max_seq_len:
            raise SystemExit(f"anebackward train: --seq-len {st['seq_len']} exceeds the "
                             f"{st['config']} preset's max_seq_len {base.max_seq_len}")
        vocab = max(tokenizer.vocab_size, data.max_token() + 1)
        if st["tokenizer"] is None and data.max_token() >= tokenizer.vocab_size:
            raise SystemExit(f"anebackward train: --data has token ids up to {data.max_token()}; "
                             "pass the tokenizer.bin it was made with as --tokenizer")
        config = base.replace(vocab_size=vocab)
        model = Llama(config, seed=st["seed"])
        opt = AdamW(model, lr=st["lr"], betas=(st["beta1"], st["beta2"]),
                    weight_decay=st["weight_decay"])
    dp.wrap(model, data)
    config = model.config
    if tokenizer.vocab_size < config.vocab_size:
        tokenizer = tokenizer.padded(config.vocab_size)
    tokenizer.save(os.path.join(out, "tokenizer.bin"))

    total, decay = st["steps"], st["decay_steps"] or st["steps"]
    B, S, accum = st["batch_size"], st["seq_len"], st["grad_accum"]
    say(f"model: {config.n_layers} layers, dim {config.dim}, hidden {config.hidden_dim}, "
        f"{config.n_heads} heads ({config.n_kv_heads} kv), vocab {config.vocab_size}, "
        f"{model.n_params:,} parameters; data: {data.description} "
        f"({data.n_train_tokens:,} training tokens)")
    say(f"training steps {start}..{total} with batch {B} x {accum} x seq {S}, lr {st['lr']:g} "
        f"(warm-up {st['warmup']}, cosine to {st['min_lr']:g} at {decay}); output in {out}")

    log_path = os.path.join(out, "log.jsonl")
    if start == 0:
        open(log_path, "w").close()
    else:  # drop log lines past the resumed step (from a run that went further)
        _truncate_log(log_path, start)
    progress = Progress(total, stream, quiet=getattr(args, "quiet", False))
    settings = {k: st[k] for k in DEFAULTS}

    def save(step):
        # Two files, each replaced atomically; the optimizer file (written
        # second) records a digest of the weights it belongs with, so a crash
        # between the two renames is caught on --resume, not trained through.
        model.save(os.path.join(out, "model.bin"))
        checkpoint.save_optimizer(opt, os.path.join(out, "optimizer.bin"),
                                  extra={"step": step, "settings": settings,
                                         "params_digest": _params_digest(model)})

    first_loss = last_loss = val = None
    with open(log_path, "a") as log:
        for step in range(start, total):
            t0 = time.perf_counter()
            lr = cosine_lr(step, max_lr=st["lr"], warmup_steps=st["warmup"], total_steps=decay,
                           min_lr=st["min_lr"])
            loss = 0.0
            for micro in range(accum):
                x, y = data.batch(step * accum + micro, B, S, st["seed"])
                loss += model.forward(x, y) / accum
                model.backward(accumulate=micro > 0, grad_scale=1.0 / accum)
            norm = model.clip_grad_norm(st["grad_clip"]) if st["grad_clip"] > 0 else \
                model.grad_norm()
            if not math.isfinite(loss) or not math.isfinite(norm):
                say(f"step {step}: non-finite loss or gradient ({loss}, {norm}); stopping. "
                    "Try a lower --lr.")
                save(step)
                return {"status": "diverged", "step": step}
            opt.step(lr=lr)
            ms = 1e3 * (time.perf_counter() - t0)
            tok_s = B * S * accum / (ms / 1e3)
            first_loss = loss if first_loss is None else first_loss
            last_loss = loss
            rec = {"step": step, "loss": round(loss, 6), "lr": lr, "ms": round(ms, 3),
                   "tok_s": round(tok_s, 1), "grad_norm": round(float(norm), 6)}
            log.write(json.dumps(rec) + "\n")
            progress.update(step, loss, lr, ms, tok_s)
            done = step + 1
            if (st["eval_every"] and done % st["eval_every"] == 0) or done == total:
                val = _evaluate(model, data, st, step)
                log.write(json.dumps({"step": step, "val_loss": round(val, 6)}) + "\n")
                progress.message(f"step {done}: validation loss {val:.4f}")
            if st["save_every"] and done % st["save_every"] == 0 and done < total:
                log.flush()
                save(done)
            log.flush()
    save(total)
    plot = _plot(out, log_path, say)
    say(f"wrote {os.path.join(out, 'model.bin')}, tokenizer.bin, optimizer.bin, log.jsonl"
        + (", loss.png" if plot else ""))
    say(f"sample it:  anebackward sample {os.path.join(out, 'model.bin')} --prompt \"Once upon\" "
        "--temperature 0")
    return {"status": "ok", "first_loss": first_loss, "last_loss": last_loss, "val_loss": val,
            "out": out, "model": model}


def _truncate_log(path, step):
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            if line.strip() and json.loads(line)["step"] < step:
                keep.append(line)
    with open(path, "w") as f:
        f.writelines(keep)



def _params_digest(model):
    """A short digest of the weights, tying optimizer.bin to its model.bin."""
    return hashlib.blake2b(memoryview(model.flat_params).cast("B"), digest_size=16).hexdigest()

def run(args):
    try:
        train(args)
    except (ValueError, OSError) as e:
        print(f"anebackward train: {e}", file=sys.stderr)
        return 1
    return 0
