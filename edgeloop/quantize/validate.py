"""One validation of a checkpoint folder, float or quantized, for every command that reads one (inspect,
quantize, export, run, eval's reference, generate): config.json (every required field, every value in range),
then each tensor's name, shape and dtype from the safetensors header, before anything the config sizes is
allocated or any tensor data is read.

    check_checkpoint(path) -> (raw config.json, HyperloopConfig, quantization_config or None)   raises
    folder_problems(path)  -> (raw, HyperloopConfig or None, problems)   every problem, for `inspect`

The float layout is the model stage's (edgeloop.model.checkpoint.float_problems); the quantized one is this
stage's own (edgeloop.quantize.folder's docstring, edgeloop.quantize.packing).
"""
from __future__ import annotations

import os
from pathlib import Path

from edgeloop.model.checkpoint import (CheckpointError, Header, ST_FLOATS, config_problems, expected_tensors,
                                       first_problem, float_problems, key_problems, read_header)
from edgeloop.model.config import HyperloopConfig
from edgeloop.quantize.config import (EMBEDDING_BITS, FORMAT, GROUP_SIZES, QUANT_METHOD, SCALE_DTYPES, prefix, roles,
                                      row_shape, tensor_bits)
from edgeloop.quantize.packing import packed_shapes

SCALE_NAMES = {"float16": "F16", "float32": "F32"}


def quantization_problem(path: Path, qc) -> str | None:
    """What is wrong with a quantized folder's quantization_config (the keys its tensors' layout depends on)."""
    where = f"{path / 'config.json'}: quantization_config"
    if not isinstance(qc, dict):
        return f"{where} = {qc!r}: expected a JSON object"
    if qc.get("quant_method") != QUANT_METHOD or qc.get("format") != FORMAT:
        return (f"{where}.quant_method = {qc.get('quant_method')!r} (expected {QUANT_METHOD!r}, "
                f"format {FORMAT!r})")
    if qc.get("bits") != 4 or qc.get("group_size") not in GROUP_SIZES or not isinstance(qc.get("sym"), bool):
        return (f"{where} bits/group_size/sym are not supported ({qc.get('bits')!r}, {qc.get('group_size')!r}, "
                f"{qc.get('sym')!r}; 4, one of {GROUP_SIZES}, true/false)")
    for key in ("embedding_bits", "lm_head_bits"):
        if qc.get(key) not in (None, *EMBEDDING_BITS):
            return f"{where}.{key} = {qc.get(key)!r} (4 or 8)"
    if qc.get("scale_dtype", "float16") not in SCALE_DTYPES:
        return f"{where}.scale_dtype = {qc.get('scale_dtype')!r} (one of {SCALE_DTYPES})"
    return None


def quantized_problems(st: Path, header: Header, cfg: HyperloopConfig, qc: dict) -> list[str]:
    """Every way the header of `st` is not a quantized checkpoint of `cfg` under `qc`, one line each: each
    stored tensor either under its own name in float or as its packed parts in the packed layout."""
    G, sym, emb_bits, head_bits = qc["group_size"], qc["sym"], qc.get("embedding_bits") or 4, qc.get("lm_head_bits")
    scale_dt = SCALE_NAMES[qc.get("scale_dtype", "float16")]
    table, out, used = roles(cfg), [], set()
    want = expected_tensors(cfg)
    for name, shape in want.items():
        p = prefix(name)
        if f"{p}.qweight" in header:  # packed (a float copy under its own name too is then unexpected)
            if not table[name].quantizable:
                out.append(f"{st}: tensor '{p}.qweight': '{name}' ({table[name].role}) is never quantized")
                continue
            wshape = row_shape(shape, table[name])
            if wshape[-1] % G:
                out.append(f"{st}: tensor '{p}.qweight': K={wshape[-1]} of '{name}' is not divisible by group_size {G}")
                continue
            for part, s in packed_shapes(wshape, G, sym, tensor_bits(name, emb_bits, head_bits)).items():
                got = header.get(f"{p}.{part}")
                dt = scale_dt if part == "scales" else "U8"
                if got is None:
                    out.append(f"{st}: tensor '{p}.{part}' is missing")
                elif got != (dt, s):
                    out.append(f"tensor '{p}.{part}' is {got[0]} {got[1]}, expected {dt} {s}")
                used.add(f"{p}.{part}")
        elif name in header:
            used.add(name)
            if header[name][1] != shape:
                out.append(f"tensor '{name}' has shape {header[name][1]}, config says {shape}")
            elif header[name][0] not in ST_FLOATS:
                out.append(f"tensor '{name}' has dtype {header[name][0]}; expected F32, F16 or BF16")
        else:
            out.append(f"{st}: tensor '{name}' (or its .qweight) is missing")
    return out + key_problems(st, set(), set(header) - used)


def folder_problems(path: str | os.PathLike) -> tuple[dict, HyperloopConfig | None, list[str]]:
    """(config.json, its config or None where it is invalid, every problem of the folder: config, then the
    quantization_config, then the tensors). Raises CheckpointError only where there is no config.json to read."""
    path = Path(path)
    raw, cfg, problems = config_problems(path)
    if cfg is None:
        return raw, None, problems
    st = path / "model.safetensors"
    qc = raw.get("quantization_config")
    if "quantization_config" in raw and (why := quantization_problem(path, qc)):
        return raw, cfg, [why]
    try:
        header = read_header(st)
    except CheckpointError as e:
        return raw, cfg, [str(e)]
    return raw, cfg, quantized_problems(st, header, cfg, qc) if qc is not None else float_problems(st, header, cfg)


def check_checkpoint(path: str | os.PathLike) -> tuple[dict, HyperloopConfig, dict | None]:
    """(config.json, the validated config, quantization_config or None) of a checkpoint folder whose config
    and every tensor header are consistent; the first problem is raised as a CheckpointError."""
    raw, cfg, problems = folder_problems(path)
    first_problem(problems)
    return raw, cfg, raw.get("quantization_config")


def check_quantized_header(path: str | os.PathLike, cfg: HyperloopConfig, qc) -> Header:
    """The header of a quantized folder's model.safetensors, after checking its quantization_config and layout."""
    path = Path(path)
    first_problem([p for p in [quantization_problem(path, qc)] if p])
    header = read_header(path / "model.safetensors")
    first_problem(quantized_problems(path / "model.safetensors", header, cfg, qc))
    return header
