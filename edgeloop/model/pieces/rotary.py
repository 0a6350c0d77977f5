"""Rotary position embeddings: the angle tables and each rotary flavour, in PyTorch and as ONNX nodes.

Tables: angle(pos, i) = pos * theta^(-2i/head_dim), i < head_dim/2; cos, sin [length, head_dim/2] in fp32
(optionally rounded to bf16, as looped-lm-scaling does). A flavour says which elements form a pair.
"""
from __future__ import annotations

import torch

from edgeloop.model.pieces import register


def rope_tables(cfg, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, head_dim/2] for angles pos * theta^(-2i/head_dim); optionally bf16-rounded."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    if cfg.rope_bf16:
        cos, sin = cos.bfloat16().float(), sin.bfloat16().float()
    return cos, sin


@register("rotary", "half")
class HalfSplit:
    """Pairs (i, i + hd/2), rotated by -angle (looped-lm-scaling):
    [x1, x2] -> [x1 cos + x2 sin, x2 cos - x1 sin];  x [B, H, T, hd], cos/sin [B, 1, T, hd/2]."""

    def __init__(self, cfg):
        pass

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)

    def emit(self, g, x, cos, sin):
        x1, x2 = g.Split(x, axis=-1, num_outputs=2, _outputs=2)
        return g.Concat(g.Add(g.Mul(x1, cos), g.Mul(x2, sin)), g.Sub(g.Mul(x2, cos), g.Mul(x1, sin)), axis=-1)
