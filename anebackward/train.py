"""`anebackward train`: train a Llama with the C forward/backward.

With no arguments it trains the small "default" model on the embedded
corpus for about a minute on a 2-core machine and writes, in --out DIR
(default runs/default):
  model.bin       llama2.c v0 checkpoint (run.c and `anebackward sample` read it)
  tokenizer.bin   llama2.c tokenizer for it
  optimizer.bin   AdamW moments and trainer position (for --resume)
  log.jsonl       one JSON object per step: step, loss, lr, ms, tok_s, grad_norm
                  (and {"step", "val_loss"} lines at evaluations)
  loss.png        the loss curve (drawn with matplotlib, a dependency)

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
import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Optional

import numpy as np

from . import MAX_THREADS

@dataclass
class Settings:
    """A run's settings: what optimizer.bin records (as a JSON object of
    these fields) and --resume brings back. None is "not chosen yet" where
    the default is None: seq_len becomes the preset's max_seq_len, save_every
    --eval-every, format the --init-from input's (else llama2c)."""
    config: str = "default"
    steps: int = 500
    batch_size: int = 16
    seq_len: Optional[int] = None
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup: int = 50
    decay_steps: Optional[int] = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    grad_accum: int = 1
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 4
    save_every: Optional[int] = None
    data: Optional[str] = None
    tokenizer: Optional[str] = None
    init_from: Optional[str] = None
    format: Optional[str] = None
    lora: Optional[int] = None          # LoRA rank: adapters on a frozen --init-from model
    lora_alpha: Optional[float] = None
    lora_targets: Optional[str] = None
    pack: bool = False                  # --data x.jsonl: documents packed into full rows

    def as_dict(self):
        return asdict(self)


DEFAULTS = {f.name: f.default for f in fields(Settings)}
# settings that runs saved before they existed lack (their values then)
_LATER = dict(init_from=None, format=None, lora=None, lora_alpha=None, lora_targets=None,
              pack=False)

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
              init_from=("str", None, None), format=("choice", ("llama2c", "hf"), None),
              lora=("int", 1, INT_MAX), lora_alpha=("float", -math.inf, None),
              lora_targets=("str", None, None), pack=("bool", None, None),
              threads=("int", 1, MAX_THREADS))
EXTRA_KEYS = {"step", "settings", "params_digest", "tensor_digests"}   # optimizer.bin's extra
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
    if kind == "bool":
        if not isinstance(v, bool):
            raise ValueError(f"{what} must be true or false, got {v!r}")
        return v
    if kind == "choice":
        if v not in lo:
            raise ValueError(f"{what} must be one of {', '.join(lo)}, got {v!r}")
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


def _check_combination(st, label):
    """Settings checked together (label(name) names one): min_lr <= lr,
    config a preset or "init-from"."""
    from .config import PRESETS
    if st.min_lr > st.lr:
        raise ValueError(f"{label('min_lr')} ({st.min_lr:g}) is above {label('lr')} "
                         f"({st.lr:g}): the cosine schedule decays from the peak down to it; "
                         "pass a smaller --min-lr or a larger --lr")
    if st.config not in PRESETS and st.config != "init-from":
        raise ValueError(f"{label('config')} must be a preset ({', '.join(PRESETS)}) or "
                         f"init-from, got {st.config!r}")


def _check_memory(model, B, S, label):
    """Refuse a batch whose activation workspace exceeds this machine's
    memory before anything of that size is allocated (ValueError saying how
    much it needs)."""
    try:
        need = model.workspace_bytes(B, S) + 8 * B * (S + 1)     # + the batch's tokens
    except (ValueError, OverflowError, RuntimeError):
        need = None         # beyond the C core's sizes
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        have = None
    if need is None or (have and need > have):
        size = "more than the C core's sizes" if need is None else f"{need / 2**30:,.1f} GiB"
        raise ValueError(
            f"{label} {B} x seq_len {S} needs an activation workspace of {size}, more than "
            f"this machine's {have / 2**30:,.1f} GiB of memory; use a smaller batch size (with "
            "--grad-accum for as many tokens per step) or --recompute" if have else
            f"{label} {B} x seq_len {S} needs an activation workspace of {size}")


def _usage(msg):
    """A command-line mistake: the message and exit status 1, before anything
    is written."""
    raise SystemExit(f"anebackward train: {msg}")


