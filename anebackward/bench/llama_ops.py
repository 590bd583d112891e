"""A Llama training step written once against the kernel API, run with any
set of kernels ("ops"): NumPy (numpy_impl.py), or anebackward's own
kernels with backend="reference" (the seed's scalar loops, corrected) or
backend="auto" (anebackward.bench.cases.KernelOps). This gives the full-step figures of the NumPy contender
and of the seed loops; it is NOT anebackward.model (that is timed as "ours").

Parameters, gradients and the AdamW moments each live in one flat float32
buffer (named views), so clipping and AdamW are single passes, as in the
package's model. Tokens [S]: position t predicts t+1, the last position is
ignored (target -1), loss = mean over the S-1 predicted positions.
"""
import numpy as np


def param_shapes(c):
    D, Hd, L = c["dim"], c["hidden_dim"], c["n_layers"]
    kv = c["n_kv_heads"] * (D // c["n_heads"])
    shapes = [("tok_embeddings.weight", (c["vocab_size"], D))]
    for i in range(L):
        p = f"layers.{i}."
        shapes += [(p + "attention_norm.weight", (D,)), (p + "attention.wq.weight", (D, D)),
                   (p + "attention.wk.weight", (kv, D)), (p + "attention.wv.weight", (kv, D)),
                   (p + "attention.wo.weight", (D, D)), (p + "ffn_norm.weight", (D,)),
                   (p + "feed_forward.w1.weight", (Hd, D)), (p + "feed_forward.w2.weight", (D, Hd)),
                   (p + "feed_forward.w3.weight", (Hd, D))]
    shapes.append(("norm.weight", (D,)))
    if not c.get("shared_classifier", True):
        shapes.append(("output.weight", (c["vocab_size"], D)))
    return shapes


def n_params(c):
    return sum(int(np.prod(s)) for _, s in param_shapes(c))


def _views(flat, shapes):
    out, o = {}, 0
    for name, s in shapes:
        n = int(np.prod(s))
        out[name] = flat[o:o + n].reshape(s)
        o += n
    return out


class ComposedLlama:
    def __init__(self, c, ops, seed=0):
        self.c, self.ops = c, ops
        shapes = param_shapes(c)
        P = sum(int(np.prod(s)) for _, s in shapes)
        rng = np.random.default_rng(seed)
        self.flat = (rng.standard_normal(P, dtype=np.float32) * np.float32(0.02))
        self.gflat = np.zeros(P, np.float32)
        self.m, self.v = np.zeros(P, np.float32), np.zeros(P, np.float32)
        self.p, self.g = _views(self.flat, shapes), _views(self.gflat, shapes)
        for name, _ in shapes:
            if name.endswith("norm.weight"):
                self.p[name][...] = 1.0
        self.t = 0

    def _cls(self, d):
        return d["tok_embeddings.weight" if self.c.get("shared_classifier", True) else "output.weight"]

    def step(self, tokens, targets, adamw):
        o, c, p, g = self.ops, self.c, self.p, self.g
        H, KV, eps = c["n_heads"], c["n_kv_heads"], c["norm_eps"]
        hd = c["dim"] // H
        # ---- forward, keeping what the backward needs ----
        x = o.embedding(tokens, p["tok_embeddings.weight"])
        cache = []
        for i in range(c["n_layers"]):
            L = f"layers.{i}."
            xn = o.rmsnorm(x, p[L + "attention_norm.weight"], eps=eps)
            q = o.rope(o.linear(xn, p[L + "attention.wq.weight"]), head_dim=hd)
            k = o.rope(o.linear(xn, p[L + "attention.wk.weight"]), head_dim=hd)
            v = o.linear(xn, p[L + "attention.wv.weight"])
            a = o.attention(q, k, v, n_heads=H, n_kv_heads=KV)
            x2 = x + o.linear(a, p[L + "attention.wo.weight"])
            xn2 = o.rmsnorm(x2, p[L + "ffn_norm.weight"], eps=eps)
            h1 = o.linear(xn2, p[L + "feed_forward.w1.weight"])
            h3 = o.linear(xn2, p[L + "feed_forward.w3.weight"])
            s = o.swiglu(h1, h3)
            x3 = x2 + o.linear(s, p[L + "feed_forward.w2.weight"])
            cache.append((x, xn, q, k, v, a, x2, xn2, h1, h3, s))
            x = x3
        xf = o.rmsnorm(x, p["norm.weight"], eps=eps)
        logits = o.linear(xf, self._cls(p))
        loss, dlogits = o.cross_entropy_backward(logits, targets)
        # ---- backward ----
        self.gflat[...] = 0.0
        o.linear_backward_dW(dlogits, xf, dW=self._cls(g), accumulate=True)
        dxf = o.linear_backward_dx(dlogits, self._cls(p))
        dx, _ = o.rmsnorm_backward(dxf, x, p["norm.weight"], eps=eps, dw=g["norm.weight"],
                                   accumulate=True)
        for i in reversed(range(c["n_layers"])):
            L = f"layers.{i}."
            x, xn, q, k, v, a, x2, xn2, h1, h3, s = cache[i]
            o.linear_backward_dW(dx, s, dW=g[L + "feed_forward.w2.weight"], accumulate=True)
            ds = o.linear_backward_dx(dx, p[L + "feed_forward.w2.weight"])
            dh1, dh3 = o.swiglu_backward(ds, h1, h3)
            o.linear_backward_dW(dh1, xn2, dW=g[L + "feed_forward.w1.weight"], accumulate=True)
            o.linear_backward_dW(dh3, xn2, dW=g[L + "feed_forward.w3.weight"], accumulate=True)
            dxn2 = o.linear_backward_dx(dh1, p[L + "feed_forward.w1.weight"])
            o.linear_backward_dx(dh3, p[L + "feed_forward.w3.weight"], dx=dxn2, accumulate=True)
            o.rmsnorm_backward(dxn2, x2, p[L + "ffn_norm.weight"], eps=eps, dx=dx, accumulate=True,
                               dw=g[L + "ffn_norm.weight"])
            o.linear_backward_dW(dx, a, dW=g[L + "attention.wo.weight"], accumulate=True)
            da = o.linear_backward_dx(dx, p[L + "attention.wo.weight"])
            dq, dk, dv = o.attention_backward(da, q, k, v, n_heads=H, n_kv_heads=KV)
            dq = o.rope_backward(dq, head_dim=hd)
            dk = o.rope_backward(dk, head_dim=hd)
            for name, d in (("wq", dq), ("wk", dk), ("wv", dv)):
                o.linear_backward_dW(d, xn, dW=g[L + f"attention.{name}.weight"], accumulate=True)
            dxn = o.linear_backward_dx(dq, p[L + "attention.wq.weight"])
            o.linear_backward_dx(dk, p[L + "attention.wk.weight"], dx=dxn, accumulate=True)
            o.linear_backward_dx(dv, p[L + "attention.wv.weight"], dx=dxn, accumulate=True)
            o.rmsnorm_backward(dxn, x, p[L + "attention_norm.weight"], eps=eps, dx=dx,
                               accumulate=True, dw=g[L + "attention_norm.weight"])
        o.embedding_backward(dx, tokens, dE=g["tok_embeddings.weight"], accumulate=True)
        # ---- clip and AdamW over the flat buffers ----
        o.clip_grad_norm(self.gflat, 1.0)
        self.t += 1
        o.adamw_step(self.flat, self.gflat, self.m, self.v, step=self.t, lr=adamw["lr"],
                     beta1=adamw["beta1"], beta2=adamw["beta2"], eps=adamw["eps"],
                     weight_decay=adamw["weight_decay"])
        return loss
