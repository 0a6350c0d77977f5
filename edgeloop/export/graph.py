"""The ONNX-specific part of an export: graph inputs and outputs, positions and masks, the `Loop` and the
KV routing. The math of every stage is emitted by the model's pieces (edgeloop/model: `emit` beside each
`forward`), and parity-checked against the PyTorch forward on every export (verify.py).

    logits, present.* = graph(input_ids, attention_mask, position_ids, past_key_values.*, num_loops)

The middle block is ONE `Loop` (trip count = the `num_loops` input, default r): its body is one loop of
the middle block with its hyper-connection update (Hyperloop.emit_step); per-loop parameters are stacked
[r, ...] and the body Gathers row `iter_num`; shared weights live once in the outer graph. Inside the
body, middle layer j attends to the past of slot (iter_num, j), picked by a tree of If nodes; each
iteration's new keys/values leave as scan outputs and present.{slot} = [past; new] is built after the
Loop, loops beyond `num_loops` passing their past through unchanged (edgeloop/kv.py: the convention).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgeloop.export.builder import BOOL, FLOAT, FLOAT16, INT64, GraphBuilder, graph_input, typed
from edgeloop.export.weights import Weights
from edgeloop.kv import Layout, past_name, present_name
from edgeloop.model.config import HyperloopConfig
from edgeloop.model.model import Hyperloop, meta_model
from edgeloop.model.pieces import REGISTRY
from edgeloop.model.pieces.block import emit_chain
from edgeloop.model.pieces.rotary import rope_tables


def positions(g: GraphBuilder, model: Hyperloop, input_ids, attention_mask, position_ids, fused: bool = False) -> dict:
    """ctx for the pieces: rotary cos/sin [B, 1, S, hd/2] at position_ids, and the additive attention bias
    [B, rep, S, T] (causal, padded keys masked, the diagonal kept: Hyperloop._mask) for grouped queries. The
    fused graph: position_ids and the tables [max_seq_len, hd/2] for com.microsoft.RotaryEmbedding or
    GroupQueryAttention's own rotary (sin signed by the flavour's SIN_SIGN), GroupQueryAttention's seqlens_k,
    total_len and bias [B, 1, S, T], and new_rows ([T - S], [T]): the step's rows of its presents."""
    cfg = model.cfg
    cos_t, sin_t = rope_tables(cfg, cfg.max_seq_len)
    if fused:
        sign = REGISTRY["rotary"][cfg.rotary].SIN_SIGN
        ctx = {"position_ids": position_ids, "rope_cos": g.initializer("rope.cos", cos_t.numpy()),
               "rope_sin": g.initializer("rope.sin", (sign * sin_t).numpy())}
    else:
        ctx = {k: g.Unsqueeze(g.Gather(g.initializer(f"rope.{k}", t.numpy()), position_ids, axis=0), g.const([1]))
               for k, t in (("cos", cos_t), ("sin", sin_t))}
    S = g.Shape(input_ids, start=1, end=2)
    T = g.Shape(attention_mask, start=1, end=2)
    past_len = g.Sub(T, S)
    q_idx = g.Unsqueeze(g.Range(g.Squeeze(past_len), g.Squeeze(T), g.const(1)), g.const([1]))
    k_idx = g.Unsqueeze(g.Range(g.const(0), g.Squeeze(T), g.const(1)), g.const([0]))
    valid = g.Unsqueeze(g.Cast(attention_mask, to=BOOL), g.const([1, 2]))
    allowed = g.Or(g.And(g.LessOrEqual(k_idx, q_idx), valid), g.Equal(k_idx, q_idx))
    bias = g.Where(allowed, g.const(0.0, np.float32), g.const(-np.inf, np.float32))  # [B, 1, S, T]
    if fused:  # every row's keys 0..T-1 are there; the bias masks padding (GroupQueryAttention reads right padding)
        from edgeloop.export.builder import INT32

        ctx["bias_gqa"], ctx["total_len"] = bias, g.Cast(g.Squeeze(T), to=INT32)
        ctx["seqlens_k"] = g.Cast(g.Expand(g.Sub(T, g.const([1])), g.Shape(input_ids, start=0, end=1)), to=INT32)
        ctx["new_rows"] = (past_len, T)  # where a step's keys/values sit in GroupQueryAttention's presents
        return ctx
    rep = cfg.n_heads // cfg.n_kv_heads  # grouped queries are [B, KV, rep*S, hd]: the bias repeats per group
    ctx["bias"] = g.Concat(*[bias] * rep, axis=2) if rep > 1 else bias
    return ctx


