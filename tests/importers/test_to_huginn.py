"""An edgeloop checkpoint written as a huginn_raven folder (importers/to_huginn.py): the folder's tensors through
the published equations (tests/importers/huginn_folder.py, an independent implementation) give edgeloop's
logits; it imports back to the same tensors; a checkpoint of another architecture is refused in one line; and
the shipped models/huginn-tiny goes through the import path a downloaded Huginn folder takes."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edgeloop.importers import detect, import_folder
from edgeloop.importers.to_huginn import HuginnWriteError, write_huginn
from edgeloop.model.checkpoint import load_model, save_checkpoint
from edgeloop.model.data import train_tokenizer
from tests.conftest import DEMO, ROOT, perturbed
from tests.importers.huginn_folder import reference_logits

IDS = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 299, 0, 61, 12, 140]])
TINY = ROOT / "models" / "huginn-tiny"


def test_written_folder_is_huginn_by_the_published_equations(tmp_path):
    model = perturbed("test-huginn")
    tok = train_tokenizer("In the beginning God created the heaven and the earth.\n" * 40, 290)
    save_checkpoint(model, tmp_path / "ck", tokenizer=tok)
    folder = write_huginn(tmp_path / "ck", tmp_path / "hf")
    assert detect(folder).name == "huginn_raven"
    raw = json.loads((folder / "config.json").read_text())
    assert raw["state_init"] == "zero" and raw["mean_recurrence"] == model.cfg.num_loops
    w = load_file(str(folder / "model.safetensors"))
    assert w["transformer.core_block.1.attn.qk_bias"].shape == (2, 1, 4, 16)
    for steps in (1, 4, 7):
        want = reference_logits(w, IDS, steps, cfg=raw)
        with torch.no_grad():
            got = model(IDS, num_loops=steps)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the reference's initialize_state draws std * init_scale whatever state_init says: std 0 keeps it at zeros
    assert raw["init_values"]["std"] == 0.0
    with pytest.raises(ValueError, match="init_values.std is 0.*starts from zeros"):
        from edgeloop.export import ExportConfig, export_checkpoint

        import_folder(folder, tmp_path / "el")
        export_checkpoint(tmp_path / "el", tmp_path / "x", ExportConfig(init_state="random"), progress=False)
    assert not (tmp_path / "x").exists()
    import_folder(folder, tmp_path / "back")
    back = load_model(tmp_path / "back").state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back[k].float(), v.float(), atol=0, rtol=0, msg=k)


def test_another_architecture_is_refused_and_nothing_written(tmp_path):
    with pytest.raises(HuginnWriteError, match="config field 'hc' = 'dynamic'"):
        write_huginn(DEMO, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.skipif(not (TINY / "model.safetensors").is_file(), reason="models/huginn-tiny is not built")
def test_shipped_huginn_tiny_is_a_huginn_folder_that_imports_and_agrees_with_the_equations(tmp_path):
    assert {p.name for p in TINY.iterdir()} >= {"config.json", "model.safetensors", "generation_config.json",
                                                "tokenizer.json", "README.md"}
    assert sum(p.stat().st_size for p in TINY.iterdir()) < 15e6
    raw = json.loads((TINY / "config.json").read_text())
    assert raw["model_type"] == "huginn_raven" and raw["mean_recurrence"] == 16
    import_folder(TINY, tmp_path / "ck")
    model = load_model(tmp_path / "ck")
    w = load_file(str(TINY / "model.safetensors"))
    ids = torch.tensor([list(range(40, 72))])
    for steps in (2, 16):
        with torch.no_grad():
            got = model(ids, num_loops=steps)
        torch.testing.assert_close(got, reference_logits(w, ids, steps, cfg=raw), atol=2e-3, rtol=1e-3)
