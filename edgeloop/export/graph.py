"""The Hyperloop forward as an ONNX graph, written op for op after edgeloop/model/model.py (and
parity-checked against it on every export, see verify.py).

    logits, present.* = graph(input_ids, attention_mask, position_ids, past_key_values.*, num_loops)

The middle block is ONE `Loop` (trip count = the `num_loops` input, default r): its body is the
middle block plus that loop's hyper-connection update; per-loop parameters are stacked [r, ...] and
the body Gathers row `iter_num`; shared weights live once in the outer graph. The middle layers'
past KV enters as one sequence per layer (SequenceAt(iter_num) in the body: a sequence, unlike a
stacked tensor, lets loops that were not run keep a past of another length); each iteration's
present leaves as a scan output and is split back into present.{slot}, loops beyond `num_loops`
passing their past through unchanged.
"""
from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from edgeloop.export.builder import BOOL, FLOAT, INT64, GraphBuilder, graph_input, typed
from edgeloop.export.weights import Weights
from edgeloop.model.config import HyperloopConfig


# ---- layers (model.py: rms_norm, apply_rope, Attention, MLP, Block) ---------------------
def rms_norm(g: GraphBuilder, x, eps: float, weight=None):
    """x / sqrt(mean(x^2) + eps) [* weight]."""
    ms = g.ReduceMean(g.Mul(x, x), g.const([-1]), keepdims=1)
    y = g.Div(x, g.Sqrt(g.Add(ms, g.const(eps, np.float32))))
    return y if weight is None else g.Mul(y, weight)


def rope(g: GraphBuilder, x, cos, sin):
    """[x1, x2] -> [x1 cos + x2 sin, x2 cos - x1 sin]."""
    x1, x2 = g.Split(x, axis=-1, num_outputs=2, _outputs=2)
    return g.Concat(g.Add(g.Mul(x1, cos), g.Mul(x2, sin)), g.Sub(g.Mul(x2, cos), g.Mul(x1, sin)), axis=-1)


def attention(g, w: Weights, cfg: HyperloopConfig, p: str, x, ctx: dict, past):
    """Causal GQA attention of x over [past; x] with rotary + optional QK-norm, queries grouped by KV head
    (no head-repeated copy of the cache). `past` is this layer's (k, v): returns (y, present k, present v),
    present = [past; new]. Or `past` is a function (g, attend) -> attend(g, past_k, past_v) that picks the
    past inside a subgraph (the Loop body): returns (y, new k, new v), the Loop concatenating after."""
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def heads(t, n):  # [B, S, n*hd] -> [B, n, S, hd]
        return g.Transpose(g.Reshape(t, g.const([0, 0, n, hd])), perm=[0, 2, 1, 3])

    q = rope(g, heads(w.linear(g, x, f"{p}.c_q"), H), ctx["cos"], ctx["sin"])
    k = rope(g, heads(w.linear(g, x, f"{p}.c_k"), KV), ctx["cos"], ctx["sin"])
    v = heads(w.linear(g, x, f"{p}.c_v"), KV)
    if cfg.qk_norm:
        q, k = rms_norm(g, q, cfg.norm_eps), rms_norm(g, k, cfg.norm_eps)
    qg = g.Reshape(q, g.const([0, KV, -1, hd]))  # [B, KV, rep*S, hd]: query head h reads KV head h // rep

    def scores_of(b, keys):  # qg keys^T / sqrt(hd)
        return b.MatMul(qg, b.Transpose(keys, perm=[0, 1, 3, 2]))

    def softmax_v(b, scores, values):  # softmax(scores + bias) values
        probs = b.Softmax(b.Add(b.Mul(scores, b.const(1 / math.sqrt(hd), np.float32)), ctx["bias"]), axis=-1)
        return b.MatMul(probs, values)

    if callable(past):  # keys of the past read in place; values concatenated (a K=0 MatMul breaks WebGPU)
        y = past(g, lambda b, pk, pv: softmax_v(b, b.Concat(scores_of(b, pk), scores_of(b, k), axis=-1),
                                                b.Concat(pv, v, axis=2)))
    else:
        k, v = g.Concat(past[0], k, axis=2), g.Concat(past[1], v, axis=2)
        y = softmax_v(g, scores_of(g, k), v)
    y = g.Reshape(g.Transpose(g.Reshape(y, g.const([0, H, -1, hd])), perm=[0, 2, 1, 3]), g.const([0, 0, H * hd]))
    return w.linear(g, y, f"{p}.c_proj"), k, v


