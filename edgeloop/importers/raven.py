"""The retrofitted-recurrence ("Raven") variants of the huginn_raven format (McLeish et al., arXiv 2511.07384;
reference code LoopedLMs/retrofitting-recurrence, convert_pretrained_model/raven_modeling_minimal_{llama,olmo}.py
and convert_{llama,olmo}.py): pretrained Llama-3.2 / TinyLlama / OLMo-2 layers cut into prelude, core and coda,
with Huginn's adapter, tensor names and config class. importers/huginn.py reads the folder; this module tells the
layouts apart and maps a retrofit's config.json.

    e = wte(ids) * embed_scale (1.0);  e = prelude(e)
    s = 0 (or the random start, sigma init_values.std);  repeat num_steps: s = core_block(adapter([s; e]))
    x = coda(s);  logits = lm_head(ln_f(x))                 ln_f ONCE (Huginn-0125: twice); lm_head untied
Llama layout (pre-norm, block "prenorm"): x = x + attn(norm_1 x); x = x + mlp(norm_2 x).
OLMo-2 layout (post-norm, block "postnorm"): x = x + norm_1(attn x); x = x + norm_2(mlp x), and attention's
q_norm / k_norm: RMSNorm with weight over the whole projected q [H*hd] and k [KV*hd], before the head split
(qk_norm_full). Both: Wqkv rows q | k | v with num_key_value_heads KV heads (GQA), rotary rotate_half ("neox")
at rope_theta (else rope_base) with an optional llama3 rope_scaling, no q/k biases.
No config field states the layout (both say SandwichBlock): the tensors do. norm_3 / norm_4 mean Huginn-0125's
sandwich block, attn.q_norm / attn.k_norm the OLMo-2 layout, neither the Llama layout.
"""
from __future__ import annotations

import math
from pathlib import Path

from edgeloop.model.config import ConfigError, HyperloopConfig

LAYOUTS = {"prenorm": "Llama-style pre-norm (Llama-3.2 / TinyLlama retrofit)",
           "postnorm": "OLMo-2-style post-norm with full-width QK-norm (OLMo-2 retrofit)"}
