"""Causal self-attention with rotary positions, grouped-query KV heads, optional q/k biases (added
before rotary, as nn.Linear biases) and optional QK-norm: qk_norm, per head without weight after rotary
(nanochat), or qk_norm_full, with weight over the whole projected width before the head split (OLMo-2).

    q, k, v = c_q x, c_k x, c_v x            (qk_norm_full: q, k = q_norm(q), k_norm(k) over [H*hd], [KV*hd])
    heads: [B, H, T, hd], [B, KV, T, hd]
    q, k = rotary(q), rotary(k);  (qk_norm: q, k = rms(q), rms(k))
    k, v = [past; k], [past; v]               (the KV cache)
    y = c_proj(softmax(q k^T / sqrt(hd) + causal mask) v)
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeloop.model.pieces import Linear, build
from edgeloop.model.pieces.norm import RMSNorm, emit_rms_norm, rms_norm


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qk_norm, self.eps = cfg.qk_norm, cfg.norm_eps
        # GroupQueryAttention can rotate q/k itself (do_rotary), numbering each row's positions from the start of
        # its buffer, padding included: a left-padded row is then shifted by its pad count, which leaves every
        # q.k unchanged only where the tables are exact rotations (not bf16-rounded) and nothing (QK-norm) sits
        # between rotary and attention; a full-width QK-norm sits before rotary on the unpacked q and k
        self.rotary_in_gqa = not cfg.qk_norm and not cfg.qk_norm_full and not cfg.rope_bf16
        hd, d = cfg.head_dim, cfg.d_model
        if cfg.qk_norm_full:
            self.q_norm = RMSNorm(cfg.n_heads * hd, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.n_kv_heads * hd, cfg.norm_eps)
        self.qk_norm_full = cfg.qk_norm_full
        self.c_q = nn.Linear(d, cfg.n_heads * hd, bias=cfg.qk_bias)
        self.c_k = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.qk_bias)
        self.c_v = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.c_proj = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.rotary = build("rotary", cfg.rotary, cfg)

    def linears(self) -> list[Linear]:
        return [Linear("c_q", "qkv"), Linear("c_k", "qkv"), Linear("c_v", "qkv"), Linear("c_proj", "out")]

    def forward(self, x, rope, mask, past):
        """x [B, T, d]; rope (cos, sin) [B, 1, T, hd/2]; mask "causal" | "none" | bool [B, 1, T, P+T];
        past (k, v) or None. Returns (y, present (k, v))."""
        (B, T, _), hd = x.shape, self.head_dim
        cos, sin = rope
        q, k = self.c_q(x), self.c_k(x)
        if self.qk_norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_heads, hd).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, hd).transpose(1, 2)
        v = self.c_v(x).view(B, T, self.n_kv_heads, hd).transpose(1, 2)
        q, k = self.rotary.apply(q, cos, sin), self.rotary.apply(k, cos, sin)
        if self.qk_norm:
            q, k = rms_norm(q, self.eps), rms_norm(k, self.eps)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        present = (k, v)
        rep = self.n_heads // self.n_kv_heads
        kk, vv = (k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)) if rep > 1 else (k, v)
        if isinstance(mask, str):  # "causal" (no past) or "none" (one query over all of the past)
            y = F.scaled_dot_product_attention(q, kk, vv, is_causal=mask == "causal")
        else:
            y = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1)), present

    def emit_fused(self, g, w, x, ctx, past):
        """The same with onnxruntime's kernels: q/k/v as one MatMulNBits and com.microsoft.GroupQueryAttention
        over [past; new] with the additive bias ctx["bias_gqa"] [B, 1, S, T] (causal + padding: left-padded
        batches work; seqlens_k = T - 1 for every row). Rotary: GroupQueryAttention's own over the packed q/k/v
        (rotary_in_gqa, unless the export asks for position_ids: positions T-S..T-1 of each row, a shift of
        position_ids that q.k does not see), else com.microsoft.RotaryEmbedding at position_ids (QK-norm runs first:
        the per-head one keeps each head's length and so commutes with the rotation; the full-width one must). Same
        `past` contract as emit; in the Loop body the rotated new keys/values are rows T-S..T-1 of
        GroupQueryAttention's presents."""
        H, KV = self.n_heads, self.n_kv_heads
        mods = [self.c_q, self.c_k, self.c_v]
        qkv = w.linears(g, x, mods, packed=self.rotary_in_gqa and w.gqa_rotary)
        if len(qkv) == 1:  # packed [B, S, (H + 2 KV) hd], rotated inside
            ins = [qkv[0], None, None]
            rot = dict(do_rotary=1, rotary_interleaved=self.rotary.INTERLEAVED)
            tables = [ctx["rope_cos"], ctx["rope_sin"]]
        else:
            q, k, v = qkv
            full = (self.q_norm, self.k_norm) if self.qk_norm_full else (None, None)
            ins = [self._rotate(g, w, q, H, ctx, full[0]), self._rotate(g, w, k, KV, ctx, full[1]), v]
            rot, tables = {}, [None, None]

        def gqa(b, pk, pv):
            return b.GroupQueryAttention(*ins, pk, pv, ctx["seqlens_k"], ctx["total_len"], *tables, None,
                                         ctx["bias_gqa"], _domain="com.microsoft", _outputs=3, num_heads=H,
                                         kv_num_heads=KV, **rot)

        if callable(past):  # in the Loop body: the new keys/values leave as [B, KV, S, hd] (the Loop concatenates)
            y, new_k, new_v = past(g, lambda b, pk, pv: self._new_rows(b, gqa(b, pk, pv), ctx), [3, 4, 4])
            return w.linear(g, y, self.c_proj), new_k, new_v
        y, pk, pv = gqa(g, *past)
        return w.linear(g, y, self.c_proj), pk, pv

    def _rotate(self, g, w, t, n: int, ctx, full_norm=None):
        """[B, S, n*hd] -> [B, S, n*hd] (normed and) rotated by com.microsoft.RotaryEmbedding. full_norm: the
        q_norm or k_norm RMSNorm over the whole width (qk_norm_full), applied first."""
        if full_norm is not None:
            t = full_norm.emit(g, w, t)
        if self.qk_norm:
            t4 = emit_rms_norm(g, g.Reshape(t, g.const([0, 0, n, self.head_dim])), self.eps, fused=True,
                               dim=self.head_dim)
            t = g.Reshape(t4, g.const([0, 0, n * self.head_dim]))
        return self.rotary.emit_fused(g, t, n, ctx)

    @staticmethod
    def _new_rows(b, outs, ctx):
        """(y, rows T-S..T-1 of the present key and value): the step's new keys/values, rotated."""
        y, pk, pv = outs
        rows = ctx["new_rows"]  # ([T - S], [T])
        return y, b.Slice(pk, *rows, b.const([2])), b.Slice(pv, *rows, b.const([2]))

    def emit(self, g, w, x, ctx, past):
        """The same over [past; x] with queries grouped by KV head (no head-repeated copy of the cache).
        `past` is this layer's (k, v): returns (y, present k, present v), present = [past; new]. Or `past`
        is a function (g, attend, ranks) -> attend(g, past_k, past_v) (a list of tensors of those ranks) that
        picks the past inside a subgraph (the Loop body): returns (y, new k, new v), the Loop concatenating after.
        ctx: cos, sin [B, 1, S, hd/2], bias [B, 1 or rep, S, T] (0 / -inf). The fused graph: emit_fused."""
        if w.fused:
            return self.emit_fused(g, w, x, ctx, past)
        H, KV, hd = self.n_heads, self.n_kv_heads, self.head_dim

        def heads(t, n):  # [B, S, n*hd] -> [B, n, S, hd]
            return g.Transpose(g.Reshape(t, g.const([0, 0, n, hd])), perm=[0, 2, 1, 3])

        q, k = w.linear(g, x, self.c_q), w.linear(g, x, self.c_k)
        if self.qk_norm_full:
            q, k = self.q_norm.emit(g, w, q), self.k_norm.emit(g, w, k)
        q = self.rotary.emit(g, heads(q, H), ctx["cos"], ctx["sin"])
        k = self.rotary.emit(g, heads(k, KV), ctx["cos"], ctx["sin"])
        v = heads(w.linear(g, x, self.c_v), KV)
        if self.qk_norm:
            q, k = emit_rms_norm(g, q, self.eps), emit_rms_norm(g, k, self.eps)
        qg = g.Reshape(q, g.const([0, KV, -1, hd]))  # [B, KV, rep*S, hd]: query head h reads KV head h // rep

        def scores_of(b, keys):  # qg keys^T
            return b.MatMul(qg, b.Transpose(keys, perm=[0, 1, 3, 2]))

        def softmax_v(b, scores, values):  # softmax(scores / sqrt(hd) + bias) values
            probs = b.Softmax(b.Add(b.Mul(scores, b.const(1 / math.sqrt(hd), np.float32)), ctx["bias"]), axis=-1)
            return b.MatMul(probs, values)

        if callable(past):  # keys of the past read in place; values concatenated (a K=0 MatMul breaks WebGPU)
            y, = past(g, lambda b, pk, pv: [softmax_v(b, b.Concat(scores_of(b, pk), scores_of(b, k), axis=-1),
                                                      b.Concat(pv, v, axis=2))], [4])
        else:
            k, v = g.Concat(past[0], k, axis=2), g.Concat(past[1], v, axis=2)
            y = softmax_v(g, scores_of(g, k), v)
        y = g.Reshape(g.Transpose(g.Reshape(y, g.const([0, H, -1, hd])), perm=[0, 2, 1, 3]),
                      g.const([0, 0, H * hd]))
        return w.linear(g, y, self.c_proj), k, v
