"""Ouro (ouro) folders as the Hub ships them, written by the test (random bf16 weights; the exit gate spread so
that tokens exit at different steps): logits and exit steps against the published equations for the last
step, every exit_at_step and thresholds 0.3 / 0.7 / 1.0; KV-cache decode; the INT4 export's parity with early
exit under both KV policies; early exit really stops the Loop (counted from exit_step, not timed); bad input."""
import json
import shutil

import numpy as np
import pytest
import torch

from edgeloop.export import ExportConfig, export_checkpoint
from edgeloop.export.verify import parity
from edgeloop.importers import import_folder
from edgeloop.importers.ouro import OuroImportError
from edgeloop.model.checkpoint import load_model
from edgeloop.model.config import HyperloopConfig
from edgeloop.model.model import KVCache
from tests.importers.ouro_folder import CFG, ouro_weights, reference, write_ouro

IDS = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 299, 0, 61, 12, 140],
                    [299, 1, 2, 3, 150, 151, 9, 64, 128, 256, 31, 45]])


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("ouro")
    w = ouro_weights()
    src = write_ouro(root / "hf", w)
    return w, src, root / "el", import_folder(src, root / "el")


@pytest.mark.parametrize("how", [{}, {"exit_at_step": 0}, {"exit_at_step": 1}, {"exit_at_step": 2},
                                 {"exit_at_step": 3}, {"exit_threshold": 0.3}, {"exit_threshold": 0.7},
                                 {"exit_threshold": 1.0}], ids=str)
def test_logits_and_exit_steps_equal_the_published_equations(imported, how):
    w, src, el, _ = imported
    model = load_model(el)
    ref, ref_steps = reference(w, IDS, **how)
    with torch.no_grad():
        got, steps = model(IDS, return_exit=True, **how)
    assert (got - ref).abs().max().item() <= 1e-4 and torch.equal(steps, ref_steps)
    if "exit_threshold" in how and how["exit_threshold"] < 1:
        assert len(set(steps.flatten().tolist())) > 1  # tokens exit at different steps
    assert not (src / "RAN").exists()


def test_mapping_and_the_gate_kept_in_float(imported, tmp_path):
    from edgeloop.quantize import RTNConfig, quantize_checkpoint

    _, _, el, s = imported
    cfg = load_model(el).cfg
    assert (cfg.n_begin, cfg.n_middle, cfg.n_end, cfg.num_loops) == (0, 2, 0, 4)
    assert (cfg.block, cfg.rotary, cfg.n_kv_heads, cfg.exit_gate, cfg.norm_each_loop) == ("prepost", "neox", 2, True, True)
    rep = quantize_checkpoint(el, tmp_path / "q", RTNConfig(group_size=16), progress=False)
    assert rep["kept"]["exit_gate.weight"].startswith("exit gate") and "exit_gate.bias" in rep["kept"]
    assert "middle.1.mlp.c_gate.weight" in rep["quantized"] and s["stored_dtype"] == "bfloat16"


def test_kv_decode_equals_the_full_forward(imported):
    model = load_model(imported[2])
    with torch.no_grad():
        full = model(IDS)
        cache = KVCache(model.cfg)
        steps = [model(IDS[:, :5], cache=cache)] + [model(IDS[:, t:t + 1], cache=cache) for t in range(5, 12)]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-4
    assert len(cache.slots) == 4 * 2 and all(s[0].shape[2] == 12 for s in cache.slots)  # slot t * L + layer


@pytest.fixture(scope="module")
def exports(imported, tmp_path_factory):
    """{policy: (INT4 export folder, the INT4 reference model with the export's config)}"""
    from edgeloop.quantize import RTNConfig, load_checkpoint, quantize_checkpoint

    root = tmp_path_factory.mktemp("ouro-x")
    quantize_checkpoint(imported[2], root / "q", RTNConfig(group_size=16), progress=False)
    out = {}
    for policy in ("per-step", "shared"):
        x = root / policy
        export_checkpoint(root / "q", x, ExportConfig(kv_policy=policy, decode_steps=4))
        ref = load_checkpoint(root / "q")
        ref.cfg = HyperloopConfig.from_dict(json.loads((x / "manifest.json").read_text())["config"])
        out[policy] = (x, ref)
    return out


