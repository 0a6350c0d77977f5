"""The Hyperloop transformer, the math in order (the one definition of the architecture).

    x = embed(tokens)                        (optionally RMSNorm'd)
    x = begin(x)                             n_begin layers, once
    Y = expand(x)                            n streams, Y: [B, T, n, d]
    for l in 0 .. num_loops-1:               middle block, weights shared across l
        u = sum_i H_pre[l]_i * Y_i           (+ loop_embed[l])
        o = middle(u)                        (optionally o = norm_mid(o)); KV slot per (l, layer)
        Y = H_res[l] @ Y + H_post[l] (x) o
    x = collapse(Y)                          mean or sum over streams
    x = end(x)                               n_end layers, once
    logits = lm_head(final_norm(x))          (optionally softcap * tanh(logits / softcap))

hc = "dynamic": H_* computed per token from z = RMSNorm(flatten(Y)) (mHC-style, H_res Sinkhorn).
hc = "static":  H_pre = alpha[l], H_post = beta[l], H_res = M[l] (looped-lm-scaling lanes).
hc = "none":    one stream s, with the injection of the begin output e:
                passthrough u = s (s0 = e); additive u = s + e (s0 = 0); inject u = W [e; s] (s0 = e).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeloop.model.config import HyperloopConfig


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last axis."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.eps) * self.weight


def rope_tables(cfg: HyperloopConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, head_dim/2] for angles pos * theta^(-2i/head_dim); optionally bf16-rounded."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    if cfg.rope_bf16:
        cos, sin = cos.bfloat16().float(), sin.bfloat16().float()
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotary: [x1, x2] -> [x1 cos + x2 sin, -x1 sin + x2 cos]; x [B, H, T, hd], cos [B, 1, T, hd/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class Attention(nn.Module):
    """Causal attention with rotary positions, grouped-query KV heads and optional QK-norm (after rotary)."""

    def __init__(self, cfg: HyperloopConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.c_q = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=False)
        self.c_k = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=False)
        self.c_v = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=False)
        self.c_proj = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, mask, past):
        cfg, (B, T, _) = self.cfg, x.shape
        q = self.c_q(x).view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = self.c_k(x).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.c_v(x).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cfg.qk_norm:
            q, k = rms_norm(q, cfg.norm_eps), rms_norm(k, cfg.norm_eps)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        present = (k, v)
        rep = cfg.n_heads // cfg.n_kv_heads
        kk, vv = (k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)) if rep > 1 else (k, v)
        if isinstance(mask, str):  # "causal" (no past) or "none" (one query over all of the past)
            y = F.scaled_dot_product_attention(q, kk, vv, is_causal=mask == "causal")
        else:
            y = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1)), present


class MLP(nn.Module):
    """swiglu: c_proj(silu(c_gate x) * c_fc x);  relu2: c_proj(relu(c_fc x)^2)."""

    def __init__(self, cfg: HyperloopConfig):
        super().__init__()
        self.kind = cfg.mlp
        self.c_fc = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        if cfg.mlp == "swiglu":
            self.c_gate = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.c_proj = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x):
        if self.kind == "swiglu":
            return self.c_proj(F.silu(self.c_gate(x)) * self.c_fc(x))
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    """Pre-norm block: x += attn(norm1 x); x += mlp(norm2 x)."""

    def __init__(self, cfg: HyperloopConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, past):
        a, present = self.attn(self.norm1(x), cos, sin, mask, past)
        x = x + a
        return x + self.mlp(self.norm2(x)), present


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Doubly stochastic matrix from exp(logits - max), alternating row and column normalisation."""
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        m = m / m.sum(-1, keepdim=True)
        m = m / m.sum(-2, keepdim=True)
    return m


class DynamicHC(nn.Module):
    """mHC-style per-token mixing; per-loop parameters stacked [r, ...]. z = RMSNorm(flatten(Y)):
    H_pre = sigmoid(a_pre z W_pre + b_pre), H_post = 2 sigmoid(a_post z W_post + b_post),
    H_res = Sinkhorn(a_res z W_res + b_res)."""

    def __init__(self, cfg: HyperloopConfig):
        super().__init__()
        r, n, d = cfg.num_loops, cfg.n_streams, cfg.d_model
        self.n, self.eps, self.iters = n, cfg.norm_eps, cfg.sinkhorn_iters
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


class StaticLanes(nn.Module):
    """looped-lm-scaling lanes: H_pre = alpha[l], H_post = beta[l], H_res = M[l] (same for every token)."""

    def __init__(self, cfg: HyperloopConfig):
        super().__init__()
        r, n = cfg.num_loops, cfg.n_streams
        self.lane_alpha = nn.Parameter(torch.full((r, n), 1.0 / n))
        self.lane_mixing = nn.Parameter(torch.eye(n).repeat(r, 1, 1))
        self.lane_beta = nn.Parameter(torch.full((r, n), 1.0 / n))

    def coefficients(self, Y: torch.Tensor, l: int):
        return self.lane_alpha[l], self.lane_beta[l], self.lane_mixing[l]


class KVCache:
    """One (key, value) slot per effective layer: begin layers, then loop-major (loop, middle layer), then end.
    Keys/values are [B, n_kv_heads, P, head_dim]; slots of loops not run keep what they had."""

    def __init__(self, cfg: HyperloopConfig):
        self.cfg = cfg
        self.slots: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * cfg.effective_layers

    @property
    def length(self) -> int:
        s = self.slots[self.cfg.slot(0, 0)]  # loop 0 always runs
        return 0 if s is None else s[0].shape[2]


