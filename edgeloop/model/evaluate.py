"""Strided perplexity and sampling with the PyTorch model (the fp32 reference for every later stage)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from edgeloop.model.model import Hyperloop, KVCache
from edgeloop.strided import windows


@torch.no_grad()
def perplexity(model: Hyperloop, ids: np.ndarray, ctx: int | None = None, stride: int | None = None,
               num_loops: int | None = None, exit_threshold: float | None = None) -> tuple[float, int]:
    """exp(mean NLL) over `ids` with strided windows; returns (ppl, tokens scored)."""
    ctx = ctx or model.cfg.max_seq_len
    stride = stride or ctx // 2
    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    nll, count = 0.0, 0
    for begin, end, scored in windows(len(ids_t), ctx, stride):
        x = ids_t[begin:end].unsqueeze(0)
        logits = model(x[:, :-1], num_loops=num_loops, exit_threshold=exit_threshold)[0, scored - begin - 1:]
        target = ids_t[scored:end]
        nll += F.cross_entropy(logits.float(), target, reduction="sum").item()
        count += len(target)
    return math.exp(nll / count), count


@torch.no_grad()
def decode_perplexity(model: Hyperloop, ids: np.ndarray, policy: str | None = None, num_loops: int | None = None,
                      exit_threshold: float | None = None, dtype: torch.dtype | None = None) -> tuple[float, int]:
    """exp(mean NLL) of ids[1:] fed one token at a time through a KVCache under `policy` (per-step or shared)
    holding `dtype` (default the config's kv_dtype); returns (ppl, tokens scored)."""
    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))[: model.cfg.max_seq_len]
    cache, nll = KVCache(model.cfg, policy, dtype), 0.0
    for t in range(len(ids_t) - 1):
        logits = model(ids_t[None, t:t + 1], num_loops=num_loops, cache=cache, exit_threshold=exit_threshold)[0]
        nll += F.cross_entropy(logits.float(), ids_t[t + 1:t + 2], reduction="sum").item()
    return math.exp(nll / (len(ids_t) - 1)), len(ids_t) - 1


@torch.no_grad()
def generate(model: Hyperloop, ids: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0, num_loops: int | None = None, stop: set[int] | None = None,
             exit_threshold: float | None = None):
    """New token ids one by one through the KV cache (greedy when temperature == 0); the settings are checked
    when it is called, before the first token."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens {max_new_tokens!r}: must be an integer >= 0")
    if not temperature >= 0:
        raise ValueError(f"temperature {temperature}: must be >= 0 (0 = greedy)")
    if top_k < 0:
        raise ValueError(f"top_k {top_k}: must be >= 0 (0 = off)")
    if exit_threshold is not None and not (model.cfg.exit_gate and exit_threshold >= 0):
        raise ValueError(f"exit_threshold {exit_threshold}: " + ("a number >= 0" if model.cfg.exit_gate else
                                                                 "this model has no exit gate"))
    loops = model.cfg.num_loops if num_loops is None else num_loops
    if not 1 <= loops <= model.cfg.loop_limit:
        raise ValueError(f"num_loops {loops}: must be in 1..{model.cfg.loop_limit}")
    return _tokens(model, ids, max_new_tokens, temperature, top_k, seed, num_loops, stop, exit_threshold)


def _tokens(model: Hyperloop, ids: list[int], max_new_tokens: int, temperature: float, top_k: int, seed: int,
            num_loops: int | None, stop: set[int] | None, exit_threshold: float | None):
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(model.cfg)
    x = torch.tensor([ids], dtype=torch.long)
    for _ in range(max_new_tokens):
        if cache.length + x.shape[1] > model.cfg.max_seq_len:
            break
        logits = model(x, num_loops=num_loops, cache=cache, exit_threshold=exit_threshold)[0, -1]
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
        yield nxt
        if stop and nxt in stop:
            break
        x = torch.tensor([[nxt]], dtype=torch.long)