SHORT = {"prenorm": "a Llama-layout retrofit", "postnorm": "an OLMo-2-layout retrofit"}
ROPE_TYPES = ("default", "llama3")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def layout_of(names) -> str:
    """The block layout the tensor names say: "sandwich" (norm_3 / norm_4: Huginn-0125), "postnorm" (attn.q_norm /
    attn.k_norm: the OLMo-2 retrofit) or "prenorm" (neither: the Llama retrofit)."""
    names = list(names)
    if any(n.endswith((".norm_3.weight", ".norm_4.weight")) for n in names):
        return "sandwich"
    if any(n.endswith((".attn.q_norm.weight", ".attn.k_norm.weight")) for n in names):
        return "postnorm"
    return "prenorm"


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def retrofit_config(folder: Path, raw: dict, block: str, err: type[ValueError], expected: dict,
                    state_inits: tuple, model_type: str, max_loops: int) -> HyperloopConfig:
    """config.json of a retrofit in layout `block` -> HyperloopConfig, refusing (one line, naming the field)
    every value edgeloop does not implement. Defaults are the reference config class's (RavenConfig)."""
    where = folder / "config.json"
    what = SHORT[block]

    def refuse(key: str, why: str, value=None) -> ValueError:
        return err(f"{where}: {key} = {_short(raw.get(key) if value is None else value)}: {why} ({what})")

    def need(key: str, *alts: str):
        for k in (key, *alts):
            if raw.get(k) is not None:
                return raw[k]
        raise err(f"{where}: field '{key}' is missing")

    def positive_int(key: str, v) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise err(f"{where}: {key} = {_short(v)}: must be a positive integer")
        return v

    for key, want in expected.items():
        if raw.get(key, want) != want:
            raise refuse(key, f"not {want}")
    if raw.get("state_init", "like-init") not in state_inits:
        raise refuse("state_init", f"not one of {state_inits}")
    if raw.get("initial_state_mode", "random") != "random":
        raise refuse("initial_state_mode", "a start state other than the random one (a fork-only option)")
    soft = next((k for k in raw if "softcap" in k and raw[k]), None)
    if soft:
        raise refuse(soft, "logit soft-capping")
    if raw.get("test_time_noise", 0):
        raise refuse("test_time_noise", "test-time noise on the state")
    if raw.get("bias", False):
        raise refuse("bias", "an adapter bias")
    if raw.get("qk_bias") is True:
        raise refuse("qk_bias", "q/k biases in a retrofitted block (the published retrofits have none)")
    if "rope_parameters" in raw:
        raise refuse("rope_parameters", "transformers 5's rotary field, which the reference code does not read")
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        raise refuse("partial_rotary_factor", "rotary on part of each head")
    d = positive_int("n_embd", need("n_embd", "hidden_size"))
    heads = positive_int("num_attention_heads", need("num_attention_heads", "n_heads"))
    kv = positive_int("num_key_value_heads", raw.get("num_key_value_heads", heads))
    if heads % kv:
        raise refuse("num_key_value_heads", f"does not divide the {heads} heads")
    if block == "prenorm":  # the Llama file: head_dim = n_embd // heads, whatever the config says
        if d % heads or raw.get("head_dim", d // heads) != d // heads:
            raise refuse("head_dim", f"not n_embd / heads = {d / heads:g}, the Llama layout's head width")
        hd = d // heads
    else:  # the OLMo file: getattr(config, "head_dim", n_embd // heads)
        if "head_dim" not in raw and d % heads:
            raise refuse("head_dim", f"missing, and n_embd {d} is not a multiple of {heads} heads", "missing")
        hd = positive_int("head_dim", raw.get("head_dim", d // heads))
    init = raw.get("init_values") or {}
    if not isinstance(init, dict):
        raise refuse("init_values", "not an object")
    emb_scale, std = init.get("embed_scale", math.sqrt(d)), init.get("std", math.sqrt(2 / (5 * d)))
    if not _number(emb_scale) or emb_scale <= 0:
        raise refuse("init_values", "embed_scale must be a positive number")
    if not _number(std) or std < 0:
        raise refuse("init_values", "std must be a non-negative number")
    if "tie_embeddings" in raw:
        tied = raw["tie_embeddings"]
    elif raw.get("tie_word_embeddings") is False:  # RavenConfig drops tie_word_embeddings and ties by default
        raise refuse("tie_word_embeddings", "without tie_embeddings, which the reference reads (default true): "
                                            "ambiguous; set tie_embeddings")
    else:
        tied = True
    if not isinstance(tied, bool):
        raise refuse("tie_embeddings", "must be true or false")
    if raw.get("norm_eps") is not None:
        eps = raw["norm_eps"]
    elif raw.get("rms_norm_eps", 1e-6) != 1e-6:
        raise refuse("rms_norm_eps", "without norm_eps, which the reference reads (default 1e-6): ambiguous; "
                                     "set norm_eps")
    else:
        eps = 1e-6
    theta = raw["rope_theta"] if raw.get("rope_theta") is not None else raw.get("rope_base", 50000.0)
    if not _number(theta) or theta <= 0:
        raise refuse("rope_theta" if raw.get("rope_theta") is not None else "rope_base", "not a positive number",
                     theta)
    r, scaling = need("mean_recurrence"), rope_scaling(raw, refuse)
    try:
        cfg = HyperloopConfig(
            vocab_size=raw.get("padded_vocab_size", need("vocab_size")), d_model=d, n_heads=heads, n_kv_heads=kv,
            attn_head_dim=0 if hd * heads == d else hd, n_begin=need("n_layers_in_prelude"),
            n_middle=need("n_layers_in_recurrent_block"), n_end=need("n_layers_in_coda"), num_loops=r,
            max_loops=max(max_loops, r) if isinstance(r, int) else r, kv_policy="shared", hc="none", n_streams=1,
            injection="adapter", block=block, mlp="swiglu", mlp_hidden=need("intermediate_size"), rotary="neox",
            qk_norm=False, qk_norm_full=block == "postnorm", qk_bias=False, loop_embedding=False,
            embed_scale=float(emb_scale), post_loop_norm=False, tie_embeddings=tied, rope_theta=float(theta),
            rope_scaling=scaling, norm_eps=float(eps) if _number(eps) else eps,
            max_seq_len=raw.get("max_position_embeddings") or need("block_size"), init_std=float(std),
            extra={"imported_from": {"format": model_type, "source": str(folder.resolve()), "variant": block,
                                     "mean_recurrence": r, "state_init": raw.get("state_init", "like-init"),
                                     "init_std": std}})
        return cfg.validate()
    except (ConfigError, TypeError, ValueError) as e:
        raise err(f"{where}: does not map onto edgeloop: {e}") from None


def rope_scaling(raw: dict, refuse) -> dict:
    """config rope_scaling for the source's: none (absent, null, rope_type "default") or llama3 with its four
    numbers as they are; any other rope type is refused by name."""
    rs = raw.get("rope_scaling")
    if rs is None or rs == {}:
        return {"rope_type": "none"}
    if not isinstance(rs, dict):
        raise refuse("rope_scaling", "not an object")
    kind = rs.get("rope_type", rs.get("type"))
    if kind not in ROPE_TYPES:
        raise refuse("rope_scaling", f"rope_type {_short(kind)}: only {' and '.join(ROPE_TYPES)} are implemented")
    if kind == "default":
        return {"rope_type": "none"}
    missing = [k for k in LLAMA3_KEYS if k not in rs]
    if missing:
        raise refuse("rope_scaling", f"llama3 without '{missing[0]}'")
    return {"rope_type": "llama3", **{k: rs[k] for k in LLAMA3_KEYS}}


def card_rows(cfg: HyperloopConfig) -> tuple[str, list[tuple[str, str]]]:
    """(the source line's description, the card's architecture rows) of an imported retrofit."""
    rs = cfg.rope_scaling
    scaling = "" if rs["rope_type"] == "none" else (f", llama3 scaling x{rs['factor']:g} (original context "
                                                    f"{rs['original_max_position_embeddings']})")
    return ("a retrofitted-recurrence model, McLeish et al., arXiv 2511.07384; reference code "
            "LoopedLMs/retrofitting-recurrence", [
                ("layout", f"{LAYOUTS[cfg.block]}: prelude {cfg.n_begin} → core {cfg.n_middle} × num_steps (mean "
                           f"{cfg.num_loops}, up to {cfg.loop_limit}) → coda {cfg.n_end} → ln_f once"),
                ("width", f"d = {cfg.d_model}, {cfg.n_heads} heads × {cfg.head_dim} ({cfg.n_kv_heads} KV heads), "
                          f"gated SiLU MLP {cfg.mlp_hidden}" + (", QK-norm over the full q/k width"
                                                                if cfg.qk_norm_full else "")),
                ("vocabulary / context", f"{cfg.vocab_size} / {cfg.max_seq_len}, rotary θ {cfg.rope_theta:g} "
                                         f"(rotate_half){scaling}"),
                ("state", f"zeros by default (export --init-state random: the reference's random start, sigma "
                          f"{cfg.init_std:g})"),
                ("KV cache", "shared across steps by default; export --kv-policy per-step for one slot per step "
                             "(the reference's default 'full' cache)")])
