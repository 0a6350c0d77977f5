"""The KV-cache convention of every edgeloop export, in one place (numpy only: apps import it).

    inputs   past_key_values.{i}.key | .value   [batch, kv_heads, past_sequence_length, head_dim]
    outputs  present.{i}.key | .value           [batch, kv_heads, total_sequence_length, head_dim]
for each slot i: begin layers, then the middle layers, then end layers. Two policies for the middle:
    per-step  one slot per (loop l, middle layer j): n_begin + l * n_middle + j, for l < num_loops (the
              loops the export covers). A loop that does not run passes its past through unchanged, so
              its slots stay as they were (empty, for a sequence that always ran fewer loops): every
              token of a sequence runs the same loop count.
    shared    one slot per middle layer j: n_begin + j. Every loop attends over that slot's past (each
              earlier token at the last loop it ran) plus its own new keys/values; the present keeps the
              last loop's. KV bytes per token do not grow with the loop count, and any token may run any
              number of loops (Huginn's compress-s4 cache).
The first step feeds empty pasts ([B, kv_heads, 0, head_dim]); each step's presents are the next step's
pasts. In place (manifest "kv": "in_place", the fused graph: every present is its own past written by
GroupQueryAttention or ScatterND, export/folder.py: in_place): the pasts may instead be buffers
[B, kv_heads, N, head_dim] with N at least the longest length a step reaches (at most max_seq_len), each
present bound to its past's buffer; attention_mask [B, T] still gives the length, and a step writes its
keys/values at T-S..T-1 of the buffer (onnxruntime-genai's past_present_share_buffer).
manifest.json records the names and the layout ("kv"), and edgeloop/runtime/web/edgeloop.mjs reads them from
there.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import numpy as np

PAST, PRESENT = "past_key_values.", "present."  # name prefixes: f"{PAST}{i}.{kind}"
KINDS = ("key", "value")
DTYPES = {"float32": np.float32, "float16": np.float16}


def past_name(i: int, kind: str) -> str:
    return f"{PAST}{i}.{kind}"


def present_name(i: int, kind: str) -> str:
    return f"{PRESENT}{i}.{kind}"


def next_past(names: Sequence[str], outs: Sequence[Any]) -> dict[str, Any]:
    """The presents among a run's outputs (names[i] -> outs[i]) renamed as the next run's pasts."""
    return {PAST + n[len(PRESENT):]: o for n, o in zip(names, outs) if n.startswith(PRESENT)}


def bind_in_place(binding, feeds: dict[str, Any], buffers: dict[str, Any], buffers_bound: bool = False) -> None:
    """An onnxruntime IOBinding for an in-place step: each past fed from its buffer (an OrtValue) and its
    present bound to the same buffer; every other feed bound from host memory, as an OrtValue (bind_cpu_input
    does not know the inputs with a default, such as num_loops), kept alive with the binding. buffers_bound:
    the binding already holds these buffers (a binding reused step after step): only the other feeds are
    bound again (hundreds of slots cost more to bind than a small model's step takes to run)."""
    from onnxruntime import OrtValue

    keep = binding.__dict__["_edgeloop_feeds"] = []
    for name, value in feeds.items():
        if name in buffers:
            if not buffers_bound:
                binding.bind_ortvalue_input(name, buffers[name])
                binding.bind_ortvalue_output(PRESENT + name[len(PAST):], buffers[name])
        else:
            keep.append(OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value)))
            binding.bind_ortvalue_input(name, keep[-1])


