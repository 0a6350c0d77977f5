"""Nanbeige4.2 (nanbeige) folders as the Hub ships them, written by the test (random bf16 weights, sharded with
the index): logits against the published equations at 1, 2 and 3 loops and with skip_loop_final_norm; KV-cache
decode; the fp32 export against the equations through onnxruntime (1..3 loops, the loop count an input); the
INT4 export's own parity, plain and fused; each refused switch is one line and writes nothing."""
import json
import shutil

import numpy as np
import pytest
import torch

from edgeloop.export import ExportConfig, export_checkpoint
from edgeloop.importers import import_folder
from edgeloop.importers.nanbeige import NanbeigeImportError
from edgeloop.model.checkpoint import load_model
from edgeloop.model.model import KVCache
from tests.importers.nanbeige_folder import CFG, nanbeige_weights, reference, write_nanbeige

IDS = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 299, 0, 61, 12, 140],
                    [299, 1, 2, 3, 150, 151, 9, 64, 128, 256, 31, 45]])


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("nanbeige")
    w = nanbeige_weights()
    src = write_nanbeige(root / "hf", w)
    return w, src, root / "el", import_folder(src, root / "el")


@pytest.mark.parametrize("loops", [1, 2, 3])
def test_logits_equal_the_published_equations(imported, loops):
    w, src, el, _ = imported
    model = load_model(el)
    model.cfg.max_loops = 3  # no per-loop parameters: any loop count runs (the import keeps max_loops = r = 2)
    with torch.no_grad():
        got = model(IDS, num_loops=loops)
    assert (got - reference(w, IDS, loops=loops)).abs().max().item() <= 1e-4
    assert not (src / "RAN").exists()


def test_skip_loop_final_norm_norms_once(tmp_path):
    w, cfg = nanbeige_weights(1), dict(CFG, skip_loop_final_norm=True)
    el = tmp_path / "el"
    import_folder(write_nanbeige(tmp_path / "hf", w, config=cfg, shards=1), el)
    model = load_model(el)
    assert not model.cfg.norm_each_loop
    with torch.no_grad():
        for loops in (1, 2):
            err = (model(IDS, num_loops=loops) - reference(w, IDS, cfg, loops=loops)).abs().max().item()
            assert err <= 1e-4, (loops, err)


def test_mapping(imported, tmp_path):
    from edgeloop.quantize import RTNConfig, quantize_checkpoint

    _, _, el, s = imported
    cfg = load_model(el).cfg
    assert (cfg.n_begin, cfg.n_middle, cfg.n_end, cfg.num_loops, cfg.head_dim, cfg.d_model) == (0, 3, 0, 2, 16, 48)
    assert (cfg.block, cfg.rotary, cfg.n_kv_heads, cfg.norm_each_loop, cfg.tie_embeddings) == \
           ("prenorm", "neox", 2, True, False)
    assert s["shards"] == 2 and s["stored_dtype"] == "bfloat16"
    rep = quantize_checkpoint(el, tmp_path / "q", RTNConfig(group_size=16), progress=False)
    assert "middle.2.attn.c_q.weight" in rep["quantized"] and "final_norm.weight" in rep["kept"]


def test_kv_decode_equals_the_full_forward(imported):
    w, _, el, _ = imported
    model = load_model(el)
    with torch.no_grad():
        full = model(IDS)
        cache = KVCache(model.cfg)
        steps = [model(IDS[:, :5], cache=cache)] + [model(IDS[:, t:t + 1], cache=cache) for t in range(5, 12)]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-4
    assert len(cache.slots) == 2 * 3 and all(s[0].shape[2] == 12 for s in cache.slots)  # slot loop * L + layer
    ref_cache: list = []  # the reference's own cache reproduces its full forward: the slots are per (loop, layer)
    ref = [reference(w, IDS[:, :5], cache=ref_cache)] + [reference(w, IDS[:, t:t + 1], cache=ref_cache, start=t)
                                                           for t in range(5, 12)]
    assert (torch.cat(ref, 1) - full).abs().max().item() <= 1e-4


