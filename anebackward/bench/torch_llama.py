"""The one plain-PyTorch Llama of the project, written like llama2.c's model.py:
the PyTorch eager contender of the benchmarks (full step, torch_step.py)
and the autograd oracle of the tests (float64 via `.double()`).

Nothing from anebackward's kernels is used: autograd does every backward.
Same architecture as anebackward.Llama and anebackward.torch.Transformer:
RMSNorm, RoPE on (even, odd) pairs with llama2.c's float32 tables, causal
attention with grouped-query heads (repeat_kv + scaled_dot_product_attention,
llama2.c's flash path), SwiGLU feed-forward, tied or untied classifier,
cross-entropy with ignore_index=-1. Modules are built and initialised in
llama2.c's order (normal(0, 0.02), then the residual projections wo and w3
re-drawn with std 0.02/sqrt(2 n_layers)), so the same torch seed gives the
same weights as llama2.c and anebackward.torch.Transformer.

    model = Transformer(dim=64, n_layers=2, n_heads=4, vocab_size=100, max_seq_len=32)
    logits = model(tokens, targets); model.last_loss.backward()
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .torch_impl import apply_rope, repeat_kv, rope_tables


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
        hd, rep = self.head_dim, self.n_heads // self.n_kv_heads
        q = apply_rope(self.wq(x).view(B, S, self.n_heads, hd), cos, sin)
        k = apply_rope(self.wk(x).view(B, S, self.n_kv_heads, hd), cos, sin)
        v = self.wv(x).view(B, S, self.n_kv_heads, hd)
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


class TransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, hidden_dim, eps):
        super().__init__()
        self.attention = Attention(dim, n_heads, n_kv_heads)
        self.feed_forward = FeedForward(dim, hidden_dim)
        self.attention_norm = RMSNorm(dim, eps)
        self.ffn_norm = RMSNorm(dim, eps)

    def forward(self, x, cos, sin, norm_fn=None):
        def norm(mod, t):   # norm_fn(t, weight, layer_input) may replace RMSNorm (tests)
            return mod(t) if norm_fn is None else norm_fn(t, mod.weight, x)
        h = x + self.attention(norm(self.attention_norm, x), cos, sin)
        return h + self.feed_forward(norm(self.ffn_norm, h))


def hidden_dim_for(dim, hidden_dim=None, multiple_of=256):
    """llama2.c's FeedForward rule when hidden_dim is not given."""
    if hidden_dim is not None:
        return hidden_dim
    hidden_dim = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


class Transformer(nn.Module):
    """llama2.c's ModelArgs as keywords, plus shared_classifier (False: an
    untied `output.weight`) and norm_fn (a replacement for every RMSNorm,
    called as norm_fn(x, weight, layer_input); the seed-defect tests plug the
    seed's wrong backward in here)."""

    def __init__(self, dim, n_layers, n_heads, n_kv_heads=None, vocab_size=32000, hidden_dim=None,
                 multiple_of=256, norm_eps=1e-5, max_seq_len=2048, dropout=0.0,
                 shared_classifier=True, norm_fn=None):
        super().__init__()
        if dropout:
            raise ValueError("torch_llama.Transformer: dropout must be 0 (the oracle is deterministic)")
        n_kv_heads = n_kv_heads or n_heads
        hidden_dim = hidden_dim_for(dim, hidden_dim, multiple_of)
        self.n_layers, self.norm_fn = n_layers, norm_fn
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(TransformerBlock(dim, n_heads, n_kv_heads, hidden_dim, norm_eps)
                                    for _ in range(n_layers))
        self.norm = RMSNorm(dim, norm_eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        if shared_classifier:
            self.tok_embeddings.weight = self.output.weight
        cos, sin = rope_tables(max_seq_len, dim // n_heads)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)
        for mod in self.modules():   # llama2.c's _init_weights, then the residual projections
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, mean=0.0, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith(("w3.weight", "wo.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))
        self.last_loss = None

    @classmethod
    def from_config(cls, c, **kw):
        """From an anebackward.LlamaConfig or a dict with its fields."""
        get = c.get if isinstance(c, dict) else (lambda k, d=None: getattr(c, k, d))
        return cls(dim=get("dim"), n_layers=get("n_layers"), n_heads=get("n_heads"),
                   n_kv_heads=get("n_kv_heads"), vocab_size=get("vocab_size"),
                   hidden_dim=get("hidden_dim"), norm_eps=get("norm_eps", 1e-5),
                   max_seq_len=get("max_seq_len"),
                   shared_classifier=get("shared_classifier", True), **kw)

    def load_arrays(self, params):
        """Copy name -> array (anebackward.Llama.params) into the parameters."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(torch.from_numpy(params[name]))
        return self

    def forward(self, tokens, targets=None):
        """Logits (all positions with targets, else the last one); sets last_loss."""
        S = tokens.shape[1]
        h = self.tok_embeddings(tokens)
        cos, sin = self.freqs_cos[:S], self.freqs_sin[:S]
        for layer in self.layers:
            h = layer(h, cos, sin, self.norm_fn)
        h = self.norm(h) if self.norm_fn is None else self.norm_fn(h, self.norm.weight, None)
        if targets is None:
            self.last_loss = None
            return self.output(h[:, [-1], :])
        logits = self.output(h)
        self.last_loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                         ignore_index=-1)
        return logits


def make_step(c, tokens, targets, adamw, autocast=False):
    """A callable doing one training step: forward, backward, clip to 1.0, AdamW
    (the forward under torch.autocast("cpu", torch.bfloat16) with autocast)."""
    torch.manual_seed(0)
    model = Transformer.from_config(c)
    opt = torch.optim.AdamW(model.parameters(), lr=adamw["lr"], betas=(adamw["beta1"], adamw["beta2"]),
                            eps=adamw["eps"], weight_decay=adamw["weight_decay"])
    tok = torch.from_numpy(tokens).long()[None]
    tgt = torch.from_numpy(targets).long()[None]

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(tok, tgt)
        model.last_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return model.last_loss
    return step