def add_arguments(p):
    from .__main__ import old_spelling
    a = p.add_argument
    a("--data", help="training data: a UTF-8 text file (documents separated by blank lines, "
      "byte-level tokens), a llama2.c .bin token shard or a directory of them, or "
      'instruction data: a .jsonl file of {"prompt": ..., "completion": ...} lines, the loss '
      "on the completion tokens only, documents longer than --seq-len dropped "
      "(docs/training.md) (default: the embedded corpus)")
    a("--pack", action="store_true", default=None, help="with a .jsonl --data: pack several "
      "documents into each row of --seq-len tokens (attention stays inside each document, "
      "positions restart); default: one document per sequence, padded (the padding costs "
      "nothing)")
    a("--tokenizer", help="a llama2.c tokenizer.bin to use (e.g. with llama2.c token shards); "
      "default: the byte-level tokenizer for text and .jsonl")
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
      "its tokenizer.json is used for text and .jsonl --data)")
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
    a("--no-progress", action="store_true", help="no progress bar (messages still print)")
    old_spelling(p, "--quiet", "no_progress", action="store_true")


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
        unknown = sorted(set(extra) - EXTRA_KEYS)
        if unknown:     # a flipped key must not switch a check off
            raise ValueError(f"extra holds unknown keys {', '.join(map(repr, unknown))} (a "
                             "corrupt key?)")
        saved = {**_LATER, **saved}   # runs saved before these settings existed
        missing = sorted(set(DEFAULTS) - set(saved))
        if missing:
            raise ValueError(f"extra.settings lacks {', '.join(missing)}")
        unknown = sorted(set(saved) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"extra.settings holds unknown keys {', '.join(map(repr, unknown))}")
        st = Settings(**{k: _check_setting(k, saved[k], "settings." + k) for k in DEFAULTS})
        _check_combination(st, lambda k: "settings." + k)
        if st.seq_len is None or st.seq_len > model.config.max_seq_len:
            raise ValueError(f"settings.seq_len {st.seq_len!r} does not fit the model's "
                             f"max_seq_len {model.config.max_seq_len}")
        if st.save_every is None:
            raise ValueError("settings.save_every must be an integer, got None")
        digest = extra.get("params_digest")
        if digest is not None and not isinstance(digest, str):
            raise ValueError(f"extra.params_digest must be a string, got {digest!r}")
        tensors = extra.get("tensor_digests")
        if tensors is not None and not (isinstance(tensors, dict) and all(
                isinstance(v, str) for v in tensors.values())):
            raise ValueError("extra.tensor_digests must map tensor names to strings")
    except (TypeError, ValueError) as e:
        raise checkpoint.CheckpointError(f"{path}: corrupt trainer settings: {e}") from None
    return start, st, (digest, tensors)


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
    start, st, (digest, tensors) = _resume_state(opt_path, model, opt, checkpoint)
    if digest is not None and digest != _params_digest(model):
        nxt = os.path.join(d, NEXT_OPT)
        if os.path.exists(nxt):
            try:
                start, st, (digest, tensors) = _resume_state(nxt, model, opt, checkpoint)
            except checkpoint.CheckpointError:
                pass        # not the other half of this save: report the mismatch
        if digest != _params_digest(model):
            _mismatch(d, start, tensors, model, checkpoint)
        os.replace(nxt, opt_path)
        say(f"{d}: completed the save of step {start} that was cut short")
    return model, opt, start, st, tokenizer


def _mismatch(d, step, tensors, model, checkpoint):
    """Raise the CheckpointError of weights that do not match the digest in
    optimizer.bin: a few tensors changed (a bit flip on disk) is
    corruption; every tensor changed is another save's model."""
    weights = "model.bin" if os.path.isfile(os.path.join(d, "model.bin")) else "model.safetensors"
    if tensors:
        now = _tensor_digests(model)
        changed = sorted(k for k in now if tensors.get(k) != now[k])
        if not changed:
            raise checkpoint.CheckpointError(
                f"{d}: optimizer.bin is corrupt: its params_digest matches no weights, while "
                f"every tensor of {weights} matches the digests it recorded at step {step}")
        if len(changed) < len(now):
            raise checkpoint.CheckpointError(
                f"{d}: {weights} is corrupt: {', '.join(changed[:4])}"
                f"{' ...' if len(changed) > 4 else ''} ({len(changed)} of {len(now)} tensors) "
                f"changed since step {step} was saved (the other tensors match optimizer.bin's "
                "digests: damage on disk, not another save); restore it from a copy, or start anew")
    raise checkpoint.CheckpointError(
        f"{d}: {weights} and optimizer.bin are from different saves (every tensor differs from "
        f"the weights saved with optimizer.bin's step {step}); resume from a directory saved "
        "whole, or start anew")


def _evaluate(model, data, st, dp):
    """The validation loss: the mean over eval_batches fixed batches (and
    over the data-parallel ranks, one all-reduce); for instruction data,
    over the counted tokens of the held-out documents
    (InstructionData.eval_batches)."""
    if _is_instructions(data):
        batches, n = data.eval_batches(st.batch_size, st.eval_batches, dp.rank, dp.world)
        return dp.mean(sum(model.forward(b, loss_denominator=n / dp.world, want_grad=False)
                           for b in batches))
    losses = [model.forward(*dp.batch(data, 10_000_000 + i, st.batch_size, st.seq_len,
                                      st.seed, split="val"), want_grad=False)
              for i in range(st.eval_batches)]
    return dp.mean(float(np.mean(losses)))


