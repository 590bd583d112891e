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

No run is lost: a checkpoint is saved at every evaluation (--save-every);
SIGINT/SIGTERM finish the current step, save and exit 130; a loss that turns
NaN/inf stops the run (exit 1) and keeps the last good checkpoint; an existing
run in --out is never mixed with a new one (--resume continues it,
--overwrite replaces it, atomically, at the new run's first save).
"""
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

import numpy as np

# seq_len None = the preset's max_seq_len; save_every None = --eval-every
DEFAULTS = dict(config="default", steps=500, batch_size=16, seq_len=None, lr=2e-3, min_lr=1e-4,
                warmup=50, decay_steps=None, weight_decay=0.1, beta1=0.9, beta2=0.95,
                grad_clip=1.0, grad_accum=1, seed=0, eval_every=100, eval_batches=4,
                save_every=None, data=None, tokenizer=None, init_from=None, format=None,
                lora=None, lora_alpha=None, lora_targets=None)
# settings that runs saved before they existed lack (their values then)
_LATER = dict(init_from=None, format=None, lora=None, lora_alpha=None, lora_targets=None)

INT_MAX = 2**31 - 1
# name -> (kind, lo, hi); None values (a default to be resolved, or "off") are
# allowed where the default is None. Checked for the command line and for the
# settings a resumed optimizer.bin brings. "adamw": AdamW's own validation.
RANGES = dict(steps=("int", 1, INT_MAX), batch_size=("int", 1, INT_MAX),
              seq_len=("int", 1, INT_MAX), lr=("adamw", None, None), min_lr=("float", 0.0, None),
              warmup=("int", 0, INT_MAX), decay_steps=("int", 1, INT_MAX),
              weight_decay=("adamw", None, None), beta1=("adamw", None, None),
              beta2=("adamw", None, None), grad_clip=("float", 0.0, None),
              grad_accum=("int", 1, INT_MAX), seed=("int", 0, 2**63 - 1),
              eval_every=("int", 0, INT_MAX), eval_batches=("int", 1, 10_000),
              save_every=("int", 0, INT_MAX), config=("str", None, None),
              data=("str", None, None), tokenizer=("str", None, None),
              init_from=("str", None, None), format=("str", None, None),
              lora=("int", 1, INT_MAX), lora_alpha=("float", -math.inf, None),
              lora_targets=("str", None, None), threads=("int", 1, 4096))
EXIT_INTERRUPTED = 130   # what a shell reports for a process ended by SIGINT
NEXT_MODEL, NEXT_OPT = ".model.bin.next", ".optimizer.bin.next"   # a save in progress


def _check_setting(name, v, label=None):
    """v for setting `name` if it has the right type and range, else a
    ValueError naming it as `label` (default: the name)."""
    kind, lo, hi = RANGES[name]
    if v is None and DEFAULTS.get(name, 0) is None:
        return v
    what = label or name
    if kind == "str":
        if not isinstance(v, str):
            raise ValueError(f"{what} must be a string, got {v!r}")
        return v
    if kind == "int":
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"{what} must be an integer in [{lo}, {hi}], got {v!r}")
        return v
    if kind == "adamw":
        from .kernels.optim import check_adamw_hparams
        try:
            if name.startswith("beta"):   # one of the pair, under its own name
                return check_adamw_hparams(what, betas=(v, v), beta_names=(name, name))[1][0]
            return check_adamw_hparams(what, **{name: v})[0 if name == "lr" else 3]
        except TypeError as e:
            raise ValueError(str(e)) from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
        raise ValueError(f"{what} must be a finite number >= {lo}, got {v!r}")
    return float(v)


def _usage(msg):
    """A command-line mistake: the message and exit status 1, before anything
    is written."""
    raise SystemExit(f"anebackward train: {msg}")


def add_arguments(p):
    a = p.add_argument
    a("--data", help="training data: a UTF-8 text file (documents separated by blank lines, "
      "byte-level tokens), a llama2.c .bin token shard or a directory of them "
      "(default: the embedded corpus)")
    a("--tokenizer", help="a llama2.c tokenizer.bin to use (e.g. with llama2.c token shards); "
      "default: the byte-level tokenizer for text")
    a("--config", help="model preset: default, tiny, stories15M, stories42M, stories110M, or the "
      "Hugging Face shapes qwen3-0.6b, llama3.2-1b, smollm2-135m (random weights; vocab_size "
      "follows the tokenizer)")
    a("--steps", type=int, help="optimizer steps in total (default 500)")
    a("--batch-size", type=int, help="sequences per micro-batch (default 16)")
    a("--seq-len", type=int, help="tokens per sequence (default: the preset's max_seq_len, "
      "128 for default, 64 for tiny)")
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
    a("--save-every", type=int, help="save model and optimizer every N steps (default: at "
      "every evaluation; 0 = only at the end; always on SIGINT/SIGTERM)")
    a("--resume", metavar="DIR", help="continue the run saved in DIR (its settings are kept; "
      "--steps may extend it)")
    a("--out", metavar="DIR", help="output directory (default runs/default, or the --resume DIR); "
      "must be empty or new unless --resume or --overwrite")
    a("--overwrite", action="store_true", help="replace the run in a non-empty --out (the old "
      "run stays until the new one's first save replaces it whole)")
    a("--init-from", metavar="PATH", help="fine-tune this model instead of a new one: a "
      "llama2.c .bin checkpoint or a Hugging Face directory (config.json + model.safetensors; "
      "its tokenizer.json is used for text --data)")
    a("--format", choices=("llama2c", "hf"), help="how the model is written: llama2c "
      "(model.bin + tokenizer.bin) or hf (config.json + model.safetensors in --out); default: "
      "the --init-from input's, else llama2c")
    a("--recompute", action="store_true", help="recompute activations in the backward (a "
      "fraction of the memory, about one more forward per step; same results)")
    a("--precision", choices=("fp32", "bf16"), default="fp32", help="matmul operands: fp32, "
      "or bf16 with fp32 accumulation, weights and optimizer (needs the [bf16] extra; see "
      "anebackward.bf16); default fp32")
    a("--threads", type=int, help="threads for the whole package, kernels and BLAS together "
      "(default: $ANEBACKWARD_NUM_THREADS, else the cores)")
    a("--lora", type=int, metavar="R", help="train LoRA adapters of rank R on a frozen "
      "--init-from HF model; --out then holds a peft adapter directory (docs/lora.md)")
    a("--lora-alpha", type=float, help="LoRA scaling numerator (default R: scale 1)")
    a("--lora-targets", help="comma-separated projections among q,k,v,o,gate,up,down "
      "(default: all seven)")
    a("--merge", action="store_true", help="with --lora: also write the model with the "
      "adapters merged in as an HF directory, --out/merged, when the run ends")
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


def _given(args):
    """Command-line settings (those given), each range-checked."""
    given = {}
    for k in list(DEFAULTS) + ["threads"]:
        v = getattr(args, k, None)
        if v is not None:
            try:
                given[k] = _check_setting(k, v, "--" + k.replace("_", "-"))
            except ValueError as e:
                _usage(str(e))
    return given


def _resume_state(path, model, opt, checkpoint):
    """The trainer position and settings saved in optimizer.bin, every field
    checked (CheckpointError naming it)."""
    extra = checkpoint.load_optimizer(opt, path)
    try:
        from .kernels.optim import check_adamw_step
        start = check_adamw_step("extra", extra.get("step"), lo=0, name="step")
        saved = extra.get("settings")
        if not isinstance(saved, dict):
            raise ValueError(f"extra.settings must be a JSON object, got {saved!r}")
        saved = {**_LATER, **saved}   # runs saved before these settings existed
        missing = sorted(set(DEFAULTS) - set(saved))
        if missing:
            raise ValueError(f"extra.settings lacks {', '.join(missing)}")
        st = {k: _check_setting(k, saved[k], "settings." + k) for k in DEFAULTS}
        if st["seq_len"] is None or st["seq_len"] > model.config.max_seq_len:
            raise ValueError(f"settings.seq_len {st['seq_len']!r} does not fit the model's "
                             f"max_seq_len {model.config.max_seq_len}")
        if st["save_every"] is None:
            raise ValueError("settings.save_every must be an integer, got None")
        digest = extra.get("params_digest")
        if digest is not None and not isinstance(digest, str):
            raise ValueError(f"extra.params_digest must be a string, got {digest!r}")
    except (TypeError, ValueError) as e:
        raise checkpoint.CheckpointError(f"{path}: corrupt trainer settings: {e}") from None
    return start, st, digest


def _resume_pair(d, say, recompute=False):
    """The model, optimizer, step, settings and tokenizer saved in run
    directory d (either format). A save that was killed between writing the
    model and renaming its optimizer state (model new, optimizer.bin old, the
    new one still in NEXT_OPT) is completed first."""
    from . import checkpoint
    from .model import AdamW, Llama
    from .tokenizer import Tokenizer
    model, tokenizer = _load_run_model(d, Llama, Tokenizer, recompute)
    opt = AdamW(model)
    opt_path = os.path.join(d, "optimizer.bin")
    start, st, digest = _resume_state(opt_path, model, opt, checkpoint)
    if digest is not None and digest != _params_digest(model):
        nxt = os.path.join(d, NEXT_OPT)
        if os.path.exists(nxt):
            try:
                start, st, digest = _resume_state(nxt, model, opt, checkpoint)
            except checkpoint.CheckpointError:
                pass        # not the other half of this save: report the mismatch
        if digest != _params_digest(model):
            raise checkpoint.CheckpointError(
                f"{d}: model.bin and optimizer.bin are from different saves (a run stopped "
                "between writing them); resume from a directory saved whole, or start anew")
        os.replace(nxt, opt_path)
        say(f"{d}: completed the save of step {start} that was cut short")
    return model, opt, start, st, tokenizer


def _evaluate(model, data, st, step):
    losses = [model.forward(*data.batch(10_000_000 + i, st["batch_size"], st["seq_len"],
                                        st["seed"], split="val"), want_grad=False)
              for i in range(st["eval_batches"])]
    return float(np.mean(losses))


def _read_log(path, before):
    """The lines of a run's log.jsonl for steps < before (a line torn by a
    crash is dropped)."""
    keep = []
    if not os.path.exists(path):
        return keep
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] < before:
                keep.append(line if line.endswith("\n") else line + "\n")
    return keep


class _Signals:
    """SIGINT/SIGTERM while training: the first one asks the loop to stop
    after the current step (and save); a second one acts at once (the
    default action), for a run that must die now."""

    def __init__(self):
        self.received, self.old = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        for sig, old in self.old.items():
            signal.signal(sig, old)
        # os.write: a handler may run in the middle of a print to the same stream
        try:
            os.write(2, f"\n{self.received}: finishing this step, then saving (send it again "
                        "to quit without saving)\n".encode())
        except OSError:
            pass

    def __exit__(self, *exc):
        for sig, old in self.old.items():
            signal.signal(sig, old)


class _RunDir:
    """Where a run's files go. A resumed run writes into its own directory.
    A new run writes into a hidden staging directory beside --out, which
    becomes --out at the first save (a rename; with --overwrite the old run
    is renamed aside first, then deleted), so a run that fails or stops
    before saving leaves nothing behind, and an old run is never mixed with
    a new one."""

    def __init__(self, out, in_place):
        self.out = out
        if in_place:
            self.path, self.staging = out, False
        else:
            parent = os.path.dirname(os.path.abspath(out))
            os.makedirs(parent, exist_ok=True)
            base = os.path.basename(os.path.abspath(out))
            self.path = tempfile.mkdtemp(prefix=f".{base}.partial-", dir=parent)
            os.chmod(self.path, 0o777 & ~_umask())
            self.staging = True

    def file(self, name):
        return os.path.join(self.path, name)

    def publish(self):
        """Make the staged run --out (after its first save)."""
        if not self.staging:
            return
        out = os.path.abspath(self.out)
        if os.path.isdir(out) and os.listdir(out):     # --overwrite
            if _exchange(self.path, out):    # one atomic swap where the OS has it
                shutil.rmtree(self.path, ignore_errors=True)
            else:       # else two renames; in between the old run is in `old`
                old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-",
                                       dir=os.path.dirname(out))
                os.replace(out, os.path.join(old, "run"))
                os.replace(self.path, out)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.path, out)      # a new name or an empty directory: one rename
        self.path, self.staging = self.out, False

    def discard(self):
        if self.staging:
            shutil.rmtree(self.path, ignore_errors=True)


def _exchange(a, b):
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE).
    False where the C library or the file system does not offer it."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def train(args, stream=None):
    """Run the training job described by argparse-style args; returns a dict
    whose "status" is "ok", "interrupted" (SIGINT/SIGTERM: saved, resumable)
    or "diverged" (NaN/inf loss: stopped, the last good save kept), with the
    final losses and output paths."""
    from . import checkpoint
    from .data import load_data
    from .model import AdamW, Llama, LlamaConfig, cosine_lr
    from .tokenizer import Tokenizer
    from . import distributed, set_num_threads

    stream = sys.stdout if stream is None else stream    # the current one, not import time's
    dp = distributed.from_env(args)   # torchrun: data-parallel ranks (anebackward/distributed.py)
    quiet = getattr(args, "quiet", False)
    say = Progress(1, stream, quiet=quiet).message
    given = _given(args)            # every number range-checked before anything happens
    overwrite = bool(getattr(args, "overwrite", False))
    recompute = bool(getattr(args, "recompute", False))
    if given.get("format") not in (None, "llama2c", "hf"):
        _usage(f"--format must be llama2c or hf, got {given['format']!r}")
    if "init_from" in given and "config" in given:
        _usage("--init-from and --config both choose the model; pass one of them")
    if ("lora_alpha" in given or "lora_targets" in given or getattr(args, "merge", False)) \
            and "lora" not in given and not args.resume:
        _usage("--lora-alpha, --lora-targets and --merge apply to adapter runs: add --lora R")

    if args.resume:
        opt_path = os.path.join(args.resume, "optimizer.bin")
        if not os.path.exists(opt_path):
            _usage(f"--resume {args.resume}: no optimizer.bin there")
        model, opt, start, st, tokenizer = _resume_pair(args.resume, say, recompute)
        if "steps" in given:
            if given["steps"] < start:
                _usage(f"--steps {given['steps']} is below the step {start} that {args.resume} "
                       f"was saved at; a resumed run can only go on (--steps >= {start})")
            st["steps"] = given["steps"]
        ignored = sorted(k for k in given if k not in ("steps", "threads") and given[k] != st[k])
        if ignored:
            say("--resume keeps the saved run's settings; ignoring "
                + ", ".join("--" + k.replace("_", "-") for k in ignored))
        out = args.out or args.resume
        in_place = os.path.exists(out) and os.path.samefile(out, args.resume)
        if in_place and overwrite:
            _usage("--overwrite with --resume into the same directory: a resumed run continues "
                   "its directory; drop --overwrite, or pass another --out")
    else:
        st = {**DEFAULTS, **{k: v for k, v in given.items() if k in DEFAULTS}}
        init = None
        if st["lora"] is not None:
            if not st["init_from"] or not _hf().is_hf_dir(st["init_from"]):
                _usage("--lora trains adapters on a Hugging Face model: pass --init-from HFDIR")
            if st["format"] not in (None, "hf"):
                _usage("--lora writes a peft adapter directory; --format llama2c does not apply")
            st["init_from"] = os.path.abspath(st["init_from"])   # the adapters' base model
        if st["init_from"]:
            init, init_format, init_tok = _load_init(st["init_from"], Llama, Tokenizer, recompute,
                                                     _lora_of(st), st["seed"])
            base = init.config
            st["config"] = "init-from"
            st["format"] = st["format"] or init_format
            if st["seq_len"] is None:   # HF models allow tens of thousands of positions
                st["seq_len"] = min(base.max_seq_len, 256)
        else:
            try:
                base = LlamaConfig.preset(st["config"])
            except ValueError as e:
                _usage(f"--config: {e}")
        st["format"] = st["format"] or "llama2c"
        if st["seq_len"] is None:       # preset-dependent default
            st["seq_len"] = base.max_seq_len
        if st["seq_len"] > base.max_seq_len:
            _usage(f"--seq-len {st['seq_len']} exceeds the {st['config']} preset's "
                   f"max_seq_len {base.max_seq_len}")
        if st["save_every"] is None:
            st["save_every"] = st["eval_every"]
        if st["tokenizer"]:
            tokenizer = (_hf().HFTokenizer(st["tokenizer"]) if st["tokenizer"].endswith(".json")
                         else Tokenizer.load(st["tokenizer"]))
        else:
            tokenizer = init_tok if init is not None and init_tok else Tokenizer.byte_level()
        start, out, in_place = 0, args.out or os.path.join("runs", "default"), False
    if os.path.exists(out) and not os.path.isdir(out):
        _usage(f"--out {out} is a file, not a directory")
    if not in_place and os.path.isdir(out) and os.listdir(out) and not overwrite:
        _usage(f"--out {out} already holds files (a previous run?); pass --resume {out} to "
               f"continue it, --overwrite to replace it, or another --out")
    if start == st["steps"] and args.resume:
        say(f"{args.resume} is already at step {start} of {st['steps']}; nothing to train "
            "(--steps N extends it)")
        return {"status": "ok", "first_loss": None, "last_loss": None, "val_loss": None,
                "out": out, "model": model}
    if "threads" in given:
        set_num_threads(given["threads"])

    B, S, accum = st["batch_size"], st["seq_len"], st["grad_accum"]
    data = load_data(st["data"], tokenizer)
    if data.longest("train") < S + 1:
        raise ValueError(f"{data.description}: the longest training stream has "
                         f"{data.longest('train')} tokens, fewer than seq_len + 1 = {S + 1}; "
                         "use a smaller --seq-len or more data")
    evaluate = True
    if data.val and data.longest("val") < S + 1:
        say(f"warning: the validation split of {data.description} has at most "
            f"{data.longest('val')} tokens per stream, fewer than seq_len + 1 = {S + 1}: "
            "no validation loss in this run")
        evaluate = False

    if not args.resume and init is not None:
        model = init
        if data.max_token() >= model.config.vocab_size:
            _usage(f"--data has token ids up to {data.max_token()}, beyond the vocabulary "
                   f"({model.config.vocab_size}) of --init-from {st['init_from']}; pass the "
                   "tokenizer the model was trained with")
        opt = AdamW(model, lr=st["lr"], betas=(st["beta1"], st["beta2"]),
                    weight_decay=st["weight_decay"])
    elif not args.resume:
        vocab = max(tokenizer.vocab_size, data.max_token() + 1)
        if st["tokenizer"] is None and data.max_token() >= tokenizer.vocab_size:
            _usage(f"--data has token ids up to {data.max_token()}; pass the tokenizer.bin it "
                   "was made with as --tokenizer")
        config = base.replace(vocab_size=vocab)
        model = Llama(config, seed=st["seed"], recompute=recompute)
        opt = AdamW(model, lr=st["lr"], betas=(st["beta1"], st["beta2"]),
                    weight_decay=st["weight_decay"])
    precision = getattr(args, "precision", None) or "fp32"
    if precision != model.precision:     # how to run, not part of the saved run
        try:
            model.set_precision(precision)
        except (RuntimeError, ValueError) as e:
            _usage(f"--precision {precision}: {e}")
    dp.wrap(model, data)
    config = model.config
    if tokenizer.vocab_size < config.vocab_size:
        tokenizer = tokenizer.padded(config.vocab_size)

    total, decay = st["steps"], st["decay_steps"] or st["steps"]
    say(f"model: {config.n_layers} layers, dim {config.dim}, hidden {config.hidden_dim}, "
        f"{config.n_heads} heads ({config.n_kv_heads} kv), vocab {config.vocab_size}, "
        f"{model.n_params:,} parameters; data: {data.description} "
        f"({data.n_train_tokens:,} training tokens)")
    if args.resume:
        say(f"resuming {args.resume} at step {start} of {total}")
    say(f"training steps {start}..{total} with batch {B} x {accum} x seq {S}, lr {st['lr']:g} "
        f"(warm-up {st['warmup']}, cosine to {st['min_lr']:g} at {decay}); output in {out}")

    run_dir = _RunDir(out, in_place)
    try:
        tokenizer.save(run_dir.file(getattr(tokenizer, "filename", "tokenizer.bin")))
        from .atomicfile import atomic_write
        old_log = _read_log(os.path.join(args.resume, "log.jsonl"), start) if args.resume else []
        atomic_write(run_dir.file("log.jsonl"), lambda f: f.write("".join(old_log).encode()))
        with open(run_dir.file("log.jsonl"), "a") as log, _Signals() as signals:
            return _loop(model, opt, data, st, start, total, decay, run_dir, log, signals,
                         evaluate, Progress(total, stream, quiet=quiet), say, cosine_lr,
                         checkpoint, merge=bool(getattr(args, "merge", False)))
    finally:
        run_dir.discard()       # a run stopped before its first save leaves nothing


def _loop(model, opt, data, st, start, total, decay, run_dir, log, signals, evaluate,
          progress, say, cosine_lr, checkpoint, merge=False):
    B, S, accum = st["batch_size"], st["seq_len"], st["grad_accum"]
    settings = {k: st[k] for k in DEFAULTS}
    saved_at = start if not run_dir.staging else None

    def save(step):
        # Both files are written in full under temporary names first (the slow
        # part), then renamed into place back to back. optimizer.bin records a
        # digest of the weights it belongs with: a kill between the two
        # renames leaves a new model.bin beside the old optimizer.bin and the
        # new one as NEXT_OPT, which --resume then completes (_resume_pair).
        nonlocal saved_at
        log.flush()
        extra = {"step": step, "settings": settings, "params_digest": _params_digest(model)}
        if model.lora is not None:
            # optimizer first, under its temporary name; then the adapter's
            # two files (each atomically), as for the hf format
            checkpoint.save_optimizer(opt, run_dir.file(NEXT_OPT), extra=extra)
            model.save_adapter(run_dir.path, base_model_name_or_path=st["init_from"])
        elif st["format"] == "hf":
            # optimizer first, under its temporary name; save_pretrained then
            # replaces config.json and model.safetensors (each atomically)
            checkpoint.save_optimizer(opt, run_dir.file(NEXT_OPT), extra=extra)
            model.save_pretrained(run_dir.path)
        else:
            model.save(run_dir.file(NEXT_MODEL))
            checkpoint.save_optimizer(opt, run_dir.file(NEXT_OPT), extra=extra)
            os.replace(run_dir.file(NEXT_MODEL), run_dir.file("model.bin"))
        os.replace(run_dir.file(NEXT_OPT), run_dir.file("optimizer.bin"))
        run_dir.publish()
        saved_at = step

    first_loss = last_loss = val = None
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
            # The weights that gave this loss are not saved: the last save
            # (if any) is the last good checkpoint.
            kept = (f"the last good checkpoint (step {saved_at}) is kept in {run_dir.out}; "
                    f"resume it with anebackward train --resume {run_dir.out}, or start again"
                    if saved_at is not None else "nothing was saved; start again")
            say(f"step {step + 1}: the loss is {loss} (gradient norm {norm}): the run diverged "
                f"and stopped; {kept} with a lower --lr (now {st['lr']:g}) or --grad-clip")
            return {"status": "diverged", "step": step, "saved_step": saved_at,
                    "out": run_dir.out, "model": model}
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
        if done == total or (st["save_every"] and done % st["save_every"] == 0):
            save(done)      # before the evaluation, which may fail
        if signals.received:
            if saved_at != done:
                save(done)
            say(f"stopped by {signals.received} after step {done} of {total}; saved in "
                f"{run_dir.out}. Resume with: anebackward train --resume {run_dir.out}")
            return {"status": "interrupted", "step": done, "out": run_dir.out, "model": model}
        if evaluate and ((st["eval_every"] and done % st["eval_every"] == 0) or done == total):
            try:
                val = _evaluate(model, data, st, step)
            except (ValueError, ArithmeticError, MemoryError, RuntimeError) as e:
                say(f"warning: evaluation failed at step {done} ({e}); training goes on "
                    "without validation loss")
                evaluate = False
            else:
                log.write(json.dumps({"step": step, "val_loss": round(val, 6)}) + "\n")
                log.flush()
                progress.message(f"step {done}: validation loss {val:.4f}")
        log.flush()
    out = run_dir.out
    plot = _plot(out, os.path.join(out, "log.jsonl"), say)
    model_path = out if st["format"] == "hf" else os.path.join(out, "model.bin")
    what = "config.json, model.safetensors" if st["format"] == "hf" else "model.bin"
    if model.lora is not None:
        what = "adapter_config.json, adapter_model.safetensors (peft)"
        model_path = os.path.join(out, "merged")
        if merge:
            model.save_pretrained(model_path, merged=True)
            _copy_tokenizer(st["init_from"], model_path)
            what += ", merged/ (the merged HF model)"
    say(f"wrote {what} in {out}, its tokenizer, optimizer.bin, log.jsonl"
        + (", loss.png" if plot else ""))
    if model.lora is None or merge:
        say(f"sample it:  anebackward sample {model_path} --prompt \"Once upon\" "
            "--temperature 0")
    return {"status": "ok", "first_loss": first_loss, "last_loss": last_loss, "val_loss": val,
            "out": out, "model": model}


def _hf():
    from . import hf
    return hf


def _lora_of(st):
    """The LoraConfig of a run's settings, or None."""
    if st["lora"] is None:
        return None
    from .lora import ALL, LoraConfig
    try:
        return LoraConfig(st["lora"], alpha=st["lora_alpha"],
                          targets=st["lora_targets"] or ",".join(ALL))
    except ValueError as e:
        _usage(f"--lora: {e}")


