"""The export folder: model.onnx (+ model.onnx.data when large), genai_config.json, an optimum-loadable
config.json, tokenizer files and manifest.json (versions, sizes by dtype, parity figures)."""
from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from edgeloop.export.graph import build
from edgeloop.export.verify import PROMPT, has_num_loops, in_place_parity, padded_parity, parity, random_start
from edgeloop.export.weights import Weights
from edgeloop.io import write_json
from edgeloop.kv import PAST, PRESENT
from edgeloop.model.checkpoint import GENERATION_FILES, TOKENIZER_FILES, generation_tokens
from edgeloop.model.config import HyperloopConfig
from edgeloop.model.model import meta_model

EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's limit is 2 GB


def graph_stats(model: ir.Model) -> dict:
    """Node counts (main graph and Loop body), initializer bytes by dtype."""
    by_dtype: Counter = Counter()
    for v in model.graph.initializers.values():
        by_dtype[v.const_value.dtype.name.lower()] += v.const_value.nbytes
    ops: Counter = Counter()
    body_ops: Counter = Counter()
    for node in model.graph:
        ops[node.op_type] += 1
        if node.op_type == "Loop":
            for n in node.attributes["body"].as_graph():
                body_ops[n.op_type] += 1
    return {"nodes": sum(ops.values()), "body_nodes": sum(body_ops.values()), "loop": ops["Loop"] > 0,
            "ops": dict(ops), "body_ops": dict(body_ops), "initializer_bytes": dict(by_dtype),
            "initializer_total_bytes": sum(by_dtype.values())}


def rotary_op(model: ir.Model) -> str:
    """Where q/k are rotated: "GroupQueryAttention" (do_rotary), "RotaryEmbedding" or "standard ops"."""
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))  # subgraphs (Loop body, If branches) included
    if any(n.op_type == "GroupQueryAttention" and n.attributes.get_int("do_rotary", 0) for n in nodes):
        return "GroupQueryAttention"
    return "RotaryEmbedding" if any(n.op_type == "RotaryEmbedding" for n in nodes) else "standard ops"


def in_place(model: ir.Model) -> bool:
    """Whether every present is its own past written in place (Identity between them aside): GroupQueryAttention's
    present over that past, or ScatterND into it, or the past itself (a loop that did not run); through If
    nodes whose branches all do so, or whose then-branch does and whose else-branch grows it, [past; new] (the fused
    Loop graph's choice between a buffer and a growing past). Then onnxruntime writes each step's keys/values
    into the past's own buffer when the present is bound to it (kv.py: in place)."""
    def through(v):
        while v is not None and v.producer() is not None and v.producer().op_type == "Identity":
            v = v.producer().inputs[0]
        return v

    def branches(node, v):
        k = list(node.outputs).index(v)
        return [node.attributes[b].as_graph().outputs[k] for b in ("then_branch", "else_branch")]

    def writes(v, past) -> bool:
        v = through(v)
        if v is past:
            return True
        node = v.producer() if v is not None else None
        if node is None:
            return False
        if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft":
            c = list(node.outputs).index(v)  # 1: key, 2: value
            return c in (1, 2) and through(node.inputs[2 + c]) is past
        if node.op_type == "ScatterND" and node.domain == "":
            return through(node.inputs[0]) is past
        if node.op_type == "If" and node.domain == "":
            then_v, else_v = branches(node, v)
            return writes(then_v, past) and (writes(else_v, past) or grows(else_v, past))
        return False

    def grows(v, past) -> bool:  # [past; new], or the past itself, through If nodes
        v = through(v)
        node = v.producer()
        if v is past or node is None:
            return v is past
        if node.op_type == "If" and node.domain == "":
            return all(grows(b, past) for b in branches(node, v))
        return node.op_type == "Concat" and through(node.inputs[0]) is past

    inputs = {v.name: v for v in model.graph.inputs}
    pairs = [(out, inputs.get(PAST + out.name[len(PRESENT):])) for out in model.graph.outputs
             if out.name.startswith(PRESENT)]
    return bool(pairs) and all(past is not None and writes(out, past) for out, past in pairs)


