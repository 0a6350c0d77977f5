"""Shared fixtures: small perturbed models of every variant and the shipped demo model."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from edgeloop.model.config import PRESETS
from edgeloop.model.model import Hyperloop

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "hyperloop-tiny"
VARIANTS = ["test-dynamic", "test-static", "test-none", "test-standard"]


def perturbed(name: str, seed: int = 0, scale: float = 0.05) -> Hyperloop:
    """A test-sized model with every parameter moved off its init (so no path hides behind an identity)."""
    torch.manual_seed(seed)
    m = Hyperloop(PRESETS[name])
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * scale)
    return m.eval()


@pytest.fixture(params=VARIANTS)
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    if not (DEMO / "model.safetensors").is_file():
        pytest.fail(f"the shipped demo model is missing at {DEMO}")
    return DEMO


@pytest.fixture(scope="session")
def demo_int4(tmp_path_factory, demo_dir) -> Path:
    """The demo model quantized INT4 (RTN, G=128: the quantize stage's defaults) into DIR/ck and exported
    MatMulNBits into DIR/int4 (returned) at --max-loops r: onnxruntime-genai's form of a per-step export
    (the demo's loop-count dial goes past r; an export that keeps it gets no genai_config.json)."""
    from edgeloop.export import ExportConfig, export_checkpoint
    from edgeloop.quantize import RTNConfig, quantize_checkpoint

    root = tmp_path_factory.mktemp("demo-int4")
    quantize_checkpoint(demo_dir, root / "ck", RTNConfig(), progress=False)
    from edgeloop.model.checkpoint import load_config

    export_checkpoint(root / "ck", root / "int4", ExportConfig(max_loops=load_config(demo_dir).num_loops))
    return root / "int4"


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`edgeloop ARGS` in this process: (exit code, stdout, stderr)."""
    from edgeloop import cli

    monkeypatch.setattr(sys, "argv", ["edgeloop", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code or 0
    cap = capsys.readouterr()
    return code, cap.out, cap.err
