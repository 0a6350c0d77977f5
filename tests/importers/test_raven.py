"""Retrofitted-recurrence ("Raven") huginn_raven folders (tests/importers/raven_folder.py: Llama-3.2-like with
llama3 rope_scaling and GQA, sharded bf16; TinyLlama-like, MQA, fp32; OLMo-2-like, post-norm + full-width QK-norm):
the imported model's logits against the published equations (an independent plain implementation) at 1, 3 and
8 steps; KV-cache decode under both policies; fp32 ONNX logits against the equations, the INT4 exports' parity
plain and fused under both policies; the random start reads init_values.std; every refused feature is one line,
a non-zero exit from `edgeloop import`, and writes nothing."""
import json
import shutil

import numpy as np
import pytest
import torch

from edgeloop.export import ExportConfig, export_checkpoint
from edgeloop.importers import detect, import_folder
from edgeloop.model.checkpoint import load_model
from edgeloop.model.model import KVCache
from tests.conftest import run_cli
from tests.importers.raven_folder import (HUGINN_STD, LLAMA32, OLMO2, TINYLLAMA, raven_weights, reference_decode,
                                          reference_logits, write_raven)

IDS = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 299, 0, 61, 12, 140],
                    [299, 1, 2, 3, 150, 151, 9, 64, 128, 256, 31, 45]])
# name: (config, OLMo layout, shards, stored dtype)
VARIANTS = {"llama32": (LLAMA32, False, 3, torch.bfloat16), "tinyllama": (TINYLLAMA, False, 1, torch.float32),
            "olmo2": (OLMO2, True, 1, torch.bfloat16)}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """{variant: (weights, config, source folder, edgeloop folder, summary)}"""
    out = {}
    for name, (cfg, olmo, shards, dtype) in VARIANTS.items():
        root = tmp_path_factory.mktemp(name)
        w = raven_weights(cfg, olmo=olmo)
        src = write_raven(root / "hf", cfg, w, shards=shards, dtype=dtype)
        out[name] = (w, cfg, src, root / "el", import_folder(src, root / "el"))
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_equal_the_published_equations(imported, name):
    w, raw, src, el, s = imported[name]
    _, olmo, shards, dtype = VARIANTS[name]
    assert detect(src).name == "huginn_raven" and s["shards"] == shards
    assert s["stored_dtype"] == str(dtype).removeprefix("torch.") and s["block"] == ("postnorm" if olmo else "prenorm")
    model = load_model(el)
    cfg = model.cfg
    assert (cfg.rotary, cfg.injection, cfg.kv_policy, cfg.post_loop_norm, cfg.tie_embeddings, cfg.qk_bias) == \
        ("neox", "adapter", "shared", False, False, False)
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.qk_norm, cfg.qk_norm_full) == \
        (raw["num_key_value_heads"], 24 if olmo else 16, False, olmo)
    assert cfg.embed_scale == 1.0 and cfg.rope_theta == raw["rope_theta"] and cfg.norm_eps == raw["norm_eps"]
    assert cfg.rope_scaling == raw.get("rope_scaling", {"rope_type": "none"}) and cfg.max_seq_len == 64
    assert cfg.init_std == HUGINN_STD and cfg.extra["imported_from"]["init_std"] == HUGINN_STD
    with torch.no_grad():
        for steps in (1, 3, 8):
            ref, got = reference_logits(w, raw, IDS, steps, dtype), model(IDS, num_loops=steps)
            assert (got - ref).abs().max().item() <= 1e-4, (name, steps)
            assert ref.abs().max() > 1.0  # not trivially small
        assert (model(IDS, num_loops=1) - model(IDS, num_loops=8)).abs().max() > 0.1  # the dial does something
    if name == "llama32":  # rope_theta (not the conversion's rope_base) and the llama3 scaling both matter here
        ref = reference_logits(w, raw, IDS, 3, dtype)
        for wrong in ({k: v for k, v in raw.items() if k != "rope_scaling"}, dict(raw, rope_theta=raw["rope_base"])):
            assert (reference_logits(w, wrong, IDS, 3, dtype) - ref).abs().max() > 0.1
    assert not (src / "RAN").exists()  # the remote code never ran


