"""The importer registry: `edgeloop import` detects the format, and export / eval take a foreign folder
directly (a temporary import, recorded as the export's source)."""
import json

from edgeloop.importers import IMPORTERS, detect
from tests.conftest import DEMO, run_cli
from tests.importers.test_nanochat import write_nanochat


def test_import_detects_the_format(tmp_path, monkeypatch, capsys):
    src = write_nanochat(tmp_path / "nc", "additive")
    assert detect(src) is IMPORTERS["nanochat"] and detect(DEMO) is None  # an edgeloop folder is not foreign
    code, out, err = run_cli(monkeypatch, capsys, "import", src, "-o", tmp_path / "el", "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["format"] == "nanochat" and s["injection"] == "additive" and s["tensors"] == 37
    assert json.loads((tmp_path / "el" / "config.json").read_text())["model_type"] == "hyperloop"


def test_import_bad_input_is_one_line(tmp_path, monkeypatch, capsys):
    src = write_nanochat(tmp_path / "nc", "additive")
    for args, msg in [([DEMO], "not a checkpoint format edgeloop imports (known: "),
                      ([tmp_path / "nowhere"], "no such folder"),
                      ([src, "--format", "gguf"], "--format 'gguf': one of ")]:
        code, _, err = run_cli(monkeypatch, capsys, "import", *args, "-o", tmp_path / "x")
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nc"]


def test_export_and_eval_take_a_foreign_folder(tmp_path, monkeypatch, capsys):
    from edgeloop.model.data import train_tokenizer

    tok = train_tokenizer("In the beginning God created the heaven and the earth.\n" * 40, 290)
    src = write_nanochat(tmp_path / "nc", "passthrough", tokenizer=tok)
    code, out, err = run_cli(monkeypatch, capsys, "export", src, "-o", tmp_path / "x", "--json")
    assert code == 0, err
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert manifest["source"] == str(src) and json.loads(out)["graph"]["loop"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nc", "x"]  # the temporary import is gone
    (tmp_path / "text.txt").write_text("And God said, Let there be light: and there was light.\n" * 8)
    code, out, err = run_cli(monkeypatch, capsys, "eval", tmp_path / "x", "--text", tmp_path / "text.txt",
                             "--tokens", "300", "--json")  # the reference: the nanochat folder, imported again
    assert code == 0, err
    r = json.loads(out)
    assert r["reference"] == str(src) and r["tokens"] > 100 and abs(r["drift_pct"]) < 1e-3
