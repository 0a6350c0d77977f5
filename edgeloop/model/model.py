"""The looped (Hyperloop) transformer, the math in order, assembled from the pieces (model/pieces) that the
config names. Each stage has its ONNX twin beside it (emit_*), which the export stage drives.

    x = embed(tokens) * embed_scale          (optionally RMSNorm'd)
    x = begin(x)                             n_begin blocks, once
    state = hc.init(x);  e = x               n streams [B, T, n, d] (hc dynamic / static) or one stream
    for l in 0 .. num_loops-1:               middle blocks, weights shared across l
        u = hc.enter(state, e, l)            (+ loop_embed[l])
        o = middle(u)                        (optionally o = norm_mid(o)); KV slots: kv_policy (edgeloop/kv.py)
        state = hc.leave(state, o, l)
    x = hc.collapse(state)                   mean or sum over streams (optionally final_norm(x): post_loop_norm)
    x = end(x)                               n_end blocks, once
    logits = lm_head(final_norm(x))          (optionally softcap * tanh(logits / softcap))

hc = "dynamic": H_* computed per token from z = RMSNorm(flatten(Y)) (mHC-style, H_res Sinkhorn).
hc = "static":  H_pre = alpha[l], H_post = beta[l], H_res = M[l] (looped-lm-scaling lanes).
hc = "none":    one stream s, with the injection of the begin output e:
                passthrough u = s (s0 = e); additive u = s + e (s0 = 0); inject u = W [e; s] (s0 = e);
                adapter u = W [s; e] (s0 = 0 or Huginn's random start).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from edgeloop.model.config import HyperloopConfig
from edgeloop.model.pieces import build
from edgeloop.model.pieces.block import emit_chain
from edgeloop.model.pieces.exit import ExitGate
from edgeloop.model.pieces.norm import RMSNorm, rms_norm  # noqa: F401  (re-exported)
from edgeloop.model.pieces.rotary import rope_tables
from edgeloop.model.pieces.streams import sinkhorn  # noqa: F401  (re-exported)


class KVCache:
    """The (key, value) slots of edgeloop.kv.Layout under `policy` (default: the config's kv_policy): begin
    layers, then the middle ones (per-step: loop-major (loop, middle layer); shared: one per middle layer),
    then end. Keys/values are [B, n_kv_heads, P, head_dim]; slots of loops not run keep what they had."""

    def __init__(self, cfg: HyperloopConfig, policy: str | None = None, dtype: torch.dtype | None = None):
        self.cfg, self.layout = cfg, cfg.kv_layout(policy)
        self.dtype = dtype or {"float32": torch.float32, "float16": torch.float16}[self.layout.dtype]
        self.slots: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * self.layout.layers

    def load(self, i: int):
        """Slot i as fp32 (None: empty); the slots hold `dtype` (an fp16 cache: as the fp16-KV export stores it)."""
        s = self.slots[i]
        return None if s is None else (s[0].float(), s[1].float())

    def store(self, i: int, kv) -> None:
        self.slots[i] = (kv[0].to(self.dtype), kv[1].to(self.dtype))

    @property
    def length(self) -> int:
        s = self.slots[self.layout.slot(0, 0)]  # loop 0 always runs
        return 0 if s is None else s[0].shape[2]


@dataclass(frozen=True)
class Tensor:
    """What one stored tensor is, for the quantize stage and `inspect`.
    role: linear | embedding | lm_head | hc | norm | bias. A quantizable tensor (the settings decide
    whether it is quantized) carries k_axis (its grouped input axis), calls (uses per forward: r for the
    middle block, the injection and per-loop parameters), block (the block module holding it, or None)
    and group (the tensors that read the same input: one GPTQ Hessian)."""
    role: str
    quantizable: bool = False
    k_axis: int = -1
    calls: int = 1
    block: str | None = None
    group: str | None = None


class Hyperloop(nn.Module):
    def __init__(self, cfg: HyperloopConfig):
        super().__init__()
        self.cfg = cfg.validate()
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.embed_norm = RMSNorm(d, cfg.norm_eps) if cfg.embed_norm else None
        self.begin = nn.ModuleList(build("block", cfg.block, cfg) for _ in range(cfg.n_begin))
        self.middle = nn.ModuleList(build("block", cfg.block, cfg) for _ in range(cfg.n_middle))
        self.end = nn.ModuleList(build("block", cfg.block, cfg) for _ in range(cfg.n_end))
        self.hc = build("hc", cfg.hc, cfg)
        self.inject = nn.Linear(2 * d, d, bias=False) if self.hc.needs_inject else None
        self.loop_embed = nn.Parameter(torch.zeros(cfg.loop_limit, d)) if cfg.loop_embedding else None
        self.middle_norm = RMSNorm(d, cfg.norm_eps) if cfg.middle_norm else None
        self.final_norm = RMSNorm(d, cfg.norm_eps)
        self.exit_gate = ExitGate(cfg) if cfg.exit_gate else None
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(d, cfg.vocab_size, bias=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_buffers()
        self.reset_parameters()

    def init_buffers(self) -> "Hyperloop":
        """The rotary tables (computed, never stored): also after loading a model built on the meta device."""
        self.rope_cos, self.rope_sin = rope_tables(self.cfg, self.cfg.max_seq_len)
        return self

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None):
        """Normal(0, 0.02) linears and embeddings; output projections scaled by 1/sqrt(2 * effective depth)."""
        if self.embed.weight.is_meta:
            return
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        proj_std = 0.02 / math.sqrt(2 * self.cfg.effective_layers)
        for name, mod in self.named_modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                std = proj_std if name.endswith("c_proj") else 0.02
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()
        if self.inject is not None:  # start as u = s + (small) e
            d = self.cfg.d_model
            state_cols = slice(0, d) if self.cfg.injection == "adapter" else slice(d, 2 * d)  # [s; e] or [e; s]
            self.inject.weight[:, state_cols] += torch.eye(d)

    # ---- the forward -------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, num_loops: int | None = None, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                init_scale: float = 0.0, exit_threshold: float | None = None, exit_at_step: int | None = None,
                return_exit: bool = False, grad_loops: int | None = None):
        """input_ids [B, S] -> logits [B, S, V] (fp32). `cache` is extended in place (its policy: per-step
        or shared slots). attention_mask [B, P+S] (1 = token, 0 = left padding); position_ids [B, S] default
        from it. init_scale > 0: the injection's random start (where it has one; torch's RNG).
        With an exit gate (pieces/exit.py): each token's logits come from the loop it exits at (threshold
        exit_threshold, default the config's; or exit_at_step), and the loops stop once every token of the
        call has exited; per-step slots of the loops that were skipped then get the last loop's keys/values
        (the "latest" fill). return_exit: (logits, the loop each token exited at [B, S]). grad_loops = k:
        truncated backpropagation, the first r - k loops run without autograd (Huginn's training)."""
        cfg = self.cfg
        r = cfg.num_loops if num_loops is None else int(num_loops)
        if not 1 <= r <= cfg.loop_limit:
            what = "the trained loop count" if cfg.loop_limit == cfg.num_loops else "max_loops"
            raise ValueError(f"num_loops={r} must be in 1..{cfg.loop_limit} ({what})")
        B, S = input_ids.shape
        P = cache.length if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, P:]
            else:
                position_ids = torch.arange(P, P + S, device=input_ids.device).expand(B, S)
        if not torch.compiler.is_exporting() and int(position_ids.max()) >= cfg.max_seq_len:  # data-dependent check
            raise ValueError(f"position {int(position_ids.max())} is beyond max_seq_len={cfg.max_seq_len}")
        rope = (self.rope_cos[position_ids].unsqueeze(1), self.rope_sin[position_ids].unsqueeze(1))
        mask = self._mask(attention_mask, B, S, P, input_ids.device)

        x = self.embed(input_ids).float()
        if cfg.embed_scale != 1:
            x = x * cfg.embed_scale
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self._run(self.begin, x, 0, rope, mask, cache)
        e = x
        state = self.hc.init(e, init_scale)
        shared = None if cache is None or not cache.layout.shared else \
            [cache.load(cache.layout.slot(0, j)) for j in range(cfg.n_middle)]  # every loop attends to these
        gate = self.exit_gate.start(e) if self.exit_gate is not None else None
        q = cfg.early_exit_threshold if exit_threshold is None else float(exit_threshold)
        at = exit_at_step if exit_at_step is not None and 0 <= exit_at_step < r else None
        for l in range(r):
            with torch.set_grad_enabled(torch.is_grad_enabled() and (grad_loops is None or l >= r - grad_loops)):
                state = self.step(state, e, l, rope, mask, cache, shared)
            if gate is not None:
                gate = self.exit_gate.update(gate, self.hc.collapse(state), l, l == r - 1, q, at)
                if l < r - 1 and bool(gate["exited"].all()):  # every token has exited: the loops stop
                    self._latest_fill(cache, l + 1, r, S)
                    break
        x = self.hc.collapse(state) if gate is None else gate["out"]
        if cfg.post_loop_norm:
            x = self.final_norm(x)
        x = self._run(self.end, x, cache.layout.end_slot(0) if cache is not None else 0, rope, mask, cache)
        logits = self.head(x)
        if return_exit:
            return logits, gate["step"] if gate is not None else torch.full((B, S), r - 1, dtype=torch.long)
        return logits

    def _latest_fill(self, cache, ran: int, r: int, S: int) -> None:
        """Per-step slots of loops ran..r-1 (skipped by the exit) get loop ran-1's new keys/values."""
        if cache is None or cache.layout.shared:
            return
        for j in range(self.cfg.n_middle):
            k, v = cache.slots[cache.layout.slot(ran - 1, j)]
            new = (k[:, :, -S:], v[:, :, -S:])
            for l in range(ran, r):
                old = cache.slots[cache.layout.slot(l, j)]
                cache.slots[cache.layout.slot(l, j)] = new if old is None else \
                    (torch.cat([old[0], new[0]], 2), torch.cat([old[1], new[1]], 2))

    def step(self, state, e, l: int, rope, mask, cache, shared=None):
        """One loop: u from the state, o = middle(u), the state update. `shared`: the middle blocks' pasts
        under the shared KV policy (the same for every loop; each loop's present replaces the last)."""
        u, mix = self.hc.enter(state, e, l, self.inject)
        if self.loop_embed is not None:
            u = u + self.loop_embed[l]
        first = cache.layout.slot(l, 0) if cache is not None else 0
        o = self._run(self.middle, u, first, rope, mask, cache, shared)
        if self.middle_norm is not None:
            o = self.middle_norm(o)
        if self.cfg.norm_each_loop:
            o = self.final_norm(o)
        return self.hc.leave(state, o, l, mix)

    def head(self, x):
        """logits = lm_head(final_norm x) (tied: x E^T), optionally soft-capped (norm_each_loop: x is normed)."""
        x = x if self.cfg.norm_each_loop else self.final_norm(x)
        logits = self.lm_head(x) if self.lm_head is not None else x @ self.embed.weight.t()
        c = self.cfg.logit_softcap
        return c * torch.tanh(logits / c) if c > 0 else logits

    @staticmethod
    def _run(blocks, x, first_slot, rope, mask, cache, pasts=None):
        for j, block in enumerate(blocks):
            past = pasts[j] if pasts is not None else cache.load(first_slot + j) if cache is not None else None
            x, present = block(x, rope, mask, past)
            if cache is not None:
                cache.store(first_slot + j, present)
        return x

    @staticmethod
    def _mask(attention_mask, B, S, P, device):
        """Boolean [B, 1, S, P+S] (True = attend): causal by index, padded keys masked, the diagonal always kept
        so a padding query never sees an empty row. Plain causal / no mask when there is no padding."""
        if attention_mask is None:
            return "causal" if P == 0 else ("none" if S == 1 else Hyperloop._mask(
                torch.ones(B, P + S, dtype=torch.long, device=device), B, S, P, device))
        q = torch.arange(P, P + S, device=device)[:, None]
        k = torch.arange(P + S, device=device)[None, :]
        allowed = (k <= q) & attention_mask.bool()[:, None, None, :]
        return allowed | (k == q)

    # ---- the ONNX twins (edgeloop/export/graph.py builds the Loop, the masks and the KV routing) -----
    def emit_embed(self, g, w, ids):
        x = w.embedding(g, ids, self.embed)
        if self.cfg.embed_scale != 1:
            x = g.Mul(x, g.const(self.cfg.embed_scale, np.float32))
        return self.embed_norm.emit(g, w, x) if self.embed_norm is not None else x

    def emit_step(self, g, w, state, e, l, ctx, pasts):
        """One loop as ONNX nodes: pasts[j] is middle block j's past as Attention.emit takes it.
        Returns (new state, [(k, v) per middle block] as Attention.emit returns them)."""
        u, mix = self.hc.emit_enter(g, w, state, e, l, self.inject)
        if self.loop_embed is not None:
            u = g.Add(u, w.loop_row(g, self, "loop_embed", l))
        o, presents = emit_chain(g, w, self.middle, u, ctx, pasts)
        if self.middle_norm is not None:
            o = self.middle_norm.emit(g, w, o)
        if self.cfg.norm_each_loop:
            o = self.final_norm.emit(g, w, o)
        return self.hc.emit_leave(g, w, state, o, l, mix), presents

    def emit_head(self, g, w, x):
        x = x if self.cfg.norm_each_loop else self.final_norm.emit(g, w, x)
        logits = w.lm_head(g, x, self.lm_head, self.embed)
        c = self.cfg.logit_softcap
        if c > 0:
            cc = g.const(c, np.float32)
            logits = g.Mul(g.Tanh(g.Div(logits, cc)), cc)
        return logits

    # ---- bookkeeping ------------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        """Every stored tensor's role (see Tensor), in forward order: what the quantize stage may quantize,
        in which order and with which neighbours, and what `inspect` shows."""
        r, out = self.cfg.num_loops, {}
        out["embed.weight"] = Tensor("embedding", True)
        if self.embed_norm is not None:
            out["embed_norm.weight"] = Tensor("norm")

        def blocks(stage: str, mods, calls: int) -> None:  # a block's linears, biases and norms
            for i, blk in enumerate(mods):
                name = f"{stage}.{i}"
                for mod_name, mod in blk.named_modules(prefix=name):
                    for spec in getattr(mod, "linears", lambda: [])():
                        lin = f"{mod_name}.{spec.attr}"
                        out[f"{lin}.weight"] = Tensor("linear", True, 1, calls, name, f"{mod_name}:{spec.group}")
                        if getattr(mod, spec.attr).bias is not None:
                            out[f"{lin}.bias"] = Tensor("bias")
                    if isinstance(mod, RMSNorm):
                        out[f"{mod_name}.weight"] = Tensor("norm")

        blocks("begin", self.begin, 1)
        if self.inject is not None:
            out["inject.weight"] = Tensor("linear", True, 1, r, None, "inject")
        blocks("middle", self.middle, r)
        blocks("end", self.end, 1)
        for pname, _ in self.hc.named_parameters(prefix="hc"):
            leaf = pname.rsplit(".", 1)[-1]
            out[pname] = Tensor("hc", True, 1, r) if leaf in self.hc.matrices else Tensor("hc")
        if self.loop_embed is not None:
            out["loop_embed"] = Tensor("hc", True, -1, r)
        if self.middle_norm is not None:
            out["middle_norm.weight"] = Tensor("norm")
        out["final_norm.weight"] = Tensor("norm")
        if self.exit_gate is not None:  # tiny, and the exit decision rides on it: never INT4
            out["exit_gate.weight"], out["exit_gate.bias"] = Tensor("gate"), Tensor("gate")
        if self.lm_head is not None:
            out["lm_head.weight"] = Tensor("lm_head", True)
        stored = set(self.state_dict())
        if set(out) != stored:
            raise RuntimeError(f"internal: tensor roles {sorted(set(out) ^ stored)[:3]} do not match the model")
        return out

    def num_parameters(self) -> dict[str, int]:
        """unique = stored parameters; effective = what a depth-matched unrolled model would store."""
        unique = sum(p.numel() for p in self.parameters())
        middle = sum(p.numel() for p in self.middle.parameters())
        return {"unique": unique, "effective": unique + (self.cfg.num_loops - 1) * middle}


def meta_model(cfg: HyperloopConfig) -> Hyperloop:
    """The model's structure without weights (the meta device): tensor names, shapes, roles, the graph."""
    with torch.device("meta"):
        return Hyperloop(cfg)
