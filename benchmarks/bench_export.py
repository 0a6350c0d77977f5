"""Export benchmark, side by side in one run (run by hand):

  python benchmarks/bench_export.py [CKPT] [--group-size 128] [--method rtn] [--tokens 128]

- file size: edgeloop INT4 Loop export vs the fp32 checkpoint, split into quantized linears /
  embeddings / hyper-connection + norm tensors; vs today's toolchain (torch.onnx.export, then
  onnxruntime's MatMulNBitsQuantizer) on the same model;
- decode latency: INT4 Loop vs INT4 unrolled (goal: Loop <= 1.05x unrolled), same tokens, at a short and
  a near-full context, accuracy levels 0 and 4, 1 and --threads threads, interleaved rounds.
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
sys.path.insert(0, str(ROOT / "benchmarks"))


class Decoder:
    """One onnxruntime CPU session of an export, timing greedy decode steps through the KV cache."""

    def __init__(self, folder: Path, cfg, threads: int):
        import onnxruntime as ort

        from edgeloop.export.verify import has_num_loops

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = threads
        self.s = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
        self.cfg, self.names, self.loop_in = cfg, [o.name for o in self.s.get_outputs()], has_num_loops(self.s)

    def median_step(self, prompt: list[int], tokens: int) -> float:
        """Median seconds of one decode step after `prompt` (the prefill is not timed)."""
        from edgeloop.export.verify import empty_past, feeds_for, presents_to_past

        past, ids, times = empty_past(self.cfg), np.array([prompt], np.int64), []
        for i in range(tokens + 1):
            t = time.perf_counter()
            outs = self.s.run(self.names, feeds_for(self.cfg, ids, past, None, self.loop_in))
            if i:
                times.append(time.perf_counter() - t)
            past = {**past, **presents_to_past(self.names, outs)}
            ids = outs[0][:, -1:].argmax(-1).astype(np.int64)
        return statistics.median(times)


def interleaved_ms(decoders: dict, prompt: list[int], tokens: int, rounds: int = 5) -> dict[str, float]:
    """ms/token of each decoder: rounds alternate between them (so a busy moment hits all alike) and each
    keeps its best round."""
    best = {n: float("inf") for n in decoders}
    for _ in range(rounds):
        for n, d in decoders.items():
            best[n] = min(best[n], d.median_step(prompt, tokens))
    return {n: 1000 * v for n, v in best.items()}


def bytes_by_role(folder: Path) -> dict[str, int]:
    """Initializer bytes by the role (Hyperloop.tensors()) of the checkpoint tensor each one stores."""
    import json
    import re

    import onnx

    from edgeloop.model.config import HyperloopConfig
    from edgeloop.model.model import meta_model

    table = meta_model(HyperloopConfig.from_dict(json.loads((folder / "manifest.json").read_text())["config"])).tensors()
    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    out: dict[str, int] = {}
    for t in m.graph.initializer:
        name = t.name.split("#")[0]
        base = re.sub(r"(\.weight_t|\.q_t|\.q|\.qweight|\.scales(_3d)?|\.qzeros(_3d)?|\.zeros|_scale|_bias)$", "", name)
        if name.startswith(("const_", "rope.", "num_loops")):
            role = "constants"
        else:
            role = next((table[c].role for c in (name, f"{base}.weight", base) if c in table),
                        "hc" if base.startswith("hc.") else "other")
        out[role] = out.get(role, 0) + len(t.raw_data)
    return out


def torch_onnx_baseline(ckpt: Path, work: Path, group_size: int) -> dict:
    """Today's path (benchmarks/torch_baseline.py): torch.onnx.export (dynamo, same KV convention), then
    MatMulNBitsQuantizer (DEFAULT). Its failure is reported, not hidden."""
    import onnx

    from torch_baseline import export_torch, quantize_torch

    try:
        fp = export_torch(ckpt, work / "torch_fp32")
    except Exception as e:
        return {"error": f"torch.onnx.export failed: {str(e).splitlines()[0][:200]}"}
    q = quantize_torch(fp, work / "torch_int4", group_size)
    qm = onnx.load(str(q / "model.onnx"))
    return {"fp32_bytes": sum(p.stat().st_size for p in fp.glob("model.onnx*")),
            "int4_bytes": sum(p.stat().st_size for p in q.glob("model.onnx*")),
            "matmulnbits": sum(n.op_type == "MatMulNBits" for n in qm.graph.node),
            "matmul_left_fp32": len(fp32_linears(qm)),
            "loop": any(n.op_type == "Loop" for n in qm.graph.node)}


def fp32_linears(m) -> list:
    """MatMul nodes whose weight is an initializer, directly or through a Transpose (torch.onnx.export
    keeps W^T of a weight used by several loops as a runtime Transpose, which the quantizer skips)."""
    inits = {i.name for i in m.graph.initializer}
    transposed = {n.output[0] for n in m.graph.node if n.op_type == "Transpose" and n.input[0] in inits}
    return [n for n in m.graph.node if n.op_type == "MatMul" and (n.input[1] in inits or n.input[1] in transposed)]


def export_1b(work: Path) -> None:
    """A random ~1B-parameter fp16 Hyperloop (bench_quantize.write_big): RTN INT4, then `edgeloop export` of
    the INT4 and of the fp32 form, each in a fresh process; prints wall time and peak RSS (goal: < 24 GiB)."""
    import subprocess

    import psutil
    from bench_quantize import write_big

    src = work / "big-fp16"
    params = write_big(src)
    print(f"random checkpoint: {params / 1e9:.2f}B parameters")
    steps = [("quantize RTN", ["quantize", str(src), "-o", str(work / "big-int4"), "--method", "rtn"]),
             ("export INT4 (MatMulNBits)", ["export", str(work / "big-int4"), "-o", str(work / "onnx-int4")]),
             ("export fp32 (external data)", ["export", str(src), "-o", str(work / "onnx-fp32"), "--format", "fp32"])]
    for name, args in steps:
        t, peak = time.time(), 0
        with open(work / "log.txt", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "edgeloop.cli", *args, "--json"], stdout=log, stderr=log)
            watch = psutil.Process(proc.pid)
            while proc.poll() is None:  # sample the step's RSS (a fresh process per step)
                try:
                    peak = max(peak, watch.memory_info().rss)
                except psutil.Error:
                    pass
                time.sleep(0.05)
        tail = (work / "log.txt").read_text().strip().splitlines()
        status = "ok" if proc.returncode == 0 else f"FAILED: {tail[-1] if tail else proc.returncode}"
        print(f"{name}: {time.time() - t:.0f} s, peak RSS {peak / 2**30:.2f} GiB, {status}")
    for d in ("onnx-int4", "onnx-fp32"):
        files = {p.name: p.stat().st_size for p in (work / d).glob("model.onnx*")}
        print(f"{d}: {', '.join(f'{k} {v / 2**30:.2f} GiB' for k, v in files.items())}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt", nargs="?", default=str(ROOT / "models" / "hyperloop-tiny"))
    ap.add_argument("--export-1b", action="store_true", help="time + peak RSS of exporting a random 1B model")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.export_1b:
        with tempfile.TemporaryDirectory(prefix="bench_export_1b_") as tmp:
            export_1b(Path(tmp))
        return

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
               "INT4 unrolled": (q, ExportConfig(unroll=True)),
               "INT4 Loop acc4": (q, ExportConfig(accuracy_level=4)),
               "INT4 unrolled acc4": (q, ExportConfig(accuracy_level=4, unroll=True))}
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
    long_prompt = (prompt * cfg.max_seq_len)[:max(len(prompt), cfg.max_seq_len - a.tokens - 1)]
    t2 = Table(title=f"decode latency, {a.tokens} greedy tokens (median ms/token, best of 5 interleaved rounds)")
    for col in ("threads", "context", "accuracy level", "Loop ms", "unrolled ms", "Loop ÷ unrolled (goal ≤ 1.05×)"):
        t2.add_column(col)
    for threads in sorted({1, a.threads}):
        for level, suffix in ((0, ""), (4, " acc4")):
            dec = {n: Decoder(work / f"INT4 {n}{suffix}".replace(" ", "_"), cfg, threads) for n in ("Loop", "unrolled")}
            for p in (prompt, long_prompt):
                ms = interleaved_ms(dec, p, a.tokens)
                t2.add_row(str(threads), f"{len(p)}+{a.tokens}", str(level), f"{ms['Loop']:.3f}",
                           f"{ms['unrolled']:.3f}", f"{ms['Loop'] / ms['unrolled']:.3f}×")
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
