"""Checkpoint folders in the Hugging Face layout: config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, README.md. Loading validates everything and names what is wrong."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from edgeloop.io import atomic_dir, write_json
from edgeloop.model.config import ConfigError, HyperloopConfig
from edgeloop.model.model import Hyperloop, meta_model

FLOAT_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
GENERATION_FILES = ("generation_config.json", "special_tokens_map.json")  # copied along where present


class CheckpointError(ValueError):
    """The checkpoint folder is missing, corrupt or disagrees with its config (message names the part)."""


def read_config(path: str | os.PathLike) -> dict:
    """config.json of a checkpoint folder as a dict (the quantize stage reads quantization_config from it)."""
    import json

    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    cfile = folder / "config.json"
    if not cfile.is_file():
        raise CheckpointError(f"{folder}: config.json is missing (not a checkpoint folder)")
    try:
        d = json.loads(cfile.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfile}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{cfile}: expected a JSON object")
    return d


def load_config(path: str | os.PathLike) -> HyperloopConfig:
    try:
        return HyperloopConfig.from_dict(read_config(path))
    except ConfigError as e:
        raise CheckpointError(f"{Path(path) / 'config.json'}: {e}") from None
    except TypeError as e:  # e.g. a field given as the wrong JSON type that dataclass rejects
        raise CheckpointError(f"{Path(path) / 'config.json'}: {e}") from None


def expected_tensors(cfg: HyperloopConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a float checkpoint of `cfg` holds."""
    return {k: tuple(v.shape) for k, v in meta_model(cfg).state_dict().items()}


def open_safetensors(path: Path):
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: model.safetensors is missing")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors ({e})") from None


def read_tensor(f, name: str, path: Path) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: tensor '{name}' cannot be read ({e})") from None


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise CheckpointError(f"tensor '{name}' holds NaN or Inf values")


def check_keys(st: Path, want: set[str], have: set[str]) -> None:
    """The file holds exactly the expected tensor names (the error names the first offender)."""
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing:
        raise CheckpointError(f"{st}: tensor '{missing[0]}' is missing ({len(missing)} missing in all)")
    if unexpected:
        raise CheckpointError(f"{st}: unexpected tensor '{unexpected[0]}' ({len(unexpected)} unexpected in all)")


def load_state(path: str | os.PathLike, cfg: HyperloopConfig) -> dict[str, torch.Tensor]:
    """The validated float state dict of a checkpoint folder (tensors in their stored dtype)."""
    st = Path(path) / "model.safetensors"
    want = expected_tensors(cfg)
    with open_safetensors(st) as f:
        check_keys(st, set(want), set(f.keys()))
        state = {}
        for name in want:
            t = read_tensor(f, name, st)
            if tuple(t.shape) != want[name]:
                raise CheckpointError(f"tensor '{name}' has shape {tuple(t.shape)}, config says {want[name]}")
            if t.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"tensor '{name}' has dtype {t.dtype}; expected float32, float16 or bfloat16")
            check_finite(name, t)
            state[name] = t
    return state


def load_model(path: str | os.PathLike) -> Hyperloop:
    """Load a float checkpoint folder as an fp32 eval model (a quantized folder: edgeloop.quantize.load_checkpoint,
    the stage that owns that format)."""
    raw = read_config(path)
    if "quantization_config" in raw:
        raise CheckpointError(f"{path}: is a quantized checkpoint; load it with edgeloop.quantize.load_checkpoint")
    cfg = load_config(path)
    state = load_state(path, cfg)
    model = meta_model(cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return model.init_buffers().eval()


def save_checkpoint(model: Hyperloop, out: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                    tokenizer_dir: str | os.PathLike | None = None, tokenizer=None, max_len: int | None = None,
                    card: str | None = None, overwrite: bool = False, extra_config: dict | None = None,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write a checkpoint folder atomically. The tokenizer comes from a folder or a `tokenizers.Tokenizer`."""
    from edgeloop.model.data import tokenizer_config

    state = {}
    for k, v in model.state_dict().items():
        check_finite(k, v)
        state[k] = v.detach().to(dtype).contiguous()
    cfg = model.cfg.to_dict()
    cfg.update(extra_config or {})
    with atomic_dir(out, overwrite) as tmp:
        write_json(tmp / "config.json", cfg)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
        elif tokenizer is not None:
            tokenizer.save(str(tmp / "tokenizer.json"))
            write_json(tmp / "tokenizer_config.json", tokenizer_config(max_len or model.cfg.max_seq_len))
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(out)


def load_tokenizer(path: str | os.PathLike):
    from tokenizers import Tokenizer

    f = Path(path) / "tokenizer.json"
    if not f.is_file():
        raise CheckpointError(f"{path}: tokenizer.json is missing")
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise CheckpointError(f"{f}: cannot be read as a tokenizer ({str(e).splitlines()[0]})") from None


def generation_tokens(folder: str | os.PathLike, raw: dict | None = None) -> dict:
    """bos / eos (a list) / pad token ids of a checkpoint folder: its generation_config.json, else config.json's,
    else the tokenizer's <|endoftext|> for all three (edgeloop's own models); 0 when there is nothing to go by."""
    import json

    folder = Path(folder)
    raw = read_config(folder) if raw is None else raw
    gen = {}
    if (folder / "generation_config.json").is_file():
        try:
            gen = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            gen = {}
    pick = {k: gen.get(k, raw.get(k)) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if pick["eos_token_id"] is None and (folder / "tokenizer.json").is_file():
        pick["eos_token_id"] = load_tokenizer(folder).token_to_id("<|endoftext|>")
    eos = pick["eos_token_id"]
    eos = [int(e) for e in eos] if isinstance(eos, list) else [] if eos is None else [int(eos)]
    first = eos[0] if eos else 0
    bos, pad = pick["bos_token_id"], pick["pad_token_id"]
    return {"bos_token_id": first if bos is None else int(bos), "eos_token_id": eos,
            "pad_token_id": first if pad is None else int(pad)}
