"""The parity check run on every export: onnxruntime CPU vs the PyTorch model (fp32, or the INT4
dequantize-on-the-fly reference), prefill of a fixed prompt + greedy decode steps through the KV cache,
at num_loops = r and at a smaller loop count, and a left-padded batch of two prompts."""
from __future__ import annotations

import numpy as np
import torch

from edgeloop.kv import Layout, bind_in_place, next_past
from edgeloop.model.config import HyperloopConfig
from edgeloop.model.model import Hyperloop, KVCache

PROMPT = "In the beginning God created the heaven and the earth."


def empty_past(cfg: HyperloopConfig, batch: int = 1, policy: str | None = None) -> dict[str, np.ndarray]:
    return cfg.kv_layout(policy).empty_past(batch)


def feeds_for(cfg, ids: np.ndarray, past: dict, num_loops: int | None, has_loop_input: bool,
              mask: np.ndarray | None = None, exit_threshold: float | None = None) -> dict:
    """ORT feeds for new tokens `ids` [B, S] after `past`: no padding, or `mask` [B, P+S] (0 = left padding,
    positions = cumsum(mask) - 1); the exit gate's threshold where one is given."""
    B, S = ids.shape
    P = Layout.of_config(cfg).past_length(past)  # slot 0 of loop 0: the same under either policy
    if mask is None:
        mask = np.ones((B, P + S), np.int64)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)[:, P:]
    f = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64), "position_ids": pos, **past}
    if has_loop_input and num_loops is not None:
        f["num_loops"] = np.array(num_loops, np.int64)
    if exit_threshold is not None:
        f["exit_threshold"] = np.array(exit_threshold, np.float32)
    return f


def zero_state(session) -> dict:
    """Extra feeds so a run starts from the zero state: init_scale = 0 where the export has a random start."""
    names = {i.name for i in [*session.get_inputs(), *session.get_overridable_initializers()]}
    return {"init_scale": np.array(0.0, np.float32)} if "init_scale" in names else {}


def random_start(session, cfg, prompt_ids: list[int]) -> dict:
    """The random start of an export with an init_scale input: two runs at init_scale 1 differ from each
    other and from the zero state, and stay finite (the reference draws a fresh state every forward)."""
    feeds = feeds_for(cfg, np.asarray([prompt_ids], np.int64), empty_past(cfg), None, False)
    zero = session.run(["logits"], {**feeds, **zero_state(session)})[0]
    feeds["init_scale"] = np.array(1.0, np.float32)
    a, b = (session.run(["logits"], feeds)[0] for _ in range(2))
    return {"finite": bool(np.isfinite(a).all() and np.isfinite(b).all()),
            "change_vs_zero_state": float(np.abs(a - zero).max()), "change_between_draws": float(np.abs(a - b).max())}


def has_num_loops(session) -> bool:
    """num_loops is an input with a default (an overridable initializer), so ORT lists it apart."""
    return "num_loops" in {i.name for i in [*session.get_inputs(), *session.get_overridable_initializers()]}


def presents_to_past(names: list[str], outs: list[np.ndarray]) -> dict[str, np.ndarray]:
    return next_past(names, outs)


