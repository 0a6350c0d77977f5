"""Atomic outputs: a folder or file appears whole (temp + rename) or not at all; JSON objects read with
one-line errors."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


class OutputExistsError(FileExistsError):
    pass


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output unless `overwrite` (checked before any work is done)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: output already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `out`; on success it is renamed to `out`, on error it is removed, and so are
    the parent folders this call created (a failed stage leaves the disk as it found it)."""
    out = check_output_dir(out, overwrite)
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        yield tmp
        os.chmod(tmp, 0o755)
        for f in tmp.rglob("*"):  # some writers (safetensors) create 0600 files
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        raise


def _remove_empty(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) while they are empty."""
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            return


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class JSONFileError(ValueError):
    """A JSON file is missing, unreadable, not JSON or not an object (the message names the file)."""


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in the file at `path`; a one-line JSONFileError naming the file otherwise."""
    path = Path(path)
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise JSONFileError(f"{path}: is missing") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0] if str(e) else type(e).__name__
        raise JSONFileError(f"{path}: not valid JSON ({why})") from None
    if not isinstance(d, dict):
        raise JSONFileError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def cause(e: BaseException, limit: int = 160) -> str:
    """A library's error message as one short line: whitespace collapsed, cut at `limit` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()
