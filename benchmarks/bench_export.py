"""Export benchmark, side by side in one run (run by hand):

  python benchmarks/bench_export.py [CKPT] [--group-size 128] [--method rtn] [--tokens 128]

- file size: edgeloop INT4 Loop export vs the fp32 checkpoint, split into quantized linears /
  embeddings / hyper-connection + norm tensors; vs today's toolchain (torch.onnx.export, then
  onnxruntime's MatMulNBitsQuantizer) on the same model;
- decode latency: INT4 Loop vs INT4 unrolled (goal: Loop <= 1.05x unrolled), same tokens.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def decode_ms_per_token(folder: Path, cfg, prompt: list[int], tokens: int, threads: int) -> float:
    """Median wall ms of one greedy decode step through the KV cache (onnxruntime CPU)."""
    import onnxruntime as ort

    from edgeloop.export.verify import empty_past, feeds_for, has_num_loops, presents_to_past

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    loop_in = has_num_loops(s)
    times = []
    for _ in range(2):  # a warm-up pass, then the measured one
        past, ids, times = empty_past(cfg), np.array([prompt], np.int64), []
        for _ in range(tokens):
            t = time.perf_counter()
            outs = s.run(names, feeds_for(cfg, ids, past, None, loop_in))
            times.append(time.perf_counter() - t)
            past = {**past, **presents_to_past(names, outs)}
            ids = outs[0][:, -1:].argmax(-1).astype(np.int64)
    return 1000 * statistics.median(times[1:])


def bytes_by_role(folder: Path) -> dict[str, int]:
    import onnx

    from edgeloop.model.inspect import tensor_role

    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    out: dict[str, int] = {}
    for t in m.graph.initializer:
        name = t.name.split("#")[0]
        role = "constants" if name.startswith(("const_", "rope.", "num_loops")) else tensor_role(name)
        out[role] = out.get(role, 0) + len(t.raw_data)
    return out


def torch_onnx_baseline(ckpt: Path, work: Path, group_size: int) -> dict:
    """Today's path: torch.onnx.export (dynamo) of the fp32 model, then MatMulNBitsQuantizer (DEFAULT)."""
    import onnx
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from edgeloop.model.checkpoint import load_model

    model = load_model(ckpt)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 16))
    fp = work / "torch_fp32.onnx"
    try:
        torch.onnx.export(model, (ids,), str(fp), dynamo=True, input_names=["input_ids"], output_names=["logits"])
    except Exception as e:  # report, do not hide: this is the baseline's own failure
        return {"error": f"torch.onnx.export failed: {str(e).splitlines()[0][:200]}"}
    m = onnx.load(str(fp))
    q = MatMulNBitsQuantizer(m, block_size=group_size, is_symmetric=False)
    q.process()
    qp = work / "torch_int4.onnx"
    q.model.save_model_to_file(str(qp), use_external_data_format=False)
    qm = onnx.load(str(qp))
    return {"fp32_bytes": fp.stat().st_size + sum(p.stat().st_size for p in work.glob("torch_fp32.onnx.data")),
            "int4_bytes": qp.stat().st_size,
            "matmulnbits": sum(n.op_type == "MatMulNBits" for n in qm.graph.node),
            "matmul_left_fp32": sum(n.op_type == "MatMul" for n in qm.graph.node),
            "loop": any(n.op_type == "Loop" for n in qm.graph.node)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt", nargs="?", default=str(ROOT / "models" / "hyperloop-tiny"))
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from edgeloop.export import ExportConfig, export_checkpoint
    from edgeloop.model.checkpoint import load_config, load_tokenizer
    from edgeloop.quantize import QuantConfig, quantize_checkpoint

    ck = Path(a.ckpt)
    cfg = load_config(ck)
    work = Path(tempfile.mkdtemp(prefix="bench_export_"))
    q = work / "int4"
    quantize_checkpoint(ck, q, QuantConfig(group_size=a.group_size, algorithm=a.method), progress=False)
    exports = {"fp32 Loop": (ck, ExportConfig(format="fp32")),
               "INT4 Loop": (q, ExportConfig()),
               "INT4 unrolled": (q, ExportConfig(unroll=True))}
    for name, (src, ec) in exports.items():
        export_checkpoint(src, work / name.replace(" ", "_"), ec)
    fp32_ckpt_bytes = sum(v * 4 for v in _numel(ck).values())  # the checkpoint as fp32
    roles = {n: bytes_by_role(work / n.replace(" ", "_")) for n in exports}
    base = torch_onnx_baseline(ck, work, a.group_size)

    c = Console()
    t = Table(title=f"file size — {ck.name} (fp32 checkpoint = {fp32_ckpt_bytes:,} B)")
    for col in ("artifact", "bytes", "× fp32", "linears", "embedding", "hc + norms"):
        t.add_column(col)
    lin_fp32 = roles["fp32 Loop"].get("linear", 0)
    for n in exports:
        p = work / n.replace(" ", "_") / "model.onnx"
        r = roles[n]
        t.add_row(n, f"{p.stat().st_size:,}", f"{p.stat().st_size / fp32_ckpt_bytes:.3f}",
                  f"{r.get('linear', 0):,} ({r.get('linear', 0) / max(lin_fp32, 1):.3f}×)",
                  f"{r.get('embedding', 0) + r.get('lm_head', 0):,}", f"{r.get('hc', 0) + r.get('norm', 0):,}")
    if "error" in base:
        t.add_row("torch.onnx.export + MatMulNBitsQuantizer", base["error"], "", "", "", "")
    else:
        t.add_row("torch.onnx.export fp32 (unrolled)", f"{base['fp32_bytes']:,}",
                  f"{base['fp32_bytes'] / fp32_ckpt_bytes:.3f}", "", "", "")
        t.add_row("  + MatMulNBitsQuantizer DEFAULT", f"{base['int4_bytes']:,}",
                  f"{base['int4_bytes'] / fp32_ckpt_bytes:.3f}",
                  f"{base['matmulnbits']} MatMulNBits, {base['matmul_left_fp32']} MatMul left fp32", "", "")
    c.print(t)

    prompt = load_tokenizer(ck).encode("And God said", add_special_tokens=False).ids
    lat = {n: decode_ms_per_token(work / n.replace(" ", "_"), cfg, prompt, a.tokens, a.threads)
           for n in ("INT4 Loop", "INT4 unrolled")}
    t2 = Table(title=f"decode latency, {a.tokens} greedy tokens, {a.threads} threads (median ms/token)")
    t2.add_column("export")
    t2.add_column("ms/token")
    t2.add_column("tokens/s")
    for n, ms in lat.items():
        t2.add_row(n, f"{ms:.3f}", f"{1000 / ms:.1f}")
    t2.add_row("Loop ÷ unrolled", f"{lat['INT4 Loop'] / lat['INT4 unrolled']:.3f}× (goal ≤ 1.05×)", "")
    c.print(t2)
    c.print(f"work folder: {work}")


def _numel(ck: Path) -> dict[str, int]:
    from edgeloop.model.checkpoint import expected_tensors, load_config

    out = {}
    for k, s in expected_tensors(load_config(ck)).items():
        n = 1
        for d in s:
            n *= d
        out[k] = n
    return out


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
