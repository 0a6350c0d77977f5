"""One validation of a checkpoint folder for every command that reads one (issue 16): required config fields,
upper limits, tensor headers checked against the config before anything the config sizes is allocated,
`inspect` showing the problems, and `edgeloop run` checking everything before it writes anything."""
from __future__ import annotations

import dataclasses
import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgeloop.model.checkpoint import CheckpointError, load_config, save_checkpoint
from edgeloop.model.config import LIMITS, PRESETS, REQUIRED_FIELDS, ConfigError, HyperloopConfig
from edgeloop.model.data import train_tokenizer
from tests.conftest import perturbed, run_cli
from tests.fuzzkit import Worker, problems, snapshot


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer("And God said, Let there be light: and there was light.\n" * 60, 320)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("validate")
    for name in ("test-none", "test-dynamic"):
        save_checkpoint(perturbed(name), root / name, tokenizer=tok)
    return root


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = Worker(tmp_path_factory.mktemp("validate-worker") / "tmp")
    yield w
    w.close()


def edit_config(folder, **changes):
    d = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            d.pop(k)
        else:
            d[k] = v
    (folder / "config.json").write_text(json.dumps(d))


def copy(base, name, tmp_path):
    shutil.copytree(base / name, tmp_path / "ck")
    return tmp_path / "ck"


def refused(worker, tmp_path, argv, names):
    """Run `edgeloop ARGV` in the memory-limited worker: one line naming one of `names`, exit 2, nothing new."""
    before = snapshot(tmp_path)
    t0 = time.time()
    ans = worker.run({"argv": [str(a) for a in argv]})
    assert not problems(ans, names), problems(ans, names)
    assert snapshot(tmp_path) == before
    return time.time() - t0


# ---- (a) a loop count past the limit: a fast one-line error, not an unbounded graph ---------------------------
@pytest.mark.parametrize("name", ["test-none", "test-dynamic"])
def test_export_num_loops_1e9_is_one_line_fast(base, worker, tmp_path, name):
    ck = copy(base, name, tmp_path)
    edit_config(ck, num_loops=10**9)
    seconds = refused(worker, tmp_path, ["export", ck, "-o", tmp_path / "out"], ("num_loops",))
    assert seconds < 30


def test_export_refuses_huge_per_step_kv_and_suggests_shared(base, worker, tmp_path):
    ck = copy(base, "test-none", tmp_path)  # no per-loop parameters: any max_loops is allowed by the config
    edit_config(ck, max_loops=4000)
    refused(worker, tmp_path, ["export", ck, "-o", tmp_path / "out", "--max-loops", "4000"], ("--kv-policy shared",))
    from edgeloop.export import ExportConfig, export_config

    cfg = export_config(load_config(ck), ExportConfig(kv_policy="shared"))  # the shared cache is fine
    assert cfg.kv_layout().layers == cfg.unique_layers


# ---- (b) missing architecture fields, tensors that disagree ---------------------------------------------------
@pytest.mark.parametrize("command", ["export", "quantize"])
@pytest.mark.parametrize("field", ["d_model", "vocab_size"])
def test_missing_architecture_field_is_refused(base, worker, tmp_path, command, field):
    ck = copy(base, "test-none", tmp_path)
    edit_config(ck, **{field: ...})
    refused(worker, tmp_path, [command, ck, "-o", tmp_path / "out"], (f"'{field}' is missing",))


@pytest.mark.parametrize("command", ["export", "quantize", "inspect"])
def test_tensor_shape_against_config(base, worker, tmp_path, command):
    ck = copy(base, "test-none", tmp_path)
    st = load_file(str(ck / "model.safetensors"))
    st["middle.0.attn.c_q.weight"] = torch.zeros(64, 32)
    save_file(st, str(ck / "model.safetensors"))
    argv = [command, ck] + (["-o", tmp_path / "out"] if command != "inspect" else [])
    refused(worker, tmp_path, argv, ("'middle.0.attn.c_q.weight' has shape (64, 32), config says (64, 64)",))


def test_required_fields_rule_keeps_old_checkpoints(demo_dir, tmp_path):
    assert load_config(demo_dir).block == "prenorm"  # the shipped demo predates block / rotary: their defaults
    d = {k: v for k, v in PRESETS["test-none"].to_dict().items() if k in REQUIRED_FIELDS}
    cfg = HyperloopConfig.from_dict(d)  # the required fields alone are a config
    assert cfg.rotary == "half" and cfg.kv_policy == "per-step"
    for field in REQUIRED_FIELDS:
        with pytest.raises(ConfigError, match=f"'{field}' is missing"):
            HyperloopConfig.from_dict({k: v for k, v in d.items() if k != field})


@pytest.mark.parametrize("field", sorted(LIMITS))
def test_upper_limits(field):
    cfg = dataclasses.replace(PRESETS["test-none"], max_seq_len=64)
    with pytest.raises(ConfigError, match=f"'{field}' = {LIMITS[field] + 1}: must be at most"):
        dataclasses.replace(cfg, **{field: LIMITS[field] + 1}).validate()