def default_loop_counts(cfg: HyperloopConfig) -> list[int]:
    """r and r / 2, and 2r when the model may run more loops than r."""
    r = cfg.num_loops
    return sorted({r, max(1, r // 2)} | ({min(2 * r, cfg.loop_limit)} if cfg.loop_limit > r else set()), reverse=True)


@torch.no_grad()
def parity(session, model: Hyperloop, prompt_ids: list[int], decode_steps: int = 16,
           loop_counts: list[int] | None = None, policy: str | None = None,
           exit_threshold: float | None = None) -> dict:
    """Max |logit error| between onnxruntime and PyTorch per loop count, prefill + decode (KV slots under
    `policy`, default the model's). With an exit gate, under `exit_threshold` (default the model's), the
    exit steps must match too (a mismatch counts as an infinite error)."""
    cfg = model.cfg
    has_loop_input = has_num_loops(session)
    if loop_counts is None:
        loop_counts = default_loop_counts(cfg) if has_loop_input else [cfg.num_loops]
    names = [o.name for o in session.get_outputs()]
    gated = "exit_step" in names
    result = {}
    for L in loop_counts:
        cache, past = KVCache(cfg, policy), empty_past(cfg, 1, policy)
        ids = np.asarray([prompt_ids], np.int64)
        err, max_logit, steps = 0.0, 0.0, []
        for _ in range(decode_steps + 1):
            S = ids.shape[1]
            ref, ref_exit = model(torch.from_numpy(ids), num_loops=L, cache=cache, exit_threshold=exit_threshold,
                                  return_exit=True)
            feeds = feeds_for(cfg, ids, past, L, has_loop_input, exit_threshold=exit_threshold if gated else None)
            outs = session.run(names, {**feeds, **zero_state(session)})
            got, ref = outs[names.index("logits")], ref[:, -S:].numpy()
            err = max(err, float(np.abs(got - ref).max()))
            if gated:
                got_exit = outs[names.index("exit_step")]
                steps.append(int(got_exit.max()) + 1)
                if not np.array_equal(got_exit, ref_exit.numpy()):
                    err = float("inf")
            max_logit = max(max_logit, float(np.abs(ref).max()))
            past = {**past, **presents_to_past(names, outs)}
            ids = ref[:, -1:].argmax(-1).astype(np.int64)
        result[str(L)] = {"max_abs_err": err, "max_abs_logit": max_logit, "steps": decode_steps,
                          "prompt_tokens": len(prompt_ids)}
        if gated:
            result[str(L)]["loops_run"] = steps  # per forward: the prefill, then each decode step
    return result


def padded_batch(prompt_ids: list[int]) -> tuple[np.ndarray, np.ndarray, tuple[list[int], list[int], int]]:
    """The prompt and its second half left-padded to its length: ids, mask [2, len] and (a, b, padding)."""
    a = list(prompt_ids)
    b = a[len(a) // 2:] or a[:1]
    pad = len(a) - len(b)
    return (np.array([a, [0] * pad + b], np.int64), np.array([[1] * len(a), [0] * pad + [1] * len(b)], np.int64),
            (a, b, pad))


@torch.no_grad()
def padded_parity(session, model: Hyperloop, prompt_ids: list[int], decode_steps: int = 4,
                  policy: str | None = None, num_loops: int | None = None) -> dict:
    """The same check on a batch of two prompts, the second (a shorter one) left-padded: prefill + decode
    through the KV cache with the attention mask at `num_loops` (default r); errors over the real (unpadded)
    positions only."""
    cfg = model.cfg
    ids, mask, (a, b, pad) = padded_batch(prompt_ids)
    names = [o.name for o in session.get_outputs()]
    cache, past = KVCache(cfg, policy), empty_past(cfg, 2, policy)
    err, max_logit = 0.0, 0.0
    for step in range(decode_steps + 1):
        S = ids.shape[1]
        ref = model(torch.from_numpy(ids), cache=cache, attention_mask=torch.from_numpy(mask), num_loops=num_loops).numpy()
        outs = session.run(names, {**feeds_for(cfg, ids, past, num_loops, has_num_loops(session), mask),
                                   **zero_state(session)})
        got = outs[names.index("logits")]
        real = mask[:, -S:].astype(bool)  # padded query rows are not compared
        err = max(err, float(np.abs(got - ref)[real].max()))
        max_logit = max(max_logit, float(np.abs(ref)[real].max()))
        past = {**past, **presents_to_past(names, outs)}
        ids = ref[:, -1:].argmax(-1).astype(np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    return {"max_abs_err": err, "max_abs_logit": max_logit, "steps": decode_steps, "batch": 2,
            "num_loops": num_loops or cfg.num_loops,
            "prompt_tokens": [len(a), len(b)], "left_padding": [0, pad]}


def in_place_parity(session, cfg: HyperloopConfig, prompt_ids: list[int], decode_steps: int = 4,
                    num_loops: int | None = None) -> dict:
    """An in-place export (kv.py): a left-padded batch of two decoded with every present bound to its past's
    buffer of max_seq_len tokens against the same session fed growing pasts, at `num_loops` (default: the
    graph's); max |logit difference| over the real positions."""
    import onnxruntime as ort

    ids, mask, (_, _, pad) = padded_batch(prompt_ids)
    names = [o.name for o in session.get_outputs()]
    layout = cfg.kv_layout()
    shape = (2, layout.kv_heads, cfg.max_seq_len, layout.head_dim)
    bufs = {n: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32)) for n in layout.past_names()}
    past = empty_past(cfg, 2)
    err = 0.0
    for _ in range(decode_steps + 1):
        S = ids.shape[1]
        feeds = {**feeds_for(cfg, ids, past, num_loops, has_num_loops(session), mask), **zero_state(session)}
        outs = session.run(names, feeds)
        bind = session.io_binding()
        bind.bind_output("logits")
        bind_in_place(bind, feeds, bufs)
        session.run_with_iobinding(bind)
        got, ref = bind.get_outputs()[0].numpy(), outs[names.index("logits")]
        err = max(err, float(np.abs(got - ref)[mask[:, -S:].astype(bool)].max()))
        past = {**past, **presents_to_past(names, outs)}
        ids = ref[:, -1:].argmax(-1).astype(np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    return {"max_abs_diff": err, "steps": decode_steps, "batch": 2, "left_padding": [0, pad],
            "num_loops": num_loops or cfg.num_loops}
