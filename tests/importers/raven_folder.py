"""Tiny random retrofitted-recurrence ("Raven") huginn_raven folders as the conversion scripts write them
(LoopedLMs/retrofitting-recurrence convert_llama.py / convert_olmo.py: Huginn's config with the base model's
fields written over it), and the published forward written out plainly from the equations (the independent
reference of the tests: plain torch, none of edgeloop's pieces).

    LLAMA32:   pre-norm, GQA 4 / 2, llama3 rope_scaling, rope_theta beside the conversion's rope_base
    TINYLLAMA: pre-norm, MQA 4 / 1, no rope_scaling
    OLMO2:     post-norm + full-width QK-norm, MHA, head_dim 24 on a 64-wide stream (proj reads H * hd)
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HUGINN_STD = math.sqrt(2 / (5 * 5280))  # the conversions keep Huginn-0125's init_values.std (its n_embd 5280)
BASE = dict(n_embd=64, n_heads=4, num_attention_heads=4, intermediate_size=96, n_layers=4, n_layers_in_prelude=1,
            n_layers_in_recurrent_block=2, n_layers_in_coda=1, mean_recurrence=4, vocab_size=300,
            padded_vocab_size=300, block_size=4096, bias=False, qk_bias=False, tie_embeddings=False,
            tie_word_embeddings=False, injection_type="linear", state_init="like-init",
            block_class_name="SandwichBlock",
            mlp_class_name="GatedMLP", nonlin_name="SiLU", norm_class_name="RMSNorm_llama",
            architecture_class_name="RecurrentGPT", model_type="huginn_raven", architectures=["RavenForCausalLM"],
            init_values={"std": HUGINN_STD, "out_proj": 0.001, "embedding": HUGINN_STD, "embed_scale": 1.0},
            test_time_noise=0, auto_map={"AutoConfig": "raven_config_minimal.RavenConfig",
                                         "AutoModelForCausalLM": "raven_modeling_minimal.RavenForCausalLM"},
            torch_dtype="bfloat16")
# llama3 scaling sized so that a 12-token test sees all three bands: with theta 10000 and hd 16 the wavelengths are
# 6.3 (kept: < 32/4), 20 (smoothed: between 8 and 32) and 63, 199, ... (divided by the factor: > 32/1). Head widths
# are multiples of 8, as onnxruntime's GroupQueryAttention (the fused graph) needs
LLAMA32 = dict(BASE, head_dim=16, num_key_value_heads=2, norm_eps=1e-5, rope_base=500000.0, rope_theta=10000.0,
               max_position_embeddings=64, rope_scaling={"factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 32,
                                                         "rope_type": "llama3"})
TINYLLAMA = dict(BASE, head_dim=16, num_key_value_heads=1, norm_eps=1e-5, rope_base=500000.0, rope_theta=10000.0,
                 max_position_embeddings=64, torch_dtype="float32")
OLMO2 = dict(BASE, head_dim=24, num_key_value_heads=4, norm_eps=1e-6, rope_base=500000.0, rope_theta=500000.0,
             max_position_embeddings=64)
REMOTE_CODE = "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('remote code ran')\n"
SECTIONS = (("prelude", "n_layers_in_prelude"), ("core_block", "n_layers_in_recurrent_block"),
            ("coda", "n_layers_in_coda"))


def raven_weights(cfg: dict, seed: int = 0, olmo: bool = False) -> dict[str, torch.Tensor]:
    """Random tensors under the huginn_raven names, every one far from its init (norm weights around 1 +- 0.2)."""
    g = torch.Generator().manual_seed(seed)
    d, H, KV = cfg["n_embd"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg["head_dim"] if olmo else d // H
    I, V = cfg["intermediate_size"], cfg["padded_vocab_size"]

    def rnd(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    w = {"transformer.wte.weight": rnd(V, d, std=1.0), "transformer.adapter.weight": rnd(d, 2 * d, std=(2 * d) ** -0.5),
         "transformer.ln_f.weight": rnd(d, std=0.2, mean=1.0), "lm_head.weight": rnd(V, d, std=0.3)}
    for sec, key in SECTIONS:
        for i in range(cfg[key]):
            p = f"transformer.{sec}.{i}."
            w |= {p + f"norm_{k}.weight": rnd(d, std=0.2, mean=1.0) for k in (1, 2)}
            w |= {p + "attn.Wqkv.weight": rnd((H + 2 * KV) * hd, d, std=d ** -0.5),
                  p + "attn.proj.weight": rnd(d, H * hd, std=(H * hd) ** -0.5),
                  p + "mlp.fc.weight": rnd(2 * I, d, std=d ** -0.5), p + "mlp.proj.weight": rnd(d, I, std=I ** -0.5)}
            if olmo:
                w |= {p + "attn.q_norm.weight": rnd(H * hd, std=0.2, mean=1.0),
                      p + "attn.k_norm.weight": rnd(KV * hd, std=0.2, mean=1.0)}
    return w


def write_raven(folder: Path, cfg: dict, w: dict, *, shards: int = 1, dtype=torch.bfloat16) -> Path:
    """A huginn_raven folder: config.json, `shards` safetensors files (+ model.safetensors.index.json when > 1),
    generation_config.json and the remote-code files that must never run."""
    folder.mkdir(parents=True, exist_ok=True)
    w = {k: v.to(dtype).contiguous() for k, v in w.items()}
    names = sorted(w)
    if shards == 1:
        save_file(w, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: w[k] for k in names[s::shards]}, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in names[s::shards]})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2],
                                                               "pad_token_id": 0}))
    for f in ("raven_modeling_minimal.py", "raven_config_minimal.py"):
        (folder / f).write_text(REMOTE_CODE)
    return folder


def inv_freq(cfg: dict, hd: int) -> torch.Tensor:
    """The rotary inverse frequencies, written out per frequency in float64 from the llama3 rule: divided by the
    factor past the low-frequency wavelength, kept under the high-frequency one, blended linearly between."""
    theta = cfg["rope_theta"]
    out = []
    for i in range(0, hd, 2):
        f = theta ** (-i / hd)
        rs = cfg.get("rope_scaling")
        if rs:
            L, lo, hi, k = (rs["original_max_position_embeddings"], rs["low_freq_factor"], rs["high_freq_factor"],
                            rs["factor"])
            wavelength = 2 * math.pi / f
            if wavelength > L / lo:
                f = f / k
            elif wavelength >= L / hi:
                t = (L / wavelength - lo) / (hi - lo)
                f = (1 - t) * f / k + t * f
        out.append(f)
    return torch.tensor(out, dtype=torch.float64)


def reference_decode(w: dict, cfg: dict, ids: torch.Tensor, num_steps: int, chunks: list[int],
                     policy: str = "per-step", dtype=torch.float32) -> torch.Tensor:
    """The retrofit's forward from the published equations, fed in `chunks` through a KV cache (fp32 math on the
    stored weights, the zero start state). Llama layout: x + attn(norm_1 x), x + mlp(norm_2 x); OLMo layout:
    q_norm / k_norm over the whole q / k width first, x + norm_1(attn x), x + norm_2(mlp x). rotate_half rotary,
    GQA (query head h reads KV head h // (H / KV)), adapter([s; e]), coda on the raw latent, ln_f once, untied
    lm_head. Core caches: per-step, one per (step, layer); shared, one per layer written by every step."""
    W = {k: v.to(dtype).float() for k, v in w.items()}
    olmo = any(k.endswith("q_norm.weight") for k in W)
    d, H, KV = cfg["n_embd"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg["head_dim"] if olmo else d // H
    eps = cfg["norm_eps"]
    freqs = inv_freq(cfg, hd)

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rope(x, pos):  # [B, n, T, hd]: x cos + rotate_half(x) sin, angles cat(f, f)
        ang = (pos[:, None].double() * freqs[None, :]).float()
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        half = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1)
        return x * cos + half * sin

    def attn(h, p, past, pos):
        B, T, _ = h.shape
        q, k, v = (h @ W[p + "attn.Wqkv.weight"].T).split([H * hd, KV * hd, KV * hd], dim=-1)
        if olmo:
            q, k = rms(q, W[p + "attn.q_norm.weight"]), rms(k, W[p + "attn.k_norm.weight"])
        q = rope(q.view(B, T, H, hd).transpose(1, 2), pos)
        k = rope(k.view(B, T, KV, hd).transpose(1, 2), pos)
        v = v.view(B, T, KV, hd).transpose(1, 2)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        kk, vv = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        P = k.shape[2] - T
        s = (q @ kk.transpose(-1, -2)) / math.sqrt(hd)
        allowed = torch.arange(P + T)[None, :] <= (P + torch.arange(T))[:, None]
        y = (s.masked_fill(~allowed, float("-inf")).softmax(-1) @ vv).transpose(1, 2).reshape(B, T, H * hd)
        return y @ W[p + "attn.proj.weight"].T, (k, v)

    def mlp(h, p):
        gate, up = (h @ W[p + "mlp.fc.weight"].T).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ W[p + "mlp.proj.weight"].T

    def block(x, p, past, pos):
        if olmo:
            a, kv = attn(x, p, past, pos)
            x = x + rms(a, W[p + "norm_1.weight"])
            return x + rms(mlp(x, p), W[p + "norm_2.weight"]), kv
        a, kv = attn(rms(x, W[p + "norm_1.weight"]), p, past, pos)
        x = x + a
        return x + mlp(rms(x, W[p + "norm_2.weight"]), p), kv

    scale = cfg["init_values"]["embed_scale"]
    cache: dict = {}
    out, start = [], 0
    for n in chunks:
        pos = torch.arange(start, start + n)
        e = W["transformer.wte.weight"][ids[:, start:start + n]] * scale
        for i in range(cfg["n_layers_in_prelude"]):
            e, cache["pre", i] = block(e, f"transformer.prelude.{i}.", cache.get(("pre", i)), pos)
        x = torch.zeros_like(e)
        shared_past = {j: cache.get(("core", j)) for j in range(cfg["n_layers_in_recurrent_block"])}
        for step in range(num_steps):
            x = torch.cat([x, e], -1) @ W["transformer.adapter.weight"].T
            for j in range(cfg["n_layers_in_recurrent_block"]):
                key = ("core", j) if policy == "shared" else ("core", step, j)
                past = shared_past[j] if policy == "shared" else cache.get(key)
                x, cache[key] = block(x, f"transformer.core_block.{j}.", past, pos)
        for i in range(cfg["n_layers_in_coda"]):
            x, cache["coda", i] = block(x, f"transformer.coda.{i}.", cache.get(("coda", i)), pos)
        out.append(rms(x, W["transformer.ln_f.weight"]) @ W["lm_head.weight"].T)
        start += n
    return torch.cat(out, 1)


def reference_logits(w: dict, cfg: dict, ids: torch.Tensor, num_steps: int, dtype=torch.float32) -> torch.Tensor:
    """The plain full forward (one chunk)."""
    return reference_decode(w, cfg, ids, num_steps, [ids.shape[1]], "per-step", dtype)
