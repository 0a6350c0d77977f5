"""The `edgeloop` command: wires each subcommand to its pipeline stage. Errors are one line, exit 2
(set EDGELOOP_DEBUG=1 for the traceback)."""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from edgeloop.cli_values import (APPROX_HELP, DRAFT_HELP, GRAPH, K_HELP, LOOPS, PANELS, PARITY,
                                 draft_loops as _draft_loops, ints as _ints, opt as _opt, ordered_group)

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True, cls=ordered_group(),
                  help="edgeloop: INT4 deployment of looped (Hyperloop) transformers. Start with `edgeloop run`.")
out = Console()
err = Console(stderr=True)


def _command_line() -> str:
    """The command as recorded in a model card: what reproduces the result (--overwrite does not change it)."""
    return "edgeloop " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a != "--overwrite")


@app.command(rich_help_panel=PANELS["train"])
def train(
    out_dir: Path = typer.Option(..., "-o", "--out", help="checkpoint folder to write"),
    config: str = typer.Option("hyperloop-tiny", help="a preset name or a config.json path"),
    steps: int = typer.Option(1000), batch_size: int = typer.Option(8), seq_len: int = typer.Option(512),
    lr: float = typer.Option(3e-3), warmup: int = typer.Option(50), seed: int = typer.Option(0),
    val_every: int = typer.Option(200), val_tokens: int = typer.Option(4096),
    save_every: int = typer.Option(100, help="steps between resumable training-state saves"),
    text: Optional[list[Path]] = typer.Option(None, help="UTF-8 text files (default: the KJV demo corpus)"),
    tokenizer: Optional[Path] = typer.Option(None, help="folder with tokenizer.json (default: train one)"),
    dtype: str = typer.Option("float16", help="stored dtype: float32, float16 or bfloat16"),
    bf16: bool = typer.Option(True, help="bf16 autocast for the forward pass"),
    threads: int = typer.Option(0, help="torch threads (0 = default)"),
    resume: bool = typer.Option(False, help="continue from OUT.train-state.pt"),
    overwrite: bool = typer.Option(False),
    loops: str = typer.Option("fixed", help="loop count per step: fixed (num_loops), uniform (1..the limit) or "
                                            "poisson-lognormal (Huginn's sampler)"),
    loops_mean: float = typer.Option(0.0, help="poisson-lognormal: the mean (0 = num_loops)"),
    loops_sigma: float = typer.Option(0.5, help="poisson-lognormal: sigma of the log-normal rate"),
    backprop_loops: int = typer.Option(0, help="backpropagate through the last K loops only (0 = all)"),
    max_loops: Optional[int] = typer.Option(None, help="the most loops the model may run, per-loop parameters "
                                            "included (default: the config's max_loops, 0 = num_loops)"),
):
    """Train a Hyperloop model on CPU and write a checkpoint folder."""
    from edgeloop.model.config import PRESETS, HyperloopConfig
    from edgeloop.model.train import TrainConfig, train as run_train

    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"--dtype {dtype!r}: use float32, float16 or bfloat16")
    cfg = PRESETS[config] if config in PRESETS else None
    if cfg is None:
        if not Path(config).is_file():
            raise ValueError(f"--config {config!r}: neither a preset ({', '.join(PRESETS)}) nor a file")
        cfg = HyperloopConfig.from_json(config)
    if max_loops is not None:
        cfg = dataclasses.replace(cfg, max_loops=max_loops).validate()
    tc = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup=warmup, seed=seed,
                     val_every=val_every, val_tokens=val_tokens, save_every=save_every, bf16=bf16, threads=threads,
                     dtype=dtype, text_files=[str(t) for t in text] if text else None,
                     tokenizer=str(tokenizer) if tokenizer else None, loops=loops, loops_mean=loops_mean,
                     loops_sigma=loops_sigma, backprop_loops=backprop_loops)
    s = run_train(cfg, out_dir, tc, resume=resume, overwrite=overwrite, command=_command_line())
    out.print(f"wrote {out_dir}: {s['tokens_seen']:,} tokens, validation perplexity {s['val_ppl']:.3f}, "
              f"{s['seconds'] / 60:.1f} min")


