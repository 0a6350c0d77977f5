"""Strided evaluation windows, shared by the PyTorch reference and the torch-free runtime (one definition,
so both score exactly the same tokens with the same context)."""
from __future__ import annotations


def windows(n_tokens: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index) per window: every token after the first is scored exactly once,
    with up to ctx - stride tokens of left context. Needs 0 < stride < ctx."""
    if ctx < 2 or not 0 < stride < ctx:
        raise ValueError(f"windows need ctx >= 2 and 0 < stride < ctx (got ctx={ctx}, stride={stride})")
    out: list[tuple[int, int, int]] = []
    begin, scored = 0, 1
    while scored < n_tokens:
        end = min(begin + ctx, n_tokens)
        out.append((begin, end, scored))
        scored = end
        begin = end - (ctx - stride)
    return out
