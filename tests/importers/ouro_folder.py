"""Tiny random `ouro` folders as the Hub ships them (config.json, safetensors, remote-code .py files that must
never run), and Ouro's published forward written out plainly (the independent reference of the tests)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

CFG = dict(model_type="ouro", architectures=["OuroForCausalLM"], hidden_size=48, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=12, intermediate_size=96, vocab_size=300,
           rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu", max_position_embeddings=64,
           tie_word_embeddings=False, total_ut_steps=4, early_exit_threshold=1.0, use_sliding_window=False,
           sliding_window=None, layer_types=["full_attention", "full_attention"], bos_token_id=0, eos_token_id=0,
           torch_dtype="bfloat16", auto_map={"AutoConfig": "configuration_ouro.OuroConfig",
                                             "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"})
REMOTE_CODE = "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('remote code ran')\n"
NORMS = ("input_layernorm", "input_layernorm_2", "post_attention_layernorm", "post_attention_layernorm_2")


def ouro_weights(seed: int = 0, cfg: dict = CFG, gate_std: float = 3.0) -> dict[str, torch.Tensor]:
    """Random weights; the exit gate's spread (gate_std) makes different tokens exit at different steps."""
    g = torch.Generator().manual_seed(seed)
    d, H, KV, I, V = (cfg[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                       "intermediate_size", "vocab_size"))
    hd = d // H

    def rnd(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    w = {"model.embed_tokens.weight": rnd(V, d, std=0.5), "model.norm.weight": rnd(d, std=0.2, mean=1.0),
         "lm_head.weight": rnd(V, d, std=0.3), "model.early_exit_gate.weight": rnd(1, d, std=gate_std / math.sqrt(d)),
         "model.early_exit_gate.bias": rnd(1, std=0.5)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w |= {p + f"{n}.weight": rnd(d, std=0.2, mean=1.0) for n in NORMS}
        w |= {p + "self_attn.q_proj.weight": rnd(H * hd, d, std=d ** -0.5),
              p + "self_attn.k_proj.weight": rnd(KV * hd, d, std=d ** -0.5),
              p + "self_attn.v_proj.weight": rnd(KV * hd, d, std=d ** -0.5),
              p + "self_attn.o_proj.weight": rnd(d, H * hd, std=(H * hd) ** -0.5),
              p + "mlp.gate_proj.weight": rnd(I, d, std=d ** -0.5), p + "mlp.up_proj.weight": rnd(I, d, std=d ** -0.5),
              p + "mlp.down_proj.weight": rnd(d, I, std=I ** -0.5)}
    return w


def write_ouro(folder: Path, w: dict | None = None, *, dtype=torch.bfloat16, config: dict | None = None,
               tokenizer=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    w = w if w is not None else ouro_weights()
    save_file({k: v.to(dtype).contiguous() for k, v in w.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config or CFG))
    for f in ("modeling_ouro.py", "configuration_ouro.py"):
        (folder / f).write_text(REMOTE_CODE)
    if tokenizer is not None:
        tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def reference(w: dict, ids: torch.Tensor, cfg: dict = CFG, dtype=torch.bfloat16, exit_at_step: int | None = None,
              exit_threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ouro's forward from the published equations (modeling_ouro.py), fp32 math on the stored weights: every
    step computed; the logits of the last step, of `exit_at_step`, or per token of the first step whose
    cumulative exit probability reaches `exit_threshold`. Returns (logits, the step each token's came from)."""
    W = {k: v.to(dtype).float() for k, v in w.items()}
    d, H, KV = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, T, eps, B, S = d // H, cfg["total_ut_steps"], cfg["rms_norm_eps"], *ids.shape
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    emb = torch.cat([torch.outer(torch.arange(S, dtype=torch.float32), inv)] * 2, -1)
    cos, sin = emb.cos(), emb.sin()

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rotate_half(x):
        return torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], -1)

    def layer(h, p):
        x = rms(h, W[p + "input_layernorm.weight"])
        q = (x @ W[p + "self_attn.q_proj.weight"].T).view(B, S, H, hd).transpose(1, 2)
        k = (x @ W[p + "self_attn.k_proj.weight"].T).view(B, S, KV, hd).transpose(1, 2)
        v = (x @ W[p + "self_attn.v_proj.weight"].T).view(B, S, KV, hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        a = (q @ k.transpose(-1, -2)) * hd ** -0.5
        a = a.masked_fill(~torch.tril(torch.ones(S, S, dtype=torch.bool)), float("-inf")).softmax(-1)
        y = (a @ v).transpose(1, 2).reshape(B, S, H * hd) @ W[p + "self_attn.o_proj.weight"].T
        h = h + rms(y, W[p + "input_layernorm_2.weight"])
        x = rms(h, W[p + "post_attention_layernorm.weight"])
        m = (torch.nn.functional.silu(x @ W[p + "mlp.gate_proj.weight"].T) * (x @ W[p + "mlp.up_proj.weight"].T))
        return h + rms(m @ W[p + "mlp.down_proj.weight"].T, W[p + "post_attention_layernorm_2.weight"])

    h = W["model.embed_tokens.weight"][ids]
    hs, gates = [], []
    for _ in range(T):
        for i in range(cfg["num_hidden_layers"]):
            h = layer(h, f"model.layers.{i}.")
        h = rms(h, W["model.norm.weight"])
        hs.append(h)
        gates.append(h @ W["model.early_exit_gate.weight"].T + W["model.early_exit_gate.bias"])
    remaining, pdf = torch.ones(B, S), []
    for t, g in enumerate(gates):
        lam = torch.sigmoid(g.squeeze(-1))
        if t < T - 1:
            pdf.append(lam * remaining)
            remaining = remaining * (1 - lam)
        else:
            pdf.append(remaining)
    if exit_at_step is not None and 0 <= exit_at_step < T:
        steps = torch.full((B, S), exit_at_step)
    elif exit_threshold is not None:
        mask = torch.cumsum(torch.stack(pdf, 2), 2) >= exit_threshold
        steps = torch.argmax(mask.float(), 2)
        steps[~mask.any(2)] = T - 1
    else:
        steps = torch.full((B, S), T - 1)
    chosen = torch.gather(torch.stack(hs, 2), 2, steps[..., None, None].expand(B, S, 1, d)).squeeze(2)
    return chosen @ W["lm_head.weight"].T, steps