def mlp(g, w: Weights, cfg: HyperloopConfig, p: str, x):
    """swiglu: c_proj(silu(c_gate x) * c_fc x);  relu2: c_proj(relu(c_fc x)^2)."""
    h = w.linear(g, x, f"{p}.c_fc")
    if cfg.mlp == "swiglu":
        gate = w.linear(g, x, f"{p}.c_gate")
        h = g.Mul(g.Mul(gate, g.Sigmoid(gate)), h)
    else:
        h = g.Relu(h)
        h = g.Mul(h, h)
    return w.linear(g, h, f"{p}.c_proj")


def block(g, w: Weights, cfg: HyperloopConfig, p: str, x, ctx, past):
    """x += attn(norm1 x); x += mlp(norm2 x). Returns (x, k, v) as attention() does."""
    a, k, v = attention(g, w, cfg, f"{p}.attn", rms_norm(g, x, cfg.norm_eps, w.param(g, f"{p}.norm1.weight")),
                        ctx, past)
    x = g.Add(x, a)
    x = g.Add(x, mlp(g, w, cfg, f"{p}.mlp", rms_norm(g, x, cfg.norm_eps, w.param(g, f"{p}.norm2.weight"))))
    return x, k, v


# ---- one loop of the middle block with its hyper-connection update ----------------------
def sinkhorn(g, logits, iters: int):
    """exp(logits - max), then `iters` times: rows to sum 1, columns to sum 1 (an L1 normalization of a
    positive matrix: one LpNormalization op each)."""
    m = g.Exp(g.Sub(logits, g.ReduceMax(logits, g.const([-2, -1]), keepdims=1)))
    for _ in range(iters):
        m = g.LpNormalization(g.LpNormalization(m, axis=-1, p=1), axis=-2, p=1)
    return m


def loop_row(g, w: Weights, name: str, l):
    """Row l of a per-loop parameter stacked [r, ...]."""
    return g.Gather(w.param(g, name), l, axis=0)


def coefficients(g, w: Weights, cfg: HyperloopConfig, Y, l):
    """(H_pre [.., n], H_post [.., n], H_res [.., n, n]) of loop l; see DynamicHC / StaticLanes."""
    n, d = cfg.n_streams, cfg.d_model
    if cfg.hc == "static":
        return loop_row(g, w, "hc.lane_alpha", l), loop_row(g, w, "hc.lane_beta", l), loop_row(g, w, "hc.lane_mixing", l)
    z = rms_norm(g, g.Reshape(Y, g.const([0, 0, n * d])), cfg.norm_eps)
    W, a, b = (g.Gather(t, l, axis=0) for t in w.hc_projection(g))  # the three projections as one MatMul
    pre, post, res = g.Split(g.Add(g.Mul(g.MatMul(z, W), a), b), g.const([n, n, n * n]), axis=-1, _outputs=3)
    h_pre = g.Sigmoid(pre)
    h_post = g.Mul(g.const(2.0, np.float32), g.Sigmoid(post))
    res = g.Reshape(res, g.const([0, 0, n, n]))
    return h_pre, h_post, sinkhorn(g, res, cfg.sinkhorn_iters)


