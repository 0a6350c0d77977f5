"""ORT format for onnxruntime mobile / minimal builds: `edgeloop export --ort`.

    model.ort                  onnxruntime's own converter (tools.convert_onnx_models_to_ort), "Fixed" style:
                               graph optimizations up to OPTIMIZATION are applied once, here, and saved
    required_operators.config  the operator kernels a reduced build needs (build.py --include_ops_by_config)

OPTIMIZATION is "extended": the fusions every CPU build has (FusedMatMul, QuickGelu, ...), not the "all"
level's layout transforms that depend on the converting machine's CPU. The ORT format keeps every
initializer inside its flatbuffer, so an export with external data (past 2 GB) cannot be converted.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

OPTIMIZATION = "extended"
ORT_FILE, OPS_FILE = "model.ort", "required_operators.config"


def convert(folder: Path, cfg) -> dict:
    """folder/model.ort + folder/required_operators.config from folder/model.onnx; returns the manifest entry
    (file, bytes, optimization, operators, max |logit| difference to model.onnx on a short decode)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    if any(folder.glob("model.onnx.data*")):
        raise ValueError("--ort: the ORT format keeps weights inside one flatbuffer (< 2 GB), and this export "
                         "needs external data; export without --ort")
    with tempfile.TemporaryDirectory(prefix="edgeloop-ort-") as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        src.mkdir()
        try:  # the converter works on a folder of its own; a hard link saves copying the model
            os.link(folder / "model.onnx", src / "model.onnx")
        except OSError:
            shutil.copyfile(folder / "model.onnx", src / "model.onnx")
        old = os.environ.get("ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL")
        os.environ["ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"] = OPTIMIZATION  # the tool's own knob
        try:
            _quietly(lambda: convert_onnx_models_to_ort(src / "model.onnx", output_dir=dst,
                                                        optimization_styles=[OptimizationStyle.Fixed]))
        finally:
            if old is None:
                os.environ.pop("ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL")
            else:
                os.environ["ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"] = old
        orts, configs = list(dst.glob("*.ort")), list(dst.glob("*.config"))
        if len(orts) != 1 or len(configs) != 1:
            raise RuntimeError(f"onnxruntime's converter wrote {sorted(p.name for p in dst.iterdir())}")
        shutil.move(orts[0], folder / ORT_FILE)
        shutil.move(configs[0], folder / OPS_FILE)
    ops = [ln for ln in (folder / OPS_FILE).read_text().splitlines() if ln and not ln.startswith("#")]
    return {"file": ORT_FILE, "bytes": (folder / ORT_FILE).stat().st_size, "optimization": OPTIMIZATION,
            "style": "Fixed", "required_operators": OPS_FILE, "operators": ops,
            "max_abs_diff_vs_onnx": same_logits(folder, cfg)}


def same_logits(folder: Path, cfg) -> float:
    """max |logits(model.ort) - logits(model.onnx)| over a prefill and two decode steps (CPU provider)."""
    import onnxruntime as ort

    from edgeloop.export.verify import empty_past, feeds_for, has_num_loops, presents_to_past

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sessions = [ort.InferenceSession(str(folder / f), so, providers=["CPUExecutionProvider"])
                for f in ("model.onnx", ORT_FILE)]
    runs = []
    for s in sessions:
        names, loop_in = [o.name for o in s.get_outputs()], has_num_loops(s)
        past, ids, logits = empty_past(cfg), np.array([[5, 17, 42, 7, 99, 3]], np.int64), []
        for _ in range(3):
            outs = s.run(names, feeds_for(cfg, ids, past, None, loop_in))
            logits.append(outs[0])
            past = {**past, **presents_to_past(names, outs)}
            ids = outs[0][:, -1:].argmax(-1).astype(np.int64)
        runs.append(logits)
    return max(float(np.abs(a - b).max()) for a, b in zip(*runs))


def _quietly(fn):
    """Run onnxruntime's converter without its progress prints on stdout (a --json export prints one object)
    and without the INFO records of its `ort_format_model.utils` logger, which onnxruntime sets to DEBUG."""
    import contextlib
    import io
    import logging

    log = logging.getLogger("ort_format_model.utils")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return fn()
    finally:
        log.setLevel(level)
