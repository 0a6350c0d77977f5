"""An edgeloop checkpoint with Huginn-0125's architecture, or a retrofitted-recurrence one (blocks "prenorm" /
"postnorm": importers/raven.py), written as a Hugging Face `huginn_raven` folder: the layout `edgeloop import`
(importers/huginn.py) reads and seal-rg/recurrent-pretraining's raven_modeling_minimal.py (the retrofits:
LoopedLMs/retrofitting-recurrence's raven_modeling_minimal_{llama,olmo}.py) loads. The inverse of huginn.key_map:
Wqkv = [c_q; c_k; c_v], qk_bias = stack(q bias, k bias) [2, 1, H, hd], fc = [c_gate; c_fc], inject = the adapter.
The state starts at zeros, as it trained: `state_init: "zero"`, and `init_values.std: 0`, since the reference's
initialize_state draws TruncNormal(std * init_scale) whatever state_init says (its generate() defaults to
init_scale 1), and std 0 makes that zeros at any init_scale.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from edgeloop.importers.huginn import EXPECTED, MODEL_TYPE, key_map
from edgeloop.io import atomic_dir, write_json
from edgeloop.model.checkpoint import generation_tokens, load_config, load_state
from edgeloop.model.config import HyperloopConfig

# the fields of HyperloopConfig that must hold Huginn-0125's value for the folder to mean the same model
HUGINN_ARCH = {"hc": "none", "n_streams": 1, "injection": "adapter", "block": "sandwich", "mlp": "swiglu",
               "rotary": "interleaved", "qk_norm": False, "loop_embedding": False, "post_loop_norm": True,
               "norm_each_loop": False, "exit_gate": False, "middle_norm": False, "embed_norm": False,
               "logit_softcap": 0.0, "rope_bf16": False}
# the same for a retrofit (the Llama layout "prenorm", the OLMo-2 layout "postnorm" with its full-width QK-norm)
RETROFIT_ARCH = {"hc": "none", "n_streams": 1, "injection": "adapter", "mlp": "swiglu", "rotary": "neox",
                 "qk_norm": False, "qk_bias": False, "loop_embedding": False, "post_loop_norm": False,
                 "norm_each_loop": False, "exit_gate": False, "middle_norm": False, "embed_norm": False,
                 "logit_softcap": 0.0, "rope_bf16": False}


class HuginnWriteError(ValueError):
    """The checkpoint does not have Huginn-0125's architecture (names the field)."""


def check_huginn(cfg: HyperloopConfig) -> None:
    if cfg.block in ("prenorm", "postnorm"):
        return check_retrofit(cfg)
    for name, want in HUGINN_ARCH.items():
        if getattr(cfg, name) != want:
            raise HuginnWriteError(f"config field '{name}' = {getattr(cfg, name)!r}: Huginn's layout needs {want!r}")
    if cfg.n_kv_heads != cfg.n_heads:
        raise HuginnWriteError(f"config field 'n_kv_heads' = {cfg.n_kv_heads}: Huginn-0125 is multi-head "
                               f"({cfg.n_heads} KV heads)")
    if abs(cfg.embed_scale - math.sqrt(cfg.d_model)) > 1e-6 * math.sqrt(cfg.d_model):
        raise HuginnWriteError(f"config field 'embed_scale' = {cfg.embed_scale}: Huginn scales by sqrt(d) = "
                               f"{math.sqrt(cfg.d_model):.4f}")


def check_retrofit(cfg: HyperloopConfig) -> None:
    """A retrofit's layout: RETROFIT_ARCH, QK-norm full-width exactly in the post-norm layout, and the Llama
    layout's head width n_embd / heads (its reference ignores head_dim)."""
    want = dict(RETROFIT_ARCH, qk_norm_full=cfg.block == "postnorm")
    for name, value in want.items():
        if getattr(cfg, name) != value:
            raise HuginnWriteError(f"config field '{name}' = {getattr(cfg, name)!r}: the {cfg.block} retrofit "
                                   f"layout needs {value!r}")
    if cfg.block == "prenorm" and cfg.head_dim * cfg.n_heads != cfg.d_model:
        raise HuginnWriteError(f"config field 'attn_head_dim' = {cfg.attn_head_dim}: the Llama retrofit layout's "
                               f"heads are d_model / n_heads = {cfg.d_model / cfg.n_heads:g} wide")


