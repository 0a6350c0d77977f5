"""What a checkpoint holds: architecture, unique vs effective parameters, bytes by dtype, and which
tensors are hyper-connection parameters (never INT4 by default)."""
from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

from edgeloop.model.checkpoint import CheckpointError, config_problems, expected_tensors, float_problems, read_header
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


def summarize(path: str | os.PathLike, problems: list[str] | None = None) -> dict:
    """A JSON-able summary of the checkpoint folder at `path` (reads headers, not tensor data), with every
    problem found under "problems": `problems` where the caller validated the folder (the CLI: the quantize
    stage's folder_problems, which knows both layouts), else this stage's config and float-header checks.
    An invalid config still gives the tensors and the raw config.json; the derived figures are then None."""
    path = Path(path)
    raw, cfg, found = config_problems(path)
    st = path / "model.safetensors"
    try:
        header = read_header(st)
    except CheckpointError as e:
        header, found = {}, found + [str(e)]
    if problems is None:
        quantized = "quantization_config" in raw
        problems = found + (float_problems(st, header, cfg) if cfg is not None and header and not quantized else [])
    table = meta_model(cfg).tensors() if cfg is not None else {}
    by_dtype, by_role, tensors = Counter(), Counter(), []
    for name, (dtype, shape) in header.items():
        n = 1
        for s in shape:
            n *= s
        nbytes = n * {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1, "I32": 4, "I64": 8}.get(dtype, 4)
        by_dtype[dtype] += nbytes
        role = tensor_role(name, table)
        by_role[role] += nbytes
        tensors.append({"name": name, "shape": list(shape), "dtype": dtype, "bytes": nbytes, "role": role})
    out = {"path": str(path), "config": cfg.to_dict() if cfg is not None else raw,
           "quantization_config": raw.get("quantization_config"), "problems": problems,
           "effective_layers": None, "unique_layers": None, "params_unique": None, "params_effective": None,
           "bytes_by_dtype": dict(by_dtype), "bytes_by_role": dict(by_role),
           "file_bytes": st.stat().st_size if st.is_file() else None,
           "hc_tensors": [t["name"] for t in tensors if t["role"] == "hc"], "tensors": tensors}
    if cfg is not None:
        numel = {k: math.prod(s) for k, s in expected_tensors(cfg).items()}
        unique = sum(numel.values())
        middle = sum(v for k, v in numel.items() if k.startswith("middle."))
        out.update(effective_layers=cfg.effective_layers, unique_layers=cfg.unique_layers, params_unique=unique,
                   params_effective=unique + (cfg.num_loops - 1) * middle)
    return out
