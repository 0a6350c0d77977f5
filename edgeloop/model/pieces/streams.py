"""How the loop carries its state: hyper-connection kinds (config field `hc`) and, for one stream,
injection kinds (config field `injection`), in PyTorch and as ONNX nodes.

Every hc kind (an nn.Module at `model.hc`; its parameters are stacked per loop [r, ...]):
    state = init(e)                          e = the begin block's output [B, T, d]
    u, mix = enter(state, e, l, inject)      the middle block's input in loop l
    state = leave(state, o, l, mix)          o = the middle block's output
    x = collapse(state)                      the end block's input
with emit_* twins (l is then an int64 scalar value: the Loop's iteration number or a constant).
`inject` is the model's Linear [d, 2d] for the injection kinds that need one (else None).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from edgeloop.model.pieces import build, register
from edgeloop.model.pieces.norm import emit_rms_norm, rms_norm


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Doubly stochastic matrix from exp(logits - max), alternating row and column normalisation."""
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        m = m / m.sum(-1, keepdim=True)
        m = m / m.sum(-2, keepdim=True)
    return m


def emit_sinkhorn(g, logits, iters: int):
    """exp(logits - max), then `iters` times rows then columns to sum 1 (an L1 LpNormalization each)."""
    m = g.Exp(g.Sub(logits, g.ReduceMax(logits, g.const([-2, -1]), keepdims=1)))
    for _ in range(iters):
        m = g.LpNormalization(g.LpNormalization(m, axis=-1, p=1), axis=-2, p=1)
    return m


class _Streams(nn.Module):
    """n parallel streams Y [B, T, n, d]: u = sum_i H_pre_i Y_i;  Y = H_res Y + H_post (x) o."""
    needs_inject = False
    matrices: tuple[str, ...] = ()  # per-loop [r, K, N] parameters INT4 can take (--quantize-hc)

    def __init__(self, cfg):
        super().__init__()
        self.n, self.d, self.collapse_kind = cfg.n_streams, cfg.d_model, cfg.collapse

    def state_dims(self) -> list:
        return ["batch_size", "sequence_length", self.n, self.d]

    def init(self, e, init_scale: float = 0.0):
        B, T, d = e.shape
        return e.unsqueeze(2).expand(B, T, self.n, d)

    def enter(self, Y, e, l, inject):
        h_pre, h_post, h_res = self.coefficients(Y, l)
        return (h_pre.unsqueeze(-1) * Y).sum(-2), (h_post, h_res)

    def leave(self, Y, o, l, mix):
        h_post, h_res = mix
        return h_res @ Y + h_post.unsqueeze(-1) * o.unsqueeze(-2)

    def collapse(self, Y):
        return Y.mean(-2) if self.collapse_kind == "mean" else Y.sum(-2)

    def emit_init(self, g, e, ctx):
        B_S = g.Shape(e, start=0, end=2)
        return g.Expand(g.Unsqueeze(e, g.const([2])), g.Concat(B_S, g.const([self.n, self.d]), axis=0))

    def emit_enter(self, g, w, Y, e, l, inject):
        h_pre, h_post, h_res = self.emit_coefficients(g, w, Y, l)
        return g.ReduceSum(g.Mul(g.Unsqueeze(h_pre, g.const([-1])), Y), g.const([-2]), keepdims=0), (h_post, h_res)

    def emit_leave(self, g, w, Y, o, l, mix):
        h_post, h_res = mix
        return g.Add(g.MatMul(h_res, Y), g.Mul(g.Unsqueeze(h_post, g.const([-1])), g.Unsqueeze(o, g.const([-2]))))

    def emit_collapse(self, g, Y):
        return (g.ReduceMean if self.collapse_kind == "mean" else g.ReduceSum)(Y, g.const([2]), keepdims=0)


