"""Runtime benchmark (run by hand), all rows in one run on one model:

  python benchmarks/bench_runtime.py [CKPT]            # default: models/hyperloop-tiny
  python benchmarks/bench_runtime.py --random-100m     # a ~100M-parameter random Hyperloop (RTN INT4)

Rows: PyTorch fp32 eager, edgeloop fp32 ONNX (Loop), INT4 ONNX (Loop) at MatMulNBits accuracy level 0 and 4,
INT4 ONNX (unrolled, level 4), today's toolchain (torch.onnx.export + MatMulNBitsQuantizer, see
torch_baseline.py), and
onnxruntime's MatMulNBitsQuantizer (DEFAULT and HQQ, same bits and block size) applied to edgeloop's
fp32 Loop export. Columns: decode tokens/s, prefill ms, file size, peak RSS (each measured in a fresh
subprocess) and perplexity on the same tokens, as ratios to PyTorch fp32; and the roofline: measured
memory bandwidth / weight bytes read per decoded token (loop-body weights count r times; a Gather
reads one row), and the fraction of that bound the decode reached. Decode tokens/s come from the
median step time (robust on a shared machine).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ---- measurements ---------------------------------------------------------------------------
def memory_bandwidth(threads: int, mib: int = 512, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of `repeats` sums of a `mib` MiB float32 array split over
    `threads` threads (numpy releases the GIL in reductions)."""
    a = np.ones(mib * 2**20 // 4, np.float32)
    parts = np.array_split(a, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as ex:
        for _ in range(repeats):
            t = time.perf_counter()
            list(ex.map(np.sum, parts))
            best = max(best, a.nbytes / (time.perf_counter() - t))
    return best


def weight_bytes_per_token(model_path: Path, r: int) -> int:
    """Initializer bytes one decode step reads: every consuming node reads its weights once, a node in the
    Loop body once per loop (r), a Gather (embedding, rotary tables, per-loop rows) one row only."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)

    def sizes(g) -> dict:
        out = {}
        for t in g.initializer:
            n = int(np.prod(t.dims)) if t.dims else 1
            out[t.name] = (n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize, t.dims[0] if t.dims else 1)
        return out

    known = sizes(m.graph)
    total = 0

    def walk(g, factor: int) -> None:
        nonlocal total
        known.update(sizes(g))
        for node in g.node:
            for i, name in enumerate(node.input):
                if name in known:
                    nbytes, rows = known[name]
                    gather = node.op_type in ("Gather", "GatherBlockQuantized") and i == 0
                    total += factor * (nbytes // max(rows, 1) if gather else nbytes)
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g, factor * r if node.op_type == "Loop" else 0 if node.op_type == "If" else factor)

    walk(m.graph, 1)
    return total


def torch_probe(ckpt: str, threads: int, prefill: int, decode: int) -> dict:
    """PyTorch fp32 eager in THIS process (run in a fresh one): peak RSS after loading, prefill ms,
    decode tokens/s through its KV cache."""
    import psutil
    import torch

    torch.set_num_threads(threads)
    from edgeloop.model.checkpoint import load_model
    from edgeloop.model.evaluate import generate
    from edgeloop.runtime.measure import _peak_rss

    base = psutil.Process().memory_info().rss
    model = load_model(ckpt)
    peak = _peak_rss()
    x = torch.randint(0, model.cfg.vocab_size, (1, prefill), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    prompt = x[0, :16].tolist()
    list(generate(model, prompt, 4))
    stamps = []
    for _ in generate(model, prompt, decode + 1):
        stamps.append(time.perf_counter())
    from edgeloop.runtime.measure import decode_rates

    return {"peak_rss_bytes": peak, "baseline_rss_bytes": base, "prefill_ms": 1000 * float(np.median(times)),
            **decode_rates(stamps),
            "steady_rss_bytes": psutil.Process().memory_info().rss}


def run_torch_probe(ckpt: Path, threads: int, prefill: int, decode: int) -> dict:
    r = subprocess.run([sys.executable, __file__, "--torch-probe", str(ckpt), "--threads", str(threads),
                        "--prefill", str(prefill), "--decode", str(decode)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"torch probe failed: {r.stderr.strip().splitlines()[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- building the rows ----------------------------------------------------------------------
def random_100m(work: Path) -> Path:
    """A ~100M-parameter random Hyperloop (d=1024, 2+4x3+2 layers) saved fp32 with the demo tokenizer."""
    import torch

    from edgeloop.model.checkpoint import save_checkpoint
    from edgeloop.model.config import HyperloopConfig
    from edgeloop.model.model import Hyperloop

    cfg = HyperloopConfig(vocab_size=4096, d_model=1024, n_heads=16, n_kv_heads=4, n_begin=2, n_middle=4, n_end=2,
                          num_loops=3, mlp_hidden=2816, max_seq_len=512).validate()
    torch.manual_seed(0)
    model = Hyperloop(cfg).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"random Hyperloop: {n / 1e6:.1f}M unique parameters, {cfg.effective_layers} effective layers")
    return save_checkpoint(model, work / "random-100m", tokenizer_dir=ROOT / "models" / "hyperloop-tiny")


def ort_quantized(fp32_export: Path, out: Path, algo: str, block_size: int) -> Path:
    """onnxruntime's MatMulNBitsQuantizer (DEFAULT or HQQ, 4 bits, asymmetric, `block_size`) on the fp32
    Loop export; the folder keeps edgeloop's manifest and tokenizer so the runtime can load it."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig, HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    shutil.copytree(fp32_export, out)
    cfg = HQQWeightOnlyQuantConfig(block_size=block_size, bits=4) if algo == "hqq" else \
        DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False)
    q = MatMulNBitsQuantizer(onnx.load(str(fp32_export / "model.onnx")), algo_config=cfg)
    q.process()
    q.model.save_model_to_file(str(out / "model.onnx"), use_external_data_format=False)
    m = json.loads((out / "manifest.json").read_text())
    qm = onnx.load(str(out / "model.onnx"))
    body = [n for node in qm.graph.node if node.op_type == "Loop" for n in node.attribute[0].g.node]
    m.update(format=f"ort-{algo}", note=f"MatMulNBitsQuantizer {algo} on edgeloop's fp32 Loop export; "
             f"{sum(n.op_type == 'MatMulNBits' for n in body)} MatMulNBits in the Loop body")
    (out / "manifest.json").write_text(json.dumps(m, indent=2))
    return out


LOOP0, LOOP, UNROLLED = "INT4 ONNX (Loop, acc 0)", "INT4 ONNX (Loop, acc 4)", "INT4 ONNX (unrolled, acc 4)"
INLINE = "INT4 ONNX (Loop, acc 4, inline)"


def build(ckpt: Path, work: Path, group_size: int, method: str = "gptq") -> dict[str, Path]:
    """The rows' export folders. MatMulNBits accuracy level 0 computes in fp32 (the level onnxruntime's
    quantizer rows run at); level 4 quantizes activations to int8 per block (edgeloop run's default). The
    INT4 rows keep their weights in model.onnx.data (edgeloop run's default: onnxruntime maps it and frees
    each original once prepacked), and one row inline in model.onnx for the difference."""
    from edgeloop.export import ExportConfig, export_checkpoint
    from edgeloop.quantize import QuantConfig, quantize_checkpoint

    t = time.time()
    rows = {"fp32 ONNX (Loop)": work / "fp32"}
    export_checkpoint(ckpt, rows["fp32 ONNX (Loop)"], ExportConfig(format="fp32"))
    quantize_checkpoint(ckpt, work / "int4-ck", QuantConfig(group_size=group_size, algorithm=method), progress=False)
    for name, ec in ((LOOP0, ExportConfig(external_data=True)), (LOOP, ExportConfig(accuracy_level=4, external_data=True)),
                     (INLINE, ExportConfig(accuracy_level=4, external_data=False)),
                     (UNROLLED, ExportConfig(accuracy_level=4, unroll=True, external_data=True))):
        rows[name] = work / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        export_checkpoint(work / "int4-ck", rows[name], ec)
    from torch_baseline import as_runtime_folder, export_torch, quantize_torch

    try:  # today's toolchain: torch.onnx.export (unrolled by tracing), then MatMulNBitsQuantizer DEFAULT
        fp = export_torch(ckpt, work / "torch-fp32")
        rows["torch.onnx.export + ORT quantizer"] = as_runtime_folder(
            quantize_torch(fp, work / "torch-int4", group_size), rows["fp32 ONNX (Loop)"], "torch-int4")
    except Exception as e:  # reported, not hidden
        print(f"torch.onnx.export baseline failed: {str(e).splitlines()[0][:200]}")
    for algo in ("default", "hqq"):
        rows[f"ORT quantizer {algo.upper()}"] = ort_quantized(work / "fp32", work / f"ort-{algo}", algo, group_size)
    print(f"built the exports in {time.time() - t:.0f} s")
    return rows


# ---- the table ------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt", nargs="?", default=str(ROOT / "models" / "hyperloop-tiny"))
    ap.add_argument("--random-100m", action="store_true")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--method", default=None, help="edgeloop's quantizer: gptq (edgeloop run's default) or rtn; "
                    "default gptq, rtn for --random-100m (random weights: calibration means nothing)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=None, help="decode tokens (default 256; 128 for --random-100m)")
    ap.add_argument("--ppl-tokens", type=int, default=None, help="default 8192; 512 (one window) for --random-100m")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (exports) instead of deleting it")
    ap.add_argument("--torch-probe", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.torch_probe:
        print(json.dumps(torch_probe(a.torch_probe, a.threads, a.prefill, a.decode or 256)))
        return
    decode = a.decode or (128 if a.random_100m else 256)
    ppl_tokens = a.ppl_tokens or (512 if a.random_100m else 8192)

    import torch
    from rich.console import Console
    from rich.table import Table

    from edgeloop.model.checkpoint import load_model, load_tokenizer
    from edgeloop.model.data import corpus_split, encode
    from edgeloop.model.evaluate import perplexity
    from edgeloop.runtime import Runtime
    from edgeloop.runtime.measure import footprint

    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_runtime_"))
    t0 = time.time()
    ckpt = random_100m(work) if a.random_100m else Path(a.ckpt)
    rows = build(ckpt, work, a.group_size, a.method or ("rtn" if a.random_100m else "gptq"))
    r = json.loads((rows["fp32 ONNX (Loop)"] / "manifest.json").read_text())["num_loops"]
    ids = encode(load_tokenizer(ckpt), corpus_split("validation"))[:ppl_tokens]
    bw = memory_bandwidth(a.threads)

    model = load_model(ckpt)
    n_params = sum(p.numel() for p in model.parameters())
    res = {"PyTorch fp32 eager": {**run_torch_probe(ckpt, a.threads, a.prefill, decode), "file_bytes": n_params * 4,
                                  "ppl": perplexity(model, ids)[0],
                                  "weight_bytes": weight_bytes_per_token(rows["fp32 ONNX (Loop)"] / "model.onnx", r)}}
    del model
    for name, folder in rows.items():
        f = footprint(folder, "cpu", a.threads, a.prefill, decode)
        rt = Runtime(folder, threads=a.threads)
        f["ppl"] = rt.perplexity(ids, batch_size=2)[0]
        f["weight_bytes"] = weight_bytes_per_token(folder / "model.onnx", r)
        res[name] = f
        del rt
        print(f"measured {name}")
    for v in res.values():
        v["roofline_tokens_per_s"] = bw / v["weight_bytes"]
        v["roofline_fraction"] = v["decode_tokens_per_s"] / v["roofline_tokens_per_s"]

    pt = res["PyTorch fp32 eager"]
    c = Console(width=200)
    t = Table(title=f"{ckpt.name}: {n_params / 1e6:.1f}M params, r = {r}, {a.threads} threads, prefill {a.prefill} "
                    f"tokens, decode {decode} tokens, ppl on {len(ids):,} validation tokens; memory bandwidth "
                    f"{bw / 1e9:.1f} GB/s (numpy read)")
    for col in ("row", "decode tok/s", "× PT", "prefill ms", "× PT", "file MiB", "× PT", "peak RSS MiB", "× PT",
                "ppl", "drift", "weights MiB/token", "roofline tok/s", "reached"):
        t.add_column(col, justify="left" if col == "row" else "right")
    for name, v in res.items():
        t.add_row(name, f"{v['decode_tokens_per_s']:.1f}",
                  f"{v['decode_tokens_per_s'] / pt['decode_tokens_per_s']:.2f}",
                  f"{v['prefill_ms']:.1f}", f"{v['prefill_ms'] / pt['prefill_ms']:.2f}",
                  f"{v['file_bytes'] / 2**20:.1f}", f"{v['file_bytes'] / pt['file_bytes']:.3f}",
                  f"{v['peak_rss_bytes'] / 2**20:.0f}", f"{v['peak_rss_bytes'] / pt['peak_rss_bytes']:.2f}",
                  f"{v['ppl']:.3f}", f"{100 * (v['ppl'] / pt['ppl'] - 1):+.2f}%", f"{v['weight_bytes'] / 2**20:.1f}",
                  f"{v['roofline_tokens_per_s']:.0f}", f"{100 * v['roofline_fraction']:.0f}%")
    c.print(t)
    loop, un = res[LOOP], res[UNROLLED]
    c.print(f"goals (acc 4 rows): INT4 Loop decode = {loop['decode_tokens_per_s'] / pt['decode_tokens_per_s']:.2f}× PyTorch fp32 "
            f"(goal ≥ 4× at ~100M); Loop ms/token = {un['decode_tokens_per_s'] / loop['decode_tokens_per_s']:.3f}× "
            f"unrolled (goal ≤ 1.05×); INT4 RSS vs its file (goal ≤ 1.3×):")
    m = Table("row", "file MiB", "process peak", "session peak (creation)", "session after creation",
              "session steady (decode)", title=f"RSS ÷ file; session = over a {loop['baseline_rss_bytes'] / 2**20:.0f} "
              "MiB baseline (Python, numpy, onnxruntime imported and started once)")
    for name in (LOOP, INLINE, UNROLLED, LOOP0):
        v = res[name]
        m.add_row(name, f"{v['file_bytes'] / 2**20:.1f}", *(f"{v[k] / v['file_bytes']:.2f}×" for k in (
            "peak_rss_bytes", "session_rss_bytes", "session_after_create_rss_bytes", "session_steady_rss_bytes")))
    c.print(m)
    c.print(f"total {time.time() - t0:.0f} s" + (f"; work folder {work}" if a.keep else ""))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2, default=str))
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
