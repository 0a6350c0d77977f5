"""Transformer block kinds (config field `block`), in PyTorch and as ONNX nodes.

Every block: forward(x, rope, mask, past) -> (x, present (k, v));
             emit(g, w, x, ctx, past, chain=False) -> (x, k, v) as Attention.emit returns them
             (chain: see emit_chain).
"""
from __future__ import annotations

from typing import NamedTuple

import torch.nn as nn

from edgeloop.model.pieces import build, register
from edgeloop.model.pieces.attention import Attention
from edgeloop.model.pieces.norm import RMSNorm


class Pending(NamedTuple):
    """A residual sum x + delta not yet formed: the fused graph hands it to the next block's first norm, one
    SkipSimplifiedLayerNormalization (onnxruntime-genai's chain) instead of an Add and a norm."""
    x: object
    delta: object


def settle(g, x):
    """x itself, or a Pending's sum."""
    return g.Add(x.x, x.delta) if isinstance(x, Pending) else x


def emit_chain(g, w, blocks, x, ctx, pasts) -> tuple:
    """Blocks one after another: (x, [(k, v) per block]); in the fused graph each residual sum is formed by
    the next block's norm."""
    presents = []
    for blk, past in zip(blocks, pasts):
        x, k, v = blk.emit(g, w, x, ctx, past, chain=True)
        presents.append((k, v))
    return settle(g, x), presents


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

    def emit(self, g, w, x, ctx, past, chain: bool = False):
        """chain (fused graph): x may be a Pending sum, and the last residual sum is returned Pending."""
        if isinstance(x, Pending):
            h, x = self.norm1.emit_skip(g, w, x.x, x.delta)
        else:
            h = self.norm1.emit(g, w, x)
        a, k, v = self.attn.emit(g, w, h, ctx, past)
        h, x = self.norm2.emit_skip(g, w, x, a)
        m = self.mlp.emit(g, w, h)
        return (Pending(x, m) if chain and w.fused else g.Add(x, m)), k, v


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

    def emit(self, g, w, x, ctx, past, chain: bool = False):
        x = settle(g, x)
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

    def emit(self, g, w, x, ctx, past, chain: bool = False):
        x = settle(g, x)
        a, k, v = self.attn.emit(g, w, self.norm1.emit(g, w, x), ctx, past)
        h, x = self.norm3.emit_skip(g, w, x, self.norm2.emit(g, w, a))
        return g.Add(x, self.norm4.emit(g, w, self.mlp.emit(g, w, h))), k, v


@register("block", "postnorm")
class PostNorm(nn.Module):
    """x = x + norm1(attn x);  x = x + norm2(mlp x)  (OLMo-2: each sub-layer reads the raw residual stream and
    its output is normalised before the sum). Norm names in Hugging Face terms: post_attention_layernorm,
    post_feedforward_layernorm."""

    def __init__(self, cfg):
        super().__init__()
        self.attn = Attention(cfg)  # registered in forward order (Hyperloop.tensors lists them so)
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = build("mlp", cfg.mlp, cfg)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, x, rope, mask, past):
        a, present = self.attn(x, rope, mask, past)
        x = x + self.norm1(a)
        return x + self.norm2(self.mlp(x)), present

    def emit(self, g, w, x, ctx, past, chain: bool = False):
        """No norm reads the residual stream itself, so nothing fuses into a skip-norm: plain sums."""
        x = settle(g, x)
        a, k, v = self.attn.emit(g, w, x, ctx, past)
        x = g.Add(x, self.norm1.emit(g, w, a))
        return g.Add(x, self.norm2.emit(g, w, self.mlp.emit(g, w, x))), k, v
