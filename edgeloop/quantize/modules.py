"""Dequantize-on-the-fly modules (the PyTorch INT4 reference) and where they go in a Hyperloop model.

QuantLinear:    y = x @ dequantize(qweight, scales, qzeros)^T        (buffers named as in the file)
QuantEmbedding: y = dequantize(...)[ids]; `.weight` is the dequantized table (the tied lm_head uses it)
Quantized hc matrices (--quantize-hc) are stored packed in `model.int4_params` and their dequantized
values written into the parameters, since the hyper-connection code reads the parameters directly.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeloop.model.model import Tensor
from edgeloop.quantize.config import prefix
from edgeloop.quantize.packing import dequantize


class _Packed(nn.Module):
    """Holds qweight [N, n_blocks, G*bits/8], scales [N, n_blocks] and (asymmetric) qzeros (layout:
    edgeloop.quantize.packing)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
                 group_size: int, sym: bool, bits: int = 4):
        super().__init__()
        self.group_size, self.sym, self.bits = group_size, sym, bits
        self.out_features = qweight.shape[0]
        self.in_features = qweight.shape[1] * group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        if qzeros is not None:
            self.register_buffer("qzeros", qzeros)
        else:
            self.qzeros = None
        self._keep, self._cached = False, None

    def cache(self, on: bool) -> None:
        """Keep the dequantized weight between calls (used during calibration), or drop it."""
        self._keep, self._cached = on, None

    def dequantized(self) -> torch.Tensor:
        """The float32 weight [N, K] these codes stand for."""
        if self._cached is not None:
            return self._cached
        w = dequantize(self.qweight, self.scales, self.qzeros, self.group_size, self.sym, self.bits)
        if self._keep:
            self._cached = w
        return w

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits} "
                f"G={self.group_size}, {'sym' if self.sym else 'asym'}, scales {self.scales.dtype}")


class QuantLinear(_Packed):
    """A Linear whose weight is INT4 blocks, dequantized at every call; its bias (if any) stays float."""

    def __init__(self, qweight, scales, qzeros, group_size: int, sym: bool, bits: int = 4,
                 bias: torch.Tensor | None = None):
        super().__init__(qweight, scales, qzeros, group_size, sym, bits)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class QuantEmbedding(_Packed):
    """An embedding table [V, d] stored as INT4 or INT8 blocks along d."""

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.dequantized())


def linear_groups(table: dict[str, Tensor], names: set[str]) -> list[list[str]]:
    """The linears among the tensor names `names` as module names, in forward order (the model's table),
    grouped: linears that read the same input (q/k/v; up/gate) form one group, quantized together."""
    order = [n for n in table if n in names and table[n].role in ("linear", "lm_head")]
    return [[prefix(n) for n in grp] for _, grp in itertools.groupby(order, key=lambda n: table[n].group or n)]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
