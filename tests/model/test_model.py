import pytest
import torch

from edgeloop.model.config import PRESETS, ConfigError, HyperloopConfig
from edgeloop.model.model import Hyperloop, KVCache, sinkhorn
from tests.conftest import perturbed


def test_forward_shapes(variant):
    m = perturbed(variant)
    cfg = m.cfg
    ids = torch.randint(0, cfg.vocab_size, (3, 7))
    for r in range(1, cfg.num_loops + 1):
        assert m(ids, num_loops=r).shape == (3, 7, cfg.vocab_size)


def test_kv_decode_equals_full_forward(variant):
    m = perturbed(variant, seed=1)
    cfg = m.cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    for r in range(1, cfg.num_loops + 1):
        full = m(ids, num_loops=r)
        cache = KVCache(cfg)
        parts = [m(ids[:, :6], num_loops=r, cache=cache)]
        parts += [m(ids[:, t:t + 1], num_loops=r, cache=cache) for t in range(6, 13)]
        err = (full - torch.cat(parts, 1)).abs().max().item()
        assert err <= 1e-5, (variant, r, err)
        assert cache.length == 13
        # slots of loops that did not run stay empty
        for l in range(r, cfg.num_loops):
            assert cache.slots[cfg.slot(l, 0)] is None


def test_loops_change_the_output():
    m = perturbed("test-dynamic")
    ids = torch.randint(0, m.cfg.vocab_size, (1, 5))
    assert (m(ids, num_loops=1) - m(ids, num_loops=3)).abs().max() > 1e-3


def test_left_padded_batch_equals_single_sequences(variant):
    m = perturbed(variant, seed=2)
    cfg = m.cfg
    a = torch.randint(0, cfg.vocab_size, (9,))
    b = torch.randint(0, cfg.vocab_size, (5,))
    batch = torch.stack([a, torch.cat([torch.zeros(4, dtype=torch.long), b])])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    cache = KVCache(cfg)
    out = m(batch, cache=cache, attention_mask=mask)
    step = m(torch.tensor([[3], [3]]), cache=cache, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1))
    ref_a = m(torch.cat([a, torch.tensor([3])])[None])
    ref_b = m(torch.cat([b, torch.tensor([3])])[None])
    assert torch.allclose(out[0], ref_a[0, :9], atol=1e-5)
    assert torch.allclose(out[1, 4:], ref_b[0, :5], atol=1e-5)
    assert torch.allclose(step[0, 0], ref_a[0, -1], atol=1e-5)
    assert torch.allclose(step[1, 0], ref_b[0, -1], atol=1e-5)


def test_sinkhorn_is_doubly_stochastic():
    m = sinkhorn(torch.randn(5, 4, 4), 20)  # 20 iterations: rows converge to ~1e-2, columns exact
    assert torch.allclose(m.sum(-1), torch.ones(5, 4), atol=2e-2)
    assert torch.allclose(m.sum(-2), torch.ones(5, 4), atol=1e-6)


def test_num_loops_out_of_range():
    m = perturbed("test-dynamic")
    with pytest.raises(ValueError, match="num_loops=4 must be in 1..3"):
        m(torch.zeros(1, 2, dtype=torch.long), num_loops=4)


def test_parameter_counts():
    m = Hyperloop(PRESETS["test-dynamic"])
    c = m.num_parameters()
    middle = sum(p.numel() for p in m.middle.parameters())
    assert c["effective"] - c["unique"] == (m.cfg.num_loops - 1) * middle
    assert m.cfg.effective_layers == 1 + 3 * 2 + 1


@pytest.mark.parametrize("field,value,msg", [
    ("hc", "wild", "'hc'"), ("n_heads", 5, "'n_heads'"), ("n_streams", 4, "'n_streams'"),
    ("n_kv_heads", 3, "'n_kv_heads'"), ("num_loops", 0, "'num_loops'"), ("mlp", "gelu", "'mlp'"),
])
def test_bad_config_values(field, value, msg):
    d = PRESETS["test-none"].to_dict()
    d[field] = value
    with pytest.raises(ConfigError, match=msg):
        HyperloopConfig.from_dict(d)