def _read_log(path, before, say=None):
    """The lines of a run's log.jsonl for steps < before (a line torn by a
    crash is dropped; so is one that is not UTF-8 JSON, with a warning)."""
    keep = []
    if not os.path.exists(path):
        return keep
    from .atomicfile import open_regular
    bad = 0
    with open_regular(path, "log.jsonl") as f:
        for raw in f:
            try:
                line = raw.decode("utf-8")
                rec = json.loads(line)
            except ValueError:      # UnicodeDecodeError is one
                bad += raw.endswith(b"\n")     # the last line may be torn by a kill: not news
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] < before:
                keep.append(line if line.endswith("\n") else line + "\n")
    if bad and say is not None:
        say(f"warning: {path}: dropped {bad} corrupt line(s) (not UTF-8 JSON)")
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

    def __init__(self, out, in_place, locks):
        from .runlock import LOCK
        self.out, self.locks, self.keep = out, locks, False
        # what --out held when the run started: only that may be replaced
        self.replacing = os.path.isdir(out) and bool(_listing(out))
        if in_place:
            self.path, self.staging = out, False
        else:
            parent = os.path.dirname(os.path.abspath(out))
            os.makedirs(parent, exist_ok=True)
            base = os.path.basename(os.path.abspath(out))
            self.path = tempfile.mkdtemp(prefix=f".{base}.partial-", dir=parent)
            # locked before anything is written in it; the lock moves with it to --out
            self.lock = locks.take(os.path.join(self.path, LOCK), f"--out {out}")
            os.chmod(self.path, 0o777 & ~_umask())
            self.staging = True

    def file(self, name):
        return os.path.join(self.path, name)

    def publish(self):
        """Make the staged run --out (after its first save)."""
        if not self.staging:
            return
        from .runlock import LOCK, is_locked
        out = os.path.abspath(self.out)
        if os.path.isdir(out) and not self.locks.holds(os.path.join(out, LOCK)) and is_locked(out):
            # a run started there after this one began (never deleted: this run stays staged)
            from .runlock import RunInUse
            self.keep = True
            raise RunInUse(f"--out {self.out} is now in use by another trainer; this run is "
                           f"kept, saved, in {self.path} (rename it to resume it)", None)
        if not self.replacing and os.path.isdir(out) and _listing(out):
            self.keep = True
            raise ValueError(f"files appeared in --out {self.out} while this run trained; they "
                             f"are left alone and this run is kept, saved, in {self.path} "
                             "(rename it to resume it)")
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
        self.lock.moved(os.path.join(out, LOCK))
        self.path, self.staging = self.out, False

    def discard(self):
        if self.staging and not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)


def _listing(d):
    """The entries of directory d, its lock file left out."""
    from .runlock import LOCK
    return [n for n in os.listdir(d) if n != LOCK]


def _lock_run(locks, out, source, dp):
    """Lock --out (its name beside it, and the directory if it exists) and
    a --resume directory `source` read into another --out (its save may be
    completed there), before anything is read or written; RunInUse names
    the pid of a live holder. Data-parallel ranks > 0 read rank 0's locked
    run and write a private directory: they lock that only."""
    from .runlock import LOCK, name_lock_path
    dirs = [("--out", out)]
    if source is not None and getattr(dp, "rank", 0) == 0:
        dirs.append(("--resume", source))
    for flag, d in dirs:
        what = f"{flag} {d}"
        parent = os.path.dirname(os.path.realpath(d))
        if not os.path.isdir(parent):
            os.makedirs(parent, exist_ok=True)
            locks.made_dirs.append(parent)      # removed again if left empty
        try:
            locks.take(name_lock_path(d), what)
            if os.path.isdir(d):
                locks.take(os.path.join(d, LOCK), what)
        except OSError as e:
            if flag == "--out" or e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            # a read-only run to resume from: nobody here can write it either


_LEFTOVER = re.compile(r"^\..+\.[0-9]+\.[0-9a-f]{8}\.tmp$")     # atomicfile's temporary names


def _clean_run_leftovers(d, say):
    """Remove what killed saves left in run directory d, which this
    process holds locked (so no save is in progress there): atomicfile's
    temporary files, a save's .next files (a save cut between its renames
    was completed by _resume_pair), and a half-drawn loss.png."""
    gone = []
    for name in _listing(d):
        if _LEFTOVER.match(name) or name in (NEXT_MODEL, NEXT_OPT, "loss.png.tmp.png"):
            path = os.path.join(d, name)
            if os.path.isfile(path) or os.path.islink(path):
                os.unlink(path)
                gone.append(name)
    if gone:
        say(f"{d}: removed {len(gone)} file(s) left by an interrupted save: {', '.join(gone)}")


def _clean_staging_leftovers(out, say):
    """The hidden .NAME.partial-* / .NAME.old-* directories beside --out
    that stopped runs left (this process holds --out's name lock: no live
    trainer uses them; one that still holds its own .lock is skipped). One
    that holds a save is removed only when --out holds a complete run (it
    may be the only copy otherwise): it is listed instead."""
    from .runlock import is_locked
    parent = os.path.dirname(os.path.abspath(out))
    base = os.path.basename(os.path.abspath(out))
    pat = re.compile(r"^\." + re.escape(base) + r"\.(partial|old)-[A-Za-z0-9_]{8}$")
    try:
        names = sorted(n for n in os.listdir(parent) if pat.match(n))
    except OSError:
        return
    out_whole = os.path.isfile(os.path.join(out, "optimizer.bin"))
    for name in names:
        path = os.path.join(parent, name)
        if os.path.islink(path) or not os.path.isdir(path) or is_locked(path):
            continue
        saved = any("optimizer.bin" in files for _, _, files in os.walk(path))
        if saved and not out_whole:
            say(f"note: {path} holds a run left by a trainer stopped while replacing {out}; "
                "kept (it may be the only copy): move it into place to resume it, or delete it")
            continue
        shutil.rmtree(path, ignore_errors=True)
        say(f"removed {path}, left by a stopped run")


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
        say("matplotlib is not installed (pip install matplotlib); skipped loss.png")
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
    from .atomicfile import atomic_write
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    except (OSError, ValueError, RuntimeError) as e:
        # the run itself is complete and saved: a missing picture is not a failure
        say(f"warning: loss.png not written ({e}); the run is complete and saved, the curve "
            f"is in {log_path}")
        return None
    finally:
        plt.close(fig)
    return path


