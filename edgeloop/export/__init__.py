"""The export stage: a checkpoint folder -> an ONNX folder whose middle block is one Loop.

    export_checkpoint(in_dir, out_dir, ExportConfig(format="matmulnbits")) -> summary

Every export is parity-checked against the PyTorch model before the folder appears (verify.py).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from edgeloop.export.weights import FORMATS

__all__ = ["FORMATS", "ExportConfig", "ExportError", "export_checkpoint"]


PER_STEP_SLOTS = 1024  # the most KV slots (past/present pairs) a per-step export may have: each is a graph input
                      # and output and a branch of the loop routing, so the graph grows with them
PARITY_BUDGET = 2e10  # parameter-token products past which the default parity check is the short one: torch's
                     # INT4 reference dequantizes every weight at every call (minutes per token at 3.5B x 32 loops)


class ExportError(ValueError):
    """The export failed a check (parity, onnx.checker); nothing was written."""


@dataclass
class ExportConfig:
    format: str | None = None  # None: matmulnbits for quantized checkpoints, fp32 for float ones
    accuracy_level: int = 0  # MatMulNBits: 0 = fp32 compute, 4 = int8 activations (faster, less exact)
    unroll: bool = False  # the loops written out, weights still stored once (graph.build)
    max_seq_len: int | None = None  # context of the export (rotary table length); default the model's
    opset: int = 21
    external_data: bool | None = None  # None: only when the graph would pass protobuf's 2 GB limit
    verify: bool = True
    decode_steps: int | None = None  # parity: decode steps after the prompt (None: 16, or 2 past PARITY_BUDGET)
    parity_loops: tuple[int, ...] | None = None  # parity: loop counts (None: r, r/2 (and 2r); or 1, 2 past the budget)
    tolerance: float | None = None  # max |logit error| allowed; default by format (see default_tolerance)
    ort: bool = False  # also model.ort + required_operators.config (onnxruntime mobile / minimal builds)
    kv_policy: str | None = None  # "per-step" | "shared" KV slots across loops; None: the model's kv_policy
    kv_dtype: str | None = None  # "float32" | "float16" KV cache between steps; None: the model's (float32)
    max_loops: int | None = None  # the most loops num_loops may ask for; None: the model's (max_loops or r); a
                                  # model with per-loop parameters keeps their first max_loops rows
    init_state: str = "zeros"  # "zeros" | "random": the injection's random start behind the init_scale input
    seed: int = 0  # the random start's generator seed
    target: str | None = None  # "cpu" | "webgpu" | "genai" | "portable": the settings left None chosen for it
                               # (resolve_target; the CLI's default is "cpu"); None: exactly what is set here
    fused: bool | None = False  # matmulnbits: onnxruntime's fused kernels (GroupQueryAttention, SimplifiedLayerNorm,
                         # SkipSimplifiedLayerNorm, q/k/v and gate/up as one MatMulNBits each)
    rotary_at_position_ids: bool = False  # fused: rotate by RotaryEmbedding at the position_ids input even where
                                          # GroupQueryAttention's own rotary (positions from seqlens_k) is exact


TARGETS = ("cpu", "webgpu", "genai", "portable")


def resolve_target(ec: ExportConfig, cfg, fmt: str | None, quantized: bool) -> tuple[ExportConfig, dict[str, str]]:
    """The settings `ec` leaves open (format None, fused None, max_loops None) chosen for ec.target, each with
    why. cpu / webgpu / genai: the fused graph (onnxruntime's kernels; parity-checked like every export) for a
    quantized model, and where per-step KV slots past r would keep onnxruntime-genai from driving the export,
    max_loops = r (the num_loops dial keeps 1..r; --max-loops N for more). portable: standard ONNX ops only
    (qdq: DequantizeLinear + MatMul, no contrib ops), any runtime."""
    if ec.target is None:
        return dataclasses.replace(ec, fused=bool(ec.fused)), {}
    if ec.target not in TARGETS:
        raise ValueError(f"--target {ec.target!r}: one of {', '.join(TARGETS)}")
    why: dict[str, str] = {}
    if fmt is None:
        fmt = ("qdq" if ec.target == "portable" else "matmulnbits") if quantized else "fp32"
        why["format"] = {"qdq": "standard ONNX ops only", "matmulnbits": "onnxruntime's INT4 kernel",
                         "fp32": "a float checkpoint"}[fmt]
    fused = ec.fused
    if fused is None:
        fused = fmt == "matmulnbits" and ec.target != "portable" and cfg.head_dim % 8 == 0
        why["fused"] = ("onnxruntime's fused kernels: the fastest graph, parity-checked" if fused else
                        f"off: GroupQueryAttention needs a head width that is a multiple of 8, not {cfg.head_dim}"
                        if fmt == "matmulnbits" and ec.target != "portable" else
                        "off: the fused graph is onnxruntime's contrib ops over MatMulNBits")
    max_loops = ec.max_loops
    per_step = (ec.kv_policy or cfg.kv_policy) == "per-step"
    if max_loops is None and ec.target != "portable" and per_step and cfg.loop_limit > cfg.num_loops:
        max_loops = cfg.num_loops
        why["max_loops"] = (f"{cfg.num_loops} (r): per-step KV slots of loops {cfg.num_loops + 1}..{cfg.loop_limit} "
                            f"would keep onnxruntime-genai from driving it; --max-loops {cfg.loop_limit} for them")
    return dataclasses.replace(ec, format=fmt, fused=fused, max_loops=max_loops), why


def default_tolerance(fmt: str, accuracy_level: int) -> float:
    """fp32: 1e-4; INT4 vs its dequantized reference: 1e-3; int8 activations (level 4) quantize the
    activations too, so they are checked at 0.5 (logits are O(10))."""
    if fmt in ("matmulnbits", "qdq") and accuracy_level >= 3:
        return 0.5
    return {"fp32": 1e-4, "fp16": 1e-4, "matmulnbits": 1e-3, "qdq": 1e-3}[fmt]


def export_config(cfg, ec: ExportConfig):
    """The model config the export runs: kv_policy and max_loops as the export asks (checked)."""
    from edgeloop.model.config import ConfigError

    if ec.init_state not in ("zeros", "random"):
        raise ValueError(f"--init-state {ec.init_state!r}: zeros or random")
    if ec.init_state == "random":
        from edgeloop.model.pieces import REGISTRY

        if cfg.hc != "none" or not REGISTRY["injection"][cfg.injection].random_start:
            raise ValueError(f"--init-state random: this model's loop state starts from its input "
                             f"(hc {cfg.hc}, injection {cfg.injection}); only a random-start injection has one")
        std = ((cfg.extra or {}).get("imported_from") or {}).get("init_std")  # the source's init_values.std
        sigma = REGISTRY["injection"][cfg.injection](cfg).sigma()
        if std is not None and abs(std - sigma) > 1e-6 * sigma:
            raise ValueError(f"--init-state random: the source's init_values.std is {std:g}, not sqrt(2 / (5d)) = "
                             f"{sigma:.6g}, so its reference start differs from edgeloop's random one" +
                             (" (std 0: it starts from zeros at any init_scale, as this export does)" if not std else ""))
    if ec.max_loops is not None and cfg.has_loop_params and ec.max_loops > cfg.loop_limit:
        raise ValueError(f"--max-loops {ec.max_loops}: this model's per-loop parameters (hc {cfg.hc}, loop embedding "
                         f"{cfg.loop_embedding}) exist for loops 1..{cfg.loop_limit}; train it with --max-loops to change that")
    changes = {k: v for k, v in (("kv_policy", ec.kv_policy), ("max_loops", ec.max_loops),
                                 ("kv_dtype", ec.kv_dtype)) if v is not None}
    try:
        cfg = dataclasses.replace(cfg, **changes).validate()
    except ConfigError as e:
        flag = str(e).split("'")[1].replace("_", "-") if "'" in str(e) else "setting"
        raise ValueError(f"--{flag}: {e}") from None
    kv = cfg.kv_layout()
    if not kv.shared and kv.layers > PER_STEP_SLOTS:
        raise ValueError(f"--kv-policy per-step: {kv.layers} KV slots (n_begin {cfg.n_begin} + {cfg.loop_limit} loops x "
                         f"n_middle {cfg.n_middle} + n_end {cfg.n_end}) is past {PER_STEP_SLOTS}; use --kv-policy shared "
                         f"(one slot per middle layer) or fewer loops")
    unrolled = cfg.n_begin + cfg.loop_limit * cfg.n_middle + cfg.n_end  # every loop up to max_loops, written out
    if ec.unroll and unrolled > PER_STEP_SLOTS:
        raise ValueError(f"--unroll: {unrolled} unrolled layers (max_loops {cfg.loop_limit}) is past {PER_STEP_SLOTS}; "
                         f"export the Loop, or unroll fewer with --max-loops")
    return cfg


def export_checkpoint(in_dir: str | Path, out_dir: str | Path, ec: ExportConfig | None = None, *,
                      overwrite: bool = False, progress=None, source: str | Path | None = None) -> dict:
    """Export the checkpoint folder `in_dir` (float or quantized) into `out_dir`; `source`: the folder to
    record as the export's source when `in_dir` is a temporary import of it."""
    from edgeloop.export.folder import write_folder
    from edgeloop.io import atomic_dir, check_output_dir
    from edgeloop.quantize.validate import check_checkpoint

    ec = ec or ExportConfig()
    if ec.decode_steps is not None and ec.decode_steps < 0:
        raise ValueError(f"--parity-steps {ec.decode_steps}: must be >= 0")
    if ec.parity_loops is not None and (not ec.parity_loops or min(ec.parity_loops) < 1):
        raise ValueError(f"--parity-loops {ec.parity_loops}: loop counts are at least 1")
    if ec.tolerance is not None and not ec.tolerance > 0:
        raise ValueError(f"tolerance {ec.tolerance}: must be > 0")
    if ec.opset != 21:
        raise ValueError(f"--opset {ec.opset}: edgeloop exports opset 21 (blocked int4 DequantizeLinear)")
    t0 = time.time()
    raw, cfg, _ = check_checkpoint(in_dir)  # config and every tensor header, before the config sizes anything
    ec, choices = resolve_target(ec, cfg, ec.format, bool(raw.get("quantization_config")))
    fmt = ec.format or ("matmulnbits" if raw.get("quantization_config") else "fp32")
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if ec.max_seq_len is not None:
        if ec.max_seq_len < 1:
            raise ValueError(f"--max-seq-len {ec.max_seq_len}: must be positive")
        cfg = dataclasses.replace(cfg, max_seq_len=ec.max_seq_len)
    cfg = export_config(cfg, ec)
    check_output_dir(out_dir, overwrite)
    ec = dataclasses.replace(ec, format=fmt)
    with atomic_dir(out_dir, overwrite) as tmp:
        summary = write_folder(Path(in_dir), tmp, cfg, raw, ec, progress=progress, source=source,
                               target={"name": ec.target, "choices": choices})
        summary["seconds"] = round(time.time() - t0, 2)
    summary["path"] = str(out_dir)
    return summary


def export_rows(s: dict) -> list[tuple[str, str]]:
    """The export's summary as (field, value) rows: what `edgeloop export` prints."""
    g, p, kv, gs, tg = s["graph"], s["parity"], s.get("kv") or {}, s.get("genai") or {"config": True}, s.get("target") or {}
    rows = [("format", s["format"] + (" (unrolled)" if s["unroll"] else "") + (", fused" if s.get("fused") else ""))]
    if tg.get("name"):
        rows.append(("target", tg["name"] + "".join(f"; {k}: {v}" for k, v in tg["choices"].items())))
    rows += [("nodes", f"{g['nodes']} in the main graph, {g['body_nodes']} in the Loop body"),
             ("Loop", "yes: the middle block is one Loop" if g["loop"] else "no (unrolled)"),
             ("rotary", "inside GroupQueryAttention (positions from seqlens_k)" if s.get("rotary") ==
              "GroupQueryAttention" else f"{s.get('rotary')} at position_ids"),
             ("initializers", ", ".join(f"{k} {v:,} B" for k, v in g["initializer_bytes"].items())),
             ("files", ", ".join(f"{k} {v:,} B" for k, v in s["file_bytes"].items()))]
    rows.append(("parity", "not checked" if p is None else
                 f"max |logit error| {p['max_abs_err']:.2e} ≤ {p['tolerance']:g} vs {p['reference']} PyTorch "
                 f"(num_loops {', '.join(p['by_num_loops'])}; prefill + "
                 f"{next(iter(p['by_num_loops'].values()))['steps']} decode steps; a left-padded batch of two"
                 + (f"; the in-place cache vs the growing one {p['in_place']['max_abs_diff']:.1e}"
                    if p.get("in_place") else "") + ")"))
    if s.get("ort"):
        o = s["ort"]
        rows.append(("ORT format", f"{o['file']} {o['bytes']:,} B ({o['style']}, {o['optimization']} optimizations; "
                     f"{len(o['operators'])} operator lines in {o['required_operators']}; "
                     f"max |logit difference| to model.onnx {o['max_abs_diff_vs_onnx']:.1e})"))
    rows.append(("KV cache", f"{kv.get('layers')} slots ({kv.get('policy')}, {kv.get('dtype')})" +
                 ("; in place: each step writes its keys/values into the past's buffer" if kv.get("in_place") else "")))
    rows.append(("onnxruntime-genai", "genai_config.json" if gs["config"] else f"no genai_config.json: {gs['why']}"))
    return rows
