"""The fused graph (export --fused: onnxruntime's GroupQueryAttention, SimplifiedLayerNormalization,
SkipSimplifiedLayerNormalization, q/k/v and gate/up as one MatMulNBits each) for every block and
hyper-connection kind, inside the Loop, with fewer loops and left-padded batches; and the fp16 KV cache."""
import json

import numpy as np
import onnx
import pytest
import torch

from edgeloop.export import ExportConfig, export_checkpoint
from edgeloop.model.checkpoint import save_checkpoint
from edgeloop.model.data import train_tokenizer
from edgeloop.quantize import RTNConfig, quantize_checkpoint
from tests.conftest import perturbed

KINDS = ["test-dynamic", "test-static", "test-none", "test-huginn", "test-ouro", "test-geglu", "test-standard"]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    tok = train_tokenizer("In the beginning God created the heaven and the earth.\n" * 50, 300)
    out = {}
    for name in KINDS:
        root = tmp_path_factory.mktemp(name)
        m = perturbed(name)
        if m.exit_gate is not None:
            with torch.no_grad():
                m.exit_gate.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
        save_checkpoint(m, root / "ck", tokenizer=tok)
        quantize_checkpoint(root / "ck", root / "q", RTNConfig(group_size=32), progress=False)
        out[name] = root
    return out


def ops(path) -> dict[str, int]:
    """Every node of the model, subgraphs included, by op type."""
    counts: dict[str, int] = {}

    def walk(graph):
        for n in graph.node:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(onnx.load(str(path), load_external_data=False).graph)
    return counts


@pytest.mark.parametrize("name", KINDS)
def test_fused_export_passes_parity_with_the_fused_kernels(quantized, name):
    root = quantized[name]
    rep = export_checkpoint(root / "q", root / "fused", ExportConfig(fused=True, decode_steps=6))
    m = json.loads((root / "fused" / "manifest.json").read_text())
    assert m["fused"] and rep["parity"]["left_padded_batch"]["batch"] == 2  # parity-checked, padding included
    # in place (the Loop's slots written by ScatterND), checked against the growing cache at r and fewer loops
    assert m["kv"]["in_place"] and rep["parity"]["in_place"]["max_abs_diff"] <= 1e-4
    cfg = perturbed(name).cfg
    assert len(rep["parity"]["in_place"]["by_num_loops"]) == min(2, cfg.num_loops)
    c = ops(root / "fused" / "model.onnx")
    blocks = cfg.n_begin + cfg.n_middle + cfg.n_end
    # one GroupQueryAttention per begin / end block, one per loop leaf of each middle block's If tree
    assert c["GroupQueryAttention"] >= blocks and "Softmax" not in c
    assert c.get("SimplifiedLayerNormalization", 0) + c.get("SkipSimplifiedLayerNormalization", 0) >= blocks
    assert c["MatMulNBits"] <= 4 * blocks + 2  # q/k/v one, out one, gate/up one, down one (+ inject, head)
    # rotary inside GroupQueryAttention (positions shifted by each row's padding) where the tables are exact
    # rotations and no QK-norm sits between: the padded parity above holds it to the reference's position_ids
    assert ("RotaryEmbedding" in c) == (cfg.qk_norm or cfg.rope_bf16)


def test_rotary_at_position_ids_keeps_rotary_embedding(quantized):
    """--rotary-at-position-ids: the fused graph rotates by RotaryEmbedding at the position_ids input even where
    GroupQueryAttention could (its own rotary counts positions from seqlens_k); the manifest says which, and
    both pass the padded parity check."""
    root = quantized["test-standard"]
    default = export_checkpoint(root / "q", root / "gqa-rot", ExportConfig(fused=True, decode_steps=2))
    asked = export_checkpoint(root / "q", root / "pos-rot", ExportConfig(fused=True, rotary_at_position_ids=True,
                                                                         decode_steps=2))
    assert default["rotary"] == "GroupQueryAttention" and "RotaryEmbedding" not in ops(root / "gqa-rot" / "model.onnx")
    assert asked["rotary"] == "RotaryEmbedding" and ops(root / "pos-rot" / "model.onnx")["RotaryEmbedding"] > 0
    assert json.loads((root / "pos-rot" / "manifest.json").read_text())["rotary"] == "RotaryEmbedding"
    assert asked["parity"]["left_padded_batch"]["max_abs_err"] <= 1e-3