def build(cfg: HyperloopConfig, w: Weights, unroll: bool = False, kv_policy: str | None = None,
          init_state: str = "zeros", seed: int = 0) -> ir.Model:  # noqa: C901
    """The ONNX model of `cfg` with weights from `w` (Loop, or unrolled with the weights still stored once: with
    max_loops > r, loops 2..max_loops each behind If(l < num_loops), so the loop count stays an input).
    kv_policy: per-step or shared slots (default: the config's); init_state "random": the injection's random
    start behind a float input `init_scale` (default 1.0; 0 gives the zero state) and a seeded generator."""
    model = meta_model(cfg)
    w.bind(model)
    kv = cfg.kv_layout(kv_policy)
    if unroll and model.exit_gate is not None:
        raise ValueError("--unroll: an exit-gated model needs the Loop (its condition is the exit)")
    g = GraphBuilder()
    kv_past = ["batch_size", kv.kv_heads, "past_sequence_length", kv.head_dim]
    kv_present = present_dims(kv)
    input_ids = graph_input("input_ids", INT64, ["batch_size", "sequence_length"])
    attention_mask = graph_input("attention_mask", INT64, ["batch_size", "total_sequence_length"])
    position_ids = graph_input("position_ids", INT64, ["batch_size", "sequence_length"])
    kv_type = FLOAT16 if kv.dtype == "float16" else FLOAT
    past = [tuple(graph_input(past_name(i, k), kv_type, kv_past) for k in ("key", "value")) for i in range(kv.layers)]
    inputs = [input_ids, attention_mask, position_ids] + [t for pair in past for t in pair]
    if kv_type == FLOAT16:  # an fp16 cache between steps, fp32 inside one: Cast at the boundary
        past = [tuple(g.Cast(t, to=FLOAT) for t in pair) for pair in past]
    ctx = positions(g, model, input_ids, attention_mask, position_ids, fused=w.fused)
    init_scale = None
    if init_state == "random":
        init_scale = _scalar_input(g, "init_scale", 1.0, FLOAT, np.float32)
        ctx.update(init_scale=init_scale, seed=seed)

    presents: dict[int, tuple] = {}
    x = model.emit_embed(g, w, input_ids)
    x, pres = emit_chain(g, w, model.begin, x, ctx, [past[i] for i in range(cfg.n_begin)])
    presents.update(enumerate(pres))
    e = x
    state = model.hc.emit_init(g, e, ctx)
    num_loops = None
    if unroll:  # loops past the first behind If(l < num_loops) where max_loops > r: the dial stays
        if cfg.loop_limit > cfg.num_loops:
            num_loops = _scalar_input(g, "num_loops", cfg.num_loops, INT64, np.int64)
        for l in range(cfg.loop_limit):
            pasts = [past[kv.slot(l, j)] for j in range(cfg.n_middle)]
            if l == 0 or num_loops is None:
                state, pres = model.emit_step(g, w, state, e, g.const(l), ctx, pasts)
            else:
                prev = [presents.get(kv.slot(l, j), past[kv.slot(l, j)]) for j in range(cfg.n_middle)]
                state, pres = gated_step(g, w, model, kv, l, num_loops, state, e, ctx, pasts, prev)
            presents.update({kv.slot(l, j): p for j, p in enumerate(pres)})
    else:
        num_loops = _scalar_input(g, "num_loops", cfg.num_loops, INT64, np.int64)  # default: the trained r
        if model.exit_gate is not None:
            ctx["exit_threshold"] = _scalar_input(g, "exit_threshold", cfg.early_exit_threshold, FLOAT, np.float32)
            ctx["exit_at_step"] = _scalar_input(g, "exit_at_step", -1, INT64, np.int64)
        state, presents_mid = loop(g, w, model, kv, num_loops, state, e, ctx, past)
        presents.update(presents_mid)
    x = state if model.exit_gate is not None else model.hc.emit_collapse(g, state)
    if cfg.post_loop_norm:
        x = model.final_norm.emit(g, w, x)
    x, pres = emit_chain(g, w, model.end, x, ctx, [past[kv.end_slot(j)] for j in range(cfg.n_end)])
    presents.update({kv.end_slot(j): p for j, p in enumerate(pres)})
    logits = model.emit_head(g, w, x)

    outputs = [typed(g.Identity(logits), FLOAT, ["batch_size", "sequence_length", cfg.vocab_size], "logits")]
    for i in range(kv.layers):
        for kind, t in zip(("key", "value"), presents[i]):
            out = g.Cast(t, to=FLOAT16) if kv_type == FLOAT16 else g.Identity(t)
            outputs.append(typed(out, kv_type, kv_present, present_name(i, kind)))
    if "exit_step" in ctx:
        outputs.append(typed(g.Identity(ctx["exit_step"]), INT64, ["batch_size", "sequence_length"], "exit_step"))
    inputs += [v for v in (num_loops, init_scale, ctx.get("exit_threshold"), ctx.get("exit_at_step")) if v is not None]
    return ir.Model(g.graph(inputs, outputs, "hyperloop"), ir_version=10, producer_name="edgeloop")


