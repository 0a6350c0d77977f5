"""Parsing of the CLI's option values that typer cannot type: one-line errors, as the CLI reports them."""
from __future__ import annotations

from typing import Optional


def ints(flag: str, text: Optional[str]) -> Optional[tuple[int, ...]]:
    """'1,4,8' -> (1, 4, 8)."""
    if text is None:
        return None
    try:
        vals = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} {text!r}: comma-separated integers, e.g. 1,4,8") from None
    if not vals or min(vals) < 1:
        raise ValueError(f"{flag} {text!r}: loop counts are at least 1")
    return vals


def draft_loops(text: Optional[str], lookahead: int = 1) -> int | str | None:
    """--draft-loops: an integer, 'auto', or not given (with --lookahead, a positive integer)."""
    if text is not None and lookahead < 1:
        raise ValueError(f"--lookahead {lookahead}: a positive integer (the drafts per verification)")
    if text is None or text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--draft-loops {text!r}: an integer (fewer loops than num_loops) or 'auto'") from None
