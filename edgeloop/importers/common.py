"""What every importer shares: the protocol, safe loading, sharded safetensors, the streamed writer of the
edgeloop checkpoint folder, tokenizer files and the temporary checkpoint.

An importer (one module per foreign format) says three things about a folder:
    detect(folder) -> bool            is it mine (cheap: file names and config.json fields only)
    read(folder, **options) -> Source  its HyperloopConfig, the output header (edgeloop name -> dtype,
                                       shape), a stream of (edgeloop name, tensor), extra files, a summary
Everything is validated in read(), before anything is written; `write_checkpoint` then streams the
tensors into the output's model.safetensors (never more than the tensors of one input file alive
besides the one being written) and checks each against the header and for NaN/Inf on the way.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from edgeloop.io import atomic_dir, cause, check_output_dir, write_json
from edgeloop.model.config import HyperloopConfig
from edgeloop.tensors import Header, write_safetensors

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class ImporterError(ValueError):
    """A foreign checkpoint folder is missing, unsafe, inconsistent or not supported (one line)."""


@dataclass
class Source:
    """What read() found: the edgeloop config and how to stream the tensors under edgeloop names."""
    config: HyperloopConfig
    header: Header  # edgeloop name -> (stored dtype, shape) of every output tensor
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]  # (edgeloop name, tensor in any float dtype)
    files: dict[str, str | bytes] = field(default_factory=dict)  # tokenizer files, README.md (the card)
    summary: dict = field(default_factory=dict)  # importer-specific figures for the CLI's --json


class Importer:
    """One foreign format. Subclasses set name, error (their ImporterError subclass) and options."""
    name = ""
    title = ""  # one line for `edgeloop import --help`
    error: type[ImporterError] = ImporterError
    options: tuple[str, ...] = ()  # keyword options read() accepts (e.g. step, tokenizer)

    def detect(self, folder: Path) -> bool:
        raise NotImplementedError

    def read(self, folder: Path, **options) -> Source:
        raise NotImplementedError


class HFImporter(Importer):
    """A Hugging Face folder recognised by its config.json's model_type."""
    model_type = ""

    def detect(self, folder: Path) -> bool:
        try:
            return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type") == self.model_type
        except (OSError, ValueError, AttributeError):
            return False


# ---- the registry -------------------------------------------------------------------------------
IMPORTERS: dict[str, Importer] = {}


def register(cls: type[Importer]) -> type[Importer]:
    """Class decorator: one instance of each importer serves every call."""
    IMPORTERS[cls.name] = cls()
    return cls


