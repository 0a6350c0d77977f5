"""Tiny random `nanbeige` folders as the Hub ships them (config.json, bf16 safetensors sharded with the index,
remote-code .py files that must never run), and Nanbeige4.2's published forward written out plainly (the
independent reference of the tests): the whole stack looped, model.norm at each loop boundary, one KV slot per
(loop, layer), GQA with head_dim != hidden / heads, rotate_half rotary."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

CFG = dict(model_type="nanbeige", architectures=["NanbeigeForCausalLM"], hidden_size=48, num_hidden_layers=3,
           num_loops=2, loop_loss_weights=[], skip_loop_final_norm=False, num_attention_heads=6,
           num_key_value_heads=2, head_dim=16, intermediate_size=96, vocab_size=300, rope_theta=70000000.0,
           rope_scaling=None, rms_norm_eps=1e-5, hidden_act="silu", attention_bias=False, attention_dropout=0.0,
           max_position_embeddings=64, tie_word_embeddings=False, pretraining_tp=1, bos_token_id=1, eos_token_id=2,
           pad_token_id=0, torch_dtype="bfloat16", qk_layernorm=False, enable_hyper_connection=False,
           enable_mhc=False, enable_double_loop_split=False, loop_share_kv=False, enable_depth_attention=False,
           emb_neighbor_num=None, auto_map={"AutoConfig": "configuration_nanbeige.NanbeigeConfig",
                                            "AutoModelForCausalLM": "modeling_nanbeige.NanbeigeForCausalLM"})
REMOTE_CODE = "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('remote code ran')\n"


def nanbeige_weights(seed: int = 0, cfg: dict = CFG) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, H, KV, hd, I, V = (cfg[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                           "intermediate_size", "vocab_size"))

    def rnd(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    w = {"model.embed_tokens.weight": rnd(V, d, std=0.5), "model.norm.weight": rnd(d, std=0.2, mean=1.0),
         "lm_head.weight": rnd(V, d, std=0.3)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": rnd(d, std=0.2, mean=1.0),
              p + "post_attention_layernorm.weight": rnd(d, std=0.2, mean=1.0),
              p + "self_attn.q_proj.weight": rnd(H * hd, d, std=d ** -0.5),
              p + "self_attn.k_proj.weight": rnd(KV * hd, d, std=d ** -0.5),
              p + "self_attn.v_proj.weight": rnd(KV * hd, d, std=d ** -0.5),
              p + "self_attn.o_proj.weight": rnd(d, H * hd, std=(H * hd) ** -0.5),
              p + "mlp.gate_proj.weight": rnd(I, d, std=d ** -0.5), p + "mlp.up_proj.weight": rnd(I, d, std=d ** -0.5),
              p + "mlp.down_proj.weight": rnd(d, I, std=I ** -0.5)}
    return w


def write_nanbeige(folder: Path, w: dict | None = None, *, config: dict | None = None, shards: int = 2,
                   tokenizer=None) -> Path:
    """bf16 weights in `shards` files named as the Hub names them, with model.safetensors.index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    w = w if w is not None else nanbeige_weights()
    names = sorted(w)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: w[n].to(torch.bfloat16).contiguous() for n in names[s::shards]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map |= {n: file for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config or CFG))
    for f in ("modeling_nanbeige.py", "configuration_nanbeige.py"):
        (folder / f).write_text(REMOTE_CODE)
    if tokenizer is not None:
        tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def reference(w: dict, ids: torch.Tensor, cfg: dict = CFG, loops: int | None = None, dtype=torch.bfloat16,
              cache: list | None = None, start: int = 0) -> torch.Tensor:
    """Nanbeige4.2's forward from the published equations (modeling_nanbeige.py), fp32 math on the stored weights,
    at `loops` loops (default the config's). `cache`: a list of 2 * loops * layers (k, v) entries, [] to start,
    extended in place (slot loop * layers + layer); `start`: the position of ids[:, 0]."""
    W = {k: v.to(dtype).float() for k, v in w.items()}
    H, KV, hd, L = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["num_hidden_layers"]
    eps, (B, S) = cfg["rms_norm_eps"], ids.shape
    loops = loops or cfg["num_loops"]
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    emb = torch.cat([torch.outer(torch.arange(start, start + S, dtype=torch.float32), inv)] * 2, -1)
    cos, sin = emb.cos(), emb.sin()
    if cache is not None and not cache:
        cache.extend([None] * (loops * L))

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rotate_half(x):
        return torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], -1)

    def layer(h, p, slot):
        x = rms(h, W[p + "input_layernorm.weight"])
        q = (x @ W[p + "self_attn.q_proj.weight"].T).view(B, S, H, hd).transpose(1, 2)
        k = (x @ W[p + "self_attn.k_proj.weight"].T).view(B, S, KV, hd).transpose(1, 2)
        v = (x @ W[p + "self_attn.v_proj.weight"].T).view(B, S, KV, hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            if cache[slot] is not None:
                k, v = torch.cat([cache[slot][0], k], 2), torch.cat([cache[slot][1], v], 2)
            cache[slot] = (k, v)
        P = k.shape[2] - S
        k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        a = (q @ k.transpose(-1, -2)) * hd ** -0.5
        allowed = torch.arange(P + S)[None, :] <= (P + torch.arange(S))[:, None]
        a = a.masked_fill(~allowed, float("-inf")).softmax(-1)
        h = h + (a @ v).transpose(1, 2).reshape(B, S, H * hd) @ W[p + "self_attn.o_proj.weight"].T
        x = rms(h, W[p + "post_attention_layernorm.weight"])
        m = torch.nn.functional.silu(x @ W[p + "mlp.gate_proj.weight"].T) * (x @ W[p + "mlp.up_proj.weight"].T)
        return h + m @ W[p + "mlp.down_proj.weight"].T

    h = W["model.embed_tokens.weight"][ids]
    for loop in range(loops):
        for i in range(L):
            h = layer(h, f"model.layers.{i}.", loop * L + i)
        if not cfg["skip_loop_final_norm"]:
            h = rms(h, W["model.norm.weight"])
    if cfg["skip_loop_final_norm"]:
        h = rms(h, W["model.norm.weight"])
    return h @ W["lm_head.weight"].T