def huginn_config(cfg: HyperloopConfig, dtype: str, gen: dict, context: int | None = None) -> dict:
    """config.json of the folder: Huginn-0125's field names (recpre/raven_config_minimal.py); a retrofit's as the
    conversion scripts write them (convert_llama.py / convert_olmo.py: GQA, rope_theta beside rope_base, the
    llama3 rope_scaling, embed_scale 1, untied)."""
    d = cfg.d_model
    out = {"architectures": ["RavenForCausalLM"], "model_type": MODEL_TYPE, **EXPECTED,
           "n_embd": d, "num_attention_heads": cfg.n_heads, "n_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
           "head_dim": cfg.head_dim, "intermediate_size": cfg.mlp_hidden, "n_layers": cfg.unique_layers,
           "n_layers_in_prelude": cfg.n_begin, "n_layers_in_recurrent_block": cfg.n_middle,
           "n_layers_in_coda": cfg.n_end, "mean_recurrence": cfg.num_loops, "vocab_size": cfg.vocab_size,
           "padded_vocab_size": cfg.vocab_size, "block_size": context or cfg.max_seq_len, "norm_eps": cfg.norm_eps,
           "rope_base": cfg.rope_theta, "qk_bias": cfg.qk_bias, "bias": False, "tie_embeddings": cfg.tie_embeddings,
           "state_init": "zero", "test_time_noise": 0, "init_values": {"embed_scale": math.sqrt(d), "std": 0.0},
           "bos_token_id": gen["bos_token_id"], "eos_token_id": gen["eos_token_id"][0] if gen["eos_token_id"] else 0,
           "pad_token_id": gen["pad_token_id"], "torch_dtype": dtype}
    if cfg.block != "sandwich":
        out.update(num_key_value_heads=cfg.n_kv_heads, rope_theta=cfg.rope_theta,
                   tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=context or cfg.max_seq_len,
                   init_values={"embed_scale": cfg.embed_scale, "std": 0.0})
        if cfg.rope_scaling["rope_type"] != "none":
            out["rope_scaling"] = dict(cfg.rope_scaling)
    return out


def huginn_tensors(cfg: HyperloopConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Huginn tensor name -> tensor, from edgeloop's (the pieces key_map splits, put back together)."""
    H, hd = cfg.n_heads, cfg.head_dim
    out = {}
    for theirs, pieces in key_map(cfg).items():
        mine = [state[name] for name, _ in pieces]
        if theirs.endswith("attn.qk_bias"):
            out[theirs] = torch.stack([t.reshape(1, H, hd) for t in mine])
        else:
            out[theirs] = torch.cat(mine) if len(mine) > 1 else mine[0]
    return out


def write_huginn(ckpt: str | os.PathLike, out: str | os.PathLike, *, dtype: torch.dtype | None = None,
                 overwrite: bool = False, card: str | None = None, context: int | None = None) -> Path:
    """Write checkpoint `ckpt` as a huginn_raven folder `out` (atomically): config.json, model.safetensors
    (dtype: the checkpoint's own by default), generation_config.json, the tokenizer files, README.md (`card`).
    context: the block_size to state (default the checkpoint's max_seq_len; e.g. the length it trained on)."""
    ckpt = Path(ckpt)
    cfg = load_config(ckpt)
    check_huginn(cfg)
    state = load_state(ckpt, cfg)
    stored = dtype or next(iter(state.values())).dtype
    tensors = {k: v.to(stored).contiguous() for k, v in huginn_tensors(cfg, state).items()}
    gen = generation_tokens(ckpt)
    with atomic_dir(out, overwrite) as tmp:
        write_json(tmp / "config.json", huginn_config(cfg, str(stored).removeprefix("torch."), gen, context))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "generation_config.json").write_text(json.dumps({
            "bos_token_id": gen["bos_token_id"], "eos_token_id": gen["eos_token_id"],
            "pad_token_id": gen["pad_token_id"]}, indent=2) + "\n")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (ckpt / name).is_file():
                shutil.copyfile(ckpt / name, tmp / name)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
    return Path(out)
