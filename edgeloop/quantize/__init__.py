"""The quantize stage: weight-only INT4 group quantization (RTN or loop-aware GPTQ) of Hyperloop checkpoints.

    from edgeloop.quantize import QuantConfig, quantize_, quantize_checkpoint
    report = quantize_(model, QuantConfig(group_size=64, algorithm="gptq"), calib_ids)   # in place
    quantize_checkpoint("models/hyperloop-tiny", "out/int4", QuantConfig())             # folder -> folder

Packed layout ("int4-blocked-kpacked", MatMulNBits-compatible): see edgeloop.quantize.packing.
"""
from edgeloop.quantize.config import FORMAT, QUANT_METHOD, QuantConfig, QuantizeError, tensor_policy
from edgeloop.quantize.core import calibration_ids, quantize_
from edgeloop.quantize.folder import load_quantized, quantize_checkpoint, save_quantized
from edgeloop.quantize.gptq import GPTQ
from edgeloop.quantize.modules import QuantEmbedding, QuantLinear
from edgeloop.quantize.packing import dequantize, pack, rtn, unpack

__all__ = ["FORMAT", "GPTQ", "QUANT_METHOD", "QuantConfig", "QuantEmbedding", "QuantLinear", "QuantizeError",
           "calibration_ids", "dequantize", "load_quantized", "pack", "quantize_", "quantize_checkpoint", "rtn",
           "save_quantized", "tensor_policy", "unpack"]
