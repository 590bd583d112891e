"""A plain PyTorch Llama in the style of llama2.c's model.py: the PyTorch
eager contender of the full training step (forward, backward, clip, AdamW).

Same architecture and math as anebackward.model: RMSNorm, RoPE on (even,
odd) pairs, causal attention with grouped-query heads (repeat_kv +
scaled_dot_product_attention), SwiGLU feed-forward, tied or untied
classifier, cross-entropy with ignore_index=-1.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_impl import apply_rope, repeat_kv, rope_tables  # noqa: E402  (bench/ is on sys.path)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x, cos, sin):
        B, S, _ = x.shape
        hd = self.head_dim
        q = self.wq(x).view(B, S, self.n_heads, hd)
        k = self.wk(x).view(B, S, self.n_kv_heads, hd)
        v = self.wv(x).view(B, S, self.n_kv_heads, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.n_heads // self.n_kv_heads
        k, v = repeat_kv(k, rep), repeat_kv(v, rep)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        return self.wo(o.transpose(1, 2).reshape(B, S, -1))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = Attention(c["dim"], c["n_heads"], c["n_kv_heads"])
        self.feed_forward = FeedForward(c["dim"], c["hidden_dim"])
        self.attention_norm = RMSNorm(c["dim"], c["norm_eps"])
        self.ffn_norm = RMSNorm(c["dim"], c["norm_eps"])

    def forward(self, x, cos, sin):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """c: dict with dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
    max_seq_len, shared_classifier, norm_eps."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.tok_embeddings = nn.Embedding(c["vocab_size"], c["dim"])
        self.layers = nn.ModuleList(Block(c) for _ in range(c["n_layers"]))
        self.norm = RMSNorm(c["dim"], c["norm_eps"])
        self.output = nn.Linear(c["dim"], c["vocab_size"], bias=False)
        if c.get("shared_classifier", True):
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(c["max_seq_len"], c["dim"] // c["n_heads"])
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # llama2.c's model.py scales these two residual projections
                std = 0.02 / math.sqrt(2 * c["n_layers"]) if name.endswith(("wo.weight", "w3.weight")) \
                    else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, tokens, targets):
        S = tokens.shape[1]
        x = self.tok_embeddings(tokens)
        cos, sin = self.cos[:S], self.sin[:S]
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.output(self.norm(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def make_step(c, tokens, targets, adamw):
    """A callable doing one training step: forward, backward, clip to 1.0, AdamW."""
    torch.manual_seed(0)
    model = Transformer(c)
    opt = torch.optim.AdamW(model.parameters(), lr=adamw["lr"], betas=(adamw["beta1"], adamw["beta2"]),
                            eps=adamw["eps"], weight_decay=adamw["weight_decay"])
    tok = torch.from_numpy(tokens).long()[None]
    tgt = torch.from_numpy(targets).long()[None]

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(tok, tgt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss
    return step
