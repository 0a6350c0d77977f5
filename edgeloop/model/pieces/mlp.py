"""MLP kinds (config field `mlp`), in PyTorch and as ONNX nodes. Every kind has c_fc (up) and c_proj (down);
the gated kinds add c_gate, which reads the same input as c_fc."""
from __future__ import annotations

import math

import numpy as np
import torch.nn as nn
import torch.nn.functional as F

from edgeloop.model.pieces import Linear, register


class _MLP(nn.Module):
    gated = False

    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        if self.gated:
            self.c_gate = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.c_proj = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def linears(self) -> list[Linear]:
        return [Linear("c_fc", "up")] + ([Linear("c_gate", "up")] if self.gated else []) + [Linear("c_proj", "down")]


@register("mlp", "swiglu")
class SwiGLU(_MLP):
    """c_proj(silu(c_gate x) * c_fc x)."""
    gated = True

    def forward(self, x):
        return self.c_proj(F.silu(self.c_gate(x)) * self.c_fc(x))

    def emit(self, g, w, x):
        if w.fused:  # gate and up as one MatMulNBits
            gate, h = w.linears(g, x, [self.c_gate, self.c_fc])
        else:
            h = w.linear(g, x, self.c_fc)
            gate = w.linear(g, x, self.c_gate)
        return w.linear(g, g.Mul(g.Mul(gate, g.Sigmoid(gate)), h), self.c_proj)


@register("mlp", "relu2")
class ReLU2(_MLP):
    """c_proj(relu(c_fc x)^2)."""

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())

    def emit(self, g, w, x):
        h = g.Relu(w.linear(g, x, self.c_fc))
        return w.linear(g, g.Mul(h, h), self.c_proj)


@register("mlp", "geglu")
class GeGLU(_MLP):
    """c_proj(gelu_tanh(c_gate x) * c_fc x), gelu_tanh(a) = a/2 (1 + tanh(sqrt(2/pi) (a + 0.044715 a^3)))."""
    gated = True

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_gate(x), approximate="tanh") * self.c_fc(x))

    def emit(self, g, w, x):
        a, up = w.linears(g, x, [self.c_gate, self.c_fc]) if w.fused else (w.linear(g, x, self.c_gate), None)
        inner = g.Mul(g.Add(a, g.Mul(g.const(0.044715, np.float32), g.Mul(a, g.Mul(a, a)))),
                      g.const(math.sqrt(2 / math.pi), np.float32))
        gelu = g.Mul(g.Mul(a, g.const(0.5, np.float32)), g.Add(g.const(1.0, np.float32), g.Tanh(inner)))
        return w.linear(g, g.Mul(gelu, up if up is not None else w.linear(g, x, self.c_fc)), self.c_proj)
