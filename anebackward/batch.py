"""Batch layouts: padded, packed and prompt-masked batches in the compact
varlen form the C model runs (ab_model_forward_batch).

The C model never sees a padding token. A batch is ONE list of its real
tokens (N rows) cut into segments, FlashAttention's varlen convention:

    tokens      int32 [N]          the real tokens, row after row
    targets     int32 [N]          what each token predicts; -1 = not counted
    cu_seqlens  int64 [n_seq + 1]  segment starts: segment i is tokens
                                   [cu_seqlens[i], cu_seqlens[i+1]); causal
                                   attention stays inside a segment
    positions   int32 [N]          each token's RoPE position

Segment starts rather than a segment id per token: segments are contiguous
runs, so a query's keys are [cu[i], t] (two loads), the kernels split work
into (segment, head) tasks without a scan, and it is what FlashAttention's
varlen API and HF's DataCollatorWithFlattening produce.

from_padded() turns what a Hugging Face training step passes (input_ids,
attention_mask, position_ids, labels) into this form by HF's own rules, so
the loss and gradients are HF's:
  - real tokens are those with attention_mask != 0 (all without a mask);
    left, right or any padding: every matmul runs on real tokens only;
  - with an attention_mask, each row's real tokens are one segment (HF masks
    padded keys and keeps causal order); without one, a row is cut where
    position_ids do not step by +1 (HF's packed-sequence detection:
    DataCollatorWithFlattening's restarting position_ids), else one segment.
    HF's sdpa/eager masks detect packing only when no cache object exists
    either, i.e. with use_cache=False (or gradient checkpointing): with the
    config's default use_cache=True a packed row attends across its
    documents there. split_packed= says which (anebackward.transformers
    passes HF's effective choice);
  - positions are position_ids at the real tokens, else the index in the
    row (HF's default, so a left-padded row's first real token is at the
    position of its index, as HF computes it);
  - labels (HF's, -100 ignored) are shifted inside the row: position t
    predicts labels[t+1]; a counted label predicted from a padded position
    is an error (its logits would come from a padding token).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from . import _checks as C
from ._native import ffi

HF_IGNORE_INDEX = -100   # HF's label ignore index; the kernels' is -1
_I32_MAX = 2**31 - 1


def i64ptr(a):
    """int64_t* into an int64 ndarray's own memory (no copy)."""
    return ffi.from_buffer("int64_t[]", a)


def _int_array(fn, name, a):
    if hasattr(a, "detach"):   # a torch tensor
        a = a.detach().cpu().numpy()
    a = C.int_array(fn, name, a)
    if a.dtype.kind not in "iub" or (a.dtype.kind == "b" and name != "attention_mask"):
        raise TypeError(f"{fn}: {name} must have an integer dtype, got {a.dtype}")
    return a


def check_cu_seqlens(fn: str, cu_seqlens, n_tokens: Optional[int] = None) -> np.ndarray:
    """cu_seqlens as a C-contiguous int64 array, checked: 1-D, at least
    [0, N], starting at 0, non-decreasing, ending at n_tokens if given."""
    cu = _int_array(fn, "cu_seqlens", cu_seqlens)
    if cu.ndim != 1 or cu.size < 2:
        raise ValueError(f"{fn}: cu_seqlens must be a 1-D array [n_seq + 1] of segment starts "
                         f"(at least [0, n_tokens]), got shape {cu.shape}")
    cu = np.ascontiguousarray(cu, dtype=np.int64)
    if cu[0] != 0:
        raise ValueError(f"{fn}: cu_seqlens must start at 0, got cu_seqlens[0] = {int(cu[0])}")
    d = np.diff(cu)
    if (d < 0).any():
        i = int(np.flatnonzero(d < 0)[0])
        raise ValueError(f"{fn}: cu_seqlens must be non-decreasing, got cu_seqlens[{i}] = "
                         f"{int(cu[i])} > cu_seqlens[{i + 1}] = {int(cu[i + 1])}")
    if n_tokens is not None and cu[-1] != n_tokens:
        raise ValueError(f"{fn}: cu_seqlens must end at the number of tokens ({n_tokens}), got "
                         f"cu_seqlens[-1] = {int(cu[-1])}")
    return cu