def present_dims(kv: Layout) -> list:
    """A present's dims: [batch_size, kv_heads, total_sequence_length, head_dim]."""
    return ["batch_size", kv.kv_heads, "total_sequence_length", kv.head_dim]


def _scalar_input(g: GraphBuilder, name: str, default, dtype: ir.DataType, np_dtype) -> ir.Value:
    """A scalar graph input with a default (an overridable initializer: onnxruntime-genai and optimum,
    which do not know it, run the default)."""
    v = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape([]),
                 const_value=ir.tensor(np.array(default, np_dtype), name=name))
    g.root.initializers[name] = v
    return v


def gated_step(g: GraphBuilder, w: Weights, model: Hyperloop, kv: Layout, l: int, num_loops, state, e, ctx, pasts,
               prev) -> tuple:
    """Loop l of an unrolled graph whose loop count is an input: If(l < num_loops) runs it (its presents
    GroupQueryAttention's or [past; new] over pasts) else passes the state and `prev` (each slot's present so
    far: its past, or under the shared policy the last loop's) through. Returns (state, presents)."""
    run, skip = g.sub(f"loop{l}/"), g.sub(f"skip{l}/")
    s_run, pres = model.emit_step(run, w, state, e, run.const(l), ctx, pasts)
    dims, shape = present_dims(kv), model.hc.state_dims()
    run_outs = [typed(s_run, FLOAT, shape)] + [typed(t, FLOAT, dims) for p in pres for t in p]
    skip_outs = [typed(skip.Identity(state), FLOAT, shape)] + [typed(skip.Identity(t), FLOAT, dims) for p in prev for t in p]
    outs = g.If(g.Less(g.const(l), num_loops), then_branch=run.graph([], run_outs, f"loop{l}"),
                else_branch=skip.graph([], skip_outs, f"skip{l}"), _outputs=len(run_outs))
    return outs[0], [(outs[1 + 2 * j], outs[2 + 2 * j]) for j in range(len(pres))]


def by_loop(g: GraphBuilder, it, r: int, branch, ranks: list[int]) -> list:
    """branch(b, l) for l = it (0 <= it < r), chosen by a binary tree of If nodes: each branch reads the
    outer-scope tensors of its own loop in place (SequenceAt or Gather would copy them every iteration).
    branch returns float tensors of the given ranks; so does the tree."""
    def pick(b: GraphBuilder, lo: int, hi: int) -> list:
        if hi - lo == 1:
            return list(branch(b, lo))
        mid = (lo + hi) // 2
        lo_b, hi_b = b.sub(f"loops{lo}_{mid}/"), b.sub(f"loops{mid}_{hi}/")
        lo_out, hi_out = ([typed(t, FLOAT, [None] * n) for t, n in zip(pick(sb, *span), ranks)]
                          for sb, span in ((lo_b, (lo, mid)), (hi_b, (mid, hi))))
        outs = b.If(below(b, mid), then_branch=lo_b.graph([], lo_out, f"loops{lo}_{mid}"),
                    else_branch=hi_b.graph([], hi_out, f"loops{mid}_{hi}"), _outputs=len(ranks))
        return list(outs) if len(ranks) > 1 else [outs]

    def below(b: GraphBuilder, mid: int):  # it < mid, made in the branch that tests it: only the log2(r) tests on
        if ("below", mid) not in b.memo:   # the path taken run, not all r - 1 at the top of every iteration
            b.memo["below", mid] = b.Less(it, b.const(mid))
        return b.memo["below", mid]
    return pick(g, 0, r)


