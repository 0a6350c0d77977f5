"""A thin graph builder over onnx-ir: `g.MatMul(x, w)` appends a node and returns its output value.

Values get unique names across the main graph and every subgraph (ONNX needs SSA names across
scopes), small constants are cached initializers of the main graph (bodies read them from the
outer scope), and `g.sub()` opens a builder for a subgraph such as a Loop body.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir

FLOAT = ir.DataType.FLOAT
FLOAT16 = ir.DataType.FLOAT16
INT64 = ir.DataType.INT64
INT32 = ir.DataType.INT32
BOOL = ir.DataType.BOOL
MS_DOMAIN = "com.microsoft"


class GraphBuilder:
    def __init__(self, prefix: str = "", parent: "GraphBuilder | None" = None):
        self.root = parent.root if parent is not None else self
        self.prefix = prefix
        self.nodes: list[ir.Node] = []
        self.memo: dict = {}  # values made once in this (sub)graph and shared by later nodes
        if parent is None:
            self.initializers: dict[str, ir.Value] = {}
            self._consts: dict[tuple, ir.Value] = {}
            self._ids = itertools.count()
            self.opsets: dict[str, int] = {"": 21}

    # ---- values -----------------------------------------------------------------------
    def fresh(self, hint: str = "v") -> str:
        return f"{self.prefix}{hint}_{next(self.root._ids)}"

    def initializer(self, name: str, array: np.ndarray | ir.TensorProtocol) -> ir.Value:
        """A named initializer of the main graph (weights are stored once, read from every scope)."""
        root = self.root
        if name in root.initializers:
            raise ValueError(f"initializer {name!r} defined twice")
        tensor = array if isinstance(array, ir.TensorProtocol) else ir.tensor(np.array(array, order="C", copy=True), name=name)
        tensor.name = name
        v = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        root.initializers[name] = v
        return v

    def const(self, value: Any, dtype=np.int64) -> ir.Value:
        """A small constant (cached): shapes, axes, scalars."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        root = self.root
        if key not in root._consts:
            root._consts[key] = self.initializer(f"const_{len(root._consts)}", arr)
        return root._consts[key]

    # ---- nodes ------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: ir.Value | None, _domain: str = "", _outputs: int = 1,
           _name: str | None = None, _unused: tuple[int, ...] = (), **attrs) -> ir.Value | Sequence[ir.Value]:
        """One node; outputs at the `_unused` indices are left unnamed (optional outputs the kernel skips)."""
        if _domain:
            self.root.opsets.setdefault(_domain, 1)
        names = ["" if i in _unused else self.fresh(op_type.lower()) for i in range(_outputs)]
        node = ir.Node(_domain, op_type, list(inputs), attributes=_attrs(attrs),
                       outputs=[ir.Value(name=n) for n in names], name=self.fresh(op_type))
        self.nodes.append(node)
        return node.outputs[0] if _outputs == 1 else node.outputs

    def __getattr__(self, op_type: str):
        if not op_type[:1].isupper():
            raise AttributeError(op_type)
        return lambda *inputs, **kw: self.op(op_type, *inputs, **kw)

    def sub(self, prefix: str) -> "GraphBuilder":
        return GraphBuilder(prefix=prefix, parent=self)

    def graph(self, inputs: Sequence[ir.Value], outputs: Sequence[ir.Value], name: str) -> ir.Graph:
        inits = list(self.initializers.values()) if self is self.root else []
        return ir.Graph(inputs, outputs, nodes=self.nodes, initializers=inits, name=name,
                        opset_imports=dict(self.root.opsets) if self is self.root else {})


def _attrs(attrs: dict) -> list[ir.Attr]:
    out = []
    for k, v in attrs.items():
        if isinstance(v, ir.Graph):
            out.append(ir.AttrGraph(k, v))
        else:
            out.append(ir.convenience.convert_attribute(k, v))
    return out


def typed(v: ir.Value, dtype: ir.DataType, shape: Sequence[int | str | None], name: str | None = None) -> ir.Value:
    """Give a value a type, a shape and optionally a public name (graph inputs/outputs need all three)."""
    v.type = ir.TensorType(dtype)
    v.shape = ir.Shape(list(shape))
    if name is not None:
        v.name = name
    return v


def graph_input(name: str, dtype: ir.DataType, shape: Sequence[int | str | None]) -> ir.Value:
    return typed(ir.Value(name=name), dtype, shape)