def test_fused_runtime_left_padded_batch_equals_one_by_one(quantized):
    from edgeloop.runtime import Runtime

    root = quantized["test-dynamic"]
    x = root / "fused-rt"
    export_checkpoint(root / "q", x, ExportConfig(fused=True, decode_steps=2))
    rt = Runtime(x, threads=1)
    prompts = [[5, 17, 42, 7, 99, 3, 8], [11, 12], [250, 1, 2, 3]]
    batch = rt.generate_ids(prompts, 8, stop=())
    assert batch.tokens == [rt.generate_ids([p], 8, stop=()).tokens[0] for p in prompts]
    assert [rt.generate_ids([p], 6, stop=(), num_loops=1).tokens[0] for p in prompts] != batch.tokens  # loops matter


def test_fused_continuation_of_several_tokens(quantized):
    """A prompt continued by several tokens after its past (chat's next turn) gives the logits of the whole
    prompt at once, rotary inside GroupQueryAttention, growing and in place; a batch continued that way is
    refused in one line (onnxruntime's CPU GroupQueryAttention continues a batch one token at a time)."""
    from edgeloop.runtime import Runtime
    from edgeloop.runtime.session import RuntimeInputError

    root = quantized["test-standard"]
    export_checkpoint(root / "q", root / "fused-cont", ExportConfig(fused=True, decode_steps=2))
    rt = Runtime(root / "fused-cont", threads=1)
    x = np.array([list(range(5, 20))], np.int64)
    ones, pos = np.ones_like(x), np.arange(15)[None]
    full, _ = rt.forward(x, ones, pos, rt.empty_past(1), rt.num_loops)
    for past, in_place in ((rt.empty_past(1), False), (rt.buffer_past(1, 32), True)):
        _, past = rt.forward(x[:, :10], ones[:, :10], pos[:, :10], past, rt.num_loops, in_place=in_place)
        rest, _ = rt.forward(x[:, 10:], ones, pos[:, 10:], past, rt.num_loops, in_place=in_place)
        assert np.abs(rest - full[:, 10:]).max() <= 1e-4
    x2 = np.concatenate([x, x])
    _, past = rt.forward(x2[:, :10], np.ones((2, 10), np.int64), np.tile(pos[:, :10], (2, 1)), rt.empty_past(2),
                         rt.num_loops)
    with pytest.raises(RuntimeInputError, match="continues a batch one token at a time"):
        rt.forward(x2[:, 10:], np.ones((2, 15), np.int64), np.tile(pos[:, 10:], (2, 1)), past, rt.num_loops)