def write_folder(in_dir: Path, out: Path, cfg: HyperloopConfig, raw: dict, ec, progress=None, source=None,
                 target: dict | None = None) -> dict:
    import onnxruntime as ort

    from edgeloop.export import ExportError, default_tolerance

    step = progress or (lambda msg: None)
    step("reading weights and building the graph")
    if ec.fused and ec.format != "matmulnbits":
        raise ValueError(f"--fused: the fused graph is onnxruntime's contrib ops (--format matmulnbits), not {ec.format}")
    if ec.rotary_at_position_ids and not ec.fused:
        raise ValueError("--rotary-at-position-ids: a choice of the fused graph (--fused); the others always "
                         "rotate at position_ids")
    w = Weights(in_dir, ec.format, ec.accuracy_level, fused=ec.fused, gqa_rotary=not ec.rotary_at_position_ids)
    try:
        model = build(cfg, w, unroll=ec.unroll, init_state=ec.init_state, seed=ec.seed)
    finally:
        w.close()
    stats = graph_stats(model)
    step("serializing and checking")
    path = out / "model.onnx"
    external = ec.external_data if ec.external_data is not None else \
        stats["initializer_total_bytes"] > EXTERNAL_DATA_BYTES
    if external:  # one model.onnx.data, tensors page-aligned (64 KiB past 1 MiB) so they mmap
        ir.save(model, path, external_data="model.onnx.data", size_threshold_bytes=1024, alignment=65536)
        if not ec.fused:
            onnx.checker.check_model(str(path), full_check=False)
    else:
        proto = ir.serde.serialize_model(model)
        if not ec.fused:  # (the fused graph has onnxruntime's SimplifiedLayerNormalization in the default domain,
            onnx.checker.check_model(proto, full_check=True)  # which onnx does not know: its check is the session)
        onnx.save(proto, path)
    manifest = {"format": ec.format, "accuracy_level": ec.accuracy_level if ec.format in ("matmulnbits", "qdq") else None,
                "unroll": ec.unroll, "fused": ec.fused, "rotary": rotary_op(model), "opset": ec.opset,
                "target": target or {"name": None, "choices": {}},
                "effective_layers": cfg.effective_layers,
                "num_loops": cfg.num_loops, "max_loops": cfg.loop_limit, "kv_policy": cfg.kv_policy,
                "trained_loops": trained_loops(cfg),
                "init_state": {"kind": ec.init_state, "seed": ec.seed if ec.init_state == "random" else None},
                "max_seq_len": cfg.max_seq_len, "source": str(source or in_dir),
                "external_data": external, "kv": {**cfg.kv_layout().manifest(), "in_place": in_place(model)},
                "graph": stats, "versions": versions(),
                "file_bytes": {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()},
                "config": cfg.to_dict(), "quantization_config": raw.get("quantization_config")}
    tokenizer_ok = all((in_dir / f).is_file() for f in TOKENIZER_FILES)
    for f in (TOKENIZER_FILES if tokenizer_ok else ()) + GENERATION_FILES:
        if (in_dir / f).is_file():
            shutil.copyfile(in_dir / f, out / f)
    manifest["generation"] = generation_tokens(in_dir, raw)
    if ec.verify:
        step("parity check: onnxruntime vs PyTorch")
        from edgeloop.model.checkpoint import load_tokenizer
        from edgeloop.quantize import load_checkpoint

        ref = load_checkpoint(in_dir)
        ref.cfg = cfg  # the export's kv_policy / max_loops / context (the same weights)
        ref.init_buffers()
        prompt = load_tokenizer(in_dir).encode(PROMPT, add_special_tokens=False).ids if tokenizer_ok else \
            np.random.default_rng(0).integers(0, cfg.vocab_size, 12).tolist()
        so = ort.SessionOptions()
        so.log_severity_level = 3  # num_loops is an input with a default: ORT warns about that by design
        # ORT fuses DequantizeLinear + MatMul into MatMulNBits at accuracy level 4 unless told otherwise
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(ec.accuracy_level))
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        tol = ec.tolerance if ec.tolerance is not None else default_tolerance(ec.format, ec.accuracy_level)
        loops, steps, short = parity_plan(cfg, ec, len(prompt))
        if not has_num_loops(sess):  # unrolled: it always runs num_loops
            loops = [cfg.num_loops]
        figures = parity(sess, ref, prompt, decode_steps=steps, loop_counts=loops, policy=cfg.kv_policy)
        padded = padded_parity(sess, ref, prompt, decode_steps=min(4, steps), policy=cfg.kv_policy,
                               num_loops=min(loops) if has_num_loops(sess) else None)
        early = {}
        if cfg.exit_gate:  # the gate's early exit too: a threshold that stops loops, exit steps compared
            early = {f"q={q}": f for q in (0.5,) for f in parity(sess, ref, prompt, decode_steps=steps,
                                                                 loop_counts=[cfg.num_loops], policy=cfg.kv_policy,
                                                                 exit_threshold=q).values()}
        worst = max([f["max_abs_err"] for f in (*figures.values(), *early.values())] + [padded["max_abs_err"]])
        manifest["parity"] = {"tolerance": tol, "max_abs_err": worst, "by_num_loops": figures,
                              "left_padded_batch": padded, **({"early_exit": early} if early else {}),
                              **({"short": short} if short else {}),
                              "reference": "int4-dequantized" if raw.get("quantization_config") else "fp32"}
        if manifest["kv"]["in_place"]:  # the keys/values written into the pasts' buffers: the same logits
            counts = sorted({cfg.num_loops, min(loops)}) if has_num_loops(sess) else [None]  # Loop: fewer too
            runs = [in_place_parity(sess, cfg, prompt, decode_steps=min(4, steps), num_loops=n) for n in counts]
            ip = manifest["parity"]["in_place"] = {**max(runs, key=lambda r: r["max_abs_diff"]),
                                                   "by_num_loops": {str(r["num_loops"]): r["max_abs_diff"] for r in runs}}
            if not ip["max_abs_diff"] <= 1e-4:
                raise ExportError(f"the in-place KV cache disagrees with the growing one: max |logit difference| "
                                  f"{ip['max_abs_diff']:.3g}")
        if ec.init_state == "random":  # parity ran the zero state; the random one must be live and finite
            rs = manifest["parity"]["random_start"] = random_start(sess, cfg, prompt)
            if not (rs["finite"] and rs["change_between_draws"] > 0 and rs["change_vs_zero_state"] > 0):
                raise ExportError(f"the random start does not work: {rs}")
        if not worst <= tol:
            raise ExportError(f"parity check failed: max |logit error| {worst:.3g} > tolerance {tol:g} "
                              f"(onnxruntime vs PyTorch, num_loops {', '.join(figures)}, and a left-padded "
                              f"batch of two: {padded['max_abs_err']:.3g})")
    else:
        manifest["parity"] = None
    if ec.ort:
        step("ORT format: model.ort + required_operators.config")
        from edgeloop.export.ort_format import convert

        manifest["ort"] = convert(out, cfg)
        if not manifest["ort"]["max_abs_diff_vs_onnx"] <= 1e-5:
            raise ExportError(f"model.ort disagrees with model.onnx: max |logit difference| "
                              f"{manifest['ort']['max_abs_diff_vs_onnx']:.3g}")
        manifest["file_bytes"] = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    manifest["genai"] = genai_support(cfg)
    if manifest["genai"]["config"]:
        write_json(out / "genai_config.json", genai_config(cfg, manifest["generation"], manifest["kv"]["in_place"]))
    write_json(out / "config.json", optimum_config(cfg, manifest["generation"], raw))
    write_json(out / "manifest.json", manifest)
    return {k: manifest.get(k) for k in ("format", "unroll", "graph", "parity", "file_bytes", "effective_layers", "ort",
                                         "genai", "kv", "rotary", "target", "fused", "max_loops")}