def middle_loop(g, w: Weights, cfg: HyperloopConfig, l, state, e, ctx, pasts):
    """One loop: u from the state, o = middle(u), state update. pasts[j]: middle layer j's past, as in
    attention(). Returns (new state, [(k, v) per middle layer], as attention() returns them)."""
    if cfg.hc == "none":
        s = state
        if cfg.injection == "inject":
            u = w.linear(g, g.Concat(e, s, axis=-1), "inject")
        else:
            u = g.Add(s, e) if cfg.injection == "additive" else s
    else:
        Y = state
        h_pre, h_post, h_res = coefficients(g, w, cfg, Y, l)
        u = g.ReduceSum(g.Mul(g.Unsqueeze(h_pre, g.const([-1])), Y), g.const([-2]), keepdims=0)
    if cfg.loop_embedding:
        u = g.Add(u, loop_row(g, w, "loop_embed", l))
    presents, o = [], u
    for j in range(cfg.n_middle):
        o, k, v = block(g, w, cfg, f"middle.{j}", o, ctx, pasts[j])
        presents.append((k, v))
    if cfg.middle_norm:
        o = rms_norm(g, o, cfg.norm_eps, w.param(g, "middle_norm.weight"))
    if cfg.hc == "none":
        return o, presents
    Y = g.Add(g.MatMul(h_res, Y), g.Mul(g.Unsqueeze(h_post, g.const([-1])), g.Unsqueeze(o, g.const([-2]))))
    return Y, presents


# ---- the whole graph ---------------------------------------------------------------------
def kv_name(i: int, kind: str, past: bool) -> str:
    return f"past_key_values.{i}.{kind}" if past else f"present.{i}.{kind}"


def build(cfg: HyperloopConfig, w: Weights, unroll: bool = False) -> ir.Model:
    """The ONNX model of `cfg` with weights from `w` (Loop, or unrolled with the weights still stored once)."""
    g = GraphBuilder()
    KV, hd = cfg.n_kv_heads, cfg.head_dim
    kv_shape_past = ["batch_size", KV, "past_sequence_length", hd]
    kv_shape_present = ["batch_size", KV, "total_sequence_length", hd]
    input_ids = graph_input("input_ids", INT64, ["batch_size", "sequence_length"])
    attention_mask = graph_input("attention_mask", INT64, ["batch_size", "total_sequence_length"])
    position_ids = graph_input("position_ids", INT64, ["batch_size", "sequence_length"])
    E = cfg.effective_layers
    past = [(graph_input(kv_name(i, "key", True), FLOAT, kv_shape_past),
             graph_input(kv_name(i, "value", True), FLOAT, kv_shape_past)) for i in range(E)]
    inputs = [input_ids, attention_mask, position_ids] + [t for kv in past for t in kv]

    # rotary tables and the additive attention bias (causal, padding, diagonal kept; model.Hyperloop._mask)
    from edgeloop.model.model import rope_tables

    cos_t, sin_t = rope_tables(cfg, cfg.max_seq_len)
    ctx = {"cos": g.Unsqueeze(g.Gather(g.initializer("rope.cos", cos_t.numpy()), position_ids, axis=0), g.const([1])),
           "sin": g.Unsqueeze(g.Gather(g.initializer("rope.sin", sin_t.numpy()), position_ids, axis=0), g.const([1]))}
    S = g.Shape(input_ids, start=1, end=2)
    T = g.Shape(attention_mask, start=1, end=2)
    q_idx = g.Unsqueeze(g.Range(g.Squeeze(g.Sub(T, S)), g.Squeeze(T), g.const(1)), g.const([1]))
    k_idx = g.Unsqueeze(g.Range(g.const(0), g.Squeeze(T), g.const(1)), g.const([0]))
    valid = g.Unsqueeze(g.Cast(attention_mask, to=BOOL), g.const([1, 2]))
    allowed = g.Or(g.And(g.LessOrEqual(k_idx, q_idx), valid), g.Equal(k_idx, q_idx))
    bias = g.Where(allowed, g.const(0.0, np.float32), g.const(-np.inf, np.float32))  # [B, 1, S, T]
    rep = cfg.n_heads // cfg.n_kv_heads  # grouped queries are [B, KV, rep*S, hd]: the bias repeats per group
    ctx["bias"] = g.Concat(*[bias] * rep, axis=2) if rep > 1 else bias

    presents: dict[int, tuple] = {}
    x = w.embedding(g, input_ids)
    if cfg.embed_norm:
        x = rms_norm(g, x, cfg.norm_eps, w.param(g, "embed_norm.weight"))
    for i in range(cfg.n_begin):
        x, *presents[i] = block(g, w, cfg, f"begin.{i}", x, ctx, past[i])
    e = x
    if cfg.hc == "none":
        state = g.ConstantOfShape(g.Shape(e), value=ir.tensor(np.zeros(1, np.float32))) \
            if cfg.injection == "additive" else e
    else:
        B_S = g.Shape(e, start=0, end=2)
        state = g.Expand(g.Unsqueeze(e, g.const([2])), g.Concat(B_S, g.const([cfg.n_streams, cfg.d_model]), axis=0))

    num_loops = None
    if unroll:
        for l in range(cfg.num_loops):
            pasts = [past[cfg.slot(l, j)] for j in range(cfg.n_middle)]
            state, pres = middle_loop(g, w, cfg, g.const(l), state, e, ctx, pasts)
            for j, kv in enumerate(pres):
                presents[cfg.slot(l, j)] = kv
    else:
        num_loops = ir.Value(name="num_loops", type=ir.TensorType(INT64), shape=ir.Shape([]),
                             const_value=ir.tensor(np.array(cfg.num_loops, np.int64), name="num_loops"))
        g.root.initializers["num_loops"] = num_loops  # an input with a default: the trained r
        state, presents_mid = loop(g, w, cfg, num_loops, state, e, ctx, past)
        presents.update(presents_mid)
    if cfg.hc == "none":
        x = state
    else:  # collapse the streams
        x = (g.ReduceMean if cfg.collapse == "mean" else g.ReduceSum)(state, g.const([2]), keepdims=0)
    first_end = cfg.n_begin + cfg.num_loops * cfg.n_middle
    for j in range(cfg.n_end):
        x, *presents[first_end + j] = block(g, w, cfg, f"end.{j}", x, ctx, past[first_end + j])
    x = rms_norm(g, x, cfg.norm_eps, w.param(g, "final_norm.weight"))
    logits = w.lm_head(g, x)
    if cfg.logit_softcap > 0:
        c = g.const(cfg.logit_softcap, np.float32)
        logits = g.Mul(g.Tanh(g.Div(logits, c)), c)

    outputs = [typed(g.Identity(logits), FLOAT, ["batch_size", "sequence_length", cfg.vocab_size], "logits")]
    for i in range(E):
        for kind, t in zip(("key", "value"), presents[i]):
            outputs.append(typed(g.Identity(t), FLOAT, kv_shape_present, kv_name(i, kind, False)))
    if num_loops is not None:
        inputs.append(num_loops)
    model = ir.Model(g.graph(inputs, outputs, "hyperloop"), ir_version=10, producer_name="edgeloop")
    return model


