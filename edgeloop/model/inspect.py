"""What a checkpoint holds: architecture, unique vs effective parameters, bytes by dtype, and which
tensors are hyper-connection parameters (never INT4 by default)."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from edgeloop.model.checkpoint import load_config, open_safetensors, read_config

HC_PREFIXES = ("hc.", "loop_embed")


def tensor_role(name: str) -> str:
    """'hc' (hyper-connection parameter), 'norm', 'embedding', 'lm_head' or 'linear'."""
    if name.startswith(HC_PREFIXES):
        return "hc"
    if "norm" in name:
        return "norm"
    if name.startswith("embed."):
        return "embedding"
    if name.startswith("lm_head."):
        return "lm_head"
    return "linear"


def summarize(path: str | os.PathLike) -> dict:
    """A JSON-able summary of the checkpoint folder at `path` (reads headers, not tensor data)."""
    path = Path(path)
    raw = read_config(path)
    cfg = load_config(path)
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
            by_role[tensor_role(name)] += nbytes
            tensors.append({"name": name, "shape": shape, "dtype": dtype, "bytes": nbytes,
                            "role": tensor_role(name)})
    from edgeloop.model.checkpoint import expected_tensors

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
