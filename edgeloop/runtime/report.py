"""What the `edgeloop generate` (export folders), `eval` and `bench` commands print: streamed text,
rich progress bars and tables, or one JSON object. The CLI only parses options and calls these."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from edgeloop.textstream import TextStream


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True, disable=not enabled)


def stream_generate(out: Console, folder: Path, prompt: str, max_new_tokens: int, temperature: float, top_k: int,
                    top_p: float, repetition_penalty: float, seed: int, num_loops: Optional[int], ep: str,
                    threads: int, chat: bool = False, exit_threshold: Optional[float] = None,
                    draft_loops: int | str | None = None, lookahead: int = 4, draft_min_prob: float = 0.0,
                    err: Console | None = None, approximate: bool = False) -> None:
    """Continue `prompt` (or answer it under the chat template) with the runtime, printing text as it comes;
    with draft_loops, self-speculation's figures follow on stderr."""
    from edgeloop.chat import prompt_ids
    from edgeloop.runtime import Runtime
    from edgeloop.runtime.session import ContextLengthError

    rt = Runtime(folder, ep=ep, threads=threads, num_loops=num_loops)
    ids = prompt_ids(rt._tok(), folder, prompt, chat)
    if not prompt or not ids:
        raise ValueError("--prompt is empty")
    if len(ids) > rt.ctx:
        raise ContextLengthError(f"the prompt has {len(ids)} tokens; the model's context is {rt.ctx}")
    text = TextStream(rt._tok(), lambda s: out.print(s, end="", highlight=False, soft_wrap=True))
    out.print(rt._tok().decode(ids) if chat else prompt, end="", highlight=False)
    g = rt.generate_ids([ids], max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop=None, seed=seed,
                        on_token=lambda row, t: text.push(t), exit_threshold=exit_threshold, draft_loops=draft_loops,
                        lookahead=lookahead, draft_min_prob=draft_min_prob, approximate=approximate)
    out.print()
    if g.speculation and err is not None:
        err.print(speculation_text(g.speculation), highlight=False)


def speculation_text(s: dict) -> str:
    """One line of self-speculation's figures."""
    auto = s.get("auto") or {}
    head = (f"auto chose d = {s['draft_loops']}, k = {s['lookahead']} (projected {auto['projected_speedup']:.2f}×); "
            if auto else "")
    if not s["draft_loops"]:
        return head + "decoded plainly (no draft depth pays here)"
    return (head + f"self-speculation d = {s['draft_loops']}, k = {s['lookahead']}, R = {s['num_loops']}: "
            f"{s['acceptance_rate']:.0%} of {s['drafted']} drafts kept, {s['accepted_per_verify']:.2f} per "
            f"verification, {s['loops_per_token']:.2f} loops per token")


def run_inspect(out: Console, path: Path, ppl: bool, tokens: int, text: Optional[Path], tensors: bool,
                as_json: bool) -> dict:
    """`edgeloop inspect`: the summary (a table or JSON), then, where the folder has problems, a CheckpointError
    naming the first (the CLI's one line on stderr, exit 2)."""
    from edgeloop.model.checkpoint import CheckpointError
    from edgeloop.model.inspect import summarize
    from edgeloop.quantize.validate import folder_problems

    if (Path(path) / "manifest.json").is_file() and (Path(path) / "model.onnx").is_file():
        raise CheckpointError(f"{path} is an export folder (model.onnx, manifest.json); inspect reads checkpoint "
                              f"folders: `edgeloop bench {path}` or `edgeloop eval {path}` measure an export")
    s = summarize(path, folder_problems(path)[2])
    problems = s["problems"]
    if ppl and not problems:
        from edgeloop.model.checkpoint import load_tokenizer
        from edgeloop.model.data import corpus_split, encode, read_text
        from edgeloop.model.evaluate import perplexity
        from edgeloop.quantize import load_checkpoint

        if tokens < 2:
            raise ValueError(f"--tokens {tokens}: need at least 2")
        ids = encode(load_tokenizer(path), read_text(text) if text else corpus_split("validation"))[:tokens]
        s["val_ppl"], s["val_tokens"] = perplexity(load_checkpoint(path), ids)
    if as_json:
        out.print_json(json.dumps(s if tensors else {k: v for k, v in s.items() if k != "tensors"}))
    else:
        _inspect_tables(out, path, s, ppl and not problems, tensors)
    if problems:
        more = f" (and {len(problems) - 1} more, listed above)" if len(problems) > 1 else ""
        where = "" if str(path) in problems[0] else f"{path}: "
        raise CheckpointError(f"{where}{problems[0]}{more}")
    return s


