"""Quantized checkpoint folders: the streaming writer, `quantize_checkpoint`, `save_quantized`, `load_quantized`.

A quantized folder is a checkpoint folder (config.json, model.safetensors, tokenizer files, README.md) where
    config.json   = the architecture fields + "quantization_config" (see edgeloop.quantize.config)
    model.safetensors: for every quantized tensor `{p}.weight` (or hc `{p}`): `{p}.qweight`, `{p}.scales`
                  and, asymmetric, `{p}.qzeros` in the layout of edgeloop.quantize.packing; every other
                  tensor under its own name in keep_dtype (byte-identical when keep_dtype is its stored dtype).
The safetensors file is written tensor by tensor (header first, from the known output shapes), and RTN
reads one input tensor at a time from a freshly opened memory map, so peak memory is about one tensor.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from edgeloop.io import atomic_dir, check_output_dir, file_sha256, write_json
from edgeloop.model.checkpoint import (GENERATION_FILES, TOKENIZER_FILES, CheckpointError, check_finite,
                                       check_float_header, expected_tensors, load_config, load_model, open_safetensors,
                                       read_config, read_tensor)
from edgeloop.model.config import HyperloopConfig
from edgeloop.model.model import Hyperloop, meta_model
from edgeloop.quantize.config import (QuantConfig, QuantizeError, as_rows, plan, prefix, quantization_config, roles,
                                      row_shape, tensor_bits)
from edgeloop.quantize.modules import QuantEmbedding, QuantLinear, set_module
from edgeloop.quantize.packing import SCALE_TORCH, dequantize, packed_shapes, rtn
from edgeloop.quantize.validate import check_quantized_header
from edgeloop.tensors import write_safetensors

KEEP_TORCH = {"float32": torch.float32, "float16": torch.float16}


def read_one(st: Path, name: str) -> torch.Tensor:
    """One tensor, from a memory map opened and closed around it (its pages leave the process)."""
    with open_safetensors(st) as f:
        return read_tensor(f, name, st)


# ---- input validation and the output plan ----------------------------------------------------
def inspect_input(in_dir: Path) -> tuple[HyperloopConfig, dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
    """Config and (dtype, shape) of every tensor of a float checkpoint folder, from headers only."""
    raw = read_config(in_dir)
    if "quantization_config" in raw:
        qc = raw["quantization_config"]
        raise QuantizeError(f"{in_dir}: is already quantized "
                            f"({qc.get('quant_method') if isinstance(qc, dict) else qc!r})")
    cfg = load_config(in_dir)
    return cfg, check_float_header(in_dir, cfg)


def output_header(inputs: dict[str, tuple[torch.dtype, tuple[int, ...]]], quant: set[str], q: QuantConfig,
                  cfg: HyperloopConfig) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """(dtype, shape) of every output tensor: packed tensors for `quant`, keep_dtype for the rest."""
    out, table = {}, roles(cfg)
    for name, (_, shape) in inputs.items():
        if name in quant:
            wshape = row_shape(shape, table[name])
            bits = tensor_bits(name, q.embedding_bits, q.lm_head_bits)
            for part, s in packed_shapes(wshape, q.group_size, q.sym, bits).items():
                out[f"{prefix(name)}.{part}"] = (SCALE_TORCH[q.scale_dtype] if part == "scales" else torch.uint8, s)
        else:
            out[name] = (KEEP_TORCH[q.keep_dtype], shape)
    return out


def _packed_items(name: str, packed: tuple) -> list[tuple[str, torch.Tensor]]:
    parts = [("qweight", packed[0]), ("scales", packed[1])] + ([("qzeros", packed[2])] if packed[2] is not None else [])
    return [(f"{prefix(name)}.{p}", t) for p, t in parts]


RTN_CHUNK_ELEMENTS = 1 << 24  # rows are quantized in chunks of ~16M elements: bounded temporaries


def rtn_tensor(name: str, w: torch.Tensor, q: QuantConfig, cfg: HyperloopConfig) -> tuple:
    """Packed RTN of one stored tensor, as rows [..., N, K] (hc matrices [r, K, N] as w[l]^T). Rows are
    independent (groups run along K), so a large matrix is done a chunk of rows at a time: the same bytes,
    without several float copies of the whole tensor alive at once."""
    rows, bits = as_rows(w, roles(cfg)[name]), tensor_bits(name, q.embedding_bits, q.lm_head_bits)
    if rows.ndim != 2 or rows.numel() <= RTN_CHUNK_ELEMENTS:
        return rtn(rows.float(), q.group_size, q.sym, q.scale_dtype, bits)
    step = max(1, RTN_CHUNK_ELEMENTS // rows.shape[1])
    parts = [rtn(rows[i:i + step].float(), q.group_size, q.sym, q.scale_dtype, bits) for i in range(0, rows.shape[0], step)]
    return tuple(None if parts[0][k] is None else torch.cat([p[k] for p in parts]) for k in range(3))


# ---- writing a folder -------------------------------------------------------------------------
def _card(cfg: HyperloopConfig, qc: dict, source: str, counts: dict) -> str:
    cal = qc.get("calibration")
    cal_line = (f"GPTQ calibration: {cal['samples']} windows x {cal['seq_len']} tokens of {cal['text']} "
                f"(seed {cal['seed']}); damp 1%, act_order = {qc['act_order']}." if cal else "No calibration (RTN).")
    return f"""---
