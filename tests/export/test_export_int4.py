"""INT4 exports: MatMulNBits inside the Loop body, weights once, parity with the INT4 PyTorch reference,
QDQ == MatMulNBits, and the two real clients (onnxruntime-genai, optimum) on the demo model."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgeloop.export import ExportConfig, export_checkpoint
from edgeloop.export.verify import empty_past, parity
from edgeloop.model.checkpoint import load_tokenizer, save_checkpoint
from edgeloop.model.data import train_tokenizer
from edgeloop.model.evaluate import generate
from edgeloop.quantize import RTNConfig, load_checkpoint, quantize_checkpoint
from tests.conftest import perturbed

QC = dict(group_size=32)


def session(folder, accuracy_level=0):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    return ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def int4(tmp_path_factory):
    """{variant: (quantized checkpoint, matmulnbits export, qdq export)}"""
    tok = train_tokenizer("In the beginning God created the heaven and the earth.\n" * 50, 300)
    out = {}
    for name, sym in [("test-dynamic", False), ("test-none", True)]:
        root = tmp_path_factory.mktemp(name)
        save_checkpoint(perturbed(name), root / "ck", tokenizer=tok)
        quantize_checkpoint(root / "ck", root / "q", RTNConfig(sym=sym, **QC), progress=False)
        export_checkpoint(root / "q", root / "nbits", ExportConfig())
        export_checkpoint(root / "q", root / "qdq", ExportConfig(format="qdq"))
        out[name] = (root / "q", root / "nbits", root / "qdq")
    return out


@pytest.mark.parametrize("name", ["test-dynamic", "test-none"])
def test_loop_body_holds_matmulnbits_and_weights_once(int4, name):
    q, nbits, _ = int4[name]
    m = onnx.load(str(nbits / "model.onnx"))
    (loop,) = [n for n in m.graph.node if n.op_type == "Loop"]
    body_ops = [n.op_type for n in loop.attribute[0].g.node]
    cfg = load_checkpoint(q).cfg
    # q k v o + fc gate proj of every middle layer, and the inject projection when there is one
    assert body_ops.count("MatMulNBits") == cfg.n_middle * 7 + (cfg.injection == "inject")
    # the remaining MatMuls are attention and hyper-connection math, never a float copy of a linear weight
    assert not [i for n in loop.attribute[0].g.node if n.op_type == "MatMul" for i in n.input if "weight" in i]
    names = [i.name for i in m.graph.initializer]
    assert names.count("middle.0.attn.c_q.qweight") == 1 and not any(n.startswith("middle.0.attn.c_q.weight") for n in names)
    assert m.graph.initializer[names.index("middle.0.attn.c_q.qweight")].data_type == onnx.TensorProto.UINT8


@pytest.mark.parametrize("name", ["test-dynamic", "test-none"])
def test_int4_matches_int4_reference_for_every_loop_count(int4, name):
    q, nbits, qdq = int4[name]
    model = load_checkpoint(q)
    r = model.cfg.num_loops
    for folder in (nbits, qdq):
        figures = parity(session(folder), model, [4, 8, 15, 16, 23, 42], decode_steps=5,
                         loop_counts=list(range(1, r + 1)))
        assert max(f["max_abs_err"] for f in figures.values()) <= 1e-3, (folder.name, figures)


def test_qdq_and_matmulnbits_agree(int4):
    q, nbits, qdq = int4["test-dynamic"]
    cfg = load_checkpoint(q).cfg
    ids = np.array([[1, 2, 3, 4, 5, 6, 7, 8]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(8)[None],
             **empty_past(cfg)}
    a, b = session(nbits).run(None, feeds), session(qdq).run(None, feeds)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-4)
    qm = onnx.load(str(qdq / "model.onnx"))
    dq = [n for n in qm.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all(a.name != "block_size" or a.i == 32 for n in dq for a in n.attribute)
    assert not any(n.domain == "com.microsoft" for n in qm.graph.node)  # portable: standard ops only


def test_quantized_hc_is_refused(tmp_path):
    tok = train_tokenizer("And God said, Let there be light: and there was light.\n" * 40, 300)
    save_checkpoint(perturbed("test-dynamic"), tmp_path / "ck", tokenizer=tok)
    quantize_checkpoint(tmp_path / "ck", tmp_path / "q", RTNConfig(quantize_hc=True, **QC), progress=False)
    with pytest.raises(ValueError, match="--quantize-hc"):
        export_checkpoint(tmp_path / "q", tmp_path / "out", ExportConfig())
    assert not (tmp_path / "out").exists()


# ---- the two real clients, on the trained demo model (tests/conftest.py: demo_int4) ------------


def reference_tokens(q, prompt, n):
    tok = load_tokenizer(q)
    ids = tok.encode(prompt, add_special_tokens=False).ids
    return ids, list(generate(load_checkpoint(q), ids, n))


@pytest.mark.parametrize("graph", ["plain", "fused in place", "fused Loop in place"])
def test_onnxruntime_genai_generates_the_same_tokens(demo_int4, graph, tmp_path):
    """onnxruntime-genai drives the export; the fused ones (unrolled, and one Loop) with
    past_present_share_buffer (their keys and values written into the past buffers genai allocates)."""
    og = pytest.importorskip("onnxruntime_genai", reason="install onnxruntime-genai (the test extra has it)")
    onnx_dir, q = demo_int4, demo_int4.parent / "ck"
    if graph != "plain":
        onnx_dir = tmp_path / "fused"
        export_checkpoint(q, onnx_dir, ExportConfig(fused=True, unroll=graph == "fused in place", decode_steps=2,
                                                    max_loops=load_checkpoint(q).cfg.num_loops))
        assert json.loads((onnx_dir / "genai_config.json").read_text())["search"]["past_present_share_buffer"]
    ids, ref = reference_tokens(q, "And the LORD spake unto Moses, saying", 20)
    model = og.Model(str(onnx_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 20, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(ids, np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    assert [int(t) for t in gen.get_sequence(0)][len(ids):] == ref
    assert len(set(ref)) > 3  # a real continuation, not one repeated token
    assert list(og.Tokenizer(model).encode("And the LORD")) == load_tokenizer(q).encode("And the LORD").ids


@pytest.mark.parametrize("unroll", [False, True], ids=["Loop", "unrolled"])
def test_onnxruntime_genai_drives_rotary_inside_group_query_attention(tmp_path, unroll):
    """A model without QK-norm and with exact rotary tables: the fused graph lets GroupQueryAttention rotate
    (no RotaryEmbedding node, positions counted from each buffer's start); genai, which writes the cache into
    its own buffers, gives the PyTorch reference's greedy tokens (dynamic hyper-connections, r = 3)."""
    import dataclasses

    from edgeloop.model.config import PRESETS
    from edgeloop.model.model import Hyperloop

    og = pytest.importorskip("onnxruntime_genai", reason="install onnxruntime-genai (the test extra has it)")
    from tests.export.test_fused import ops

    torch.manual_seed(0)
    m = Hyperloop(dataclasses.replace(PRESETS["test-dynamic"], qk_norm=False))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    tok = train_tokenizer("In the beginning God created the heaven and the earth.\n" * 50, 300)
    save_checkpoint(m.eval(), tmp_path / "ck", tokenizer=tok)
    quantize_checkpoint(tmp_path / "ck", tmp_path / "q", RTNConfig(**QC), progress=False)
    out = tmp_path / "fused"
    export_checkpoint(tmp_path / "q", out, ExportConfig(fused=True, unroll=unroll, decode_steps=2, max_loops=3))
    c = ops(out / "model.onnx")
    assert "RotaryEmbedding" not in c and c["GroupQueryAttention"] > 0
    ids, ref = reference_tokens(tmp_path / "q", "In the beginning God", 20)
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 20, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(ids, np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    assert [int(t) for t in gen.get_sequence(0)][len(ids):] == ref and len(set(ref)) > 3


def test_optimum_generates_the_same_tokens(demo_int4):
    pytest.importorskip("optimum.onnxruntime", reason="install optimum-onnx (the test extra has it)")
    from optimum.onnxruntime import ORTModelForCausalLM

    onnx_dir, q = demo_int4, demo_int4.parent / "ck"
    ids, ref = reference_tokens(q, "In the beginning", 20)
    m = ORTModelForCausalLM.from_pretrained(onnx_dir, use_cache=True, use_io_binding=False)
    out = m.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                     max_new_tokens=20, do_sample=False)
    assert out[0, len(ids):].tolist() == ref
    assert json.loads((onnx_dir / "config.json").read_text())["num_hidden_layers"] == load_checkpoint(q).cfg.effective_layers


@pytest.mark.parametrize("bits,sym", [(8, False), (4, True)])
def test_tied_embedding_codes_stored_once_for_lookup_and_head(tmp_path, bits, sym):
    """The quantized tied embedding is one initializer read by GatherBlockQuantized (lookup) and MatMulNBits
    (lm_head); the export's own parity check against the dequantized PyTorch reference passes."""
    tok = train_tokenizer("In the beginning God created the heaven and the earth.\n" * 50, 300)
    save_checkpoint(perturbed("test-dynamic"), tmp_path / "ck", tokenizer=tok)
    quantize_checkpoint(tmp_path / "ck", tmp_path / "q", RTNConfig(embedding_bits=bits, sym=sym, group_size=32),
                        progress=False)
    export_checkpoint(tmp_path / "q", tmp_path / "x", ExportConfig())  # parity-checked (it fails otherwise)
    m = onnx.load(str(tmp_path / "x" / "model.onnx"))
    readers = sorted(n.op_type for n in m.graph.node if "embed.qweight" in n.input)
    assert readers == ["GatherBlockQuantized", "MatMulNBits"]
    assert {a.name: a.i for n in m.graph.node if n.op_type == "GatherBlockQuantized" for a in n.attribute}["bits"] == bits
    init = {i.name: i for i in m.graph.initializer}
    assert "embed.weight" not in init and list(init["embed.qweight"].dims) == [320, 2, 32 * bits // 8]
    assert not [n for n in m.graph.node if n.op_type == "Gemm"]  # no float head left


def test_unrolled_export_keeps_the_loop_count_dial(demo_int4, tmp_path):
    """--unroll with max_loops > r (the demo: r = 4, max 6): no Loop, loops 2.. each behind If(l < num_loops),
    num_loops an input up to 6, parity-checked at several counts, in place when fused; the same tokens as
    the Loop export at r and at fewer loops."""
    from edgeloop.runtime import Runtime

    q = demo_int4.parent / "ck"
    x = tmp_path / "unrolled"
    rep = export_checkpoint(q, x, ExportConfig(fused=True, unroll=True, decode_steps=2))
    m = json.loads((x / "manifest.json").read_text())
    assert m["unroll"] and not m["graph"]["loop"] and m["max_loops"] == 6 and m["num_loops"] == 4
    assert len(rep["parity"]["by_num_loops"]) >= 2 and m["kv"]["in_place"]
    assert m["graph"]["ops"]["If"] == 5  # loops 2..6
    un, loop = Runtime(x, threads=1), Runtime(demo_int4, threads=1)
    assert un.has_num_loops and un.max_loops == 6
    ids = load_tokenizer(q).encode("And God said", add_special_tokens=False).ids
    for L in (2, 4):
        assert un.generate_ids([ids], 8, stop=(), num_loops=L).tokens == loop.generate_ids([ids], 8, stop=(), num_loops=L).tokens
    assert len(un.generate_ids([ids], 4, stop=(), num_loops=6).tokens[0]) == 4
