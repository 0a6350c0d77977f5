"""Checkpoint folders in the Hugging Face layout: config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, README.md. Loading validates everything and names what is wrong."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from edgeloop.io import JSONFileError, atomic_dir, cause, read_json_object, write_json
from edgeloop.model.config import ConfigError, HyperloopConfig
from edgeloop.model.model import Hyperloop, meta_model

ST_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}  # safetensors names
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
GENERATION_FILES = ("generation_config.json", "special_tokens_map.json")  # copied along where present


class CheckpointError(ValueError):
    """The checkpoint folder is missing, corrupt or disagrees with its config (message names the part)."""


def read_config(path: str | os.PathLike) -> dict:
    """config.json of a checkpoint folder as a dict (the quantize stage reads quantization_config from it)."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    cfile = folder / "config.json"
    if not cfile.is_file():
        raise CheckpointError(f"{folder}: config.json is missing (not a checkpoint folder)")
    try:
        return read_json_object(cfile)
    except JSONFileError as e:
        raise CheckpointError(str(e)) from None


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
        raise CheckpointError(f"{path}: corrupt or truncated safetensors ({cause(e)})") from None


def read_tensor(f, name: str, path: Path) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: tensor '{name}' cannot be read ({cause(e)})") from None


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise CheckpointError(f"tensor '{name}' holds NaN or Inf values")


Header = dict[str, tuple[str, tuple[int, ...]]]  # name -> (safetensors dtype "F32", "U8", ..., shape)


def read_header(st: Path) -> Header:
    """Name -> (dtype, shape) of every tensor of a safetensors file, from its header (no tensor data is read;
    safetensors itself refuses a header whose offsets do not tile the file)."""
    with open_safetensors(st) as f:
        out = {}
        for name in f.keys():
            sl = f.get_slice(name)
            out[name] = (sl.get_dtype(), tuple(sl.get_shape()))
        return out


def key_problems(st: Path, want: set[str], have: set[str]) -> list[str]:
    """One line per expected tensor the file lacks and per tensor it should not hold."""
    return ([f"{st}: tensor '{n}' is missing" for n in sorted(want - have)] +
            [f"{st}: unexpected tensor '{n}'" for n in sorted(have - want)])


def float_problems(st: Path, header: Header, cfg: HyperloopConfig) -> list[str]:
    """Every way the header of `st` is not a float checkpoint of `cfg` (names, shapes, dtypes), one line each."""
    want = expected_tensors(cfg)
    out = key_problems(st, set(want), set(header))
    for name, shape in want.items():
        if name in header and header[name][1] != shape:
            out.append(f"tensor '{name}' has shape {header[name][1]}, config says {shape}")
        elif name in header and header[name][0] not in ST_FLOATS:
            out.append(f"tensor '{name}' has dtype {header[name][0]}; expected F32, F16 or BF16")
    return out


def first_problem(problems: list[str]) -> None:
    """Raise the first of `problems` (saying how many more there are) as a CheckpointError."""
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise CheckpointError(problems[0] + more)


def config_problems(path: str | os.PathLike) -> tuple[dict, HyperloopConfig | None, list[str]]:
    """(config.json as a dict, the validated config or None, what is wrong with it); a folder without a
    readable config.json raises (there is nothing to report on)."""
    raw = read_config(path)
    try:
        return raw, load_config(path), []
    except CheckpointError as e:
        return raw, None, [str(e)]


def check_float_header(path: str | os.PathLike, cfg: HyperloopConfig) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """(dtype, shape) of every tensor of a float checkpoint folder of `cfg`, checked from the header alone:
    names, shapes and dtypes agree with the config before any tensor is read."""
    st = Path(path) / "model.safetensors"
    header = read_header(st)
    first_problem(float_problems(st, header, cfg))
    return {n: (ST_FLOATS[dt], shape) for n, (dt, shape) in header.items()}


def load_state(path: str | os.PathLike, cfg: HyperloopConfig) -> dict[str, torch.Tensor]:
    """The validated float state dict of a checkpoint folder (tensors in their stored dtype)."""
    st = Path(path) / "model.safetensors"
    header = check_float_header(path, cfg)
    with open_safetensors(st) as f:
        state = {}
        for name in header:
            t = read_tensor(f, name, st)
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


def load_tokenizer(path: str | os.PathLike, cfg: HyperloopConfig | None = None):
    """The folder's tokenizer.json; with `cfg`, also checked to fit the model (every id below vocab_size)."""
    from tokenizers import Tokenizer

    f = Path(path) / "tokenizer.json"
    if not f.is_file():
        raise CheckpointError(f"{path}: tokenizer.json is missing")
    try:
        tok = Tokenizer.from_file(str(f))
    except BaseException as e:  # tokenizers raises a bare Exception on bad JSON (a pyo3 PanicException on worse)
        if isinstance(e, (KeyboardInterrupt, SystemExit, MemoryError)):
            raise
        raise CheckpointError(f"{f}: cannot be read as a tokenizer ({first_line(e)})") from None
    n = tok.get_vocab_size(with_added_tokens=True)
    if cfg is not None and n > cfg.vocab_size:
        raise CheckpointError(f"{f}: {n} tokens, more than the model's vocab_size {cfg.vocab_size}")
    return tok


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name where it has none)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def generation_tokens(folder: str | os.PathLike, raw: dict | None = None) -> dict:
    """bos / eos (a list) / pad token ids of a checkpoint folder: its generation_config.json, else config.json's,
    else the tokenizer's <|endoftext|> for all three (edgeloop's own models); 0 when there is nothing to go by.
    A token id that is not an integer in 0..vocab_size-1 is refused, naming the file."""
    folder = Path(folder)
    raw = read_config(folder) if raw is None else raw
    gfile = folder / "generation_config.json"
    try:
        gen = read_json_object(gfile) if gfile.exists() else {}
    except JSONFileError as e:
        raise CheckpointError(str(e)) from None
    pick = {k: gen.get(k, raw.get(k)) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if pick["eos_token_id"] is None and (folder / "tokenizer.json").is_file():
        pick["eos_token_id"] = load_tokenizer(folder).token_to_id("<|endoftext|>")
    vocab = raw.get("vocab_size") if isinstance(raw.get("vocab_size"), int) else None

    def ids(key: str) -> list[int]:
        v = pick[key]
        vals = [] if v is None else v if isinstance(v, list) else [v]
        for x in vals:
            if not isinstance(x, int) or isinstance(x, bool) or x < 0 or vocab is not None and x >= vocab:
                where = gfile if key in gen else folder / "config.json"
                raise CheckpointError(f"{where}: {key} = {v!r}: expected token ids in 0..{(vocab or 0) - 1}")
        return vals

    eos = ids("eos_token_id")
    first = eos[0] if eos else 0
    bos, pad = ids("bos_token_id"), ids("pad_token_id")
    return {"bos_token_id": bos[0] if bos else first, "eos_token_id": eos, "pad_token_id": pad[0] if pad else first}
