"""CPU trainer: AdamW, warmup + cosine, bf16 autocast, periodic validation perplexity, resumable,
deterministic from a seed (the batch and the loop count of step s depend only on (seed, s)).

Randomized depth (`loops`): each step runs r loops drawn from
  fixed              r = num_loops
  uniform            r ~ U{1 .. loop_limit}
  poisson-lognormal  lambda ~ LogNormal(log(m) - sigma^2 / 2, sigma), r = min(Poisson(lambda) + 1, loop_limit)
                     (Huginn's sampler: m = loops_mean, default num_loops, sigma = loops_sigma = 0.5)
with backpropagation through the last `backprop_loops` loops only (0 = all; Huginn: 8)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgeloop.io import check_output_dir
from edgeloop.model.checkpoint import load_tokenizer, save_checkpoint
from edgeloop.model.config import HyperloopConfig
from edgeloop.model.data import encode, splits, train_tokenizer
from edgeloop.model.evaluate import perplexity
from edgeloop.model.model import Hyperloop


LOOP_SAMPLERS = ("fixed", "uniform", "poisson-lognormal")
TOKENS_PER_STEP = 1 << 20  # batch_size x seq_len: a CPU trainer's activations for a million tokens are already GBs


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 512
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    val_every: int = 200
    val_tokens: int = 4096
    save_every: int = 100
    bf16: bool = True
    threads: int = 0  # 0 = torch's default
    dtype: str = "float16"  # stored dtype of the final checkpoint
    text_files: list[str] | None = None
    tokenizer: str | None = None  # folder with tokenizer.json; default: train one on the training text
    loops: str = "fixed"  # the loop count per step: fixed | uniform | poisson-lognormal (module docstring)
    loops_mean: float = 0.0  # poisson-lognormal: the mean m (0 = num_loops)
    loops_sigma: float = 0.5
    backprop_loops: int = 0  # truncated backpropagation through the last k loops (0 = all)

    def validate(self) -> "TrainConfig":
        """Every setting in range (one line naming the option), before any text is read or memory sized."""
        for name in ("steps", "batch_size", "val_every", "save_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} {v!r}: must be a positive integer")
        for name in ("seq_len", "val_tokens"):
            if getattr(self, name) < 2:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 2")
        if self.batch_size * self.seq_len > TOKENS_PER_STEP:
            raise ValueError(f"--batch-size {self.batch_size} x --seq-len {self.seq_len}: more than {TOKENS_PER_STEP:,} "
                             f"tokens per step (the activations are sized by it)")
        if self.warmup < 0 or self.threads < 0:
            raise ValueError(f"--warmup {self.warmup} / --threads {self.threads}: must be >= 0")
        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0 or (name == "lr" and v == 0):
                raise ValueError(f"{name} {v}: must be a finite {'positive' if name == 'lr' else 'non-negative'} number")
        if self.loops not in LOOP_SAMPLERS:
            raise ValueError(f"--loops {self.loops!r}: use {', '.join(LOOP_SAMPLERS)}")
        if self.backprop_loops < 0 or not math.isfinite(self.loops_mean) or self.loops_mean < 0 \
                or not math.isfinite(self.loops_sigma) or self.loops_sigma < 0:
            raise ValueError(f"--backprop-loops {self.backprop_loops} / --loops-mean {self.loops_mean} / "
                             f"--loops-sigma {self.loops_sigma}: must be finite and >= 0")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"--dtype {self.dtype!r}: use float32, float16 or bfloat16")
        return self

    def loops_at(self, cfg: HyperloopConfig, step: int) -> int:
        """The loop count of step `step`, drawn from a generator seeded by (seed, step) (resumable)."""
        if self.loops == "fixed":
            return cfg.num_loops
        rng = np.random.default_rng([self.seed, step, 1])
        if self.loops == "uniform":
            return int(rng.integers(1, cfg.loop_limit + 1))
        m, sigma = self.loops_mean or cfg.num_loops, self.loops_sigma
        lam = rng.lognormal(math.log(m) - sigma ** 2 / 2, sigma)
        return int(min(rng.poisson(lam) + 1, cfg.loop_limit))

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def eval_loops(cfg: HyperloopConfig) -> list[int]:
    """The loop counts a trained model's perplexity is reported at: every one up to a limit of 8; past it 1,
    the powers of two, r/2, r and the limit."""
    top = cfg.loop_limit
    if top <= 8:
        return list(range(1, top + 1))
    return sorted({1, max(1, cfg.num_loops // 2), cfg.num_loops, top} | {1 << i for i in range(top.bit_length())
                                                                         if 1 << i <= top})


def batch(tokens: np.ndarray, tc: TrainConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of seq_len + 1 tokens, drawn from a generator seeded by (seed, step)."""
    rng = np.random.default_rng([tc.seed, step])
    starts = rng.integers(0, len(tokens) - tc.seq_len - 1, size=tc.batch_size)
    w = torch.from_numpy(np.stack([tokens[s:s + tc.seq_len + 1] for s in starts]))
    return w[:, :-1], w[:, 1:]


