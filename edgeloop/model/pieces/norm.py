"""RMSNorm: y = x / sqrt(mean(x^2) + eps) [* weight], in PyTorch and as ONNX nodes."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last axis."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def emit_rms_norm(g, x, eps: float, weight=None):
    """rms_norm as ReduceMean / Sqrt / Div [* weight]."""
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
        return emit_rms_norm(g, x, self.eps, w.param(g, self, "weight"))