def trained_loops(cfg: HyperloopConfig) -> dict:
    """What the model was trained at: a randomized count around a mean (Huginn's mean_recurrence), or r."""
    src = (cfg.extra or {}).get("imported_from") or {}
    if "mean_recurrence" in src:
        return {"mean": src["mean_recurrence"], "note": "trained with a randomized number of steps around this mean; "
                "num_loops may run 1..max_loops"}
    return {"fixed": cfg.num_loops}


def parity_plan(cfg: HyperloopConfig, ec, prompt_tokens: int) -> tuple[list[int], int, str | None]:
    """(loop counts, decode steps, why the check is short or None) of the parity check: the export's own
    choice, else r and r / 2 (and 2r) with 16 decode steps, else, past PARITY_BUDGET parameter-tokens for the
    PyTorch reference, 2 decode steps and then loop counts 1 and 2."""
    from edgeloop.export import PARITY_BUDGET, ExportError
    from edgeloop.export.verify import default_loop_counts

    model = meta_model(cfg)
    unique, middle = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.middle.parameters())

    def cost(loops, steps):
        return sum(unique + (L - 1) * middle for L in loops) * (prompt_tokens + steps)

    loops = sorted(set(ec.parity_loops), reverse=True) if ec.parity_loops else default_loop_counts(cfg)
    steps = ec.decode_steps if ec.decode_steps is not None else 16
    if max(loops) > cfg.loop_limit:
        raise ExportError(f"--parity-loops {max(loops)}: beyond the export's max_loops {cfg.loop_limit}")
    why = None
    if ec.decode_steps is None and cost(loops, steps) > PARITY_BUDGET:
        steps, why = 2, f"{cost(loops, 16):.2g} parameter-tokens for the PyTorch reference: 2 decode steps"
        if ec.parity_loops is None and cost(loops, steps) > PARITY_BUDGET:
            loops = sorted({min(2, cfg.num_loops), 1}, reverse=True)
            why += f", loop counts {', '.join(map(str, loops))} (--parity-loops / --parity-steps for more)"
    return loops, steps, why


