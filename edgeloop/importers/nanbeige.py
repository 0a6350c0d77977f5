"""The Nanbeige importer: Hugging Face `nanbeige` folders (Nanbeige/Nanbeige4.2-3B and its Base; the reference
is the remote code modeling_nanbeige.py the model page ships, also llama.cpp's, SGLang's and mlx-lm's
nanbeige). Weights only: the folder's *.py files are never imported or run.

    h = embed(ids)                                       no scale, no begin block, no input injection
    for loop in 0..L-1 (L = num_loops, or len(loop_loss_weights) + 1):   the whole stack is the looped block
        every layer i: h = h + o(attn(norm_in h));  h = h + down(silu(gate(norm_post h)) * up(norm_post h))
        h = norm(h)                                      after every loop (skip_loop_final_norm: after the last)
    logits = lm_head(h)                                  untied lm_head; exactly one norm before it either way
Attention: GQA, head_dim given by config (128 on 48 heads of a 3072 stream: q is 6144 wide), rotate_half rotary
(theta 7e7), scale 1/sqrt(head_dim), no biases, no QK-norm; the KV cache has one slot per (loop, layer), the
reference's cache layer layer + loop * num_hidden_layers. Mapped onto edgeloop pieces: n_begin = n_end = 0,
n_middle = num_hidden_layers, block "prenorm", rotary "neox", attn_head_dim, norm_each_loop = not
skip_loop_final_norm (final_norm = model.norm). The switches the reference code has but the released weights
leave off (n-gram embeddings, LoopSplit, loop_share_kv, hyper-connections / mHC, depth attention, QK layernorm)
are refused by name when on, as are rope scaling, biases and other activations.
"""
from __future__ import annotations

from pathlib import Path

from edgeloop.importers.common import (HFImporter, ImporterError, Source, card, read_hf_weights,
                                       read_json, register)
from edgeloop.model.config import ConfigError, HyperloopConfig

MODEL_TYPE = "nanbeige"
LINEARS = {"self_attn.q_proj": "attn.c_q", "self_attn.k_proj": "attn.c_k", "self_attn.v_proj": "attn.c_v",
           "self_attn.o_proj": "attn.c_proj", "mlp.gate_proj": "mlp.c_gate", "mlp.up_proj": "mlp.c_fc",
           "mlp.down_proj": "mlp.c_proj", "input_layernorm": "norm1", "post_attention_layernorm": "norm2"}
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
CHAT_END = "<|im_end|>"
# switches of the reference code that the released checkpoints leave off: (field, what it turns on); a field is
# on when it holds anything but its default (None, False, or an empty list)
REFUSED = (("emb_neighbor_num", "n-gram embeddings"), ("insert_ngram_layer_idx", "n-gram layer fusion"),
           ("ngram_insert_all_layers", "n-gram layer fusion"), ("enable_double_loop_split", "LoopSplit"),
           ("loop_share_kv", "loop-shared KV (LoopSplit)"), ("enable_hyper_connection", "hyper-connections"),
           ("enable_mhc", "manifold-constrained hyper-connections (mHC)"),
           ("enable_depth_attention", "depth attention"), ("qk_layernorm", "QK layernorm"),
           ("rope_scaling", "rotary scaling"), ("attention_bias", "attention biases"), ("mlp_bias", "MLP biases"),
           ("use_sliding_window", "sliding-window attention"))


class NanbeigeImportError(ImporterError):
    """A nanbeige folder is missing, inconsistent, or uses a feature edgeloop does not implement."""


def loops_of(raw: dict) -> int:
    """The reference's loop count: len(loop_loss_weights) + 1 when that list is non-empty, else num_loops (1)."""
    weights = raw.get("loop_loss_weights") or []
    return len(weights) + 1 if isinstance(weights, list) and weights else raw.get("num_loops", 1)