@register("hc", "dynamic")
class DynamicHC(_Streams):
    """mHC-style per-token mixing. z = RMSNorm(flatten(Y)):
    H_pre = sigmoid(a_pre z W_pre + b_pre), H_post = 2 sigmoid(a_post z W_post + b_post),
    H_res = Sinkhorn(a_res z W_res + b_res)."""
    matrices = ("w_pre", "w_post", "w_res")

    def __init__(self, cfg):
        super().__init__(cfg)
        r, n, d = cfg.loop_limit, cfg.n_streams, cfg.d_model  # a row per loop it may run
        self.eps, self.iters = cfg.norm_eps, cfg.sinkhorn_iters
        self.w_pre = nn.Parameter(torch.zeros(r, n * d, n))
        self.w_post = nn.Parameter(torch.zeros(r, n * d, n))
        self.w_res = nn.Parameter(torch.zeros(r, n * d, n * n))
        self.a_pre = nn.Parameter(torch.full((r,), 0.01))
        self.a_post = nn.Parameter(torch.full((r,), 0.01))
        self.a_res = nn.Parameter(torch.full((r,), 0.01))
        # at init: u = mean of streams, o written to every stream, H_res close to identity
        self.b_pre = nn.Parameter(torch.full((r, n), -math.log(n - 1) if n > 1 else 4.0))
        self.b_post = nn.Parameter(torch.zeros(r, n))
        self.b_res = nn.Parameter(4.0 * torch.eye(n).repeat(r, 1, 1))

    def coefficients(self, Y: torch.Tensor, l: int):
        B, T, n, d = Y.shape
        z = rms_norm(Y.reshape(B, T, n * d), self.eps)
        h_pre = torch.sigmoid(self.a_pre[l] * (z @ self.w_pre[l]) + self.b_pre[l])
        h_post = 2 * torch.sigmoid(self.a_post[l] * (z @ self.w_post[l]) + self.b_post[l])
        h_res = sinkhorn(self.a_res[l] * (z @ self.w_res[l]).view(B, T, n, n) + self.b_res[l], self.iters)
        return h_pre, h_post, h_res

    def emit_coefficients(self, g, w, Y, l):
        n = self.n
        z = emit_rms_norm(g, g.Reshape(Y, g.const([0, 0, n * self.d])), self.eps)
        W, a, b = (g.Gather(t, l, axis=0) for t in self.emit_projection(g, w))
        pre, post, res = g.Split(g.Add(g.Mul(g.MatMul(z, W), a), b), g.const([n, n, n * n]), axis=-1, _outputs=3)
        h_pre, h_post = g.Sigmoid(pre), g.Mul(g.const(2.0, np.float32), g.Sigmoid(post))
        return h_pre, h_post, emit_sinkhorn(g, g.Reshape(res, g.const([0, 0, n, n])), self.iters)

    def emit_projection(self, g, w):
        """The three projections of every loop as ONE MatMul: W = [W_pre | W_post | W_res] [r, n*d, 2n + n^2],
        its per-column scale a = [a_pre.. | a_post.. | a_res..] and bias b = [b_pre | b_post | b_res]
        (concatenations only: the values and dtype stay exact)."""
        parts = ("pre", "post", "res")
        t = {f"{x}_{k}": w.kept(w.name(self, f"{x}_{k}")) for x in "wab" for k in parts}
        half = t["w_pre"].dtype == torch.float16
        W = torch.cat([t[f"w_{k}"] for k in parts], -1)
        widths = [t[f"w_{k}"].shape[-1] for k in parts]
        a = torch.cat([t[f"a_{k}"][:, None].expand(-1, m) for k, m in zip(parts, widths)], -1)
        b = torch.cat([t["b_pre"], t["b_post"], t["b_res"].flatten(1)], -1)
        name = w.name(self, "projection")
        return tuple(w.float_constant(g, f"{name}{suffix}", v.float().numpy(), half)
                     for suffix, v in (("", W), ("_scale", a), ("_bias", b)))