@dataclass(frozen=True)
class Layout:
    """Which slot holds which layer's keys/values, and their shape and dtype."""
    n_begin: int
    n_middle: int
    n_end: int
    num_loops: int  # the loop count the slots cover (per-step); the most loops a token may run (shared)
    kv_heads: int
    head_dim: int
    dtype: str = "float32"
    policy: str = "per-step"

    @classmethod
    def of_config(cls, cfg, policy: str = "per-step", dtype: str = "float32") -> "Layout":
        """From a HyperloopConfig (or anything with its fields): slots for its loop_limit loops."""
        return cls(cfg.n_begin, cfg.n_middle, cfg.n_end, cfg.loop_limit, cfg.n_kv_heads, cfg.head_dim, dtype, policy)

    @classmethod
    def of_manifest(cls, m: dict) -> "Layout":
        """From an export's manifest.json ("kv" when recorded; older exports: the config)."""
        if isinstance(m.get("kv"), dict):
            kv = m["kv"]
            return cls(*(int(kv[k]) for k in ("n_begin", "n_middle", "n_end", "num_loops", "kv_heads", "head_dim")),
                       str(kv.get("dtype", "float32")), str(kv.get("policy", "per-step")))
        c = m["config"]
        return cls(int(c["n_begin"]), int(c["n_middle"]), int(c["n_end"]), int(m["num_loops"]), int(c["n_kv_heads"]),
                   int(c.get("attn_head_dim") or int(c["d_model"]) // int(c["n_heads"])))

    @property
    def shared(self) -> bool:
        return self.policy == "shared"

    @property
    def middle_slots(self) -> int:
        return self.n_middle if self.shared else self.num_loops * self.n_middle

    @property
    def layers(self) -> int:
        """Slots: past/present pairs in the graph."""
        return self.n_begin + self.middle_slots + self.n_end

    def slot(self, loop: int, layer: int) -> int:
        """Slot of middle layer `layer` in loop `loop`."""
        return self.n_begin + (0 if self.shared else loop * self.n_middle) + layer

    def end_slot(self, layer: int) -> int:
        return self.n_begin + self.middle_slots + layer

    def layers_run(self, num_loops: int | None = None) -> int:
        """Slots that grow by one token per step when `num_loops` loops run."""
        if self.shared:
            return self.layers
        L = self.num_loops if num_loops is None else num_loops
        return self.n_begin + L * self.n_middle + self.n_end

    def bytes_per_token(self, num_loops: int | None = None) -> int:
        """Keys + values one token adds to the cache of one sequence."""
        return 2 * self.layers_run(num_loops) * self.kv_heads * self.head_dim * np.dtype(DTYPES[self.dtype]).itemsize

    def past_names(self) -> list[str]:
        return [past_name(i, k) for i in range(self.layers) for k in KINDS]

    def present_names(self) -> list[str]:
        return [present_name(i, k) for i in range(self.layers) for k in KINDS]

    def empty_past(self, batch: int = 1) -> dict[str, np.ndarray]:
        """The first step's pasts: [batch, kv_heads, 0, head_dim] for every slot."""
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), DTYPES[self.dtype])
        return {n: z for n in self.past_names()}

    def past_length(self, past: dict[str, np.ndarray]) -> int:
        """Tokens already in `past` (loop 0 always runs, so its first slot always grew)."""
        return int(past[past_name(self.slot(0, 0), "key")].shape[2])

    def empty_kv(self, batch: int = 1) -> np.ndarray:
        return np.zeros((batch, self.kv_heads, 0, self.head_dim), DTYPES[self.dtype])

    def manifest(self) -> dict[str, Any]:
        """The "kv" entry of manifest.json: names (printf patterns), layout, shape and dtype."""
        return {"past_key": past_name("%d", "key"), "past_value": past_name("%d", "value"),  # type: ignore[arg-type]
                "present_key": present_name("%d", "key"), "present_value": present_name("%d", "value"),
                "layers": self.layers, "shape": ["batch", "kv_heads", "sequence", "head_dim"], **asdict(self)}

    def problem(self, inputs: Iterable[tuple[str, str, Sequence]], outputs: Iterable[str]) -> str | None:
        """What keeps a model with these inputs (name, type, shape) and output names from following the
        convention, or None. Besides the pasts: input_ids, attention_mask, position_ids (int64) and the
        optional num_loops; outputs logits and the presents."""
        onnx_type = {"float32": "tensor(float)", "float16": "tensor(float16)"}[self.dtype]
        want = {"input_ids": "tensor(int64)", "attention_mask": "tensor(int64)", "position_ids": "tensor(int64)",
                **{n: onnx_type for n in self.past_names()}}
        have = {name: (typ, shape) for name, typ, shape in inputs}
        for name, typ in want.items():
            if name not in have:
                return f"input '{name}' is missing ({len(have)} inputs, {self.layers} effective layers expected)"
            if have[name][0] != typ:
                return f"input '{name}' is {have[name][0]}, expected {typ}"
            shape = have[name][1]
            if name.startswith("past_") and (len(shape) != 4 or any(
                    isinstance(d, int) and d != w for d, w in zip(shape, (None, self.kv_heads, None, self.head_dim))
                    if w is not None)):
                return f"input '{name}' has shape {list(shape)}, expected [batch, {self.kv_heads}, past, {self.head_dim}]"
        extra = sorted(set(have) - set(want) - {"num_loops"})
        if extra:
            return f"unexpected input '{extra[0]}'"
        lost = [n for n in ["logits", *self.present_names()] if n not in set(outputs)]
        return f"output '{lost[0]}' is missing" if lost else None