def detect(path: str | os.PathLike) -> Importer | None:
    """The importer whose format the folder is in (None: an edgeloop folder, or nothing known)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    return next((imp for imp in IMPORTERS.values() if imp.detect(folder)), None)


def import_folder(src: str | os.PathLike, out: str | os.PathLike, fmt: str | None = None, overwrite: bool = False,
                  **options) -> dict:
    """Convert a foreign checkpoint folder into an edgeloop checkpoint folder (atomically); a summary dict.
    `fmt` names the importer (default: detected); options go to its read()."""
    folder, out = Path(src), Path(out)
    if fmt is None:
        imp = detect(folder)
        if imp is None:
            known = ", ".join(IMPORTERS)
            raise ImporterError(f"{folder}: no such folder" if not folder.is_dir() else
                                f"{folder}: not a checkpoint format edgeloop imports (known: {known})")
    elif fmt not in IMPORTERS:
        raise ImporterError(f"--format {fmt!r}: one of {', '.join(IMPORTERS)}")
    else:
        imp = IMPORTERS[fmt]
    bad = sorted(k for k, v in options.items() if v is not None and k not in imp.options)
    if bad:
        raise imp.error(f"--{bad[0].replace('_', '-')}: not an option of the {imp.name} importer")
    check_output_dir(out, overwrite)
    if folder.is_dir() and out.resolve() == folder.resolve():
        raise imp.error(f"{out}: the output folder must differ from the checkpoint folder")
    source = imp.read(folder, **{k: v for k, v in options.items() if v is not None})
    write_checkpoint(source, out, overwrite, imp.error)
    params = sum(_numel(s) for _, s in source.header.values())
    return {"format": imp.name, "source": str(folder), "output": str(out), "tensors": len(source.header),
            "params": params, "config": source.config.to_dict(), **source.summary}


def write_checkpoint(source: Source, out: Path, overwrite: bool, err: type[ImporterError] = ImporterError) -> Path:
    """config.json, model.safetensors (streamed from source.tensors, checked on the way) and the extra files."""
    from edgeloop.model.checkpoint import expected_tensors

    want = expected_tensors(source.config)
    missing, extra = sorted(set(want) - set(source.header)), sorted(set(source.header) - set(want))
    if missing or extra:  # an importer's own checks name the source tensor; this is the backstop
        raise err(f"internal: the import lacks '{missing[0]}'" if missing else f"internal: unexpected '{extra[0]}'")
    for name, (_, shape) in source.header.items():
        if tuple(shape) != want[name]:
            raise err(f"internal: '{name}' would be {tuple(shape)}, the config says {want[name]}")

    def checked() -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in source.tensors():
            if not torch.isfinite(t).all():
                raise err(f"tensor '{name}' holds NaN or Inf values")
            yield name, t.to(source.header[name][0]).contiguous()

    with atomic_dir(out, overwrite) as tmp:
        write_json(tmp / "config.json", source.config.to_dict())
        write_safetensors(tmp / "model.safetensors", source.header, checked())
        for name, content in source.files.items():
            (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---- reading foreign files ------------------------------------------------------------------------
def torch_state(path: Path, err: type[ImporterError]) -> dict[str, torch.Tensor]:
    """A torch state dict (name -> tensor) loaded with weights_only=True: a pickle naming any code or object
    other than tensors is refused and never run; memory-mapped when the file allows it."""
    def load(mmap: bool):
        return torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)

    try:
        try:
            sd = load(True)
        except RuntimeError as e:  # a legacy (non-zip) torch.save file cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            sd = load(False)
    except pickle.UnpicklingError as e:
        why = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise err(f"{path}: refused: the pickle references code or objects other than tensors "
                  f"(weights_only load; nothing was run: {why or str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise err(f"{path}: cannot be read as a torch checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise err(f"{path}: expected a state dict (name -> tensor), got {type(sd).__name__}")
    return sd


def read_json(path: Path, err: type[ImporterError], what: str = "") -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise err(f"{path.parent}: {path.name} is missing{what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise err(f"{path}: not valid JSON ({cause(e)})") from None
    if not isinstance(d, dict):
        raise err(f"{path}: expected a JSON object")
    return d


class Safetensors:
    """A Hugging Face weights folder: model.safetensors, or shards listed by model.safetensors.index.json
    (its weight_map: tensor name -> shard file). Headers are read up front (names, dtypes, shapes: no data);
    tensors are read shard by shard, one shard open at a time."""
    INDEX = "model.safetensors.index.json"

    def __init__(self, folder: Path, err: type[ImporterError]):
        from safetensors import SafetensorError, safe_open

        self.folder, self.err = folder, err
        index = folder / self.INDEX
        if index.is_file():
            wm = read_json(index, err).get("weight_map")
            if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
                raise err(f"{index}: no 'weight_map' of tensor name -> shard file")
            self.shard_of = dict(wm)
        elif (folder / "model.safetensors").is_file():
            self.shard_of = None
        else:
            raise err(f"{folder}: neither model.safetensors nor {self.INDEX} (the weights are missing)")
        shards = sorted(set(self.shard_of.values())) if self.shard_of else ["model.safetensors"]
        self.header: dict[str, tuple[str, tuple[int, ...]]] = {}
        self.names_in: dict[str, list[str]] = {}
        for shard in shards:  # every shard the index names exists, before any is read
            if Path(shard).name != shard or not (folder / shard).is_file():
                raise err(f"{index}: names shard '{shard}', which is not in {folder}")
        for shard in shards:
            path = folder / shard
            try:
                with safe_open(str(path), framework="pt") as f:
                    names = list(f.keys())
                    for n in names:
                        sl = f.get_slice(n)
                        self.header[n] = (sl.get_dtype(), tuple(sl.get_shape()))
            except (SafetensorError, OSError, ValueError) as e:
                raise err(f"{path}: corrupt or truncated safetensors ({cause(e)})") from None
            if self.shard_of:  # the index and its shards must agree, both ways
                listed = {n for n, s in self.shard_of.items() if s == shard}
                lost, unlisted = sorted(listed - set(names)), sorted(set(names) - listed)
                if lost:
                    raise err(f"{index}: names tensor '{lost[0]}' in {shard}, which does not hold it")
                if unlisted:
                    raise err(f"{index}: does not name tensor '{unlisted[0]}' that {shard} holds "
                              f"({len(unlisted)} unlisted in all)")
            self.names_in[shard] = names

    def dtype(self, name: str) -> torch.dtype:
        st = self.header[name][0]
        if st not in ST_DTYPES:
            raise self.err(f"{self.folder}: tensor '{name}' is {st}; expected F32, F16 or BF16")
        return ST_DTYPES[st]

    def stream(self, want: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) shard by shard (`want`: only these names); each shard's map is closed before the next."""
        from safetensors import SafetensorError, safe_open

        for shard, names in self.names_in.items():
            path = self.folder / shard
            with safe_open(str(path), framework="pt") as f:
                for n in names:
                    if want is None or n in want:
                        try:
                            yield n, f.get_tensor(n)
                        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                            raise self.err(f"{path}: tensor '{n}' cannot be read ({cause(e)})") from None


