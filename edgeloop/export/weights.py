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
from edgeloop.model.checkpoint import CheckpointError, check_finite, open_safetensors, read_tensor
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
    """Reads a (float or quantized) checkpoint folder lazily and emits initializers in `fmt`. Pieces ask for
    weights by their own modules (`bind(model)` maps each module of the meta model to its tensor names)."""

    def __init__(self, folder: str | Path, fmt: str, accuracy_level: int = 0, fused: bool = False,
                 gqa_rotary: bool = True):
        if fmt not in FORMATS:
            raise ValueError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"--accuracy-level {accuracy_level}: use 0 (fp32) or 4 (int8 activations)")
        self.folder = Path(folder)
        raw = json.loads((self.folder / "config.json").read_text())
        self.q = raw.get("quantization_config")
        if fmt in ("matmulnbits", "qdq") and not self.q:
            raise ValueError(f"--format {fmt} needs a quantized checkpoint (run `edgeloop quantize` first) "
                             f"or use --format fp32 / fp16")
        if fmt in ("fp32", "fp16") and self.q:
            raise ValueError(f"{self.folder} is quantized; export it with --format matmulnbits or qdq")
        if self.q and self.q.get("bits", 4) != 4:
            raise ValueError(f"quantization_config bits={self.q.get('bits')}: only 4-bit exports")
        self.fmt, self.accuracy_level = fmt, accuracy_level
        self.fused = fused and fmt == "matmulnbits"  # the fused graph: contrib ops for norms, attention, linears
        self.gqa_rotary = gqa_rotary  # fused: GroupQueryAttention may rotate q/k itself (Attention.rotary_in_gqa)
        self._st = open_safetensors(self.folder / "model.safetensors")
        self._f = self._st.__enter__()
        self.keys = set(self._f.keys())
        self._cache: dict[str, ir.Value] = {}
        self._names: dict[torch.nn.Module, str] = {}
        self._rows: dict[str, int] = {}  # per-loop tensors: the rows the export keeps (bind)

    def bind(self, model: torch.nn.Module) -> "Weights":
        """Name every module of `model` (built on the meta device from the folder's config)."""
        self._names = {m: n for n, m in model.named_modules()}
        shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
        self._rows = {n: shapes[n][0] for n, t in model.tensors().items() if t.role == "hc" and shapes[n]}
        self.vocab_size, self.d_model = model.cfg.vocab_size, model.cfg.d_model
        return self

    def name(self, module: torch.nn.Module, attr: str | None = None) -> str:
        """The stored name of `module` (or of its tensor `attr`): 'middle.0.attn.c_q', 'hc.w_pre'."""
        base = self._names[module]
        return base if attr is None else f"{base}.{attr}" if base else attr

    def close(self):
        self._st.__exit__(None, None, None)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.keys:
            raise CheckpointError(f"{self.folder / 'model.safetensors'}: tensor '{name}' is missing")
        t = read_tensor(self._f, name, self.folder / "model.safetensors")
        check_finite(name, t)
        rows = self._rows.get(name)
        if rows is not None and t.ndim and t.shape[0] > rows:  # per-loop rows past the export's max_loops
            t = t[:rows]
        return t

    def _once(self, g: GraphBuilder, name: str, make) -> ir.Value:
        if name not in self._cache:
            self._cache[name] = make()
        return self._cache[name]

    def float_constant(self, g: GraphBuilder, name: str, array: np.ndarray, half: bool) -> ir.Value:
        """A float initializer; stored fp16 and Cast to float where `half` (the Cast is per use, cheap)."""
        v = self._once(g, name, lambda: g.initializer(name, array.astype(np.float16 if half else np.float32)))
        return g.Cast(v, to=FLOAT) if half else v

    def param(self, g: GraphBuilder, owner: torch.nn.Module, attr: str) -> ir.Value:
        """A kept tensor `attr` of `owner` (norms, biases, hyper-connection parameters) in the checkpoint's
        dtype (fp16 -> Cast to float)."""
        name = self.name(owner, attr)
        t = self.kept(name)
        return self.float_constant(g, name, t.float().numpy(), t.dtype == torch.float16)

    def loop_row(self, g: GraphBuilder, owner: torch.nn.Module, attr: str, l: ir.Value) -> ir.Value:
        """Row l of a per-loop parameter stacked [r, ...] (l: an int64 scalar value)."""
        return g.Gather(self.param(g, owner, attr), l, axis=0)

    def kept(self, name: str) -> torch.Tensor:
        """A tensor the quantizer must have kept in float (norms, hyper-connection parameters)."""
        if name not in self.keys and f"{name.removesuffix('.weight')}.qweight" in self.keys:
            raise ValueError(f"tensor '{name}' was quantized (--quantize-hc is a measurement setting); "
                             f"export a checkpoint quantized without it")
        return self.tensor(name)

    def is_quantized(self, module: str) -> bool:
        return f"{module}.qweight" in self.keys

    def linear(self, g: GraphBuilder, x: ir.Value, linear: torch.nn.Module | str) -> ir.Value:
        """y = x W^T (+ b) for an nn.Linear of the bound model (or its stored name, e.g. 'lm_head')."""
        module = linear if isinstance(linear, str) else self.name(linear)
        if self.is_quantized(module):
            y = self._linear_q(g, x, module)
        else:
            w = self.tensor(f"{module}.weight")
            half = self.fmt == "fp16" or w.dtype == torch.float16 and self.fmt != "fp32"
            y = g.MatMul(x, self.float_constant(g, f"{module}.weight_t", w.float().t().contiguous().numpy(), half))
        return self._bias(g, y, module)

    def linears(self, g: GraphBuilder, x: ir.Value, mods: list, packed: bool = False) -> list[ir.Value]:
        """y_i = x W_i^T (+ b_i) for linears that read the same x. In the fused graph (MatMulNBits, one width and
        group size): ONE MatMulNBits over their rows stacked [N_1 + N_2 + ..., K] (rows are independent: the same
        codes, one kernel), then a Split; `packed`: no Split, [y_1 | y_2 | ...] as one tensor (biases, zeros
        where a linear has none, added as one vector). Where they cannot share a kernel: one y per linear."""
        names = [m if isinstance(m, str) else self.name(m) for m in mods]
        if not (self.fused and len(names) > 1 and all(self.is_quantized(n) for n in names)):
            return [self.linear(g, x, m) for m in mods]
        parts = [self._qparts(n) for n in names]
        if len({(p[3], p[4], p[0].shape[1], p[2] is None) for p in parts}) != 1:
            return [self.linear(g, x, m) for m in mods]
        _, nb, _ = parts[0][0].shape
        bits, G = parts[0][3], parts[0][4]
        stem = names[0].rsplit(".", 1)[0]
        key = f"{stem}.{'+'.join(n.rsplit('.', 1)[1] for n in names)}"
        widths = [p[0].shape[0] for p in parts]
        b = self._once(g, f"{key}.qweight", lambda: g.initializer(f"{key}.qweight", np.concatenate([p[0] for p in parts])))
        s = self._once(g, f"{key}.scales", lambda: g.initializer(
            f"{key}.scales", np.concatenate([p[1] for p in parts]).reshape(-1)))
        ins = [x, b, s]
        if parts[0][2] is not None:
            ins.append(self._once(g, f"{key}.qzeros", lambda: g.initializer(
                f"{key}.qzeros", np.concatenate([p[2] for p in parts]).reshape(-1))))
        y = g.MatMulNBits(*ins, _domain=MS_DOMAIN, K=nb * G, N=sum(widths), bits=bits, block_size=G,
                          accuracy_level=self.accuracy_level)
        if packed:
            if not any(f"{n}.bias" in self.keys for n in names):
                return [y]
            bias = np.concatenate([self.kept(f"{n}.bias").float().numpy() if f"{n}.bias" in self.keys
                                   else np.zeros(wd, np.float32) for n, wd in zip(names, widths)])
            return [g.Add(y, self._once(g, f"{key}.bias", lambda: g.initializer(f"{key}.bias", bias)))]
        ys = g.Split(y, g.const(widths), axis=-1, _outputs=len(widths))
        return [self._bias(g, yi, n) for yi, n in zip(ys, names)]

    def _bias(self, g: GraphBuilder, y: ir.Value, module: str) -> ir.Value:
        if f"{module}.bias" not in self.keys:
            return y
        t = self.kept(f"{module}.bias")
        return g.Add(y, self.float_constant(g, f"{module}.bias", t.float().numpy(), t.dtype == torch.float16))

    def bits(self, module: str) -> int:
        """Code width of a quantized module (the quantize stage's rule: the embedding at embedding_bits, an
        untied lm_head at lm_head_bits)."""
        q = self.q or {}
        return tensor_bits(f"{module}.weight", q.get("embedding_bits"), q.get("lm_head_bits"))

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
    def embedding(self, g: GraphBuilder, ids: ir.Value, embed: torch.nn.Module) -> ir.Value:
        """x = E[ids]. A quantized E in matmulnbits: GatherBlockQuantized on the codes [V, nb, G*bits/8] (the
        bytes the lm_head's MatMulNBits reads too); otherwise Gather on the float (or dequantized) table."""
        e = self.name(embed)
        if self.is_quantized(e) and self.fmt == "matmulnbits":
            qw, scales, qz, bits, G = self._qparts(e)
            V, nb, _ = qw.shape
            data = self._once(g, f"{e}.qweight", lambda: g.initializer(f"{e}.qweight", qw))
            s = self._once(g, f"{e}.scales_3d", lambda: g.initializer(f"{e}.scales_3d", scales[..., None]))
            ins = [data, ids, s]
            if qz is not None:  # one zero point per block, [V, nb, 1] (a 4-bit one in the low nibble)
                zp = _codes(qz, bits)[:, :nb, None].copy()
                ins.append(self._once(g, f"{e}.qzeros_3d", lambda: g.initializer(f"{e}.qzeros_3d", zp)))
            rows = g.GatherBlockQuantized(*ins, _domain=MS_DOMAIN, gather_axis=0, quantize_axis=2,
                                          block_size=G, bits=bits)  # [B, S, nb, G]
            return g.Reshape(rows, g.const([0, 0, nb * G]))
        return g.Gather(self._table(g, e), ids, axis=0)

    def _table(self, g: GraphBuilder, e: str) -> ir.Value:
        """The embedding table [V, d] in float: stored (fp32, or fp16 + Cast), or, quantized in the qdq
        format, one standard DequantizeLinear of its codes along d (read by the lookup and the tied head)."""
        if not self.is_quantized(e):
            w = self.tensor(f"{e}.weight")
            half = self.fmt == "fp16" or (w.dtype == torch.float16 and self.fmt != "fp32")
            return self.float_constant(g, f"{e}.weight", w.float().numpy(), half)
        qw, scales, qz, bits, G = self._qparts(e)
        V, nb, _ = qw.shape
        return self._once(g, f"{e}#dq", lambda: dequantize_linear(
            g.root, f"{e}.q", _codes(qw, bits).reshape(V, nb * G), scales,
            None if qz is None else _codes(qz, bits)[:, :nb], axis=1, block_size=G, bits=bits))

    def lm_head(self, g: GraphBuilder, x: ir.Value, head: torch.nn.Module | None, embed: torch.nn.Module) -> ir.Value:
        """logits = x E^T (tied) or x W_head^T. A tied quantized E is MatMulNBits on the embedding's own
        codes; a float (or qdq-dequantized) table is read by Gemm(transB), so it is stored once either way."""
        if head is not None:
            return self.linear(g, x, head)
        e = self.name(embed)
        if self.is_quantized(e) and self.fmt == "matmulnbits":
            return self.linear(g, x, e)
        table, V, d = self._table(g, e), self.vocab_size, self.d_model
        lead = g.Shape(x, start=0, end=-1)
        y = g.Gemm(g.Reshape(x, g.const([-1, d])), table, transB=1)
        return g.Reshape(y, g.Concat(lead, g.const([V]), axis=0))

