import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgeloop.model.checkpoint import CheckpointError, load_model, save_checkpoint
from edgeloop.model.data import train_tokenizer
from tests.conftest import VARIANTS, perturbed


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer("In the beginning God created the heaven and the earth.\n" * 50, 300)


@pytest.mark.parametrize("name", VARIANTS)
def test_round_trip_bit_exact(tmp_path, tok, name):
    m = perturbed(name)
    save_checkpoint(m, tmp_path / "ck", tokenizer=tok)
    back = load_model(tmp_path / "ck")
    for k, v in m.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    ids = torch.randint(0, m.cfg.vocab_size, (1, 6))
    assert torch.equal(m(ids), back(ids))
    assert {p.name for p in (tmp_path / "ck").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                              "tokenizer_config.json"}
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["model_type"] == "hyperloop"


def test_fp16_round_trip(tmp_path, tok):
    m = perturbed("test-dynamic")
    save_checkpoint(m, tmp_path / "ck", tokenizer=tok, dtype=torch.float16)
    back = load_model(tmp_path / "ck")
    for k, v in m.state_dict().items():
        assert torch.equal(v.half().float(), back.state_dict()[k]), k


@pytest.fixture
def ck(tmp_path, tok):
    return save_checkpoint(perturbed("test-dynamic"), tmp_path / "ck", tokenizer=tok)


def _edit_tensors(ck, fn):
    st = load_file(str(ck / "model.safetensors"))
    fn(st)
    save_file(st, str(ck / "model.safetensors"))


def _edit_config(ck, fn):
    d = json.loads((ck / "config.json").read_text())
    fn(d)
    (ck / "config.json").write_text(json.dumps(d))


@pytest.mark.parametrize("edit,msg", [
    (lambda st: st.pop("middle.1.mlp.c_fc.weight"), "tensor 'middle.1.mlp.c_fc.weight' is missing"),
    (lambda st: st.update(stray=torch.zeros(2)), "unexpected tensor 'stray'"),
    (lambda st: st.update({"end.0.attn.c_q.weight": torch.zeros(3, 3)}), "'end.0.attn.c_q.weight' has shape"),
    (lambda st: st.update({"hc.b_pre": st["hc.b_pre"].to(torch.int32)}), "'hc.b_pre' has dtype"),
    (lambda st: st["hc.w_res"].view(-1).__setitem__(3, float("nan")), "'hc.w_res' holds NaN"),
    (lambda st: st["embed.weight"].view(-1).__setitem__(0, float("inf")), "'embed.weight' holds NaN or Inf"),
])
def test_bad_tensors(ck, edit, msg):
    _edit_tensors(ck, edit)
    with pytest.raises(CheckpointError, match=msg):
        load_model(ck)


@pytest.mark.parametrize("edit,msg", [
    (lambda d: d.update(n_loops=3), "'n_loops' is unknown \\(did you mean 'num_loops'\\?\\)$"),
    (lambda d: d.update(d_model=-1), "'d_model'"),
    (lambda d: d.update(hc="lanes"), "'hc'"),
    (lambda d: d.update(model_type="llama"), "'model_type'"),
    (lambda d: d.update(qk_norm="yes"), "'qk_norm'"),
])
def test_bad_config(ck, edit, msg):
    _edit_config(ck, edit)
    with pytest.raises(CheckpointError, match=msg):
        load_model(ck)


def test_corrupt_and_missing(ck, tmp_path):
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated|corrupt|cannot be read"):
        load_model(ck)
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_model(tmp_path / "nowhere")
    (ck / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(ck)


def test_failed_save_leaves_nothing(tmp_path, tok):
    m = perturbed("test-dynamic")
    with torch.no_grad():
        m.hc.w_pre[0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="'hc.w_pre' holds NaN"):
        save_checkpoint(m, tmp_path / "ck", tokenizer=tok)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused(ck, tok):
    before = (ck / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        save_checkpoint(perturbed("test-dynamic", seed=5), ck, tokenizer=tok)
    assert (ck / "model.safetensors").read_bytes() == before
