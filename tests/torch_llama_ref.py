"""A plain-PyTorch Llama in the style of llama2.c's model.py: the oracle for
anebackward.torch.Transformer. Autograd does every backward here; nothing
from anebackward is imported. Works in float32 and float64."""
import math

import torch
import torch.nn.functional as F
from torch import nn


class RefRMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def ref_freqs(head_dim, end):
    freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    ang = torch.outer(torch.arange(end).float(), freqs)
    return torch.cos(ang), torch.sin(ang)


def ref_rotary(x, cos, sin):
    """x [B, S, H, hd]; pairs (2i, 2i+1) rotate by the table angles."""
    xr, xi = x.reshape(x.shape[:-1] + (-1, 2)).unbind(-1)
    c, s = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return torch.stack([xr * c - xi * s, xr * s + xi * c], dim=-1).flatten(3)


class RefAttention(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.attn_dropout = nn.Dropout(0.0)
        self.resid_dropout = nn.Dropout(0.0)

    def forward(self, x, cos, sin):
        B, S, _ = x.shape
        hd = self.head_dim
        q = ref_rotary(self.wq(x).view(B, S, self.n_heads, hd), cos, sin)
        k = ref_rotary(self.wk(x).view(B, S, self.n_kv_heads, hd), cos, sin)
        v = self.wv(x).view(B, S, self.n_kv_heads, hd)
        rep = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(2, 3) / math.sqrt(hd)
        mask = torch.full((S, S), float("-inf"), dtype=x.dtype).triu(1)
        p = F.softmax(scores + mask, dim=-1)
        out = (p @ v).transpose(1, 2).contiguous().view(B, S, -1)
        return self.wo(out)


class RefFeedForward(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RefBlock(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, hidden_dim, eps):
        super().__init__()
        self.attention = RefAttention(dim, n_heads, n_kv_heads)
        self.feed_forward = RefFeedForward(dim, hidden_dim)
        self.attention_norm = RefRMSNorm(dim, eps)
        self.ffn_norm = RefRMSNorm(dim, eps)

    def forward(self, x, cos, sin):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class RefLlama(nn.Module):
    """Constructed and initialised in llama2.c's order (same RNG draws)."""

    def __init__(self, dim, n_layers, n_heads, n_kv_heads=None, vocab_size=32000, hidden_dim=None,
                 multiple_of=256, norm_eps=1e-5, max_seq_len=2048, dropout=0.0):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if hidden_dim is None:
            hidden_dim = int(2 * 4 * dim / 3)
            hidden_dim = multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(RefBlock(dim, n_heads, n_kv_heads, hidden_dim, norm_eps)
                                    for _ in range(n_layers))
        self.norm = RefRMSNorm(dim, norm_eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        self.tok_embeddings.weight = self.output.weight
        cos, sin = ref_freqs(dim // n_heads, max_seq_len)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, mean=0.0, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("w3.weight") or name.endswith("wo.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))
        self.last_loss = None

    def forward(self, tokens, targets=None):
        S = tokens.shape[1]
        h = self.tok_embeddings(tokens)
        cos, sin = self.freqs_cos[:S], self.freqs_sin[:S]
        for layer in self.layers:
            h = layer(h, cos, sin)
        h = self.norm(h)
        if targets is None:
            self.last_loss = None
            return self.output(h[:, [-1], :])
        logits = self.output(h)
        self.last_loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                         ignore_index=-1)
        return logits
