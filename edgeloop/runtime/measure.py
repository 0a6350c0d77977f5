"""Memory footprint and latency of an export, measured in a fresh subprocess for clean numbers, and the
elastic-depth sweep (perplexity and decode speed per loop count) with its plot.

    footprint(folder, ep="cpu") -> {"file_bytes", "peak_rss_bytes", "steady_rss_bytes",
        "kv_bytes_per_token", "prefill_ms", "decode_tokens_per_s", "ep", ...}
    sweep(rt, ids) -> [{"num_loops", "ppl", "decode_tokens_per_s", ...} for num_loops in 1..r]
    speculation(rt, d, k) -> {"decode_tokens_per_s", "plain_decode_tokens_per_s", "acceptance_rate", ...}

Run as `python -m edgeloop.runtime.measure FOLDER --ep cpu ...` it is the probe itself: it prints
one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeloop.kv import Layout
from edgeloop.runtime.session import RuntimeInputError, read_manifest

GPU_EPS = ("cuda", "webgpu", "coreml", "nnapi", "qnn", "dml")


def file_bytes(folder: Path, model_file: str = "model.onnx") -> dict[str, Any]:
    """Bytes on disk of the model file the session loads (model.onnx with its external data, or model.ort),
    and of the initializers by dtype (from the manifest)."""
    files = {p.name: p.stat().st_size for p in sorted(folder.glob(f"{model_file}*")) if p.is_file()}
    m = read_manifest(folder)
    return {"file_bytes": sum(files.values()), "files": files,
            "bytes_by_dtype": dict((m.get("graph") or {}).get("initializer_bytes", {}))}


def kv_bytes_per_token(manifest: dict, num_loops: int | None = None) -> int:
    """Keys + values one token adds to the cache of one sequence, over the layers that run (edgeloop.kv)."""
    return Layout.of_manifest(manifest).bytes_per_token(num_loops)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    """This process's RSS high-water mark. On Linux VmHWM (it starts afresh at exec, unlike ru_maxrss,
    which keeps the forking parent's peak)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _warm_onnxruntime() -> None:
    """Create and drop a session on identity.onnx (one Identity node, shipped beside this file), so that
    onnxruntime's one-time start-up (code pages, kernel registries, thread pool) lands in the baseline,
    not in the model's share of RSS."""
    import onnxruntime as ort

    ort.InferenceSession(str(Path(__file__).with_name("identity.onnx")), providers=["CPUExecutionProvider"])


def device_memory(ep: str) -> dict[str, Any]:
    """Device memory where it can be read; a plain statement where it cannot."""
    if ep == "cpu":
        return {"device_memory_bytes": None, "device_memory_note": "cpu: the model lives in host memory (RSS)"}
    if ep == "cuda":
        try:
            r = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=20)
            for line in r.stdout.splitlines():
                pid, mib = (s.strip() for s in line.split(","))
                if int(pid) == os.getpid():
                    return {"device_memory_bytes": int(mib) * 2**20,
                            "device_memory_note": "cuda: read with nvidia-smi for this process"}
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
        return {"device_memory_bytes": None, "device_memory_note": "cuda: device memory could not be read "
                "(onnxruntime does not report it and nvidia-smi gave no figure for this process)"}
    return {"device_memory_bytes": None, "device_memory_note": f"{ep}: onnxruntime exposes no device-memory "
            "figure for this provider; the RSS numbers cover host memory only"}


def decode_rates(stamps: list[float]) -> dict[str, float]:
    """From the times each token arrived (the first closes the prefill): decode_tokens_per_s from the
    MEDIAN step time (robust to other processes' bursts on a shared machine) and the mean-based rate."""
    steps = np.diff(stamps)
    med = float(np.median(steps))
    return {"decode_tokens_per_s": 1.0 / max(med, 1e-9), "decode_ms_per_token": 1000 * med,
            "decode_tokens_per_s_mean": len(steps) / max(float(steps.sum()), 1e-9)}


