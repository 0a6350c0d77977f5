"""`edgeloop run`: the main job, every stage in order with sensible defaults, ending in one report.

    CKPT --quantize--> OUT/int4 --export--> OUT/onnx-int4   (INT4, the middle block one Loop)
    CKPT --export----> OUT/onnx-fp32                         (the fp32 export: ratios and a parity control)
    a CKPT in a foreign format (edgeloop.importers) is first imported into OUT/imported
    eval:  perplexity drift of each export vs the fp32 PyTorch reference on the same tokens
    bench: footprint + latency of both exports (fresh subprocesses), num_loops sweep of the INT4 one
    OUT/report.json, OUT/report.md, OUT/sweep.png

Everything a stage needs is checked first; the stages write into a temporary folder beside OUT that is
renamed to OUT at the end (a failure leaves no OUT; nothing resumes: a rerun starts over).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from edgeloop.io import atomic_write_text, check_output_dir


GPTQ_CPU_PARAMS = 1_500_000_000  # past this many parameters GPTQ calibration on CPU takes hours: auto picks RTN


@dataclass
class RunConfig:
    method: str = "auto"  # gptq, rtn, or auto: gptq up to GPTQ_CPU_PARAMS parameters, rtn past them (said so)
    group_size: int | None = None  # None: 128, or the largest of 64 / 32 / 16 that divides every quantized K
    sym: bool = False
    format: str = "matmulnbits"
    accuracy_level: int = 4  # MatMulNBits int8 activations: ~3.5x faster CPU decode, same drift (bench_runtime)
    embedding_bits: int = 8  # the tied embedding / lm_head: +0.01 % drift at 8 bits, +1.1 % at 4 (bench_quantize)
    external_data: bool = True  # mmap'd weights: onnxruntime frees each original once prepacked (bench_runtime)
    ep: str = "cpu"
    eval_tokens: int = 8192
    decode_tokens: int = 256
    prefill_tokens: int = 128
    sweep: bool = True
    threads: int = 0
    eval_text: str | None = None  # UTF-8 text for eval and the sweep (None: the demo corpus's validation split)


def run(ckpt: str | Path, out: str | Path, rc: RunConfig, *, overwrite: bool = False,
        step: Callable[[str], None] = lambda msg: None) -> dict:
    """Every stage into OUT, atomically: whatever the stages need (settings, provider, evaluation text,
    checkpoint, tokenizer, output folder) is checked before anything is written; the stages then write into a
    temporary folder beside OUT that becomes OUT at the end, so a failure anywhere leaves no OUT (an existing
    one, with --overwrite, stays as it was)."""
    from edgeloop.importers import as_checkpoint, detect
    from edgeloop.io import atomic_dir

    ckpt, out = Path(ckpt), Path(out)
    t0 = time.time()
    check_output_dir(out, overwrite)
    if ckpt.exists() and out.resolve() == ckpt.resolve():
        raise ValueError(f"{out}: the output folder must differ from the checkpoint folder")
    plan = preflight(rc)
    foreign = detect(ckpt) is not None
    if not foreign:  # a foreign format is checked by its import, in the temporary folder
        plan.update(check_input(ckpt, rc, plan))
    with atomic_dir(out, overwrite) as tmp:
        src = ckpt
        if foreign:
            src = as_checkpoint(ckpt, tmp / "imported")
            plan.update(check_input(src, rc, plan))
        report = stages(ckpt, src, tmp, out, rc, plan, step)
        report["seconds"] = round(time.time() - t0, 1)
        report = relocate(report, tmp, out)
        atomic_write_text(tmp / "report.json", json.dumps(report, indent=2, default=str) + "\n")
        atomic_write_text(tmp / "report.md", report_md(report))
    return report


def preflight(rc: RunConfig) -> dict:
    """The checks that need no checkpoint: the provider, the method, the evaluation text (--eval-text or the
    demo corpus: both its splits when GPTQ may calibrate on the train split)."""
    from edgeloop.model.data import corpus_split, read_text
    from edgeloop.runtime.session import provider_names

    from edgeloop.quantize import quant_config

    provider_names(rc.ep)  # an unavailable provider fails before the long stages
    if rc.method not in ("auto", "gptq", "rtn"):
        raise ValueError(f"--method {rc.method!r}: gptq, rtn or auto")
    if rc.format not in ("matmulnbits", "qdq"):
        raise ValueError(f"--format {rc.format!r}: matmulnbits or qdq (the INT4 export; fp32 is exported too)")
    if rc.accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"--accuracy-level {rc.accuracy_level}: use 0 (fp32) or 4 (int8 activations)")
    quant_config("rtn", group_size=rc.group_size or 128, sym=rc.sym, embedding_bits=rc.embedding_bits).validate()
    for name in ("eval_tokens", "decode_tokens", "prefill_tokens"):
        if getattr(rc, name) < 2:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(rc, name)}: must be at least 2")
    if rc.threads < 0:
        raise ValueError(f"--threads {rc.threads}: must be 0 (default) or positive")
    text = read_text(rc.eval_text) if rc.eval_text else corpus_split("validation")
    if rc.method != "rtn":
        corpus_split("train")
    return {"text": text}


def check_input(ckpt: Path, rc: RunConfig, plan: dict) -> dict:
    """The checkpoint (config and every tensor header), its tokenizer (GPTQ and eval read text through it; the
    exports copy tokenizer_config.json too), the text's tokens and the quantize settings."""
    from edgeloop.model.checkpoint import CheckpointError, load_tokenizer
    from edgeloop.model.data import encode
    from edgeloop.io import JSONFileError, read_json_object
    from edgeloop.quantize import quant_config
    from edgeloop.quantize.validate import check_checkpoint

    _, cfg, qconf = check_checkpoint(ckpt)
    if qconf is not None:
        raise ValueError(f"{ckpt} is already quantized: `edgeloop run` starts from a float checkpoint")
    tok = load_tokenizer(ckpt, cfg)
    try:
        read_json_object(ckpt / "tokenizer_config.json")
    except JSONFileError as e:
        raise CheckpointError(str(e)) from None
    if len(encode(tok, plan["text"][:200_000])) < 2:
        raise ValueError(f"{rc.eval_text or 'the evaluation text'}: encodes to fewer than 2 tokens")
    method, note = resolve_method(rc.method, cfg)
    group_size = rc.group_size or auto_group_size(cfg)
    extra = {"calib_seq_len": min(256, cfg.max_seq_len)} if method == "gptq" else {}
    qc = quant_config(method, group_size=group_size, sym=rc.sym, embedding_bits=rc.embedding_bits,
                      **extra).validate()
    from edgeloop.export import ExportConfig, export_config

    export_config(cfg, ExportConfig(format=rc.format, accuracy_level=rc.accuracy_level))  # the export's own limits
    return {"cfg": cfg, "method": method, "note": note, "group_size": group_size, "qc": qc}


