"""The seed's comparison at small scale (run by hand): standard Transformers of 1..r unique middle blocks, a
plain looped model and a Hyperloop model, trained on the same tokens; fp32 and INT4 (RTN, GPTQ, G=128)
perplexity of the ONNX exports; the recurrence-equivalence exponent phi.

    python benchmarks/study.py --work /tmp/study                 # tiny: 1.0-2.2 M unique parameters, CPU
    python benchmarks/study.py --work /tmp/study --scale small --steps 4000   # wider (d 256), longer

(--device cuda runs GPTQ's calibration on a GPU; training runs where `edgeloop train` runs, on the CPU.)

Models (same width, heads, MLP, tokenizer, data order, steps; begin 1 layer, middle M = 2 layers, end 1):
  standard-k   num_loops 1, a middle of k*M distinct layers, k = 1..r  (k = 1: matched unique parameters;
               k = r: matched effective depth)
  looped       the middle looped r times, no hyper-connections (a plain looped transformer)
  hyperloop    the middle looped r times with dynamic hyper-connections over n streams

phi: fit the standard models' validation loss as a + b log k (k = 1..r), find the k_eff at which it equals
the looped model's loss, phi = log k_eff / log r ("looping r times is worth r^phi unique blocks"; the seed
reports 0.46 for looping alone). Every perplexity is measured the same way: the first --eval-tokens tokens
of the demo corpus validation split through the ONNX export on the CPU EP (windows of seq_len, stride half),
the fp32 export's against the fp32 PyTorch model (parity), the INT4 exports' drift against it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCALES = {  # width, heads, KV heads, MLP hidden, vocabulary, context
    "tiny": dict(d_model=128, n_heads=4, n_kv_heads=2, mlp_hidden=384, vocab_size=2048, max_seq_len=256),
    "small": dict(d_model=256, n_heads=4, n_kv_heads=2, mlp_hidden=768, vocab_size=4096, max_seq_len=512),
    "gpu": dict(d_model=512, n_heads=8, n_kv_heads=4, mlp_hidden=1536, vocab_size=8192, max_seq_len=512),
}
MIDDLE = 2  # layers in the middle block


def configs(scale: str, r: int) -> dict:
    """{name: HyperloopConfig} of the study, all at one width."""
    from edgeloop.model.config import HyperloopConfig

    base = dict(SCALES[scale], n_begin=1, n_end=1, mlp="swiglu", qk_norm=True, tie_embeddings=True,
                loop_embedding=False, injection="passthrough", collapse="mean")
    out = {f"standard-{k}": HyperloopConfig(**base, n_middle=k * MIDDLE, num_loops=1, hc="none", n_streams=1)
           for k in range(1, r + 1)}
    out["looped"] = HyperloopConfig(**base, n_middle=MIDDLE, num_loops=r, hc="none", n_streams=1)
    out["hyperloop"] = HyperloopConfig(**{**base, "loop_embedding": True}, n_middle=MIDDLE, num_loops=r,
                                       hc="dynamic", n_streams=4)
    return {k: v.validate() for k, v in out.items()}


def phi(standard_loss: dict[int, float], loop_loss: float, r: int) -> float | None:
    """log k_eff / log r, k_eff where the least-squares line loss = a + b log k crosses loop_loss."""
    ks = sorted(standard_loss)
    xs, ys = [math.log(k) for k in ks], [standard_loss[k] for k in ks]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    if b >= 0:  # more unique blocks did not help: no exponent to read
        return None
    a = my - b * mx
    return ((loop_loss - a) / b) / math.log(r)


def measure(ck: Path, work: Path, eval_tokens: int, device: str) -> dict:
    """fp32 and INT4 (RTN, GPTQ; G = 128) exports of one checkpoint and their perplexity."""
    from edgeloop.export import ExportConfig, export_checkpoint
    from edgeloop.quantize import GPTQConfig, RTNConfig, quantize_checkpoint
    from edgeloop.runtime.drift import evaluate_drift

    row = {}
    for label, qc in (("fp32", None), ("rtn", RTNConfig(group_size=128)),
                      ("gptq", GPTQConfig(group_size=128, calib_samples=64, device=device))):
        src = ck
        if qc is not None:
            src = work / f"{ck.name}-{label}"
            quantize_checkpoint(ck, src, qc, overwrite=True, progress=False)
        x = work / f"{ck.name}-{label}-onnx"
        export_checkpoint(src, x, ExportConfig(format="fp32" if qc is None else "matmulnbits"), overwrite=True)
        d = evaluate_drift(x, reference=ck, tokens=eval_tokens)
        row[label] = {"ppl": round(d["ppl"], 4), "reference_ppl": round(d["reference_ppl"], 4),
                      "drift_pct": round(d["drift_pct"], 3), "file_mb": round(
                          sum(p.stat().st_size for p in x.iterdir() if p.is_file()) / 1e6, 3)}
    return row


def plot(rows: dict, r: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ks = list(range(1, r + 1))
    for label, style in (("fp32", "o-"), ("gptq", "s--")):
        ax.plot(ks, [rows[f"standard-{k}"][label]["ppl"] for k in ks], style, color="gray" if label == "fp32"
                else "silver", label=f"standard, k x {MIDDLE} middle layers ({label})")
    for name, color in (("looped", "tab:blue"), ("hyperloop", "tab:red")):
        for label, marker in (("fp32", "o"), ("gptq", "s")):
            ax.axhline(rows[name][label]["ppl"], color=color, ls="-" if label == "fp32" else ":", lw=1)
            ax.plot([1], [rows[name][label]["ppl"]], marker, color=color,
                    label=f"{name}, {MIDDLE} layers x {r} loops ({label})")
    ax.set_xlabel("unique middle blocks k of the standard model")
    ax.set_ylabel("validation perplexity")
    ax.set_xticks(ks)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for checkpoints, exports and results")
    ap.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    ap.add_argument("--loops", type=int, default=4, help="r")
    ap.add_argument("--steps", type=int, default=1500, help="per model (tiny on 2 CPU cores: ~2-10 min each)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=0, help="0: the scale's context")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--device", default="cpu", help="GPTQ calibration: cpu or cuda")
    ap.add_argument("--only", default="", help="comma-separated model names (default: all)")
    a = ap.parse_args(argv)
    if a.loops < 2:
        ap.error("--loops: at least 2")

    import torch

    from edgeloop.model.data import corpus_split, train_tokenizer
    from edgeloop.model.model import Hyperloop
    from edgeloop.model.train import TrainConfig, train

    torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    cfgs = configs(a.scale, a.loops)
    seq = a.seq_len or SCALES[a.scale]["max_seq_len"]
    tok_dir = a.work / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():  # one tokenizer for every model: the same tokens
        tok_dir.mkdir(exist_ok=True)
        train_tokenizer(corpus_split("train"), SCALES[a.scale]["vocab_size"]).save(str(tok_dir / "tokenizer.json"))
    results_path = a.work / "results.json"
    rows = json.loads(results_path.read_text()) if results_path.is_file() else {}
    names = [n for n in cfgs if not a.only or n in a.only.split(",")]
    for name in names:
        cfg = cfgs[name]
        ck = a.work / name
        tc = TrainConfig(steps=a.steps, batch_size=a.batch_size, seq_len=seq, lr=a.lr, warmup=max(1, a.steps // 20),
                         val_every=max(1, a.steps // 4), threads=a.threads, tokenizer=str(tok_dir), dtype="float32",
                         bf16=a.device == "cpu", save_every=a.steps + 1)
        key = {"cfg": cfg.to_dict(), "tc": dataclasses.asdict(tc)}
        if rows.get(name, {}).get("key") == key:
            print(f"{name}: measured before (same config and training), kept")
            continue
        t0 = time.time()
        s = train(cfg, ck, tc, overwrite=True, progress=False)
        train_s = time.time() - t0
        params = Hyperloop(cfg).num_parameters()
        rows[name] = {"key": key, "unique_params": params["unique"], "effective_params": params["effective"],
                      "effective_layers": cfg.effective_layers, "train_s": round(train_s, 1),
                      "train_loss": s["final_loss"], **measure(ck, a.work, a.eval_tokens, a.device)}
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1) + "\n")
        tmp.replace(results_path)
        f = rows[name]
        print(f"{name}: {f['unique_params']:,} unique params, {cfg.effective_layers} layers, {train_s / 60:.1f} min; "
              f"ppl fp32 {f['fp32']['ppl']:.3f}, RTN {f['rtn']['ppl']:.3f} ({f['rtn']['drift_pct']:+.2f} %), "
              f"GPTQ {f['gptq']['ppl']:.3f} ({f['gptq']['drift_pct']:+.2f} %)", flush=True)
    report(rows, cfgs, a)


def report(rows: dict, cfgs: dict, a) -> None:
    r = a.loops
    if not all(n in rows for n in cfgs):
        print("not every model measured yet: no table")
        return
    std = {k: math.log(rows[f"standard-{k}"]["fp32"]["ppl"]) for k in range(1, r + 1)}
    phis = {n: phi(std, math.log(rows[n]["fp32"]["ppl"]), r) for n in ("looped", "hyperloop")}
    print("\n| model | unique params | effective layers | fp32 ppl | INT4 RTN G=128 | INT4 GPTQ G=128 | INT4 file |")
    print("|---|---|---|---|---|---|---|")
    for n in cfgs:
        f = rows[n]
        print(f"| {n} | {f['unique_params'] / 1e6:.2f} M | {f['effective_layers']} | {f['fp32']['ppl']:.2f} | "
              f"{f['rtn']['ppl']:.2f} ({f['rtn']['drift_pct']:+.2f} %) | {f['gptq']['ppl']:.2f} "
              f"({f['gptq']['drift_pct']:+.2f} %) | {f['gptq']['file_mb']:.2f} MB |")
    for n, p in phis.items():
        print(f"phi ({n}): " + (f"{p:.2f} (looping {r}x is worth {r ** p:.2f} unique middle blocks)" if p is not None
                                else "n/a (the standard models did not improve with depth)"))
    title = (f"{a.scale} scale, {a.steps} steps x {a.batch_size} x {a.seq_len or SCALES[a.scale]['max_seq_len']} "
             f"tokens, r = {r}; phi looped {phis['looped'] or float('nan'):.2f}, "
             f"hyperloop {phis['hyperloop'] or float('nan'):.2f}")
    plot(rows, r, a.work / "study.png", title)
    (a.work / "phi.json").write_text(json.dumps(phis) + "\n")
    print(f"plot: {a.work / 'study.png'}")


if __name__ == "__main__":
    main()