def train(args, stream=None):
    """Run the training job described by argparse-style args; returns a dict
    whose "status" is "ok", "interrupted" (SIGINT/SIGTERM: saved, resumable)
    or "diverged" (NaN/inf loss: stopped, the last good save kept), with the
    final losses and output paths. The run's locks (anebackward/runlock.py)
    are held until it returns."""
    from .runlock import Locks
    with Locks() as locks:
        return _train(args, stream, locks)


def _resumed_run(run, given, recompute, say):
    """The saved run's model, optimizer, step, settings and tokenizer; a
    --steps below the saved step is refused, other settings given on the
    command line are reported as ignored."""
    model, opt, start, st, tokenizer = _resume_pair(run, say, recompute)
    if "steps" in given and given["steps"] < start:
        _usage(f"--steps {given['steps']} is below the step {start} that {run} was saved at; "
               f"a resumed run can only go on (--steps >= {start})")
    ignored = sorted(k for k in given
                     if k not in ("steps", "threads") and given[k] != getattr(st, k))
    if ignored:
        say("--resume keeps the saved run's settings; ignoring "
            + ", ".join("--" + k.replace("_", "-") for k in ignored))
    return model, opt, start, st, tokenizer


def _new_run(given, recompute):
    """A new run's settings (the command line's over the defaults, the
    defaults resolved), the --init-from model or None, the model config to
    start from and the tokenizer."""
    from .model import Llama, LlamaConfig
    from .tokenizer import Tokenizer
    st = Settings(**{k: v for k, v in given.items() if k in DEFAULTS})
    if "min_lr" not in given:       # the default floor follows a smaller --lr
        st.min_lr = min(st.min_lr, st.lr)
    try:
        _check_combination(st, lambda k: "--" + k.replace("_", "-"))
    except ValueError as e:
        _usage(str(e))
    init = None
    if st.lora is not None:
        if not st.init_from or not _hf().is_hf_dir(st.init_from):
            _usage("--lora trains adapters on a Hugging Face model: pass --init-from HFDIR")
        if st.format not in (None, "hf"):
            _usage("--lora writes a peft adapter directory; --format llama2c does not apply")
        st.init_from = os.path.abspath(st.init_from)   # the adapters' base model
    if st.init_from:
        init, init_format, init_tok = _load_init(st.init_from, Llama, Tokenizer, recompute,
                                                 _lora_of(st), st.seed)
        base = init.config
        st.config = "init-from"
        st.format = st.format or init_format
        if st.seq_len is None:   # HF models allow tens of thousands of positions
            st.seq_len = min(base.max_seq_len, 256)
    else:
        try:
            base = LlamaConfig.preset(st.config)
        except ValueError as e:
            _usage(f"--config: {e}")
    st.format = st.format or "llama2c"
    if st.pack and not _is_instructions(st.data):
        _usage("--pack packs instruction documents into rows: pass --data FILE.jsonl "
               '({"prompt": ..., "completion": ...} lines)')
    if st.seq_len is None:       # preset-dependent default
        st.seq_len = base.max_seq_len
    if st.seq_len > base.max_seq_len:
        _usage(f"--seq-len {st.seq_len} exceeds the {st.config} preset's "
               f"max_seq_len {base.max_seq_len}")
    if st.save_every is None:
        st.save_every = st.eval_every
    if st.tokenizer:
        tokenizer = (_hf().HFTokenizer(st.tokenizer) if st.tokenizer.endswith(".json")
                     else Tokenizer.load(st.tokenizer))
    else:
        tokenizer = init_tok if init is not None and init_tok else Tokenizer.byte_level()
    return st, init, base, tokenizer


def _is_instructions(data):
    """Is `data` (a --data path, or loaded data) instruction data (.jsonl)?"""
    if isinstance(data, str):
        return data.lower().endswith(".jsonl")
    from .data.instructions import InstructionData
    return isinstance(data, InstructionData)


def _load_instructions(st, tokenizer, say):
    """_load_data of a .jsonl --data."""
    from .data.instructions import InstructionData
    if not os.path.exists(st.data):
        raise ValueError(f"--data {st.data}: no such file or directory")
    data = InstructionData(st.data, tokenizer, st.seq_len, pack=st.pack)
    if data.n_dropped:
        say(f"note: {data.n_dropped} of the {data.n_docs} documents of {st.data} have more "
            f"than seq_len = {st.seq_len} tokens (the longest {data.longest}) and are left "
            "out; a larger --seq-len keeps them")
    if not data.val:
        say(f"note: {st.data} has fewer than 20 documents (or none of the held-out ones "
            "fits seq_len): nothing is held out, no validation loss in this run")
        return data, False
    return data, True