def loop(g: GraphBuilder, w: Weights, model: Hyperloop, kv: Layout, num_loops, state, e, ctx, past):
    """The middle block as one Loop node; returns (the final state, or with an exit gate each token's collapsed
    output, {slot: (present_k, present_v)}).
    per-step: middle layer j attends to past[slot(iter_num, j)] (picked by by_loop); each iteration's NEW
    keys/values leave as scan outputs and present.{slot} = [past; new] is built after the Loop.
    shared: middle layer j attends to past[slot j]; its new keys/values are carried through the Loop and
    present.{slot j} = [past; the last iteration's].
    With an exit gate the Loop's condition stops it once every token has exited (ctx: exit_threshold,
    exit_at_step), the gate's carried values pick each token's output, and per-step slots of the loops
    skipped that way get the last iteration's keys/values (the "latest" fill); ctx["exit_step"] is set."""
    r, nm, KV, hd = kv.num_loops, kv.n_middle, kv.kv_heads, kv.head_dim
    if not kv.shared and r != model.cfg.num_loops:
        num_loops = g.Min(num_loops, g.const(r))  # the slots cover r
    gate = model.exit_gate
    b = g.sub("loop/")
    it = typed(ir.Value(name=b.fresh("iter_num")), INT64, [])
    cond = typed(ir.Value(name=b.fresh("cond")), BOOL, [])
    state_shape = model.hc.state_dims()
    s_in = typed(ir.Value(name=b.fresh("state")), FLOAT, state_shape)
    kv_new = ["batch_size", KV, "sequence_length", hd]
    gate_dims = [["batch_size", "sequence_length"]] * 2 + [["batch_size", "sequence_length"]] * 2 + \
        [["batch_size", "sequence_length", model.cfg.d_model]]
    gate_in = [typed(ir.Value(name=b.fresh("exit")), t, dims) for t, dims in
               zip((FLOAT, FLOAT, BOOL, INT64, FLOAT), gate_dims)] if gate is not None else []
    kv_in = [typed(ir.Value(name=b.fresh("kv")), FLOAT, kv_new) for _ in range(2 * nm)] if kv.shared else []

    def past_of(j):
        if kv.shared:
            return lambda bb, attend, ranks: attend(bb, *past[kv.slot(0, j)])
        return lambda bb, attend, ranks: by_loop(bb, it, r, lambda lb, l: attend(lb, *past[kv.slot(l, j)]), ranks)

    s_out, new = model.emit_step(b, w, s_in, e, it, ctx, [past_of(j) for j in range(nm)])
    more = cond
    gate_out = []
    if gate is not None:
        gate_out, more = gate.emit_update(b, w, gate_in, model.hc.emit_collapse(b, s_out), it, num_loops,
                                          ctx["exit_threshold"], ctx["exit_at_step"])
    body_outs = [more, typed(s_out, FLOAT, state_shape)]
    body_outs += [typed(v, t, dims) for v, t, dims in zip(gate_out, (FLOAT, FLOAT, BOOL, INT64, FLOAT), gate_dims)]
    body_outs += [typed(t, FLOAT, kv_new) for p in new for t in p]  # values made in the body: no Identity copies
    body = b.graph([it, cond, s_in, *gate_in, *kv_in], body_outs, "middle_block")
    init = [state] + (gate.emit_start(g, e) if gate is not None else [])
    if kv.shared:
        B_S = g.Shape(e, start=0, end=2)
        shape = g.Concat(g.Slice(B_S, g.const([0]), g.const([1])), g.const([KV]),
                         g.Slice(B_S, g.const([1]), g.const([2])), g.const([hd]), axis=0)
        init += [g.ConstantOfShape(shape, value=ir.tensor(np.zeros(1, np.float32)))] * (2 * nm)
    outs = g.Loop(num_loops, g.const(True, np.bool_), *init, body=body, _outputs=1 + len(gate_in) + 2 * nm)
    final, exits, kvs = outs[0], outs[1:1 + len(gate_in)], outs[1 + len(gate_in):]
    if gate is not None:
        ctx["exit_step"] = exits[3]
        final = exits[4]  # each token's output at the loop it exited at (the collapsed state)

    def presents_of(b: GraphBuilder, append) -> dict:
        if kv.shared:
            return {kv.slot(0, j): tuple(append(b, past[kv.slot(0, j)][c], kvs[2 * j + c]) for c in range(2))
                    for j in range(nm)}
        return route_presents(b, kv, num_loops, kvs, past, latest=gate is not None, append=append)

    if not w.fused:
        return final, presents_of(g, concat)
    return final, written_or_grown(g, kv, ctx, past[kv.slot(0, 0)][0], presents_of)