def _inspect_tables(out: Console, path: Path, s: dict, ppl: bool, tensors: bool) -> None:
    c, t = s["config"], Table(title=f"{path}", show_header=False)
    if s["effective_layers"] is not None:  # a valid config
        t.add_row("layout", f"begin {c['n_begin']} → middle {c['n_middle']} × {c['num_loops']} loops → end {c['n_end']}")
        t.add_row("effective depth", f"{s['effective_layers']} layers ({s['unique_layers']} unique)")
        t.add_row("hyper-connections", f"{c['hc']}, {c['n_streams']} streams" + (
            f", injection {c['injection']}" if c["hc"] == "none" else ""))
        t.add_row("width", f"d={c['d_model']}, heads {c['n_heads']} (kv {c['n_kv_heads']}), mlp {c['mlp']} "
                           f"{c['mlp_hidden']}")
        t.add_row("parameters", f"{s['params_unique']:,} unique / {s['params_effective']:,} effective")
    t.add_row("bytes by dtype", ", ".join(f"{k} {v:,}" for k, v in s["bytes_by_dtype"].items()))
    t.add_row("bytes by role", ", ".join(f"{k} {v:,}" for k, v in s["bytes_by_role"].items()))
    t.add_row("hyper-connection tensors", ", ".join(s["hc_tensors"]) or "none")
    q = s["quantization_config"]
    if isinstance(q, dict):
        t.add_row("quantization", ", ".join(f"{k}={q[k]}" for k in ("quant_method", "bits", "group_size", "sym",
                                                                    "algorithm") if k in q))
    if ppl:
        t.add_row("validation perplexity", f"{s['val_ppl']:.3f} on {s['val_tokens']:,} tokens")
    for i, p in enumerate(s["problems"]):
        t.add_row("problems" if i == 0 else "", p)
    out.print(t)
    if tensors:
        from edgeloop.model.config import HyperloopConfig
        from edgeloop.quantize.config import describe

        mcfg = HyperloopConfig.from_dict(c) if s["effective_layers"] is not None else None
        tt = Table("tensor", "shape", "dtype", "role", "bytes", "INT4 policy")
        for x in s["tensors"]:
            known = mcfg is not None and not s["problems"] and x["role"] != "unknown"
            tt.add_row(x["name"], str(x["shape"]), x["dtype"], x["role"], f"{x['bytes']:,}",
                       describe(x["name"], tuple(x["shape"]), mcfg, q) if known else "-")
        out.print(tt)


def run_eval(out: Console, err: Console, model_dir: Path, reference: Optional[Path], ep: str, tokens: int,
             text: Optional[Path], num_loops: Optional[int], batch_size: int, threads: int, as_json: bool,
             exit_threshold: Optional[float] = None) -> dict:
    """`edgeloop eval`: perplexity of the export vs the fp32 PyTorch reference on the same windows."""
    from edgeloop.runtime.drift import evaluate_drift

    bar = _progress(err, not as_json)
    tasks: dict[str, int] = {}

    def step(what: str, done: int, total: int) -> None:
        if not tasks:
            bar.start()  # only once work starts: an early error stays one line
        if what not in tasks:
            label = {"export": "perplexity (export)", "reference": "perplexity (PyTorch fp32 reference)"}.get(what, what)
            tasks[what] = bar.add_task(label, total=total)
        bar.update(tasks[what], completed=done, total=total)

    try:
        r = evaluate_drift(model_dir, reference, ep, tokens, text, num_loops, batch_size, threads, progress=step,
                           exit_threshold=exit_threshold)
    finally:
        if tasks:
            bar.stop()
    if as_json:
        out.print_json(json.dumps(r))
        return r
    t = Table(title=f"{model_dir} on {ep}", show_header=False)
    t.add_row("perplexity", f"{r['ppl']:.4f}  ({r['format']}, num_loops {r['num_loops']}" + (
        f", exit threshold {r['exit_threshold']:g}: {r['mean_loops']:.2f} loops per token)"
        if r.get("exit_threshold") is not None else ")"))
    t.add_row("reference (fp32 PyTorch)", f"{r['reference_ppl']:.4f}  ({r['reference']})")
    t.add_row("drift", f"{r['drift_abs']:+.4f} ({r['drift_pct']:+.3f}%)")
    t.add_row("tokens", f"{r['tokens']:,} scored from {r['text']}; windows of {r['ctx']}, stride {r['stride']}")
    if r.get("kv_cache"):
        k = r["kv_cache"]
        parts = [f"decode perplexity {k['decode_ppl']:.4f} vs {k['reference_decode_ppl_fp32_cache']:.4f} with an fp32 "
                 f"cache ({k['drift_vs_fp32_cache_pct']:+.3f}%)"]
        if "fp16_vs_fp32_cache_pct" in k:
            parts.append(f"fp16 vs fp32 KV {k['fp16_vs_fp32_cache_pct']:+.3f}%")
        if "shared_vs_per_step_pct" in k:
            parts.append(f"shared vs per-step {k['shared_vs_per_step_pct']:+.3f}%")
        t.add_row(f"KV cache ({k['policy']}, {k['dtype']})", "; ".join(parts) + f" (PyTorch where not the export; "
                  f"{k['tokens']} tokens one at a time through the cache)")
    if r.get("placement"):
        t.add_row("placement", placement_text(r["placement"]))
    out.print(t)
    return r