@pytest.mark.parametrize("name", ["llama32", "olmo2"])
def test_kv_decode_equals_the_full_forward_under_both_policies(imported, name):
    w, raw, _, el, _ = imported[name]
    model = load_model(el)
    dtype = VARIANTS[name][3]
    chunks, steps = [5] + [1] * 7, 3
    with torch.no_grad():
        full = model(IDS, num_loops=steps)
        for policy in ("per-step", "shared"):
            cache, got, start = KVCache(model.cfg, policy), [], 0
            for n in chunks:
                got.append(model(IDS[:, start:start + n], num_loops=steps, cache=cache))
                start += n
            got = torch.cat(got, 1)
            ref = reference_decode(w, raw, IDS, steps, chunks, policy, dtype)
            assert (got - ref).abs().max().item() <= 2e-4, policy
            if policy == "per-step":  # one slot per (step, core layer): decoding is the full forward
                assert (got - full).abs().max().item() <= 1e-4
            assert sum(s is not None for s in cache.slots) == 1 + 2 * (steps if policy == "per-step" else 1) + 1


@pytest.mark.parametrize("name", ["llama32", "olmo2"])
def test_fp32_onnx_equals_the_published_equations_and_starts_at_the_sources_std(imported, name, tmp_path):
    import onnxruntime as ort

    from edgeloop.export.verify import empty_past, feeds_for

    w, raw, _, el, _ = imported[name]
    rep = export_checkpoint(el, tmp_path / "x", ExportConfig(init_state="random", decode_steps=2, parity_loops=(2,)))
    rs = rep["parity"]["random_start"]  # init_values.std read from config.json, not sqrt(2 / (5 d))
    assert rs["finite"] and rs["change_between_draws"] > 0 and rs["change_vs_zero_state"] > 0
    assert load_model(el).hc.injection.sigma() == HUGINN_STD
    sess = ort.InferenceSession(str(tmp_path / "x" / "model.onnx"), providers=["CPUExecutionProvider"])
    cfg = load_model(el).cfg
    for steps in (1, 6):
        feeds = feeds_for(cfg, IDS.numpy(), empty_past(cfg, 2), steps, True)
        got = sess.run(["logits"], {**feeds, "init_scale": np.array(0.0, np.float32)})[0]
        ref = reference_logits(w, raw, IDS, steps, VARIANTS[name][3]).numpy()
        assert np.abs(got - ref).max() <= 1e-4, (name, steps)


@pytest.fixture(scope="module")
def quantized(imported, tmp_path_factory):
    from edgeloop.quantize import RTNConfig, quantize_checkpoint

    root = tmp_path_factory.mktemp("raven-q")
    for name in ("llama32", "olmo2"):
        rep = quantize_checkpoint(imported[name][3], root / name, RTNConfig(group_size=16), progress=False)
        assert "middle.1.attn.c_k.weight" in rep["quantized"] and "middle.1.mlp.c_gate.weight" in rep["quantized"]
        if name == "olmo2":  # the QK-norm weights are norms: never INT4
            assert {"middle.1.attn.q_norm.weight", "end.0.attn.k_norm.weight"} <= set(rep["kept"])
    return root


@pytest.mark.parametrize("name,fused,policy", [("llama32", False, "per-step"), ("llama32", True, "shared"),
                                               ("olmo2", False, "shared"), ("olmo2", True, "per-step")])
def test_int4_export_parity_plain_and_fused(quantized, tmp_path, name, fused, policy):
    q = quantized / name
    export_checkpoint(q, tmp_path / "x", ExportConfig(fused=fused, kv_policy=policy, max_loops=8, decode_steps=3,
                                                        parity_loops=(2, 8)))
    m = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert m["kv_policy"] == policy and m["kv"]["layers"] == (1 + 2 + 1 if policy == "shared" else 1 + 8 * 2 + 1)
    par = m["parity"]
    errs = [v["max_abs_err"] for v in [*par["by_num_loops"].values(), par.get("left_padded_batch") or {}] if v]
    assert set(par["by_num_loops"]) == {"2", "8"} and max(errs) <= 1e-3 and par["max_abs_err"] <= 1e-3, par


