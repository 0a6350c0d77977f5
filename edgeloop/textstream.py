"""Streaming decoded text as tokens arrive (the CLI's `generate` for checkpoints and exports alike)."""
from __future__ import annotations

from typing import Callable


class TextStream:
    """push(token) decodes every token so far and writes only the text not yet written; a multi-byte
    UTF-8 character split across tokens waits for its last token (no U+FFFD on the screen)."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write = tokenizer, write
        self.tokens: list[int] = []
        self.shown = ""

    def push(self, token: int) -> None:
        self.tokens.append(int(token))
        text = self.tokenizer.decode(self.tokens)
        if not text.endswith("\ufffd"):
            self.write(text[len(self.shown):])
            self.shown = text
