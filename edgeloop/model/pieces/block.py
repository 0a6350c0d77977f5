"""Transformer block kinds (config field `block`), in PyTorch and as ONNX nodes.

Every block: forward(x, rope, mask, past) -> (x, present (k, v));
             emit(g, w, x, ctx, past)     -> (x, k, v) as Attention.emit returns them.
"""
from __future__ import annotations

import torch.nn as nn

from edgeloop.model.pieces import build, register
from edgeloop.model.pieces.attention import Attention
from edgeloop.model.pieces.norm import RMSNorm


@register("block", "prenorm")
class PreNorm(nn.Module):
    """x = x + attn(norm1 x);  x = x + mlp(norm2 x)."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = build("mlp", cfg.mlp, cfg)

    def forward(self, x, rope, mask, past):
        a, present = self.attn(self.norm1(x), rope, mask, past)
        x = x + a
        return x + self.mlp(self.norm2(x)), present

    def emit(self, g, w, x, ctx, past):
        a, k, v = self.attn.emit(g, w, self.norm1.emit(g, w, x), ctx, past)
        h, x = self.norm2.emit_skip(g, w, x, a)
        return g.Add(x, self.mlp.emit(g, w, h)), k, v


@register("block", "sandwich")
class Sandwich(nn.Module):
    """x = norm2(x + attn(norm1 x));  x = norm4(x + mlp(norm3 x))  (Huginn's sandwich block: the residual
    stream itself is re-normalised after each sub-layer)."""

    def __init__(self, cfg):
        super().__init__()
        d, eps = cfg.d_model, cfg.norm_eps
        self.norm1, self.norm2, self.norm3, self.norm4 = (RMSNorm(d, eps) for _ in range(4))
        self.attn = Attention(cfg)
        self.mlp = build("mlp", cfg.mlp, cfg)

    def forward(self, x, rope, mask, past):
        a, present = self.attn(self.norm1(x), rope, mask, past)
        x = self.norm2(x + a)
        return self.norm4(x + self.mlp(self.norm3(x))), present

    def emit(self, g, w, x, ctx, past):
        a, k, v = self.attn.emit(g, w, self.norm1.emit(g, w, x), ctx, past)
        x = self.norm2.emit_skip(g, w, x, a)[0]
        return self.norm4.emit_skip(g, w, x, self.mlp.emit(g, w, self.norm3.emit(g, w, x)))[0], k, v


@register("block", "prepost")
class PrePost(Sandwich):
    """x = x + norm2(attn(norm1 x));  x = x + norm4(mlp(norm3 x))  (Ouro; Gemma 2's pre- and post-norms: the
    residual stream itself is never normalised). Norm names in Hugging Face terms: input_layernorm,
    input_layernorm_2, post_attention_layernorm, post_attention_layernorm_2."""

    def forward(self, x, rope, mask, past):
        a, present = self.attn(self.norm1(x), rope, mask, past)
        x = x + self.norm2(a)
        return x + self.norm4(self.mlp(self.norm3(x))), present

    def emit(self, g, w, x, ctx, past):
        a, k, v = self.attn.emit(g, w, self.norm1.emit(g, w, x), ctx, past)
        h, x = self.norm3.emit_skip(g, w, x, self.norm2.emit(g, w, a))
        return g.Add(x, self.norm4.emit(g, w, self.mlp.emit(g, w, h))), k, v