def test_fp32_export_equals_the_equations_at_every_loop_count(imported, tmp_path):
    """The loop count is the graph's input: 1, 2 and 3 loops from one model.onnx (max_loops 3)."""
    from edgeloop.kv import Layout
    from edgeloop.runtime import Runtime

    w, _, el, _ = imported
    x = tmp_path / "x"
    export_checkpoint(el, x, ExportConfig(max_loops=3, decode_steps=2))
    layout = Layout.of_manifest(json.loads((x / "manifest.json").read_text()))
    assert (layout.layers, layout.head_dim, layout.kv_heads) == (3 * 3, 16, 2)
    rt, ids = Runtime(x, threads=1), IDS.numpy()
    for loops in (1, 2, 3):
        logits, _ = rt.forward(ids, np.ones_like(ids), np.tile(np.arange(12), (2, 1)), rt.empty_past(2), loops)
        err = np.abs(logits - reference(w, IDS, loops=loops).numpy()).max()
        assert err <= 1e-4, (loops, err)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_int4_export_parity(imported, tmp_path, fused):
    from edgeloop.quantize import RTNConfig, quantize_checkpoint

    quantize_checkpoint(imported[2], tmp_path / "q", RTNConfig(group_size=16), progress=False)
    export_checkpoint(tmp_path / "q", tmp_path / "x", ExportConfig(fused=fused, max_loops=3, decode_steps=3))
    par = json.loads((tmp_path / "x" / "manifest.json").read_text())["parity"]
    errs = {k: v["max_abs_err"] for k, v in par.items() if isinstance(v, dict) and "max_abs_err" in v}
    assert errs and max(errs.values()) <= 1e-3, par


def _edit(folder, **kv):
    c = json.loads((folder / "config.json").read_text())
    c.update(kv)
    (folder / "config.json").write_text(json.dumps(c))


REFUSED = [("emb_neighbor_num", 3, "n-gram embeddings"), ("enable_double_loop_split", True, "LoopSplit"),
           ("loop_share_kv", True, "loop-shared KV"), ("enable_hyper_connection", True, "hyper-connections"),
           ("enable_mhc", True, "mHC"), ("enable_depth_attention", True, "depth attention"),
           ("qk_layernorm", True, "QK layernorm"), ("rope_scaling", {"type": "linear", "factor": 2.0}, "rotary scaling"),
           ("attention_bias", True, "attention biases"), ("hidden_act", "gelu", "SiLU"),
           ("layer_types", ["sliding_attention"] * 3, "full attention"),
           ("num_hidden_layers", 4, "'model.layers.3.input_layernorm.weight' is missing"),
           ("head_dim", 8, "'model.layers.0.self_attn.q_proj.weight' has shape")]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_is_one_line_and_writes_nothing(tmp_path, case):
    key, value, fragment = case
    src = write_nanbeige(tmp_path / "hf", shards=1)
    _edit(src, **{key: value})
    with pytest.raises(NanbeigeImportError) as e:
        import_folder(src, tmp_path / "out")
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg and len(msg) <= 300, msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"] and not (src / "RAN").exists()
    shutil.rmtree(src)


def test_cli_import_and_loop_loss_weights(tmp_path, monkeypatch, capsys):
    from tests.conftest import run_cli

    src = write_nanbeige(tmp_path / "hf", config=dict(CFG, num_loops=1, loop_loss_weights=[0.3, 0.3]), shards=1)
    code, out, err = run_cli(monkeypatch, capsys, "import", src, "-o", tmp_path / "el", "--json")
    assert code == 0, err
    assert json.loads(out)["num_loops"] == 3  # len(loop_loss_weights) + 1, as the reference runs it


def test_a_folder_without_tokenizer_config_gets_the_default(tmp_path):
    """tokenizer_config.json is optional in transformers: the import writes the default beside tokenizer.json,
    so `run` and `export` of the folder both find a complete tokenizer."""
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(300)}, unk_token="t0"))
    src = write_nanbeige(tmp_path / "hf", shards=1, tokenizer=tok)
    import_folder(src, tmp_path / "el")
    got = json.loads((tmp_path / "el" / "tokenizer_config.json").read_text())
    assert got["tokenizer_class"] == "PreTrainedTokenizerFast" and got["model_max_length"] == CFG["max_position_embeddings"]
    assert not (src / "tokenizer_config.json").exists()