def concat(b: GraphBuilder, past, new):
    """[past; new] along the sequence: the growing cache."""
    return b.Concat(past, new, axis=2)


def written_or_grown(g: GraphBuilder, kv: Layout, ctx, a_past, presents_of) -> dict:
    """The middle slots' presents of the fused Loop graph, presents_of(b, append) built twice under one If: when
    the pasts are buffers of the context (past length >= T, kv.py's in-place convention) each new row is
    written by ScatterND at T-S..T-1 of its past (onnxruntime writes it into the past's own buffer when the
    present is bound to it: no copy of the cache), else present = [past; new] (the growing cache)."""
    bias = ctx["bias_gqa"]  # [B, 1, S, T]
    buffered = g.GreaterOrEqual(g.Shape(a_past, start=2, end=3), g.Shape(bias, start=3, end=4))
    wb, gb = g.sub("kv_written/"), g.sub("kv_grown/")
    B, S, T = (wb.Shape(bias, start=i, end=i + 1) for i in (0, 2, 3))
    shape = wb.Concat(B, wb.const([kv.kv_heads]), S, wb.const([1]), axis=0)

    def along(start, stop, at):  # Range(start, stop) as a [B, KV, S, 1] index along axis `at`
        dims = [1, 1, 1, 1]
        dims[at] = -1
        return wb.Expand(wb.Reshape(wb.Range(start, stop, wb.const(1)), wb.const(dims)), shape)

    idx = wb.Concat(along(wb.const(0), wb.Squeeze(B), 0), along(wb.const(0), wb.const(kv.kv_heads), 1),
                    along(wb.Squeeze(wb.Sub(T, S)), wb.Squeeze(T), 2), axis=3)  # [B, KV, S, 3]: (b, h, t)
    written = presents_of(wb, lambda b, past, new: b.ScatterND(past, idx, new))
    grown = presents_of(gb, concat)
    slots, dims = sorted(written), present_dims(kv)
    outs = g.If(buffered, then_branch=wb.graph([], [typed(written[s][c], FLOAT, dims) for s in slots for c in range(2)],
                                               "kv_written"),
                else_branch=gb.graph([], [typed(grown[s][c], FLOAT, dims) for s in slots for c in range(2)], "kv_grown"),
                _outputs=2 * len(slots))  # (two or more: a key and a value per slot)
    return {s: (outs[2 * i], outs[2 * i + 1]) for i, s in enumerate(slots)}


