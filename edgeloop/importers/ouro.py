"""The Ouro importer: Hugging Face `ouro` folders (ByteDance/Ouro-1.4B, -2.6B and the -Thinking models; the
reference is the remote code modeling_ouro.py the model pages ship, also vLLM's and mlx-lm's ouro.py).
Weights only: the folder's *.py files are never imported or run.

    h = embed(ids)                                           no scale, no begin block
    for t in 0..T-1 (T = total_ut_steps):                    the whole stack is the looped block
        every layer: h = h + in_norm_2(attn(in_norm h));  h = h + post_norm_2(mlp(post_norm h))
        h = norm(h)                                          every step, fed to the next
        lambda_t = sigmoid(early_exit_gate(h))              the exit gate
    logits = lm_head(h at the exit step)                     untied lm_head
Mapped onto edgeloop pieces: n_begin = n_end = 0, n_middle = num_hidden_layers, num_loops = T, block "prepost"
(norm1..4 = input_layernorm, input_layernorm_2, post_attention_layernorm, post_attention_layernorm_2), rotary
"neox" (rotate_half), norm_each_loop (model.norm), exit_gate (model.early_exit_gate, kept in float), the KV
cache per step (slot t * L + layer, as every Ouro implementation has it). Sliding-window attention, rope
scaling, attention biases and other activations are refused by name.
"""
from __future__ import annotations

from pathlib import Path

from edgeloop.importers.common import (HFImporter, ImporterError, Source, card, read_hf_weights,
                                       read_json, register)
from edgeloop.model.config import ConfigError, HyperloopConfig

MODEL_TYPE = "ouro"
NORMS = {"input_layernorm": "norm1", "input_layernorm_2": "norm2", "post_attention_layernorm": "norm3",
         "post_attention_layernorm_2": "norm4"}
LINEARS = {"self_attn.q_proj": "attn.c_q", "self_attn.k_proj": "attn.c_k", "self_attn.v_proj": "attn.c_v",
           "self_attn.o_proj": "attn.c_proj", "mlp.gate_proj": "mlp.c_gate", "mlp.up_proj": "mlp.c_fc",
           "mlp.down_proj": "mlp.c_proj"}
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CHAT_END = "<|im_end|>"  # the ChatML turn end: Ouro's configs name only <|endoftext|> (id 0) as eos


class OuroImportError(ImporterError):
    """An ouro folder is missing, inconsistent, or uses a feature edgeloop does not implement."""


