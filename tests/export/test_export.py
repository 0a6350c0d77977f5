"""fp32 exports of every variant against PyTorch; graph structure; clients (genai, optimum); bad input."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgeloop.export import ExportConfig, export_checkpoint
from edgeloop.export.verify import empty_past, parity
from edgeloop.model.checkpoint import load_model, save_checkpoint
from edgeloop.model.config import PRESETS
from edgeloop.model.model import Hyperloop
from edgeloop.model.data import train_tokenizer
from tests.conftest import VARIANTS, perturbed


def session(folder):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer("In the beginning God created the heaven and the earth.\n" * 50, 300)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tok):
    """{variant: (checkpoint dir, Loop export dir, unrolled export dir)}"""
    out = {}
    for name in VARIANTS:
        root = tmp_path_factory.mktemp(name)
        save_checkpoint(perturbed(name), root / "ck", tokenizer=tok)
        export_checkpoint(root / "ck", root / "loop", ExportConfig())
        export_checkpoint(root / "ck", root / "unrolled", ExportConfig(unroll=True))
        out[name] = (root / "ck", root / "loop", root / "unrolled")
    return out


@pytest.mark.parametrize("name", VARIANTS)
def test_fp32_matches_pytorch_for_every_loop_count(exported, name):
    ck, loop, _ = exported[name]
    model = load_model(ck)
    r = model.cfg.num_loops
    figures = parity(session(loop), model, [5, 17, 42, 7, 99, 3], decode_steps=6, loop_counts=list(range(1, r + 1)))
    assert set(figures) == {str(L) for L in range(1, r + 1)}
    for L, f in figures.items():
        assert f["max_abs_err"] <= 1e-4, (name, L, f)


@pytest.mark.parametrize("name", VARIANTS)
def test_loop_structure_and_weights_stored_once(exported, name):
    ck, loop, unrolled = exported[name]
    m = onnx.load(str(loop / "model.onnx"))
    loops = [n for n in m.graph.node if n.op_type == "Loop"]
    assert len(loops) == 1
    body = loops[0].attribute[0].g
    in_body = {i for n in body.node if n.op_type == "MatMul" for i in n.input}
    middle = {i.name for i in m.graph.initializer if i.name.startswith("middle.") and i.name.endswith(".weight_t")}
    assert middle and middle <= in_body  # every middle linear is inside the body
    names = [i.name for i in m.graph.initializer]
    assert len(names) == len(set(names))
    assert sum(n.startswith("middle.0.attn.c_q") for n in names) == 1
    u = onnx.load(str(unrolled / "model.onnx"))
    assert not any(n.op_type == "Loop" for n in u.graph.node)
    assert sum(i.name.startswith("middle.0.attn.c_q") for i in u.graph.initializer) == 1
    manifest = json.loads((loop / "manifest.json").read_text())
    r = load_model(ck).cfg.num_loops  # the parity check covered r, r // 2 and a left-padded batch of two
    assert manifest["graph"]["loop"] and set(manifest["parity"]["by_num_loops"]) == {str(r), str(max(1, r // 2))}
    assert manifest["parity"]["left_padded_batch"]["batch"] == 2 and manifest["kv"]["layers"] == 1 + 2 * r + 1
    assert json.loads((loop / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"] == \
        load_model(ck).cfg.effective_layers


@pytest.mark.parametrize("name", ["test-dynamic", "test-none"])
def test_unrolled_equals_loop(exported, name):
    ck, loop, unrolled = exported[name]
    cfg = load_model(ck).cfg
    ids = np.array([[3, 1, 4, 1, 5, 9, 2]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(7)[None],
             **empty_past(cfg)}
    a = session(loop).run(None, feeds)
    b = session(unrolled).run(None, feeds)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_left_padded_batch_and_fewer_loops(exported):
    ck, loop, _ = exported["test-static"]
    model = load_model(ck)
    cfg = model.cfg
    a, b = [5, 6, 7, 8, 9, 10], [11, 12, 13]
    ids = np.array([a, [0, 0, 0] + b], np.int64)
    mask = np.array([[1] * 6, [0, 0, 0, 1, 1, 1]], np.int64)
    pos = np.array([list(range(6)), [0, 0, 0, 0, 1, 2]], np.int64)
    s = session(loop)
    names = [o.name for o in s.get_outputs()]
    outs = s.run(names, {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                         "num_loops": np.array(2, np.int64), **empty_past(cfg, 2)})
    logits = outs[0]
    with torch.no_grad():
        ra = model(torch.tensor([a]), num_loops=2)[0].numpy()
        rb = model(torch.tensor([b]), num_loops=2)[0].numpy()
    np.testing.assert_allclose(logits[0], ra, atol=1e-4)
    np.testing.assert_allclose(logits[1, 3:], rb, atol=1e-4)
    # loops that did not run pass their (empty) past through; the ones that ran grew by 6
    assert outs[names.index(f"present.{cfg.slot(1, 0)}.key")].shape[2] == 6
    assert outs[names.index(f"present.{cfg.slot(2, 0)}.key")].shape[2] == 0


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "edgeloop.cli", *map(str, args)], capture_output=True, text=True)


def test_bad_inputs_fail_cleanly(exported, tmp_path):
    ck, loop, _ = exported["test-dynamic"]
    cases = [
        ([tmp_path / "nowhere", "-o", tmp_path / "o1"], "no such checkpoint folder"),
        ([ck, "-o", tmp_path / "o2", "--format", "int3"], "--format 'int3'"),
        ([ck, "-o", tmp_path / "o3", "--format", "matmulnbits"], "needs a quantized checkpoint"),
        ([ck, "-o", tmp_path / "o4", "--opset", "17"], "--opset 17"),
        ([ck, "-o", loop], "already exists"),
        ([ck, "-o", tmp_path / "o6", "--rotary-at-position-ids"], "a choice of the fused graph (--fused)"),
    ]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (bad / f).write_bytes((ck / f).read_bytes())
    (bad / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:1000])
    cases.append(([bad, "-o", tmp_path / "o5"], "corrupt or truncated"))
    for args, msg in cases:
        r = run_cli("export", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_parity_failure_leaves_no_folder(exported, tmp_path):
    ck, _, _ = exported["test-dynamic"]
    with pytest.raises(ValueError, match="parity check failed"):
        export_checkpoint(ck, tmp_path / "out", ExportConfig(tolerance=1e-12))
    assert list(tmp_path.iterdir()) == []


def test_external_data_export(exported, tmp_path):
    ck, loop, _ = exported["test-none"]
    export_checkpoint(ck, tmp_path / "ext", ExportConfig(external_data=True))  # parity-checked (it fails otherwise)
    assert (tmp_path / "ext" / "model.onnx.data").is_file()
    assert (tmp_path / "ext" / "model.onnx").stat().st_size < 200_000
    m = onnx.load(str(tmp_path / "ext" / "model.onnx"), load_external_data=False)
    offsets = [int(e.value) for t in m.graph.initializer for e in t.external_data if e.key == "offset"]
    assert offsets and all(o % 4096 == 0 for o in offsets)  # page-aligned: mmap-able
    from edgeloop.runtime import Runtime
    from edgeloop.runtime.session import NotAnExportError, ort_cause

    data = tmp_path / "ext" / "model.onnx.data"  # a truncated copy: one line naming the file and both sizes
    os.truncate(data, data.stat().st_size // 2)
    with pytest.raises(NotAnExportError, match=r"model.onnx.data: [\d,]+ bytes, the export wrote [\d,]+"):
        Runtime(tmp_path / "ext")
    long = ("[ONNXRuntimeError] : 1 : FAIL : Deserialize tensor w failed.tensorprotoutils.cc:2201 "
            "GetExtDataFromTensorProto External initializer: w offset: 64 size to read: 9 given file_length: 8 " * 4)
    cause = ort_cause(RuntimeError(long))
    assert cause.startswith("Deserialize tensor w failed. External") and ".cc:" not in cause and len(cause) <= 200


@pytest.mark.parametrize("name", ["test-dynamic", "test-static"])
def test_per_loop_parameters_up_to_max_loops(tmp_path, tok, name):
    """hc / loop-embedding rows exist for every loop up to max_loops: the export runs r + 2 loops at parity;
    --max-loops r keeps the first r rows (and onnxruntime-genai's config, which a per-step export whose
    max_loops passes r cannot have); past the trained rows it is refused."""
    cfg = dataclasses.replace(PRESETS[name], max_loops=PRESETS[name].num_loops + 2).validate()
    torch.manual_seed(0)
    model = Hyperloop(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert model.hc.state_dict()[next(iter(model.hc.state_dict()))].shape[0] == cfg.loop_limit
    save_checkpoint(model.eval(), tmp_path / "ck", tokenizer=tok)
    rep = export_checkpoint(tmp_path / "ck", tmp_path / "loop", ExportConfig(parity_loops=(1, cfg.num_loops,
                                                                                               cfg.loop_limit)))
    assert json.loads((tmp_path / "loop" / "manifest.json").read_text())["max_loops"] == cfg.loop_limit
    assert set(rep["parity"]["by_num_loops"]) == {"1", str(cfg.num_loops), str(cfg.loop_limit)}
    assert rep["parity"]["max_abs_err"] <= 1e-4
    figures = parity(session(tmp_path / "loop"), load_model(tmp_path / "ck"), [5, 17, 42, 7], decode_steps=4,
                     loop_counts=[cfg.loop_limit])
    assert figures[str(cfg.loop_limit)]["max_abs_err"] <= 1e-4
    manifest = json.loads((tmp_path / "loop" / "manifest.json").read_text())
    assert manifest["kv_policy"] == "per-step" and not manifest["genai"]["config"]
    assert "--max-loops" in manifest["genai"]["why"] and not (tmp_path / "loop" / "genai_config.json").exists()
    rep = export_checkpoint(tmp_path / "ck", tmp_path / "r", ExportConfig(max_loops=cfg.num_loops))
    assert rep["parity"]["max_abs_err"] <= 1e-4 and rep["genai"]["config"]
    m = onnx.load(str(tmp_path / "r" / "model.onnx"))
    rows = {i.name: i.dims[0] for i in m.graph.initializer if i.name.startswith(("hc.", "loop_embed"))}
    assert rows and set(rows.values()) == {cfg.num_loops}  # the first r rows only
    assert json.loads((tmp_path / "r" / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"] == \
        cfg.n_begin + cfg.num_loops * cfg.n_middle + cfg.n_end
    with pytest.raises(ValueError, match="per-loop parameters"):
        export_checkpoint(tmp_path / "ck", tmp_path / "o", ExportConfig(max_loops=cfg.loop_limit + 1))


def test_target_picks_the_defaults_and_says_why(demo_int4, tmp_path, monkeypatch, capsys):
    """`edgeloop export` with no flags (--target cpu): the fused graph, and max_loops = r so that
    onnxruntime-genai can drive it (the demo's max_loops is 6 > r = 4 with per-step KV); --target portable:
    standard ONNX ops only; given flags win over the target's choices."""
    from tests.conftest import run_cli

    ck = demo_int4.parent / "ck"
    code, out, err = run_cli(monkeypatch, capsys, "export", ck, "-o", tmp_path / "cpu", "--parity-steps", "1", "--json")
    s = json.loads(out)
    assert code == 0, err
    assert s["fused"] and s["max_loops"] == 4 and s["genai"]["config"] and (tmp_path / "cpu" / "genai_config.json").is_file()
    assert set(s["target"]["choices"]) == {"format", "fused", "max_loops"} and s["target"]["name"] == "cpu"
    m = json.loads((tmp_path / "cpu" / "manifest.json").read_text())
    assert m["target"] == s["target"] and m["max_loops"] == 4 and m["fused"]
    code, out, err = run_cli(monkeypatch, capsys, "export", ck, "-o", tmp_path / "portable", "--target", "portable",
                             "--parity-steps", "1", "--json")
    s = json.loads(out)
    assert code == 0 and s["format"] == "qdq" and not s["fused"] and s["max_loops"] == 6
    model = onnx.load(str(tmp_path / "portable" / "model.onnx"))
    nodes = list(model.graph.node)
    for n in nodes:  # the Loop's body and the If branches too (appended while walking)
        nodes += [b for a in n.attribute if a.type == onnx.AttributeProto.GRAPH for b in a.g.node]
    assert {n.domain for n in nodes} <= {"", "ai.onnx"}  # standard ops only
    code, out, err = run_cli(monkeypatch, capsys, "export", ck, "-o", tmp_path / "mine", "--no-fused", "--max-loops",
                             "6", "--parity-steps", "1", "--json")
    s = json.loads(out)
    assert code == 0 and not s["fused"] and s["max_loops"] == 6 and not s["genai"]["config"]
    assert set(s["target"]["choices"]) == {"format"}
    code, out, err = run_cli(monkeypatch, capsys, "export", ck, "-o", tmp_path / "bad", "--target", "phone")
    assert code == 2 and "--target 'phone'" in err and not (tmp_path / "bad").exists()
