"""INT4 group quantization math and the packed layout ("int4-blocked-kpacked").

Layout, for a weight W [N, K] (N = out features, K = in features; an embedding [V, d] is N = V, K = d),
with G consecutive K elements per block and n_blocks = K // G (K % G != 0 is refused):
    qweight  uint8 [N, n_blocks, G/2]      byte b holds element 2b in its LOW nibble, 2b+1 in its HIGH nibble
    scales   [N, n_blocks]                 float16 or float32
    qzeros   uint8 [N, ceil(n_blocks/2)]   asymmetric only; block 2i low nibble, block 2i+1 high nibble
             (an odd last byte has a zero high nibble)
    asymmetric: q in [0, 15], w ~= (q - zp) * scale
    symmetric:  q in [0, 15], w ~= (q - 8) * scale  (implicit zero point 8, no qzeros)
This is onnxruntime com.microsoft.MatMulNBits' B / scales / zero_points up to a reshape. Leading batch
axes (the per-loop hc matrices: [r, N, ...]) are allowed everywhere.

8 bits (the tied embedding, `embedding_bits=8`): one code per byte, qweight uint8 [N, n_blocks, G],
qzeros uint8 [N, n_blocks], q in [0, 255], symmetric zero point 128 (MatMulNBits bits=8 and
GatherBlockQuantized bits=8 read the same bytes).

Scales (fp32 math, then rounded UP to scale_dtype so the grid still spans the group; maxq = 2^bits - 1):
    asymmetric: lo = min(w, 0), hi = max(w, 0), scale = (hi - lo) / maxq, zp = clamp(round(-lo / scale), 0, maxq)
    symmetric:  scale = 2 max|w| / maxq (grid [-2^(bits-1), 2^(bits-1) - 1] * scale)
Both give |w - w_hat| <= scale / 2 for round to nearest.
"""
from __future__ import annotations

import torch

SCALE_TORCH = {"float16": torch.float16, "float32": torch.float32}


def pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., 2M] in 0..15 -> uint8 [..., M]; element 2b low nibble, 2b+1 high nibble."""
    if codes.shape[-1] % 2:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], 1)], -1)
    c = codes.to(torch.uint8)
    return (c[..., 0::2] & 0xF) | ((c[..., 1::2] & 0xF) << 4)


def unpack(packed: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """uint8 [..., M] -> uint8 codes [..., 2M] (or the first n of them)."""
    p = packed.to(torch.uint8)
    out = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])
    return out if n is None else out[..., :n]


def _round_up(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """scale in `dtype`, never below the fp32 value (so the 16 grid points still cover the group)."""
    s = scale.to(dtype)
    low = s.float() < scale
    if low.any():
        s = torch.where(low, torch.nextafter(s, torch.full_like(s, float("inf"))), s)
    return s


def maxq(bits: int) -> int:
    return (1 << bits) - 1


def group_params(w: torch.Tensor, sym: bool, scale_dtype: str, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., G] (one group per row) -> scale [...] in scale_dtype, zero point [...] (float, 0..maxq)."""
    w, top = w.float(), maxq(bits)
    if sym:
        amax = w.abs().amax(-1)
        scale = _round_up(2 * amax / top, SCALE_TORCH[scale_dtype])
        zero = torch.full_like(amax, float(1 << (bits - 1)))
    else:
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scale = _round_up((hi - lo) / top, SCALE_TORCH[scale_dtype])
        sf = scale.float()
        zero = torch.where(sf > 0, torch.round(-lo / torch.where(sf > 0, sf, 1)), torch.zeros_like(sf))
        zero = zero.clamp(0, top)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Round to nearest on the grid: q = clamp(round(w / scale) + zp, 0, maxq) (uint8; scale 0 -> q = zp)."""
    sf = scale.float()
    safe = torch.where(sf > 0, sf, torch.ones_like(sf))
    q = torch.round(w.float() / safe) + zero
    return q.clamp(0, maxq(bits)).to(torch.uint8)


def split_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[..., N, K] -> [..., N, K/G, G]."""
    *lead, n, k = w.shape
    return w.reshape(*lead, n, k // group_size, group_size)


def rtn(w: torch.Tensor, group_size: int, sym: bool, scale_dtype: str, bits: int = 4
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest INT4 (or INT8) of w [..., N, K] -> (qweight, scales, qzeros | None), packed layout."""
    g = split_groups(w.float(), group_size)
    scale, zero = group_params(g, sym, scale_dtype, bits)
    codes = quantize_codes(g, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)
    return encode(codes, scale, zero, sym, bits)


def encode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, sym: bool, bits: int = 4
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """codes uint8 [..., N, n_blocks, G], scale/zero [..., N, n_blocks] -> packed tensors (contiguous)."""
    store = pack if bits == 4 else (lambda c: c.to(torch.uint8))
    qweight = store(codes).contiguous()
    qzeros = None if sym else store(zero.to(torch.uint8)).contiguous()
    return qweight, scale.contiguous(), qzeros


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, group_size: int,
               sym: bool, bits: int = 4) -> torch.Tensor:
    """Packed codes -> float32 [..., N, K]: w = (q - zp) * scale, zp = 2^(bits-1) when symmetric."""
    *lead, n, nb, width = qweight.shape
    per_byte = 8 // bits
    if per_byte * width != group_size:
        raise ValueError(f"qweight has blocks of {per_byte * width} elements at {bits} bits, group_size says "
                         f"{group_size}")
    codes = (unpack(qweight) if bits == 4 else qweight).float()  # [..., N, nb, G]
    if sym or qzeros is None:
        zp = torch.full((), float(1 << (bits - 1)))
    else:
        zp = (unpack(qzeros, nb) if bits == 4 else qzeros).float().unsqueeze(-1)
    w = (codes - zp) * scales.float().unsqueeze(-1)
    return w.reshape(*lead, n, nb * group_size)


def packed_shapes(shape: tuple[int, ...], group_size: int, sym: bool, bits: int = 4
                  ) -> dict[str, tuple[int, ...]]:
    """Shapes of qweight / scales / (qzeros) for a weight of `shape` [..., N, K]."""
    *lead, n, k = shape
    nb = k // group_size
    out = {"qweight": (*lead, n, nb, group_size * bits // 8), "scales": (*lead, n, nb)}
    if not sym:
        out["qzeros"] = (*lead, n, (nb + 1) // 2 if bits == 4 else nb)
    return out