def mapped_header(folder: Path, st: "Safetensors", cfg: HyperloopConfig, names: dict[str, str],
                  err: type[ImporterError], ignored: list[str] = (), why_extra: Callable[[str], str] = lambda n: ""
                  ) -> Header:
    """The output header of a folder whose tensors are exactly `names` (theirs -> edgeloop) besides `ignored`,
    each shaped as `cfg` says; else one line naming the first missing, unexpected or misshapen tensor."""
    from edgeloop.model.checkpoint import expected_tensors

    have = set(st.header) - set(ignored)
    missing, extra = sorted(set(names) - have), sorted(have - set(names))
    if missing:
        raise err(f"{folder}: tensor '{missing[0]}' is missing ({len(missing)} missing in all)")
    if extra:
        raise err(f"{folder}: unexpected tensor '{extra[0]}'{why_extra(extra[0])} ({len(extra)} unexpected in all)")
    want = expected_tensors(cfg)
    header = {}
    for theirs, mine in names.items():
        shape = st.header[theirs][1]
        if shape != want[mine]:
            raise err(f"{folder}: tensor '{theirs}' has shape {shape}; config.json says {want[mine]}")
        header[mine] = (st.dtype(theirs), shape)
    return header


@dataclass
class HFWeights:
    """A Llama-named Hugging Face folder's weights read by the shared steps: the mapped header, the tokenizer
    files with generation_config.json, and the source dtypes."""
    st: "Safetensors"
    names: dict[str, str]
    ignored: list[str]
    header: Header
    files: dict[str, bytes]
    tokenizer: Path | None
    dtypes: list[str]

    def stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(edgeloop name, tensor), shard by shard."""
        for theirs, t in self.st.stream(set(self.names)):
            yield self.names[theirs], t


def read_hf_weights(folder: Path, raw: dict, cfg: HyperloopConfig, names: dict[str, str], err: type[ImporterError],
                    copied: tuple[str, ...], chat_end: str | None, bias_why: str) -> HFWeights:
    """The steps every Llama-named importer shares: safetensors headers mapped by `names` (a baked rotary
    inv_freq and a tied model's lm_head copy ignored; an unexpected bias named with `bias_why`), the tokenizer
    files and generation_config.json."""
    st = Safetensors(folder, err)
    ignored = sorted(n for n in st.header if n.endswith("rotary_emb.inv_freq")
                     or (cfg.tie_embeddings and n == "lm_head.weight"))
    header = mapped_header(folder, st, cfg, names, err, ignored, lambda n: bias_why if n.endswith(".bias") else "")
    files, tok = tokenizer_files(folder, cfg, err, copied)
    files["generation_config.json"] = generation_config(folder, raw, tok, err, chat_end)
    dtypes = sorted({str(dt).removeprefix("torch.") for dt, _ in header.values()})
    return HFWeights(st, names, ignored, header, files, tok, dtypes)


def tokenizer_files(folder: Path, cfg: HyperloopConfig, err: type[ImporterError], names: tuple[str, ...]
                    ) -> tuple[dict[str, bytes], Path | None]:
    """The tokenizer files among `names` that the folder has, and its tokenizer.json (checked: it loads and
    has no more tokens than the model's vocabulary). tokenizer_config.json is optional in transformers (a
    fast tokenizer with defaults): where only tokenizer.json is there, the import writes that default."""
    files = {f: (folder / f).read_bytes() for f in names if (folder / f).is_file()}
    tok = folder / "tokenizer.json" if "tokenizer.json" in files else None
    if tok is not None:
        n = tokenizer_vocab(tok, err)
        if n > cfg.vocab_size:
            raise err(f"{tok}: the tokenizer has {n} tokens; the model's vocab_size is {cfg.vocab_size}")
        if "tokenizer_config.json" in names and "tokenizer_config.json" not in files:
            files["tokenizer_config.json"] = (json.dumps(
                {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len,
                 "clean_up_tokenization_spaces": False}, indent=2) + "\n").encode()
    return files, tok


# ---- tokenizer files and the card -----------------------------------------------------------------
def tokenizer_vocab(path: Path, err: type[ImporterError]) -> int:
    """Tokens (with added ones) of a tokenizer.json, which must load."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise err(f"{path}: cannot be read as a tokenizer ({str(e).splitlines()[0]})") from None


def generation_config(folder: Path, raw: dict, tokenizer: Path | None, err: type[ImporterError],
                      chat_end: str | None = None) -> bytes:
    """generation_config.json for the edgeloop folder: the source's (or config.json's bos / eos / pad), with
    the tokenizer's `chat_end` token (a chat turn's end) added to the eos tokens where it has one."""
    src = folder / "generation_config.json"
    gen = read_json(src, err) if src.is_file() else \
        {k: raw[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if raw.get(k) is not None}
    eos = gen.get("eos_token_id")
    eos = [] if eos is None else list(eos) if isinstance(eos, list) else [eos]
    if tokenizer is not None and chat_end:
        from tokenizers import Tokenizer

        end = Tokenizer.from_file(str(tokenizer)).token_to_id(chat_end)
        if end is not None and end not in eos:
            eos.append(end)
    if eos:
        gen["eos_token_id"] = eos
    return (json.dumps(gen, indent=2) + "\n").encode()


def card(title: str, source_line: str, rows: list[tuple[str, str]], tags: list[str]) -> str:
    """README.md of an imported folder: front matter, where it came from, a field table."""
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""---
library_name: edgeloop
tags: [looped-transformer, imported, {', '.join(tags)}]
---
# {title}

{source_line}

| field | value |
|---|---|
{table}
"""


# ---- foreign folders where an edgeloop checkpoint is expected ---------------------------------------
def as_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """`path` itself unless it is a foreign folder; then import it (default options) into `out_dir`."""
    imp = detect(path)
    if imp is None:
        return Path(path)
    import_folder(path, out_dir, imp.name, overwrite=overwrite)
    return Path(out_dir)


@contextlib.contextmanager
def temporary_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike,
                         overwrite: bool = False) -> Iterator[Path]:
    """`path` itself, or (a foreign folder) its import into a temporary folder beside `out_dir`, removed on
    exit. `out_dir` is checked first, so a refused output costs no import."""
    if detect(path) is None:
        yield Path(path)
        return
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.import-", dir=out.parent))
    try:
        yield as_checkpoint(path, work / Path(path).resolve().name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