@register("hc", "static")
class StaticLanes(_Streams):
    """looped-lm-scaling lanes: H_pre = alpha[l], H_post = beta[l], H_res = M[l] (the same for every token)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        r, n = cfg.loop_limit, cfg.n_streams
        self.lane_alpha = nn.Parameter(torch.full((r, n), 1.0 / n))
        self.lane_mixing = nn.Parameter(torch.eye(n).repeat(r, 1, 1))
        self.lane_beta = nn.Parameter(torch.full((r, n), 1.0 / n))

    def coefficients(self, Y, l):
        return self.lane_alpha[l], self.lane_beta[l], self.lane_mixing[l]

    def emit_coefficients(self, g, w, Y, l):
        return tuple(w.loop_row(g, self, p, l) for p in ("lane_alpha", "lane_beta", "lane_mixing"))


@register("hc", "none")
class OneStream(nn.Module):
    """One stream s; the begin output e enters each loop by the injection kind (config field `injection`)."""
    matrices: tuple[str, ...] = ()

    def __init__(self, cfg):
        super().__init__()
        self.injection = build("injection", cfg.injection, cfg)
        self.needs_inject, self.d = self.injection.linear, cfg.d_model

    def state_dims(self) -> list:
        return ["batch_size", "sequence_length", self.d]

    def init(self, e, init_scale: float = 0.0):
        return self.injection.init(e, init_scale)

    def enter(self, s, e, l, inject):
        return self.injection.input(s, e, inject), None

    def leave(self, s, o, l, mix):
        return o

    def collapse(self, s):
        return s

    def emit_init(self, g, e, ctx):
        return self.injection.emit_init(g, e, ctx)

    def emit_enter(self, g, w, s, e, l, inject):
        return self.injection.emit_input(g, w, s, e, inject), None

    def emit_leave(self, g, w, s, o, l, mix):
        return o

    def emit_collapse(self, g, s):
        return s


# ---- injection kinds: s0 = init(e); u = input(s, e) ------------------------------------------
@register("injection", "passthrough")
class Passthrough:
    """s0 = e;  u = s."""
    linear = False
    random_start = False  # whether init() can draw a random state (init_scale > 0)

    def __init__(self, cfg):
        self.cfg = cfg

    def init(self, e, init_scale: float = 0.0):
        return e

    def input(self, s, e, inject):
        return s

    def emit_init(self, g, e, ctx):
        return e

    def emit_input(self, g, w, s, e, inject):
        return s


@register("injection", "additive")
class Additive(Passthrough):
    """s0 = 0;  u = s + e."""

    def init(self, e, init_scale: float = 0.0):
        return torch.zeros_like(e)

    def input(self, s, e, inject):
        return s + e

    def emit_init(self, g, e, ctx):
        return emit_zeros_like(g, e)

    def emit_input(self, g, w, s, e, inject):
        return g.Add(s, e)


@register("injection", "inject")
class Inject(Passthrough):
    """s0 = e;  u = W [e; s]  (W: the model's `inject` Linear [d, 2d])."""
    linear = True

    def input(self, s, e, inject):
        return inject(torch.cat([e, s], dim=-1))

    def emit_input(self, g, w, s, e, inject):
        return w.linear(g, g.Concat(e, s, axis=-1), inject)


@register("injection", "adapter")
class Adapter(Passthrough):
    """u = W [s; e] (state first; W: the model's `inject` Linear [d, 2d]), s0 = 0, or with init_scale > 0
    Huginn's random start: s0 = TruncNormal(0, sigma^2, +-3 sigma) * embed_scale, sigma = std * init_scale, std =
    the config's init_std (the source's init_values.std), or sqrt(2 / (5d)) where it is 0."""
    linear = True
    random_start = True

    def sigma(self) -> float:
        return self.cfg.init_std or math.sqrt(2 / (5 * self.cfg.d_model))

    def init(self, e, init_scale: float = 0.0):
        if not init_scale:
            return torch.zeros_like(e)
        std = self.sigma() * init_scale
        x = torch.nn.init.trunc_normal_(torch.empty_like(e), 0.0, std, -3 * std, 3 * std)
        return x * self.cfg.embed_scale

    def input(self, s, e, inject):
        return inject(torch.cat([s, e], dim=-1))

    def emit_init(self, g, e, ctx):
        """Zeros; in an export with a random start (ctx["init_scale"], the graph's float input), a standard
        normal from RandomNormalLike (seeded) clipped to +-3 (a clipped, not resampled, truncation)."""
        if "init_scale" not in ctx:
            return emit_zeros_like(g, e)
        z = g.Clip(g.RandomNormalLike(e, seed=float(ctx["seed"]), dtype=1), g.const(-3.0, np.float32),
                   g.const(3.0, np.float32))
        return g.Mul(z, g.Mul(ctx["init_scale"], g.const(self.sigma() * self.cfg.embed_scale, np.float32)))

    def emit_input(self, g, w, s, e, inject):
        return w.linear(g, g.Concat(s, e, axis=-1), inject)


def emit_zeros_like(g, x):
    from onnx_ir import tensor  # the ConstantOfShape value attribute is a tensor

    return g.ConstantOfShape(g.Shape(x), value=tensor(np.zeros(1, np.float32)))
