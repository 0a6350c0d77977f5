"""Quantize benchmark (run by hand): validation perplexity and file size of INT4 settings, and the peak RSS
of streaming RTN on a random ~1B-parameter checkpoint.

    python benchmarks/bench_quantize.py                      # the table on models/hyperloop-tiny
    python benchmarks/bench_quantize.py --rss-1b             # peak RSS of RTN on a random 1B fp16 checkpoint

Perplexity: the first --tokens tokens of the demo corpus validation split, windows of max_seq_len, stride half.
drift = ppl / ppl(fp32) - 1. "file" is model.safetensors relative to the same tensors stored in fp32;
"linears" is the quantized Linear weights' bytes (qweight + scales + qzeros) relative to fp32.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = [  # (label, QuantConfig overrides); the defaults quantize the tied embedding to INT8
    ("RTN G=32", dict(algorithm="rtn", group_size=32)),
    ("RTN G=64", dict(algorithm="rtn", group_size=64)),
    ("RTN G=128", dict(algorithm="rtn", group_size=128)),
    ("GPTQ G=32", dict(algorithm="gptq", group_size=32)),
    ("GPTQ G=64", dict(algorithm="gptq", group_size=64)),
    ("GPTQ G=128", dict(algorithm="gptq", group_size=128)),
    ("RTN G=128 --quantize-hc", dict(algorithm="rtn", group_size=128, quantize_hc=True)),
    ("GPTQ G=128 --quantize-hc", dict(algorithm="gptq", group_size=128, quantize_hc=True)),
    ("RTN G=128 --keep-embedding", dict(algorithm="rtn", group_size=128, quantize_embedding=False)),
    ("GPTQ G=128 --keep-embedding", dict(algorithm="gptq", group_size=128, quantize_embedding=False)),
    ("RTN G=128 --embedding-bits 4", dict(algorithm="rtn", group_size=128, embedding_bits=4)),
    ("GPTQ G=128 --embedding-bits 4", dict(algorithm="gptq", group_size=128, embedding_bits=4)),
    ("GPTQ G=128 --keep-dtype float16", dict(algorithm="gptq", group_size=128, keep_dtype="float16")),
]
EXTRA_ROWS = [
    ("GPTQ G=128 --act-order", dict(algorithm="gptq", group_size=128, act_order=True)),
    ("GPTQ G=128 --sym", dict(algorithm="gptq", group_size=128, sym=True)),
    ("GPTQ G=128 --calib-samples 16", dict(algorithm="gptq", group_size=128, calib_samples=16)),
    ("GPTQ G=128 --calib-samples 64", dict(algorithm="gptq", group_size=128, calib_samples=64)),
]


def table(model_dir: Path, tokens: int, extra: bool) -> str:
    import torch

    from edgeloop.model.checkpoint import load_model, load_tokenizer
    from edgeloop.model.data import corpus_split, encode
    from edgeloop.model.evaluate import perplexity
    from edgeloop.quantize import QuantConfig, quantize_checkpoint

    torch.manual_seed(0)
    ids = encode(load_tokenizer(model_dir), corpus_split("validation"))[:tokens]
    t0 = time.time()
    base, n = perplexity(load_model(model_dir), ids)
    lines = [f"Model `{model_dir.name}`; validation perplexity on the first {n + 1:,} validation tokens; "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads.", "",
             "| setting | ppl | drift | file vs fp32 | linears vs fp32 | time (s) |", "|---|---|---|---|---|---|",
             f"| fp32 (source) | {base:.3f} | — | 1.000 | 1.000 | {time.time() - t0:.1f} |"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, kw) in enumerate(ROWS + (EXTRA_ROWS if extra else [])):
            out = Path(tmp) / f"q{i}"
            r = quantize_checkpoint(model_dir, out, QuantConfig(**kw), progress=False)
            ppl, _ = perplexity(load_model(out), ids)
            line = (f"| {label} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% | {r['ratio_vs_fp32']:.3f} | "
                    f"{r['linear_ratio_vs_fp32']:.3f} | {r['seconds']:.1f} |")
            lines.append(line)
            print(line, flush=True)
    return "\n".join(lines)


# ---- 1B streaming RSS ---------------------------------------------------------------------------
def big_config():
    from edgeloop.model.config import HyperloopConfig

    return HyperloopConfig(vocab_size=32768, d_model=2048, n_heads=16, n_kv_heads=4, n_begin=4, n_middle=12,
                           n_end=4, num_loops=4, mlp_hidden=5632, max_seq_len=2048)


def write_big(folder: Path) -> int:
    """A random fp16 checkpoint of big_config(), written tensor by tensor (no torch model); returns params."""
    import torch

    from edgeloop.io import write_json
    from edgeloop.model.checkpoint import expected_tensors
    from edgeloop.quantize.folder import write_safetensors

    cfg = big_config()
    shapes = expected_tensors(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", cfg.to_dict())
    g = torch.Generator().manual_seed(0)

    def gen():
        for name, s in shapes.items():
            yield name, (torch.randn(s, generator=g) * 0.02).half()

    write_safetensors(folder / "model.safetensors", {n: (torch.float16, s) for n, s in shapes.items()}, gen())
    total = 0
    for s in shapes.values():
        k = 1
        for d in s:
            k *= d
        total += k
    return total


def rss_child(in_dir: str, out_dir: str) -> None:
    import torch

    from edgeloop.quantize import QuantConfig, quantize_checkpoint

    torch.set_num_threads(2)
    t = time.time()
    r = quantize_checkpoint(in_dir, out_dir, QuantConfig(keep_dtype="float16"), progress=False)
    print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "seconds": time.time() - t, "bytes_after": r["bytes_after"], "bytes_fp32": r["bytes_fp32"]}))


def rss_1b(workdir: Path) -> str:
    import psutil

    src, dst = workdir / "big-fp16", workdir / "big-int4"
    params = write_big(src)
    proc = subprocess.run([sys.executable, __file__, "--rss-child", str(src), str(dst)], capture_output=True,
                          text=True, check=True)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    gib = 1024 ** 3
    return (f"RTN G=128 of a random {params / 1e9:.2f}B-parameter fp16 checkpoint "
            f"({(src / 'model.safetensors').stat().st_size / gib:.2f} GiB; fp32 would be "
            f"{r['bytes_fp32'] / gib:.2f} GiB): peak RSS {r['peak_rss'] / gib:.2f} GiB, "
            f"output {r['bytes_after'] / gib:.2f} GiB, {r['seconds']:.0f} s "
            f"(machine RAM {psutil.virtual_memory().total / gib:.0f} GiB).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "hyperloop-tiny")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--extra", action="store_true", help="also act-order, sym and fewer calibration samples")
    ap.add_argument("--rss-1b", action="store_true", help="measure streaming RTN peak RSS on a random 1B model")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder for --rss-1b (needs ~3 GiB)")
    ap.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rss_child:
        return rss_child(*a.rss_child)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.rss_1b:
        with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
            print(rss_1b(Path(tmp)))
        return
    if not (a.model / "model.safetensors").is_file():
        sys.exit(f"{a.model}: no checkpoint (train the demo model first)")
    table(a.model, a.tokens, a.extra)


if __name__ == "__main__":
    main()
