"""What the Loop boundary costs on the WebGPU provider (run by hand), side by side in one run:

  python benchmarks/bench_webgpu.py [CKPT] [--tokens 16] [--software]

The INT4 Loop export and the INT4 unrolled export of the same checkpoint, decoded greedily on the CPU
provider and on WebGPU: ms per token (median step), and the Loop / unrolled ratio on each provider.
WebGPU has no Loop kernel: the Loop node runs on the CPU provider and its body's nodes on the GPU, so
the loop state crosses host <-> device at every iteration; the unrolled export has no such crossing.
Also the nodes per provider (profiling) and the host <-> device copies onnxruntime inserted.
`--software` allows a software adapter (Mesa lavapipe): the ratios there describe an emulated GPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def ms_per_token(rt, prompt: list[int], tokens: int) -> float:
    stamps: list[float] = []
    rt.generate_ids([prompt], tokens + 1, stop=(), on_token=lambda row, tok: stamps.append(time.perf_counter()))
    return 1000 * statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt", nargs="?", default=str(ROOT / "models" / "hyperloop-tiny"))
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--software", action="store_true", help="allow a software adapter (lavapipe)")
    a = ap.parse_args()
    if a.software:
        from edgeloop.runtime.plugins import allow_software_adapter

        allow_software_adapter()
    from rich.console import Console
    from rich.table import Table

    from edgeloop.export import ExportConfig, export_checkpoint
    from edgeloop.quantize import QuantConfig, quantize_checkpoint
    from edgeloop.runtime import Runtime
    from edgeloop.runtime.plugins import device_description, plugin_device

    dev = device_description(plugin_device("webgpu"))
    work = Path(tempfile.mkdtemp(prefix="bench_webgpu_"))
    quantize_checkpoint(a.ckpt, work / "int4", QuantConfig(), progress=False)
    folders = {"Loop": work / "loop", "unrolled": work / "unrolled"}
    for name, folder in folders.items():
        export_checkpoint(work / "int4", folder, ExportConfig(unroll=name == "unrolled"))
    prompt = list(range(5, 21))
    res: dict[tuple[str, str], float] = {}
    placement = {}
    for ep in ("cpu", "webgpu"):
        rts = {n: Runtime(f, ep=ep, threads=1) for n, f in folders.items()}
        for n, rt in rts.items():
            ms_per_token(rt, prompt, 2)  # warm-up (shader compilation on WebGPU)
        for _ in range(a.rounds):  # interleaved rounds, best of each
            for n, rt in rts.items():
                res[ep, n] = min(res.get((ep, n), float("inf")), ms_per_token(rt, prompt, a.tokens))
        if ep == "webgpu":
            placement = {n: rt.placement() for n, rt in rts.items()}
    c = Console()
    t = Table(title=f"INT4 decode, {a.tokens} tokens after a {len(prompt)}-token prompt, best of {a.rounds} "
                    f"interleaved rounds; WebGPU device: {dev}")
    for col in ("provider", "Loop ms/token", "unrolled ms/token", "Loop ÷ unrolled"):
        t.add_column(col)
    for ep in ("cpu", "webgpu"):
        t.add_row(ep, f"{res[ep, 'Loop']:.2f}", f"{res[ep, 'unrolled']:.2f}",
                  f"{res[ep, 'Loop'] / res[ep, 'unrolled']:.3f}×")
    c.print(t)
    for n, p in placement.items():
        c.print(f"{n} on webgpu: " + "; ".join(
            f"{prov}: {v['nodes']} nodes ({', '.join(f'{op} {k}' for op, k in v['ops'].items() if op in ('Loop', 'If', 'MatMulNBits', 'MemcpyToHost', 'MemcpyFromHost'))})"
            for prov, v in p.items()))
    c.print(f"work folder: {work}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