def config_of(folder: Path) -> tuple[dict, HyperloopConfig]:
    raw = read_json(folder / "config.json", OuroImportError)
    where = folder / "config.json"

    def need(key: str):
        if key not in raw:
            raise OuroImportError(f"{where}: field '{key}' is missing")
        return raw[key]

    def refuse(key: str, why: str) -> OuroImportError:
        return OuroImportError(f"{where}: {key} = {raw.get(key)!r}: {why} (not implemented by edgeloop's Ouro "
                               f"import)")

    if raw.get("use_sliding_window"):
        raise refuse("use_sliding_window", "sliding-window attention")
    if raw.get("rope_scaling"):
        raise refuse("rope_scaling", "rotary scaling")
    if raw.get("hidden_act", "silu") != "silu":
        raise refuse("hidden_act", "an MLP activation other than SiLU")
    if raw.get("attention_bias"):
        raise refuse("attention_bias", "attention biases")
    if raw.get("use_weighted_exit"):
        raise refuse("use_weighted_exit", "the weighted (expected) exit: edgeloop picks one exit step per token")
    d, heads = need("hidden_size"), need("num_attention_heads")
    kv = raw.get("num_key_value_heads", heads)
    if isinstance(d, int) and isinstance(heads, int) and heads and raw.get("head_dim", d // heads) != d // heads:
        raise refuse("head_dim", f"not hidden_size / heads = {d / heads:g}")
    q = raw.get("early_exit_threshold", 1.0)
    try:
        cfg = HyperloopConfig(
            vocab_size=need("vocab_size"), d_model=d, n_heads=heads, n_kv_heads=kv, n_begin=0,
            n_middle=need("num_hidden_layers"), n_end=0, num_loops=raw.get("total_ut_steps", 4), kv_policy="per-step",
            hc="none", n_streams=1, injection="passthrough", block="prepost", mlp="swiglu",
            mlp_hidden=need("intermediate_size"), rotary="neox", qk_norm=False, qk_bias=False, loop_embedding=False,
            norm_each_loop=True, exit_gate=True, early_exit_threshold=float(1.0 if q is None else q),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            rope_theta=float(raw.get("rope_theta", 10000.0)), norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_seq_len=raw.get("max_position_embeddings", 32768),
            extra={"imported_from": {"format": MODEL_TYPE, "source": str(folder.resolve()),
                                     "total_ut_steps": raw.get("total_ut_steps", 4)}})
        return raw, cfg.validate()
    except (ConfigError, TypeError, ValueError) as e:
        raise OuroImportError(f"{where}: does not map onto edgeloop: {e}") from None


def key_map(cfg: HyperloopConfig) -> dict[str, str]:
    """Ouro tensor name -> edgeloop tensor name."""
    m = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "final_norm.weight",
         "model.early_exit_gate.weight": "exit_gate.weight", "model.early_exit_gate.bias": "exit_gate.bias"}
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.n_middle):
        m.update({f"model.layers.{i}.{k}.weight": f"middle.{i}.{v}.weight" for k, v in {**NORMS, **LINEARS}.items()})
    return m


@register
class Ouro(HFImporter):
    name = model_type = MODEL_TYPE
    title = "Ouro (ouro): config.json + safetensors (sharded or not), weights only"
    error = OuroImportError

    def read(self, folder: Path) -> Source:
        raw, cfg = config_of(folder)
        hw = read_hf_weights(folder, raw, cfg, key_map(cfg), OuroImportError, COPIED, CHAT_END,
                             " (an attention bias: not in Ouro)")
        files, dtypes, tok, st, ignored = hw.files, hw.dtypes, hw.tokenizer, hw.st, hw.ignored
        files["README.md"] = card(f"{folder.resolve().name}, imported", (
            f"Imported by `edgeloop import` from the Hugging Face `ouro` folder `{folder.resolve()}` (Ouro, arXiv "
            f"2510.25741). Weights only, unchanged ({'/'.join(dtypes)}); their licence is the source's (Apache-2.0 "
            f"for ByteDance's Ouro models)."), [
            ("layout", f"{cfg.n_middle} layers, the whole stack looped {cfg.num_loops} times (no begin / end block)"),
            ("width", f"d = {cfg.d_model}, {cfg.n_heads} heads, {cfg.n_kv_heads} KV heads, SwiGLU {cfg.mlp_hidden}"),
            ("vocabulary / context", f"{cfg.vocab_size} / {cfg.max_seq_len}, rotary θ {cfg.rope_theta:g} (rotate_half)"),
            ("exit gate", f"after every step, kept in float; default threshold {cfg.early_exit_threshold:g} (>= 1: "
                          f"never early); the export's Loop stops once every token has exited"),
            ("KV cache", "per step (slot t·L + layer); the steps an exit skips get the last step's keys/values; "
                         "export --kv-policy shared for one slot per layer")], ["ouro", "early-exit"])
        summary = {"total_ut_steps": cfg.num_loops, "early_exit_threshold": cfg.early_exit_threshold,
                   "source_dtypes": dtypes, "stored_dtype": "/".join(dtypes), "shards": len(st.names_in),
                   "ignored": ignored, "tokenizer": str(tok) if tok else None, "vocab_size": cfg.vocab_size,
                   "hc": cfg.hc, "injection": cfg.injection}
        return Source(cfg, hw.header, hw.stream, files, summary)