class Hyperloop(nn.Module):
    def __init__(self, cfg: HyperloopConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.embed_norm else None
        self.begin = nn.ModuleList(Block(cfg) for _ in range(cfg.n_begin))
        self.middle = nn.ModuleList(Block(cfg) for _ in range(cfg.n_middle))
        self.end = nn.ModuleList(Block(cfg) for _ in range(cfg.n_end))
        self.hc = {"dynamic": DynamicHC, "static": StaticLanes}[cfg.hc](cfg) if cfg.hc != "none" else None
        self.inject = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False) if cfg.injection == "inject" else None
        self.loop_embed = nn.Parameter(torch.zeros(cfg.num_loops, cfg.d_model)) if cfg.loop_embedding else None
        self.middle_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.middle_norm else None
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg, cfg.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None):
        """Normal(0, 0.02) linears and embeddings; output projections scaled by 1/sqrt(2 * effective depth)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        proj_std = 0.02 / math.sqrt(2 * self.cfg.effective_layers)
        for name, mod in self.named_modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                std = proj_std if name.endswith("c_proj") else 0.02
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std)
        if self.inject is not None:  # start as u = s + (small) e
            d = self.cfg.d_model
            self.inject.weight[:, d:] += torch.eye(d)

    def _run(self, blocks, x, first_slot, cos, sin, mask, cache):
        for j, block in enumerate(blocks):
            past = cache.slots[first_slot + j] if cache is not None else None
            x, present = block(x, cos, sin, mask, past)
            if cache is not None:
                cache.slots[first_slot + j] = present
        return x

    def forward(self, input_ids: torch.Tensor, num_loops: int | None = None, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, S] -> logits [B, S, V] (fp32). `cache` is extended in place.
        attention_mask [B, P+S] (1 = token, 0 = left padding); position_ids [B, S] default from it."""
        cfg = self.cfg
        r = cfg.num_loops if num_loops is None else int(num_loops)
        if not 1 <= r <= cfg.num_loops:
            raise ValueError(f"num_loops={r} must be in 1..{cfg.num_loops} (the trained loop count)")
        B, S = input_ids.shape
        P = cache.length if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, P:]
            else:
                position_ids = torch.arange(P, P + S, device=input_ids.device).expand(B, S)
        if not torch.compiler.is_exporting() and int(position_ids.max()) >= cfg.max_seq_len:  # data-dependent check
            raise ValueError(f"position {int(position_ids.max())} is beyond max_seq_len={cfg.max_seq_len}")
        cos, sin = self.rope_cos[position_ids].unsqueeze(1), self.rope_sin[position_ids].unsqueeze(1)
        mask = self._mask(attention_mask, B, S, P, input_ids.device)

        x = self.embed(input_ids).float()
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self._run(self.begin, x, 0, cos, sin, mask, cache)
        e = x
        if self.hc is None:  # one stream s with the injection of e
            s = torch.zeros_like(e) if cfg.injection == "additive" else e
            for l in range(r):
                if cfg.injection == "inject":
                    u = self.inject(torch.cat([e, s], dim=-1))
                else:
                    u = s + e if cfg.injection == "additive" else s
                if self.loop_embed is not None:
                    u = u + self.loop_embed[l]
                s = self._middle(u, l, cos, sin, mask, cache)
            x = s
        else:
            Y = e.unsqueeze(2).expand(B, S, cfg.n_streams, cfg.d_model)
            for l in range(r):
                h_pre, h_post, h_res = self.hc.coefficients(Y, l)
                u = (h_pre.unsqueeze(-1) * Y).sum(-2)
                if self.loop_embed is not None:
                    u = u + self.loop_embed[l]
                o = self._middle(u, l, cos, sin, mask, cache)
                Y = h_res @ Y + h_post.unsqueeze(-1) * o.unsqueeze(-2)
            x = Y.mean(-2) if cfg.collapse == "mean" else Y.sum(-2)
        x = self._run(self.end, x, cfg.n_begin + cfg.num_loops * cfg.n_middle, cos, sin, mask, cache)
        x = self.final_norm(x)
        logits = self.lm_head(x) if self.lm_head is not None else x @ self.embed.weight.t()
        if cfg.logit_softcap > 0:
            logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        return logits

    def _middle(self, u, l, cos, sin, mask, cache):
        o = self._run(self.middle, u, self.cfg.slot(l, 0), cos, sin, mask, cache)
        return self.middle_norm(o) if self.middle_norm is not None else o

    @staticmethod
    def _mask(attention_mask, B, S, P, device):
        """Boolean [B, 1, S, P+S] (True = attend): causal by index, padded keys masked, the diagonal always kept
        so a padding query never sees an empty row. Plain causal / no mask when there is no padding."""
        if attention_mask is None:
            return "causal" if P == 0 else ("none" if S == 1 else Hyperloop._mask(
                torch.ones(B, P + S, dtype=torch.long, device=device), B, S, P, device))
        q = torch.arange(P, P + S, device=device)[:, None]
        k = torch.arange(P + S, device=device)[None, :]
        allowed = (k <= q) & attention_mask.bool()[:, None, None, :]
        return allowed | (k == q)

    # ---- bookkeeping ------------------------------------------------------------------
    def num_parameters(self) -> dict[str, int]:
        """unique = stored parameters; effective = what a depth-matched unrolled model would store."""
        unique = sum(p.numel() for p in self.parameters())
        middle = sum(p.numel() for p in self.middle.parameters())
        return {"unique": unique, "effective": unique + (self.cfg.num_loops - 1) * middle}
