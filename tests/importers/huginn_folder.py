"""Tiny random huginn_raven folders as the Hub ships them (config.json, safetensors shards + index, tokenizer
files, generation_config.json, and the remote-code .py files edgeloop must never run), and the published
forward written out plainly from the equations (the independent reference of the tests)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

CFG = dict(n_embd=48, num_attention_heads=4, n_heads=4, num_key_value_heads=4, intermediate_size=96,
           n_layers_in_prelude=1, n_layers_in_recurrent_block=2, n_layers_in_coda=1, mean_recurrence=4,
           vocab_size=300, padded_vocab_size=300, block_size=64, norm_eps=1e-6, qk_bias=True, bias=False,
           tie_embeddings=True, rope_base=50000, injection_type="linear", state_init="like-init",
           block_class_name="SandwichBlock", mlp_class_name="GatedMLP", nonlin_name="SiLU",
           norm_class_name="RMSNorm_llama", architecture_class_name="RecurrentGPT", model_type="huginn_raven",
           architectures=["RavenForCausalLM"], bos_token_id=65504 % 300, eos_token_id=65505 % 300,
           auto_map={"AutoConfig": "raven_config_minimal.RavenConfig",
                     "AutoModelForCausalLM": "raven_modeling_minimal.RavenForCausalLM"}, torch_dtype="float32")
REMOTE_CODE = "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('remote code ran')\n"


def huginn_weights(seed: int = 0, cfg: dict = CFG) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, H, I, V = cfg["n_embd"], cfg["num_attention_heads"], cfg["intermediate_size"], cfg["padded_vocab_size"]
    hd = d // H

    def rnd(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    w = {"transformer.wte.weight": rnd(V, d, std=0.5), "transformer.adapter.weight": rnd(d, 2 * d, std=(2 * d) ** -0.5),
         "transformer.ln_f.weight": rnd(d, std=0.2, mean=1.0)}
    for sec, key in (("prelude", "n_layers_in_prelude"), ("core_block", "n_layers_in_recurrent_block"),
                     ("coda", "n_layers_in_coda")):
        for i in range(cfg[key]):
            p = f"transformer.{sec}.{i}."
            w |= {p + f"norm_{k}.weight": rnd(d, std=0.2, mean=1.0) for k in (1, 2, 3, 4)}
            w |= {p + "attn.Wqkv.weight": rnd(3 * d, d, std=d ** -0.5), p + "attn.qk_bias": rnd(2, 1, H, hd, std=0.3),
                  p + "attn.proj.weight": rnd(d, d, std=d ** -0.5), p + "mlp.fc.weight": rnd(2 * I, d, std=d ** -0.5),
                  p + "mlp.proj.weight": rnd(d, I, std=I ** -0.5)}
    return w


def freqs_cis(cfg: dict = CFG) -> torch.Tensor:
    hd = cfg["n_embd"] // cfg["num_attention_heads"]
    inv = 1.0 / (cfg["rope_base"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    f = torch.outer(torch.arange(cfg["block_size"], dtype=torch.float32), inv)
    return torch.stack([f.cos()[None, :, None], f.sin()[None, :, None]], dim=4)


def write_huginn(folder: Path, w: dict | None = None, *, shards: int = 1, dtype=torch.float32, lm_head: bool = True,
                 with_freqs: bool = True, config: dict | None = None, tokenizer=None) -> Path:
    """A huginn_raven folder: lm_head.weight stored as a copy of wte (as the real checkpoint does), freqs_cis
    as the persistent buffer, `shards` safetensors files with model.safetensors.index.json when > 1."""
    folder.mkdir(parents=True, exist_ok=True)
    w = dict(w if w is not None else huginn_weights())
    if lm_head:
        w["lm_head.weight"] = w["transformer.wte.weight"].clone()
    if with_freqs:
        w["freqs_cis"] = freqs_cis(config or CFG)
    w = {k: (v if k == "freqs_cis" else v.to(dtype)).contiguous() for k, v in w.items()}
    names = sorted(w)
    if shards == 1:
        save_file(w, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for s in range(shards):
            part = names[s::shards]
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: w[k] for k in part}, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config or CFG))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 4, "eos_token_id": [5, 8],
                                                               "pad_token_id": 9}))
    for f in ("raven_modeling_minimal.py", "raven_config_minimal.py"):
        (folder / f).write_text(REMOTE_CODE)
    if tokenizer is not None:
        tokenizer.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "bos_token": "<|begin_text|>", "eos_token": "<|end_text|>", "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": "{{ bos_token }}{% for m in messages %}<|begin_header|>{{ m['role'] }}<|end_header|>\n\n"
                             "{% generation %}{{ m['content'] | trim }}{% endgeneration %}<|end_turn|>{% endfor %}"
                             "{% if add_generation_prompt %}<|begin_header|>Huginn<|end_header|>\n\n{% endif %}"}))
    return folder


def reference_decode(w: dict, ids: torch.Tensor, num_steps: int, chunks: list[int], policy: str = "per-step",
                     cfg: dict = CFG, dtype=torch.float32) -> torch.Tensor:
    """Huginn-0125's forward from the published equations, fed in `chunks` of tokens through a KV cache (fp32
    math on the stored weights, the zero state). Rotary on interleaved pairs, qk_bias before rotary, sandwich
    blocks, adapter([s; e]), ln_f twice. The cache of core layer j: per-step, one per (step, j) (the reference's
    "full"); shared, one per j written by every step, so earlier tokens are read at their last step (its
    "compress-s4"). One chunk of all the tokens is the plain full forward."""
    W = {k: v.to(dtype).float() for k, v in w.items()}
    d, H = cfg["n_embd"], cfg["num_attention_heads"]
    hd, eps = d // H, cfg["norm_eps"]
    fc = freqs_cis(cfg)[0, :, 0]  # [T, hd/2, 2]

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rope(x, pos):  # [B, T, H, hd] at positions pos
        c, s_ = fc[pos, :, 0][None, :, None], fc[pos, :, 1][None, :, None]
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * c - b * s_, b * c + a * s_], -1).flatten(-2)

    def block(x, p, past, pos):
        """x [B, T, d] at positions pos, attending over past (k, v) [B, H, P, hd] and itself (causally)."""
        B, T, _ = x.shape
        h = rms(x, W[p + "norm_1.weight"])
        q, k, v = (h @ W[p + "attn.Wqkv.weight"].T).split(d, dim=-1)
        q = rope(q.view(B, T, H, hd) + W[p + "attn.qk_bias"][0], pos).transpose(1, 2)
        k = rope(k.view(B, T, H, hd) + W[p + "attn.qk_bias"][1], pos).transpose(1, 2)
        v = v.view(B, T, H, hd).transpose(1, 2)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        P = k.shape[2] - T
        s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        allowed = torch.arange(P + T)[None, :] <= (P + torch.arange(T))[:, None]
        y = (s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).transpose(1, 2).reshape(B, T, d)
        x = rms(x + y @ W[p + "attn.proj.weight"].T, W[p + "norm_2.weight"])
        gate, up = (rms(x, W[p + "norm_3.weight"]) @ W[p + "mlp.fc.weight"].T).chunk(2, dim=-1)
        x = rms(x + (torch.nn.functional.silu(gate) * up) @ W[p + "mlp.proj.weight"].T, W[p + "norm_4.weight"])
        return x, (k, v)

    cache: dict = {}
    head = W["lm_head.weight"] if not cfg.get("tie_embeddings", True) else W["transformer.wte.weight"]
    out, start = [], 0
    for n in chunks:
        pos = torch.arange(start, start + n)
        e = W["transformer.wte.weight"][ids[:, start:start + n]] * math.sqrt(d)
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
        x = rms(x, W["transformer.ln_f.weight"])
        for i in range(cfg["n_layers_in_coda"]):
            x, cache["coda", i] = block(x, f"transformer.coda.{i}.", cache.get(("coda", i)), pos)
        out.append(rms(x, W["transformer.ln_f.weight"]) @ head.T)
        start += n
    return torch.cat(out, 1)


def reference_logits(w: dict, ids: torch.Tensor, num_steps: int, cfg: dict = CFG, dtype=torch.float32):
    """The plain full forward (one chunk)."""
    return reference_decode(w, ids, num_steps, [ids.shape[1]], "per-step", cfg, dtype)
