"""Parsing of the CLI's option values that typer cannot type: one-line errors, as the CLI reports them."""
from __future__ import annotations

from typing import Optional

import typer


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


# the commands in the order a newcomer needs them: the main job, the stages it chains, measuring, using
COMMAND_ORDER = ("run", "import", "quantize", "export", "eval", "bench", "generate", "serve", "inspect", "train",
                 "import-nanochat")
PANELS = {"run": "Main job", **dict.fromkeys(("import", "quantize", "export"), "Pipeline stages"),
          **dict.fromkeys(("eval", "bench"), "Measure"), **dict.fromkeys(("generate", "serve"), "Use an export"),
          **dict.fromkeys(("inspect", "train", "import-nanochat"), "More")}


def ordered_group():
    """A typer group that lists its commands in COMMAND_ORDER (typer's default: the order they were defined)."""
    from typer.core import TyperGroup

    class Ordered(TyperGroup):
        def list_commands(self, ctx):
            names = super().list_commands(ctx)
            return sorted(names, key=lambda n: COMMAND_ORDER.index(n) if n in COMMAND_ORDER else len(COMMAND_ORDER))

    return Ordered


DRAFT_HELP = "self-speculation: draft at D loops (< num_loops), verify at full depth in one call; 'auto' calibrates"
K_HELP = "with --draft-loops: drafts per verification"
APPROX_HELP = "with --draft-loops: also where verification is not exact (shared KV cache, early exits)"
GRAPH, LOOPS, PARITY = "Graph", "Loops and KV cache", "Parity check"  # export's flags by intent


def opt(panel: str, *args, **kw):
    """typer.Option in a help panel (a command's flags grouped by intent)."""
    return typer.Option(*args, rich_help_panel=panel, **kw)
