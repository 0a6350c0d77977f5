"""What a checkpoint holds: architecture, unique vs effective parameters, bytes by dtype, and which
tensors are hyper-connection parameters (never INT4 by default)."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from edgeloop.model.checkpoint import expected_tensors, load_config, open_safetensors, read_config
from edgeloop.model.model import Tensor, meta_model

PACKED_PARTS = ("qweight", "scales", "qzeros")  # a quantized tensor's parts (edgeloop.quantize.packing)


def tensor_role(name: str, table: dict[str, Tensor]) -> str:
    """The role (linear, embedding, lm_head, hc, norm, bias) of a stored tensor or of a quantized one's part,
    from the model's table (Hyperloop.tensors()); 'unknown' for a name the model does not have."""
    if name in table:
        return table[name].role
    p, _, part = name.rpartition(".")
    if part in PACKED_PARTS:
        for base in (f"{p}.weight", p):
            if base in table:
                return table[base].role
    return "unknown"


def summarize(path: str | os.PathLike) -> dict:
    """A JSON-able summary of the checkpoint folder at `path` (reads headers, not tensor data)."""
    path = Path(path)
    raw = read_config(path)
    cfg = load_config(path)
    table = meta_model(cfg).tensors()
    by_dtype, by_role, tensors = Counter(), Counter(), []
    with open_safetensors(path / "model.safetensors") as f:
        for name in f.keys():
            sl = f.get_slice(name)
            shape, dtype = sl.get_shape(), sl.get_dtype()
            n = 1
            for s in shape:
                n *= s
            nbytes = n * {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1, "I32": 4, "I64": 8}.get(dtype, 4)
            by_dtype[dtype] += nbytes
            role = tensor_role(name, table)
            by_role[role] += nbytes
            tensors.append({"name": name, "shape": shape, "dtype": dtype, "bytes": nbytes, "role": role})
    shapes = expected_tensors(cfg)
    numel = {k: 1 for k in shapes}
    for k, s in shapes.items():
        for d in s:
            numel[k] *= d
    unique = sum(numel.values())
    middle = sum(v for k, v in numel.items() if k.startswith("middle."))
    return {"path": str(path), "config": cfg.to_dict(), "quantization_config": raw.get("quantization_config"),
            "effective_layers": cfg.effective_layers, "unique_layers": cfg.unique_layers,
            "params_unique": unique, "params_effective": unique + (cfg.num_loops - 1) * middle,
            "bytes_by_dtype": dict(by_dtype), "bytes_by_role": dict(by_role),
            "file_bytes": (path / "model.safetensors").stat().st_size,
            "hc_tensors": [t["name"] for t in tensors if t["role"] == "hc"], "tensors": tensors}