def _copy_tokenizer(src, dst):
    import shutil
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


def _load_init(path, Llama, Tokenizer, recompute, lora=None, seed=0):
    """The model of --init-from PATH (with new LoRA adapters when lora is
    given), its format, and the tokenizer found beside it (tokenizer.json in
    an HF directory, tokenizer.bin beside a llama2.c .bin) or None."""
    hf = _hf()
    if hf.is_hf_dir(path):
        return (Llama.from_pretrained(path, recompute=recompute, lora=lora, seed=seed), "hf",
                hf.HFTokenizer.from_dir(path))
    if os.path.isdir(path):
        _usage(f"--init-from {path}: a directory without config.json is not a Hugging Face model "
               "directory")
    if not os.path.isfile(path):
        _usage(f"--init-from {path}: no such file or directory")
    model = Llama.load(path)
    if recompute:
        model = _with_recompute(model, Llama)
    tok = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer.bin")
    return model, "llama2c", (Tokenizer.load(tok, vocab_size=model.config.vocab_size)
                              if os.path.isfile(tok) else None)


def _with_recompute(model, Llama):
    model.set_recompute(True)
    return model


def _load_run_model(run, Llama, Tokenizer, recompute):
    """A saved run's model and tokenizer, in whichever format it was written."""
    hf = _hf()
    from .lora import ADAPTER_CONFIG
    tok_dir = run
    if os.path.isfile(os.path.join(run, ADAPTER_CONFIG)):    # an adapter run: base + adapters
        import json as _json
        with open(os.path.join(run, ADAPTER_CONFIG)) as f:
            base = _json.load(f).get("base_model_name_or_path")
        if not isinstance(base, str) or not hf.is_hf_dir(base):
            _usage(f"--resume {run}: the adapters' base model {base!r} (adapter_config.json's "
                   "base_model_name_or_path) is not an HF directory here")
        model = Llama.from_pretrained(base, recompute=recompute, adapter=run)
        tok_dir = base       # its config.json gives the tokenizer's bos/eos ids
    elif os.path.isfile(os.path.join(run, "model.bin")):
        model = Llama.load(os.path.join(run, "model.bin"))
        if recompute:
            model = _with_recompute(model, Llama)
    elif hf.is_hf_dir(run):
        model = Llama.from_pretrained(run, recompute=recompute)
    else:
        _usage(f"--resume {run}: neither model.bin nor config.json there")
    tok = hf.HFTokenizer.from_dir(tok_dir)
    if tok is None:
        tok = Tokenizer.load(os.path.join(run, "tokenizer.bin"), vocab_size=model.config.vocab_size)
    return model, tok


def _params_digest(model):
    """A short digest of the weights, tying optimizer.bin to its model.bin."""
    return hashlib.blake2b(memoryview(model.flat_params).cast("B"), digest_size=16).hexdigest()


def run(args):
    try:
        res = train(args)
    except (ValueError, OSError) as e:
        print(f"anebackward train: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:   # before training started, or a second Ctrl-C
        print("\nanebackward train: interrupted; nothing saved since the last checkpoint",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return {"ok": 0, "interrupted": EXIT_INTERRUPTED, "diverged": 1}[res["status"]]