library_name: edgeloop
tags: [looped-transformer, hyperloop, int4, {qc['algorithm']}]
---
# INT4 {qc['algorithm'].upper()} quantization of `{source}`

Written by `edgeloop quantize`. Weight-only INT4 ({qc['format']}): groups of {qc['group_size']} input
elements per output row, {'symmetric (implicit zero point 8)' if qc['sym'] else 'asymmetric (uint4 zero points)'},
{qc['scale_dtype']} scales. {cal_line}

| | |
|---|---|
| architecture | begin {cfg.n_begin} -> middle {cfg.n_middle} x {cfg.num_loops} loops -> end {cfg.n_end}, d = {cfg.d_model}, hc = {cfg.hc} |
| tensors quantized | {counts['quantized']} (all block Linears{f", embedding (INT{qc.get('embedding_bits') or 4})" if qc['quantize_embedding'] else ''}{', lm_head' if qc['quantize_lm_head'] else ''}{', hc matrices' if qc['quantize_hc'] else ''}) |
| tensors kept ({qc['keep_dtype']}) | {counts['kept']} (norms, hyper-connection parameters{'' if qc['quantize_embedding'] else ', embedding'}) |
| model.safetensors | {counts['bytes_before']:,} bytes -> {counts['bytes_after']:,} bytes |

Load with `edgeloop.model.checkpoint.load_model(path)` (dequantize-on-the-fly Linears: the INT4 reference).
The layout is documented in `edgeloop/quantize/packing.py`.
"""


def write_folder(out_dir: str | os.PathLike, cfg: HyperloopConfig, q: QuantConfig,
                 header: dict[str, tuple[torch.dtype, tuple[int, ...]]], tensors: Iterator[tuple[str, torch.Tensor]],
                 quantized: list[str], kept: list[str], calibration: dict | None, source: dict,
                 tokenizer_dir: str | os.PathLike | None, overwrite: bool, bytes_before: int) -> dict:
    """Write config.json, model.safetensors (streamed), tokenizer files and README.md atomically."""
    qc = quantization_config(q, quantized, kept, calibration, source)
    with atomic_dir(out_dir, overwrite) as tmp:
        write_json(tmp / "config.json", {**cfg.to_dict(), "quantization_config": qc})
        write_safetensors(tmp / "model.safetensors", header, tensors)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES + GENERATION_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
        after = (tmp / "model.safetensors").stat().st_size
        counts = {"quantized": len(quantized), "kept": len(kept), "bytes_before": bytes_before, "bytes_after": after}
        (tmp / "README.md").write_text(_card(cfg, qc, source.get("name", "?"), counts), encoding="utf-8")
    return {"quantization_config": qc, "bytes_after": after}


def save_quantized(model: Hyperloop, out_dir: str | os.PathLike, qcfg: QuantConfig,
                   tokenizer_dir: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Write a model quantized by `quantize_` as a quantized checkpoint folder (kept tensors in keep_dtype)."""
    qcfg.validate()
    check_output_dir(out_dir, overwrite)
    state = model.state_dict()
    packed = dict(getattr(model, "int4_params", {}))
    quantized, kept, header, items = [], [], {}, []
    for name, t in state.items():
        if name in packed:
            continue
        if name.endswith(".qweight"):
            p = name[:-len(".qweight")]
            quantized.append(f"{p}.weight")
            for part in ("qweight", "scales", "qzeros"):
                if f"{p}.{part}" in state:
                    items.append((f"{p}.{part}", state[f"{p}.{part}"]))
        elif name.endswith((".scales", ".qzeros")):
            continue
        else:
            check_finite(name, t)
            kept.append(name)
            items.append((name, t.detach().to(KEEP_TORCH[qcfg.keep_dtype])))
    for name, pk in packed.items():
        quantized.append(name)
        items += _packed_items(name, pk)
    header = {n: (t.dtype, tuple(t.shape)) for n, t in items}
    info = getattr(model, "quantization", {}) or {}
    src = {"name": "in-memory model"}
    write_folder(out_dir, model.cfg, qcfg, header, iter(items), quantized, kept, info.get("calibration"), src,
                 tokenizer_dir, overwrite, bytes_before=sum(t.numel() * t.element_size() for t in state.values()))
    return Path(out_dir)


