"""Huginn-0125 at its real shape on this machine (run by hand): a random-weight checkpoint of the real
huginn_raven shape (d 5280, 55 heads, 2 + 4 + 2 sandwich layers, vocab 65536, intermediate 17920; bf16
shards with model.safetensors.index.json, as a user has it) through

    edgeloop import -> edgeloop quantize (RTN INT4, G=32) -> edgeloop export (external data, parity on)
    -> edgeloop bench (16-token greedy generation) at num_loops 4, 8, 16, 32 under shared and per-step KV

each stage in a fresh process under /usr/bin/time (wall time, peak RSS). Prints one table and writes
WORK/results.json. Needs ~25 GB of disk under WORK; `--small` runs a 1/4-width shape to check the script.

    python benchmarks/bench_huginn.py --work /tmp/huginn-bench
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REAL = dict(n_embd=5280, num_attention_heads=55, n_heads=55, num_key_value_heads=55, intermediate_size=17920,
            n_layers_in_prelude=2, n_layers_in_recurrent_block=4, n_layers_in_coda=2, mean_recurrence=32,
            vocab_size=65536, padded_vocab_size=65536, block_size=4096, norm_eps=1e-6, qk_bias=True, bias=False,
            tie_embeddings=True, rope_base=50000, injection_type="linear", state_init="like-init",
            block_class_name="SandwichBlock", mlp_class_name="GatedMLP", nonlin_name="SiLU",
            norm_class_name="RMSNorm_llama", architecture_class_name="RecurrentGPT", model_type="huginn_raven",
            architectures=["RavenForCausalLM"], bos_token_id=65504, eos_token_id=65505, pad_token_id=65509,
            n_layers=8, torch_dtype="bfloat16")


def write_checkpoint(folder: Path, cfg: dict, shards: int = 4, seed: int = 0) -> int:
    """Random bf16 weights of `cfg` in `shards` safetensors files + index, tensor by tensor; returns bytes."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    d, H, I, V = cfg["n_embd"], cfg["num_attention_heads"], cfg["intermediate_size"], cfg["padded_vocab_size"]
    hd = d // H
    shapes = {"transformer.wte.weight": (V, d), "transformer.adapter.weight": (d, 2 * d),
              "transformer.ln_f.weight": (d,)}
    for sec, key in (("prelude", "n_layers_in_prelude"), ("core_block", "n_layers_in_recurrent_block"),
                     ("coda", "n_layers_in_coda")):
        for i in range(cfg[key]):
            p = f"transformer.{sec}.{i}."
            shapes.update({p + f"norm_{k}.weight": (d,) for k in (1, 2, 3, 4)})
            shapes.update({p + "attn.Wqkv.weight": (3 * d, d), p + "attn.qk_bias": (2, 1, H, hd),
                           p + "attn.proj.weight": (d, d), p + "mlp.fc.weight": (2 * I, d), p + "mlp.proj.weight": (d, I)})
    total = sum(math.prod(s) * 2 for s in shapes.values())
    folder.mkdir(parents=True, exist_ok=True)
    weight_map, shard, size, n = {}, {}, 0, 1
    per_shard = total / shards

    def flush():
        nonlocal shard, size, n
        name = f"model-{n:05d}-of-{shards:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size, n = {}, 0, n + 1

    for name, shape in shapes.items():
        if name.endswith(("norm_1.weight", "norm_2.weight", "norm_3.weight", "norm_4.weight", "ln_f.weight")):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("qk_bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) * (0.02 if "wte" in name else shape[-1] ** -0.5)
        shard[name] = t.bfloat16()
        size += t.numel() * 2
        if size >= per_shard and n < shards:
            flush()
    if shard:
        flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({**cfg, "init_values": {"embed_scale": math.sqrt(d)}}))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 65504 % cfg["vocab_size"],
                                                               "eos_token_id": [65505 % cfg["vocab_size"]],
                                                               "pad_token_id": 65509 % cfg["vocab_size"]}))
    return total


