"""`Runtime`: what an app embeds to run an edgeloop export (numpy + onnxruntime + tokenizers only).

    rt = Runtime("exports/tiny-int4", ep="cpu", threads=0)
    out = rt.generate("And God said", max_new_tokens=40, on_token=lambda row, tok: ...)
    out = rt.generate("And God said", draft_loops=2, lookahead=4)   # self-speculation (speculate.py)
    ppl, n = rt.perplexity(ids)            # the strided windows of the PyTorch reference
    rt.placement()                         # {provider: {"nodes": n, "ops": {...}}}

Feeds follow the export convention: input_ids [B,S], attention_mask [B,P+S] (0 = left padding),
position_ids = cumsum(mask) - 1 (clamped at 0), one past/present pair per effective layer, and the
optional `num_loops` (elastic depth; pasts of loops that do not run stay empty [B,kv,0,hd]).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edgeloop.kv import DTYPES, Layout, bind_in_place, next_past
from edgeloop.runtime.sampling import check_sampling, choose, encode, nll_sum, windows
from edgeloop.runtime.session import (
    ContextLengthError, RuntimeInputError, check_convention, export_tokenizer, make_session, placement_from_profile,
    provider_names, read_manifest, session_options)

EOT = "<|endoftext|>"


@dataclass
class Generation:
    """Result of generate(): new token ids per prompt, their text, why each row stopped ("stop" token,
    "length" = max_new_tokens, "context" = the context is full), the loops each new token ran (an
    exit-gated export: the loop it exited at + 1; otherwise num_loops), and with self-speculation its figures."""
    tokens: list[list[int]]
    text: list[str]
    prompt_tokens: list[int]
    finish: list[str] = field(default_factory=list)
    loops: list[list[int]] = field(default_factory=list)
    speculation: dict | None = None  # self-speculation's figures (speculate.Speculation.as_dict), when it ran


class Runtime:
    """An onnxruntime session on an edgeloop export folder, with generation and perplexity."""

    def __init__(self, folder: str | os.PathLike, ep: str = "cpu", threads: int = 0, num_loops: int | None = None,
                 mmap: bool = True, prepack: bool = True, profile: bool = False, model_file: str = "model.onnx"):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        c = self.manifest["config"]
        self.kv = Layout.of_manifest(self.manifest)  # the KV-cache convention (edgeloop.kv)
        self.n_layers: int = self.kv.layers
        self.r: int = int(self.manifest["num_loops"])
        self.max_loops: int = int(self.manifest.get("max_loops") or self.r)  # num_loops may go up to this
        self.ctx: int = int(self.manifest["max_seq_len"])
        self.kv_heads, self.head_dim = self.kv.kv_heads, self.kv.head_dim
        self.n_begin, self.n_middle, self.n_end = self.kv.n_begin, self.kv.n_middle, self.kv.n_end
        self.vocab_size = int(c["vocab_size"])
        self.ep, self.threads, self.mmap, self.prepack = ep, threads, mmap, prepack
        if model_file not in ("model.onnx", "model.ort"):
            raise RuntimeInputError(f"model file {model_file!r}: model.onnx or model.ort")
        if not (self.folder / model_file).is_file():
            raise RuntimeInputError(f"{self.folder}: no {model_file} (export with --ort for the ORT format)")
        self.model_file = model_file
        self.providers = provider_names(ep)
        self._profile_dir = tempfile.mkdtemp(prefix="edgeloop-profile-") if profile else None
        if self._profile_dir is not None:  # removed with the Runtime (or by close())
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._profile_dir, True)
        so = session_options(threads, mmap, prepack, profile,
                             os.path.join(self._profile_dir, "run") if profile else None)
        if self.manifest.get("accuracy_level") is not None:  # QDQ: ORT's DQ+MatMul fusion would use level 4
            so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level",
                                        str(self.manifest["accuracy_level"]))
        self.session = make_session(self.folder, self.providers, so, mmap, model_file)
        self.has_num_loops = check_convention(self.session, self.kv)
        self.out_names = [o.name for o in self.session.get_outputs()]
        self.gated = "exit_step" in self.out_names  # an exit gate (Ouro): exit_threshold steers the depth
        self.exit_threshold = float((self.manifest.get("config") or {}).get("early_exit_threshold", 1.0))
        self.last_exit_step: np.ndarray | None = None
        self.num_loops = self._loops(num_loops)
        self.tokenizer = export_tokenizer(self.folder, self.vocab_size)
        gen = self.manifest.get("generation")  # bos / eos / pad of the source folder (export/folder.py)
        if gen and gen.get("eos_token_id"):
            self.stop_ids: set[int] = {int(t) for t in gen["eos_token_id"]}
            self.eos, self.pad = int(gen["eos_token_id"][0]), int(gen.get("pad_token_id", gen["eos_token_id"][0]))
        else:  # exports from before manifest "generation": the tokenizer's <|endoftext|>
            self.eos = self.tokenizer.token_to_id(EOT) if self.tokenizer is not None else None
            self.stop_ids = set() if self.eos is None else {self.eos}
            self.pad = self.eos if self.eos is not None else 0
        self._placement: dict | None = None
        self._binding: tuple | None = None  # (in-place buffers, the IOBinding that holds them): reused step to step
        self._outs: dict = {}  # (output, shape) -> its buffer for in-place steps
        # the fused graph's GroupQueryAttention writes each step's keys/values into its past's buffer (kv.py: in
        # place); CPU buffers, so only where the session runs on the CPU provider
        self.in_place = bool((self.manifest.get("kv") or {}).get("in_place")) and ep == "cpu"
        # onnxruntime's CPU GroupQueryAttention continues a batch one token at a time: several new tokens after a
        # past only for one row
        self.one_row_continuations = bool(self.manifest.get("fused")) and ep == "cpu"

    # ---- the knobs ---------------------------------------------------------------------------
    def _loops(self, num_loops: int | None) -> int:
        """The loop count to run: default r; 1..max_loops when the export has the num_loops input."""
        if num_loops is None:
            return getattr(self, "num_loops", self.r)
        top = self.max_loops
        if isinstance(num_loops, bool) or not isinstance(num_loops, (int, np.integer)) or not 1 <= num_loops <= top:
            what = "the trained r" if top == self.r else f"max_loops; trained around r = {self.r}"
            raise RuntimeInputError(f"num_loops {num_loops!r}: must be an integer in 1..{top} ({what})")
        if num_loops != self.r and not self.has_num_loops:
            raise RuntimeInputError(f"num_loops {num_loops}: this export is unrolled (no num_loops input); "
                                    f"it always runs r = {self.r} loops")
        return int(num_loops)

    def kv_bytes_per_token(self, num_loops: int | None = None) -> int:
        """KV-cache bytes one token adds per sequence (keys + values of every layer that runs)."""
        return self.kv.bytes_per_token(self._loops(num_loops))

    # ---- one forward through the graph -------------------------------------------------------
    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return self.kv.empty_past(batch)

    def buffer_past(self, batch: int, tokens: int | None = None) -> dict:
        """Pasts for an in-place export: one zeroed onnxruntime buffer [batch, kv_heads, tokens, head_dim] per
        slot (tokens: what the generation can reach, at most the context; default the context), checked
        against the free memory before it is allocated."""
        import onnxruntime as ort
        import psutil

        if not self.in_place:
            raise RuntimeInputError(f"{self.folder}: not an in-place export (kv.in_place), or not on the CPU provider")
        n = self.ctx if tokens is None else max(1, min(int(tokens), self.ctx))
        shape = (batch, self.kv_heads, n, self.head_dim)
        need = batch * n * self.kv.bytes_per_token(self.kv.num_loops)  # every slot
        free = psutil.virtual_memory().available
        if need > free:
            raise RuntimeInputError(f"the KV buffers of {batch} sequences x {n} tokens need {need / 2**20:,.0f} "
                                    f"MiB; {free / 2**20:,.0f} MiB are free (fewer prompts at once)")
        return {name: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, DTYPES[self.kv.dtype]))
                for name in self.kv.past_names()}

    def forward(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: dict,
                num_loops: int, exit_threshold: float | None = None,
                keep_kv: bool = False, in_place: bool = False) -> tuple[np.ndarray, dict]:
        """(logits [B,S,V], the next past) for new tokens `ids` [B,S] after `past`. An exit-gated export takes
        exit_threshold (default the model's) and leaves the loop each token exited at in last_exit_step.
        keep_kv: the next past stays in onnxruntime's buffers (OrtValues, fed back as they are: no copy of the
        cache into numpy and back every step; generate does this); otherwise numpy arrays.
        in_place: `past` is buffer_past's; each present is bound to its past's buffer, which the step writes
        into, and `past` itself is returned (generate does this for an in-place export)."""
        import onnxruntime as ort

        (B, S), T = ids.shape, mask.shape[1]
        if self.one_row_continuations and B > 1 and 1 < S < T:
            raise RuntimeInputError(f"{S} new tokens after a past for {B} rows: the fused graph's "
                                    f"GroupQueryAttention (onnxruntime's CPU kernel) continues a batch one token "
                                    f"at a time; feed the rows one by one or use an export without --fused")
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past}
        if self.has_num_loops:
            feeds["num_loops"] = np.array(num_loops, np.int64)
        if self.gated:
            feeds["exit_threshold"] = np.array(self._threshold(exit_threshold), np.float32)
        if in_place:
            reuse = self._binding is not None and self._binding[0] is past  # the same buffers as the last step
            b = self._binding[1] if reuse else self.session.io_binding()
            self._binding = (past, b)
            arrays = {}
            for n, shape, dt in (("logits", (B, S, self.vocab_size), np.float32), ("exit_step", (B, S), np.int64)):
                if n in self.out_names:  # into buffers of ours (get_outputs() would wrap every present too)
                    arrays[n], ov = self._out_buffer(n, shape, dt)
                    b.bind_ortvalue_output(n, ov)
            bind_in_place(b, feeds, past, buffers_bound=reuse)
            self.session.run_with_iobinding(b)
            arrays = {n: a.copy() for n, a in arrays.items()}
            if self.gated:
                self.last_exit_step = arrays["exit_step"]
            return arrays["logits"], past
        if keep_kv or any(isinstance(v, ort.OrtValue) for v in past.values()):
            ov = {k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v))
                  for k, v in feeds.items()}
            outs = self.session.run_with_ort_values(self.out_names, ov)
            arrays = {n: outs[i].numpy() for i, n in enumerate(self.out_names) if n in ("logits", "exit_step")}
            nxt = next_past(self.out_names, outs)
            if not keep_kv:
                nxt = {k: v.numpy() for k, v in nxt.items()}
        else:
            outs = self.session.run(self.out_names, feeds)
            arrays, nxt = dict(zip(self.out_names, outs)), next_past(self.out_names, outs)
        if self.gated:
            self.last_exit_step = arrays["exit_step"]
        return arrays["logits"], nxt

    def _out_buffer(self, name: str, shape: tuple, dtype) -> tuple:
        """(a numpy array, the OrtValue over its memory) for an in-place step's output; kept per shape for the
        short steps of decoding and verification (at most 64 rows x tokens), fresh for a prefill's."""
        import onnxruntime as ort

        key = (name, shape)
        if key in self._outs:
            return self._outs[key]
        a = np.empty(shape, dtype)
        out = (a, ort.OrtValue.ortvalue_from_numpy(a))
        if shape[0] * shape[1] <= 64:
            self._outs[key] = out
        return out

    def _threshold(self, q: float | None) -> float:
        if q is None:
            return self.exit_threshold
        if not self.gated:
            raise RuntimeInputError(f"exit_threshold {q}: this export has no exit gate")
        if isinstance(q, bool) or not isinstance(q, (int, float, np.floating)) or not q >= 0:
            raise RuntimeInputError(f"exit_threshold {q!r}: a number >= 0 (>= 1: never exit early)")
        return float(q)

    # ---- generation ----------------------------------------------------------------------------
    def encode(self, text: str) -> np.ndarray:
        """Token ids of a text, encoded line by line (the encoding every edgeloop stage uses)."""
        return encode(self._tok(), text)

    def _tok(self):
        if self.tokenizer is None:
            raise RuntimeInputError(f"{self.folder}: tokenizer.json is missing (pass token ids instead of text)")
        return self.tokenizer

    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 stop: Sequence[int] | None = None, seed: int = 0, num_loops: int | None = None,
                 on_token: Callable[[int, int], None] | None = None, exit_threshold: float | None = None,
                 draft_loops: int | str | None = None, lookahead: int = 4, draft_min_prob: float = 0.0,
                 approximate: bool = False) -> Generation:
        """Continue one prompt or a batch (left-padded) through the KV cache. `stop`: token ids that end
        a row (default: the folder's eos tokens, else <|endoftext|>; () for none). `on_token(row, token_id)` streams
        each new token. draft_loops d (or "auto"): self-speculation (speculate.py), up to `lookahead` drafts at d
        loops verified at num_loops in one call; draft_min_prob: stop drafting when the draft's top-1 probability
        falls under it; approximate: also where verification is not exact (speculate.py: a shared KV cache, early
        exits)."""
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        tok = self._tok()
        ids = [tok.encode(p, add_special_tokens=False).ids for p in batch]
        return self.generate_ids(ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed,
                                 num_loops, on_token, exit_threshold, draft_loops, lookahead, draft_min_prob,
                                 approximate)

    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                     stop: Sequence[int] | None = None, seed: int = 0, num_loops: int | None = None,
                     on_token: Callable[[int, int], None] | None = None,
                     exit_threshold: float | None = None, draft_loops: int | str | None = None, lookahead: int = 4,
                     draft_min_prob: float = 0.0, approximate: bool = False) -> Generation:
        """generate() on token ids: a list of prompts, each a list of ids."""
        L = self._loops(num_loops)
        q = self._threshold(exit_threshold)
        check_sampling(temperature, top_k, top_p, repetition_penalty)
        if max_new_tokens < 0:
            raise RuntimeInputError(f"max_new_tokens {max_new_tokens}: must be >= 0")
        rows = [list(map(int, p)) for p in prompts]
        if not rows or any(not p for p in rows):
            raise RuntimeInputError("a prompt is empty (no tokens)")
        bad = [t for p in rows for t in p if not 0 <= t < self.vocab_size]
        if bad:
            raise RuntimeInputError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        longest = max(len(p) for p in rows)
        if longest > self.ctx:
            raise ContextLengthError(f"the prompt has {longest} tokens; the model's context is {self.ctx}")
        stops = set(stop) if stop is not None else set(self.stop_ids)
        if draft_loops is not None:
            return self._speculate(rows, max_new_tokens, dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                   repetition_penalty=repetition_penalty), stops, seed, L, on_token, q, draft_loops,
                                   lookahead, draft_min_prob, approximate)
        B, rng = len(rows), np.random.default_rng(seed)
        ids = np.full((B, longest), self.pad, np.int64)
        mask = np.zeros((B, longest), np.int64)
        for b, p in enumerate(rows):
            ids[b, longest - len(p):], mask[b, longest - len(p):] = p, 1
        pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
        past = self.buffer_past(B, longest + max_new_tokens) if self.in_place else self.empty_past(B)
        new, loops = [[] for _ in range(B)], [[] for _ in range(B)]
        finish = ["length"] * B
        done = np.zeros(B, bool)
        for _ in range(max_new_tokens):
            if pos.max() >= self.ctx:  # the next token would have no rotary position
                finish = [f if d else "context" for f, d in zip(finish, done)]
                break
            logits, past = self.forward(ids, mask, pos, past, L, q, keep_kv=True, in_place=self.in_place)
            nxt = np.full(B, self.pad, np.int64)
            for b in np.flatnonzero(~done):
                t = choose(logits[b, -1], rows[b] + new[b], rng, temperature, top_k, top_p, repetition_penalty)
                new[b].append(t)
                loops[b].append(int(self.last_exit_step[b, -1]) + 1 if self.gated else L)
                nxt[b] = t
                if on_token is not None:
                    on_token(int(b), t)
                if t in stops:
                    done[b], finish[b] = True, "stop"
            if done.all():
                break
            ids = nxt[:, None]
            pos = pos[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((B, 1), np.int64)], 1)
        text = [self.tokenizer.decode(n) for n in new] if self.tokenizer is not None else [""] * B
        return Generation(new, text, [len(p) for p in rows], finish, loops)

    def _speculate(self, rows: list[list[int]], max_new_tokens: int, sampling: dict, stops: set[int], seed: int,
                   R: int, on_token, q, d, k: int, draft_min_prob: float, approximate: bool) -> Generation:
        """generate_ids with self-speculation: each prompt on its own (batch 1), its figures summed."""
        from edgeloop.runtime import speculate

        speculate.check(self, d, k, R, draft_min_prob, q if self.gated else None, approximate)
        rng = np.random.default_rng(seed)
        room = min(self.ctx, max(len(p) for p in rows) + max_new_tokens)
        buffers = self.buffer_past(1, room) if self.in_place else None  # reused row after row
        new, finish, loops, total = [], [], [], None
        for b, p in enumerate(rows):
            past = buffers if buffers is not None else self.empty_past(1)
            stream = None if on_token is None else (lambda t, b=b: on_token(b, t))
            toks, fin, lps, st = speculate.generate_row(self, p, max_new_tokens, R, d, k, q, sampling, rng, stops,
                                                        past, self.in_place, stream, draft_min_prob, room)
            new.append(toks)
            finish.append(fin)
            loops.append(lps)
            if total is None:
                total = st
            else:
                for f in ("rounds", "drafted", "accepted", "draft_calls", "loops_run", "tokens"):
                    setattr(total, f, getattr(total, f) + getattr(st, f))
        text = [self.tokenizer.decode(n) for n in new] if self.tokenizer is not None else [""] * len(rows)
        return Generation(new, text, [len(p) for p in rows], finish, loops, total.as_dict())

    def chat(self, message: str) -> list[int]:
        """Token ids of a chat prompt: one user message under the export's chat template (tokenizer_config.json),
        ending with the assistant's turn."""
        from edgeloop.chat import prompt_ids

        return prompt_ids(self._tok(), self.folder, message, chat=True)

    def decode_perplexity(self, ids: Sequence[int] | np.ndarray, num_loops: int | None = None,
                          exit_threshold: float | None = None) -> tuple[float, int]:
        """exp(mean NLL) of ids[1:] fed one token at a time through the KV cache (where the KV policy acts:
        a full-window perplexity never reads a cache); returns (ppl, tokens scored)."""
        L, q = self._loops(num_loops), self._threshold(exit_threshold)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)[: self.ctx]
        if len(ids) < 2:
            raise RuntimeInputError(f"decode perplexity needs at least 2 tokens (got {len(ids)})")
        past, nll = self.empty_past(1), 0.0
        for t in range(len(ids) - 1):
            x = ids[None, t:t + 1]
            logits, past = self.forward(x, np.ones((1, t + 1), np.int64), np.array([[t]], np.int64), past, L, q)
            nll += nll_sum(logits[0], ids[t + 1:t + 2])
        return float(np.exp(nll / (len(ids) - 1))), len(ids) - 1

    # ---- perplexity ----------------------------------------------------------------------------
    def perplexity(self, ids: Sequence[int] | np.ndarray, ctx: int | None = None, stride: int | None = None,
                   batch_size: int = 4, num_loops: int | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   exit_threshold: float | None = None) -> tuple[float, int]:
        """exp(mean NLL) over `ids` with the strided windows of edgeloop.model.evaluate.perplexity
        (default ctx = the export's context, stride = ctx // 2), windows of equal length run as one
        batch; returns (ppl, tokens scored). `progress(done, total)` is called after each batch."""
        L = self._loops(num_loops)
        q = self._threshold(exit_threshold)
        self.scored_loops: list[int] = []  # an exit-gated export: the loops each scored token ran
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        ctx = ctx or self.ctx
        stride = stride or ctx // 2
        if not 0 < stride < ctx:
            raise RuntimeInputError(f"stride {stride}: must be in 1..ctx-1 (ctx {ctx}) so that every window "
                                    "scores tokens with context")
        if ctx > self.ctx:
            raise ContextLengthError(f"ctx {ctx} is longer than the model's context {self.ctx}")
        if len(ids) < 2:
            raise RuntimeInputError(f"perplexity needs at least 2 tokens (got {len(ids)})")
        if batch_size < 1:
            raise RuntimeInputError(f"batch_size {batch_size}: must be positive")
        wins = windows(len(ids), ctx, stride)
        groups: list[list[tuple[int, int, int]]] = []
        for w in wins:
            if groups and len(groups[-1]) < batch_size and groups[-1][0][1] - groups[-1][0][0] == w[1] - w[0]:
                groups[-1].append(w)
            else:
                groups.append([w])
        nll, count, done = 0.0, 0, 0
        for g in groups:
            x = np.stack([ids[b:e - 1] for b, e, _ in g])
            B, S = x.shape
            logits, _ = self.forward(x, np.ones((B, S), np.int64), np.broadcast_to(np.arange(S), (B, S)).copy(),
                                     self.empty_past(B), L, q)
            for row, (b, e, s) in enumerate(g):
                nll += nll_sum(logits[row, s - b - 1:], ids[s:e])
                if self.gated:
                    self.scored_loops += (self.last_exit_step[row, s - b - 1:] + 1).tolist()
                count += e - s
            done += len(g)
            if progress is not None:
                progress(done, len(wins))
        return float(np.exp(nll / count)), count

    # ---- where the nodes run -------------------------------------------------------------------
    def placement(self) -> dict[str, dict]:
        """{provider: {"nodes": n, "ops": {op_type: n}}} of the nodes that ran in one short forward,
        read from onnxruntime's profiling JSON (a profiling session is opened when profile=False)."""
        if self._profile_dir is not None:  # the main session profiles: read everything it ran so far
            if self._placement is None:
                self.forward(*self._probe_feeds(), self.num_loops)
                self._placement = placement_from_profile(self.session.end_profiling())
            return self._placement
        tmp = tempfile.mkdtemp(prefix="edgeloop-profile-")
        try:
            so = session_options(self.threads, self.mmap, self.prepack, True, os.path.join(tmp, "run"))
            other = Runtime.__new__(Runtime)
            other.__dict__.update({k: v for k, v in self.__dict__.items() if k != "_cleanup"})
            other.session = make_session(self.folder, self.providers, so, self.mmap, self.model_file)
            other._binding, other._outs = None, {}
            other.forward(*self._probe_feeds(), self.num_loops)
            return placement_from_profile(other.session.end_profiling())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _probe_feeds(self):
        x = np.array([[self.pad] * 4], np.int64)
        return x, np.ones_like(x), np.arange(4, dtype=np.int64)[None], self.empty_past(1)

    def close(self) -> None:
        """Remove the profiling folder (profile=True); the session itself is freed with the object."""
        if self._profile_dir is not None:
            self._cleanup()
            self._profile_dir = None
