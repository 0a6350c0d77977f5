"""The exit gate (Ouro): a learned per-token decision after every loop, in PyTorch and as ONNX nodes.

    lambda_t = sigmoid(w . x_t + b)                    x_t: loop t's output (the head's input)
    p_t = lambda_t * prod_{j<t} (1 - lambda_j)  (t < T - 1);  p_{T-1} = the remainder
A token exits at the first loop whose cumulative p reaches the threshold q (q >= 1: never early), or, when
0 <= exit_at_step < T, at loop exit_at_step; at the last loop T - 1 in any case. Its logits come from the
loop it exits at (Ouro's exit_threshold / exit_at_step outputs). The running state of the decision:
    remaining  prod_{j<t} (1 - lambda_j)   [B, S]
    cum        sum_{j<=t} p_j              [B, S]
    exited     bool                        [B, S]
    step       the loop a token exited at  [B, S] int64
    out        x at that loop              [B, S, d]
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

BOOL, INT64 = 9, 7  # onnx TensorProto codes for Cast


class ExitGate(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """lambda [B, S]."""
        return torch.sigmoid(x @ self.weight.t() + self.bias).squeeze(-1)

    @staticmethod
    def start(x: torch.Tensor) -> dict:
        B, S = x.shape[:2]
        return {"remaining": x.new_ones(B, S), "cum": x.new_zeros(B, S), "exited": torch.zeros(B, S, dtype=torch.bool),
                "step": torch.zeros(B, S, dtype=torch.long), "out": torch.zeros_like(x)}

    def update(self, st: dict, x: torch.Tensor, l: int, last: bool, q: float, at: int | None) -> dict:
        lam = self(x)
        p = st["remaining"] if last else lam * st["remaining"]
        cum = st["cum"] + p
        if at is not None:
            hit = torch.full_like(st["exited"], l == at)
        else:
            hit = cum >= q if q < 1 else torch.zeros_like(st["exited"])
        hit = hit | last
        new = hit & ~st["exited"]
        return {"remaining": st["remaining"] * (1 - lam), "cum": cum, "exited": st["exited"] | hit,
                "step": torch.where(new, torch.full_like(st["step"], l), st["step"]),
                "out": torch.where(new[..., None], x, st["out"])}

    # ---- ONNX --------------------------------------------------------------------------------
    @staticmethod
    def emit_start(g, x) -> list:
        """The five carried values for a Loop, shaped after x [B, S, d]."""
        from onnx_ir import tensor

        B_S = g.Shape(x, start=0, end=2)
        zeros = g.ConstantOfShape(B_S, value=tensor(np.zeros(1, np.float32)))
        return [g.Add(zeros, g.const(1.0, np.float32)), zeros, g.Cast(zeros, to=BOOL),
                g.Cast(zeros, to=INT64), g.Mul(x, g.const(0.0, np.float32))]

    def emit_update(self, g, w, carried: list, x, it, num_loops, q, at) -> tuple[list, object]:
        """(the carried values after loop `it` of `num_loops`, whether some token has not exited yet).
        q: the float threshold, at: the int64 exit_at_step (out of 0..num_loops-1: none); x [B, S, d]."""
        remaining, cum, exited, step, out = carried
        last = g.Equal(it, g.Sub(num_loops, g.const(1)))
        logit = g.Add(g.MatMul(x, g.Transpose(w.param(g, self, "weight"), perm=[1, 0])), w.param(g, self, "bias"))
        lam = g.Sigmoid(g.Squeeze(logit, g.const([-1])))
        p = g.Where(last, remaining, g.Mul(lam, remaining))
        cum = g.Add(cum, p)
        by_threshold = g.And(g.Less(q, g.const(1.0, np.float32)), g.GreaterOrEqual(cum, q))
        use_at = g.And(g.GreaterOrEqual(at, g.const(0)), g.Less(at, num_loops))
        chosen = g.Or(g.And(use_at, g.Equal(it, at)), g.And(g.Not(use_at), by_threshold))  # (Where has no bool kernel)
        hit = g.Or(chosen, last)
        new = g.And(hit, g.Not(exited))
        exited = g.Or(exited, hit)
        step = g.Where(new, it, step)
        out = g.Where(g.Unsqueeze(new, g.const([-1])), x, out)
        remaining = g.Mul(remaining, g.Sub(g.const(1.0, np.float32), lam))
        more = g.Cast(g.ReduceMax(g.Cast(g.Not(exited), to=INT64), keepdims=0), to=BOOL)
        return [remaining, cum, exited, step, out], more
