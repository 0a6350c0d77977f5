"""The quantize stage: weight-only INT4 group quantization (RTN or loop-aware GPTQ) of Hyperloop checkpoints.

    from edgeloop.quantize import GPTQConfig, RTNConfig, quantize_, quantize_checkpoint
    report = quantize_(model, GPTQConfig(group_size=64), calib_ids)                  # in place
    quantize_checkpoint("models/hyperloop-tiny", "out/int4", RTNConfig())            # folder -> folder
    model = load_checkpoint("out/int4")                                              # float or quantized

Packed layout ("int4-blocked-kpacked", MatMulNBits-compatible): see edgeloop.quantize.packing.
"""
from edgeloop.quantize.config import (FORMAT, QUANT_METHOD, GPTQConfig, QuantConfig, QuantizeError, RTNConfig,
                                      quant_config, tensor_policy)
from edgeloop.quantize.core import calibration_ids, quantize_
from edgeloop.quantize.folder import load_checkpoint, load_quantized, quantize_checkpoint, save_quantized
from edgeloop.quantize.gptq import GPTQ
from edgeloop.quantize.modules import QuantEmbedding, QuantLinear
from edgeloop.quantize.packing import dequantize, pack, rtn, unpack

__all__ = ["FORMAT", "GPTQ", "GPTQConfig", "QUANT_METHOD", "QuantConfig", "QuantEmbedding", "QuantLinear",
           "QuantizeError", "RTNConfig", "calibration_ids", "dequantize", "load_checkpoint", "load_quantized", "pack",
           "quant_config", "quantize_", "quantize_checkpoint", "rtn", "save_quantized", "tensor_policy", "unpack"]