def stages(source: Path, ckpt: Path, tmp: Path, out: Path, rc: RunConfig, plan: dict,
           step: Callable[[str], None]) -> dict:
    """quantize, export, eval, bench and the sweep of `ckpt` into `tmp` (which becomes `out`)."""
    from edgeloop.export import ExportConfig, export_checkpoint
    from edgeloop.quantize import quantize_checkpoint
    from edgeloop.runtime import Runtime
    from edgeloop.runtime.drift import evaluate_drift, evaluation_ids
    from edgeloop.runtime.measure import footprint, plot_sweep, ratios, speculation, sweep

    timings: dict[str, float] = {}

    def stage(name: str, fn):
        step(name)
        t = time.time()
        result = fn()
        timings[name] = round(time.time() - t, 2)
        return result

    fp32_source = out / "imported" if ckpt != source else source
    quant = stage("quantize", lambda: quantize_checkpoint(ckpt, tmp / "int4", plan["qc"], progress=False))
    target = "webgpu" if rc.ep == "webgpu" else "cpu"  # the export's defaults for where it runs (fused graph)
    exp_int4 = stage("export INT4", lambda: export_checkpoint(
        tmp / "int4", tmp / "onnx-int4", ExportConfig(target=target, format=rc.format, external_data=rc.external_data,
                                                      accuracy_level=rc.accuracy_level), source=out / "int4"))
    exp_fp32 = stage("export fp32", lambda: export_checkpoint(ckpt, tmp / "onnx-fp32", ExportConfig(
        target=target, format="fp32", external_data=rc.external_data), source=fp32_source))
    drift = stage("eval INT4", lambda: evaluate_drift(tmp / "onnx-int4", ckpt, rc.ep, rc.eval_tokens,
                                                      text=rc.eval_text, threads=rc.threads))
    drift_fp32 = stage("eval fp32", lambda: evaluate_drift(tmp / "onnx-fp32", ckpt, rc.ep, rc.eval_tokens,
                                                           text=rc.eval_text, threads=rc.threads))
    bench = {name: stage(f"bench {name}", lambda name=name: footprint(
        tmp / f"onnx-{name}", rc.ep, rc.threads, rc.prefill_tokens, rc.decode_tokens)) for name in ("int4", "fp32")}
    def do_speculation():  # --draft-loops auto on the INT4 export, measured against plain decoding
        from edgeloop.runtime.session import RuntimeInputError

        rt = Runtime(tmp / "onnx-int4", ep=rc.ep, threads=rc.threads)
        try:
            return speculation(rt, "auto", 8, tokens=64)
        except RuntimeInputError as e:  # this export cannot verify exactly (or has no draft depth): say why
            return {"skipped": str(e)}
    spec = stage("self-speculation", do_speculation)
    rows = []
    if rc.sweep:
        def do_sweep():
            rt = Runtime(tmp / "onnx-int4", ep=rc.ep, threads=rc.threads)
            ids = evaluation_ids(tmp / "onnx-int4", rc.eval_text, rc.eval_tokens)
            return sweep(rt, ids, decode_tokens=64, ctx=drift["ctx"])  # the headline's protocol: same ids, windows
        rows = stage("sweep num_loops", do_sweep)
        plot_sweep(rows, tmp / "sweep.png", f"{source.name} INT4: elastic depth")
    method, group_size = plan["method"], plan["group_size"]
    return {"checkpoint": str(source), "out": str(out), "imported": str(fp32_source) if ckpt != source else None,
            "config": {**asdict(rc), "method": method, "group_size": group_size}, "method_note": plan["note"],
            "timings_s": timings, "quantize": _slim(quant), "export": {"int4": exp_int4, "fp32": exp_fp32},
            "eval": {"int4": drift, "fp32": drift_fp32}, "bench": bench, "speculation": spec,
            "int4_over_fp32": ratios(bench["int4"], bench["fp32"]), "sweep": rows}


