"""RMSNorm: y = x / sqrt(mean(x^2) + eps) [* weight], in PyTorch and as ONNX nodes."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last axis."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def emit_rms_norm(g, x, eps: float, weight=None, fused: bool = False, dim: int | None = None):
    """rms_norm as ReduceMean / Sqrt / Div [* weight]; fused: one SimplifiedLayerNormalization (onnxruntime's
    RMSNorm kernel; `dim` sizes its unit weight when there is none)."""
    if fused:
        w = weight if weight is not None else g.const(np.ones(dim, np.float32), np.float32)
        return g.SimplifiedLayerNormalization(x, w, axis=-1, epsilon=float(eps), stash_type=1)
    ms = g.ReduceMean(g.Mul(x, x), g.const([-1]), keepdims=1)
    y = g.Div(x, g.Sqrt(g.Add(ms, g.const(eps, np.float32))))
    return y if weight is None else g.Mul(y, weight)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.eps) * self.weight

    def emit(self, g, w, x):
        return emit_rms_norm(g, x, self.eps, w.param(g, self, "weight"), fused=getattr(w, "fused", False))

    def emit_skip(self, g, w, x, delta):
        """(norm(x + delta), x + delta); fused: one SkipSimplifiedLayerNormalization (outputs 0 and 3; the
        mean and inverse deviation, outputs 1 and 2, are not asked for: the kernel then does not write them)."""
        if not getattr(w, "fused", False):
            s = g.Add(x, delta)
            return self.emit(g, w, s), s
        out = g.SkipSimplifiedLayerNormalization(delta, x, w.param(g, self, "weight"), _domain="com.microsoft",
                                                 _outputs=4, _unused=(1, 2), epsilon=float(self.eps))
        return out[0], out[3]