@pytest.mark.parametrize("name", ["llama32", "olmo2"])
def test_written_back_as_a_huginn_raven_folder(imported, name, tmp_path):
    """importers/to_huginn.py writes a retrofit back: the source's tensors bit for bit, a config the published
    equations read to edgeloop's logits, and an import of it gives the same model (its start state zeros: std 0)."""
    from safetensors.torch import load_file

    from edgeloop.importers.to_huginn import write_huginn as write_back

    w, raw, _, el, _ = imported[name]
    folder = write_back(el, tmp_path / "hf")
    back, tensors = json.loads((folder / "config.json").read_text()), load_file(str(folder / "model.safetensors"))
    assert set(tensors) == set(w) and all(torch.equal(t, w[k].to(t.dtype)) for k, t in tensors.items())
    assert {k: back.get(k) for k in ("num_key_value_heads", "rope_theta", "rope_scaling", "tie_embeddings")} == \
        {k: raw.get(k) for k in ("num_key_value_heads", "rope_theta", "rope_scaling", "tie_embeddings")}
    assert back["init_values"] == {"embed_scale": 1.0, "std": 0.0} and back["state_init"] == "zero"
    model = load_model(el)
    with torch.no_grad():
        assert (model(IDS, num_loops=3) - reference_logits(tensors, back, IDS, 3)).abs().max().item() <= 1e-4
    import_folder(folder, tmp_path / "el")
    again = load_model(tmp_path / "el").cfg.to_dict()
    assert {k: v for k, v in again.items() if k not in ("extra", "init_std")} == \
        {k: v for k, v in model.cfg.to_dict().items() if k not in ("extra", "init_std")}


def test_llama3_tables_are_transformers_own():
    """Llama-3.2's own scaling (factor 32, 8192 original positions, theta 500000, head 64): the rotary tables
    are bit for bit transformers' _compute_llama3_parameters + its rotary's angles."""
    from types import SimpleNamespace

    from edgeloop.model.config import HyperloopConfig
    from edgeloop.model.pieces.rotary import rope_tables

    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    rs = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
          "rope_type": "llama3"}
    hf = SimpleNamespace(rope_theta=500000.0, hidden_size=2048, num_attention_heads=32, head_dim=64, rope_scaling=rs)
    inv, _ = rope_utils._compute_llama3_parameters(hf, "cpu")
    cfg = HyperloopConfig(d_model=2048, n_heads=32, n_kv_heads=8, rope_theta=500000.0, rope_scaling=rs,
                          max_seq_len=1 << 17).validate()
    cos, sin = rope_tables(cfg, cfg.max_seq_len)
    angles = (inv[None, :, None].float() @ torch.arange(cfg.max_seq_len).float()[None, None, :]).transpose(1, 2)[0]
    assert torch.equal(cos, angles.cos()) and torch.equal(sin, angles.sin())
    assert HyperloopConfig.from_dict(cfg.to_dict()).rope_scaling == rs  # JSON as it is


@pytest.mark.parametrize("change,fragment", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'rope_scaling'"),
    ({"rope_scaling": "llama3"}, "'rope_scaling'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "takes exactly the keys"),
    ({"rope_scaling": {"rope_type": "none", "factor": 8.0}}, "takes exactly the keys"),
    ({"rope_scaling": dict(LLAMA32["rope_scaling"], low_freq_factor=4.0)}, "below high_freq_factor"),
    ({"rope_scaling": dict(LLAMA32["rope_scaling"], factor=float("nan"))}, "'factor' must be a finite positive"),
    ({"qk_norm": True, "qk_norm_full": True}, "'qk_norm_full'"), ({"qk_norm_full": 1}, "'qk_norm_full'"),
    ({"init_std": -0.1}, "'init_std'")], ids=str)
def test_new_config_fields_are_validated(change, fragment):
    from edgeloop.model.config import PRESETS, ConfigError, HyperloopConfig

    d = dict(PRESETS["test-huginn"].to_dict(), **change)
    with pytest.raises(ConfigError, match=fragment):
        HyperloopConfig.from_dict(d)