@app.command(rich_help_panel=PANELS["inspect"])
def inspect(
    path: Path = typer.Argument(..., help="a checkpoint folder"),
    ppl: bool = typer.Option(False, help="also measure validation perplexity with the PyTorch model"),
    tokens: int = typer.Option(4096, help="validation tokens for --ppl"),
    text: Optional[Path] = typer.Option(None, help="text file for --ppl (default: the demo validation split)"),
    tensors: bool = typer.Option(False, help="list every tensor with its role and dtype"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Architecture, unique vs effective parameters, bytes by dtype, hyper-connection tensors; a folder whose
    config and tensors disagree is still shown, with its problems, and exits 2."""
    from edgeloop.runtime.report import run_inspect

    run_inspect(out, path, ppl, tokens, text, tensors, as_json)


@app.command(rich_help_panel=PANELS["generate"])
def generate(
    model_dir: Path = typer.Argument(..., help="a checkpoint folder (PyTorch) or an export folder (onnxruntime)"),
    prompt: str = typer.Option(..., help="text to continue"),
    max_new_tokens: int = typer.Option(64), temperature: float = typer.Option(0.0), top_k: int = typer.Option(0),
    seed: int = typer.Option(0), num_loops: Optional[int] = typer.Option(None, help="loops to run (≤ trained r)"),
    top_p: float = typer.Option(1.0, help="export folders: nucleus sampling mass"),
    repetition_penalty: float = typer.Option(1.0, help="export folders: >1 discourages repeats"),
    ep: str = typer.Option("cpu", help="export folders: execution provider (cpu, webgpu, cuda, coreml, nnapi, qnn, dml)"),
    threads: int = typer.Option(0, help="export folders: intra-op threads (0 = default)"),
    chat: bool = typer.Option(False, "--chat", help="the prompt is a user message: apply the folder's chat "
                              "template (tokenizer_config.json)"),
    exit_threshold: Optional[float] = typer.Option(None, help="exit-gated models (Ouro): exit once the cumulative "
                                                   "exit probability reaches this (>= 1: never early)"),
    draft_loops: Optional[str] = typer.Option(None, help=DRAFT_HELP), lookahead: int = typer.Option(4, help=K_HELP),
    draft_min_prob: float = typer.Option(0.0, help="stop drafting under this top-1 probability (0 = off)"),
    draft_approximate: bool = typer.Option(False, "--draft-approximate", help=APPROX_HELP),
):
    """Continue a prompt, streaming text to the terminal (stopping at the folder's eos tokens)."""
    draft = _draft_loops(draft_loops, lookahead)
    if (model_dir / "model.onnx").exists() or (model_dir / "manifest.json").exists():  # an export: onnxruntime
        from edgeloop.runtime.report import stream_generate

        stream_generate(out, model_dir, prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                        num_loops, ep, threads, chat, exit_threshold, draft, lookahead, draft_min_prob, err, draft_approximate)
        return
    if draft is not None:
        raise ValueError("--draft-loops: self-speculation runs on an export folder (edgeloop export first)")
    from edgeloop.chat import prompt_ids
    from edgeloop.model.checkpoint import generation_tokens, load_tokenizer
    from edgeloop.model.evaluate import generate as gen
    from edgeloop.quantize import load_checkpoint
    from edgeloop.textstream import TextStream

    model, tok = load_checkpoint(model_dir), load_tokenizer(model_dir)
    ids = prompt_ids(tok, model_dir, prompt, chat)
    if not prompt or not ids:
        raise ValueError("--prompt is empty")
    if len(ids) >= model.cfg.max_seq_len:
        raise ValueError(f"the prompt has {len(ids)} tokens; the context is {model.cfg.max_seq_len}")
    stop = set(generation_tokens(model_dir)["eos_token_id"])
    tokens = gen(model, ids, max_new_tokens, temperature, top_k, seed, num_loops, stop=stop,
                 exit_threshold=exit_threshold)  # the settings are checked here, before any output
    out.print(tok.decode(ids) if chat else prompt, end="", highlight=False)
    text = TextStream(tok, lambda s: out.print(s, end="", highlight=False, soft_wrap=True))
    for t in tokens:
        text.push(t)
    out.print()


@app.command("export", rich_help_panel=PANELS["export"])
def export_cmd(
    in_dir: Path = typer.Argument(..., help="a checkpoint folder (quantized or float; or any format "
                                            "`edgeloop import` reads)"),
    out_dir: Path = typer.Option(..., "-o", "--out", help="export folder to write"),
    target: str = _opt(GRAPH, "cpu", help="what the export is for: cpu, webgpu, genai (onnxruntime-genai) or "
                       "portable (standard ONNX ops only); it picks the settings below that are not given"),
    format: Optional[str] = _opt(GRAPH, None, "--format", help="matmulnbits (quantized; qdq for --target portable), "
                                 "fp32 (float), fp16"),
    accuracy_level: int = _opt(GRAPH, 0, help="MatMulNBits accuracy level: 0 (fp32) or 4 (int8 activations)"),
    fused: Optional[bool] = _opt(GRAPH, None, "--fused/--no-fused", help="matmulnbits: onnxruntime's fused kernels "
                                 "(GroupQueryAttention, SimplifiedLayerNormalization, q/k/v and gate/up as one "
                                 "MatMulNBits each); default: on, except --target portable"),
    rotary_at_position_ids: bool = _opt(GRAPH, False, "--rotary-at-position-ids", help="--fused: RotaryEmbedding "
                                        "at position_ids, not GroupQueryAttention's own (from seqlens_k)"),
    unroll: bool = _opt(GRAPH, False, help="write the loops out, no Loop (weights still stored once; with "
                        "max_loops > r each loop past the first behind If(l < num_loops): num_loops stays an input)"),
    opset: int = _opt(GRAPH, 21),
    external_data: Optional[bool] = _opt(GRAPH, None, "--external-data/--no-external-data",
                                         help="weights in model.onnx.data (default: only past 1.8 GB)"),
    ort: bool = _opt(GRAPH, False, "--ort", help="also write model.ort and required_operators.config "
                     "(onnxruntime mobile / minimal builds)"),
    max_loops: Optional[int] = _opt(LOOPS, None, help="the most loops num_loops may ask for (default: the model's; "
                                    "with per-loop parameters at most the trained max_loops, whose first rows it "
                                    "keeps; = num_loops for onnxruntime-genai with per-step KV)"),
    kv_policy: Optional[str] = _opt(LOOPS, None, help="KV cache across loops: per-step (a slot per loop) or shared "
                                    "(one slot per middle layer); default: the model's"),
    kv_dtype: Optional[str] = _opt(LOOPS, None, help="the KV cache between steps: float32 (default) or float16 (half "
                                   "the KV memory; eval reports its decode drift)"),
    max_seq_len: Optional[int] = _opt(LOOPS, None, help="context length of the export"),
    init_state: str = _opt(LOOPS, "zeros", help="the loop state's start: zeros, or random (the injection's random "
                           "start, e.g. Huginn's; an init_scale input, 0 = zeros)"),
    seed: int = _opt(LOOPS, 0, help="--init-state random: the generator's seed"),
    verify: bool = _opt(PARITY, True, help="parity check vs PyTorch (--no-verify only for huge models)"),
    parity_loops: Optional[str] = _opt(PARITY, None, help="parity check: loop counts, e.g. 1,4,8 (default r and r/2, "
                                       "and 2r where more loops may run; 1,2 past 1B parameters)"),
    parity_steps: Optional[int] = _opt(PARITY, None, help="parity check: decode steps (default 16; 2 past 1B "
                                       "parameters)"),
    tolerance: Optional[float] = _opt(PARITY, None, help="parity check: the max |logit error| allowed (default: "
                                      "1e-4 fp32, 1e-3 INT4, 0.5 at accuracy level 4)"),
    overwrite: bool = typer.Option(False),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Export to ONNX: the middle block as ONE Loop, INT4 weights stored once, KV cache in/out."""
    from edgeloop.export import ExportConfig, export_checkpoint, export_rows
    from edgeloop.importers import temporary_checkpoint

    if not verify:
        err.print("[bold yellow]warning:[/] --no-verify: the export is NOT parity-checked against PyTorch")
    ec = ExportConfig(target=target, format=format, accuracy_level=accuracy_level, unroll=unroll,
                      max_seq_len=max_seq_len,
                      opset=opset, verify=verify, external_data=external_data, ort=ort, kv_policy=kv_policy,
                      kv_dtype=kv_dtype,
                      max_loops=max_loops, init_state=init_state, seed=seed, decode_steps=parity_steps, fused=fused,
                      rotary_at_position_ids=rotary_at_position_ids,
                      parity_loops=_ints("--parity-loops", parity_loops), tolerance=tolerance)
    with err.status("exporting") as status, temporary_checkpoint(in_dir, out_dir, overwrite) as src:
        s = export_checkpoint(src, out_dir, ec, overwrite=overwrite, source=in_dir,
                              progress=lambda msg: status.update(f"export: {msg}"))
    if as_json:
        out.print_json(json.dumps(s))
        return
    t = Table(title=f"{out_dir}", show_header=False)
    for row in export_rows(s):
        t.add_row(*row)
    out.print(t)


@app.command(rich_help_panel=PANELS["quantize"])
def quantize(
    in_dir: Path = typer.Argument(..., help="a float checkpoint folder (or any format `edgeloop import` reads)"),
    out_dir: Path = typer.Option(..., "-o", "--out", help="quantized checkpoint folder to write"),
    bits: int = typer.Option(4, help="weight bits (4 only)"),
    group_size: int = typer.Option(128, help="K elements per scale: 16, 32, 64, 128 or 256"),
    method: str = typer.Option("rtn", help="rtn or gptq"),
    sym: bool = typer.Option(False, "--sym", help="symmetric (implicit zero point 8) instead of uint4 zero points"),
    scale_dtype: str = typer.Option("float16", help="float16 or float32"),
    keep_dtype: str = typer.Option("float32", help="dtype of tensors kept unquantized: float32 or float16"),
    quantize_embedding: Optional[bool] = typer.Option(None, "--quantize-embedding/--keep-embedding",
                                                      help="quantize the embedding (and a tied lm_head); default on"),
    embedding_bits: int = typer.Option(8, help="bits of a quantized embedding: 8 (default) or 4"),
    quantize_lm_head: Optional[bool] = typer.Option(None, "--quantize-lm-head/--keep-lm-head",
                                                    help="quantize an untied lm_head; default on"),
    lm_head_bits: int = typer.Option(8, help="bits of a quantized untied lm_head: 8 (default, RTN) or 4 (--method)"),
    quantize_hc: bool = typer.Option(False, "--quantize-hc", help="INT4 the hyper-connection matrices too (to measure)"),
    calib_text: Optional[Path] = typer.Option(None, help="gptq: UTF-8 calibration text (default: demo corpus train "
                                              "split)"),
    calib_samples: Optional[int] = typer.Option(None, help="gptq: calibration windows (default 128)"),
    calib_seq_len: Optional[int] = typer.Option(None, help="gptq: tokens per calibration window (default 256)"),
    act_order: Optional[bool] = typer.Option(None, "--act-order", help="gptq: quantize columns by decreasing "
                                             "Hessian diagonal"),
    seed: Optional[int] = typer.Option(None, help="gptq: calibration window sampling seed (default 0)"),
    device: Optional[str] = typer.Option(None, help="gptq: where calibration runs, cpu (default) or cuda (hours on "
                                         "2 CPU cores for a 3.5B model; minutes on a GPU)"),
    overwrite: bool = typer.Option(False),
    as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON object"),
):
    """INT4 weight-only group quantization (RTN or loop-aware GPTQ) of a checkpoint folder."""
    from edgeloop.importers import temporary_checkpoint
    from edgeloop.quantize import quant_config, quantize_checkpoint

    calib = {"calib_text": str(calib_text) if calib_text else None, "calib_samples": calib_samples,
             "calib_seq_len": calib_seq_len, "seed": seed, "act_order": act_order,
             "device": device}  # given ones only: gptq's
    if method != "gptq" and any(v is not None for v in calib.values()):
        given = ", ".join("--" + k.replace("_", "-") for k, v in calib.items() if v is not None)
        err.print(f"[bold yellow]warning:[/] {given}: calibration settings, ignored by --method {method}")
        calib = {}
    shared = {"quantize_embedding": quantize_embedding, "quantize_lm_head": quantize_lm_head}
    q = quant_config(method, bits=bits, group_size=group_size, sym=sym, scale_dtype=scale_dtype, keep_dtype=keep_dtype,
                     quantize_hc=quantize_hc, embedding_bits=embedding_bits, lm_head_bits=lm_head_bits,
                     **{k: v for k, v in {**shared, **calib}.items() if v is not None})
    with temporary_checkpoint(in_dir, out_dir, overwrite) as src:  # a foreign folder is imported first
        r = quantize_checkpoint(src, out_dir, q, overwrite=overwrite, progress=not as_json)
    if as_json:
        out.print_json(json.dumps(r))
        return
    t = Table(title=f"{in_dir} → {out_dir}", show_header=False)
    emb = f"embedding INT{embedding_bits}" if q.quantize_embedding else "embedding kept"
    t.add_row("method", f"INT4 {method}, G={group_size}, {'sym' if sym else 'asym'}, {scale_dtype} scales, "
                        f"{emb}, kept tensors {keep_dtype}")
    t.add_row("tensors quantized", f"{r['tensors_quantized']}")
    why: dict[str, int] = {}
    for reason in r["kept"].values():
        why[reason] = why.get(reason, 0) + 1
    t.add_row("tensors kept", f"{r['tensors_kept']}: " + "; ".join(f"{n} {w}" for w, n in why.items()))
    t.add_row("bytes", f"{r['bytes_before']:,} → {r['bytes_after']:,} ({r['compression_ratio']:.2f}× smaller; "
                       f"{r['ratio_vs_fp32']:.3f}× of fp32)")
    if r["linear_ratio_vs_fp32"] is not None:
        t.add_row("quantized linears", f"{r['linear_bytes_fp32']:,} fp32 → {r['linear_bytes_after']:,} "
                                       f"({r['linear_ratio_vs_fp32']:.3f}× of fp32)")
    if r["layers"] and "gptq_err" in r["layers"][0]:
        g = sum(x["gptq_err"] for x in r["layers"]) / len(r["layers"])
        n = sum(x["rtn_err"] for x in r["layers"]) / len(r["layers"])
        t.add_row("calibration", f"{r['calibration']['samples']} × {r['calibration']['seq_len']} tokens; mean "
                                 f"relative layer output error gptq {g:.2e} vs rtn {n:.2e}")
    t.add_row("time", f"{r['seconds']:.1f} s")
    out.print(t)


@app.command("import-nanochat", rich_help_panel=PANELS["import-nanochat"])
def import_nanochat_cmd(
    ckpt_dir: Path = typer.Argument(..., help="looped-lm-scaling folder: model_<step>.pt + meta_<step>.json"),
    out_dir: Path = typer.Option(..., "-o", "--out", help="edgeloop checkpoint folder to write"),
    step: Optional[str] = typer.Option(None, help="step (or alias) to import (default: the latest)"),
    tokenizer: Optional[Path] = typer.Option(None, help="tokenizer.json (default: the one beside the checkpoint)"),
    overwrite: bool = typer.Option(False),
    as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON object"),
):
    """Convert a looped-lm-scaling (nanochat) checkpoint into an edgeloop checkpoint folder (weights_only load)."""
    from edgeloop.importers.nanochat import import_nanochat

    s = import_nanochat(ckpt_dir, out_dir, step=step, tokenizer=tokenizer, overwrite=overwrite)
    if as_json:
        out.print_json(json.dumps(s))
        return
    c = s["config"]
    t = Table(title=f"{ckpt_dir} ({s['model_file']}) → {out_dir}", show_header=False)
    t.add_row("mode", f"{s['input_injection']} → hc {s['hc']}" + (
        f", {s['n_streams']} lanes" if s["hc"] == "static" else f", injection {s['injection']}"))
    t.add_row("layout", f"begin {c['n_begin']} → middle {c['n_middle']} × {c['num_loops']} → end {c['n_end']}")
    t.add_row("tensors", f"{s['tensors']} ({s['params']:,} parameters), {'/'.join(s['source_dtypes'])} → float32")
    t.add_row("vocabulary", f"{s['vocab_size']} (pad rows dropped from {s['padded_vocab']})")
    t.add_row("tokenizer", s["tokenizer"] or "none found (pass --tokenizer for eval / gptq / generate)")
    out.print(t)


@app.command("import", rich_help_panel=PANELS["import"])
def import_cmd(
    src: Path = typer.Argument(..., help="a checkpoint folder in a foreign format (detected; see --format)"),
    out_dir: Path = typer.Option(..., "-o", "--out", help="edgeloop checkpoint folder to write"),
    format: Optional[str] = typer.Option(None, "--format", help="the importer (default: detected from the folder)"),
    step: Optional[str] = typer.Option(None, help="nanochat: step (or alias) to import (default: the latest)"),
    tokenizer: Optional[Path] = typer.Option(None, help="nanochat: tokenizer.json (default: the one beside it)"),
    overwrite: bool = typer.Option(False),
    as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON object"),
):
    """Convert a foreign looped-LM checkpoint folder into an edgeloop checkpoint folder (weights only, never code)."""
    from edgeloop.importers import IMPORTERS, import_folder

    s = import_folder(src, out_dir, format, overwrite=overwrite, step=step, tokenizer=tokenizer)
    if as_json:
        out.print_json(json.dumps(s))
        return
    c = s["config"]
    t = Table(title=f"{src} → {out_dir}", show_header=False)
    t.add_row("format", f"{s['format']}: {IMPORTERS[s['format']].title}")
    t.add_row("layout", f"begin {c['n_begin']} → middle {c['n_middle']} × {c['num_loops']} → end {c['n_end']}, "
                        f"d = {c['d_model']}, hc {c['hc']}" + (f", injection {c['injection']}" if c["hc"] == "none"
                                                             else f", {c['n_streams']} streams"))
    t.add_row("tensors", f"{s['tensors']} ({s['params']:,} parameters)")
    t.add_row("tokenizer", str(s.get("tokenizer") or "none found"))
    out.print(t)


@app.command("eval", rich_help_panel=PANELS["eval"])
def eval_cmd(
    model_dir: Path = typer.Argument(..., help="an export folder"),
    reference: Optional[Path] = typer.Option(None, help="the float PyTorch checkpoint (default: the export's "
                                             "recorded float source)"),
    ep: str = typer.Option("cpu", help="execution provider: cpu, webgpu, cuda, coreml, nnapi, qnn, dml"),
    tokens: int = typer.Option(8192, help="tokens of text to score"),
    text: Optional[Path] = typer.Option(None, help="UTF-8 text file (default: the demo validation split)"),
    num_loops: Optional[int] = typer.Option(None, help="loops to run (≤ trained r; both models)"),
    batch_size: int = typer.Option(4, help="windows per onnxruntime call"),
    threads: int = typer.Option(0, help="intra-op threads (0 = default)"),
    exit_threshold: Optional[float] = typer.Option(None, help="exit-gated models: the exit threshold (both models)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Perplexity of an export vs the fp32 PyTorch reference on the same tokens (drift, absolute and %)."""
    from edgeloop.runtime.report import run_eval

    run_eval(out, err, model_dir, reference, ep, tokens, text, num_loops, batch_size, threads, as_json,
             exit_threshold)


@app.command(rich_help_panel=PANELS["bench"])
def bench(
    model_dir: Path = typer.Argument(..., help="an export folder"),
    ep: str = typer.Option("cpu", help="execution provider: cpu, webgpu, cuda, coreml, nnapi, qnn, dml"),
    threads: int = typer.Option(0, help="intra-op threads (0 = default)"),
    prefill_tokens: int = typer.Option(128), decode_tokens: int = typer.Option(256),
    context: Optional[int] = typer.Option(None, help="context length for the KV-cache size (default: the model's)"),
    num_loops: Optional[int] = typer.Option(None, help="loops to run (≤ trained r)"),
    reference: Optional[Path] = typer.Option(None, help="another export (e.g. fp32) to report ratios against"),
    sweep: bool = typer.Option(False, "--sweep", help="perplexity and tokens/s for num_loops = 1..r"),
    plot: Optional[Path] = typer.Option(None, help="PNG of the sweep (implies --sweep)"),
    sweep_tokens: int = typer.Option(2048, help="tokens of text per sweep perplexity"),
    text: Optional[Path] = typer.Option(None, help="text for the sweep (default: the demo validation split)"),
    ort: bool = typer.Option(False, "--ort", help="load model.ort (export --ort) instead of model.onnx"),
    exit_threshold: Optional[float] = typer.Option(None, help="exit-gated models: the exit threshold to measure at "
                                                   "(--sweep adds a threshold sweep)"),
    draft_loops: Optional[str] = typer.Option(None, help=DRAFT_HELP + " (decode_tokens_per_s is then its rate)"),
    lookahead: int = typer.Option(4, help=K_HELP),
    draft_approximate: bool = typer.Option(False, "--draft-approximate", help=APPROX_HELP),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Memory footprint and latency of an export (fresh subprocess), and the elastic-depth sweep."""
    from edgeloop.runtime.report import run_bench

    draft = _draft_loops(draft_loops, lookahead)
    run_bench(out, err, model_dir, ep, threads, prefill_tokens, decode_tokens, context, num_loops, reference, sweep,
              plot, sweep_tokens, text, as_json, model_file="model.ort" if ort else "model.onnx",
              exit_threshold=exit_threshold, draft_loops=draft, lookahead=lookahead, approximate=draft_approximate)


@app.command("run", rich_help_panel=PANELS["run"])
def run_cmd(
    checkpoint: Path = typer.Argument(..., help="a float checkpoint folder"),
    out_dir: Path = typer.Option(..., "-o", "--out", help="folder for every stage's output and the report"),
    method: str = typer.Option("auto", help="gptq, rtn, or auto (gptq up to 1.5B parameters on CPU, rtn past "
                               "that, said in the report)"),
    group_size: Optional[int] = typer.Option(None, help="INT4 group size (default 128, or the largest of 64/32/16 "
                                             "dividing every K: 32 for Huginn's d = 5280)"),
    sym: bool = typer.Option(False), format: str = typer.Option("matmulnbits", help="matmulnbits or qdq"),
    accuracy_level: int = typer.Option(4, help="MatMulNBits accuracy level: 4 (int8 activations, the fast CPU "
                                       "path) or 0 (fp32 compute)"), ep: str = typer.Option("cpu"),
    eval_tokens: int = typer.Option(8192), sweep: bool = typer.Option(True, help="num_loops sweep + plot"),
    threads: int = typer.Option(0), overwrite: bool = typer.Option(False),
    embedding_bits: int = typer.Option(8, help="bits of the quantized embedding / tied lm_head: 8 or 4"),
    external_data: bool = typer.Option(True, "--external-data/--inline-data",
                                       help="weights in model.onnx.data, mmap'd (lower RSS on CPU) or inline"),
    eval_text: Optional[Path] = typer.Option(None, help="UTF-8 text for eval and the sweep (default: the demo "
                                             "corpus's validation split)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as one JSON object"),
):
    """The main job: quantize -> export -> eval -> bench, ending in one report (table, report.json, report.md).
    Everything is checked before anything is written, and OUT appears only when every stage succeeded."""
    from edgeloop.run import RunConfig, headline, protocol, run

    rc = RunConfig(method=method, group_size=group_size, sym=sym, format=format, accuracy_level=accuracy_level,
                   ep=ep, eval_tokens=eval_tokens, sweep=sweep, threads=threads, embedding_bits=embedding_bits,
                   external_data=external_data, eval_text=str(eval_text) if eval_text else None)
    with err.status("run") as status:
        r = run(checkpoint, out_dir, rc, overwrite=overwrite, step=lambda msg: status.update(f"run: {msg}"))
    if as_json:
        out.print_json(json.dumps(r, default=str))
        return
    t = Table(title=f"edgeloop run {checkpoint} → {out_dir}", show_header=False)
    for k, v in headline(r):
        t.add_row(k, v)
    out.print(t)
    if r["sweep"]:
        s = Table("num_loops", "effective layers", "perplexity", "decode tok/s",
                  title=f"elastic depth (INT4; {protocol(r['sweep'][0])})")
        for row in r["sweep"]:
            s.add_row(str(row["num_loops"]), str(row["effective_layers"]), f"{row['ppl']:.3f}",
                      f"{row['decode_tokens_per_s']:.1f}")
        out.print(s)
    out.print(f"report: {out_dir / 'report.md'}, {out_dir / 'report.json'}" + (
        f", {out_dir / 'sweep.png'}" if r["sweep"] else ""))


@app.command(rich_help_panel=PANELS["serve"])
def serve(
    model_dir: Path = typer.Argument(..., help="an export folder"),
    host: str = typer.Option("127.0.0.1", help="loopback address to bind (127.0.0.1 or ::1)"),
    port: int = typer.Option(8008, help="TCP port (0 = any free port)"),
    verbose: bool = typer.Option(False, "--verbose", help="log every request"),
    web_modules: Optional[Path] = typer.Option(
        None, "--web-modules", help="a node_modules folder with onnxruntime-web and @huggingface/tokenizers "
        "(default: the installed page's node_modules, else the checkout's web/node_modules)"),
):
    """The in-browser demo (onnxruntime-web: WebGPU or WASM) with MODEL_DIR, on loopback only."""
    from edgeloop.runtime.serve import serve as run_serve

    run_serve(model_dir, host, port, quiet=not verbose, say=lambda s: out.print(s, highlight=False, soft_wrap=True),
              modules=web_modules)


def main() -> None:
    """Run the CLI: a bad input (a ValueError & co, or a usage error such as an option value that does not
    parse) is one line on stderr and exit 2; no arguments print the help."""
    if len(sys.argv) <= 1:
        sys.argv.append("--help")
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as e:  # usage errors (typer's own): one line, and where to look
        if os.environ.get("EDGELOOP_DEBUG"):
            raise
        msg = e.format_message() if hasattr(e, "format_message") else str(e)
        ctx = getattr(e, "ctx", None)
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        err.print(f"[bold red]error:[/] {' '.join(msg.split())}{hint}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        err.print("[bold red]error:[/] aborted", highlight=False)
        sys.exit(1)
    except (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        if os.environ.get("EDGELOOP_DEBUG"):
            raise
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