def config_of(folder: Path) -> tuple[dict, HyperloopConfig]:
    raw = read_json(folder / "config.json", NanbeigeImportError)
    where = folder / "config.json"

    def need(key: str):
        if key not in raw:
            raise NanbeigeImportError(f"{where}: field '{key}' is missing")
        return raw[key]

    def refuse(key: str, why: str) -> NanbeigeImportError:
        return NanbeigeImportError(f"{where}: {key} = {str(raw.get(key))[:60]}: {why} (not implemented by edgeloop's "
                                   f"Nanbeige import; the released Nanbeige4.2 weights leave it off)")

    for key, what in REFUSED:
        if raw.get(key) not in (None, False, [], {}):
            raise refuse(key, what)
    if raw.get("hidden_act", "silu") != "silu":
        raise refuse("hidden_act", "an MLP activation other than SiLU")
    kinds = raw.get("layer_types") or []
    if not isinstance(kinds, list) or any(k != "full_attention" for k in kinds):
        raise refuse("layer_types", "attention other than full attention")
    d, heads = need("hidden_size"), need("num_attention_heads")
    head_dim = raw.get("head_dim") or raw.get("kv_channels") or 0
    if isinstance(d, int) and isinstance(heads, int) and heads and head_dim == d // heads and not d % heads:
        head_dim = 0  # the default width: nothing to record
    loops = loops_of(raw)
    try:
        cfg = HyperloopConfig(
            vocab_size=need("vocab_size"), d_model=d, n_heads=heads, n_kv_heads=raw.get("num_key_value_heads") or heads,
            attn_head_dim=head_dim, n_begin=0, n_middle=need("num_hidden_layers"), n_end=0, num_loops=loops,
            kv_policy="per-step", hc="none", n_streams=1, injection="passthrough", block="prenorm", mlp="swiglu",
            mlp_hidden=need("intermediate_size"), rotary="neox", qk_norm=False, qk_bias=False, loop_embedding=False,
            norm_each_loop=not raw.get("skip_loop_final_norm", False),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            rope_theta=float(raw.get("rope_theta", 10000.0)), norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_seq_len=raw.get("max_position_embeddings", 2048),
            extra={"imported_from": {"format": MODEL_TYPE, "source": str(folder.resolve()), "num_loops": loops,
                                     "skip_loop_final_norm": bool(raw.get("skip_loop_final_norm", False))}})
        return raw, cfg.validate()
    except (ConfigError, TypeError, ValueError) as e:
        raise NanbeigeImportError(f"{where}: does not map onto edgeloop: {e}") from None


def key_map(cfg: HyperloopConfig) -> dict[str, str]:
    """Nanbeige tensor name -> edgeloop tensor name."""
    m = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "final_norm.weight"}
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.n_middle):
        m.update({f"model.layers.{i}.{k}.weight": f"middle.{i}.{v}.weight" for k, v in LINEARS.items()})
    return m


@register
class Nanbeige(HFImporter):
    name = model_type = MODEL_TYPE
    title = "Nanbeige4.2 (nanbeige): config.json + safetensors (sharded or not), weights only"
    error = NanbeigeImportError

    def read(self, folder: Path) -> Source:
        raw, cfg = config_of(folder)
        hw = read_hf_weights(folder, raw, cfg, key_map(cfg), NanbeigeImportError, COPIED, CHAT_END,
                             " (a bias: not in Nanbeige4.2)")
        files, dtypes, tok, st, ignored = hw.files, hw.dtypes, hw.tokenizer, hw.st, hw.ignored
        norm = ("after the last loop only (skip_loop_final_norm)" if not cfg.norm_each_loop else
                "model.norm after every loop, fed to the next; the last one is the head's")
        files["README.md"] = card(f"{folder.resolve().name}, imported", (
            f"Imported by `edgeloop import` from the Hugging Face `nanbeige` folder `{folder.resolve()}`. Weights "
            f"only, unchanged ({'/'.join(dtypes)}); their licence is the source's."), [
            ("layout", f"{cfg.n_middle} layers, the whole stack looped {cfg.num_loops} times (no begin / end block, "
                       f"no input injection, no per-loop parameters)"),
            ("width", f"d = {cfg.d_model}, {cfg.n_heads} heads of {cfg.head_dim}, {cfg.n_kv_heads} KV heads, "
                      f"SwiGLU {cfg.mlp_hidden}"),
            ("vocabulary / context", f"{cfg.vocab_size} / {cfg.max_seq_len}, rotary θ {cfg.rope_theta:g} "
                                     f"(rotate_half)"),
            ("norm", norm),
            ("loops", f"trained at {cfg.num_loops}; the export's num_loops input runs 1..max_loops (export "
                      f"--max-loops N for more than {cfg.num_loops}): 1 loop reads the head off the first pass, "
                      f"3 passes the normed output through the stack once more (outside training)"),
            ("KV cache", "one slot per (loop, layer), slot loop · L + layer, as every Nanbeige runtime has it")],
            ["nanbeige"])
        summary = {"num_loops": cfg.num_loops, "skip_loop_final_norm": not cfg.norm_each_loop,
                   "source_dtypes": dtypes, "stored_dtype": "/".join(dtypes), "shards": len(st.names_in),
                   "ignored": ignored, "tokenizer": str(tok) if tok else None, "vocab_size": cfg.vocab_size,
                   "hc": cfg.hc, "injection": cfg.injection}
        return Source(cfg, hw.header, hw.stream, files, summary)
