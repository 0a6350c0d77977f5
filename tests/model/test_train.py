import pytest
import torch
from safetensors.torch import load_file

import edgeloop.model.train as train_mod
from edgeloop.model.config import PRESETS
from edgeloop.model.train import TrainConfig, train


def tc(**kw):
    base = dict(steps=30, batch_size=4, seq_len=64, lr=3e-3, warmup=5, val_every=1000, val_tokens=256,
                save_every=1000, dtype="float32", threads=2)
    base.update(kw)
    return TrainConfig(**base)


def test_training_lowers_the_loss(tmp_path):
    s = train(PRESETS["test-dynamic"], tmp_path / "ck", tc(), progress=False)
    log = __import__("json").loads((tmp_path / "ck" / "train_log.json").read_text())
    first, last = sum(e["loss"] for e in log[:5]) / 5, sum(e["loss"] for e in log[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert s["tokens_seen"] == 30 * 4 * 64
    assert (tmp_path / "ck" / "README.md").read_text().count("tokens seen") == 1


def test_resume_is_deterministic(tmp_path, monkeypatch):
    cfg = PRESETS["test-static"]
    train(cfg, tmp_path / "a", tc(steps=8, save_every=3), progress=False)

    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def crash_after_5(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", crash_after_5)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", tc(steps=8, save_every=3), progress=False)
    assert not (tmp_path / "b").exists() and train_mod.state_path(tmp_path / "b").is_file()
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    train(cfg, tmp_path / "b", tc(steps=8, save_every=3), resume=True, progress=False)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not train_mod.state_path(tmp_path / "b").exists()
