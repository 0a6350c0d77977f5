"""edgeloop generate (export folders) / eval / bench: JSON contracts, the num_loops sweep, and every bad
input as a one-line error with exit 2."""
import json
import shutil
import subprocess
import sys

import onnx
from onnx import TensorProto, helper

from tests.conftest import run_cli

BENCH_KEYS = ("file_bytes", "peak_rss_bytes", "steady_rss_bytes", "kv_bytes_per_token", "prefill_ms",
              "decode_tokens_per_s")


def test_generate_streams_from_an_export(tiny, monkeypatch, capsys):
    from edgeloop.runtime import Runtime

    code, out, err = run_cli(monkeypatch, capsys, "generate", tiny["loop"], "--prompt", "In the beginning",
                             "--max-new-tokens", "6", "--threads", "1")
    assert code == 0, err
    want = Runtime(tiny["loop"], threads=1).generate("In the beginning", 6).text[0]
    assert out.replace("\n", "") == ("In the beginning" + want).replace("\n", "")


def test_bench_json_every_key_positive(tiny, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "bench", tiny["loop"], "--threads", "1", "--decode-tokens", "48",
                             "--prefill-tokens", "64", "--reference", tiny["unrolled"], "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["ep"] == "cpu"
    for k in BENCH_KEYS:
        assert isinstance(r[k], (int, float)) and r[k] > 0, (k, r[k])
    assert r["decode_tokens"] == 48 and r["prefill_tokens"] == 64
    assert r["kv_bytes_per_token"] == 2 * 8 * 2 * 16 * 4  # 2 (k, v) x 8 effective layers x 2 kv heads x 16 x fp32
    assert r["file_bytes"] == (tiny["loop"] / "model.onnx").stat().st_size
    assert r["peak_rss_bytes"] >= r["baseline_rss_bytes"] >= r["import_rss_bytes"] and r["device_memory_note"]
    # the model's share: over a baseline with onnxruntime already started once; positive, and the whole-process
    # figures are that share plus the baseline
    assert 0 < r["session_after_create_rss_bytes"] <= r["session_rss_bytes"]
    assert r["session_steady_rss_bytes"] == r["steady_rss_bytes"] - r["baseline_rss_bytes"] > 0
    assert set(r["ratio_vs_reference"]) >= set(BENCH_KEYS) and r["ratio_vs_reference"]["kv_bytes_per_token"] == 1


def test_sweep_visits_every_count_up_to_max_loops():
    from edgeloop.runtime.measure import sweep_loops

    assert sweep_loops(4, 4) == [1, 2, 3, 4] and sweep_loops(4, 6) == [1, 2, 3, 4, 5, 6]  # more loops than r too
    assert sweep_loops(32, 64) == [1, 2, 4, 8, 16, 32, 64] and sweep_loops(12, 32) == [1, 2, 4, 8, 12, 16, 32]


def test_sweep_has_r_rows_and_a_plot(tiny, monkeypatch, capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("In the beginning God created the heaven and the earth.\n" * 40)
    png = tmp_path / "sweep.png"
    code, out, err = run_cli(monkeypatch, capsys, "bench", tiny["loop"], "--threads", "1", "--decode-tokens", "16",
                             "--plot", png, "--text", text, "--sweep-tokens", "300", "--json")
    assert code == 0, err
    rows = json.loads(out)["sweep"]
    assert [x["num_loops"] for x in rows] == [1, 2, 3]
    assert all(x["ppl"] > 1 and x["decode_tokens_per_s"] > 0 for x in rows)
    assert [x["effective_layers"] for x in rows] == [4, 6, 8]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, err = run_cli(monkeypatch, capsys, "bench", tiny["loop"], "--threads", "1", "--decode-tokens", "16",
                             "--sweep", "--text", text, "--sweep-tokens", "300")
    assert code == 0 and "elastic depth" in out and "num_loops" in out


def test_eval_json_contract(tiny, monkeypatch, capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("In the beginning God created the heaven and the earth.\n" * 30)
    code, out, err = run_cli(monkeypatch, capsys, "eval", tiny["loop"], "--text", text, "--tokens", "300",
                             "--threads", "1", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert {"ppl", "reference_ppl", "drift_pct", "tokens", "ep"} <= set(r)
    assert r["tokens"] == 299 and r["ep"] == "cpu" and abs(r["drift_pct"]) < 1e-2
    assert r["reference"] == str(tiny["ck"])  # found from the manifest's source


def _renamed_input_export(tiny, dst):
    """A copy of the export whose model takes `pos` instead of `position_ids`."""
    shutil.copytree(tiny["loop"], dst)
    m = onnx.load(str(dst / "model.onnx"))
    for i in m.graph.input:
        if i.name == "position_ids":
            i.name = "pos"
    for n in m.graph.node:
        n.input[:] = ["pos" if x == "position_ids" else x for x in n.input]
    onnx.save(m, str(dst / "model.onnx"))


def _toy_export(tiny, dst):
    """manifest + tokenizer of a real export, but a model with only input_ids -> logits."""
    shutil.copytree(tiny["loop"], dst)
    g = helper.make_graph([helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)], "toy",
                          [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s"])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), str(dst / "model.onnx"))


def test_bad_inputs_one_line_exit_2(tiny, monkeypatch, capsys, tmp_path):
    _renamed_input_export(tiny, tmp_path / "renamed")
    _toy_export(tiny, tmp_path / "toy")
    shutil.copytree(tiny["loop"], tmp_path / "orphan")
    m = json.loads((tmp_path / "orphan" / "manifest.json").read_text())
    (tmp_path / "orphan" / "manifest.json").write_text(json.dumps({**m, "source": str(tmp_path / "gone")}))
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("Genèse".encode("latin-1"))
    long_prompt = "In the beginning " * 100
    cases = [
        (["bench", tiny["ck"]], "not an edgeloop export folder (model.onnx, manifest.json missing)"),
        (["eval", tmp_path / "nowhere"], "no such export folder"),
        (["bench", tmp_path / "renamed"], "input 'position_ids' is missing"),
        (["generate", tmp_path / "toy", "--prompt", "x"], "input 'attention_mask' is missing"),
        (["generate", tiny["loop"], "--prompt", "x", "--ep", "cuda"], "execution provider 'cuda'"),
        (["bench", tiny["loop"], "--ep", "tpu"], "--ep 'tpu': unknown execution provider"),
        (["generate", tiny["loop"], "--prompt", long_prompt], "tokens; the model's context is 128"),
        (["generate", tiny["loop"], "--prompt", "x", "--num-loops", "9"], "num_loops 9: must be an integer in 1..3"),
        (["eval", tiny["loop"], "--text", tmp_path / "empty.txt"], "the text file is empty"),
        (["eval", tiny["loop"], "--text", tmp_path / "latin1.txt"], "not UTF-8 text"),
        (["eval", tiny["loop"], "--reference", tiny["loop"]], "is an export folder"),
        (["eval", tmp_path / "orphan"], "float source checkpoint is not recorded or not found"),
        (["bench", tiny["unrolled"], "--sweep"], "unrolled export has no num_loops input"),
        (["inspect", tiny["loop"]], "is an export folder (model.onnx, manifest.json); inspect reads checkpoint"),
    ]
    for args, msg in cases:
        code, out, err = run_cli(monkeypatch, capsys, *args)
        assert code == 2, (args, out, err)
        assert msg in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not out.strip(), (args, out)  # nothing (e.g. the prompt) was printed before the error


def test_bad_input_from_a_real_process(tiny):
    r = subprocess.run([sys.executable, "-m", "edgeloop.cli", "generate", str(tiny["loop"]), "--prompt", "x",
                        "--ep", "coreml"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "CoreMLExecutionProvider" in r.stderr and "not available" in r.stderr


def test_help_lists_the_main_job_first_and_export_flags_by_intent():
    from typer.testing import CliRunner

    from edgeloop.cli import app

    top = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "100"}).output
    at = [top.index(f"│ {c} ") for c in ("run", "import", "quantize", "export", "eval", "bench", "generate", "train")]
    assert at == sorted(at) and top.index("Main job") < top.index("Pipeline stages") < top.index("More")
    exp = CliRunner().invoke(app, ["export", "--help"], env={"COLUMNS": "100"}).output
    assert exp.index("Graph") < exp.index("--fused") < exp.index("Loops and KV cache") < exp.index("--max-loops") \
        < exp.index("Parity check") < exp.index("--tolerance")