def _edit(folder, **kv):
    c = json.loads((folder / "config.json").read_text())
    c.update(kv)
    (folder / "config.json").write_text(json.dumps(c))


def _strip(folder, key):
    c = json.loads((folder / "config.json").read_text())
    c.pop(key)
    (folder / "config.json").write_text(json.dumps(c))


def _tensors(folder, fn):
    from safetensors.torch import load_file, save_file

    st = load_file(str(folder / "model.safetensors"))
    fn(st)
    save_file(st, str(folder / "model.safetensors"))


LLAMA3 = LLAMA32["rope_scaling"]
REFUSED = [
    ("yarn", "llama", lambda f: _edit(f, rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type 'yarn'"),
    ("linear (legacy key)", "llama", lambda f: _edit(f, rope_scaling={"type": "linear", "factor": 2.0}),
     "rope_type 'linear'"),
    ("llama3 incomplete", "llama", lambda f: _edit(f, rope_scaling={k: v for k, v in LLAMA3.items()
                                                                    if k != "high_freq_factor"}),
     "llama3 without 'high_freq_factor'"),
    ("rope_parameters", "llama", lambda f: _edit(f, rope_parameters={"rope_type": "default"}), "rope_parameters"),
    ("partial rotary", "olmo", lambda f: _edit(f, partial_rotary_factor=0.5), "partial_rotary_factor = 0.5"),
    ("test-time noise", "llama", lambda f: _edit(f, test_time_noise=0.1), "test_time_noise = 0.1"),
    ("fork start state", "olmo", lambda f: _edit(f, initial_state_mode="skip-adapter"),
     "initial_state_mode = 'skip-adapter'"),
    ("state_init", "llama", lambda f: _edit(f, state_init="normal"), "state_init = 'normal'"),
    ("soft-capping", "olmo", lambda f: _edit(f, final_logit_softcapping=30.0), "soft-capping"),
    ("adapter bias", "llama", lambda f: _edit(f, bias=True), "bias = True"),
    ("qk_bias field", "llama", lambda f: _edit(f, qk_bias=True), "qk_bias = True"),
    ("qk_bias tensor", "llama", lambda f: _tensors(f, lambda st: st.update(
        {"transformer.coda.0.attn.qk_bias": torch.zeros(2, 1, 4, 16)})), "q/k biases"),
    ("kv heads", "llama", lambda f: _edit(f, num_key_value_heads=3), "num_key_value_heads = 3: does not divide"),
    ("llama head_dim", "llama", lambda f: _edit(f, head_dim=8), "head_dim = 8"),
    ("block class", "olmo", lambda f: _edit(f, block_class_name="TransformerPreNormBlock"), "block_class_name"),
    ("tie ambiguity", "llama", lambda f: _strip(f, "tie_embeddings"), "tie_word_embeddings = False"),
    ("eps ambiguity", "olmo", lambda f: _strip(f, "norm_eps") or _edit(f, rms_norm_eps=1e-5), "rms_norm_eps"),
    ("one k_norm missing", "olmo", lambda f: _tensors(f, lambda st: st.pop("transformer.coda.0.attn.k_norm.weight")),
     "'transformer.coda.0.attn.k_norm.weight' is missing"),
    ("shape", "olmo", lambda f: _edit(f, head_dim=16), "'transformer.prelude.0.attn.Wqkv.weight' has shape"),
    ("nan", "llama", lambda f: _tensors(f, lambda st: st["transformer.ln_f.weight"].__setitem__(0, float("nan"))),
     "NaN"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_is_one_line_a_failed_cli_and_writes_nothing(tmp_path, monkeypatch, capsys, case):
    name, layout, edit, fragment = case
    cfg, olmo = (OLMO2, True) if layout == "olmo" else (TINYLLAMA, False)
    src = write_raven(tmp_path / "hf", cfg, raven_weights(cfg, seed=1, olmo=olmo), dtype=torch.float32)
    edit(src)
    code, out, err = run_cli(monkeypatch, capsys, "import", src, "-o", tmp_path / "out")
    msg = err.strip()
    assert code != 0 and fragment in msg and "\n" not in msg and len(msg) <= 300, (name, msg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"] and not (src / "RAN").exists(), name
    shutil.rmtree(src)