def test_fp16_kv_cache_halves_the_cache_and_reports_its_drift(quantized):
    from edgeloop.runtime import Runtime
    from edgeloop.runtime.drift import evaluate_drift

    root = quantized["test-huginn"]
    x = root / "kv16"
    export_checkpoint(root / "ck", x, ExportConfig(kv_dtype="float16", decode_steps=6))
    rt = Runtime(x, threads=1)
    assert rt.kv.dtype == "float16" and rt.empty_past(1)["past_key_values.0.key"].dtype == np.float16
    names = [o.name for o in rt.session.get_outputs()]
    x1 = np.array([[5, 17, 42]], np.int64)
    outs = rt.session.run(None, {"input_ids": x1, "attention_mask": np.ones_like(x1),
                                 "position_ids": np.arange(3)[None], **rt.empty_past(1)})
    assert outs[names.index("present.0.key")].dtype == np.float16
    fp32 = root / "kv32"
    export_checkpoint(root / "ck", fp32, ExportConfig(decode_steps=2))
    assert Runtime(fp32, threads=1).kv_bytes_per_token() == 2 * rt.kv_bytes_per_token()
    (root / "text.txt").write_text("In the beginning God created the heaven and the earth.\n" * 8)
    r = evaluate_drift(x, tokens=200, text=root / "text.txt", threads=1, kv_tokens=40)
    k = r["kv_cache"]  # token by token through the cache: the fp16 cache against an fp32 one
    assert k["dtype"] == "float16" and k["policy"] == "shared" and abs(k["fp16_vs_fp32_cache_pct"]) < 1.0
    assert abs(k["decode_ppl"] / k["reference_decode_ppl"] - 1) < 1e-3 and "shared_vs_per_step_pct" in k


def test_fused_exports_write_the_kv_cache_in_place(quantized, monkeypatch):
    """Every present of the unrolled fused graph is GroupQueryAttention's over its own past, and the Loop's
    middle slots are ScatterND into theirs: kv.in_place, the export checks the in-place cache against the
    growing one, genai_config.json shares the buffers, and the runtime's in-place generation (a left-padded
    batch, r loops and fewer) gives the tokens of the growing cache; a fused Loop export still takes growing
    pasts (optimum, WebGPU)."""
    from edgeloop.runtime import Runtime, RuntimeInputError

    root = quantized["test-none"]
    x = root / "fused-unrolled"
    rep = export_checkpoint(root / "q", x, ExportConfig(fused=True, unroll=True, decode_steps=4))
    m = json.loads((x / "manifest.json").read_text())
    assert m["kv"]["in_place"] and rep["parity"]["in_place"]["max_abs_diff"] <= 1e-4
    assert rep["parity"]["in_place"]["left_padding"][1] > 0
    assert json.loads((x / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is True
    export_checkpoint(root / "q", root / "fused-loop", ExportConfig(fused=True, decode_steps=2))
    loop = json.loads((root / "fused-loop" / "manifest.json").read_text())
    assert loop["kv"]["in_place"] and loop["parity"]["in_place"]["max_abs_diff"] <= 1e-4
    assert json.loads((root / "fused-loop" / "genai_config.json").read_text())["search"]["past_present_share_buffer"]
    rl = Runtime(root / "fused-loop", threads=1)
    assert rl.in_place
    ran = {}
    for mode in (True, False):
        rl.in_place = mode
        for L in (1, rl.num_loops):
            ran[mode, L] = rl.generate_ids([[5, 17, 42, 7, 99, 3, 8], [11, 12]], 8, stop=(), num_loops=L).tokens
    assert ran[True, 1] == ran[False, 1] and ran[True, rl.num_loops] == ran[False, rl.num_loops]
    assert ran[True, 1] != ran[True, rl.num_loops]
    rt = Runtime(x, threads=1)
    prompts = [[5, 17, 42, 7, 99, 3, 8], [11, 12], [250, 1, 2, 3]]
    assert rt.in_place and rt.buffer_past(1)["past_key_values.0.key"].shape()[2] == rt.ctx
    assert rt.buffer_past(1, 15)["past_key_values.0.key"].shape()[2] == 15  # generate: prompt + new tokens
    assert rt.buffer_past(1, 10**6)["past_key_values.0.key"].shape()[2] == rt.ctx
    in_place = rt.generate_ids(prompts, 8, stop=())
    rt.in_place = False
    assert in_place.tokens == rt.generate_ids(prompts, 8, stop=()).tokens
    rt.in_place = True
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("M", (), {"available": 1000})())
    with pytest.raises(RuntimeInputError, match="KV buffers of 3 sequences"):
        rt.generate_ids(prompts, 2, stop=())
