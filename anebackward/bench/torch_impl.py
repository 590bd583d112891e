"""PyTorch eager (CPU) contenders for each kernel: the "torch" column.

make(kernel, inputs, dims) returns a zero-argument callable that does the
kernel's work the way a PyTorch user gets it: forward ops under no_grad,
backward through autograd (torch.autograd.grad on a graph built once, so
only the backward is timed), torch.nn.utils.clip_grad_norm_ and
torch.optim.AdamW. Inputs are the suite's NumPy arrays shared zero-copy
(torch.from_numpy), so every contender sees the same data.
"""
import torch
import torch.nn.functional as F


def _t(a, grad=False):
    t = torch.from_numpy(a)
    return t.requires_grad_(True) if grad else t


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_tables(S, head_dim, pos_offset=0):
    i = torch.arange(0, head_dim, 2, dtype=torch.float32)
    freq = 1.0 / (10000.0 ** (i / head_dim))
    ang = torch.outer(torch.arange(pos_offset, pos_offset + S, dtype=torch.float32), freq)
    return torch.cos(ang), torch.sin(ang)       # [S, hd/2]


def apply_rope(x, cos, sin):
    """x [B, S, H, hd] rotated in (even, odd) pairs, as llama2.c model.py."""
    xr = x.reshape(x.shape[:-1] + (-1, 2))
    x0, x1 = xr.unbind(-1)
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(3)


def repeat_kv(x, rep):
    """[B, S, KV, hd] -> [B, S, KV*rep, hd] (llama2.c model.py)."""
    if rep == 1:
        return x
    B, S, KV, hd = x.shape
    return x[:, :, :, None, :].expand(B, S, KV, rep, hd).reshape(B, S, KV * rep, hd)


def attention(q, k, v, n_heads, n_kv_heads):
    """token-major [S, H*hd] in and out, SDPA (causal) inside."""
    S = q.shape[-2]
    hd = q.shape[-1] // n_heads
    qh = q.reshape(1, S, n_heads, hd)
    kh = repeat_kv(k.reshape(1, S, n_kv_heads, hd), n_heads // n_kv_heads)
    vh = repeat_kv(v.reshape(1, S, n_kv_heads, hd), n_heads // n_kv_heads)
    o = F.scaled_dot_product_attention(qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2),
                                       is_causal=True)
    return o.transpose(1, 2).reshape(q.shape)


def _grad(y, xs, dy):
    return lambda: torch.autograd.grad(y, xs, dy, retain_graph=True)


def make(kernel, inp, dims):
    """A callable running `kernel` on the suite's inputs `inp` (dict of arrays)."""
    g = {k: _t(a) for k, a in inp.items()}
    eps = 1e-5
    if kernel == "linear":
        x, W = g["x"], g["W"]
        return lambda: F.linear(x, W)
    if kernel == "linear_backward_dx":
        x = _t(inp["x"], True)
        return _grad(F.linear(x, g["W"]), (x,), g["dy"])
    if kernel == "linear_backward_dW":
        W = _t(inp["W"], True)
        return _grad(F.linear(g["x"], W), (W,), g["dy"])
    if kernel == "rmsnorm":
        x, w = g["x"], g["w"]
        return lambda: _rms(x, w, eps)
    if kernel == "rmsnorm_backward":
        x, w = _t(inp["x"], True), _t(inp["w"], True)
        return _grad(_rms(x, w, eps), (x, w), g["dy"])
    if kernel in ("rope", "rope_backward"):
        hd = dims["head_dim"]
        S, width = inp["x"].shape
        cos, sin = rope_tables(S, hd)
        if kernel == "rope":
            x = g["x"]
            return lambda: apply_rope(x.view(1, S, width // hd, hd), cos, sin)
        x = _t(inp["x"], True)
        y = apply_rope(x.view(1, S, width // hd, hd), cos, sin)
        return _grad(y, (x,), g["dy"].view(1, S, width // hd, hd))
    if kernel in ("attention", "attention_backward"):
        H, KV = dims["n_heads"], dims["n_kv_heads"]
        if kernel == "attention":
            q, k, v = g["q"], g["k"], g["v"]
            return lambda: attention(q, k, v, H, KV)
        q, k, v = (_t(inp[n], True) for n in ("q", "k", "v"))
        return _grad(attention(q, k, v, H, KV), (q, k, v), g["dout"])
    if kernel == "swiglu":
        h1, h3 = g["h1"], g["h3"]
        return lambda: F.silu(h1) * h3
    if kernel == "swiglu_backward":
        h1, h3 = _t(inp["h1"], True), _t(inp["h3"], True)
        return _grad(F.silu(h1) * h3, (h1, h3), g["dy"])
    if kernel in ("cross_entropy", "cross_entropy_backward"):
        tg = torch.from_numpy(inp["targets"]).long()
        if kernel == "cross_entropy":
            lg = g["logits"]
            return lambda: F.cross_entropy(lg, tg, ignore_index=-1)
        lg = _t(inp["logits"], True)

        def fwd_bwd():  # ours returns loss and dlogits in one call: time both here too
            loss = F.cross_entropy(lg, tg, ignore_index=-1)
            return torch.autograd.grad(loss, (lg,))
        return fwd_bwd
    if kernel in ("embedding", "embedding_backward"):
        tok = torch.from_numpy(inp["tokens"]).long()
        if kernel == "embedding":
            E = g["E"]
            return lambda: F.embedding(tok, E)
        E = _t(inp["E"], True)
        return _grad(F.embedding(tok, E), (E,), g["dx"])
    if kernel == "grad_norm":
        gr = g["grad"]
        return lambda: torch.linalg.vector_norm(gr)
    if kernel == "clip_grad_norm":
        p = torch.nn.Parameter(torch.empty(0))
        p.data = g["param"]
        p.grad = g["grad"]
        return lambda: torch.nn.utils.clip_grad_norm_([p], dims["max_norm"])
    if kernel == "adamw_step":
        p = torch.nn.Parameter(torch.empty(0))
        p.data = g["param"]
        p.grad = g["grad"]
        h = dims["adamw"]
        opt = torch.optim.AdamW([p], lr=h["lr"], betas=(h["beta1"], h["beta2"]), eps=h["eps"],
                                weight_decay=h["weight_decay"])
        return opt.step
    raise KeyError(kernel)
