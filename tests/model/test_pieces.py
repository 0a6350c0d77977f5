"""The architecture pieces: the registry names what a config may say, every piece's ONNX emission matches
its PyTorch forward (through a whole export), and a new piece (GeGLU) is one class plus one preset."""
import math

import pytest
import torch

from edgeloop.model.config import PRESETS, ConfigError, HyperloopConfig
from edgeloop.model.model import Hyperloop, KVCache, meta_model
from edgeloop.model.pieces import REGISTRY, names
from tests.conftest import perturbed


def test_config_fields_name_registered_pieces():
    for field in ("block", "mlp", "rotary", "hc", "injection"):
        assert names(field), field
        d = PRESETS["test-dynamic"].to_dict()
        d[field] = "no-such-piece"
        with pytest.raises(ConfigError, match=f"'{field}' = 'no-such-piece': must be one of"):
            HyperloopConfig.from_dict(d)
    for kind, pieces in REGISTRY.items():  # every registered piece has its PyTorch and its ONNX side
        for name, cls in pieces.items():
            if kind in ("block", "mlp"):
                assert callable(getattr(cls, "forward")) and callable(getattr(cls, "emit")), (kind, name)


def test_geglu_is_the_published_formula():
    m = perturbed("test-geglu")
    mlp = m.middle[0].mlp
    x = torch.randn(2, 5, m.cfg.d_model)
    a, up = x @ mlp.c_gate.weight.T, x @ mlp.c_fc.weight.T
    gelu = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))
    assert torch.allclose(mlp(x), (gelu * up) @ mlp.c_proj.weight.T, atol=1e-6)


def test_geglu_kv_decode_equals_full_forward():
    m = perturbed("test-geglu", seed=3)
    ids = torch.randint(0, m.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        full, cache = m(ids), KVCache(m.cfg)
        steps = [m(ids[:, :4], cache=cache)] + [m(ids[:, t:t + 1], cache=cache) for t in range(4, 9)]
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5


def test_geglu_exports_fp32_and_int4_with_parity(tmp_path):
    from edgeloop.export import ExportConfig, export_checkpoint
    from edgeloop.model.checkpoint import save_checkpoint
    from edgeloop.model.data import train_tokenizer
    from edgeloop.quantize import RTNConfig, quantize_checkpoint

    tok = train_tokenizer("In the beginning God created the heaven and the earth.\n" * 50, 300)
    save_checkpoint(perturbed("test-geglu"), tmp_path / "ck", tokenizer=tok)
    fp = export_checkpoint(tmp_path / "ck", tmp_path / "fp32", ExportConfig(decode_steps=4))
    rep = quantize_checkpoint(tmp_path / "ck", tmp_path / "q", RTNConfig(group_size=32), progress=False)
    int4 = export_checkpoint(tmp_path / "q", tmp_path / "int4", ExportConfig(decode_steps=4))
    assert "middle.1.mlp.c_gate.weight" in rep["quantized"]  # declared by the piece, quantized by the stage
    assert fp["graph"]["body_ops"]["Tanh"] == 2 and int4["graph"]["body_ops"]["MatMulNBits"] == 2 * 7


def test_tensor_roles_come_from_the_pieces():
    table = meta_model(PRESETS["test-none"]).tensors()
    assert set(table) == set(Hyperloop(PRESETS["test-none"]).state_dict())
    q = table["middle.1.attn.c_k.weight"]
    assert (q.role, q.calls, q.block, q.group) == ("linear", 3, "middle.1", "middle.1.attn:qkv")
    assert (table["begin.0.mlp.c_gate.weight"].calls, table["inject.weight"].calls) == (1, 3)
    assert table["middle.0.norm1.weight"].role == "norm" and table["embed.weight"].role == "embedding"
    dyn = meta_model(PRESETS["test-dynamic"]).tensors()
    assert dyn["hc.w_res"].quantizable and dyn["hc.w_res"].k_axis == 1 and not dyn["hc.b_res"].quantizable
