"""Quantize settings (RTNConfig, GPTQConfig: calibration options exist only where they mean something),
their validation, and the per-tensor policy.

Policy (which stored tensor becomes INT4, and why the others are kept); the roles come from the model
(Hyperloop.tensors(): each piece declares its linears), never from matching names:
    linear     every block linear (attention q/k/v/out, MLP up/gate/down), the injection   -> INT4 always
    embedding  embed.weight [V, d]                      -> INT8 (embedding_bits) iff quantize_embedding (default;
               also the tied lm_head: GatherBlockQuantized and MatMulNBits read the same bytes)
    lm_head    lm_head.weight [V, d] (untied only)      -> INT8 (lm_head_bits, RTN) iff quantize_lm_head (default;
               INT4 by the algorithm at lm_head_bits 4)
    hc         per-loop hyper-connection matrices and loop_embed -> INT4 iff quantize_hc;
               the hc scalars and vectors (a_*, b_*, lanes) are always kept (too small to group)
    norm, bias every RMSNorm weight and linear bias     -> always kept
Kept tensors are stored in keep_dtype.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import torch

from edgeloop.model.config import HyperloopConfig
from edgeloop.model.model import Tensor, meta_model

QUANT_METHOD = "edgeloop-int4"
FORMAT = "int4-blocked-kpacked"
GROUP_SIZES = (16, 32, 64, 128, 256)
EMBEDDING_BITS = (4, 8)
ALGORITHMS = ("rtn", "gptq")
SCALE_DTYPES = ("float16", "float32")
KEEP_DTYPES = ("float32", "float16")
CALIBRATION_FIELDS = ("calib_text", "calib_samples", "calib_seq_len", "seed", "act_order", "device")


class QuantizeError(ValueError):
    """A bad setting or input for the quantize stage (one line, names the field, tensor or number)."""


@dataclass
class QuantConfig:
    """What every algorithm shares (torchao style: a config and one verb, `quantize_(model, config)`)."""
    algorithm: ClassVar[str] = "rtn"
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    scale_dtype: str = "float16"
    keep_dtype: str = "float32"  # dtype of tensors kept unquantized
    quantize_embedding: bool = True  # default defended by measurement: benchmarks/bench_quantize.py
    embedding_bits: int = 8  # 8: +0.01 % drift on the demo; 4: +1.1 % (the tied lm_head is most of it)
    quantize_lm_head: bool = True  # an untied lm_head: [V, d] is a large share of a small model's file
    lm_head_bits: int = 8  # 8: RTN, near-lossless, the fp32 head's quarter; 4: INT4 by the algorithm (GPTQ / RTN)
    quantize_hc: bool = False  # only to measure what keeping hyper-connections buys

    def validate(self) -> "QuantConfig":
        if self.bits != 4:
            raise QuantizeError(f"bits={self.bits} is not supported (edgeloop quantizes to 4 bits only)")
        if self.embedding_bits not in EMBEDDING_BITS:
            raise QuantizeError(f"embedding_bits={self.embedding_bits} must be 4 or 8")
        if self.lm_head_bits not in EMBEDDING_BITS:
            raise QuantizeError(f"lm_head_bits={self.lm_head_bits} must be 4 or 8")
        if self.group_size not in GROUP_SIZES:
            raise QuantizeError(f"group_size={self.group_size} must be one of {GROUP_SIZES}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise QuantizeError(f"scale_dtype={self.scale_dtype!r} must be one of {SCALE_DTYPES}")
        if self.keep_dtype not in KEEP_DTYPES:
            raise QuantizeError(f"keep_dtype={self.keep_dtype!r} must be one of {KEEP_DTYPES}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Every setting, the calibration ones None where the algorithm has none (a stable key set)."""
        return {"algorithm": self.algorithm, **dict.fromkeys(CALIBRATION_FIELDS), **dataclasses.asdict(self)}


@dataclass
class RTNConfig(QuantConfig):
    """Round to nearest, per group: no calibration data."""
    algorithm: ClassVar[str] = "rtn"