def relocate(obj, tmp: Path, out: Path):
    """`obj` with every path under the temporary folder `tmp` said as the final `out` (the report is written
    before the rename)."""
    if isinstance(obj, dict):
        return {k: relocate(v, tmp, out) for k, v in obj.items()}
    if isinstance(obj, list):
        return [relocate(v, tmp, out) for v in obj]
    if isinstance(obj, str) and obj.startswith(str(tmp)):
        return str(out) + obj[len(str(tmp)):]
    return obj


def auto_group_size(cfg) -> int:
    """128, or the largest smaller group size that divides the K of every tensor INT4 may take."""
    from edgeloop.model.checkpoint import expected_tensors
    from edgeloop.quantize.config import roles, row_shape

    shapes, table = expected_tensors(cfg), roles(cfg)
    ks = {row_shape(shapes[n], t)[-1] for n, t in table.items() if t.quantizable}
    return next((g for g in (128, 64, 32, 16) if all(k % g == 0 for k in ks)), 128)


def resolve_method(method: str, cfg) -> tuple[str, str | None]:
    """(the quantize algorithm, why it was chosen when `method` is auto)."""
    if method != "auto":
        return method, None
    from edgeloop.model.model import meta_model

    n = sum(p.numel() for p in meta_model(cfg).parameters())
    if n <= GPTQ_CPU_PARAMS:
        return "gptq", None
    return "rtn", (f"rtn: {n / 1e9:.2f}B parameters, past the {GPTQ_CPU_PARAMS / 1e9:g}B up to which GPTQ calibration "
                   f"on CPU is minutes (pass --method gptq to calibrate anyway, or `edgeloop quantize --method gptq "
                   f"--device cuda` on a GPU)")


def _slim(q: dict) -> dict:
    return {k: v for k, v in q.items() if k != "tensors"} if isinstance(q, dict) else q


def _mb(b: float) -> str:
    return f"{b / 1e6:.2f} MB"