def test_rotary_table_bound():
    with pytest.raises(ConfigError, match="'max_seq_len'.*rotary"):
        dataclasses.replace(PRESETS["test-none"], d_model=1 << 16, n_heads=1, n_kv_heads=1, max_seq_len=1 << 21
                            ).validate()


# ---- (c) inspect shows every problem and exits 2 ---------------------------------------------------------------
@pytest.mark.parametrize("changes,shown", [
    ({"vocab_size": 10}, "tensor 'embed.weight' has shape (320, 64), config says (10, 64)"),
    ({"num_loops": 10**9}, "'num_loops' = 1000000000: must be at most 4096"),
])
def test_inspect_lists_problems_and_exits_2(base, tmp_path, monkeypatch, capsys, changes, shown):
    ck = copy(base, "test-none", tmp_path)
    edit_config(ck, **changes)
    code, out, err = run_cli(monkeypatch, capsys, "inspect", ck, "--json")
    assert code == 2 and len(err.strip().splitlines()) == 1 and shown in err, err
    s = json.loads(out)
    assert any(shown in p for p in s["problems"]) and "tensors" not in s
    code, out, err = run_cli(monkeypatch, capsys, "inspect", ck, "--tensors")
    assert code == 2 and "problems" in out and "embed.weight" in out


def test_inspect_valid_folder_has_no_problems(base, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "inspect", base / "test-dynamic", "--json")
    assert code == 0 and json.loads(out)["problems"] == [], err


# ---- the quantized layout, checked by the quantize stage -------------------------------------------------------
@pytest.fixture(scope="module")
def quantized(base, tmp_path_factory):
    from edgeloop.quantize import RTNConfig, quantize_checkpoint

    out = tmp_path_factory.mktemp("q") / "q"
    quantize_checkpoint(base / "test-dynamic", out, RTNConfig(group_size=32), progress=False)
    return out


@pytest.mark.parametrize("edit,msg", [
    (lambda st: st.update({"middle.0.attn.c_q.scales": st["middle.0.attn.c_q.scales"].float()}),
     "'middle.0.attn.c_q.scales' is F32"),
    (lambda st: st.pop("middle.1.mlp.c_fc.qzeros"), "'middle.1.mlp.c_fc.qzeros' is missing"),
    (lambda st: st.update({"middle.0.attn.c_k.qweight": st["middle.0.attn.c_k.qweight"][:, :1].contiguous()}),
     "'middle.0.attn.c_k.qweight' is U8"),
    (lambda st: st.update({"norm_f.weight.qweight": torch.zeros(2, dtype=torch.uint8)}), "unexpected tensor"),
])
def test_quantized_header_checked_before_loading(quantized, tmp_path, edit, msg):
    from edgeloop.quantize import load_checkpoint
    from edgeloop.quantize.validate import check_checkpoint

    q = tmp_path / "q"
    shutil.copytree(quantized, q)
    st = load_file(str(q / "model.safetensors"))
    edit(st)
    save_file(st, str(q / "model.safetensors"))
    for fn in (check_checkpoint, load_checkpoint):
        with pytest.raises(CheckpointError, match=msg):
            fn(q)


# ---- edgeloop run: everything checked first, no OUT on a failure ----------------------------------------------
@pytest.mark.parametrize("breakage", ["missing", "broken", "too big"])
def test_run_bad_tokenizer_fails_before_quantizing(base, tmp_path, monkeypatch, capsys, breakage):
    import edgeloop.quantize

    ck = copy(base, "test-none", tmp_path)
    if breakage == "missing":
        (ck / "tokenizer.json").unlink()
    elif breakage == "broken":
        (ck / "tokenizer.json").write_text('{"model": ')
    else:
        train_tokenizer("the quick brown fox jumps over the lazy dog " * 200 + "".join(map(chr, range(300, 800))),
                        1000).save(str(ck / "tokenizer.json"))
    monkeypatch.setattr(edgeloop.quantize, "quantize_checkpoint", lambda *a, **k: pytest.fail("quantized"))
    code, _, err = run_cli(monkeypatch, capsys, "run", ck, "-o", tmp_path / "out", "--method", "rtn")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "tokenizer.json" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no OUT, no temp folder


def test_run_failure_midway_leaves_no_out(base, tmp_path, monkeypatch):
    import edgeloop.export
    from edgeloop.run import RunConfig, run

    def boom(*a, **k):
        raise edgeloop.export.ExportError("injected failure")

    monkeypatch.setattr(edgeloop.export, "export_checkpoint", boom)
    rc = RunConfig(method="rtn", group_size=32, eval_tokens=64, decode_tokens=4, prefill_tokens=4, sweep=False)
    with pytest.raises(edgeloop.export.ExportError, match="injected"):
        run(base / "test-none", tmp_path / "out", rc)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("kept")
    with pytest.raises(edgeloop.export.ExportError, match="injected"):
        run(base / "test-none", tmp_path / "out", rc, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]  # the old OUT, untouched