def probe(folder: str, ep: str = "cpu", threads: int = 0, prefill_tokens: int = 128, decode_tokens: int = 256,
          num_loops: int | None = None, mmap: bool = True, prepack: bool = True, repeats: int = 3,
          model_file: str = "model.onnx", exit_threshold: float | None = None,
          draft_loops: int | str | None = None, lookahead: int = 4, approximate: bool = False) -> dict:
    """The measurements, in THIS process (footprint() runs it in a fresh one): peak RSS while the session
    is created, prefill ms for `prefill_tokens` (median of `repeats`), decode tokens/s and RSS during a
    greedy decode of `decode_tokens` (clipped to the context). RSS figures are the whole process's;
    `session_*` ones are over the baseline: Python, numpy and onnxruntime imported and started once.
    draft_loops: the decode is measured with self-speculation too (speculation(): decode_tokens_per_s is then
    its rate, plain_decode_tokens_per_s the plain one measured the same way)."""
    import onnxruntime  # noqa: F401  libraries imported before the baseline: they are not the model
    import tokenizers  # noqa: F401

    from edgeloop.runtime.runtime import Runtime

    imported = _rss()
    _warm_onnxruntime()
    base = _rss()
    t = time.perf_counter()
    rt = Runtime(folder, ep=ep, threads=threads, num_loops=num_loops, mmap=mmap, prepack=prepack,
                 model_file=model_file)
    create_s = time.perf_counter() - t
    after_create = _rss()
    peak_create = max(_peak_rss(), after_create)
    rng = np.random.default_rng(0)
    n = max(1, min(prefill_tokens, rt.ctx))
    x = rng.integers(0, rt.vocab_size, (1, n), dtype=np.int64)
    feeds = (x, np.ones_like(x), np.arange(n, dtype=np.int64)[None], rt.empty_past(1))
    q = rt._threshold(exit_threshold) if rt.gated else None
    rt.forward(*feeds, rt.num_loops, q)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        rt.forward(*feeds, rt.num_loops, q)
        times.append(time.perf_counter() - t)
    prompt = rng.integers(0, rt.vocab_size, min(16, rt.ctx - 1)).tolist()
    steps = max(2, min(decode_tokens + 1, rt.ctx - len(prompt) + 1))  # the first token comes from the prefill
    stamps: list[float] = []
    rss: list[int] = []

    def on_token(row: int, tok: int) -> None:
        stamps.append(time.perf_counter())
        rss.append(_rss())

    rt.generate_ids([prompt], min(8, steps), stop=(), exit_threshold=q)  # warm the decode shapes
    gen = rt.generate_ids([prompt], steps, stop=(), on_token=on_token, exit_threshold=q)
    decoded = len(stamps) - 1  # the first stamp closes the prefill
    steady = rss[len(rss) // 2:] or rss
    out = {"ep": ep, "providers": rt.session.get_providers(), "threads": threads, "num_loops": rt.num_loops,
           "import_rss_bytes": imported, "baseline_rss_bytes": base, "peak_rss_bytes": peak_create,
           "after_create_rss_bytes": after_create, "session_rss_bytes": peak_create - base,
           "session_after_create_rss_bytes": after_create - base, "session_create_s": round(create_s, 4),
           "steady_rss_bytes": int(np.median(steady)), "session_steady_rss_bytes": int(np.median(steady)) - base,
           "decode_peak_rss_bytes": max(rss),
           "prefill_tokens": n, "prefill_ms": 1000 * float(np.median(times)),
           "decode_tokens": decoded, **decode_rates(stamps),
           "context": rt.ctx, "mmap": mmap, "prepack": prepack, "model_file": model_file,
           "exit_threshold": q, "mean_loops": float(np.mean(gen.loops[0][1:] or gen.loops[0]))}
    if draft_loops is not None:  # decode_tokens_per_s becomes the speculative rate; the median step's stays here
        out["plain_step_decode_tokens_per_s"] = out["decode_tokens_per_s"]
        out.update(speculation(rt, draft_loops, lookahead, decode_tokens, exit_threshold=q, approximate=approximate))
    out["process_peak_rss_bytes"] = _peak_rss()
    out["placement"] = rt.placement() if ep != "cpu" else None  # after the measurements: profiling is slow
    out.update(device_memory(ep))
    return out


def footprint(folder: str | os.PathLike, ep: str = "cpu", threads: int = 0, prefill_tokens: int = 128,
              decode_tokens: int = 256, num_loops: int | None = None, context: int | None = None,
              mmap: bool = True, prepack: bool = True, timeout: float = 1800, model_file: str = "model.onnx",
              exit_threshold: float | None = None, draft_loops: int | str | None = None, lookahead: int = 4,
              approximate: bool = False) -> dict:
    """bench's numbers: probe() in a fresh subprocess plus file bytes and the KV-cache size (per token and
    at `context` tokens, default the model's context)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    from edgeloop.runtime.session import provider_names

    for flag, v in (("--prefill-tokens", prefill_tokens), ("--decode-tokens", decode_tokens), ("--context", context)):
        if v is not None and v < 1:  # checked here: the child would clip them silently
            raise RuntimeInputError(f"{flag} {v}: must be at least 1")
    if threads < 0:
        raise RuntimeInputError(f"--threads {threads}: must be 0 (default) or positive")

    provider_names(ep)  # an unavailable EP fails here, in one line, not in the child
    if not (folder / model_file).is_file():
        raise RuntimeInputError(f"{folder}: no {model_file} (export with --ort for the ORT format)")
    cmd = [sys.executable, "-m", "edgeloop.runtime.measure", str(folder), "--ep", ep, "--threads", str(threads),
           "--prefill-tokens", str(prefill_tokens), "--decode-tokens", str(decode_tokens)]
    if num_loops is not None:
        cmd += ["--num-loops", str(num_loops)]
    if not mmap:
        cmd.append("--no-mmap")
    if not prepack:
        cmd.append("--no-prepack")
    cmd += ["--model-file", model_file]
    if exit_threshold is not None:
        cmd += ["--exit-threshold", str(exit_threshold)]
    if draft_loops is not None:
        cmd += ["--draft-loops", str(draft_loops), "--lookahead", str(lookahead)] + \
            (["--draft-approximate"] if approximate else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("error: ")
        raise RuntimeInputError(f"the measurement subprocess failed: {last}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out.update(file_bytes(folder, model_file))
    ctx = context or manifest["max_seq_len"]
    out["kv_bytes_per_token"] = kv_bytes_per_token(manifest, num_loops)
    out["kv_context"] = ctx
    out["kv_bytes_at_context"] = out["kv_bytes_per_token"] * ctx
    out["format"] = manifest.get("format")
    out["unroll"] = manifest.get("unroll")
    return out


RATIO_KEYS = ("file_bytes", "peak_rss_bytes", "steady_rss_bytes", "session_rss_bytes", "kv_bytes_per_token",
              "prefill_ms", "decode_tokens_per_s")


def ratios(a: dict, b: dict) -> dict[str, float]:
    """a / b for each footprint and latency figure (e.g. INT4 over fp32)."""
    return {k: a[k] / b[k] for k in RATIO_KEYS if k in a and k in b and b[k]}


def decode_speed(rt, tokens: int = 64, num_loops: int | None = None, exit_threshold: float | None = None,
                 loops_out: list | None = None) -> float:
    """Greedy decode tokens/s in this process (after a short warm-up; median step), from a fixed 16-token
    prompt. loops_out: receives the loops each decoded token ran."""
    prompt = np.random.default_rng(1).integers(0, rt.vocab_size, min(16, rt.ctx - 1)).tolist()
    tokens = max(2, min(tokens + 1, rt.ctx - len(prompt) + 1))
    stamps: list[float] = []
    rt.generate_ids([prompt], 4, stop=(), num_loops=num_loops, exit_threshold=exit_threshold)
    g = rt.generate_ids([prompt], tokens, stop=(), num_loops=num_loops, exit_threshold=exit_threshold,
                        on_token=lambda b, t: stamps.append(time.perf_counter()))
    if loops_out is not None:
        loops_out.extend(g.loops[0][1:])  # the first token comes from the prefill
    return decode_rates(stamps)["decode_tokens_per_s"]


SPEC_PROMPT = "And it came to pass in those days, that there went out a decree from Caesar Augustus"


def first_to_last_rate(rt, prompt: list[int], n: int, **generate) -> tuple[float, object]:
    """(tokens/s, the Generation) of a greedy generation of n tokens with no stop token: the n - 1 tokens
    after the first (which the prefill gives) over the time from the first to the last."""
    stamps: list[float] = []
    g = rt.generate_ids([prompt], n, stop=(), on_token=lambda b, t: stamps.append(time.perf_counter()), **generate)
    return (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9), g


def speculation(rt, draft_loops: int | str, lookahead: int, tokens: int = 128, rounds: int = 3,
                num_loops: int | None = None, exit_threshold: float | None = None, approximate: bool = False) -> dict:
    """Self-speculative against plain greedy decoding of the same prompt (SPEC_PROMPT, or random ids without
    a tokenizer), in this process, `rounds` interleaved rounds, medians. A rate is the new tokens after the
    first (which the prefill gives) over the time from the first to the last: speculation delivers tokens in
    bursts, so a median step would mean nothing. draft_loops "auto": calibrated by each generation before its
    first token (not timed), the choice and the lookahead it ended with reported. Returns decode_tokens_per_s
    (speculative), plain_decode_tokens_per_s, speculative_speedup, acceptance_rate, accepted_per_verify, loops_per_token, draft_loops, lookahead,
    identical_tokens (greedy: the same tokens as plain decoding) and, for auto, its calibration."""
    if rt.tokenizer is not None:
        prompt = rt.encode(SPEC_PROMPT).tolist()[: rt.ctx // 4]
    else:
        prompt = np.random.default_rng(1).integers(0, rt.vocab_size, min(16, rt.ctx // 4)).tolist()
    n = max(2, min(tokens + 1, rt.ctx - len(prompt)))
    kw = dict(num_loops=num_loops, exit_threshold=exit_threshold)

    def timed(**spec) -> tuple[float, object]:
        return first_to_last_rate(rt, prompt, n, **kw, **spec)

    spec = dict(draft_loops=draft_loops, lookahead=lookahead, approximate=approximate) if draft_loops else {}
    timed(**spec)  # warm both paths' shapes
    plain, fast, g, ref = [], [], None, None
    for _ in range(rounds):
        rate, ref = timed()
        plain.append(rate)
        rate, g = timed(**spec)
        fast.append(rate)
    st = g.speculation or {}
    auto = {k: v for k, v in st["auto"].items() if k != "table"} if st.get("auto") else None
    if auto:  # what auto chose in the last round (the lookahead it ended with)
        draft_loops, lookahead = auto["draft_loops"], auto.get("lookahead_used", auto["lookahead"])
    p, f = float(np.median(plain)), float(np.median(fast))
    return {"decode_tokens_per_s": f, "plain_decode_tokens_per_s": p, "speculative_speedup": f / p,
            "draft_loops": draft_loops, "lookahead": lookahead, "speculative_tokens": n - 1,
            "acceptance_rate": st.get("acceptance_rate", 0.0), "accepted_per_verify": st.get("accepted_per_verify", 0.0),
            "loops_per_token": st.get("loops_per_token", float(rt._loops(num_loops))),
            "identical_tokens": g.tokens == ref.tokens, "auto": auto}


def sweep_loops(r: int, max_loops: int) -> list[int]:
    """The loop counts a sweep visits: 1..max_loops when that is at most 8, else the powers of two up to
    max_loops, and r."""
    if max_loops <= 8:
        return list(range(1, max_loops + 1))
    return sorted({2 ** i for i in range(max_loops.bit_length()) if 2 ** i <= max_loops} | {r})


def sweep(rt, ids: np.ndarray, decode_tokens: int = 64, batch_size: int = 4, progress=None,
          ctx: int | None = None) -> list[dict]:
    """Perplexity on `ids` (windows of `ctx`, default the export's context, stride ctx // 2) and decode
    tokens/s per loop count (sweep_loops; needs the num_loops input)."""
    if not rt.has_num_loops:
        raise RuntimeInputError(f"{rt.folder}: an unrolled export has no num_loops input, so no sweep")
    rows, loops = [], sweep_loops(rt.r, rt.max_loops)
    for i, L in enumerate(loops, 1):
        ppl, n = rt.perplexity(ids, ctx=ctx, batch_size=batch_size, num_loops=L)
        rows.append({"num_loops": L, "effective_layers": rt.n_begin + L * rt.n_middle + rt.n_end, "ppl": ppl,
                     "tokens": n, "ctx": ctx or rt.ctx, "stride": (ctx or rt.ctx) // 2, "decode_tokens_per_s": decode_speed(rt, decode_tokens, L),
                     "kv_bytes_per_token": rt.kv_bytes_per_token(L)})
        if progress is not None:
            progress(i, len(loops))
    return rows


THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)


def threshold_sweep(rt, ids: np.ndarray, thresholds=THRESHOLDS, decode_tokens: int = 64, batch_size: int = 4,
                    progress=None) -> list[dict]:
    """An exit-gated export's early exit as a dial: perplexity on `ids`, the mean loops a scored token ran,
    decode tokens/s and the mean loops a decoded token ran, per exit threshold."""
    if not rt.gated:
        raise RuntimeInputError(f"{rt.folder}: this export has no exit gate, so no threshold sweep")
    rows = []
    for i, q in enumerate(thresholds, 1):
        ppl, n = rt.perplexity(ids, batch_size=batch_size, exit_threshold=q)
        scored = float(np.mean(rt.scored_loops))
        decoded: list[int] = []
        speed = decode_speed(rt, decode_tokens, exit_threshold=q, loops_out=decoded)
        rows.append({"exit_threshold": q, "ppl": ppl, "tokens": n, "mean_loops": scored,
                     "decode_tokens_per_s": speed, "decode_mean_loops": float(np.mean(decoded))})
        if progress is not None:
            progress(i, len(thresholds))
    return rows


def _plot(x: list, ppl: list, speed: list, xlabel: str, title: str, path, notes: list[str] | None = None,
          xticks: bool = False) -> Path:
    """PNG: perplexity (left axis, blue, optional notes at the points) and decode tokens/s (right, orange)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(x, ppl, "o-", color="tab:blue", label="perplexity")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity", color="tab:blue")
    if xticks:
        ax.set_xticks(x)
    for xi, yi, note in zip(x, ppl, notes or []):
        ax.annotate(note, (xi, yi), fontsize=7, textcoords="offset points", xytext=(0, 6), ha="center")
    ax2 = ax.twinx()
    ax2.plot(x, speed, "s--", color="tab:orange", label="decode tokens/s")
    ax2.set_ylabel("decode tokens/s", color="tab:orange")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_threshold_sweep(rows: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """PNG: perplexity (with the mean loops per token) and decode tokens/s against the exit threshold."""
    return _plot([r["exit_threshold"] for r in rows], [r["ppl"] for r in rows], [r["decode_tokens_per_s"] for r in rows],
                 "exit threshold q (>= 1: never early)", title or "early exit: quality vs speed", path,
                 [f"{r['mean_loops']:.2f} loops" for r in rows])


def plot_sweep(rows: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """PNG: perplexity (left axis) and decode tokens/s (right axis) against num_loops."""
    return _plot([r["num_loops"] for r in rows], [r["ppl"] for r in rows], [r["decode_tokens_per_s"] for r in rows],
                 "num_loops (elastic depth)", title or "elastic depth: quality vs speed", path, xticks=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="edgeloop runtime probe: prints one JSON object")
    p.add_argument("folder")
    p.add_argument("--ep", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--prefill-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=256)
    p.add_argument("--num-loops", type=int, default=None)
    p.add_argument("--no-mmap", action="store_true")
    p.add_argument("--no-prepack", action="store_true")
    p.add_argument("--model-file", default="model.onnx")
    p.add_argument("--exit-threshold", type=float, default=None)
    p.add_argument("--draft-loops", default=None)
    p.add_argument("--lookahead", type=int, default=4)
    p.add_argument("--draft-approximate", action="store_true")
    a = p.parse_args(argv)
    try:
        d = a.draft_loops if a.draft_loops in (None, "auto") else int(a.draft_loops)
        res = probe(a.folder, a.ep, a.threads, a.prefill_tokens, a.decode_tokens, a.num_loops,
                    not a.no_mmap, not a.no_prepack, model_file=a.model_file, exit_threshold=a.exit_threshold,
                    draft_loops=d, lookahead=a.lookahead, approximate=a.draft_approximate)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
