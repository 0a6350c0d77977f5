"""Today's toolchain, the baseline edgeloop is measured against: torch.onnx.export (dynamo) of the PyTorch
model with the same KV-cache convention (the loop unrolled by tracing), then onnxruntime's
MatMulNBitsQuantizer. Used by bench_export.py (file sizes) and bench_runtime.py (a measured row).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn


class ConventionWrapper(nn.Module):
    """Hyperloop.forward with the KV cache as flat tensors in edgeloop's order (what torch.onnx.export takes):
    (input_ids, attention_mask, position_ids, past k0, v0, k1, ...) -> (logits, present k0, v0, ...)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from edgeloop.model.model import KVCache

        cache = KVCache(self.model.cfg)
        cache.slots = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits = self.model(input_ids, cache=cache, attention_mask=attention_mask, position_ids=position_ids)
        return (logits, *[t for kv in cache.slots for t in kv])


def export_torch(ckpt: Path, out: Path) -> Path:
    """OUT/model.onnx(+.data): torch.onnx.export of the fp32 model, KV inputs/outputs named as edgeloop's."""
    from edgeloop.model.checkpoint import load_model

    model = load_model(ckpt).float().eval()
    cfg = model.cfg
    E, KV, hd = cfg.effective_layers, cfg.n_kv_heads, cfg.head_dim
    B, S, P = 2, 3, 5
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    past = [torch.randn(B, KV, P, hd) for _ in range(2 * E)]
    args = (ids, torch.ones(B, P + S, dtype=torch.long), torch.arange(P, P + S).expand(B, S).contiguous(), *past)
    kv = cfg.kv_layout().past_names()  # edgeloop's KV convention (edgeloop/kv.py)
    auto = torch.export.Dim.AUTO  # batch, sequence and past lengths: the exporter works out how they relate
    dyn = {"input_ids": {0: auto, 1: auto}, "attention_mask": {0: auto, 1: auto},
           "position_ids": {0: auto, 1: auto}, "past": tuple({0: auto, 2: auto} for _ in kv)}
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(ConventionWrapper(model).eval(), args, str(out / "model.onnx"), dynamo=True,
                          input_names=["input_ids", "attention_mask", "position_ids", *kv],
                          output_names=["logits", *cfg.kv_layout().present_names()],
                          dynamic_shapes=dyn, external_data=True, verbose=False)
    return out


def quantize_torch(fp32: Path, out: Path, block_size: int) -> Path:
    """onnxruntime's MatMulNBitsQuantizer (DEFAULT, 4 bits, asymmetric) on the torch export."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    out.mkdir(parents=True, exist_ok=True)
    q = MatMulNBitsQuantizer(onnx.load(str(fp32 / "model.onnx")),
                             algo_config=DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False))
    q.process()
    q.model.save_model_to_file(str(out / "model.onnx"), use_external_data_format=False)
    return out


def as_runtime_folder(onnx_dir: Path, edgeloop_export: Path, fmt: str) -> Path:
    """Give a torch export edgeloop's manifest and tokenizer (same config) so edgeloop.runtime can load it."""
    for f in edgeloop_export.iterdir():
        if f.is_file() and not f.name.startswith("model.onnx"):
            shutil.copy(f, onnx_dir / f.name)
    m = json.loads((onnx_dir / "manifest.json").read_text())
    m.update(format=fmt, unroll=True, note="torch.onnx.export (dynamo) of the PyTorch model; not an edgeloop graph")
    (onnx_dir / "manifest.json").write_text(json.dumps(m, indent=2))
    return onnx_dir