def timed(args: list[str], log: Path) -> dict:
    """One command in a fresh process under /usr/bin/time -v: wall seconds, peak RSS (GiB), exit code."""
    t = time.time()
    r = subprocess.run(["/usr/bin/time", "-v", *args], capture_output=True, text=True)
    log.write_text(r.stdout + "\n" + r.stderr)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    out = {"seconds": round(time.time() - t, 1), "peak_rss_gib": int(peak.group(1)) / 2**20 if peak else None,
           "rc": r.returncode}
    if r.returncode:
        out["error"] = (r.stderr.strip().splitlines() or ["?"])[-1]
    out["stdout"] = r.stdout
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--small", action="store_true", help="a 1/4-width, 1/16-vocab shape (checks the script)")
    ap.add_argument("--loops", default="4,8,16,32")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the folders (default: removed as they are used up)")
    a = ap.parse_args()
    cfg = dict(REAL)
    if a.small:
        cfg.update(n_embd=960, num_attention_heads=10, n_heads=10, num_key_value_heads=10, intermediate_size=3584,
                   vocab_size=4096, padded_vocab_size=4096)
    w = a.work
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    edge = [sys.executable, "-m", "edgeloop.cli"]
    res: dict = {"shape": {k: cfg[k] for k in ("n_embd", "num_attention_heads", "intermediate_size", "vocab_size",
                                             "n_layers_in_prelude", "n_layers_in_recurrent_block", "n_layers_in_coda",
                                             "mean_recurrence")}}
    t = time.time()
    res["bf16_bytes"] = write_checkpoint(w / "hf", cfg)
    res["write_seconds"] = round(time.time() - t, 1)
    res["fp32_bytes"] = res["bf16_bytes"] * 2
    print(f"wrote {w / 'hf'}: {res['bf16_bytes'] / 1e9:.2f} GB bf16 in {res['write_seconds']} s", flush=True)
    stages = {
        "import": [*edge, "import", str(w / "hf"), "-o", str(w / "ck"), "--json"],
        # G=32: Huginn's K = 5280 is a multiple of 32, not of 64 or 128 (llama.cpp's Q4_0 blocks are 32 too)
        "quantize": [*edge, "quantize", str(w / "ck"), "-o", str(w / "q"), "--method", "rtn", "--group-size", "32",
                     "--json"],
        "export shared": [*edge, "export", str(w / "q"), "-o", str(w / "x-shared"), "--external-data",
                          "--accuracy-level", "4", "--json"],
        "export per-step": [*edge, "export", str(w / "q"), "-o", str(w / "x-per-step"), "--external-data",
                            "--accuracy-level", "4", "--kv-policy", "per-step", "--max-loops",
                            str(max(int(x) for x in a.loops.split(","))), "--json"],
    }
    res["stages"] = {}
    for name, cmd in stages.items():
        r = timed(cmd, w / f"{name.replace(' ', '-')}.log")
        r.pop("stdout")
        res["stages"][name] = r
        print(f"{name}: {r}", flush=True)
        if r["rc"]:
            break
        if name == "quantize" and not a.keep:
            shutil.rmtree(w / "hf")  # the import holds the same bytes; keep the disk free
    for name in ("x-shared", "x-per-step"):
        if (w / name / "manifest.json").is_file():
            m = json.loads((w / name / "manifest.json").read_text())
            res[name] = {"file_bytes": sum(m["file_bytes"].values()), "parity": m["parity"], "kv": m["kv"]}
    res["bench"] = []
    for name in ("x-shared", "x-per-step"):
        if not (w / name / "model.onnx").is_file():
            continue
        for L in (int(x) for x in a.loops.split(",")):
            cmd = [*edge, "bench", str(w / name), "--num-loops", str(L), "--prefill-tokens", "16",
                   "--decode-tokens", "16", "--threads", str(a.threads), "--json"]
            r = timed(cmd, w / f"bench-{name}-{L}.log")
            stdout = r.pop("stdout")
            row = {"export": name, "num_loops": L, **r}
            if not r["rc"]:
                b = json.loads(stdout)
                row.update({k: b[k] for k in ("decode_tokens_per_s", "prefill_ms", "kv_bytes_per_token",
                                              "peak_rss_bytes", "steady_rss_bytes", "file_bytes")})
            res["bench"].append(row)
            print(row, flush=True)
    (w / "results.json").write_text(json.dumps(res, indent=2))
    print("\n| stage | wall s | peak RSS GiB |\n|---|---|---|")
    for name, r in res["stages"].items():
        print(f"| {name} | {r['seconds']} | {r['peak_rss_gib']:.2f} |")
    print(f"\nfp32 size {res['fp32_bytes'] / 2**30:.2f} GiB; INT4 file "
          f"{res.get('x-shared', {}).get('file_bytes', 0) / 2**30:.2f} GiB")
    print("\n| KV policy | num_loops | decode tok/s | KV bytes/token | peak RSS GiB (session creation) |\n"
          "|---|---|---|---|---|")
    for row in res["bench"]:
        if "decode_tokens_per_s" in row:
            print(f"| {row['export'][2:]} | {row['num_loops']} | {row['decode_tokens_per_s']:.3f} | "
                  f"{row['kv_bytes_per_token']:,} | {row['peak_rss_bytes'] / 2**30:.2f} |")


if __name__ == "__main__":
    main()