def route_presents(g: GraphBuilder, kv: Layout, num_loops, scans, past, latest: bool, append=concat) -> dict:
    """present.{slot} from the Loop's scan outputs (scans[2j + c]: [iterations, B, KV, S, hd]). One If picks
    the common all-loops-ran path; otherwise one If per loop gives its slots append(past, their scan rows) when
    the loop ran, their pasts unchanged when it is past num_loops, and, with `latest`, append(past, the last scan
    row) when the exit gate stopped the Loop before it (one If per slot would run 2 n_middle times as many: at
    32 loops of 2 layers, 128 Ifs a step). append: concat, or written_or_grown's in-place write."""
    r, nm = kv.num_loops, kv.n_middle
    slots = [(l, j, c) for l in range(r) for j in range(nm) for c in range(2)]
    # rows are taken by Slice, not Gather: WebGPU's Gather refuses a Loop output read inside an If branch
    ran = num_loops
    if latest:  # the iterations the Loop ran (the exit gate can stop it before num_loops)
        ran = g.Squeeze(g.Shape(scans[0], start=0, end=1), g.const([0]))
        last_at = g.Sub(g.Shape(scans[0], start=0, end=1), g.const([1]))  # [ran - 1]
    kv_shape = present_dims(kv)
    all_b, some_b = g.sub("all_loops/"), g.sub("some_loops/")
    rows = {}
    row_shape = all_b.Concat(all_b.const([-1]), all_b.Shape(scans[0], start=2), axis=0)  # [-1, KV, S, hd]
    for j in range(nm):
        for c in range(2):
            flat = all_b.Reshape(scans[2 * j + c], row_shape)
            parts = all_b.Split(flat, axis=0, num_outputs=r, _outputs=r) if r > 1 else [flat]
            for l, part in enumerate(parts):  # [r*B, KV, S, hd] split into r rows of [B, KV, S, hd]
                rows[l, j, c] = part
    all_outs = [typed(append(all_b, past[kv.slot(l, j)][c], rows[l, j, c]), FLOAT, kv_shape)
                for l, j, c in slots]
    some_outs = []
    pairs = [(j, c) for j in range(nm) for c in range(2)]
    for l in range(r):  # one If per loop (its slots' keys and values together), not one per slot
        then_b, else_b = some_b.sub(f"ran{l}/"), some_b.sub(f"skipped{l}/")
        psts = [past[kv.slot(l, j)][c] for j, c in pairs]
        rows_l = [then_b.Squeeze(then_b.Slice(scans[2 * j + c], then_b.const([l]), then_b.const([l + 1])),
                                 then_b.const([0])) for j, c in pairs]
        t_outs = [typed(append(then_b, p, row), FLOAT, kv_shape) for p, row in zip(psts, rows_l)]
        if latest:  # a loop the gate skipped: [past; the last iteration's]; a loop past num_loops: its past
            lat_b, skip_b = else_b.sub("latest/"), else_b.sub("skipped/")
            lat = [typed(append(lat_b, p, lat_b.Squeeze(lat_b.Slice(scans[2 * j + c], last_at,
                                                                     lat_b.Add(last_at, lat_b.const([1]))),
                                                        lat_b.const([0]))), FLOAT, kv_shape)
                   for p, (j, c) in zip(psts, pairs)]
            skip = [typed(skip_b.Identity(p), FLOAT, kv_shape) for p in psts]
            e_outs = else_b.If(else_b.Less(else_b.const(l), num_loops), then_branch=lat_b.graph([], lat, "latest"),
                               else_branch=skip_b.graph([], skip, "skipped"), _outputs=len(pairs))
            e_outs = [typed(v, FLOAT, kv_shape) for v in e_outs]
        else:
            e_outs = [typed(else_b.Identity(p), FLOAT, kv_shape) for p in psts]
        outs_l = some_b.If(some_b.Less(some_b.const(l), ran), then_branch=then_b.graph([], t_outs, "ran"),
                           else_branch=else_b.graph([], e_outs, "skipped"), _outputs=len(pairs))
        some_outs += [typed(v, FLOAT, kv_shape) for v in outs_l]
    outs = g.If(g.Equal(ran, g.const(r)), then_branch=all_b.graph([], all_outs, "all_loops"),
                else_branch=some_b.graph([], some_outs, "some_loops"), _outputs=len(slots))
    outs = [outs] if len(slots) == 1 else outs
    presents: dict[int, list] = {}
    for (l, j, c), v in zip(slots, outs):
        presents.setdefault(kv.slot(l, j), [None, None])[c] = v
    return {k: tuple(v) for k, v in presents.items()}
