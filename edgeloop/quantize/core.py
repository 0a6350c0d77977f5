"""`quantize_(model, cfg)`: INT4 in place on a Hyperloop model, RTN or loop-aware sequential GPTQ.

Order (each step sees the already-quantized earlier ones, as in the GPTQ paper):
    embedding (rtn at embedding_bits, if quantize_embedding) and hc matrices (rtn, if quantize_hc)
    begin layers -> inject -> middle layers -> end layers -> lm_head (if quantize_lm_head, untied)
Within a block: q/k/v together (one shared Hessian), attn out, fc/gate together, mlp down.
GPTQ, per block: the calibration windows run through the partially quantized model once, and a pre-hook
records every call's input of the block (r calls per window for a middle block: one per loop; the
forward stops at the last one). Then per group, only the block is re-run on those inputs and a pre-hook
on the group's first Linear feeds each call into the Hessian, so a shared middle weight accumulates all
r loop iterations (n = r x tokens) and later groups see the already-quantized earlier ones. The middle
block's loop-l inputs are those of the model quantized up to the block (the block itself and the later
middle layers are still float there: with shared weights no order can quantize them "before" loop l).
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgeloop.model.model import Hyperloop
from edgeloop.quantize.config import GPTQConfig, QuantConfig, QuantizeError, as_rows, plan, roles
from edgeloop.quantize.gptq import GPTQ
from edgeloop.quantize.modules import QuantEmbedding, QuantLinear, linear_groups, set_module
from edgeloop.quantize.packing import dequantize, encode, rtn

CALIB_BATCH = 8  # calibration sequences per forward (bounds activation memory)
Progress = Callable[[str, int], None]  # (description, tensors done in this step)


class _Stop(Exception):
    """Raised by a calibration hook once its group has seen every call of this forward."""


def calibration_ids(tokenizer, cfg: GPTQConfig, max_seq_len: int) -> tuple[torch.Tensor, dict]:
    """[calib_samples, calib_seq_len] token windows: the text cut into windows of calib_seq_len tokens,
    calib_samples of them drawn without replacement (numpy seed = cfg.seed), kept in text order."""
    from edgeloop.model.data import corpus_split, encode as encode_text, read_text

    S, T = cfg.calib_samples, cfg.calib_seq_len
    if T > max_seq_len:
        raise QuantizeError(f"calib_seq_len={T} is longer than the model's max_seq_len={max_seq_len}")
    if cfg.calib_text:
        text, source = read_text(cfg.calib_text), Path(cfg.calib_text).name
    else:
        text, source = corpus_split("train"), "kjv train split (edgeloop.model.data.corpus_split)"
    ids = encode_text(tokenizer, text)
    n_windows = len(ids) // T
    if n_windows < S:
        raise QuantizeError(f"calibration text has {len(ids):,} tokens; {S} samples x {T} tokens need "
                            f"{S * T:,} (give a longer --calib-text or fewer --calib-samples)")
    pick = np.sort(np.random.default_rng(cfg.seed).choice(n_windows, S, replace=False))
    windows = np.stack([ids[i * T:(i + 1) * T] for i in pick])
    info = {"text": source, "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "text_tokens": int(len(ids)), "samples": S, "seq_len": T, "tokens": S * T, "seed": cfg.seed}
    return torch.as_tensor(windows, dtype=torch.long), info


def _rtn(w: torch.Tensor, cfg: QuantConfig) -> tuple:
    return rtn(w, cfg.group_size, cfg.sym, cfg.scale_dtype)


def _replace_linear(model: Hyperloop, name: str, packed: tuple, cfg: QuantConfig, bits: int = 4) -> None:
    mod = QuantLinear(*packed, cfg.group_size, cfg.sym, bits, bias=model.get_submodule(name).bias)
    if cfg.algorithm == "gptq":
        mod.cache(True)  # calibration calls it many times; dropped at the end
    set_module(model, name, mod)


def _label(group: list[str]) -> str:
    return group[0].rsplit(".", 1)[0] if len(group) > 1 else group[0]


def quantize_hc_params(model: Hyperloop, cfg: QuantConfig, names: list[str]) -> list[str]:
    """RTN the per-loop hc matrices [r, K, N] (as rows W_l = w[l]^T [N, K]) and loop_embed [r, d] named in
    `names`; the packed tensors go to model.int4_params, the dequantized values into the parameters."""
    table = roles(model.cfg)
    for name in names:
        p = model.get_parameter(name)
        packed = rtn(as_rows(p.detach().float(), table[name]), cfg.group_size, cfg.sym, cfg.scale_dtype)
        p.data.copy_(as_rows(dequantize(*packed, cfg.group_size, cfg.sym), table[name]))
        model.int4_params[name] = packed
    return names


def _run_calibration(model: Hyperloop, calib_ids: torch.Tensor) -> None:
    """The calibration windows through the model in batches; a hook ends a batch early with _Stop."""
    for b in range(0, calib_ids.shape[0], CALIB_BATCH):
        try:
            model(calib_ids[b:b + CALIB_BATCH])
        except _Stop:
            pass


def _hooked(module: torch.nn.Module, fn: Callable, calls: int):
    """A forward pre-hook calling fn(args) on each call and raising _Stop after `calls` calls (then resetting)."""
    seen = [0]

    def hook(_mod, args):
        fn(args)
        seen[0] += 1
        if seen[0] == calls:
            seen[0] = 0
            raise _Stop

    return module.register_forward_pre_hook(hook)


@torch.no_grad()
def _capture_inputs(model: Hyperloop, block: str, calls: int, calib_ids: torch.Tensor) -> list[tuple]:
    """Every call's arguments (x, rope, mask, past) of a Block over the calibration set: `calls` per batch
    (r for a middle block, one per loop; 1 otherwise). The block itself is not run."""
    store: list[tuple] = []
    handle = _hooked(model.get_submodule(block), lambda args: store.append(tuple(args)), calls)
    try:
        _run_calibration(model, calib_ids)
    finally:
        handle.remove()
    return store


@torch.no_grad()
def _hessian(root: torch.nn.Module, linear: str, calls: int, run: Callable[[], None]) -> GPTQ:
    """H from every input of root.<linear> while `run()` drives calibration data through `root`."""
    mod = root.get_submodule(linear)
    h = GPTQ(mod.weight.shape[1], linear, mod.weight.device)
    handle = _hooked(mod, lambda args: h.add_batch(args[0]), calls)
    try:
        run()
    finally:
        handle.remove()
    return h


def _block_runner(block: torch.nn.Module, inputs: list[tuple]) -> Callable[[], None]:
    def run() -> None:
        for args in inputs:
            try:
                block(*args)
            except _Stop:
                pass
    return run


@torch.no_grad()
def quantize_(model: Hyperloop, cfg: QuantConfig, calib_ids: torch.Tensor | np.ndarray | None = None,
              progress: Progress | None = None, calibration: dict | None = None) -> dict:
    """Quantize `model` in place (Linears -> QuantLinear, embedding -> QuantEmbedding) and return a report:
    {"quantized": {name: why}, "kept": {name: why}, "layers": [{name, algorithm, gptq_err, rtn_err,
    nsamples}], "seconds"}. GPTQ needs calib_ids [S, T] (token ids)."""
    t0 = time.time()
    cfg.validate()
    step = progress or (lambda desc, n: None)
    model.eval()
    if any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules()):
        raise QuantizeError("the model is already quantized (quantize_ starts from a float model)")
    quant, kept = plan({n: tuple(t.shape) for n, t in model.state_dict().items()}, model.cfg, cfg)
    if cfg.algorithm == "gptq":
        if calib_ids is None:
            raise QuantizeError("algorithm 'gptq' needs calibration token ids (calib_ids)")
        calib_ids = torch.as_tensor(np.asarray(calib_ids), dtype=torch.long)
        if calib_ids.ndim != 2 or calib_ids.numel() == 0:
            raise QuantizeError(f"calib_ids must be [samples, seq_len], got shape {tuple(calib_ids.shape)}")
        model.to(cfg.device)  # calibration forwards and Hessians run there (the model stays there)
        calib_ids = calib_ids.to(cfg.device)
    if not hasattr(model, "int4_params"):
        model.int4_params = {}
    layers: list[dict] = []
    if "embed.weight" in quant:
        bits = cfg.embedding_bits
        emb = QuantEmbedding(*rtn(model.embed.weight, cfg.group_size, cfg.sym, cfg.scale_dtype, bits),
                             cfg.group_size, cfg.sym, bits)
        emb.cache(cfg.algorithm == "gptq")
        set_module(model, "embed", emb)
        layers.append({"name": "embed", "algorithm": "rtn", "bits": bits})
        step("embed", 1)
    table = roles(model.cfg)
    hc = [n for n in quant if table[n].role == "hc"]
    if hc:
        step("hyper-connections", len(quantize_hc_params(model, cfg, hc)))
    block, inputs = None, []
    for group in linear_groups(table, set(quant)):
        if group == ["lm_head"] and cfg.lm_head_bits == 8:  # INT8: RTN is near-lossless, no calibration needed
            w = model.lm_head.weight
            _replace_linear(model, "lm_head", rtn(w, cfg.group_size, cfg.sym, cfg.scale_dtype, 8), cfg, 8)
            layers.append({"name": "lm_head", "algorithm": "rtn", "bits": 8})
            step("lm_head", 1)
            continue
        if cfg.algorithm == "rtn":
            for name in group:
                _replace_linear(model, name, _rtn(model.get_submodule(name).weight, cfg), cfg)
                layers.append({"name": name, "algorithm": "rtn"})
            step(_label(group), len(group))
            continue
        info = table[f"{group[0]}.weight"]  # calls: r for a middle-block or injection weight
        if info.block is not None:  # inputs of the block, captured once per block
            if info.block != block:
                block, inputs = info.block, _capture_inputs(model, info.block, info.calls, calib_ids)
            bmod = model.get_submodule(block)
            h = _hessian(bmod, group[0][len(block) + 1:], 1, _block_runner(bmod, inputs))
        else:  # inject / lm_head: straight from the model
            block, inputs = None, []
            h = _hessian(model, group[0], info.calls, lambda: _run_calibration(model, calib_ids))
        h.name = group[0]
        for name in group:
            w = model.get_submodule(name).weight
            codes, scale, zero, stats = h.fasterquant(w, cfg.group_size, cfg.sym, cfg.scale_dtype, cfg.act_order)
            _replace_linear(model, name, encode(codes, scale, zero, cfg.sym), cfg)
            layers.append({"name": name, "algorithm": "gptq", **stats})
        del h
        step(_label(group), len(group))
    del inputs
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            m.cache(False)
    model.quantization = {"config": cfg.to_dict(), "calibration": calibration if cfg.algorithm == "gptq" else None}
    return {"quantized": quant, "kept": kept, "layers": layers, "seconds": time.time() - t0}
