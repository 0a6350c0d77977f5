"""safetensors files written one tensor at a time (header first, from known shapes), shared by the quantize
stage and the importers: peak memory about one tensor."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

import torch

ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8"}
Header = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def write_safetensors(path: Path, header: Header, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Write a safetensors file whose tensors arrive one at a time (in any order) from `tensors`.
    Data is laid out by (wider dtype first, name), as safetensors.torch.save_file does."""
    order = sorted(header, key=lambda n: (-header[n][0].itemsize, n))
    offsets, pos = {}, 0
    for n in order:
        dt, shape = header[n]
        size = dt.itemsize
        for s in shape:
            size *= s
        offsets[n] = (pos, pos + size)
        pos += size
    meta = {"__metadata__": {"format": "pt"}}
    meta.update({n: {"dtype": ST_DTYPE[header[n][0]], "shape": list(header[n][1]), "data_offsets": list(offsets[n])}
                 for n in order})
    hb = json.dumps(meta, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    base = 8 + len(hb)
    written = set()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        f.truncate(base + pos)
        for name, t in tensors:
            dt, shape = header[name]
            if t.dtype != dt or tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"internal: tensor '{name}' is {t.dtype} {tuple(t.shape)}, header says {dt} {shape}")
            f.seek(base + offsets[name][0])
            if t.numel():
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())  # no extra copy
            written.add(name)
    if written != set(header):
        raise RuntimeError(f"internal: {len(set(header) - written)} tensors were not written")
