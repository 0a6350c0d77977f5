"""The parity check run on every export: onnxruntime CPU vs the PyTorch model (fp32, or the INT4
dequantize-on-the-fly reference), prefill of a fixed prompt + greedy decode steps through the KV cache,
at num_loops = r and at a smaller loop count."""
from __future__ import annotations

import numpy as np
import torch

from edgeloop.model.config import HyperloopConfig
from edgeloop.model.model import Hyperloop, KVCache

PROMPT = "In the beginning God created the heaven and the earth."


def empty_past(cfg: HyperloopConfig, batch: int = 1) -> dict[str, np.ndarray]:
    z = np.zeros((batch, cfg.n_kv_heads, 0, cfg.head_dim), np.float32)
    return {f"past_key_values.{i}.{k}": z for i in range(cfg.effective_layers) for k in ("key", "value")}


def feeds_for(cfg, ids: np.ndarray, past: dict, num_loops: int | None, has_loop_input: bool) -> dict:
    """ORT feeds for new tokens `ids` [B, S] after `past` (no padding)."""
    B, S = ids.shape
    P = past[f"past_key_values.{cfg.slot(0, 0)}.key"].shape[2]  # loop 0 always runs
    f = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((B, P + S), np.int64),
         "position_ids": np.broadcast_to(np.arange(P, P + S, dtype=np.int64), (B, S)).copy(), **past}
    if has_loop_input and num_loops is not None:
        f["num_loops"] = np.array(num_loops, np.int64)
    return f


def has_num_loops(session) -> bool:
    """num_loops is an input with a default (an overridable initializer), so ORT lists it apart."""
    return "num_loops" in {i.name for i in [*session.get_inputs(), *session.get_overridable_initializers()]}


def presents_to_past(names: list[str], outs: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {n.replace("present.", "past_key_values.", 1): o for n, o in zip(names, outs) if n.startswith("present.")}


@torch.no_grad()
def parity(session, model: Hyperloop, prompt_ids: list[int], decode_steps: int = 16,
           loop_counts: list[int] | None = None) -> dict:
    """Max |logit error| between onnxruntime and PyTorch per loop count, prefill + decode."""
    cfg = model.cfg
    has_loop_input = has_num_loops(session)
    if loop_counts is None:
        loop_counts = sorted({cfg.num_loops, max(1, cfg.num_loops // 2)}, reverse=True) if has_loop_input \
            else [cfg.num_loops]
    names = [o.name for o in session.get_outputs()]
    result = {}
    for L in loop_counts:
        cache, past = KVCache(cfg), empty_past(cfg)
        ids = np.asarray([prompt_ids], np.int64)
        err, max_logit = 0.0, 0.0
        for _ in range(decode_steps + 1):
            ref = model(torch.from_numpy(ids), num_loops=L, cache=cache)[:, -ids.shape[1]:].numpy()
            outs = session.run(names, feeds_for(cfg, ids, past, L, has_loop_input))
            got = outs[names.index("logits")]
            err = max(err, float(np.abs(got - ref).max()))
            max_logit = max(max_logit, float(np.abs(ref).max()))
            past = {**past, **presents_to_past(names, outs)}
            ids = ref[:, -1:].argmax(-1).astype(np.int64)
        result[str(L)] = {"max_abs_err": err, "max_abs_logit": max_logit, "steps": decode_steps,
                          "prompt_tokens": len(prompt_ids)}
    return result
