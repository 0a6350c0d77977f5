"""The quantize stage: packing, RTN bound, loop-aware GPTQ, folder format, reload, determinism, bad input."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from edgeloop.model.checkpoint import save_checkpoint
from edgeloop.model.data import train_tokenizer
from edgeloop.model.evaluate import perplexity
from edgeloop.quantize import (GPTQ, GPTQConfig, QuantConfig, QuantEmbedding, QuantizeError, QuantLinear, RTNConfig,
                               dequantize, load_checkpoint, pack, quant_config, quantize_, quantize_checkpoint, rtn,
                               save_quantized, unpack)
from tests.conftest import VARIANTS, perturbed, run_cli

TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep.\n") * 300
GPTQ_SMALL = dict(group_size=32, calib_samples=12, calib_seq_len=48)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXT, 300)


@pytest.fixture(scope="module")
def work(tmp_path_factory, tok):
    """A module-wide folder with fp16 and fp32 checkpoints of test-dynamic and a calibration text file."""
    d = tmp_path_factory.mktemp("q")
    save_checkpoint(perturbed("test-dynamic"), d / "ck16", tokenizer=tok, dtype=torch.float16)
    save_checkpoint(perturbed("test-dynamic"), d / "ck32", tokenizer=tok)
    (d / "calib.txt").write_text(TEXT, encoding="utf-8")
    return d


def qcfg(work, algorithm: str = "rtn", **kw) -> QuantConfig:
    base = dict(group_size=32, **kw)
    if algorithm == "gptq":  # calibration settings exist only for gptq
        base = {**GPTQ_SMALL, "calib_text": str(work / "calib.txt"), **base}
    return quant_config(algorithm, **base)


# ---- packing and the RTN bound ----------------------------------------------------------------
def test_pack_layout_and_round_trip():
    assert pack(torch.tensor([1, 2, 15, 0], dtype=torch.uint8)).tolist() == [0x21, 0x0F]
    codes = torch.randint(0, 16, (3, 5, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert pack(codes).shape == (3, 5, 4) and torch.equal(unpack(pack(codes)), codes)
    odd = torch.tensor([[3, 7, 9]], dtype=torch.uint8)  # odd count (qzeros of 3 blocks): zero high nibble
    assert pack(odd).tolist() == [[0x73, 0x09]] and torch.equal(unpack(pack(odd), 3), odd)


def test_dequantize_formula():
    # one row, G=16, two blocks: asym w = (q - zp) * s; sym w = (q - 8) * s
    q = torch.arange(32, dtype=torch.uint8).remainder(16).view(1, 2, 16)
    s = torch.tensor([[0.5, 2.0]])
    zp = pack(torch.tensor([[3, 12]], dtype=torch.uint8))
    w = dequantize(pack(q), s, zp, 16, sym=False)
    ref = torch.cat([(torch.arange(16) - 3) * 0.5, (torch.arange(16) - 12) * 2.0])[None]
    assert torch.equal(w, ref)
    assert torch.equal(dequantize(pack(q), s, None, 16, sym=True),
                       torch.cat([(torch.arange(16) - 8) * 0.5, (torch.arange(16) - 8) * 2.0])[None])


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
@pytest.mark.parametrize("G", [16, 64])
def test_rtn_error_within_half_a_step(sym, scale_dtype, G):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 256, generator=g) * torch.rand(24, 1, generator=g)
    w[0, :G] = torch.rand(G, generator=g) + 0.5  # an all-positive group
    w[1, :G] = 0.0  # an all-zero group
    w[2, 5] = 40.0  # an outlier
    qw, sc, qz = rtn(w, G, sym, scale_dtype)
    assert qw.dtype == torch.uint8 and qw.shape == (24, 256 // G, G // 2)
    assert sc.dtype == getattr(torch, scale_dtype) and sc.shape == (24, 256 // G)
    assert (qz is None) == sym and (sym or qz.shape == (24, (256 // G + 1) // 2))
    err = (w - dequantize(qw, sc, qz, G, sym)).abs().view(24, -1, G)
    bound = sc.float().unsqueeze(-1) / 2
    assert (err <= bound * (1 + 1e-5) + 1e-12).all()  # float32 rounding of ties
    assert err[1, 0].max() == 0  # zeros stay exactly zero


@pytest.mark.parametrize("sym", [False, True])
def test_int8_codes_one_per_byte_within_half_a_step(sym):
    """The embedding's 8-bit layout: qweight [N, nb, G], qzeros [N, nb] unpacked, error <= scale / 2, and
    scale 1/255 of the range (16x finer than 4 bits)."""
    w = torch.randn(12, 128, generator=torch.Generator().manual_seed(2))
    qw, sc, qz = rtn(w, 32, sym, "float16", bits=8)
    assert qw.shape == (12, 4, 32) and sc.shape == (12, 4) and (qz is None) == sym and (sym or qz.shape == (12, 4))
    deq = dequantize(qw, sc, qz, 32, sym, bits=8)
    assert ((w - deq).abs().view(12, 4, 32) <= sc.float().unsqueeze(-1) / 2 * (1 + 1e-5)).all()
    q4 = rtn(w, 32, sym, "float16")
    assert (w - deq).abs().mean() < (w - dequantize(*q4, 32, sym)).abs().mean() / 8
    with pytest.raises(ValueError, match="group_size says 32"):
        dequantize(qw, sc, qz, 32, sym)  # 4-bit reading of 8-bit codes: refused, not misread


# ---- GPTQ -------------------------------------------------------------------------------------
@pytest.mark.parametrize("act_order,sym", [(False, False), (True, False), (False, True)])
def test_gptq_beats_rtn_on_correlated_inputs(act_order, sym):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 128, generator=g) @ (torch.randn(128, 128, generator=g) * 0.3 + torch.eye(128))
    W = torch.randn(64, 128, generator=g)
    h = GPTQ(128)
    for chunk in X.split(256):
        h.add_batch(chunk)
    assert h.nsamples == 2048
    codes, scale, zero, stats = h.fasterquant(W, 32, sym, "float16", act_order)
    assert stats["gptq_err"] < 0.8 * stats["rtn_err"], stats
    # the error is measured on the real layer outputs too
    What = (codes.float() - zero.unsqueeze(-1)) * scale.float().unsqueeze(-1)
    out = lambda M: ((X @ W.t() - X @ M.reshape(64, 128).t()) ** 2).sum()
    qw, sc, qz = rtn(W, 32, sym, "float16")
    assert out(What) < out(dequantize(qw, sc, qz, 32, sym))


@pytest.mark.parametrize("name", ["test-dynamic", "test-none"])
def test_gptq_is_loop_aware_and_lowers_every_layer_error(name):
    m = perturbed(name)
    S, T, r = 6, 32, m.cfg.num_loops
    ids = torch.randint(0, m.cfg.vocab_size, (S, T), generator=torch.Generator().manual_seed(0))
    rep = quantize_(m, GPTQConfig(group_size=32), ids)
    layers = {x["name"]: x for x in rep["layers"]}
    assert len(layers) == len(rep["quantized"])
    assert layers.pop("embed") == {"name": "embed", "algorithm": "rtn", "bits": 8}  # the default INT8 embedding
    assert isinstance(m.embed, QuantEmbedding) and m.embed.bits == 8
    for lname, x in layers.items():
        want = r * S * T if lname.startswith(("middle.", "inject")) else S * T
        assert x["nsamples"] == want, (lname, x["nsamples"], want)
        assert x["gptq_err"] < x["rtn_err"], x
    if name == "test-none":
        assert "inject" in layers and isinstance(m.inject, QuantLinear)
    assert all(isinstance(m.get_submodule(n), QuantLinear) for n in layers)


# ---- folders ----------------------------------------------------------------------------------
def _raw(path, name):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(name)


@pytest.mark.parametrize("src,keep", [("ck16", "float16"), ("ck32", "float32")])
def test_kept_tensors_byte_identical_and_format(work, tmp_path, src, keep):
    out = tmp_path / "q"
    rep = quantize_checkpoint(work / src, out, qcfg(work, keep_dtype=keep), progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "edgeloop-int4" and qc["format"] == "int4-blocked-kpacked"
    assert qc["group_size"] == 32 and qc["sym"] is False and qc["keep_dtype"] == keep
    inp = load_file(str(work / src / "model.safetensors"))
    outp = load_file(str(out / "model.safetensors"))
    hc_or_norm = [k for k in inp if k.startswith(("hc.", "loop_embed")) or "norm" in k]
    assert len(hc_or_norm) >= 10
    for k in hc_or_norm:
        assert outp[k].dtype == inp[k].dtype and torch.equal(outp[k].view(torch.uint8), inp[k].view(torch.uint8)), k
    for k in rep["quantized"]:
        p = k[:-len(".weight")]
        assert k not in outp and outp[f"{p}.qweight"].dtype == torch.uint8 and f"{p}.qzeros" in outp
        width = 32 if k == "embed.weight" else 16  # the embedding: INT8 by default, one code per byte
        assert outp[f"{p}.qweight"].shape == (inp[k].shape[0], inp[k].shape[1] // 32, width)
    assert qc["quantize_embedding"] is True and qc["embedding_bits"] == 8
    assert outp["embed.qzeros"].shape == (inp["embed.weight"].shape[0], inp["embed.weight"].shape[1] // 32)
    assert rep["linear_ratio_vs_fp32"] <= 0.16
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json", "README.md"}


def test_reload_matches_in_memory_reference_and_perplexity(work, tmp_path):
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(3))
    fp = load_checkpoint(work / "ck32")
    for algo in ("rtn", "gptq"):
        q = qcfg(work, algorithm=algo)
        quantize_checkpoint(work / "ck32", tmp_path / algo, q, progress=False)
        back = load_checkpoint(tmp_path / algo)
        assert isinstance(back.middle[0].attn.c_q, QuantLinear) and not back.training
        if algo == "rtn":  # the in-memory INT4 reference gives the same logits
            mem = load_checkpoint(work / "ck32")
            quantize_(mem, q)
            assert torch.equal(mem(ids), back(ids))
            save_quantized(mem, tmp_path / "mem", q, tokenizer_dir=work / "ck32")
            assert (tmp_path / "mem" / "model.safetensors").read_bytes() == \
                (tmp_path / "rtn" / "model.safetensors").read_bytes()
        val = np.asarray(ids[0].tolist() * 3)
        p_fp, p_q = perplexity(fp, val, ctx=64)[0], perplexity(back, val, ctx=64)[0]
        assert abs(math.log(p_q / p_fp)) < 0.05, (algo, p_fp, p_q)


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_with_embedding_lm_head_and_hc(tmp_path, tok, name):
    m = perturbed(name)
    save_checkpoint(m, tmp_path / "ck", tokenizer=tok)
    q = RTNConfig(group_size=16, sym=True, scale_dtype="float32", quantize_embedding=True, embedding_bits=4,
                  quantize_lm_head=True, quantize_hc=True)
    rep = quantize_checkpoint(tmp_path / "ck", tmp_path / "q", q, progress=False)
    back = load_checkpoint(tmp_path / "q")
    assert isinstance(back.embed, QuantEmbedding)
    assert "embed.weight" in rep["quantized"]
    if not m.cfg.tie_embeddings:
        assert isinstance(back.lm_head, QuantLinear)
    if m.cfg.hc == "dynamic":
        assert {"hc.w_pre", "hc.w_res", "loop_embed"} <= set(rep["quantized"]) and "hc.b_res" in rep["kept"]
        w = back.hc.w_res.detach()
        assert not torch.equal(w, m.hc.w_res.detach()) and (w - m.hc.w_res).abs().max() < 0.05
    ids = torch.randint(0, m.cfg.vocab_size, (1, 12))
    assert (back(ids) - m(ids)).abs().max() < 1.0
    assert load_file(str(tmp_path / "q" / "model.safetensors"))["embed.qweight"].shape == (320, 4, 8)


def test_deterministic_bytes(work, tmp_path):
    for algo in ("rtn", "gptq"):
        a, b = tmp_path / f"{algo}a", tmp_path / f"{algo}b"
        quantize_checkpoint(work / "ck16", a, qcfg(work, algorithm=algo), progress=False)
        quantize_checkpoint(work / "ck16", b, qcfg(work, algorithm=algo), progress=False)
        for f in sorted(p.name for p in a.iterdir()):
            assert (a / f).read_bytes() == (b / f).read_bytes(), (algo, f)


# ---- the CLI and bad input --------------------------------------------------------------------
def test_cli_json_summary(work, tmp_path, monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "quantize", work / "ck16", "-o", tmp_path / "q", "--group-size", "64",
                           "--keep-dtype", "float16", "--json")
    assert code == 0
    r = json.loads(out)
    assert r["tensors_quantized"] == 29 and r["bytes_after"] < r["bytes_before"] and r["compression_ratio"] > 1
    assert r["kept"]["hc.w_res"].startswith("hyper-connection") and r["settings"]["group_size"] == 64


def _corrupt(ck):
    (ck / "model.safetensors").write_bytes(b"not a safetensors file at all")


def _truncate(ck):
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[:len(data) // 2])


def _nan(ck):
    st = load_file(str(ck / "model.safetensors"))
    st["middle.1.mlp.c_fc.weight"][3, 4] = float("nan")
    save_file(st, str(ck / "model.safetensors"))


@pytest.mark.parametrize("case,edit,args,msg", [
    ("missing", None, [], "no such checkpoint folder"),
    ("corrupt", _corrupt, [], "corrupt or truncated"),
    ("truncated", _truncate, [], "corrupt or truncated"),
    ("nan", _nan, [], "'middle.1.mlp.c_fc.weight' holds NaN"),
    ("nan-gptq", _nan, ["--method", "gptq", "--calib-samples", "4", "--calib-seq-len", "32"], "holds NaN"),
    ("k%g", None, ["--group-size", "128"], "K=64 is not divisible by group size G=128"),
    ("bits", None, ["--bits", "8"], "bits=8 is not supported"),
    ("groupsize", None, ["--group-size", "48"], "group_size=48"),
    ("method", None, ["--method", "awq"], "algorithm='awq'"),
    ("short-calib", None, ["--method", "gptq", "--calib-samples", "500", "--calib-seq-len", "100"],
     "500 samples x 100 tokens need 50,000"),
    ("exists", None, [], "already exists"),
])
def test_bad_input_one_line_exit_2_no_output(work, tmp_path, monkeypatch, capsys, case, edit, args, msg):
    ck = tmp_path / "ck"
    if case != "missing":
        shutil.copytree(work / "ck16", ck)
    if edit:
        edit(ck)
    out = tmp_path / "out"
    if case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    calib = ["--calib-text", work / "calib.txt"] if "gptq" in args else []  # calibration: gptq's settings only
    code, _, err = run_cli(monkeypatch, capsys, "quantize", ck, "-o", out, "--group-size", "32", *calib, *args)
    assert code == 2, err
    assert msg in err and len(err.strip().splitlines()) == 1, err
    if case == "exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp folder left


def test_overwrite_replaces(work, tmp_path, monkeypatch, capsys):
    out = tmp_path / "q"
    out.mkdir()
    code, _, err = run_cli(monkeypatch, capsys, "quantize", work / "ck16", "-o", out, "--group-size", "32", "--overwrite")
    assert code == 0, err
    assert (out / "model.safetensors").is_file()


def test_demo_model_int4_perplexity_close_to_fp32(demo_dir, tmp_path):
    from edgeloop.model.checkpoint import load_tokenizer
    from edgeloop.model.data import corpus_split, encode

    rep = quantize_checkpoint(demo_dir, tmp_path / "q", RTNConfig(), progress=False)  # RTN, G=128 defaults
    assert rep["linear_ratio_vs_fp32"] <= 0.16
    ids = encode(load_tokenizer(demo_dir), corpus_split("validation"))[:4096]
    p_fp, p_q = perplexity(load_checkpoint(demo_dir), ids)[0], perplexity(load_checkpoint(tmp_path / "q"), ids)[0]
    assert p_fp < p_q < 1.10 * p_fp, (p_fp, p_q)


def test_calibration_settings_are_gptq_only(work, tmp_path, monkeypatch, capsys):
    with pytest.raises(QuantizeError, match="calib_samples: not a setting of rtn"):
        quant_config("rtn", calib_samples=4)
    assert RTNConfig().to_dict()["calib_samples"] is None and GPTQConfig().to_dict()["calib_samples"] == 128
    code, out, err = run_cli(monkeypatch, capsys, "quantize", work / "ck16", "-o", tmp_path / "q", "--group-size",
                             "32", "--calib-samples", "4", "--json")  # the CLI keeps the flag: ignored, said so
    assert code == 0 and "--calib-samples: calibration settings, ignored by --method rtn" in err
    assert json.loads(out)["settings"]["calib_samples"] is None


@pytest.mark.parametrize("head_bits", [8, 4, None], ids=["int8-default", "int4", "kept"])
def test_untied_lm_head_int8_by_default_and_exported(tmp_path, tok, head_bits):
    """An untied lm_head is INT8 (RTN) by default, INT4 by the algorithm at lm_head_bits 4, kept with
    --keep-lm-head; the export reads the width from quantization_config and passes its parity check."""
    from edgeloop.export import ExportConfig, export_checkpoint

    m = perturbed("test-static")
    assert not m.cfg.tie_embeddings
    save_checkpoint(m, tmp_path / "ck", tokenizer=tok)
    q = RTNConfig(group_size=16) if head_bits == 8 else \
        RTNConfig(group_size=16, lm_head_bits=4) if head_bits == 4 else RTNConfig(group_size=16, quantize_lm_head=False)
    rep = quantize_checkpoint(tmp_path / "ck", tmp_path / "q", q, progress=False)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    st = load_file(str(tmp_path / "q" / "model.safetensors"))
    if head_bits is None:
        assert "lm_head.weight" in rep["kept"] and "lm_head.weight" in st and qc["lm_head_bits"] is None
    else:
        assert f"INT{head_bits}" in rep["quantized"]["lm_head.weight"] and qc["lm_head_bits"] == head_bits
        V, d = m.lm_head.weight.shape
        assert st["lm_head.qweight"].shape == (V, d // 16, 16 * head_bits // 8)  # one code per byte at 8 bits
        back = load_checkpoint(tmp_path / "q")
        assert isinstance(back.lm_head, QuantLinear) and back.lm_head.bits == head_bits
        err = (back.lm_head.weight if hasattr(back.lm_head, "weight") else back.lm_head.dequantized()) - m.lm_head.weight
        assert err.abs().max() < (0.01 if head_bits == 8 else 0.2)
    x = export_checkpoint(tmp_path / "q", tmp_path / "x", ExportConfig(decode_steps=2))
    assert x["parity"]["max_abs_err"] <= 1e-3