def check_positions(fn: str, positions, shape) -> np.ndarray:
    """positions as a C-contiguous int32 array of `shape`, each in [0, 2**31)."""
    p = _int_array(fn, "positions", positions)
    if p.shape != tuple(shape):
        raise ValueError(f"{fn}: positions must have shape {tuple(shape)} (one per token), got "
                         f"{p.shape}")
    if p.size and (int(p.min()) < 0 or int(p.max()) > _I32_MAX):
        bad = int(np.flatnonzero((p.ravel() < 0) | (p.ravel() > _I32_MAX))[0])
        raise ValueError(f"{fn}: positions must be in [0, 2**31), got positions.flat[{bad}] = "
                         f"{int(p.ravel()[bad])}")
    return np.ascontiguousarray(p, dtype=np.int32)


@dataclass(frozen=True)
class Batch:
    """A batch in the compact varlen form (see the module docstring).

    rows, shape: where each token sits in the padded [B, S] input it came
    from (flat index into B*S), or None for a batch given compact.
    targets None: no loss (logits only). loss_denominator None: the loss is
    the mean over counted targets; else their sum / loss_denominator (HF
    Trainer's num_items_in_batch)."""
    tokens: np.ndarray
    targets: Optional[np.ndarray]
    cu_seqlens: np.ndarray
    positions: np.ndarray
    rows: Optional[np.ndarray] = None
    shape: Optional[Tuple[int, int]] = None
    loss_denominator: Optional[float] = None

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.size)

    @property
    def n_seq(self) -> int:
        return int(self.cu_seqlens.size - 1)

    @property
    def max_seqlen(self) -> int:
        return int(np.diff(self.cu_seqlens).max())

    @property
    def n_counted(self) -> int:
        return 0 if self.targets is None else int((self.targets >= 0).sum())

    def scatter(self, values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """values [N, ...] (one per token) back in the padded [B, S, ...]
        layout, `fill` at padded positions (a padded batch only)."""
        if self.rows is None:
            raise ValueError("Batch.scatter: this batch was given compact (no padded shape)")
        assert self.shape is not None      # a padded batch has both
        B, S = self.shape
        out = np.full((B * S,) + values.shape[1:], fill, dtype=values.dtype)
        out[self.rows] = values
        return out.reshape((B, S) + values.shape[1:])


def _segment_targets(tokens, new_segment):
    """Each token predicts the next one of its segment; a segment's last predicts nothing."""
    tgt = np.full(tokens.shape, -1, dtype=np.int32)
    if tokens.size > 1:
        nxt = ~new_segment[1:]
        tgt[:-1][nxt] = tokens[1:][nxt]
    return tgt


def varlen(tokens, cu_seqlens, *, targets=None, positions=None, fn: str = "varlen") -> Batch:
    """A Batch from the compact form itself: tokens [N], cu_seqlens
    [n_seq+1]; targets [N] (-1 = not counted; default: each token predicts
    the next of its segment); positions [N] (default: index in the segment)."""
    tok = _int_array(fn, "tokens", tokens)
    if tok.ndim != 1 or tok.size == 0:
        raise ValueError(f"{fn}: with cu_seqlens, tokens must be a non-empty 1-D array [N] of the "
                         f"real tokens, got shape {tok.shape}")
    tok = np.ascontiguousarray(tok, dtype=np.int32) if tok.dtype != np.int32 else tok
    cu = check_cu_seqlens(fn, cu_seqlens, tok.size)
    if positions is None:
        seg = np.repeat(np.arange(cu.size - 1), np.diff(cu))
        pos = (np.arange(tok.size) - cu[seg]).astype(np.int32)
    else:
        pos = check_positions(fn, positions, tok.shape)
    if targets is None:
        new = np.zeros(tok.size, dtype=bool)
        new[cu[:-1][cu[:-1] < tok.size]] = True
        tgt = _segment_targets(tok, new)
    else:
        tgt = _int_array(fn, "targets", targets)
        if tgt.shape != tok.shape:
            raise ValueError(f"{fn}: targets must have the shape of tokens {tok.shape}, got "
                             f"{tgt.shape}")
        tgt = np.ascontiguousarray(tgt, dtype=np.int32)
    return Batch(tok, tgt, cu, pos)


def shift_labels(labels, fn: str = "from_padded") -> np.ndarray:
    """HF's causal-LM shift of labels [B, S] (-100 ignored): position t
    predicts labels[t+1] of its row, the last position nothing; as targets
    with -1 for "not counted"."""
    lab = _int_array(fn, "labels", labels)
    if lab.ndim != 2:
        raise ValueError(f"{fn}: labels must be [B, S], got shape {lab.shape}")
    bad = (lab < 0) & (lab != HF_IGNORE_INDEX)
    if bad.any():
        raise ValueError(f"{fn}: labels must be token ids or {HF_IGNORE_INDEX} (ignored), got "
                         f"{int(lab[bad][0])}")
    t = np.full(lab.shape, -1, dtype=np.int64)
    t[:, :-1] = lab[:, 1:]
    t[t == HF_IGNORE_INDEX] = -1
    return t


def from_padded(tokens, *, attention_mask=None, position_ids=None, targets=None, labels=None,
                split_packed: Optional[bool] = None, fn: str = "from_padded") -> Batch:
    """A Batch from a padded or packed [B, S] batch by HF's rules (module
    docstring). targets: [B, S], already shifted (what position t predicts,
    -1 = not counted); labels: HF's unshifted labels (-100 = ignored);
    neither: each real token predicts the next real token of its segment.
    split_packed: cut rows where position_ids restart (default: when there
    is no attention_mask)."""
    tok = _int_array(fn, "tokens", tokens)
    if tok.ndim == 1:
        tok = tok[None]
    if tok.ndim != 2 or tok.size == 0:
        raise ValueError(f"{fn}: tokens must be a non-empty [B, S] array, got shape {tok.shape}")
    B, S = tok.shape
    if targets is not None and labels is not None:
        raise ValueError(f"{fn}: pass targets (shifted) or labels (HF's, unshifted), not both")
    if attention_mask is not None:
        m = _int_array(fn, "attention_mask", attention_mask)
        m = m.reshape(1, -1) if m.ndim == 1 else m
        if m.shape != (B, S):
            raise ValueError(f"{fn}: attention_mask must have the shape of tokens {(B, S)}, got "
                             f"{m.shape}")
        if not np.isin(m, (0, 1)).all():
            raise ValueError(f"{fn}: attention_mask must hold 0 (padding) and 1 (token) only")
        real = m.astype(bool)
    else:
        real = np.ones((B, S), dtype=bool)
    if position_ids is not None:
        p = _int_array(fn, "position_ids", position_ids)
        p = p.reshape(1, -1) if p.ndim == 1 else p
        if p.shape == (1, S) and B > 1:
            p = np.broadcast_to(p, (B, S))   # HF passes unexpanded position_ids
        pos_full = check_positions(fn, p, (B, S))
    else:
        pos_full = np.broadcast_to(np.arange(S, dtype=np.int32), (B, S))
    rows = np.flatnonzero(real.ravel())
    if rows.size == 0:
        raise ValueError(f"{fn}: attention_mask marks no token at all; there is nothing to run")
    row_of = rows // S
    new = np.ones(rows.size, dtype=bool)
    new[1:] = row_of[1:] != row_of[:-1]
    pos = np.ascontiguousarray(pos_full.ravel()[rows], dtype=np.int32)
    if split_packed is None:
        split_packed = attention_mask is None
    if split_packed and position_ids is not None:   # packed documents inside a row
        same_row = row_of[1:] == row_of[:-1]
        new[1:] |= same_row & (pos[1:] != pos[:-1] + 1)
    tok_c = np.ascontiguousarray(tok.ravel()[rows], dtype=np.int32)
    cu = np.append(np.flatnonzero(new), rows.size).astype(np.int64)
    if labels is not None:
        targets = shift_labels(labels, fn)
    if targets is None:
        tgt = _segment_targets(tok_c, new)
    else:
        t = _int_array(fn, "targets", targets)
        t = t.reshape(1, -1) if t.ndim == 1 else t
        if t.shape != (B, S):
            raise ValueError(f"{fn}: targets must have the shape of tokens {(B, S)}, got {t.shape}")
        if (t[~real] != -1).any():
            b, s = np.argwhere((t != -1) & ~real)[0]
            raise ValueError(f"{fn}: position ({b}, {s}) is padding (attention_mask 0) but its "
                             f"target {int(t[b, s])} is counted; set it to -1 (labels: -100)")
        tgt = np.ascontiguousarray(t.ravel()[rows], dtype=np.int32)
    return Batch(tok_c, tgt, cu, pos, rows.astype(np.int64), (B, S))


__all__ = ["Batch", "varlen", "from_padded", "shift_labels", "check_cu_seqlens",
           "check_positions", "HF_IGNORE_INDEX"]