def versions() -> dict:
    import onnxruntime
    import torch

    import edgeloop

    return {"edgeloop": getattr(edgeloop, "__version__", "0"), "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "onnx_ir": ir.__version__, "torch": torch.__version__}


def genai_support(cfg: HyperloopConfig) -> dict:
    """Whether onnxruntime-genai can drive the export. It runs the default loop count (it does not feed
    num_loops) and expects every present to be its past plus the new tokens; per-step slots of the loops
    between num_loops and max_loops keep their past unchanged, so such an export gets no genai_config.json."""
    if cfg.kv_policy == "shared" or cfg.loop_limit == cfg.num_loops:  # (an unrolled export: always the latter)
        return {"config": True}
    return {"config": False, "why": f"per-step KV slots for loops {cfg.num_loops + 1}..{cfg.loop_limit} do not grow "
            f"at the default {cfg.num_loops} loops; export with --max-loops {cfg.num_loops} (or --kv-policy shared) "
            f"for onnxruntime-genai"}


def genai_config(cfg: HyperloopConfig, gen: dict, share_buffer: bool = False) -> dict:
    """onnxruntime-genai's decoder description: one past/present pair per KV slot; an in-place export
    (kv.in_place) shares each past's buffer with its present (past_present_share_buffer)."""
    eos = gen["eos_token_id"][0] if len(gen["eos_token_id"]) == 1 else gen["eos_token_id"] or 0
    kv = cfg.kv_layout().manifest()
    return {
        "model": {
            "bos_token_id": gen["bos_token_id"], "context_length": cfg.max_seq_len, "eos_token_id": eos,
            "pad_token_id": gen["pad_token_id"],
            "type": "decoder", "vocab_size": cfg.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx", "head_size": cfg.head_dim, "hidden_size": cfg.d_model,
                "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
                "num_hidden_layers": kv["layers"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": kv["past_key"],
                           "past_value_names": kv["past_value"]},
                "outputs": {"logits": "logits", "present_key_names": kv["present_key"],
                            "present_value_names": kv["present_value"]},
            },
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": cfg.max_seq_len, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": share_buffer, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def optimum_config(cfg: HyperloopConfig, gen: dict, raw: dict) -> dict:
    """A transformers-style config that optimum's ORTModelForCausalLM reads: it describes the KV
    convention (a llama-shaped decoder with one layer per KV slot); the real architecture is under
    "edgeloop"."""
    eos = gen["eos_token_id"][0] if len(gen["eos_token_id"]) == 1 else gen["eos_token_id"] or 0
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": cfg.d_model,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim, "num_hidden_layers": cfg.kv_layout().layers, "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_seq_len, "intermediate_size": cfg.mlp_hidden,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "bos_token_id": gen["bos_token_id"],
            "eos_token_id": eos, "pad_token_id": gen["pad_token_id"], "use_cache": True, "tie_word_embeddings": cfg.tie_embeddings,
            "torch_dtype": "float32",
            "edgeloop": {"config": cfg.to_dict(), "quantization_config": raw.get("quantization_config")}}
