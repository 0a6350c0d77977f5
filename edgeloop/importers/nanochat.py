"""The looped-lm-scaling (nanochat) importer: checkpoint folders of kschwethelm/looped-lm-scaling.

    import_nanochat(ckpt_dir, out_dir, step=None, tokenizer=None, overwrite=False) -> summary dict
    (= edgeloop.importers.import_folder(ckpt_dir, out_dir, "nanochat", step=..., tokenizer=...))

Input: `model_<step>.pt` (a torch state dict; loaded with weights_only=True only, so a pickle that tries
to run code is refused, never executed) + `meta_<step>.json` (its `model_config`), the latest step by
default, and a Hugging Face `tokenizer.json` beside it or given. Output: config.json, model.safetensors
(float32), tokenizer files when there is a tokenizer, README.md. The model maps onto HyperloopConfig:
hyperconnect -> hc="static" lanes (collapse "sum"); the other modes -> hc="none" with an injection.
Every bad input is one NanochatImportError line naming what is wrong, raised before anything is written.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from edgeloop.importers.common import (FLOATS, Importer, ImporterError, Source, as_checkpoint, card,
                                       import_folder, read_json, register, temporary_checkpoint, tokenizer_vocab,
                                       torch_state)
from edgeloop.model.config import ConfigError, HyperloopConfig

__all__ = ["NanochatImportError", "as_checkpoint", "import_nanochat", "is_nanochat", "temporary_checkpoint"]

# GPTConfig defaults of looped-lm-scaling: its loader fills keys that an older meta file lacks with these
DEFAULTS: dict[str, Any] = {
    "sequence_len": 2048, "vocab_size": 32001, "size": 20, "n_head": 10, "n_kv_head": 10, "n_embd": 1280,
    "n_prelude": 2, "n_recur_block": 4, "n_coda": 2, "num_recur": 4, "bptt_k": 4,
    "input_injection": "inject_init_prelude", "num_lanes": 2, "logit_softcap": 15.0,
}
DEPRECATED = ("recur_warm_start", "sandwich_norm", "train_recur_mean", "train_recur_max")  # dropped by its loader
INJECTION = {"inject_init_prelude": "inject", "passthrough": "passthrough", "additive": "additive",
             "hyperconnect": None}
SECTIONS = {"prelude": ("begin", "n_prelude"), "recur": ("middle", "n_recur_block"), "coda": ("end", "n_coda")}
BLOCK_KEYS = {"attn.c_q.weight": "attn.c_q.weight", "attn.c_k.weight": "attn.c_k.weight",
              "attn.c_v.weight": "attn.c_v.weight", "attn.c_proj.weight": "attn.c_proj.weight",
              "mlp.c_fc.weight": "mlp.c_fc.weight", "mlp.c_proj.weight": "mlp.c_proj.weight",
              "n1.weight": "norm1.weight", "n3.weight": "norm2.weight"}
PADDED = ("transformer.wte.weight", "lm_head.weight")  # vocab rows padded up; pad rows are dropped
PREFIX = "_orig_mod."  # torch.compile's wrapper prefix
MODEL_RE = re.compile(r"^model_(.+)\.pt$")


class NanochatImportError(ImporterError):
    """The nanochat checkpoint folder is missing, unsafe or inconsistent (message names the part)."""


# ---- the folder ---------------------------------------------------------------------------------------
def checkpoint_steps(folder: str | os.PathLike) -> dict[str, Path]:
    """Infix -> model file for every `model_<infix>.pt` in `folder` (infix: zero-padded step or an alias)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {m.group(1): p for p in folder.iterdir() if (m := MODEL_RE.match(p.name)) and p.is_file()}


def is_nanochat(path: str | os.PathLike) -> bool:
    """True for a folder holding `model_<step>.pt` files and no edgeloop config.json."""
    folder = Path(path)
    return folder.is_dir() and not (folder / "config.json").exists() and bool(checkpoint_steps(folder))


def resolve_step(folder: Path, step: int | str | None) -> tuple[str, Path, Path]:
    """(infix, model file, meta file) of `step` (an int, digits or an alias), or of the latest numbered step."""
    if not folder.is_dir():
        raise NanochatImportError(f"{folder}: no such folder")
    found = checkpoint_steps(folder)
    numbered = {int(k): k for k in found if k.isdigit()}
    if not found:
        raise NanochatImportError(f"{folder}: no model_<step>.pt checkpoint in this folder")
    if step is None:
        if not numbered:
            raise NanochatImportError(f"{folder}: no numbered model_<step>.pt (found {', '.join(sorted(found))})")
        infix = numbered[max(numbered)]
    elif isinstance(step, int) or str(step).isdigit():
        infix = numbered.get(int(step))
        if infix is None:
            have = ", ".join(str(s) for s in sorted(numbered)) or "none"
            raise NanochatImportError(f"{folder}: no checkpoint for step {int(step)} (steps: {have})")
    else:
        infix = str(step)
        if infix not in found:
            raise NanochatImportError(f"{folder}: no model_{infix}.pt (found {', '.join(sorted(found))})")
    meta = folder / f"meta_{infix}.json"
    if not meta.is_file():
        raise NanochatImportError(f"{folder}: meta_{infix}.json is missing (it holds the model_config)")
    return infix, found[infix], meta