# ---- the stage ------------------------------------------------------------------------------
def quantize_checkpoint(in_dir: str | os.PathLike, out_dir: str | os.PathLike, qcfg: QuantConfig,
                        overwrite: bool = False, progress: bool | Callable[[str, int], None] = True) -> dict:
    """Quantize a float checkpoint folder into a quantized one; returns the summary report.
    RTN streams tensor by tensor; GPTQ loads the fp32 model, calibrates and quantizes it in place."""
    from edgeloop.quantize.core import calibration_ids, quantize_

    t0 = time.time()
    qcfg.validate()
    in_dir = Path(in_dir)
    check_output_dir(out_dir, overwrite)
    if in_dir.resolve() == Path(out_dir).resolve():
        raise QuantizeError(f"{out_dir}: the output folder must differ from the input folder")
    cfg, inputs = inspect_input(in_dir)
    st = in_dir / "model.safetensors"
    quant, kept = plan({n: s for n, (_, s) in inputs.items()}, cfg, qcfg)
    calib_ids, calibration = None, None
    if qcfg.algorithm == "gptq":
        from edgeloop.model.checkpoint import load_tokenizer

        calib_ids, calibration = calibration_ids(load_tokenizer(in_dir, cfg), qcfg, cfg.max_seq_len)
    header = output_header(inputs, set(quant), qcfg, cfg)
    keep_dt = KEEP_TORCH[qcfg.keep_dtype]
    bar, step = _progress(progress, len(quant))
    layers: list[dict] = []
    try:
        if qcfg.algorithm == "gptq":
            model = load_model(in_dir)
            rep = quantize_(model, qcfg, calib_ids, progress=step, calibration=calibration)
            layers = rep["layers"]
            model.to("cpu")
            mstate = model.state_dict()
            packed_hc = model.int4_params

            def packed_of(name: str) -> tuple:
                if name in packed_hc:
                    return tuple(None if t is None else t.cpu() for t in packed_hc[name])
                p = prefix(name)
                return tuple(mstate.get(f"{p}.{part}") for part in ("qweight", "scales", "qzeros"))
        else:
            def packed_of(name: str) -> tuple:
                w = read_one(st, name)
                check_finite(name, w)
                out = rtn_tensor(name, w, qcfg, cfg)
                step(prefix(name), 1)
                return out

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            for name in inputs:  # state-dict order: begin, middle, end, ...
                if name in quant:
                    yield from _packed_items(name, packed_of(name))
                else:
                    t = read_one(st, name)
                    check_finite(name, t)
                    yield name, (t if t.dtype == keep_dt else t.to(keep_dt))

        source = {"name": in_dir.name, "sha256": file_sha256(st)}
        before = st.stat().st_size
        res = write_folder(out_dir, cfg, qcfg, header, stream(), list(quant), list(kept), calibration, source,
                           in_dir, overwrite, before)
    finally:
        if bar is not None:
            bar.stop()
    return _report(in_dir, out_dir, qcfg, cfg, inputs, quant, kept, header, res, layers, time.time() - t0, before)


