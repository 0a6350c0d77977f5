"""Checkpoint tensors -> ONNX initializers, each stored ONCE however often the graph reads it.

Linear y = x W^T by format:
  fp32 / fp16   MatMul(x, W^T)                 (fp16: stored half, Cast to float at use)
  matmulnbits   com.microsoft.MatMulNBits(x, qweight [N, K/G, G*bits/8], scales [N*K/G], zero_points)
  qdq           MatMul(x, DequantizeLinear(q [K, N] (u)int4 / (u)int8, scale [K/G, N], zp, axis=0, block_size=G))
A quantized tied embedding (INT8 by default, or INT4) is ONE initializer read by both
com.microsoft.GatherBlockQuantized (the lookup, blocks along the last axis) and MatMulNBits (the lm_head).
The quantized checkpoint layout (edgeloop.quantize) is MatMulNBits' own, so matmulnbits is a reshape.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from edgeloop.export.builder import FLOAT, MS_DOMAIN, GraphBuilder
from edgeloop.model.checkpoint import CheckpointError, open_safetensors, read_tensor
from edgeloop.quantize.config import tensor_bits

FORMATS = ("fp32", "fp16", "matmulnbits", "qdq")


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., m] -> uint8 [..., 2m]: low nibble first."""
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 0x0F, packed >> 4
    return out


