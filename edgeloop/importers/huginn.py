"""The huginn_raven importer: Hugging Face `huginn_raven` folders, Huginn-0125 (tomg-group-umd/huginn-0125; the
reference is seal-rg/recurrent-pretraining, recpre/raven_modeling_minimal.py) and the retrofitted-recurrence
("Raven") models that reuse its model_type (importers/raven.py). Weights only: the folder's remote-code *.py files
are never imported or run. The tensors tell the variants apart (raven.layout_of): norm_3 / norm_4 are Huginn-0125's.

Huginn-0125:
    e = wte(ids) * sqrt(d);  e = prelude(e)                      begin: n_layers_in_prelude sandwich blocks
    s = 0 (or the random start);  repeat num_steps: s = core_block(adapter([s; e]))     middle, looped
    x = ln_f(s);  x = coda(x);  logits = lm_head(ln_f(x))         end, ln_f used twice; lm_head tied to wte
Sandwich block x = norm_2(x + attn(norm_1 x)); x = norm_4(x + mlp(norm_3 x)); attention: Wqkv rows q | k | v,
qk_bias [2, 1, H, hd] added to q and k before rotary on interleaved pairs (base rope_base); MLP proj(silu(gate) *
up) with fc rows gate | up. Mapped onto edgeloop pieces: block "sandwich", rotary "interleaved", injection
"adapter" (inject.weight = adapter.weight), c_q/c_k/c_v (+ biases) = the Wqkv rows, c_gate/c_fc = the fc
rows, post_loop_norm; the KV cache shared across steps by default (the reference's compress-s4).
Retrofits (Llama-3.2 / TinyLlama pre-norm, OLMo-2 post-norm with full-width QK-norm): the same names and adapter,
blocks "prenorm" / "postnorm", GQA, rotary "neox" (+ llama3 rope_scaling), embed scale 1, ln_f once, untied head
(raven.py). Anything else (other rope types, test-time noise, soft-capping, biases, other start states) is refused
by name, in one line, before anything is written.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from edgeloop.importers.common import (HFImporter, ImporterError, Safetensors, Source, card, read_json, register,
                                       tokenizer_vocab)
from edgeloop.importers.raven import card_rows, layout_of, retrofit_config
from edgeloop.model.config import ConfigError, HyperloopConfig

MODEL_TYPE = "huginn_raven"
SECTIONS = {"prelude": ("begin", "n_layers_in_prelude"), "core_block": ("middle", "n_layers_in_recurrent_block"),
            "coda": ("end", "n_layers_in_coda")}
# fields whose value selects another architecture in the training code: Huginn-0125's value, or refused
EXPECTED = {"block_class_name": "SandwichBlock", "mlp_class_name": "GatedMLP", "nonlin_name": "SiLU",
            "norm_class_name": "RMSNorm_llama", "injection_type": "linear", "architecture_class_name": "RecurrentGPT"}
STATE_INITS = ("like-init", "zero")
RETROFIT_FIELDS = ("rope_scaling", "rope_theta", "rope_parameters", "max_position_embeddings", "initial_state_mode")
COPIED = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
MAX_LOOPS = 64  # the model card: quality keeps rising up to about 64 steps


class HuginnImportError(ImporterError):
    """A huginn_raven folder is missing, inconsistent, or a variant edgeloop does not implement."""


def config_of(folder: Path, raw: dict | None = None) -> tuple[dict, HyperloopConfig]:
    """config.json (of a folder with Huginn-0125's sandwich blocks) -> (raw, HyperloopConfig), refusing every field
    value edgeloop does not implement."""
    raw = read_json(folder / "config.json", HuginnImportError) if raw is None else raw
    where = folder / "config.json"

    def need(key: str, *alts: str):
        for k in (key, *alts):
            if k in raw:
                return raw[k]
        raise HuginnImportError(f"{where}: field '{key}' is missing")

    def refuse(key: str, why: str) -> HuginnImportError:
        return HuginnImportError(f"{where}: {key} = {raw.get(key)!r}: {why} (a folder with Huginn-0125's sandwich "
                                 f"blocks, norm_3 / norm_4; edgeloop does not implement this)")

    for key, want in EXPECTED.items():
        if raw.get(key, want) != want:
            raise refuse(key, f"not {want}")
    if raw.get("state_init", "like-init") not in STATE_INITS:
        raise refuse("state_init", f"not one of {STATE_INITS}")
    for key in RETROFIT_FIELDS:
        if key in raw:
            raise refuse(key, "a retrofit's field, which Huginn-0125 does not have")
    if any("softcap" in k for k in raw if raw[k]):
        key = next(k for k in raw if "softcap" in k and raw[k])
        raise refuse(key, "logit soft-capping")
    if raw.get("test_time_noise", 0):
        raise refuse("test_time_noise", "test-time noise on the state")
    if raw.get("bias", False):
        raise refuse("bias", "an adapter bias")
    d, heads = need("n_embd", "hidden_size"), need("num_attention_heads", "n_heads")
    for key, v in (("n_embd", d), ("num_attention_heads", heads)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise HuginnImportError(f"{where}: {key} = {v!r}: must be a positive integer")
    kv_heads = raw.get("num_key_value_heads", heads)
    if kv_heads != heads:
        raise refuse("num_key_value_heads", f"grouped-query attention ({kv_heads} KV heads for {heads} heads)")
    if d % heads or raw.get("head_dim", d // heads) != d // heads:
        raise refuse("head_dim", f"not n_embd / heads = {d / heads:g}")
    emb_scale = (raw.get("init_values") or {}).get("embed_scale", math.sqrt(d))
    if not isinstance(emb_scale, (int, float)) or abs(emb_scale - math.sqrt(d)) > 1e-6 * math.sqrt(d):
        raise HuginnImportError(f"{where}: init_values.embed_scale = {emb_scale!r}: not sqrt(n_embd) = "
                                f"{math.sqrt(d):.4f} (a folder with Huginn-0125's sandwich blocks, norm_3 / norm_4; "
                                f"edgeloop does not implement this)")
    r = need("mean_recurrence")
    tied = raw.get("tie_embeddings", raw.get("tie_word_embeddings", True))
    try:
        cfg = HyperloopConfig(
            vocab_size=raw.get("padded_vocab_size", need("vocab_size")), d_model=d, n_heads=heads, n_kv_heads=heads,
            n_begin=need("n_layers_in_prelude"), n_middle=need("n_layers_in_recurrent_block"),
            n_end=need("n_layers_in_coda"), num_loops=r, max_loops=max(MAX_LOOPS, r) if isinstance(r, int) else r,
            kv_policy="shared", hc="none", n_streams=1, injection="adapter", block="sandwich", mlp="swiglu",
            mlp_hidden=need("intermediate_size"), rotary="interleaved", qk_norm=False, qk_bias=raw.get("qk_bias", True),
            loop_embedding=False, embed_scale=float(emb_scale), post_loop_norm=True, tie_embeddings=bool(tied),
            rope_theta=float(raw.get("rope_base", 50000.0)), norm_eps=float(raw.get("norm_eps", 1e-6)),
            max_seq_len=need("block_size"),
            extra={"imported_from": {"format": MODEL_TYPE, "source": str(folder.resolve()),
                                     "mean_recurrence": r, "state_init": raw.get("state_init", "like-init"),
                                     "init_std": (raw.get("init_values") or {}).get("std")}})
        return raw, cfg.validate()
    except (ConfigError, TypeError, ValueError) as e:
        raise HuginnImportError(f"{where}: does not map onto edgeloop: {e}") from None


def key_map(cfg: HyperloopConfig) -> dict[str, list[tuple[str, slice | int | None]]]:
    """huginn_raven tensor name -> [(edgeloop name, the rows (slice) or qk_bias index it takes, or None: all)].
    Wqkv rows: q [H*hd], k [KV*hd], v [KV*hd]; norms 1-4 (sandwich) or 1-2 (the retrofits' pre/post-norm), and
    the OLMo-2 retrofit's attn.q_norm / attn.k_norm (qk_norm_full)."""
    H, KV, hd, I = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_hidden
    m: dict[str, list] = {"transformer.wte.weight": [("embed.weight", None)],
                          "transformer.adapter.weight": [("inject.weight", None)],
                          "transformer.ln_f.weight": [("final_norm.weight", None)]}
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = [("lm_head.weight", None)]
    norms = (1, 2, 3, 4) if cfg.block == "sandwich" else (1, 2)
    for sec, (ours, count) in SECTIONS.items():
        for i in range(getattr(cfg, {"begin": "n_begin", "middle": "n_middle", "end": "n_end"}[ours])):
            p, q = f"transformer.{sec}.{i}.", f"{ours}.{i}."
            m.update({f"{p}norm_{k}.weight": [(f"{q}norm{k}.weight", None)] for k in norms})
            m[f"{p}attn.Wqkv.weight"] = [(f"{q}attn.c_q.weight", slice(0, H * hd)),
                                         (f"{q}attn.c_k.weight", slice(H * hd, (H + KV) * hd)),
                                         (f"{q}attn.c_v.weight", slice((H + KV) * hd, (H + 2 * KV) * hd))]
            if cfg.qk_bias:
                m[f"{p}attn.qk_bias"] = [(f"{q}attn.c_q.bias", 0), (f"{q}attn.c_k.bias", 1)]
            if cfg.qk_norm_full:
                m[f"{p}attn.q_norm.weight"] = [(f"{q}attn.q_norm.weight", None)]
                m[f"{p}attn.k_norm.weight"] = [(f"{q}attn.k_norm.weight", None)]
            m[f"{p}attn.proj.weight"] = [(f"{q}attn.c_proj.weight", None)]
            m[f"{p}mlp.fc.weight"] = [(f"{q}mlp.c_gate.weight", slice(0, I)), (f"{q}mlp.c_fc.weight", slice(I, 2 * I))]
            m[f"{p}mlp.proj.weight"] = [(f"{q}mlp.c_proj.weight", None)]
    return m


def source_shapes(cfg: HyperloopConfig) -> dict[str, tuple[int, ...]]:
    """The shape each huginn_raven tensor must have under `cfg`."""
    d, H, KV, hd, I, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_hidden, cfg.vocab_size
    shapes = {"transformer.wte.weight": (V, d), "transformer.adapter.weight": (d, 2 * d),
              "transformer.ln_f.weight": (d,), "lm_head.weight": (V, d)}
    for name in key_map(cfg):
        leaf = name.split(".", 3)[-1]
        shapes.setdefault(name, {"attn.Wqkv.weight": ((H + 2 * KV) * hd, d), "attn.qk_bias": (2, 1, H, hd),
                                 "attn.q_norm.weight": (H * hd,), "attn.k_norm.weight": (KV * hd,),
                                 "attn.proj.weight": (d, H * hd), "mlp.fc.weight": (2 * I, d),
                                 "mlp.proj.weight": (d, I)}.get(leaf, (d,)))
    return shapes


def pieces(t: torch.Tensor, take: slice | int | None) -> torch.Tensor:
    if take is None:
        return t
    return t[take].reshape(-1) if isinstance(take, int) else t[take]


@register
class Huginn(HFImporter):
    name = model_type = MODEL_TYPE
    title = ("Huginn-0125 and the retrofitted-recurrence models (huginn_raven): config.json + safetensors shards, "
             "weights only")
    error = HuginnImportError

    def read(self, folder: Path) -> Source:
        raw = read_json(folder / "config.json", HuginnImportError)
        st = Safetensors(folder, HuginnImportError)
        block = layout_of(st.header)
        if block == "sandwich":
            raw, cfg = config_of(folder, raw)
        else:
            cfg = retrofit_config(folder, raw, block, HuginnImportError, EXPECTED, STATE_INITS, MODEL_TYPE, MAX_LOOPS)
        names, shapes = key_map(cfg), source_shapes(cfg)
        ignored = sorted(n for n in st.header if n.endswith(("freqs_cis", "rotary_emb.inv_freq")) or
                         (cfg.tie_embeddings and n == "lm_head.weight"))
        have = set(st.header) - set(ignored)
        extra, missing = sorted(have - set(names)), sorted(set(names) - have)
        if any(".q_norm." in n or ".k_norm." in n for n in extra):
            raise HuginnImportError(f"{folder}: tensor '{next(n for n in extra if '_norm.' in n)}': QK-norm in a "
                                    f"folder with Huginn-0125's sandwich blocks (norm_3 / norm_4; edgeloop "
                                    f"implements QK-norm for the OLMo-2 retrofit's post-norm blocks only)")
        if any(".norm_3." in n or ".norm_4." in n for n in missing):
            raise HuginnImportError(f"{folder}: tensor '{next(n for n in missing if '.norm_' in n)}' is missing: not "
                                    f"a sandwich block, though other blocks have norm_3 / norm_4")
        if block != "sandwich" and any(n.endswith("attn.qk_bias") for n in extra):
            raise HuginnImportError(f"{folder}: tensor '{next(n for n in extra if n.endswith('qk_bias'))}': q/k "
                                    f"biases in a retrofitted block without norm_3 / norm_4 (no published retrofit "
                                    f"has them; edgeloop does not implement them)")
        if missing:
            raise HuginnImportError(f"{folder}: tensor '{missing[0]}' is missing ({len(missing)} missing in all)")
        if extra:
            raise HuginnImportError(f"{folder}: unexpected tensor '{extra[0]}' ({len(extra)} unexpected in all)")
        header = {}
        for theirs, outs in names.items():
            dtype, shape = st.dtype(theirs), st.header[theirs][1]
            if shape != shapes[theirs]:
                raise HuginnImportError(f"{folder}: tensor '{theirs}' has shape {shape}; config.json says "
                                        f"{shapes[theirs]}")
            for mine, take in outs:
                header[mine] = (dtype, tuple(pieces(torch.empty(shape, device="meta"), take).shape))
        files, tok = {}, None
        for f in COPIED:
            if (folder / f).is_file():
                files[f] = (folder / f).read_bytes()
        if "tokenizer.json" in files:
            tok = folder / "tokenizer.json"
            n = tokenizer_vocab(tok, HuginnImportError)
            if n > cfg.vocab_size:
                raise HuginnImportError(f"{tok}: the tokenizer has {n} tokens; the model's vocab_size is {cfg.vocab_size}")
        dtypes = sorted({str(dt).removeprefix("torch.") for dt, _ in header.values()})
        files["README.md"] = self.card(folder, cfg, dtypes)
        summary = {"mean_recurrence": cfg.num_loops, "max_loops": cfg.loop_limit, "source_dtypes": dtypes,
                   "stored_dtype": "/".join(dtypes), "shards": len(st.names_in), "ignored": ignored,
                   "tokenizer": str(tok) if tok else None, "vocab_size": cfg.vocab_size,
                   "hc": cfg.hc, "injection": cfg.injection, "block": cfg.block}

        def stream():
            for theirs, t in st.stream(set(names)):
                for mine, take in names[theirs]:
                    yield mine, pieces(t, take)

        return Source(cfg, header, stream, files, summary)

    @staticmethod
    def card(folder: Path, cfg: HyperloopConfig, dtypes: list[str]) -> str:
        """README.md of the imported folder: Huginn-0125's rows, or a retrofit's (raven.card_rows)."""
        if cfg.block == "sandwich":
            what, tags = "Huginn-0125, arXiv 2502.05171; reference code seal-rg/recurrent-pretraining", ["huginn"]
            rows = [("layout", f"prelude {cfg.n_begin} → core {cfg.n_middle} × num_steps (mean {cfg.num_loops}, up "
                               f"to {cfg.loop_limit}) → coda {cfg.n_end}"),
                    ("width", f"d = {cfg.d_model}, {cfg.n_heads} heads (MHA), gated SiLU MLP {cfg.mlp_hidden}"),
                    ("vocabulary / context", f"{cfg.vocab_size} / {cfg.max_seq_len}, rotary base {cfg.rope_theta:g} "
                                             f"(interleaved pairs)"),
                    ("state", "zeros by default (export --init-state random for the reference's random start)"),
                    ("KV cache", "shared across steps by default (compress-s4); export --kv-policy per-step for one "
                                 "slot per step")]
            licence = "Apache-2.0 for Huginn-0125"
        else:
            what, rows = card_rows(cfg)
            tags, licence = ["huginn", "retrofitted-recurrence"], "and its base model's"
        return card(f"{folder.resolve().name}, imported", (
            f"Imported by `edgeloop import` from the Hugging Face `huginn_raven` folder `{folder.resolve()}` "
            f"({what}). Weights only, unchanged ({'/'.join(dtypes)}); Wqkv and fc are stored as their q/k/v and "
            f"gate/up rows" + (", qk_bias as the q and k biases" if cfg.qk_bias else "") +
            f". Their licence is the source's ({licence})."), rows, tags + ["recurrent-depth"])