def _load_data(st, tokenizer, say):
    """The run's data, and whether it allows validation losses (its
    validation streams hold seq_len + 1 tokens)."""
    from .data import load_data
    if _is_instructions(st.data):
        return _load_instructions(st, tokenizer, say)
    S = st.seq_len
    data = load_data(st.data, tokenizer)
    if data.longest("train") < S + 1:
        raise ValueError(f"{data.description}: the longest training stream has "
                         f"{data.longest('train')} tokens, fewer than seq_len + 1 = {S + 1}; "
                         "use a smaller --seq-len or more data")
    if data.val and data.longest("val") < S + 1:
        say(f"warning: the validation split of {data.description} has at most "
            f"{data.longest('val')} tokens per stream, fewer than seq_len + 1 = {S + 1}: "
            "no validation loss in this run")
        return data, False
    return data, True


def _new_model(st, init, base, tokenizer, data, recompute):
    """A new run's model (the --init-from one, else fresh weights of `base`
    with the tokenizer's vocabulary) and its AdamW."""
    from .model import AdamW, Llama
    if init is not None:
        model = init
        if data.max_token() >= model.config.vocab_size:
            _usage(f"--data has token ids up to {data.max_token()}, beyond the vocabulary "
                   f"({model.config.vocab_size}) of --init-from {st.init_from}; pass the "
                   "tokenizer the model was trained with")
    else:
        vocab = tokenizer.vocab_size    # larger ids in the data are refused by the caller
        if st.tokenizer is None and data.max_token() >= tokenizer.vocab_size:
            _usage(f"--data has token ids up to {data.max_token()}; pass the tokenizer.bin it "
                   "was made with as --tokenizer")
        model = Llama(base.replace(vocab_size=vocab), seed=st.seed, recompute=recompute)
    return model, AdamW(model, lr=st.lr, betas=(st.beta1, st.beta2),
                        weight_decay=st.weight_decay)


