"""Perplexity drift: an export on an execution provider vs the fp32 PyTorch reference, on exactly the
same token ids and strided windows.

    evaluate_drift(export_dir, reference=None, ep="cpu", tokens=8192) ->
        {"ppl", "reference_ppl", "drift_pct", "drift_abs", "tokens", "ep", ...}

The reference is a float checkpoint folder: `reference`, else the export's source (manifest "source")
when that is float, else the float checkpoint a quantized source records (quantization_config.source:
name + sha256 of its model.safetensors, looked up beside the quantized folder and in models/).
This module imports torch (the reference is the PyTorch model); the Runtime itself does not.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from edgeloop.io import file_sha256
from edgeloop.runtime.session import RuntimeInputError, read_manifest

ROOT = Path(__file__).resolve().parents[2]


def _config(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def float_source(quantized: Path) -> Path | None:
    """The float checkpoint a quantized folder was made from, when its config records it and it is found
    (by name beside the folder or under models/, confirmed by sha256 when one is recorded)."""
    qc = (_config(quantized) or {}).get("quantization_config") or {}
    src = qc.get("source") or {}
    if isinstance(src, str):
        src = {"path": src}
    cands = [Path(src["path"])] if src.get("path") else []
    if src.get("name"):
        cands += [quantized.parent / src["name"], ROOT / "models" / src["name"]]
    for c in cands:
        st = c / "model.safetensors"
        cfg = _config(c)
        if not st.is_file() or cfg is None or cfg.get("quantization_config"):
            continue
        if src.get("sha256") and file_sha256(st) != src["sha256"]:
            continue
        return c
    return None


def resolve_reference(export_dir: Path, reference: str | os.PathLike | None) -> Path:
    """The fp32 reference checkpoint folder for an export (see the module docstring)."""
    from edgeloop.importers import detect

    if reference is not None:
        ref = Path(reference)
        if detect(ref) is not None:  # a foreign checkpoint folder: imported when it is loaded
            return ref
        if (ref / "model.onnx").is_file():
            raise RuntimeInputError(f"--reference {ref}: is an export folder; pass the float PyTorch checkpoint")
        cfg = _config(ref)
        if cfg is None or not (ref / "model.safetensors").is_file():
            raise RuntimeInputError(f"--reference {ref}: not a checkpoint folder (config.json + model.safetensors)")
        if cfg.get("quantization_config"):
            raise RuntimeInputError(f"--reference {ref}: is quantized; the reference is the float checkpoint")
        return ref
    source = Path(str(read_manifest(export_dir).get("source") or ""))
    if str(source) and detect(source) is not None:
        return source
    cfg = _config(source) if str(source) else None
    if cfg is not None and not cfg.get("quantization_config") and (source / "model.safetensors").is_file():
        return source
    if cfg is not None:
        found = float_source(source)
        if found is not None:
            return found
    raise RuntimeInputError(f"{export_dir}: its float source checkpoint is not recorded or not found "
                            f"(source: {source or '?'}); pass --reference FP_DIR")


def kv_cache_drift(rt, model, ids: np.ndarray, exit_threshold: float | None, step) -> dict:
    """What the export's KV cache does to quality, token by token through the cache (a full-window perplexity
    reads no cache, so it cannot see it): the export's decode perplexity, the PyTorch reference's with the
    export's cache (policy and dtype) and with an fp32 cache, and for a shared cache the per-step one."""
    import torch

    from edgeloop.model.evaluate import decode_perplexity

    q = rt._threshold(exit_threshold) if rt.gated else None
    runs = {"export's cache": None, "fp32 cache": ("same", torch.float32)}
    if rt.kv.dtype != "float32":
        runs["export's cache"] = ("same", torch.float16)
    if rt.kv.shared:
        runs["per-step fp32 cache"] = ("per-step", torch.float32)
    label, done, out = "KV cache: decode perplexities, token by token", 0, {}
    step(label, 0, len(runs) + 1)
    got, n = rt.decode_perplexity(ids, exit_threshold=q)
    for name, spec in runs.items():
        done += 1
        step(label, done, len(runs) + 1)
        if spec is None:  # an fp32 cache under the export's policy: the same run as "fp32 cache"
            continue
        policy, dtype = spec
        out[name] = decode_perplexity(model, ids, rt.kv.policy if policy == "same" else policy, rt.num_loops, q,
                                      dtype)[0]
    step(label, len(runs) + 1, len(runs) + 1)
    fp32 = out["fp32 cache"]
    res = {"policy": rt.kv.policy, "dtype": rt.kv.dtype, "tokens": n, "decode_ppl": got,
           "reference_decode_ppl": out.get("export's cache", fp32), "reference_decode_ppl_fp32_cache": fp32,
           "drift_vs_fp32_cache_pct": 100 * (got - fp32) / fp32}
    if rt.kv.dtype != "float32":
        res["fp16_vs_fp32_cache_pct"] = 100 * (out["export's cache"] - fp32) / fp32
    if rt.kv.shared:
        per = out["per-step fp32 cache"]
        res.update(reference_decode_ppl_per_step=per, shared_vs_per_step_pct=100 * (fp32 - per) / per)
    return res