def _progress(progress, total: int):
    if callable(progress):
        return None, progress
    if not progress:
        return None, (lambda desc, n: None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("quantizing {task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=Console(stderr=True), transient=True)
    task = bar.add_task("", total=total)
    bar.start()
    return bar, (lambda desc, n: bar.update(task, advance=n, description=desc))


def _report(in_dir, out_dir, q, cfg, inputs, quant, kept, header, res, layers, seconds, before) -> dict:
    def nbytes(dt, shape):
        n = dt.itemsize
        for s in shape:
            n *= s
        return n

    table = roles(cfg)
    lin = [n for n in quant if table[n].role == "linear"]
    lin_fp32 = sum(nbytes(torch.float32, inputs[n][1]) for n in lin)
    lin_after = sum(nbytes(*header[f"{prefix(n)}.{p}"]) for n in lin for p in ("qweight", "scales", "qzeros")
                    if f"{prefix(n)}.{p}" in header)
    fp32_total = sum(nbytes(torch.float32, s) for _, s in inputs.values())
    return {"input": str(in_dir), "output": str(out_dir), "settings": q.to_dict(),
            "tensors_quantized": len(quant), "tensors_kept": len(kept),
            "quantized": quant, "kept": kept, "layers": layers,
            "bytes_before": before, "bytes_after": res["bytes_after"], "compression_ratio": before / res["bytes_after"],
            "bytes_fp32": fp32_total, "ratio_vs_fp32": res["bytes_after"] / fp32_total,
            "linear_bytes_fp32": lin_fp32, "linear_bytes_after": lin_after,
            "linear_ratio_vs_fp32": lin_after / lin_fp32 if lin_fp32 else None,
            "calibration": res["quantization_config"]["calibration"], "seconds": round(seconds, 3)}


def load_quantized(path: str | os.PathLike) -> Hyperloop:
    """A quantized folder as an eval fp32-compute model with QuantLinear / QuantEmbedding modules."""
    path = Path(path)
    qc = read_config(path).get("quantization_config")
    cfg = load_config(path)
    keys = set(check_quantized_header(path, cfg, qc))  # quantization_config and every header, before any data
    G, sym, emb_bits, head_bits = qc["group_size"], qc["sym"], qc.get("embedding_bits") or 4, qc.get("lm_head_bits")
    st = path / "model.safetensors"
    model, table = meta_model(cfg), roles(cfg)
    model.int4_params = {}
    want = expected_tensors(cfg)
    state: dict[str, torch.Tensor] = {}
    with open_safetensors(st) as f:
        for name, shape in want.items():
            p = prefix(name)
            if f"{p}.qweight" in keys:
                wshape = row_shape(shape, table[name])
                parts = {}
                bits = tensor_bits(name, emb_bits, head_bits)
                for part in packed_shapes(wshape, G, sym, bits):
                    parts[part] = read_tensor(f, f"{p}.{part}", st)
                    check_finite(f"{p}.{part}", parts[part])
                packed = (parts["qweight"], parts["scales"], parts.get("qzeros"))
                role = table[name].role
                if role in ("linear", "lm_head"):  # a bias placeholder, loaded with the kept tensors below
                    bias = torch.empty(shape[0]) if f"{p}.bias" in want else None
                    set_module(model, p, QuantLinear(*packed, G, sym, bits, bias=bias))
                elif role == "embedding":
                    set_module(model, p, QuantEmbedding(*packed, G, sym, bits))
                else:  # hc matrix / loop embedding: dequantized into the parameter
                    state[name] = as_rows(dequantize(*packed, G, sym), table[name]).contiguous()
                    model.int4_params[name] = packed
            else:
                t = read_tensor(f, name, st)
                check_finite(name, t)
                state[name] = t.float()
    model.load_state_dict(state, strict=False, assign=True)
    leftover = [n for n, b in list(model.named_parameters()) + list(model.named_buffers())
                if b.is_meta and not n.startswith("rope_")]
    if leftover:
        raise CheckpointError(f"{st}: tensor '{leftover[0]}' was not loaded")
    model.init_buffers()
    model.quantization = {"config": qc, "calibration": qc.get("calibration")}
    return model.eval()


def load_checkpoint(path: str | os.PathLike) -> Hyperloop:
    """A float or a quantized checkpoint folder as an eval model (fp32 compute; quantized linears
    dequantize on the fly: the INT4 reference)."""
    return load_quantized(path) if "quantization_config" in read_config(path) else load_model(path)
