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


def attention(g, w: Weights, cfg: HyperloopConfig, p: str, x, ctx: dict, past_k, past_v):
    """Causal GQA attention over [past; new] with rotary + optional QK-norm; returns (y, present_k, present_v)."""
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def heads(t, n):  # [B, S, n*hd] -> [B, n, S, hd]
        return g.Transpose(g.Reshape(t, g.const([0, 0, n, hd])), perm=[0, 2, 1, 3])

    q = rope(g, heads(w.linear(g, x, f"{p}.c_q"), H), ctx["cos"], ctx["sin"])
    k = rope(g, heads(w.linear(g, x, f"{p}.c_k"), KV), ctx["cos"], ctx["sin"])
    v = heads(w.linear(g, x, f"{p}.c_v"), KV)
    if cfg.qk_norm:
        q, k = rms_norm(g, q, cfg.norm_eps), rms_norm(g, k, cfg.norm_eps)
    k, v = g.Concat(past_k, k, axis=2), g.Concat(past_v, v, axis=2)
    kk, vv = (repeat_kv(g, k, KV, H // KV, hd), repeat_kv(g, v, KV, H // KV, hd)) if H != KV else (k, v)
    scores = g.Add(g.Mul(g.MatMul(q, g.Transpose(kk, perm=[0, 1, 3, 2])), g.const(1 / math.sqrt(hd), np.float32)),
                   ctx["bias"])
    y = g.MatMul(g.Softmax(scores, axis=-1), vv)
    y = g.Reshape(g.Transpose(y, perm=[0, 2, 1, 3]), g.const([0, 0, H * hd]))
    return w.linear(g, y, f"{p}.c_proj"), k, v


def repeat_kv(g, t, kv: int, rep: int, hd: int):
    """[B, KV, T, hd] -> [B, KV*rep, T, hd], query head h reading KV head h // rep."""
    shape = g.Shape(t)
    b, T = g.Gather(shape, g.const([0]), axis=0), g.Gather(shape, g.const([2]), axis=0)
    big = g.Concat(b, g.const([kv, rep]), T, g.const([hd]), axis=0)
    t = g.Expand(g.Unsqueeze(t, g.const([2])), big)
    return g.Reshape(t, g.Concat(b, g.const([kv * rep]), T, g.const([hd]), axis=0))


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


def block(g, w: Weights, cfg: HyperloopConfig, p: str, x, ctx, past_k, past_v):
    """x += attn(norm1 x); x += mlp(norm2 x)."""
    a, k, v = attention(g, w, cfg, f"{p}.attn", rms_norm(g, x, cfg.norm_eps, w.param(g, f"{p}.norm1.weight")),
                        ctx, past_k, past_v)
    x = g.Add(x, a)
    x = g.Add(x, mlp(g, w, cfg, f"{p}.mlp", rms_norm(g, x, cfg.norm_eps, w.param(g, f"{p}.norm2.weight"))))
    return x, k, v


# ---- one loop of the middle block with its hyper-connection update ----------------------
def sinkhorn(g, logits, iters: int):
    m = g.Exp(g.Sub(logits, g.ReduceMax(logits, g.const([-2, -1]), keepdims=1)))
    for _ in range(iters):
        m = g.Div(m, g.ReduceSum(m, g.const([-1]), keepdims=1))
        m = g.Div(m, g.ReduceSum(m, g.const([-2]), keepdims=1))
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

    def proj(kind):
        return g.Add(g.Mul(loop_row(g, w, f"hc.a_{kind}", l), g.MatMul(z, loop_row(g, w, f"hc.w_{kind}", l))),
                     loop_row(g, w, f"hc.b_{kind}", l) if kind != "res" else g.const(0.0, np.float32))

    h_pre = g.Sigmoid(proj("pre"))
    h_post = g.Mul(g.const(2.0, np.float32), g.Sigmoid(proj("post")))
    res = g.Add(g.Reshape(proj("res"), g.const([0, 0, n, n])), loop_row(g, w, "hc.b_res", l))
    return h_pre, h_post, sinkhorn(g, res, cfg.sinkhorn_iters)


def middle_loop(g, w: Weights, cfg: HyperloopConfig, l, state, e, ctx, pasts):
    """One loop: u from the state, o = middle(u), state update. pasts[j] = (k, v) of middle layer j.
    Returns (new state, [(present_k, present_v) per middle layer])."""
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
        o, k, v = block(g, w, cfg, f"middle.{j}", o, ctx, *pasts[j])
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
    ctx["bias"] = g.Where(allowed, g.const(0.0, np.float32), g.const(-np.inf, np.float32))

    presents: dict[int, tuple] = {}
    x = w.embedding(g, input_ids)
    if cfg.embed_norm:
        x = rms_norm(g, x, cfg.norm_eps, w.param(g, "embed_norm.weight"))
    for i in range(cfg.n_begin):
        x, *presents[i] = block(g, w, cfg, f"begin.{i}", x, ctx, *past[i])
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
        x, *presents[first_end + j] = block(g, w, cfg, f"end.{j}", x, ctx, *past[first_end + j])
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


def loop(g: GraphBuilder, w: Weights, cfg: HyperloopConfig, num_loops, state, e, ctx, past):
    """The middle block as one Loop node; returns (final state, {slot: (present_k, present_v)})."""
    r, nm = cfg.num_loops, cfg.n_middle
    seqs = [(g.SequenceConstruct(*[past[cfg.slot(l, j)][0] for l in range(r)]),
             g.SequenceConstruct(*[past[cfg.slot(l, j)][1] for l in range(r)])) for j in range(nm)]
    b = g.sub("loop/")
    it = typed(ir.Value(name=b.fresh("iter_num")), INT64, [])
    cond = typed(ir.Value(name=b.fresh("cond")), BOOL, [])
    state_shape = ["batch_size", "sequence_length", cfg.d_model] if cfg.hc == "none" else \
        ["batch_size", "sequence_length", cfg.n_streams, cfg.d_model]
    s_in = typed(ir.Value(name=b.fresh("state")), FLOAT, state_shape)
    pasts = [(b.SequenceAt(sk, it), b.SequenceAt(sv, it)) for sk, sv in seqs]
    s_out, pres = middle_loop(b, w, cfg, it, s_in, e, ctx, pasts)
    kv_shape = ["batch_size", cfg.n_kv_heads, "total_sequence_length", cfg.head_dim]
    body_outs = [typed(b.Identity(cond), BOOL, []), typed(b.Identity(s_out), FLOAT, state_shape)]
    body_outs += [typed(b.Identity(t), FLOAT, kv_shape) for kv in pres for t in kv]
    body = b.graph([it, cond, s_in], body_outs, "middle_block")
    outs = g.Loop(num_loops, g.const(True, np.bool_), state, body=body, _outputs=1 + 2 * nm)
    final, scans = outs[0], outs[1:]
    # split the scan outputs back into present.{slot}: one If picks the common all-loops-run path
    # (a Split per scan output); only when num_loops < r does a slot choose between its scan row and its past
    slots = [(l, j, c) for l in range(r) for j in range(nm) for c in range(2)]
    all_b, some_b = g.sub("all_loops/"), g.sub("some_loops/")
    rows = {}
    for j in range(nm):
        for c in range(2):
            parts = all_b.Split(scans[2 * j + c], axis=0, num_outputs=r, _outputs=r) if r > 1 else [scans[2 * j + c]]
            for l, part in enumerate(parts):
                rows[l, j, c] = all_b.Squeeze(part, all_b.const([0]))
    all_outs = [typed(all_b.Identity(rows[k]), FLOAT, kv_shape) for k in slots]
    some_outs = []
    for l, j, c in slots:
        then_b, else_b = some_b.sub(f"ran{l}_{j}_{c}/"), some_b.sub(f"skipped{l}_{j}_{c}/")
        t_out = typed(then_b.Gather(scans[2 * j + c], then_b.const(l), axis=0), FLOAT, kv_shape)
        e_out = typed(else_b.Identity(past[cfg.slot(l, j)][c]), FLOAT, kv_shape)
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