def placement_text(placement: dict) -> str:
    """'WebGpuExecutionProvider 606 nodes (MatMulNBits 42, ...); CPUExecutionProvider 21 nodes (Loop 1, ...)'."""
    def ops(v: dict) -> str:
        key = ("MatMulNBits", "Loop", "If", "MemcpyToHost", "MemcpyFromHost")  # the ones that tell where work ran
        top = [(op, v["ops"][op]) for op in key if op in v["ops"]] + \
            sorted(((o, n) for o, n in v["ops"].items() if o not in key), key=lambda kv: -kv[1])[:2]
        return ", ".join(f"{op} {n}" for op, n in top)
    return "; ".join(f"{p} {v['nodes']} nodes ({ops(v)})" for p, v in placement.items())


def _mb(b: float) -> str:
    return f"{b / 2**20:,.2f} MiB"


def run_bench(out: Console, err: Console, model_dir: Path, ep: str, threads: int, prefill_tokens: int,
              decode_tokens: int, context: Optional[int], num_loops: Optional[int], reference: Optional[Path],
              sweep: bool, plot: Optional[Path], sweep_tokens: int, text: Optional[Path], as_json: bool,
              model_file: str = "model.onnx", exit_threshold: Optional[float] = None,
              draft_loops: int | str | None = None, lookahead: int = 4, approximate: bool = False) -> dict:
    """`edgeloop bench`: footprint and latency (fresh subprocess), optionally vs a reference export, and
    the num_loops sweep (table + PNG) and, for an exit-gated export, the exit-threshold sweep (PLOT-exit.png)."""
    from edgeloop.runtime.measure import (footprint, plot_sweep, plot_threshold_sweep, ratios, sweep as run_sweep,
                                          threshold_sweep)

    with err.status("measuring in a fresh process", spinner="dots") if not as_json else contextlib.nullcontext():
        r = footprint(model_dir, ep, threads, prefill_tokens, decode_tokens, num_loops, context, model_file=model_file,
                      exit_threshold=exit_threshold, draft_loops=draft_loops, lookahead=lookahead,
                      approximate=approximate)
        if reference is not None:
            ref = footprint(reference, ep, threads, prefill_tokens, decode_tokens, None, context)
            r["reference"] = {"path": str(reference), **{k: ref[k] for k in ref if not isinstance(ref[k], dict)}}
            r["ratio_vs_reference"] = ratios(r, ref)
    if sweep or plot is not None:
        from edgeloop.runtime import Runtime
        from edgeloop.runtime.drift import evaluation_ids

        rt = Runtime(model_dir, ep=ep, threads=threads, model_file=model_file)
        ids = evaluation_ids(model_dir, text, sweep_tokens)
        with _progress(err, not as_json) as bar:
            task = bar.add_task("num_loops sweep", total=None)
            r["sweep"] = run_sweep(rt, ids, progress=lambda d, t: bar.update(task, completed=d, total=t))
            if rt.gated:
                task = bar.add_task("exit-threshold sweep", total=None)
                r["threshold_sweep"] = threshold_sweep(rt, ids, progress=lambda d, t: bar.update(task, completed=d,
                                                                                                 total=t))
        if plot is not None:
            r["plot"] = str(plot_sweep(r["sweep"], plot, f"{model_dir.name}: elastic depth on {ep}"))
            if "threshold_sweep" in r:
                exit_png = Path(plot).with_name(Path(plot).stem + "-exit.png")
                r["threshold_plot"] = str(plot_threshold_sweep(r["threshold_sweep"], exit_png,
                                                               f"{model_dir.name}: early exit on {ep}"))
    if as_json:
        out.print_json(json.dumps(r))
        return r
    rr = r.get("ratio_vs_reference", {})
    t = Table("figure", "value", *(["÷ reference"] if reference else []), title=f"{model_dir} on {ep}")

    def row(name: str, key: str, text: str) -> None:
        t.add_row(name, text, *([f"{rr[key]:.3f}×" if key in rr else "-"] if reference else []))

    dtypes = ", ".join(f"{k} {_mb(v)}" for k, v in r["bytes_by_dtype"].items())
    row("file size", "file_bytes", f"{_mb(r['file_bytes'])} {', '.join(r['files'])} ({dtypes})")
    row("peak RSS, session creation", "peak_rss_bytes", f"{_mb(r['peak_rss_bytes'])} (session adds "
        f"{_mb(r['session_rss_bytes'])}, {r['session_rss_bytes'] / r['file_bytes']:.2f}× the file, over a "
        f"{_mb(r['baseline_rss_bytes'])} baseline: Python + onnxruntime started)")
    row("steady RSS, decoding", "steady_rss_bytes", f"{_mb(r['steady_rss_bytes'])} over {r['decode_tokens']} tokens "
        f"(session {_mb(r['session_steady_rss_bytes'])}, {r['session_steady_rss_bytes'] / r['file_bytes']:.2f}× the file)")
    row("KV cache per token", "kv_bytes_per_token", f"{r['kv_bytes_per_token']:,} B "
        f"({_mb(r['kv_bytes_at_context'])} at {r['kv_context']} tokens)")
    row("prefill", "prefill_ms", f"{r['prefill_ms']:.2f} ms for {r['prefill_tokens']} tokens")
    row("decode", "decode_tokens_per_s", f"{r.get('plain_step_decode_tokens_per_s', r['decode_tokens_per_s']):.1f} tokens/s "
        f"({r['decode_ms_per_token']:.2f} ms/token)" + (f"; exit threshold {r['exit_threshold']:g}, "
                                                         f"{r['mean_loops']:.2f} loops per token"
                                                         if r.get("exit_threshold") is not None else ""))
    if draft_loops is not None:
        t.add_row("self-speculation", f"{r['decode_tokens_per_s']:.1f} tokens/s vs {r['plain_decode_tokens_per_s']:.1f} "
                  f"plain ({r['speculative_speedup']:.2f}×; first to last of {r['speculative_tokens']} tokens, "
                  f"median of 3 interleaved): d = {r['draft_loops']}, k = {r['lookahead']}, "
                  f"{r['acceptance_rate']:.0%} kept, {r['accepted_per_verify']:.2f} per verification, "
                  f"{r['loops_per_token']:.2f} loops per token"
                  + ("" if r["identical_tokens"] else "; tokens differ from plain decoding"),
                  *([""] if reference else []))
    t.add_row("device memory", str(r["device_memory_note"]), *([""] if reference else []))
    if r.get("placement"):
        t.add_row("placement", placement_text(r["placement"]), *([""] if reference else []))
    out.print(t)
    if "sweep" in r:
        s = Table("num_loops", "effective layers", "perplexity", "decode tokens/s", "KV B/token",
                  title=f"elastic depth ({r['sweep'][0]['tokens']:,} tokens)")
        for x in r["sweep"]:
            s.add_row(str(x["num_loops"]), str(x["effective_layers"]), f"{x['ppl']:.3f}",
                      f"{x['decode_tokens_per_s']:.1f}", f"{x['kv_bytes_per_token']:,}")
        out.print(s)
        if "plot" in r:
            out.print(f"plot: {r['plot']}")
    if "threshold_sweep" in r:
        s = Table("exit threshold", "perplexity", "loops per scored token", "decode tokens/s", "loops per decoded token",
                  title="early exit (the Loop stops once every token has exited)")
        for x in r["threshold_sweep"]:
            s.add_row(f"{x['exit_threshold']:g}", f"{x['ppl']:.3f}", f"{x['mean_loops']:.2f}",
                      f"{x['decode_tokens_per_s']:.1f}", f"{x['decode_mean_loops']:.2f}")
        out.print(s)
        if "threshold_plot" in r:
            out.print(f"plot: {r['threshold_plot']}")
    return r