# ---- meta_<step>.json -> HyperloopConfig ------------------------------------------------------------
def read_meta(path: Path) -> tuple[dict, dict]:
    """(meta, model_config with the loader's migrations and defaults applied), validated field by field."""
    meta = read_json(path, NanochatImportError)
    if not isinstance(meta.get("model_config"), dict):
        raise NanochatImportError(f"{path}: no 'model_config' object (not a looped-lm-scaling meta file)")
    mc = dict(meta["model_config"])
    if "train_recur_mean" in mc and "num_recur" not in mc:  # renamed key of older checkpoints
        mc["num_recur"] = mc["train_recur_mean"]
        if isinstance(mc["num_recur"], float) and mc["num_recur"].is_integer():
            mc["num_recur"] = int(mc["num_recur"])
    for key in DEPRECATED:
        mc.pop(key, None)
    unknown = sorted(set(mc) - set(DEFAULTS))
    if unknown:
        raise NanochatImportError(f"{path}: model_config key '{unknown[0]}' is unknown to this importer")
    mc = {**DEFAULTS, **mc}

    def bad(key: str, why: str) -> NanochatImportError:
        return NanochatImportError(f"{path}: model_config '{key}' = {mc[key]!r}: {why}")

    for key in ("sequence_len", "vocab_size", "n_head", "n_kv_head", "n_embd", "n_recur_block", "num_recur",
                "num_lanes", "n_prelude", "n_coda"):
        v, low = mc[key], 0 if key in ("n_prelude", "n_coda") else 1
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise bad(key, "must be an integer ≥ %d" % low)
    if mc["input_injection"] not in INJECTION:
        raise bad("input_injection", f"unknown injection mode (known: {', '.join(INJECTION)})")
    if mc["input_injection"] == "hyperconnect" and mc["num_lanes"] < 2:
        raise bad("num_lanes", "hyperconnect needs at least 2 lanes")
    sc = mc["logit_softcap"]
    if not isinstance(sc, (int, float)) or isinstance(sc, bool) or not math.isfinite(sc) or sc <= 0:
        raise bad("logit_softcap", "must be a positive number (the forward divides by it)")
    if mc["n_embd"] % mc["n_head"] or (mc["n_embd"] // mc["n_head"]) % 2:
        raise bad("n_head", f"must divide n_embd={mc['n_embd']} into an even head_dim")
    if mc["n_kv_head"] > mc["n_head"] or mc["n_head"] % mc["n_kv_head"]:
        raise bad("n_kv_head", f"must divide n_head={mc['n_head']}")
    return meta, mc


def to_config(mc: dict, provenance: dict) -> HyperloopConfig:
    """The HyperloopConfig computing exactly the nanochat GPT's forward for model_config `mc`."""
    hc = mc["input_injection"] == "hyperconnect"
    cfg = HyperloopConfig(
        vocab_size=mc["vocab_size"], d_model=mc["n_embd"], n_heads=mc["n_head"], n_kv_heads=mc["n_kv_head"],
        n_begin=mc["n_prelude"], n_middle=mc["n_recur_block"], n_end=mc["n_coda"], num_loops=mc["num_recur"],
        hc="static" if hc else "none", n_streams=mc["num_lanes"] if hc else 1,
        injection="passthrough" if hc else INJECTION[mc["input_injection"]], collapse="sum",
        middle_norm=True, loop_embedding=False, mlp="relu2", mlp_hidden=4 * mc["n_embd"], qk_norm=True,
        embed_norm=True, logit_softcap=float(mc["logit_softcap"]), tie_embeddings=False, rope_theta=10000.0,
        rope_bf16=True, norm_eps=1e-6, max_seq_len=mc["sequence_len"], extra={"imported_from": provenance})
    try:
        return cfg.validate()
    except ConfigError as e:
        raise NanochatImportError(f"model_config does not map onto edgeloop: {e}") from None


# ---- model_<step>.pt -> edgeloop tensors ------------------------------------------------------------
def load_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of `path` (weights_only=True: a pickle naming any code is refused), `_orig_mod.` dropped."""
    out: dict[str, torch.Tensor] = {}
    for k, v in torch_state(path, NanochatImportError).items():
        name = k.removeprefix(PREFIX)
        if name in out:
            raise NanochatImportError(f"{path}: tensor '{name}' is stored twice (with and without {PREFIX})")
        out[name] = v
    return out


def key_map(mc: dict) -> dict[str, str]:
    """nanochat tensor name -> edgeloop tensor name, for every tensor a checkpoint of `mc` holds."""
    m = {"transformer.wte.weight": "embed.weight", "norm_emb.weight": "embed_norm.weight",
         "norm_recur.weight": "middle_norm.weight", "norm_final.weight": "final_norm.weight",
         "lm_head.weight": "lm_head.weight"}
    for section, (ours, count) in SECTIONS.items():
        for i in range(mc[count]):
            for theirs, mine in BLOCK_KEYS.items():
                m[f"transformer.{section}.{i}.{theirs}"] = f"{ours}.{i}.{mine}"
    if mc["input_injection"] == "inject_init_prelude":
        m["inject.weight"] = "inject.weight"
    if mc["input_injection"] == "hyperconnect":
        m.update({f"lane_{p}": f"hc.lane_{p}" for p in ("alpha", "mixing", "beta")})
    return m


def check_state(sd: dict[str, torch.Tensor], mc: dict, cfg: HyperloopConfig, path: Path
                ) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The output header (edgeloop name -> float32, shape; pad rows dropped) once every source tensor's
    name, dtype and shape is checked against the model config."""
    from edgeloop.model.checkpoint import expected_tensors

    names = key_map(mc)
    missing, extra = sorted(set(names) - set(sd)), sorted(set(sd) - set(names))
    if missing:
        raise NanochatImportError(f"{path}: tensor '{missing[0]}' is missing ({len(missing)} missing in all; "
                                  f"input_injection={mc['input_injection']})")
    if extra:
        raise NanochatImportError(f"{path}: unexpected tensor '{extra[0]}' ({len(extra)} unexpected in all; "
                                  f"input_injection={mc['input_injection']})")
    want = expected_tensors(cfg)
    header = {}
    for theirs, mine in names.items():
        t = sd[theirs]
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOATS:
            what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise NanochatImportError(f"{path}: '{theirs}' is {what}; expected a float32/bfloat16/float16 tensor")
        shape = tuple(t.shape)
        if theirs in PADDED:
            if len(shape) != 2 or shape[1] != cfg.d_model or shape[0] < cfg.vocab_size:
                raise NanochatImportError(f"{path}: '{theirs}' has shape {shape}; model_config says "
                                          f"(≥{cfg.vocab_size}, {cfg.d_model}) (vocab_size rows, padded)")
        elif shape != want[mine]:
            raise NanochatImportError(f"{path}: '{theirs}' has shape {shape}; model_config says {want[mine]}")
        header[mine] = (torch.float32, want[mine])
    return header


def stream(sd: dict[str, torch.Tensor], mc: dict, cfg: HyperloopConfig, path: Path):
    """(edgeloop name, tensor) for every checked source tensor, pad rows dropped (bf16 widens exactly)."""
    for theirs, mine in key_map(mc).items():
        t = sd[theirs][: cfg.vocab_size] if theirs in PADDED else sd[theirs]
        if not torch.isfinite(t).all():
            raise NanochatImportError(f"{path}: '{theirs}' holds NaN or Inf values")
        yield mine, t


# ---- tokenizer, card --------------------------------------------------------------------------------
def find_tokenizer(folder: Path, tokenizer: str | os.PathLike | None, vocab_size: int) -> Path | None:
    """The tokenizer.json to copy (given, or beside the checkpoint), checked readable and within vocab_size."""
    if tokenizer is None:
        f = folder / "tokenizer.json"
        if not f.is_file():
            return None
    else:
        f = Path(tokenizer)
        f = f / "tokenizer.json" if f.is_dir() else f
        if not f.is_file():
            raise NanochatImportError(f"--tokenizer {tokenizer}: no such tokenizer.json file")
    n = tokenizer_vocab(f, NanochatImportError)
    if n > vocab_size:
        raise NanochatImportError(f"{f}: the tokenizer has {n} tokens; the model's vocab_size is {vocab_size}")
    return f


def tokenizer_config(f: Path, max_len: int) -> dict:
    """tokenizer_config.json (Hugging Face convention): Llama-2 <s>/</s> when present (what nanochat uses)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(f))

    def first(*cands):
        return next((c for c in cands if tok.token_to_id(c) is not None), None)

    bos, eos = first("<s>", "<|bos|>", "<|endoftext|>"), first("</s>", "<|endoftext|>", "<|assistant_end|>")
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
            "unk_token": first("<unk>"), "pad_token": eos, "model_max_length": max_len,
            "clean_up_tokenization_spaces": False}


def model_card(cfg: HyperloopConfig, prov: dict, params: int) -> str:
    mode = prov["model_config"]["input_injection"]
    hc = (f"static lanes, n = {cfg.n_streams} (hyperconnect), collapse sum" if cfg.hc == "static"
          else f"none, injection = {cfg.injection} ({mode})")
    return card(f"{Path(prov['source']).name} (step {prov['step']}), imported",
                f"Imported by `edgeloop import-nanochat` from the looped-lm-scaling (nanochat) checkpoint\n"
                f"`{prov['source']}/{prov['model_file']}` + `{prov['meta_file']}` (format of\n"
                f"https://github.com/kschwethelm/looped-lm-scaling). The weights are the source's, unchanged "
                f"(stored float32;\nbf16 tensors widened exactly); their licence is the source's.", [
                    ("layout", f"prelude {cfg.n_begin} → recur {cfg.n_middle} × {cfg.num_loops} → coda {cfg.n_end}"),
                    ("hyper-connections", hc),
                    ("width", f"d = {cfg.d_model}, {cfg.n_heads} heads, {cfg.n_kv_heads} KV heads, relu² MLP "
                              f"{cfg.mlp_hidden}"),
                    ("vocabulary", f"{cfg.vocab_size} (source rows {prov['padded_vocab']}, pad rows dropped)"),
                    ("logit soft-cap", f"{cfg.logit_softcap:g}"),
                    ("context", f"{cfg.max_seq_len} (training sequence_len); rotary θ 10000, bf16 tables"),
                    ("parameters", f"{params:,}"),
                    ("source step / tokens / val loss", f"{prov['step']} / {prov.get('tokens')} / {prov.get('val_loss')}")],
                ["looped-lm-scaling"])


# ---- the importer ------------------------------------------------------------------------------------
@register
class Nanochat(Importer):
    name = "nanochat"
    title = "looped-lm-scaling (nanochat): model_<step>.pt + meta_<step>.json"
    error = NanochatImportError
    options = ("step", "tokenizer")

    def detect(self, folder: Path) -> bool:
        return is_nanochat(folder)

    def read(self, folder: Path, step: int | str | None = None, tokenizer: str | os.PathLike | None = None) -> Source:
        infix, model_file, meta_file = resolve_step(folder, step)
        meta, mc = read_meta(meta_file)
        tok = find_tokenizer(folder, tokenizer, mc["vocab_size"])
        sd = load_state(model_file)
        padded = sd["transformer.wte.weight"].shape[0] \
            if isinstance(sd.get("transformer.wte.weight"), torch.Tensor) else None
        prov = {"format": "looped-lm-scaling (nanochat)", "source": str(folder.resolve()),
                "model_file": model_file.name, "meta_file": meta_file.name,
                "step": meta.get("step", int(infix) if infix.isdigit() else infix), "tokens": meta.get("tokens"),
                "val_loss": meta.get("val_loss"), "model_config": meta["model_config"], "padded_vocab": padded}
        cfg = to_config(mc, prov)
        header = check_state(sd, mc, cfg, model_file)
        params = sum(math.prod(s) for _, s in header.values())
        files = {"README.md": model_card(cfg, prov, params)}
        if tok is not None:
            files["tokenizer.json"] = tok.read_bytes()
            files["tokenizer_config.json"] = json.dumps(tokenizer_config(tok, cfg.max_seq_len), indent=2) + "\n"
        dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in sd.values() if isinstance(v, torch.Tensor)})
        summary = {"step": prov["step"], "model_file": model_file.name, "input_injection": mc["input_injection"],
                   "hc": cfg.hc, "injection": cfg.injection, "n_streams": cfg.n_streams, "source_dtypes": dtypes,
                   "stored_dtype": "float32", "vocab_size": cfg.vocab_size, "padded_vocab": padded,
                   "tokenizer": str(tok) if tok is not None else None}
        return Source(cfg, header, lambda: stream(sd, mc, cfg, model_file), files, summary)


def import_nanochat(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, step: int | str | None = None,
                    tokenizer: str | os.PathLike | None = None, overwrite: bool = False) -> dict:
    """Convert a nanochat checkpoint folder into an edgeloop checkpoint folder (atomically); a summary dict."""
    if not Path(ckpt_dir).is_dir():
        raise NanochatImportError(f"{ckpt_dir}: no such folder")
    return import_folder(ckpt_dir, out_dir, "nanochat", overwrite=overwrite, step=step, tokenizer=tokenizer)