def _train(args, stream, locks):
    from . import distributed, set_num_threads

    stream = sys.stdout if stream is None else stream    # the current one, not import time's
    dp = distributed.from_env(args)   # torchrun: data-parallel ranks (anebackward/distributed.py)
    quiet = getattr(args, "no_progress", False)
    say = Progress(1, stream, quiet=quiet).message
    given = _given(args)            # every number range-checked before anything happens
    overwrite = bool(getattr(args, "overwrite", False))
    recompute = bool(getattr(args, "recompute", False))
    if given.get("format") not in (None, "llama2c", "hf"):
        _usage(f"--format must be llama2c or hf, got {given['format']!r}")
    if "init_from" in given and "config" in given:
        _usage("--init-from and --config both choose the model; pass one of them")
    merge = bool(getattr(args, "merge", False))
    if ("lora_alpha" in given or "lora_targets" in given or merge) \
            and "lora" not in given and not args.resume:
        _usage("--lora-alpha, --lora-targets and --merge apply to adapter runs: add --lora R")
    if getattr(args, "out", None) is not None and not args.out.strip():
        _usage(f"--out {args.out!r} names no directory; pass one (default runs/default)")
    if args.resume and not os.path.isfile(os.path.join(args.resume, "optimizer.bin")):
        _usage(f"--resume {args.resume}: no optimizer.bin there")
    out = (args.out or args.resume) if args.resume else (args.out or os.path.join("runs", "default"))
    in_place = bool(args.resume) and os.path.exists(out) and os.path.samefile(out, args.resume)
    if os.path.islink(out) and not in_place:
        _usage(f"--out {out} is a symbolic link (to {os.readlink(out)}); pass the directory it "
               f"names ({os.path.realpath(out)}) or another --out")
    _lock_run(locks, out, args.resume if not in_place else None, dp)

    if args.resume:
        model, opt, start, st, tokenizer = _resumed_run(args.resume, given, recompute, say)
        old_total = st.steps     # the run's length when it was saved
        if in_place:
            _clean_run_leftovers(out, say)
        if "steps" in given:
            st.steps = given["steps"]
        if in_place and overwrite:
            _usage("--overwrite with --resume into the same directory: a resumed run continues "
                   "its directory; drop --overwrite, or pass another --out")
    else:
        st, init, base, tokenizer = _new_run(given, recompute)
        start, old_total = 0, st.steps
    if os.path.exists(out) and not os.path.isdir(out):
        _usage(f"--out {out} is a file, not a directory")
    _clean_staging_leftovers(out, say)      # (this process holds --out's name lock)
    if not in_place and os.path.isdir(out) and _listing(out) and not overwrite:
        _usage(f"--out {out} already holds files (a previous run?); pass --resume {out} to "
               f"continue it, --overwrite to replace it, or another --out")
    if start == st.steps and args.resume and not _eval_missing(
            _read_log(os.path.join(args.resume, "log.jsonl"), start), st, start, old_total):
        say(f"{args.resume} is already at step {start} of {st.steps}; nothing to train "
            "(--steps N extends it)")
        return {"status": "ok", "first_loss": None, "last_loss": None, "val_loss": None,
                "out": out, "model": model}
    if "threads" in given:
        set_num_threads(given["threads"])

    B, S, accum = st.batch_size, st.seq_len, st.grad_accum
    data, evaluate = _load_data(st, tokenizer, say)

    if not args.resume:
        model, opt = _new_model(st, init, base, tokenizer, data, recompute)
    precision = getattr(args, "precision", None) or "fp32"
    if precision != model.precision:     # how to run, not part of the saved run
        try:
            model.set_precision(precision)
        except (RuntimeError, ValueError) as e:
            _usage(f"--precision {precision}: {e}")
    hit = data.find_token(model.config.vocab_size)
    if hit is not None:     # (a shard beyond the tokenizer's vocabulary would grow the model)
        where, token = hit
        _usage(f"--data {where}: token id {token} is beyond the vocabulary "
               f"({model.config.vocab_size}) of "
               + (f"the model in {args.resume}" if args.resume else
                  f"--init-from {st.init_from}" if init is not None else
                  f"--tokenizer {st.tokenizer}")
               + "; pass the tokenizer the data was made with")
    try:
        _check_memory(model, B, S, "settings.batch_size" if args.resume else "--batch-size")
    except ValueError as e:
        _usage(str(e))
    config = model.config
    if tokenizer.vocab_size < config.vocab_size:
        tokenizer = tokenizer.padded(config.vocab_size)

    total, decay = st.steps, st.decay_steps or st.steps
    say(f"model: {config.n_layers} layers, dim {config.dim}, hidden {config.hidden_dim}, "
        f"{config.n_heads} heads ({config.n_kv_heads} kv), vocab {config.vocab_size}, "
        f"{model.n_params:,} parameters; data: {data.description} "
        f"({data.n_train_tokens:,} training tokens)")
    if args.resume:
        say(f"resuming {args.resume} at step {start} of {total}")
    say(f"training steps {start}..{total} with batch {B} x {accum} x seq {S}, lr {st.lr:g} "
        f"(warm-up {st.warmup}, cosine to {st.min_lr:g} at {decay}); output in {out}")

    run_dir = _RunDir(out, in_place, locks)
    run_dir.saved_at = start if in_place else None
    try:
        if st.format != "hf" or model.lora is not None:   # (hf: written by every save)
            tokenizer.save(run_dir.file(getattr(tokenizer, "filename", "tokenizer.bin")))
        from .atomicfile import atomic_write, open_append
        old_log = _read_log(os.path.join(args.resume, "log.jsonl"), start, say) if args.resume \
            else []
        atomic_write(run_dir.file("log.jsonl"), lambda f: f.write("".join(old_log).encode()))
        # the evaluation of the step the run was stopped at, if its record is missing
        pending = evaluate and _eval_missing(old_log, st, start, old_total)
        with open_append(run_dir.file("log.jsonl")) as log, _Signals() as signals:
            run = _Run(model=model, opt=opt, data=data, st=st, dp=dp, start=start,
                       run_dir=run_dir, log=log, signals=signals, evaluate=evaluate,
                       progress=Progress(total, stream, quiet=quiet), say=say, merge=merge,
                       tokenizer=tokenizer)
            return _loop(run, pending)
    except OSError as e:    # ENOSPC and the like: which path, and what is kept
        raise _kept_error(e, run_dir) from e
    finally:
        run_dir.discard()       # a run stopped before its first save leaves nothing


@dataclass
class _Run:
    """What the training loop works with (_train builds it)."""
    model: Any                  # Llama
    opt: Any                    # AdamW
    data: Any                   # anebackward.data's training data
    st: Settings
    dp: Any                     # anebackward.distributed: _Single or DataParallel
    start: int                  # the first step to take
    run_dir: "_RunDir"
    log: Any                    # log.jsonl, open for appending
    signals: "_Signals"
    evaluate: bool              # validation losses wanted and possible
    progress: "Progress"
    say: Callable[[str], None]
    merge: bool = False         # adapter runs: also write the merged HF model at the end
    tokenizer: Any = None       # the run's tokenizer (written with an hf-format model)


def _micro_batches(run, step):
    """Step `step`'s loss and the tokens this process ran, its gradients in
    the model's buffer (reduced over the data-parallel ranks), or None if a
    signal arrived (the step is then dropped: the weights are still those
    of `step`)."""
    if _is_instructions(run.data):
        return _instruction_micro_batches(run, step)
    model, st, dp = run.model, run.st, run.dp
    accum, loss = st.grad_accum, 0.0
    for micro in range(accum):
        if run.signals.received:    # a long accumulation stops at the next micro-batch
            return None
        x, y = dp.batch(run.data, step * accum + micro, st.batch_size, st.seq_len, st.seed)
        loss += model.forward(x, y) / accum
        # data-parallel: the gradients are reduced once, after the last micro-batch
        dp.backward(model, reduce=micro == accum - 1, accumulate=micro > 0,
                    grad_scale=1.0 / accum)
    return dp.mean(loss), st.batch_size * st.seq_len * accum