@dataclass
class GPTQConfig(QuantConfig):
    """GPTQ against calibration activations (loop-aware: a middle-block weight sees all r loops)."""
    algorithm: ClassVar[str] = "gptq"
    calib_text: str | None = None  # UTF-8 file; None = the demo corpus training split
    calib_samples: int = 128
    calib_seq_len: int = 256
    seed: int = 0
    act_order: bool = False
    device: str = "cpu"  # where calibration and the Hessians run: "cpu" or "cuda"

    def validate(self) -> "GPTQConfig":
        super().validate()
        if self.device not in ("cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise QuantizeError(f"device={self.device!r} must be cpu or cuda")
        if str(self.device).startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise QuantizeError(f"--device {self.device}: no CUDA device here (torch {torch.__version__}, "
                                    f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
        for name in ("calib_samples", "calib_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise QuantizeError(f"{name}={v!r} must be a positive integer")
        if self.calib_seq_len < 2:
            raise QuantizeError(f"calib_seq_len={self.calib_seq_len} must be at least 2")
        return self


CONFIGS: dict[str, type[QuantConfig]] = {"rtn": RTNConfig, "gptq": GPTQConfig}


def quant_config(algorithm: str = "rtn", **settings) -> QuantConfig:
    """The config of `algorithm` with `settings`; a setting the algorithm does not take is refused by name."""
    if algorithm not in CONFIGS:
        raise QuantizeError(f"algorithm={algorithm!r} must be one of {ALGORITHMS}")
    cls = CONFIGS[algorithm]
    fields = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(settings) - fields)
    if bad:
        where = " (a calibration setting: --method gptq only)" if bad[0] in CALIBRATION_FIELDS else ""
        raise QuantizeError(f"{bad[0]}: not a setting of {algorithm}{where}")
    return cls(**settings)


def prefix(name: str) -> str:
    """State-dict prefix of a quantized tensor: 'middle.0.attn.c_q.weight' -> 'middle.0.attn.c_q'."""
    return name[:-len(".weight")] if name.endswith(".weight") else name


@lru_cache(maxsize=8)
def _roles(cfg_json: str) -> dict[str, Tensor]:
    import json

    return meta_model(HyperloopConfig.from_dict(json.loads(cfg_json))).tensors()


def roles(cfg: HyperloopConfig) -> dict[str, Tensor]:
    """Name -> Tensor (role, K axis, calls, block, group) of every stored tensor of a checkpoint of `cfg`."""
    import json

    return _roles(json.dumps(cfg.to_dict(), sort_keys=True))


def as_rows(t: torch.Tensor, info: Tensor) -> torch.Tensor:
    """A quantizable tensor as rows [..., N, K] with K = its grouped axis (per-loop hc matrices [r, K, N]
    are stored K-first)."""
    return t.transpose(-1, -2) if info.k_axis not in (-1, t.ndim - 1) else t


def row_shape(shape: tuple[int, ...], info: Tensor) -> tuple[int, ...]:
    """The shape as_rows gives a tensor of `shape`."""
    if info.k_axis in (-1, len(shape) - 1):
        return tuple(shape)
    return (*shape[:-2], shape[-1], shape[-2])


def tensor_policy(name: str, info: Tensor, cfg: HyperloopConfig, q: QuantConfig) -> tuple[bool, str]:
    """(quantize?, why) for one stored float tensor (its role `info`) of a checkpoint of `cfg` under `q`."""
    if info.role == "linear":
        return True, f"linear, INT4 {q.algorithm}"
    if info.role == "norm":
        return False, "norm weight (never INT4)"
    if info.role == "bias":
        return False, "linear bias (never INT4)"
    if info.role == "gate":
        return False, "exit gate (never INT4: tiny, and the exit decision rides on it)"
    if info.role == "embedding":
        tied = " and tied lm_head" if cfg.tie_embeddings else ""
        if q.quantize_embedding:
            return True, f"embedding{tied}, INT{q.embedding_bits} rtn (default; --keep-embedding to change)"
        return False, f"embedding{tied} kept (--keep-embedding)"
    if info.role == "lm_head":
        if q.quantize_lm_head:
            how = "rtn" if q.lm_head_bits == 8 else q.algorithm
            return True, f"lm_head, INT{q.lm_head_bits} {how} (default; --keep-lm-head to change)"
        return False, "lm_head kept (--keep-lm-head)"
    if info.quantizable:  # hyper-connection matrices and loop embeddings
        if q.quantize_hc:
            return True, "hyper-connection matrix, INT4 rtn (--quantize-hc)"
        return False, "hyper-connection parameter (never INT4 by default)"
    return False, "hyper-connection scalar/vector (always kept: too small to group)"


def tensor_bits(name: str, embedding_bits: int | None, lm_head_bits: int | None = None) -> int:
    """Code width of a quantized tensor: the embedding (and tied lm_head) at embedding_bits, an untied lm_head at
    lm_head_bits (None: 4, what a checkpoint without the field holds), the rest 4."""
    if name == "embed.weight":
        return embedding_bits or 4
    return (lm_head_bits or 4) if name == "lm_head.weight" else 4


def check_group(name: str, shape: tuple[int, ...], info: Tensor, group_size: int) -> None:
    """Refuse K % G != 0 (edgeloop does not pad: MatMulNBits blocks must tile K exactly)."""
    k = row_shape(shape, info)[-1]
    if k % group_size:
        raise QuantizeError(f"tensor '{name}': K={k} is not divisible by group size G={group_size} "
                            f"(pick a group size that divides {k}; edgeloop does not pad)")


def plan(shapes: dict[str, tuple[int, ...]], cfg: HyperloopConfig, q: QuantConfig
         ) -> tuple[dict[str, str], dict[str, str]]:
    """(quantized name -> why, kept name -> why) for stored tensors name -> shape; refuses K % G != 0."""
    quant, kept, table = {}, {}, roles(cfg)
    for name, shape in shapes.items():
        yes, why = tensor_policy(name, table[name], cfg, q)
        if yes:
            check_group(name, shape, table[name], q.group_size)
            quant[name] = why
        else:
            kept[name] = why
    return quant, kept


def quantization_config(q: QuantConfig, quantized: list[str], kept: list[str], calibration: dict | None,
                        source: dict | None = None) -> dict[str, Any]:
    """The `quantization_config` entry of config.json (GPTQ/AWQ-style keys plus the edgeloop layout)."""
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "bits": q.bits,
        "group_size": q.group_size,
        "sym": q.sym,
        "zero_point": "implicit 8" if q.sym else "packed uint4 (qzeros)",
        "algorithm": q.algorithm,
        "act_order": getattr(q, "act_order", False),
        "damp_percent": 0.01 if q.algorithm == "gptq" else None,
        "scale_dtype": q.scale_dtype,
        "keep_dtype": q.keep_dtype,
        "quantize_embedding": q.quantize_embedding,
        "embedding_bits": q.embedding_bits if q.quantize_embedding else None,
        "quantize_lm_head": q.quantize_lm_head,
        "lm_head_bits": q.lm_head_bits if q.quantize_lm_head else None,
        "quantize_hc": q.quantize_hc,
        "modules_to_convert": sorted(prefix(n) for n in quantized),
        "modules_not_converted": sorted(prefix(n) for n in kept),
        "calibration": calibration,
        "source": source,
    }


def describe(name: str, shape: tuple[int, ...], cfg: HyperloopConfig, qc: dict | None) -> str:
    """The INT4 policy of one stored tensor as `edgeloop inspect` shows it: for a quantized folder (qc =
    its quantization_config) what was done, for a float one what the default settings would do."""
    for part in ("qweight", "scales", "qzeros"):
        if name.endswith("." + part):
            bits = tensor_bits(prefix(name) + ".weight", (qc or {}).get("embedding_bits"),
                               (qc or {}).get("lm_head_bits"))
            return f"INT{bits} {part} (G={qc['group_size'] if qc else '?'})"
    cls = CONFIGS.get((qc or {}).get("algorithm"), RTNConfig)
    fields = {f.name for f in dataclasses.fields(cls)}
    q = cls(**{k: v for k, v in (qc or {}).items() if k in fields and k != "calib_text"})
    yes, why = tensor_policy(name, roles(cfg)[name], cfg, q)
    if qc is None:
        return ("quantized by default: " if yes else "kept by default: ") + why
    return f"kept {qc.get('keep_dtype', '?')}: {why}"
