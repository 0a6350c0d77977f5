"""Architecture pieces: each holds its PyTorch forward and its ONNX emission side by side.

    @register("mlp", "swiglu")
    class SwiGLU(nn.Module): forward(x) ... emit(g, w, x) ...
    build("mlp", cfg.mlp, cfg)            the piece a config string names (ConfigError names the field)

Emission contract: `emit(g, w, ...)` appends ONNX nodes through a GraphBuilder `g` (g.MatMul(a, b),
g.const(v)) and reads weights through `w` (edgeloop.export.weights.Weights) by the piece's own
modules: w.linear(g, x, self.c_q), w.param(g, self, "weight"). Pieces never import the export stage,
and the graph is emitted from a model built on the meta device (no weights allocated).

Quantizable linears: a piece lists them with `linears()` as [Linear(attr, group)] in forward order;
linears of one group read the same input (one GPTQ Hessian; one fused matrix where the graph fuses).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

KINDS = ("rotary", "mlp", "block", "hc", "injection")
REGISTRY: dict[str, dict[str, type]] = {k: {} for k in KINDS}
FIELD = {k: k for k in KINDS}  # the config field that names each kind


@dataclass(frozen=True)
class Linear:
    """A quantizable nn.Linear child `attr` of a piece; `group`: linears reading the same input."""
    attr: str
    group: str


def register(kind: str, name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in REGISTRY[kind]:
            raise ValueError(f"piece {kind}/{name} registered twice")
        REGISTRY[kind][name] = cls
        cls.kind_name = name
        return cls
    return deco


def names(kind: str) -> tuple[str, ...]:
    _load()
    return tuple(REGISTRY[kind])


def build(kind: str, name: str, *args, **kwargs):
    """The piece registered as `kind`/`name`, constructed with (*args, **kwargs)."""
    _load()
    if name not in REGISTRY[kind]:
        from edgeloop.model.config import ConfigError

        raise ConfigError(f"config field '{FIELD[kind]}' = {name!r}: must be one of {names(kind)}")
    return REGISTRY[kind][name](*args, **kwargs)


def _load() -> None:
    """Import the piece modules (they register themselves)."""
    from edgeloop.model.pieces import attention, block, exit, mlp, norm, rotary, streams  # noqa: F401