def _instruction_micro_batches(run, step):
    """_micro_batches of instruction data. The step's loss is the sum of the
    cross-entropy over the counted (completion) tokens of all its
    micro-batches on all ranks, divided by their number (HF Trainer's
    num_items_in_batch), so every counted token weighs the same however
    the documents fall into micro-batches: each micro-batch divides its sum
    by that number / world, and the data-parallel mean divides by world."""
    model, st, dp = run.model, run.st, run.dp
    accum = st.grad_accum
    draws = [run.data.draw(step * accum + micro, st.batch_size, st.seed, world=dp.world)
             for micro in range(accum)]
    denominator = sum(b.n_counted for parts in draws for b in parts) / dp.world
    loss, tokens = 0.0, 0
    for micro, parts in enumerate(draws):
        if run.signals.received:
            return None
        b = parts[dp.rank]
        loss += model.forward(b, loss_denominator=denominator)
        tokens += b.n_tokens
        dp.backward(model, reduce=micro == accum - 1, accumulate=micro > 0)
    return dp.mean(loss), tokens


def _loop(run, pending=False):
    """Steps run.start .. st.steps: train, log, save, evaluate; returns the
    run's result (status "ok", "interrupted" or "diverged")."""
    from . import checkpoint
    from .model import cosine_lr
    model, opt, data, st, run_dir, log = run.model, run.opt, run.data, run.st, run.run_dir, run.log
    signals, progress, say, evaluate = run.signals, run.progress, run.say, run.evaluate
    start, total, decay = run.start, st.steps, st.decay_steps or st.steps
    settings = st.as_dict()
    saved_at = run_dir.saved_at = start if not run_dir.staging else None

    def save(step):
        # Both files are written in full under temporary names first (the slow
        # part), then renamed into place back to back. optimizer.bin records a
        # digest of the weights it belongs with: a kill between the two
        # renames leaves a new model.bin beside the old optimizer.bin and the
        # new one as NEXT_OPT, which --resume then completes (_resume_pair).
        nonlocal saved_at
        log.flush()
        extra = {"step": step, "settings": settings, "params_digest": _params_digest(model),
                 "tensor_digests": _tensor_digests(model)}
        if model.lora is not None:
            # optimizer first, under its temporary name; then the adapter's
            # two files (each atomically), as for the hf format
            checkpoint.save_optimizer(opt, run_dir.file(NEXT_OPT), extra=extra)
            model.save_adapter(run_dir.path, base_model_name_or_path=st.init_from)
        elif st.format == "hf":
            # optimizer first, under its temporary name; save_pretrained then
            # replaces model.safetensors, the tokenizer files and config.json
            # (each atomically)
            checkpoint.save_optimizer(opt, run_dir.file(NEXT_OPT), extra=extra)
            model.save_pretrained(run_dir.path, tokenizer=run.tokenizer)
        else:
            model.save(run_dir.file(NEXT_MODEL))
            checkpoint.save_optimizer(opt, run_dir.file(NEXT_OPT), extra=extra)
            os.replace(run_dir.file(NEXT_MODEL), run_dir.file("model.bin"))
        os.replace(run_dir.file(NEXT_OPT), run_dir.file("optimizer.bin"))
        run_dir.publish()
        saved_at = run_dir.saved_at = step

    def stop(done):
        if saved_at != done:
            save(done)
        say(f"stopped by {signals.received} after step {done} of {total}; saved in "
            f"{run_dir.out}. Resume with: anebackward train --resume {_q(run_dir.out)}")
        return {"status": "interrupted", "step": done, "out": run_dir.out, "model": model}

    def validate(step):
        """The validation loss after `step` logged; None if it failed."""
        try:
            val = _evaluate(model, data, st, run.dp)
        except (ValueError, ArithmeticError, MemoryError, RuntimeError) as e:
            say(f"warning: evaluation failed at step {step + 1} ({e}); training goes on "
                "without validation loss")
            return None
        log.write(json.dumps({"step": step, "val_loss": round(val, 6)}) + "\n")
        log.flush()
        progress.message(f"step {step + 1}: validation loss {val:.4f}")
        return val

    first_loss = last_loss = val = None
    if pending:     # a run stopped on an evaluation step: its record is written now
        val = validate(start - 1)
        evaluate = val is not None
    for step in range(start, total):
        t0 = time.perf_counter()
        lr = cosine_lr(step, max_lr=st.lr, warmup_steps=st.warmup, total_steps=decay,
                       min_lr=st.min_lr)
        result = _micro_batches(run, step)
        if result is None:
            return stop(step)
        loss, tokens = result
        norm = model.clip_grad_norm(st.grad_clip) if st.grad_clip > 0 else \
            model.grad_norm()
        if not math.isfinite(loss) or not math.isfinite(norm):
            # The weights that gave this loss are not saved: the last save
            # (if any) is the last good checkpoint.
            kept = (f"the last good checkpoint (step {saved_at}) is kept in {run_dir.out}; "
                    f"resume it with anebackward train --resume {_q(run_dir.out)}, or start again"
                    if saved_at is not None else "nothing was saved; start again")
            say(f"step {step + 1}: the loss is {loss} (gradient norm {norm}): the run diverged "
                f"and stopped; {kept} with a lower --lr (now {st.lr:g}) or --grad-clip")
            return {"status": "diverged", "step": step, "saved_step": saved_at,
                    "out": run_dir.out, "model": model}
        opt.step(lr=lr)
        ms = 1e3 * (time.perf_counter() - t0)
        tok_s = tokens / (ms / 1e3)
        first_loss = loss if first_loss is None else first_loss
        last_loss = loss
        rec = {"step": step, "loss": round(loss, 6), "lr": lr, "ms": round(ms, 3),
               "tok_s": round(tok_s, 1), "grad_norm": round(float(norm), 6)}
        log.write(json.dumps(rec) + "\n")
        progress.update(step, loss, lr, ms, tok_s)
        done = step + 1
        if done == total or (st.save_every and done % st.save_every == 0):
            save(done)      # before the evaluation, which may fail
        if signals.received:    # (an evaluation due here is run at --resume)
            return stop(done)
        if evaluate and _eval_due(st, done, total):
            v = validate(step)
            val, evaluate = (val, False) if v is None else (v, True)
        log.flush()
    out = run_dir.out
    plot = _plot(out, os.path.join(out, "log.jsonl"), say)
    model_path = out if st.format == "hf" else os.path.join(out, "model.bin")
    what = "config.json, model.safetensors" if st.format == "hf" else "model.bin"
    if model.lora is not None:
        what = "adapter_config.json, adapter_model.safetensors (peft)"
        model_path = os.path.join(out, "merged")
        if run.merge:
            model.save_pretrained(model_path, merged=True, tokenizer=run.tokenizer)
            what += ", merged/ (the merged HF model and its tokenizer)"
    say(f"wrote {what} in {out}, its tokenizer, optimizer.bin, log.jsonl"
        + (", loss.png" if plot else ""))
    if model.lora is None or run.merge:
        say(f"sample it:  {sample_command(model_path)}")
    return {"status": "ok", "first_loss": first_loss, "last_loss": last_loss, "val_loss": val,
            "out": out, "model": model}