def _codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Stored codes -> one code per byte (4-bit codes are two per byte, low nibble first)."""
    return unpack_nibbles(packed) if bits == 4 else packed


def dequantize_linear(r: GraphBuilder, name: str, q: np.ndarray, scales: np.ndarray, zp: np.ndarray | None,
                      axis: int, block_size: int, bits: int) -> ir.Value:
    """Standard blocked DequantizeLinear (opset 21) of codes q in 0..2^bits-1: unsigned codes with zero
    points zp, or, symmetric (zp None), signed codes q - 2^(bits-1) with zero point 0."""
    signed, unsigned = (ir.DataType.INT4, ir.DataType.UINT4) if bits == 4 else (ir.DataType.INT8, ir.DataType.UINT8)
    scale = r.initializer(f"{name}.scales", np.ascontiguousarray(scales))
    if zp is None:
        data = (q.astype(np.int16) - (1 << (bits - 1))).astype(np.int8)
        return r.DequantizeLinear(r.initializer(name, ir.tensor(np.ascontiguousarray(data), dtype=signed)), scale,
                                  axis=axis, block_size=block_size)
    data = r.initializer(name, ir.tensor(np.ascontiguousarray(q), dtype=unsigned))
    zero = r.initializer(f"{name}.zeros", ir.tensor(np.ascontiguousarray(zp), dtype=unsigned))
    return r.DequantizeLinear(data, scale, zero, axis=axis, block_size=block_size)


class Weights:
    """Reads a (float or quantized) checkpoint folder lazily and emits initializers in `fmt`."""

    def __init__(self, folder: str | Path, fmt: str, accuracy_level: int = 0):
        if fmt not in FORMATS:
            raise ValueError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"--accuracy-level {accuracy_level}: use 0 (fp32) or 4 (int8 activations)")
        self.folder = Path(folder)
        raw = json.loads((self.folder / "config.json").read_text())
        self.q = raw.get("quantization_config")
        self.vocab_size, self.d_model = raw["vocab_size"], raw["d_model"]
        if fmt in ("matmulnbits", "qdq") and not self.q:
            raise ValueError(f"--format {fmt} needs a quantized checkpoint (run `edgeloop quantize` first) "
                             f"or use --format fp32 / fp16")
        if fmt in ("fp32", "fp16") and self.q:
            raise ValueError(f"{self.folder} is quantized; export it with --format matmulnbits or qdq")
        if self.q and self.q.get("bits", 4) != 4:
            raise ValueError(f"quantization_config bits={self.q.get('bits')}: only 4-bit exports")
        self.fmt, self.accuracy_level = fmt, accuracy_level
        self._st = open_safetensors(self.folder / "model.safetensors")
        self._f = self._st.__enter__()
        self.keys = set(self._f.keys())
        self._cache: dict[str, ir.Value] = {}

    def close(self):
        self._st.__exit__(None, None, None)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.keys:
            raise CheckpointError(f"{self.folder / 'model.safetensors'}: tensor '{name}' is missing")
        return read_tensor(self._f, name, self.folder / "model.safetensors")

    def _once(self, g: GraphBuilder, name: str, make) -> ir.Value:
        if name not in self._cache:
            self._cache[name] = make()
        return self._cache[name]

    def _float(self, g: GraphBuilder, name: str, array: np.ndarray, half: bool) -> ir.Value:
        """A float initializer; stored fp16 and Cast to float where `half` (the Cast is per use, cheap)."""
        v = self._once(g, name, lambda: g.initializer(name, array.astype(np.float16 if half else np.float32)))
        return g.Cast(v, to=FLOAT) if half else v

    def param(self, g: GraphBuilder, name: str) -> ir.Value:
        """Norms and hyper-connection parameters: kept in the checkpoint's dtype (fp16 -> Cast to float)."""
        t = self.kept(name)
        return self._float(g, name, t.float().numpy(), t.dtype == torch.float16)

    def kept(self, name: str) -> torch.Tensor:
        """A tensor the quantizer must have kept in float (norms, hyper-connection parameters)."""
        if name not in self.keys and f"{name.removesuffix('.weight')}.qweight" in self.keys:
            raise ValueError(f"tensor '{name}' was quantized (--quantize-hc is a measurement setting); "
                             f"export a checkpoint quantized without it")
        return self.tensor(name)

    def hc_projection(self, g: GraphBuilder) -> tuple[ir.Value, ir.Value, ir.Value]:
        """The dynamic hyper-connection projections of every loop as ONE MatMul: W = [W_pre | W_post | W_res]
        [r, n*d, 2n + n^2], its per-column scale a = [a_pre.. | a_post.. | a_res..] and bias
        b = [b_pre | b_post | b_res] [r, 2n + n^2] (concatenations only: the values and dtype stay exact)."""
        t = {f"{x}_{k}": self.kept(f"hc.{x}_{k}") for x in "wab" for k in ("pre", "post", "res")}
        half = t["w_pre"].dtype == torch.float16
        W = torch.cat([t[f"w_{k}"] for k in ("pre", "post", "res")], -1)
        widths = [t[f"w_{k}"].shape[-1] for k in ("pre", "post", "res")]
        a = torch.cat([t[f"a_{k}"][:, None].expand(-1, n) for k, n in zip(("pre", "post", "res"), widths)], -1)
        b = torch.cat([t["b_pre"], t["b_post"], t["b_res"].flatten(1)], -1)
        return tuple(self._float(g, f"hc.projection{suffix}", v.float().numpy(), half)
                     for suffix, v in (("", W), ("_scale", a), ("_bias", b)))

    def is_quantized(self, module: str) -> bool:
        return f"{module}.qweight" in self.keys

    def linear(self, g: GraphBuilder, x: ir.Value, module: str) -> ir.Value:
        """y = x W^T for the Linear `module` (e.g. 'middle.0.attn.c_q')."""
        if self.is_quantized(module):
            return self._linear_q(g, x, module)
        w = self.tensor(f"{module}.weight")
        half = self.fmt == "fp16" or w.dtype == torch.float16 and self.fmt != "fp32"
        return g.MatMul(x, self._float(g, f"{module}.weight_t", w.float().t().contiguous().numpy(), half))

    def bits(self, module: str) -> int:
        """Code width of a quantized module (the quantize stage's rule: the embedding at embedding_bits)."""
        return tensor_bits(f"{module}.weight", (self.q or {}).get("embedding_bits"))

    def _qparts(self, module: str):
        """(qweight [N, nb, G*bits/8], scales [N, nb], qzeros or None, bits, G) of a quantized module."""
        qw = self.tensor(f"{module}.qweight").numpy()
        scales = self.tensor(f"{module}.scales").float().numpy()
        qz = self.tensor(f"{module}.qzeros").numpy() if f"{module}.qzeros" in self.keys else None
        bits = self.bits(module)
        return qw, scales, qz, bits, qw.shape[-1] * 8 // bits

    def _linear_q(self, g: GraphBuilder, x: ir.Value, module: str) -> ir.Value:
        qw, scales, qz, bits, G = self._qparts(module)
        N, nb, _ = qw.shape
        K = nb * G
        if self.fmt == "matmulnbits":
            b = self._once(g, f"{module}.qweight", lambda: g.initializer(f"{module}.qweight", qw))
            s = self._once(g, f"{module}.scales", lambda: g.initializer(f"{module}.scales", scales.reshape(-1)))
            ins = [x, b, s]
            if qz is not None:
                ins.append(self._once(g, f"{module}.qzeros", lambda: g.initializer(f"{module}.qzeros", qz.reshape(-1))))
            return g.MatMulNBits(*ins, _domain=MS_DOMAIN, K=K, N=N, bits=bits, block_size=G,
                                 accuracy_level=self.accuracy_level)
        return g.MatMul(x, self._dq(g, module, qw, scales, qz, bits, G))

    def _dq(self, g: GraphBuilder, module: str, qw, scales, qz, bits: int, G: int) -> ir.Value:
        """W^T [K, N] for the qdq format, one node per weight in the main graph (a Loop body reads its output
        from the outer scope)."""
        N, nb, _ = qw.shape
        return self._once(g, f"{module}#dq", lambda: dequantize_linear(
            g.root, f"{module}.q_t", _codes(qw, bits).reshape(N, nb * G).T, scales.T,
            None if qz is None else _codes(qz, bits)[:, :nb].T, axis=0, block_size=G, bits=bits))

    # ---- embedding and head --------------------------------------------------------------
    def embedding(self, g: GraphBuilder, ids: ir.Value) -> ir.Value:
        """x = E[ids]. A quantized E in matmulnbits: GatherBlockQuantized on the codes [V, nb, G*bits/8] (the
        bytes the lm_head's MatMulNBits reads too); otherwise Gather on the float (or dequantized) table."""
        if self.is_quantized("embed") and self.fmt == "matmulnbits":
            qw, scales, qz, bits, G = self._qparts("embed")
            V, nb, _ = qw.shape
            data = self._once(g, "embed.qweight", lambda: g.initializer("embed.qweight", qw))
            s = self._once(g, "embed.scales_3d", lambda: g.initializer("embed.scales_3d", scales[..., None]))
            ins = [data, ids, s]
            if qz is not None:  # one zero point per block, [V, nb, 1] (a 4-bit one in the low nibble)
                zp = _codes(qz, bits)[:, :nb, None].copy()
                ins.append(self._once(g, "embed.qzeros_3d", lambda: g.initializer("embed.qzeros_3d", zp)))
            rows = g.GatherBlockQuantized(*ins, _domain=MS_DOMAIN, gather_axis=0, quantize_axis=2,
                                          block_size=G, bits=bits)  # [B, S, nb, G]
            return g.Reshape(rows, g.const([0, 0, nb * G]))
        return g.Gather(self._table(g), ids, axis=0)

    def _table(self, g: GraphBuilder) -> ir.Value:
        """The embedding table [V, d] in float: stored (fp32, or fp16 + Cast), or, quantized in the qdq
        format, one standard DequantizeLinear of its codes along d (read by the lookup and the tied head)."""
        if not self.is_quantized("embed"):
            w = self.tensor("embed.weight")
            half = self.fmt == "fp16" or (w.dtype == torch.float16 and self.fmt != "fp32")
            return self._float(g, "embed.weight", w.float().numpy(), half)
        qw, scales, qz, bits, G = self._qparts("embed")
        V, nb, _ = qw.shape
        return self._once(g, "embed#dq", lambda: dequantize_linear(
            g.root, "embed.q", _codes(qw, bits).reshape(V, nb * G), scales,
            None if qz is None else _codes(qz, bits)[:, :nb], axis=1, block_size=G, bits=bits))

    def lm_head(self, g: GraphBuilder, x: ir.Value) -> ir.Value:
        """logits = x E^T (tied) or x W_head^T. A tied quantized E is MatMulNBits on the embedding's own
        codes; a float (or qdq-dequantized) table is read by Gemm(transB), so it is stored once either way."""
        if "lm_head.weight" in self.keys or self.is_quantized("lm_head"):
            return self.linear(g, x, "lm_head")
        if self.is_quantized("embed") and self.fmt == "matmulnbits":
            return self.linear(g, x, "embed")
        table, V, d = self._table(g), self.vocab_size, self.d_model
        lead = g.Shape(x, start=0, end=-1)
        y = g.Gemm(g.Reshape(x, g.const([-1, d])), table, transB=1)
        return g.Reshape(y, g.Concat(lead, g.const([V]), axis=0))

