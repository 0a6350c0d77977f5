"""Huginn-0125 (huginn_raven) folders as the Hub ships them, written by the test (random weights, every
parameter far from its init): the imported model's logits against the published equations (an independent
plain implementation) at 1, 4 and 8 steps; sharded / bf16 / tied / duplicated lm_head / freqs_cis variants;
KV-cache decode under both policies; INT4 export parity at 1, r and 2r; the remote code never runs; every
bad input is one line and writes nothing."""
import json
import math
import shutil

import pytest
import torch

from edgeloop.export import ExportConfig, export_checkpoint
from edgeloop.export.verify import parity
from edgeloop.importers import detect, import_folder
from edgeloop.importers.huginn import HuginnImportError
from edgeloop.model.checkpoint import load_model
from edgeloop.model.config import HyperloopConfig
from edgeloop.model.model import KVCache
from tests.conftest import run_cli
from tests.importers.huginn_folder import CFG, huginn_weights, reference_decode, reference_logits, write_huginn

IDS = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 299, 0, 61, 12, 140],
                    [299, 1, 2, 3, 150, 151, 9, 64, 128, 256, 31, 45]])


@pytest.fixture(scope="module")
def tok():
    from edgeloop.model.data import train_tokenizer

    return train_tokenizer("In the beginning God created the heaven and the earth.\n" * 40, 290)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(weights, huginn folder (3 shards + index), edgeloop folder, summary)."""
    root = tmp_path_factory.mktemp("huginn")
    w = huginn_weights()
    src = write_huginn(root / "hf", w, shards=3)
    return w, src, root / "el", import_folder(src, root / "el")


def test_logits_equal_the_published_equations(imported):
    w, src, el, s = imported
    assert detect(src).name == "huginn_raven" and s["shards"] == 3 and s["ignored"] == ["freqs_cis", "lm_head.weight"]
    model = load_model(el)
    cfg = model.cfg
    assert (cfg.block, cfg.rotary, cfg.injection, cfg.kv_policy) == ("sandwich", "interleaved", "adapter", "shared")
    assert cfg.embed_scale == math.sqrt(CFG["n_embd"]) and cfg.num_loops == 4 and cfg.loop_limit == 64
    with torch.no_grad():
        for steps in (1, 4, 8):
            ref, got = reference_logits(w, IDS, steps), model(IDS, num_loops=steps)
            assert (got - ref).abs().max().item() <= 1e-4, steps
            assert ref.abs().max() > 1.0  # not trivially small
        assert (model(IDS, num_loops=1) - model(IDS, num_loops=8)).abs().max() > 0.1  # the dial does something
    assert not (src / "RAN").exists()  # raven_modeling_minimal.py was never imported


@pytest.mark.parametrize("variant", ["bf16-one-file", "tied-absent-no-freqs", "untied"])
def test_folder_variants_import(tmp_path, variant):
    w = huginn_weights(seed=1)
    cfg, dtype = dict(CFG), torch.float32
    kw = {}
    if variant == "bf16-one-file":
        dtype = kw["dtype"] = torch.bfloat16
    elif variant == "tied-absent-no-freqs":
        kw.update(lm_head=False, with_freqs=False)
    else:
        cfg["tie_embeddings"] = False
        w["lm_head.weight"] = torch.randn(300, 48, generator=torch.Generator().manual_seed(7)) * 0.3
        kw.update(lm_head=False, config=cfg)
    src = write_huginn(tmp_path / "hf", w, **kw)
    s = import_folder(src, tmp_path / "el")
    model = load_model(tmp_path / "el")
    assert model.cfg.tie_embeddings == (variant != "untied")
    with torch.no_grad():
        assert (model(IDS, num_loops=4) - reference_logits(w, IDS, 4, cfg, dtype)).abs().max() <= 1e-4
    assert s["stored_dtype"] == ("bfloat16" if variant == "bf16-one-file" else "float32")


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_kv_decode_per_step_and_shared(imported, steps):
    w, _, el, _ = imported
    model = load_model(el)
    chunks = [5] + [1] * 7
    with torch.no_grad():
        for policy in ("per-step", "shared"):
            cache = KVCache(model.cfg, policy)
            got, start = [], 0
            for n in chunks:
                got.append(model(IDS[:, start:start + n], num_loops=steps, cache=cache))
                start += n
            ref = reference_decode(w, IDS, steps, chunks, policy)  # fp32 sums in another order: ~1e-5 relative
            assert (torch.cat(got, 1) - ref).abs().max().item() <= 2e-4, policy
            want = 1 + 2 * (steps if policy == "per-step" else 1) + 1  # slots that grew
            assert sum(s is not None for s in cache.slots) == want
        if steps > 1:  # shared differs from per-step: earlier tokens are read at their last step
            assert (ref - reference_decode(w, IDS, steps, chunks, "per-step")).abs().max() > 1e-3


def test_int4_export_parity_at_1_r_and_2r_under_both_policies(imported, tmp_path):
    from edgeloop.quantize import RTNConfig, load_checkpoint, quantize_checkpoint

    _, src, el, _ = imported
    quantize_checkpoint(el, tmp_path / "q", RTNConfig(group_size=16), progress=False)
    ref = load_checkpoint(tmp_path / "q")
    import onnxruntime as ort

    for policy in ("shared", "per-step"):
        out = tmp_path / f"x-{policy}"
        rep = export_checkpoint(tmp_path / "q", out, ExportConfig(kv_policy=policy, max_loops=8, decode_steps=4))
        m = json.loads((out / "manifest.json").read_text())
        assert m["kv_policy"] == policy and m["max_loops"] == 8 and rep["graph"]["loop"]
        assert m["trained_loops"]["mean"] == 4  # the folder's mean_recurrence
        assert m["kv"]["layers"] == (4 if policy == "shared" else 1 + 8 * 2 + 1)
        sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        ref.cfg = HyperloopConfig.from_dict(m["config"])  # the export's policy and max_loops, the same weights
        figures = parity(sess, ref, [5, 17, 42, 7, 99, 3], decode_steps=4, loop_counts=[1, 4, 8], policy=policy)
        assert max(f["max_abs_err"] for f in figures.values()) <= 1e-3, (policy, figures)


def test_quantize_and_export_take_the_folder_directly(imported, tmp_path, tok, monkeypatch, capsys):
    from tokenizers import Tokenizer

    w = huginn_weights(seed=2)
    chat_tok = Tokenizer.from_str(tok.to_str())
    specials = ["<|begin_text|>", "<|begin_header|>", "<|end_header|>", "<|end_turn|>"]
    chat_tok.add_special_tokens(specials)
    src = write_huginn(tmp_path / "hf", w, tokenizer=chat_tok)
    code, out, err = run_cli(monkeypatch, capsys, "quantize", src, "-o", tmp_path / "q", "--group-size", "16")
    assert code == 0, err
    code, out, err = run_cli(monkeypatch, capsys, "export", tmp_path / "q", "-o", tmp_path / "x", "--json")
    assert code == 0, err
    x = tmp_path / "x"
    m = json.loads((x / "manifest.json").read_text())
    assert m["generation"] == {"bos_token_id": 4, "eos_token_id": [5, 8], "pad_token_id": 9}
    genai = json.loads((x / "genai_config.json").read_text())["model"]
    assert genai["eos_token_id"] == [5, 8] and genai["decoder"]["num_hidden_layers"] == 4  # shared KV: 4 slots
    code, out, err = run_cli(monkeypatch, capsys, "generate", x, "--prompt", "In the beginning", "--chat",
                             "--max-new-tokens", "4")
    assert code == 0, err
    from edgeloop.runtime import Runtime

    ids = Runtime(x, threads=1).chat("In the beginning  ")  # the folder's template, its {% generation %} tag too
    assert chat_tok.decode(ids, skip_special_tokens=False).replace(" ", "") == \
        "<|begin_text|><|begin_header|>user<|end_header|>\n\nInthebeginning<|end_turn|><|begin_header|>Huginn" \
        "<|end_header|>\n\n"
    assert ids[:2] == [chat_tok.token_to_id(t) for t in specials[:2]] and "Huginn" in out
    assert not (src / "RAN").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["hf", "q", "x"]


def test_random_start_export(imported, tmp_path):
    _, _, el, _ = imported
    rep = export_checkpoint(el, tmp_path / "x", ExportConfig(init_state="random", seed=7, decode_steps=2))
    rs = rep["parity"]["random_start"]  # parity ran init_scale 0 (the zero state); the random one is live
    assert rs["finite"] and rs["change_between_draws"] > 0 and rs["change_vs_zero_state"] > 0
    with pytest.raises(ValueError, match="--init-state random"):
        from tests.conftest import DEMO

        export_checkpoint(DEMO, tmp_path / "y", ExportConfig(init_state="random"))


def _edit_config(folder, **kv):
    c = json.loads((folder / "config.json").read_text())
    c.update(kv)
    (folder / "config.json").write_text(json.dumps(c))


def _drop(folder, name):
    from safetensors.torch import load_file, save_file

    st = load_file(str(folder / "model.safetensors"))
    st.pop(name)
    save_file(st, str(folder / "model.safetensors"))


def _add(folder, name, t):
    from safetensors.torch import load_file, save_file

    st = load_file(str(folder / "model.safetensors"))
    st[name] = t
    save_file(st, str(folder / "model.safetensors"))


def _index_lost_tensor(folder):
    idx = json.loads((folder / "model.safetensors.index.json").read_text())
    name = next(n for n, f in idx["weight_map"].items() if f.startswith("model-00002"))
    idx["weight_map"][name] = "model-00001-of-00002.safetensors"  # a shard that does not hold it
    (folder / "model.safetensors.index.json").write_text(json.dumps(idx))


BAD = [
    ("missing shard", 2, lambda f: (f / "model-00002-of-00002.safetensors").unlink(), "names shard 'model-00002"),
    ("index names a tensor not in its shard", 2, _index_lost_tensor, "which does not hold it"),
    ("gqa", 1, lambda f: _edit_config(f, num_key_value_heads=2), "num_key_value_heads = 2: grouped-query"),
    ("rope scaling", 1, lambda f: _edit_config(f, rope_scaling={"rope_type": "llama3"}), "rope_scaling"),
    ("soft-capping", 1, lambda f: _edit_config(f, final_logit_softcapping=30.0), "soft-capping"),
    ("pre-norm block", 1, lambda f: _edit_config(f, block_class_name="TransformerPreNormBlock"), "block_class_name"),
    ("GeGLU", 1, lambda f: _edit_config(f, nonlin_name="GELU"), "nonlin_name = 'GELU'"),
    ("no embed scale", 1, lambda f: _edit_config(f, init_values={"embed_scale": 1.0}), "embed_scale = 1.0"),
    ("no norm_4", 1, lambda f: _drop(f, "transformer.coda.0.norm_4.weight"), "not a sandwich block"),
    ("qk norm", 1, lambda f: _add(f, "transformer.coda.0.attn.q_norm.weight", torch.ones(48)), "QK-norm"),
    ("shape", 1, lambda f: _edit_config(f, intermediate_size=64), "'transformer.prelude.0.mlp.fc.weight' has shape"),
    ("missing field", 1, lambda f: _edit_config(f, mean_recurrence=None) or _strip(f, "mean_recurrence"),
     "'mean_recurrence' is missing"),
    ("nan", 1, lambda f: _add(f, "transformer.ln_f.weight", torch.full((48,), float("nan"))), "NaN"),
]


def _strip(folder, key):
    c = json.loads((folder / "config.json").read_text())
    c.pop(key)
    (folder / "config.json").write_text(json.dumps(c))


@pytest.mark.parametrize("case", range(len(BAD)), ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case):
    name, shards, edit, fragment = BAD[case]
    src = write_huginn(tmp_path / "hf", shards=shards)
    edit(src)
    with pytest.raises(HuginnImportError) as e:
        import_folder(src, tmp_path / "out")
    assert fragment in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"], name
    assert not (src / "RAN").exists()
    shutil.rmtree(src)
