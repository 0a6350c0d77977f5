"""`edgeloop export --ort`: model.ort from onnxruntime's converter, its required-operators config, and the
runtime loading it with the same tokens as model.onnx."""
from __future__ import annotations

import json

import pytest

from edgeloop.export import ExportConfig, export_checkpoint
from edgeloop.model.checkpoint import save_checkpoint
from edgeloop.model.data import train_tokenizer
from edgeloop.quantize import QuantConfig, quantize_checkpoint
from edgeloop.runtime import Runtime
from tests.conftest import perturbed, run_cli


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    root = tmp_path_factory.mktemp("ort")
    tok = train_tokenizer("And God said, Let there be light: and there was light.\n" * 40, 300)
    save_checkpoint(perturbed("test-dynamic"), root / "fp", tokenizer=tok)
    quantize_checkpoint(root / "fp", root / "q", QuantConfig(group_size=32), progress=False)
    return root


@pytest.mark.parametrize("src", ["fp", "q"])
def test_ort_file_matches_onnx(ck, src):
    out = ck / f"x-{src}"
    export_checkpoint(ck / src, out, ExportConfig(ort=True))
    m = json.loads((out / "manifest.json").read_text())["ort"]
    assert (out / "model.ort").stat().st_size == m["bytes"] > 0
    assert m["max_abs_diff_vs_onnx"] <= 1e-5 and m["optimization"] == "extended"
    ops = (out / "required_operators.config").read_text()
    assert "Loop" in ops and "If" in ops  # the Loop, and the If that picks each loop's past
    assert ("MatMulNBits" in ops) == (src == "q")
    a = Runtime(out, threads=1, model_file="model.ort").generate_ids([[5, 6, 7]], 8, stop=()).tokens
    b = Runtime(out, threads=1).generate_ids([[5, 6, 7]], 8, stop=()).tokens
    assert a == b
    assert Runtime(out, threads=1, model_file="model.ort", num_loops=1).num_loops == 1  # num_loops survives


def test_ort_refuses_external_data(ck):
    with pytest.raises(ValueError, match="external data"):
        export_checkpoint(ck / "q", ck / "x-ext", ExportConfig(ort=True, external_data=True))
    assert not (ck / "x-ext").exists()


def test_bench_without_model_ort_is_one_line(ck, monkeypatch, capsys):
    export_checkpoint(ck / "fp", ck / "plain", ExportConfig())
    code, _, err = run_cli(monkeypatch, capsys, "bench", ck / "plain", "--ort", "--json")
    assert code == 2 and "no model.ort" in err and len(err.strip().splitlines()) == 1
