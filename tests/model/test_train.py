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


def test_loop_samplers_are_seeded_bounded_and_centred():
    huginn, demo = PRESETS["test-huginn"], PRESETS["test-dynamic"]  # loop_limit 8 / 3
    u = TrainConfig(loops="uniform", seed=3)
    draws = [u.loops_at(demo, s) for s in range(600)]
    assert set(draws) == {1, 2, 3} and draws == [u.loops_at(demo, s) for s in range(600)]
    assert draws != [TrainConfig(loops="uniform", seed=4).loops_at(demo, s) for s in range(600)]
    assert TrainConfig().loops_at(demo, 7) == demo.num_loops  # fixed
    # Huginn's sampler at its own setting (mean 32, sigma 0.5): r = Poisson(lognormal) + 1, mean about 33
    p = TrainConfig(loops="poisson-lognormal", loops_mean=32)
    big = __import__("dataclasses").replace(huginn, max_loops=4096)
    r = [p.loops_at(big, s) for s in range(3000)]
    assert 31 < sum(r) / len(r) < 35 and min(r) >= 1 and max(r) > 50
    assert max(p.loops_at(huginn, s) for s in range(200)) == huginn.loop_limit  # clipped to the limit
    with pytest.raises(ValueError, match="--loops"):
        TrainConfig(loops="random").validate()
    with pytest.raises(ValueError, match="--backprop-loops"):
        TrainConfig(backprop_loops=-1).validate()


def test_truncated_backprop_leaves_the_early_loops_without_gradient():
    from edgeloop.model.model import Hyperloop

    torch.manual_seed(0)
    m = Hyperloop(PRESETS["test-dynamic"])  # a learned loop embedding: row l is used by loop l only
    x = torch.randint(0, 320, (2, 16))
    for k, zero_rows in ((None, []), (1, [0, 1]), (2, [0])):
        m.zero_grad(set_to_none=True)
        m(x, grad_loops=k).square().mean().backward()
        g = m.loop_embed.grad
        assert [l for l in range(3) if not g[l].abs().sum()] == zero_rows, k
    with torch.no_grad():
        assert torch.equal(m(x, grad_loops=1), m(x))  # the values are the same: only autograd differs


def test_randomized_depth_training_logs_its_loops_and_reports_every_count(tmp_path):
    s = train(PRESETS["test-huginn"], tmp_path / "ck", tc(steps=12, loops="poisson-lognormal", backprop_loops=2),
              progress=False)
    log = __import__("json").loads((tmp_path / "ck" / "train_log.json").read_text())
    assert len({e["loops"] for e in log}) > 2 and all(1 <= e["loops"] <= 8 for e in log)
    assert list(s["val_ppl_by_loops"]) == [str(r) for r in range(1, 9)]
    assert s["val_ppl_by_loops"]["4"] == round(s["val_ppl"], 4)
    card = (tmp_path / "ck" / "README.md").read_text()
    assert "Poisson-lognormal around 4" in card and "last 2 loops" in card and "| perplexity |" in card


@pytest.mark.parametrize("loops", ["uniform"])
def test_resume_is_deterministic_with_random_depth(tmp_path, monkeypatch, loops):
    cfg = PRESETS["test-dynamic"]
    train(cfg, tmp_path / "a", tc(steps=6, save_every=2, loops=loops, backprop_loops=1), progress=False)
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def crash_after_3(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", crash_after_3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", tc(steps=6, save_every=2, loops=loops, backprop_loops=1), progress=False)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    train(cfg, tmp_path / "b", tc(steps=6, save_every=2, loops=loops, backprop_loops=1), resume=True, progress=False)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