def by_loop(g: GraphBuilder, it, r: int, branch):
    """branch(b, l) for l = it (0 <= it < r), chosen by a binary tree of If nodes: each branch reads the
    outer-scope tensors of its own loop in place (SequenceAt or Gather would copy them every iteration)."""
    def pick(b: GraphBuilder, lo: int, hi: int):
        if hi - lo == 1:
            return branch(b, lo)
        mid = (lo + hi) // 2
        lo_b, hi_b = b.sub(f"loops{lo}_{mid}/"), b.sub(f"loops{mid}_{hi}/")
        lo_out, hi_out = (typed(pick(sb, *span), FLOAT, [None] * 4) for sb, span in ((lo_b, (lo, mid)), (hi_b, (mid, hi))))
        return b.If(below(mid), then_branch=lo_b.graph([], [lo_out], f"loops{lo}_{mid}"),
                    else_branch=hi_b.graph([], [hi_out], f"loops{mid}_{hi}"))
    def below(mid: int):  # it < mid, made once per body and shared by every layer's tree
        if ("below", mid) not in g.memo:
            g.memo["below", mid] = g.Less(it, g.const(mid))
        return g.memo["below", mid]
    return pick(g, 0, r)


def loop(g: GraphBuilder, w: Weights, cfg: HyperloopConfig, num_loops, state, e, ctx, past):
    """The middle block as one Loop node; returns (final state, {slot: (present_k, present_v)}).
    Inside the body, middle layer j attends to past[slot(iter_num, j)] (picked by by_loop); each
    iteration's NEW keys/values leave as scan outputs and present.{slot} = [past; new] is built after."""
    r, nm = cfg.num_loops, cfg.n_middle
    b = g.sub("loop/")
    it = typed(ir.Value(name=b.fresh("iter_num")), INT64, [])
    cond = typed(ir.Value(name=b.fresh("cond")), BOOL, [])
    state_shape = ["batch_size", "sequence_length", cfg.d_model] if cfg.hc == "none" else \
        ["batch_size", "sequence_length", cfg.n_streams, cfg.d_model]
    s_in = typed(ir.Value(name=b.fresh("state")), FLOAT, state_shape)

    def past_of(j):
        return lambda bb, attend: by_loop(bb, it, r, lambda lb, l: attend(lb, *past[cfg.slot(l, j)]))

    s_out, new = middle_loop(b, w, cfg, it, s_in, e, ctx, [past_of(j) for j in range(nm)])
    kv_new = ["batch_size", cfg.n_kv_heads, "sequence_length", cfg.head_dim]
    body_outs = [cond, typed(s_out, FLOAT, state_shape)]
    body_outs += [typed(t, FLOAT, kv_new) for kv in new for t in kv]  # values made in the body: no Identity copies
    body = b.graph([it, cond, s_in], body_outs, "middle_block")
    outs = g.Loop(num_loops, g.const(True, np.bool_), state, body=body, _outputs=1 + 2 * nm)
    final, scans = outs[0], outs[1:]  # scans[2j + c]: [num_loops, B, KV, S, hd]
    # present.{slot}: one If picks the common all-loops-ran path; only when num_loops < r does a slot
    # choose between [past; its scan row] and its past passed through unchanged
    slots = [(l, j, c) for l in range(r) for j in range(nm) for c in range(2)]
    kv_shape = ["batch_size", cfg.n_kv_heads, "total_sequence_length", cfg.head_dim]
    all_b, some_b = g.sub("all_loops/"), g.sub("some_loops/")
    rows = {}
    row_shape = all_b.Concat(all_b.const([-1]), all_b.Shape(scans[0], start=2), axis=0)  # [-1, KV, S, hd]
    for j in range(nm):
        for c in range(2):
            flat = all_b.Reshape(scans[2 * j + c], row_shape)
            parts = all_b.Split(flat, axis=0, num_outputs=r, _outputs=r) if r > 1 else [flat]
            for l, part in enumerate(parts):  # [r*B, KV, S, hd] split into r rows of [B, KV, S, hd]
                rows[l, j, c] = part
    all_outs = [typed(all_b.Concat(past[cfg.slot(l, j)][c], rows[l, j, c], axis=2), FLOAT, kv_shape)
                for l, j, c in slots]
    some_outs = []
    for l, j, c in slots:
        then_b, else_b = some_b.sub(f"ran{l}_{j}_{c}/"), some_b.sub(f"skipped{l}_{j}_{c}/")
        pst = past[cfg.slot(l, j)][c]
        t_out = typed(then_b.Concat(pst, then_b.Gather(scans[2 * j + c], then_b.const(l), axis=0), axis=2),
                      FLOAT, kv_shape)
        e_out = typed(else_b.Identity(pst), FLOAT, kv_shape)
        some_outs.append(typed(some_b.If(some_b.Less(some_b.const(l), num_loops),
                                         then_branch=then_b.graph([], [t_out], "ran"),
                                         else_branch=else_b.graph([], [e_out], "skipped")), FLOAT, kv_shape))
    outs = g.If(g.Equal(num_loops, g.const(r)), then_branch=all_b.graph([], all_outs, "all_loops"),
                else_branch=some_b.graph([], some_outs, "some_loops"), _outputs=len(slots))
    outs = [outs] if len(slots) == 1 else outs
    presents: dict[int, list] = {}
    for (l, j, c), v in zip(slots, outs):
        presents.setdefault(cfg.slot(l, j), [None, None])[c] = v
    return final, {k: tuple(v) for k, v in presents.items()}