def headline(r: dict) -> list[tuple[str, str]]:
    """The report's rows: (what, value)."""
    d, b, x = r["eval"]["int4"], r["bench"], r["int4_over_fp32"]
    p = r["export"]["int4"]["parity"]
    rows = [("quantize", f"{r['config']['method']} INT4, group {r['config']['group_size']}, "
                         f"{'sym' if r['config']['sym'] else 'asym'}, embedding INT{r['config'].get('embedding_bits', 8)}"
                         + (f" ({r['method_note']})" if r.get("method_note") else "")),
            ("export", f"{r['export']['int4']['format']}, Loop = {r['export']['int4']['graph']['loop']}, "
                       f"parity {p['max_abs_err']:.1e} (tol {p['tolerance']:g})"),
            ("perplexity (INT4 / fp32 ref)", f"{d['ppl']:.3f} / {d['reference_ppl']:.3f} ({protocol(d)})"),
            ("drift INT4", f"{d['drift_pct']:+.2f} %"),
            ("drift fp32 export", f"{r['eval']['fp32']['drift_pct']:+.4f} %"),
            ("file", f"{_mb(b['int4']['file_bytes'])} vs {_mb(b['fp32']['file_bytes'])} fp32 "
                     f"({x.get('file_bytes', 0):.3f}×)"),
            ("peak RSS", f"{_mb(b['int4']['peak_rss_bytes'])} vs {_mb(b['fp32']['peak_rss_bytes'])} "
                         f"({x.get('peak_rss_bytes', 0):.3f}×)"),
            ("steady RSS (decode)", f"{_mb(b['int4']['steady_rss_bytes'])} vs {_mb(b['fp32']['steady_rss_bytes'])}"),
            ("KV cache", f"{b['int4']['kv_bytes_per_token']:,} B/token, "
                         f"{_mb(b['int4']['kv_bytes_at_context'])} at {b['int4']['kv_context']} tokens"),
            ("prefill", f"{b['int4']['prefill_ms']:.1f} ms vs {b['fp32']['prefill_ms']:.1f} ms fp32 "
                        f"({r['config']['prefill_tokens']} tokens)"),
            ("decode", f"{b['int4']['decode_tokens_per_s']:.1f} tok/s vs {b['fp32']['decode_tokens_per_s']:.1f} "
                       f"fp32 ({x.get('decode_tokens_per_s', 0):.2f}×)")]
    s = r.get("speculation")
    if s and "skipped" in s:
        rows.append(("self-speculation", f"not run: {s['skipped']}"))
    elif s and s["draft_loops"]:
        rows.append(("self-speculation", f"{s['decode_tokens_per_s']:.1f} tok/s vs {s['plain_decode_tokens_per_s']:.1f} "
                     f"plain ({s['speculative_speedup']:.2f}×) at the best (d, k) = ({s['draft_loops']}, "
                     f"{s['lookahead']}) auto found; {s['acceptance_rate']:.0%} of drafts kept, "
                     + ("tokens identical to plain decoding" if s["identical_tokens"] else "tokens DIFFER")))
    elif s:
        rows.append(("self-speculation", f"auto found no (d, k) faster than plain decoding here (best projected "
                     f"{s['auto']['projected_speedup']:.2f}×)"))
    return rows


def protocol(d: dict) -> str:
    """How a perplexity was measured: the tokens scored, the window and its stride."""
    return f"{d['tokens']:,} tokens, context {d['ctx']}, stride {d['stride']}"


def report_md(r: dict) -> str:
    lines = [f"# edgeloop report: {Path(r['checkpoint']).name}", "",
             f"`edgeloop run {r['checkpoint']} -o {r['out']}` on `{r['config']['ep']}` in {r['seconds']:.0f} s.", "",
             "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in headline(r)]
    if r["sweep"]:
        lines += ["", "## Elastic depth (INT4, num_loops = 1..r)", "",
                  f"Perplexity as in the headline ({protocol(r['sweep'][0])}).", "",
                  "| num_loops | effective layers | perplexity | decode tok/s | KV bytes/token |", "|---|---|---|---|---|"]
        lines += [f"| {s['num_loops']} | {s['effective_layers']} | {s['ppl']:.3f} | {s['decode_tokens_per_s']:.1f} | "
                  f"{s['kv_bytes_per_token']:,} |" for s in r["sweep"]]
        lines += ["", "![sweep](sweep.png)"]
    lines += ["", "Folders: `int4/` (quantized checkpoint), `onnx-int4/` (INT4 export), `onnx-fp32/` (fp32 export).",
              "Full figures: `report.json`.", ""]
    return "\n".join(lines)
