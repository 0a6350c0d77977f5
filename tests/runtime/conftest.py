"""Runtime fixtures: a tiny perturbed model exported (Loop and unrolled), and the demo model exported fp32
(module-independent, built once per session in a tmp dir; the INT4 one is tests/conftest.py's demo_int4)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgeloop.export import ExportConfig, export_checkpoint
from edgeloop.model.checkpoint import save_checkpoint
from edgeloop.model.data import train_tokenizer
from tests.conftest import perturbed


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    torch.set_num_threads(1)  # the CI machine has 2 cores; ORT sessions use threads=1 too


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """{"ck", "loop", "unrolled"}: a perturbed test-dynamic model (r = 3, context 128) and its exports."""
    root = tmp_path_factory.mktemp("tiny")
    tok = train_tokenizer("In the beginning God created the heaven and the earth.\n" * 50, 300)
    save_checkpoint(perturbed("test-dynamic"), root / "ck", tokenizer=tok)
    export_checkpoint(root / "ck", root / "loop", ExportConfig())
    export_checkpoint(root / "ck", root / "unrolled", ExportConfig(unroll=True))
    return {"ck": root / "ck", "loop": root / "loop", "unrolled": root / "unrolled"}


@pytest.fixture(scope="session")
def demo_fp32(tmp_path_factory, demo_dir) -> Path:
    """The shipped demo model exported fp32 (Loop)."""
    out = tmp_path_factory.mktemp("demo") / "fp32"
    export_checkpoint(demo_dir, out, ExportConfig())
    return out
