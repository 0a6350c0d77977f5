"""The main job end to end on a tiny model: every stage's folder and the report."""
import json

from edgeloop.model.checkpoint import save_checkpoint
from edgeloop.model.data import train_tokenizer
from edgeloop.run import RunConfig, run
from tests.conftest import perturbed, run_cli


def test_run_writes_every_stage_and_the_report(tmp_path):
    tok = train_tokenizer("And God said, Let there be light: and there was light.\n" * 60, 320)
    save_checkpoint(perturbed("test-dynamic"), tmp_path / "ck", tokenizer=tok)
    r = run(tmp_path / "ck", tmp_path / "out", RunConfig(method="rtn", group_size=32, eval_tokens=600,
                                                        decode_tokens=16, prefill_tokens=16))
    out = tmp_path / "out"
    for name in ("int4", "onnx-int4", "onnx-fp32", "report.json", "report.md", "sweep.png"):
        assert (out / name).exists(), name
    rep = json.loads((out / "report.json").read_text())
    parity = rep["export"]["int4"]["parity"]  # accuracy level 4 (run's default): int8 activations, looser bound
    assert rep["export"]["int4"]["graph"]["loop"] and parity["tolerance"] == 0.5
    assert json.loads((out / "onnx-int4" / "manifest.json").read_text())["accuracy_level"] == 4
    assert abs(rep["eval"]["fp32"]["drift_pct"]) < 0.01
    assert len(rep["sweep"]) == 3 and all(s["ppl"] > 1 for s in rep["sweep"])
    at_r, head = rep["sweep"][-1], rep["eval"]["int4"]  # one protocol: the sweep's row at r is the headline's
    assert (at_r["tokens"], at_r["ctx"], at_r["stride"]) == (head["tokens"], head["ctx"], head["stride"])
    assert abs(at_r["ppl"] - head["ppl"]) <= 1e-6 * head["ppl"]
    assert f"{head['tokens']:,} tokens, context {head['ctx']}, stride {head['stride']}" in (out / "report.md").read_text()
    assert rep["bench"]["int4"]["file_bytes"] < rep["bench"]["fp32"]["file_bytes"]
    assert "drift INT4" in (out / "report.md").read_text() and r["int4_over_fp32"]["file_bytes"] < 1
    # run's defaults: the tied embedding INT8 and the weights in mmap'd external data
    assert rep["config"]["embedding_bits"] == 8 and rep["config"]["external_data"] is True
    assert (out / "onnx-int4" / "model.onnx.data").is_file() and (out / "onnx-fp32" / "model.onnx.data").is_file()
    assert json.loads((out / "int4" / "config.json").read_text())["quantization_config"]["embedding_bits"] == 8
    spec = rep["speculation"]  # --draft-loops auto, measured against plain decoding: the same tokens
    assert spec["identical_tokens"] and 0 <= spec["draft_loops"] < 3 and spec["auto"]["calibration_tokens"] > 0
    assert spec["plain_decode_tokens_per_s"] > 0 and "self-speculation" in (out / "report.md").read_text()


def test_run_bad_setting_one_line_and_nothing_written(demo_dir, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "run", demo_dir, "-o", tmp_path / "out",
                             "--embedding-bits", "5")
    assert code != 0 and err.strip() == "error: embedding_bits=5 must be 4 or 8"
    assert not (tmp_path / "out").exists()