def param_groups(model: Hyperloop, weight_decay: float):
    """Decay the matrices of linears and the embedding; never norms or hyper-connection parameters."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    params = list(model.parameters())
    return [{"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]


def state_path(out: Path) -> Path:
    return out.parent / f"{out.name}.train-state.pt"


def save_state(path: Path, model, opt, step: int, log: list, cfg: HyperloopConfig, tc: TrainConfig, elapsed):
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": step, "elapsed": elapsed,
                "log": json.dumps(log), "config": json.dumps(cfg.to_dict()),
                "train": json.dumps(dataclasses.asdict(tc))}, tmp)
    os.replace(tmp, path)


def train(cfg: HyperloopConfig, out: str | os.PathLike, tc: TrainConfig, *, resume: bool = False,
          overwrite: bool = False, command: str = "", progress: bool = True) -> dict:
    """Train `cfg` and write the checkpoint folder `out` atomically; returns the training summary."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    out = check_output_dir(out, overwrite)
    cfg.validate()
    tc.validate()
    if tc.seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len={tc.seq_len} is beyond the model's max_seq_len={cfg.max_seq_len}")
    if tc.threads:
        torch.set_num_threads(tc.threads)
    console = Console(stderr=True)
    train_text, val_text = splits(tc.text_files)
    tok = load_tokenizer(tc.tokenizer) if tc.tokenizer else train_tokenizer(train_text, cfg.vocab_size)
    if tok.get_vocab_size() > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens, more than vocab_size={cfg.vocab_size}")
    train_ids, val_ids = encode(tok, train_text), encode(tok, val_text)[: tc.val_tokens]
    if len(train_ids) <= tc.seq_len + 1:
        raise ValueError(f"the training text has {len(train_ids)} tokens, too few for seq_len={tc.seq_len}")

    torch.manual_seed(tc.seed)
    model = Hyperloop(cfg)
    model.reset_parameters(seed=tc.seed)
    opt = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(0.9, 0.95), eps=1e-8)
    start, log, elapsed = 0, [], 0.0
    sp = state_path(out)
    if resume and sp.is_file():
        st = torch.load(sp, weights_only=True)
        if json.loads(st["config"]) != cfg.to_dict():
            raise ValueError(f"{sp}: the saved training state is for another model config")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optim"])
        start, log, elapsed = st["step"], json.loads(st["log"]), st["elapsed"]
        console.log(f"resumed at step {start} from {sp}")

    tokens_per_step = tc.batch_size * tc.seq_len
    columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn()]
    t0 = time.time() - elapsed
    val_ppl = None
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("train", total=tc.steps, completed=start, info="")
        for step in range(start, tc.steps):
            model.train()
            for g in opt.param_groups:
                g["lr"] = tc.lr_at(step)
            x, y = batch(train_ids, tc, step)
            r = tc.loops_at(cfg, step)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tc.bf16):
                logits = model(x, num_loops=r, grad_loops=tc.backprop_loops or None)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            done = step + 1
            tps = (done - start) * tokens_per_step / max(time.time() - t0 - elapsed, 1e-9)
            entry = {"step": done, "loss": round(loss.item(), 4), "lr": tc.lr_at(step)} | \
                ({"loops": r} if tc.loops != "fixed" else {})
            if done % tc.val_every == 0 or done == tc.steps:
                model.eval()
                val_ppl, _ = perplexity(model, val_ids, ctx=tc.seq_len)
                entry["val_ppl"] = round(val_ppl, 3)
                console.log(f"step {done}: loss {loss.item():.3f}, validation perplexity {val_ppl:.2f}")
            log.append(entry)
            bar.update(task, completed=done, info=f"loss {loss.item():.3f}  {tps:,.0f} tok/s"
                       + (f"  val ppl {val_ppl:.2f}" if val_ppl else ""))
            if done % tc.save_every == 0 and done < tc.steps:
                save_state(sp, model, opt, done, log, cfg, tc, time.time() - t0)

    model.eval()
    seconds = time.time() - t0
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[tc.dtype]
    with torch.no_grad():  # the card reports the model as stored
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    val_ppl, _ = perplexity(model, val_ids, ctx=cfg.max_seq_len)
    by_loops = {str(r): round(val_ppl if r == cfg.num_loops else perplexity(model, val_ids, ctx=cfg.max_seq_len,
                                                                          num_loops=r)[0], 4)
                for r in eval_loops(cfg)}
    summary = {"steps": tc.steps, "tokens_seen": tc.steps * tokens_per_step, "train_tokens": int(len(train_ids)),
               "final_loss": log[-1]["loss"] if log else None, "val_ppl": round(val_ppl, 4),
               "val_ppl_by_loops": by_loops, "val_tokens": int(len(val_ids)), "seconds": round(seconds, 1), "params": model.num_parameters(),
               "command": command, "train_config": dataclasses.asdict(tc), "torch": torch.__version__,
               "threads": torch.get_num_threads()}
    from edgeloop.model.card import model_card

    save_checkpoint(model, out, dtype=dtype, tokenizer=tok, card=model_card(cfg, summary, out.name),
                    overwrite=overwrite, extra_config={"extra": {**cfg.extra, "training": summary}},
                    extra_files={"train_log.json": json.dumps(log) + "\n"})
    sp.unlink(missing_ok=True)
    return summary