@pytest.mark.parametrize("policy", ["per-step", "shared"])
def test_int4_early_exit_equals_pytorch_under_the_same_kv_policy(exports, policy):
    import onnxruntime as ort

    x, ref = exports[policy]
    m = json.loads((x / "manifest.json").read_text())
    assert "q=0.5" in m["parity"]["early_exit"]  # the export's own check ran an early exit
    sess = ort.InferenceSession(str(x / "model.onnx"), providers=["CPUExecutionProvider"])
    runs = set()
    for q in (0.3, 0.7, 1.0):  # exit steps compared token by token (a mismatch is an infinite error)
        f = parity(sess, ref, [5, 17, 42, 7, 99, 3], decode_steps=6, loop_counts=[4], policy=policy,
                   exit_threshold=q)["4"]
        assert f["max_abs_err"] <= 1e-3, (q, f)
        runs |= set(f["loops_run"])
    assert runs > {4}  # some decode steps stopped the Loop early


def test_an_early_threshold_runs_fewer_loops(exports):
    from edgeloop.runtime import Runtime

    rt = Runtime(exports["per-step"][0], threads=1)
    early = rt.generate_ids([[5, 17, 42]], 8, stop=(), exit_threshold=0.0)  # exits at the first loop
    full = rt.generate_ids([[5, 17, 42]], 8, stop=(), exit_threshold=1.0)
    assert early.loops == [[1] * 8] and full.loops == [[4] * 8]
    x = np.array([[5, 17, 42, 7]], np.int64)
    rt.forward(x, np.ones_like(x), np.arange(4)[None], rt.empty_past(1), 4, 0.0)
    assert rt.last_exit_step.tolist() == [[0, 0, 0, 0]]  # the graph's exit_step output: one loop ran


def _edit(folder, **kv):
    c = json.loads((folder / "config.json").read_text())
    c.update(kv)
    (folder / "config.json").write_text(json.dumps(c))


def _tensors(folder, fn):
    from safetensors.torch import load_file, save_file

    st = load_file(str(folder / "model.safetensors"))
    fn(st)
    save_file(st, str(folder / "model.safetensors"))


BAD = [
    ("sliding window", lambda f: _edit(f, use_sliding_window=True, sliding_window=16), "use_sliding_window = True"),
    ("rope scaling", lambda f: _edit(f, rope_scaling={"type": "yarn", "factor": 4}), "rope_scaling"),
    ("activation", lambda f: _edit(f, hidden_act="gelu"), "hidden_act = 'gelu'"),
    ("head_dim", lambda f: _edit(f, head_dim=16), "head_dim = 16"),
    ("missing tensor", lambda f: _tensors(f, lambda st: st.pop("model.early_exit_gate.bias")),
     "'model.early_exit_gate.bias' is missing"),
    ("attention bias", lambda f: _tensors(f, lambda st: st.update({"model.layers.0.self_attn.q_proj.bias":
                                                                       torch.zeros(48)})), "an attention bias"),
    ("shape", lambda f: _edit(f, intermediate_size=64), "'model.layers.0.mlp.gate_proj.weight' has shape"),
    ("missing field", lambda f: (f / "config.json").write_text(json.dumps({k: v for k, v in CFG.items()
                                                                            if k != "num_hidden_layers"})),
     "'num_hidden_layers' is missing"),
]


@pytest.mark.parametrize("case", range(len(BAD)), ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case):
    name, edit, fragment = BAD[case]
    src = write_ouro(tmp_path / "hf")
    edit(src)
    with pytest.raises(OuroImportError) as e:
        import_folder(src, tmp_path / "out")
    assert fragment in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"] and not (src / "RAN").exists()
    shutil.rmtree(src)


def test_bench_sweep_adds_the_threshold_sweep(exports, tmp_path, monkeypatch, capsys):
    from tests.conftest import run_cli

    x = exports["per-step"][0]
    (tmp_path / "ids.txt").write_text("In the beginning God created the heaven and the earth.\n" * 4)
    from edgeloop.runtime import Runtime
    from edgeloop.runtime.measure import THRESHOLDS, threshold_sweep

    rows = threshold_sweep(Runtime(x, threads=1), np.arange(40) % 300, decode_tokens=4)
    assert [r["exit_threshold"] for r in rows] == list(THRESHOLDS)
    assert rows[0]["mean_loops"] <= rows[-1]["mean_loops"] == 4.0 and rows[0]["decode_mean_loops"] < 4.0
    code, out, err = run_cli(monkeypatch, capsys, "bench", x, "--exit-threshold", "0.0", "--decode-tokens", "4",
                             "--prefill-tokens", "4", "--threads", "1", "--json")
    assert code == 0, err
    assert json.loads(out)["mean_loops"] == 1.0  # exit at the first step: one loop per decoded token
