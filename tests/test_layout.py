"""The package layout as the guide states it: stages depend only on earlier stages (model -> quantize ->
export -> runtime; importers -> model), shared helpers on no stage, no module over ~500 lines."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "edgeloop"
ORDER = ["model", "quantize", "export", "runtime"]  # a stage may import the stages before it
ALLOWED = {
    "model": set(),
    "quantize": {"model"},
    "export": {"model", "quantize"},
    "runtime": {"model", "quantize", "importers"},  # drift's fp32 reference (lazily; the Runtime itself: no torch)
    "importers": {"model"},
    "helpers": set(),  # chat, io, kv, strided, tensors, textstream
}
SHARED = {"chat", "io", "kv", "strided", "tensors", "textstream"}
WIRING = {"cli", "run", "__init__"}  # may import every stage


def stage_of(module: str) -> str | None:
    """'edgeloop.export.graph' -> 'export'; shared helpers -> 'helpers'; None outside the stages."""
    parts = module.split(".")
    if parts[0] != "edgeloop" or len(parts) < 2:
        return None
    if parts[1] in ALLOWED:
        return parts[1]
    return "helpers" if parts[1] in SHARED else None


def imports(path: Path) -> set[str]:
    """Every edgeloop module a file imports, at the top or inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("edgeloop")}


def sources():
    return sorted(p for p in PKG.rglob("*.py") if p.stem not in WIRING or p.parent != PKG)


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(PKG)))
def test_stage_imports_only_earlier_stages(path):
    rel = path.relative_to(PKG)
    own = stage_of("edgeloop." + ".".join(rel.with_suffix("").parts))
    if own is None:
        pytest.skip("wiring module")
    for mod in imports(path):
        other = stage_of(mod)
        assert other is None or other == own or other in ALLOWED[own] or other == "helpers", \
            f"{rel} ({own}) imports {mod} ({other})"


def test_no_module_over_500_lines():
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long, long
