"""The `edgeloop` command: wires each subcommand to its pipeline stage. Errors are one line, exit 2
(set EDGELOOP_DEBUG=1 for the traceback)."""
from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="edgeloop: INT4 deployment of looped (Hyperloop) transformers.")
out = Console()
err = Console(stderr=True)


def _command_line() -> str:
    return "edgeloop " + " ".join(shlex.quote(a) for a in sys.argv[1:])


@app.command()
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
    tc = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup=warmup, seed=seed,
                     val_every=val_every, val_tokens=val_tokens, save_every=save_every, bf16=bf16, threads=threads,
                     dtype=dtype, text_files=[str(t) for t in text] if text else None,
                     tokenizer=str(tokenizer) if tokenizer else None)
    s = run_train(cfg, out_dir, tc, resume=resume, overwrite=overwrite, command=_command_line())
    out.print(f"wrote {out_dir}: {s['tokens_seen']:,} tokens, validation perplexity {s['val_ppl']:.3f}, "
              f"{s['seconds'] / 60:.1f} min")


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="a checkpoint folder"),
    ppl: bool = typer.Option(False, help="also measure validation perplexity with the PyTorch model"),
    tokens: int = typer.Option(4096, help="validation tokens for --ppl"),
    text: Optional[Path] = typer.Option(None, help="text file for --ppl (default: the demo validation split)"),
    tensors: bool = typer.Option(False, help="list every tensor with its role and dtype"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Architecture, unique vs effective parameters, bytes by dtype, hyper-connection tensors."""
    from edgeloop.model.inspect import summarize

    s = summarize(path)
    if ppl:
        from edgeloop.model.checkpoint import load_model, load_tokenizer
        from edgeloop.model.data import corpus_split, encode, read_text
        from edgeloop.model.evaluate import perplexity

        model = load_model(path)
        ids = encode(load_tokenizer(path), read_text(text) if text else corpus_split("validation"))[:tokens]
        s["val_ppl"], s["val_tokens"] = perplexity(model, ids)
    if as_json:
        out.print_json(json.dumps(s if tensors else {k: v for k, v in s.items() if k != "tensors"}))
        return
    c = s["config"]
    t = Table(title=f"{path}", show_header=False)
    t.add_row("layout", f"begin {c['n_begin']} → middle {c['n_middle']} × {c['num_loops']} loops → end {c['n_end']}")
    t.add_row("effective depth", f"{s['effective_layers']} layers ({s['unique_layers']} unique)")
    t.add_row("hyper-connections", f"{c['hc']}, {c['n_streams']} streams" + (
        f", injection {c['injection']}" if c["hc"] == "none" else ""))
    t.add_row("width", f"d={c['d_model']}, heads {c['n_heads']} (kv {c['n_kv_heads']}), mlp {c['mlp']} {c['mlp_hidden']}")
    t.add_row("parameters", f"{s['params_unique']:,} unique / {s['params_effective']:,} effective")
    t.add_row("bytes by dtype", ", ".join(f"{k} {v:,}" for k, v in s["bytes_by_dtype"].items()))
    t.add_row("bytes by role", ", ".join(f"{k} {v:,}" for k, v in s["bytes_by_role"].items()))
    t.add_row("hyper-connection tensors", ", ".join(s["hc_tensors"]) or "none")
    if s["quantization_config"]:
        q = s["quantization_config"]
        t.add_row("quantization", ", ".join(f"{k}={q[k]}" for k in ("quant_method", "bits", "group_size", "sym",
                                                                    "algorithm") if k in q))
    if ppl:
        t.add_row("validation perplexity", f"{s['val_ppl']:.3f} on {s['val_tokens']:,} tokens")
    out.print(t)
    if tensors:
        tt = Table("tensor", "shape", "dtype", "role", "bytes")
        for x in s["tensors"]:
            tt.add_row(x["name"], str(x["shape"]), x["dtype"], x["role"], f"{x['bytes']:,}")
        out.print(tt)


@app.command()
def generate(
    model_dir: Path = typer.Argument(..., help="a checkpoint folder"),
    prompt: str = typer.Option(..., help="text to continue"),
    max_new_tokens: int = typer.Option(64), temperature: float = typer.Option(0.0), top_k: int = typer.Option(0),
    seed: int = typer.Option(0), num_loops: Optional[int] = typer.Option(None, help="loops to run (≤ trained r)"),
):
    """Continue a prompt, streaming text to the terminal."""
    from edgeloop.model.checkpoint import load_model, load_tokenizer
    from edgeloop.model.evaluate import generate as gen

    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    ids = tok.encode(prompt, add_special_tokens=False).ids
    if not ids:
        raise ValueError("--prompt is empty")
    if len(ids) >= model.cfg.max_seq_len:
        raise ValueError(f"the prompt has {len(ids)} tokens; the context is {model.cfg.max_seq_len}")
    out.print(prompt, end="", highlight=False)
    new: list[int] = []
    shown = ""
    for t in gen(model, ids, max_new_tokens, temperature, top_k, seed, num_loops):
        new.append(t)
        text = tok.decode(new)
        if not text.endswith("\ufffd"):  # wait for a whole UTF-8 character
            out.print(text[len(shown):], end="", highlight=False, soft_wrap=True)
            shown = text
    out.print()


@app.command("export")
def export_cmd(
    in_dir: Path = typer.Argument(..., help="a checkpoint folder (quantized or float)"),
    out_dir: Path = typer.Option(..., "-o", "--out", help="export folder to write"),
    format: Optional[str] = typer.Option(None, "--format", help="matmulnbits (default for quantized), qdq, fp32 "
                                         "(default for float), fp16"),
    accuracy_level: int = typer.Option(0, help="MatMulNBits accuracy level: 0 (fp32) or 4 (int8 activations)"),
    unroll: bool = typer.Option(False, help="unroll the loop (the control); weights still stored once"),
    max_seq_len: Optional[int] = typer.Option(None, help="context length of the export"),
    opset: int = typer.Option(21),
    external_data: Optional[bool] = typer.Option(None, "--external-data/--no-external-data",
                                                 help="weights in model.onnx.data (default: only past 1.8 GB)"),
    verify: bool = typer.Option(True, help="parity check vs PyTorch (--no-verify only for huge models)"),
    overwrite: bool = typer.Option(False),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Export to ONNX: the middle block as ONE Loop, INT4 weights stored once, KV cache in/out."""
    from edgeloop.export import ExportConfig, export_checkpoint

    if not verify:
        err.print("[bold yellow]warning:[/] --no-verify: the export is NOT parity-checked against PyTorch")
    ec = ExportConfig(format=format, accuracy_level=accuracy_level, unroll=unroll, max_seq_len=max_seq_len,
                      opset=opset, verify=verify, external_data=external_data)
    with err.status("exporting") as status:
        s = export_checkpoint(in_dir, out_dir, ec, overwrite=overwrite,
                              progress=lambda msg: status.update(f"export: {msg}"))
    if as_json:
        out.print_json(json.dumps(s))
        return
    g = s["graph"]
    t = Table(title=f"{out_dir}", show_header=False)
    t.add_row("format", s["format"] + (" (unrolled)" if s["unroll"] else ""))
    t.add_row("nodes", f"{g['nodes']} in the main graph, {g['body_nodes']} in the Loop body")
    t.add_row("Loop", "yes: the middle block is one Loop" if g["loop"] else "no (unrolled)")
    t.add_row("initializers", ", ".join(f"{k} {v:,} B" for k, v in g["initializer_bytes"].items()))
    t.add_row("files", ", ".join(f"{k} {v:,} B" for k, v in s["file_bytes"].items()))
    p = s["parity"]
    t.add_row("parity", "not checked" if p is None else
              f"max |logit error| {p['max_abs_err']:.2e} ≤ {p['tolerance']:g} vs {p['reference']} PyTorch "
              f"(num_loops {', '.join(p['by_num_loops'])}; prefill + {ec.decode_steps} decode steps)")
    out.print(t)


def main() -> None:
    try:
        app()
    except (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        if os.environ.get("EDGELOOP_DEBUG"):
            raise
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