def _q(path):
    """path as one shell word (quoted when it needs it)."""
    import shlex
    return shlex.quote(os.fspath(path))


def sample_command(model_path, prompt="Once upon"):
    """The `anebackward sample` command the trainer prints for a finished
    run (tests run it as printed)."""
    import shlex
    return (f"anebackward sample {_q(model_path)} --prompt {shlex.quote(prompt)} "
            "--temperature 0")


def _eval_due(st, done, total):
    """Is a validation loss logged after `done` steps of a `total`-step run?"""
    return bool(st.eval_every and done % st.eval_every == 0) or done == total


def _eval_missing(lines, st, start, total):
    """A run saved at `start` whose evaluation there was due (total: the
    run's length then) but whose log lines hold no val_loss for it."""
    if start == 0 or not _eval_due(st, start, total):
        return False
    for line in lines:
        rec = json.loads(line)
        if "val_loss" in rec and rec.get("step") == start - 1:
            return False
    return True


def _kept_error(e, run_dir):
    """OSError e of a run, reworded: what failed, on which path, and what
    is kept."""
    where = f" ({e.filename})" if e.filename else ""
    if run_dir.saved_at is not None:
        kept = (f"the checkpoint of step {run_dir.saved_at} is kept in {run_dir.out}: resume it "
                f"with anebackward train --resume {_q(run_dir.out)}")
    else:
        kept = "nothing was saved yet (the run had not reached its first save)"
    return OSError(e.errno, f"{e.strerror or e}{where}; {kept}")


def _hf():
    from . import hf
    return hf


def _lora_of(st):
    """The LoraConfig of a run's settings, or None."""
    if st.lora is None:
        return None
    from .lora import ALL, LoraConfig
    try:
        return LoraConfig(st.lora, alpha=st.lora_alpha, targets=st.lora_targets or ",".join(ALL))
    except ValueError as e:
        _usage(f"--lora: {e}")


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
        with open(os.path.join(run, ADAPTER_CONFIG)) as f:
            base = json.load(f).get("base_model_name_or_path")
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
    # tokenizer.bin when the run has one (an hf-format run of the byte-level
    # tokenizer also holds its tokenizer.json twin): the tokenizer it trained with
    bin_path = os.path.join(run, "tokenizer.bin")
    tok = hf.HFTokenizer.from_dir(tok_dir) if tok_dir != run or not os.path.isfile(bin_path) \
        else None
    if tok is None:
        tok = Tokenizer.load(bin_path, vocab_size=model.config.vocab_size)
    return model, tok


def _params_digest(model):
    """A short digest of the weights, tying optimizer.bin to its model.bin."""
    return hashlib.blake2b(memoryview(model.flat_params).cast("B"), digest_size=16).hexdigest()


def _tensor_digests(model):
    """A short digest per tensor: tells a damaged model.bin (a few tensors
    differ) from another save's (all differ)."""
    return {name: hashlib.blake2b(memoryview(np.ascontiguousarray(a)).cast("B"),
                                  digest_size=8).hexdigest() for name, a in model.params.items()}


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
