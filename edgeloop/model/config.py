"""HyperloopConfig: every architecture field of a looped / Hyperloop transformer.

Effective depth = n_begin + num_loops * n_middle + n_end; unique layers = n_begin + n_middle + n_end.
A standard Transformer is num_loops = 1, hc = "none", injection = "passthrough".
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

COLLAPSES = ("mean", "sum")
KV_POLICIES = ("per-step", "shared")
PIECE_FIELDS = ("block", "mlp", "rotary", "hc", "injection")  # each names a registered piece (model/pieces)
# The fields a checkpoint's config.json must hold: the architecture, which no default can guess (a missing d_model
# must not become the demo's 256). Every other field may be left out and means its default below, which is what
# a checkpoint written before the field existed meant (block "prenorm" and rotary "half" came with the piece
# registry; edgeloop's first checkpoints, the shipped demo among them, lack them).
REQUIRED_FIELDS = ("model_type", "vocab_size", "d_model", "n_heads", "n_kv_heads", "n_begin", "n_middle", "n_end",
                   "num_loops", "mlp_hidden", "max_seq_len", "hc", "n_streams", "mlp", "injection")
# Upper limits of the sizes a config sets. A config sizes memory and work before a tensor is read (the meta model,
# the rotary tables, KV layouts, the ONNX graph's loop routing), so a typo such as num_loops 10^9 must fail here,
# not allocate; each bound is far past any released looped LM (Huginn-3.5B: d 5280, 8 unique layers, r 32-132).
LIMITS = {"vocab_size": 1 << 24, "d_model": 1 << 16, "n_heads": 4096, "n_kv_heads": 4096, "attn_head_dim": 1 << 16,
          "n_begin": 1024, "n_middle": 1024, "n_end": 1024, "num_loops": 4096, "max_loops": 4096, "mlp_hidden": 1 << 20,
          "max_seq_len": 1 << 21, "n_streams": 64, "sinkhorn_iters": 1000}
ROPE_TABLE_LIMIT = 1 << 26  # max_seq_len * head_dim: each rotary table is about this many fp32 entries at most
STR_FIELDS = ("kv_policy", "kv_dtype", "collapse") + PIECE_FIELDS
# rope_scaling: the rotary frequency scalings (rotary.scaled_inv_freq), each with the keys it needs (transformers'
# names, so a Hugging Face rope_scaling dict is stored as it is)
ROPE_SCALINGS = {"none": (), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                        "original_max_position_embeddings")}


class ConfigError(ValueError):
    """A config field is unknown, missing or has a bad value (message names the field)."""


@dataclass
class HyperloopConfig:
    vocab_size: int = 4096
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int = 2
    attn_head_dim: int = 0  # width of one attention head: 0 = d_model / n_heads (Nanbeige4.2: 128, not 3072/48)
    n_begin: int = 2
    n_middle: int = 2
    n_end: int = 2
    num_loops: int = 4  # r, the trained loop count (the default of the export's num_loops input)
    max_loops: int = 0  # the most loops it may run: 0 = num_loops; more only without per-loop parameters
    kv_policy: str = "per-step"  # the KV cache across loops: "per-step" (a slot per loop) or "shared" (one)
    kv_dtype: str = "float32"  # the KV cache's storage between steps: "float32" or "float16" (half the bytes)
    # hyper-connections: "dynamic" (mHC-style), "static" (lanes), "none" (plain looped)
    hc: str = "dynamic"
    n_streams: int = 4  # n; must be 1 when hc == "none"
    injection: str = "passthrough"  # only for hc == "none": passthrough, additive, inject, adapter
    collapse: str = "mean"  # streams -> one: mean or sum
    middle_norm: bool = False  # o = norm_mid(middle_block(u)) after each loop
    loop_embedding: bool = True  # dynamic only: learned per-loop vector added to u
    sinkhorn_iters: int = 20
    block: str = "prenorm"  # block kind: "prenorm", "sandwich", "prepost", "postnorm" (pieces/block.py)
    mlp: str = "swiglu"  # MLP kind: "swiglu", "relu2", "geglu"
    mlp_hidden: int = 768
    rotary: str = "half"  # rotary flavour: "half" (pairs i, i + hd/2, nanochat), "interleaved" (2i, 2i + 1)
    qk_norm: bool = True  # per-head RMSNorm without weight on q and k, after rotary (nanochat)
    # RMSNorm with weight over the whole projected q and k widths (n_heads * head_dim, n_kv_heads * head_dim),
    # before the per-head split and rotary (OLMo-2; attn.q_norm / attn.k_norm); excludes qk_norm
    qk_norm_full: bool = False
    qk_bias: bool = False  # biases on the q and k projections (added before rotary)
    embed_norm: bool = False  # x = RMSNorm(embed(tokens))
    embed_scale: float = 1.0  # x = embed(tokens) * embed_scale (Huginn: sqrt(d))
    post_loop_norm: bool = False  # x = final_norm(x) after the last loop too (Huginn's ln_f, used twice)
    norm_each_loop: bool = False  # final_norm after EVERY loop, fed to the next and read by the head (Ouro)
    exit_gate: bool = False  # a learned exit gate after every loop (Ouro; needs n_end = 0 and hc "none")
    early_exit_threshold: float = 1.0  # the exit gate's default threshold q (>= 1: never exit early)
    init_std: float = 0.0  # the adapter's random start sigma at init_scale 1: 0 = sqrt(2 / (5 d_model)) (Huginn-0125)
    logit_softcap: float = 0.0  # 0 = off, else softcap * tanh(logits / softcap)
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    # the rotary frequencies' scaling: {"rope_type": "none"}, or {"rope_type": "llama3", "factor",
    # "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} (transformers' llama3 formula)
    rope_scaling: dict[str, Any] = field(default_factory=lambda: {"rope_type": "none"})
    rope_bf16: bool = False  # round cos/sin tables to bf16 (looped-lm-scaling does)
    norm_eps: float = 1e-6
    max_seq_len: int = 512
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance, not architecture

    # ---- derived -----------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.d_model // self.n_heads

    @property
    def effective_layers(self) -> int:
        return self.n_begin + self.num_loops * self.n_middle + self.n_end

    @property
    def has_loop_params(self) -> bool:
        """Per-loop parameters (hyper-connections, loop embeddings): one row per loop up to loop_limit, so the
        limit is fixed when the model is made (train it with randomized depth to use it)."""
        return self.hc != "none" or self.loop_embedding

    @property
    def loop_limit(self) -> int:
        """The most loops the model may run."""
        return self.max_loops or self.num_loops

    @property
    def unique_layers(self) -> int:
        return self.n_begin + self.n_middle + self.n_end

    def kv_layout(self, policy: str | None = None, dtype: str | None = None):
        """The KV-cache slots (edgeloop.kv.Layout: the one statement of the convention) under `policy`
        (default kv_policy) in `dtype` (default kv_dtype), covering loop_limit loops."""
        from edgeloop.kv import Layout

        return Layout.of_config(self, policy or self.kv_policy, dtype or self.kv_dtype)

    def slot(self, loop: int, layer: int) -> int:
        """KV-cache slot of middle layer `layer` in loop `loop` (begin, then loop-major middle, then end)."""
        return self.kv_layout().slot(loop, layer)

    # ---- validation and (de)serialisation -----------------------------------------
    def validate(self) -> "HyperloopConfig":
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"config field '{name}' = {getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "d_model", "n_heads", "n_kv_heads", "num_loops", "n_streams",
                     "mlp_hidden", "max_seq_len", "sinkhorn_iters"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "must be a positive integer")
        for name in ("n_begin", "n_middle", "n_end", "max_loops", "attn_head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(name, "must be a non-negative integer")
        for name, top in LIMITS.items():
            if getattr(self, name) > top:
                raise bad(name, f"must be at most {top} (a bound on the memory the config sizes)")
        for name in STR_FIELDS:
            if not isinstance(getattr(self, name), str):
                raise bad(name, "must be a string")
        if not isinstance(self.extra, dict):
            raise bad("extra", "must be a JSON object")
        if self.n_middle == 0:
            raise bad("n_middle", "the middle block needs at least one layer")
        from edgeloop.model.pieces import names  # the registered pieces (imported here: config stays light)

        for name in PIECE_FIELDS:
            if getattr(self, name) not in names(name):
                raise bad(name, f"must be one of {names(name)}")
        if self.kv_policy not in KV_POLICIES:
            raise bad("kv_policy", f"must be one of {KV_POLICIES}")
        if self.kv_dtype not in ("float32", "float16"):
            raise bad("kv_dtype", "must be float32 or float16")
        if self.max_loops and self.max_loops < self.num_loops:
            raise bad("max_loops", f"must be 0 or at least num_loops={self.num_loops}")
        if self.exit_gate and (self.hc != "none" or self.n_end):
            raise bad("exit_gate", "an exit gate needs hc 'none' and no end block (n_end = 0): the head reads the "
                                   "loop's output directly")
        if self.norm_each_loop and (self.hc != "none" or self.post_loop_norm):
            raise bad("norm_each_loop", "needs hc 'none' and excludes post_loop_norm")
        if self.collapse not in COLLAPSES:
            raise bad("collapse", f"must be one of {COLLAPSES}")
        if not self.attn_head_dim and self.d_model % self.n_heads:
            raise bad("n_heads", f"must divide d_model={self.d_model} (or set attn_head_dim)")
        if self.head_dim % 2:
            raise bad("n_heads", "head_dim must be even for rotary embeddings")
        if self.max_seq_len * self.head_dim > ROPE_TABLE_LIMIT:
            raise bad("max_seq_len", f"times head_dim {self.head_dim} must be at most {ROPE_TABLE_LIMIT} (the rotary "
                                     f"tables' size)")
        if self.n_heads % self.n_kv_heads:
            raise bad("n_kv_heads", f"must divide n_heads={self.n_heads}")
        if self.hc == "none" and self.n_streams != 1:
            raise bad("n_streams", "must be 1 when hc is 'none'")
        if self.hc != "none" and self.injection != "passthrough":
            raise bad("injection", "injection modes apply only to hc='none'")
        for name in ("logit_softcap", "rope_theta", "norm_eps", "embed_scale", "early_exit_threshold", "init_std"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise bad(name, "must be a finite non-negative number")
        for name in ("rope_theta", "norm_eps", "embed_scale"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be positive")
        for name in ("middle_norm", "loop_embedding", "qk_norm", "qk_bias", "embed_norm", "tie_embeddings", "rope_bf16",
                     "post_loop_norm", "norm_each_loop", "exit_gate", "qk_norm_full"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        if self.qk_norm and self.qk_norm_full:
            raise bad("qk_norm_full", "excludes qk_norm (one QK-norm: full-width before rotary, or per head after)")
        self._validate_rope_scaling(bad)
        return self

    def _validate_rope_scaling(self, bad) -> None:
        """rope_scaling: a JSON object with a known rope_type and exactly its keys, each a positive number."""
        rs = self.rope_scaling
        if not isinstance(rs, dict) or not isinstance(rs.get("rope_type"), str) or rs["rope_type"] not in ROPE_SCALINGS:
            raise bad("rope_scaling", f"must be an object with rope_type one of {tuple(ROPE_SCALINGS)}")
        keys = ROPE_SCALINGS[rs["rope_type"]]
        if set(rs) != {"rope_type", *keys}:
            raise bad("rope_scaling", f"rope_type {rs['rope_type']!r} takes exactly the keys {('rope_type', *keys)}")
        for k in keys:
            v = rs[k]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise bad("rope_scaling", f"'{k}' must be a finite positive number")
        if rs["rope_type"] == "llama3":
            if rs["low_freq_factor"] >= rs["high_freq_factor"]:
                raise bad("rope_scaling", "low_freq_factor must be below high_freq_factor")
            if not isinstance(rs["original_max_position_embeddings"], int):
                raise bad("rope_scaling", "'original_max_position_embeddings' must be an integer")

    def to_dict(self) -> dict[str, Any]:
        d = {"model_type": "hyperloop"}
        d.update(dataclasses.asdict(self))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HyperloopConfig":
        """A validated config from a config.json dict: the REQUIRED_FIELDS present, no unknown field."""
        d = dict(d)
        if "model_type" in d and d["model_type"] != "hyperloop":
            raise ConfigError(f"config field 'model_type' = {d['model_type']!r}: expected 'hyperloop'")
        missing = [k for k in REQUIRED_FIELDS if k not in d]
        if missing:
            raise ConfigError(f"config field '{missing[0]}' is missing ({len(missing)} of the required fields "
                              f"{', '.join(REQUIRED_FIELDS)} missing; the others have defaults)")
        d.pop("model_type")
        d.pop("quantization_config", None)  # read by the quantize stage
        d.pop("architectures", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], known, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"not one of the {len(known)} fields of HyperloopConfig"
            raise ConfigError(f"config field '{unknown[0]}' is unknown ({hint})")
        return cls(**d).validate()

    @classmethod
    def from_json(cls, path) -> "HyperloopConfig":
        try:
            with open(path, "rb") as f:
                d = json.loads(f.read().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ConfigError(f"{path}: not a readable JSON file ({type(e).__name__}: {str(e)[:200]})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


PRESETS: dict[str, HyperloopConfig] = {
    # the shipped demo model
    "hyperloop-tiny": HyperloopConfig(),
    # the shipped Huginn-family model (models/huginn-tiny, stored as a huginn_raven folder): Huginn-0125's
    # architecture (sandwich blocks, adapter injection [s; e], zero start state, interleaved rotary, qk bias,
    # embeddings scaled by sqrt(d), ln_f twice, MHA, tied head) at mean recurrence 16
    "huginn-tiny": HyperloopConfig(vocab_size=4096, d_model=256, n_heads=4, n_kv_heads=4, n_begin=1, n_middle=2,
                                   n_end=1, num_loops=16, max_loops=32, kv_policy="shared", hc="none", n_streams=1,
                                   injection="adapter", block="sandwich", rotary="interleaved", qk_bias=True,
                                   qk_norm=False, loop_embedding=False, embed_scale=16.0, post_loop_norm=True,
                                   rope_theta=50000.0, mlp_hidden=768, max_seq_len=256),
    # test-sized variants (one per hyper-connection variant)
    "test-dynamic": HyperloopConfig(vocab_size=320, d_model=64, n_heads=4, n_kv_heads=2, n_begin=1,
                                    n_middle=2, n_end=1, num_loops=3, mlp_hidden=128, max_seq_len=128),
    "test-static": HyperloopConfig(vocab_size=320, d_model=64, n_heads=4, n_kv_heads=2, n_begin=1,
                                   n_middle=2, n_end=1, num_loops=3, hc="static", collapse="sum",
                                   middle_norm=True, loop_embedding=False, mlp="relu2", mlp_hidden=256,
                                   logit_softcap=15.0, tie_embeddings=False, embed_norm=True,
                                   rope_bf16=True, max_seq_len=128),
    "test-none": HyperloopConfig(vocab_size=320, d_model=64, n_heads=4, n_kv_heads=4, n_begin=1,
                                 n_middle=2, n_end=1, num_loops=3, hc="none", n_streams=1,
                                 injection="inject", middle_norm=True, loop_embedding=False,
                                 mlp_hidden=128, max_seq_len=128),
    "test-geglu": HyperloopConfig(vocab_size=320, d_model=64, n_heads=4, n_kv_heads=2, n_begin=1, n_middle=2,
                                  n_end=1, num_loops=2, hc="none", n_streams=1, injection="additive",
                                  loop_embedding=False, mlp="geglu", mlp_hidden=128, max_seq_len=128),
    "test-huginn": HyperloopConfig(vocab_size=320, d_model=64, n_heads=4, n_kv_heads=4, n_begin=1, n_middle=2,
                                   n_end=1, num_loops=4, max_loops=8, kv_policy="shared", hc="none", n_streams=1,
                                   injection="adapter", block="sandwich", rotary="interleaved", qk_bias=True,
                                   qk_norm=False, loop_embedding=False, embed_scale=8.0, post_loop_norm=True,
                                   rope_theta=50000.0, mlp_hidden=128, max_seq_len=128),
    "test-ouro": HyperloopConfig(vocab_size=320, d_model=64, n_heads=4, n_kv_heads=2, n_begin=0, n_middle=2, n_end=0,
                                 num_loops=4, hc="none", n_streams=1, injection="passthrough", block="prepost",
                                 rotary="neox", qk_norm=False, loop_embedding=False, norm_each_loop=True,
                                 exit_gate=True, tie_embeddings=False, mlp_hidden=128, max_seq_len=128),
    "test-standard": HyperloopConfig(vocab_size=320, d_model=64, n_heads=4, n_kv_heads=1, n_begin=1,
                                     n_middle=2, n_end=1, num_loops=1, hc="none", n_streams=1,
                                     loop_embedding=False, qk_norm=False, mlp_hidden=128, max_seq_len=128),
}
