"""Rotary position embeddings: the angle tables and each rotary flavour, in PyTorch and as ONNX nodes.

Tables: angle(pos, i) = pos * inv_freq_i, inv_freq_i = theta^(-2i/head_dim) (optionally rescaled: rope_scaling),
i < head_dim/2; cos, sin [length, head_dim/2] in fp32 (optionally rounded to bf16, as looped-lm-scaling does).
A scaling only changes the tables, so every flavour and every graph (RotaryEmbedding, GroupQueryAttention's own
rotary) takes it as it is. A flavour says which elements form a pair.
"""
from __future__ import annotations

import math

import torch

from edgeloop.model.pieces import register


def scaled_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """inv_freq [hd/2] under `scaling` (config rope_scaling), in fp32 as transformers computes it.
    llama3 (transformers' _compute_llama3_parameters): wavelen = 2 pi / inv_freq, with L = original_max_position_
    embeddings, f = factor, lo / hi = low_freq_factor / high_freq_factor: inv_freq / f where wavelen > L / lo;
    unchanged where wavelen < L / hi; between, (1 - s) inv_freq / f + s inv_freq with s = (L / wavelen - lo) /
    (hi - lo)."""
    kind = scaling.get("rope_type", "none")
    if kind == "none":
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"rope_scaling rope_type {kind!r}: not implemented")
    f, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    out = torch.where(wavelen > old / lo, inv_freq / f, inv_freq)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * out / f + smooth * out
    medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
    return torch.where(medium, smoothed, out)


def rope_tables(cfg, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, head_dim/2] for angles pos * inv_freq (theta^(-2i/head_dim), scaled by the config's
    rope_scaling); optionally bf16-rounded."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    inv_freq = scaled_inv_freq(inv_freq, getattr(cfg, "rope_scaling", None) or {"rope_type": "none"})
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    if cfg.rope_bf16:
        cos, sin = cos.bfloat16().float(), sin.bfloat16().float()
    return cos, sin


class _Fused:
    """The fused graph's rotary: one com.microsoft.RotaryEmbedding, which rotates NeoX pairs (INTERLEAVED 0) or
    adjacent pairs (1) by +angle; a flavour that turns by -angle gets its sin table negated (SIN_SIGN -1)."""
    SIN_SIGN, INTERLEAVED = 1, 0

    def emit_fused(self, g, x, n: int, ctx):
        """x [B, S, n*hd] rotated at ctx["position_ids"] [B, S], over ctx["rope_cos"], ctx["rope_sin"]
        [max_seq_len, hd/2] (sin already times SIN_SIGN: graph.positions)."""
        return g.RotaryEmbedding(x, ctx["position_ids"], ctx["rope_cos"], ctx["rope_sin"], _domain="com.microsoft",
                                 interleaved=self.INTERLEAVED, num_heads=n)


@register("rotary", "half")
class HalfSplit(_Fused):
    """Pairs (i, i + hd/2), rotated by -angle (looped-lm-scaling):
    [x1, x2] -> [x1 cos + x2 sin, x2 cos - x1 sin];  x [B, H, T, hd], cos/sin [B, 1, T, hd/2]."""

    def __init__(self, cfg):
        pass

    SIN_SIGN = -1

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)

    def emit(self, g, x, cos, sin):
        x1, x2 = g.Split(x, axis=-1, num_outputs=2, _outputs=2)
        return g.Concat(g.Add(g.Mul(x1, cos), g.Mul(x2, sin)), g.Sub(g.Mul(x2, cos), g.Mul(x1, sin)), axis=-1)


@register("rotary", "interleaved")
class Interleaved(_Fused):
    """Pairs (2i, 2i + 1), rotated by +angle (Huginn; a complex multiply by e^{i angle}):
    y[2i] = x[2i] cos - x[2i+1] sin,  y[2i+1] = x[2i+1] cos + x[2i] sin."""

    INTERLEAVED = 1

    def __init__(self, cfg):
        pass

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        pairs = x.unflatten(-1, (-1, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)

    def emit(self, g, x, cos, sin):
        pairs = g.Reshape(x, g.const([0, 0, 0, -1, 2]))  # [B, H, S, hd/2, 2]
        a, b = (g.Squeeze(t, g.const([-1])) for t in g.Split(pairs, axis=-1, num_outputs=2, _outputs=2))
        y = g.Concat(g.Unsqueeze(g.Sub(g.Mul(a, cos), g.Mul(b, sin)), g.const([-1])),
                     g.Unsqueeze(g.Add(g.Mul(b, cos), g.Mul(a, sin)), g.const([-1])), axis=-1)
        return g.Reshape(y, g.const([0, 0, 0, -1]))


@register("rotary", "neox")
class NeoX(HalfSplit):
    """Pairs (i, i + hd/2), rotated by +angle (GPT-NeoX / Llama / Qwen / Ouro: x cos + rotate_half(x) sin,
    rotate_half(x) = [-x2, x1]):  [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]."""

    SIN_SIGN = 1

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def emit(self, g, x, cos, sin):
        x1, x2 = g.Split(x, axis=-1, num_outputs=2, _outputs=2)
        return g.Concat(g.Sub(g.Mul(x1, cos), g.Mul(x2, sin)), g.Add(g.Mul(x2, cos), g.Mul(x1, sin)), axis=-1)