def reference_model(ref_dir: Path):
    """The float PyTorch model of a reference folder (a foreign format is imported into a temporary folder)."""
    import tempfile

    from edgeloop.importers import detect, import_folder
    from edgeloop.model.checkpoint import load_model

    imp = detect(ref_dir)
    if imp is None:
        return load_model(ref_dir)
    with tempfile.TemporaryDirectory(prefix="edgeloop-reference-") as tmp:
        import_folder(ref_dir, Path(tmp) / "ref", imp.name)
        return load_model(Path(tmp) / "ref")  # the safetensors file is read into memory: safe to delete


def evaluation_ids(export_dir: Path, text_file: str | os.PathLike | None, tokens: int | None) -> np.ndarray:
    """Token ids of --text FILE (or the demo corpus's validation split), first `tokens` of them."""
    from edgeloop.model.data import corpus_split, encode, read_text
    from edgeloop.model.checkpoint import load_tokenizer

    if tokens is not None and tokens < 2:
        raise RuntimeInputError(f"--tokens {tokens}: need at least 2")
    text = read_text(text_file) if text_file is not None else corpus_split("validation")
    ids = encode(load_tokenizer(export_dir), text)
    if len(ids) < 2:
        raise RuntimeInputError(f"{text_file}: encodes to {len(ids)} token(s); perplexity needs at least 2")
    return ids[:tokens] if tokens else ids


def evaluate_drift(export_dir: str | os.PathLike, reference: str | os.PathLike | None = None, ep: str = "cpu",
                   tokens: int | None = 8192, text: str | os.PathLike | None = None, num_loops: int | None = None,
                   batch_size: int = 4, threads: int = 0,
                   progress: Callable[[str, int, int], None] | None = None,
                   exit_threshold: float | None = None, kv_tokens: int = 256) -> dict:
    """Perplexity of the export on `ep` and of the fp32 PyTorch reference on the same ids and windows."""
    import torch

    from edgeloop.model.evaluate import perplexity as torch_perplexity
    from edgeloop.runtime.runtime import Runtime

    from edgeloop.importers import detect
    from edgeloop.quantize.validate import check_checkpoint

    export_dir = Path(export_dir)
    ref_dir = resolve_reference(export_dir, reference)
    if detect(ref_dir) is None:
        check_checkpoint(ref_dir)  # the reference's config and tensor headers, before any work
    rt = Runtime(export_dir, ep=ep, threads=threads, num_loops=num_loops)
    ids = evaluation_ids(export_dir, text, tokens)
    step = progress or (lambda what, done, total: None)
    model = reference_model(ref_dir)
    if model.cfg.vocab_size != rt.vocab_size:
        raise RuntimeInputError(f"--reference {ref_dir}: vocabulary {model.cfg.vocab_size} != the export's "
                                f"{rt.vocab_size}")
    ctx = min(rt.ctx, model.cfg.max_seq_len)  # one window size for both
    ppl, n = rt.perplexity(ids, ctx=ctx, batch_size=batch_size, progress=lambda d, t: step("export", d, t),
                           exit_threshold=exit_threshold)
    if threads:
        torch.set_num_threads(threads)
    step("reference", 0, 1)
    ref_ppl, ref_n = torch_perplexity(model, ids, ctx=ctx, stride=ctx // 2, num_loops=rt.num_loops,
                                      exit_threshold=rt._threshold(exit_threshold) if rt.gated else None)
    step("reference", 1, 1)
    assert ref_n == n
    m = rt.manifest
    cache_acts = rt.kv.shared or rt.kv.dtype != "float32"
    kv = kv_cache_drift(rt, model, ids[:kv_tokens], exit_threshold, step) if cache_acts and kv_tokens else None
    return {"kv_cache": kv, "ppl": ppl, "reference_ppl": ref_ppl, "drift_pct": 100.0 * (ppl - ref_ppl) / ref_ppl,
            "drift_abs": ppl - ref_ppl, "tokens": n, "ep": ep, "num_loops": rt.num_loops, "ctx": ctx,
            "stride": ctx // 2, "reference": str(ref_dir), "model": str(export_dir), "format": m.get("format"),
            "text": str(text) if text else "demo validation split",
            "quantization": (m.get("quantization_config") or {}).get("algorithm"),
            "exit_threshold": rt._threshold(exit_threshold) if rt.gated else None,
            "mean_loops": float(np.mean(rt.scored_loops)) if rt.gated else float(rt.num_loops),
            "placement": rt.placement() if ep != "cpu" else None}  # which provider ran which nodes
