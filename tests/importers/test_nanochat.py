"""import-nanochat: checkpoints in the looped-lm-scaling format (random, every parameter perturbed, bf16,
`_orig_mod.` prefixes, padded vocab, GQA) for all four injection modes; logits against an independent
implementation of the published equations; KV-cache decode; quantize + export; the malicious pickle;
every bad input as a one-line error with nothing written."""
import json
import math
import os

import pytest
import torch

from edgeloop.export import ExportConfig, export_checkpoint
from edgeloop.importers.nanochat import NanochatImportError, import_nanochat, is_nanochat
from edgeloop.model.checkpoint import load_model
from edgeloop.model.model import KVCache
from tests.conftest import run_cli

MODES = ["inject_init_prelude", "passthrough", "additive", "hyperconnect"]
MC = dict(sequence_len=48, vocab_size=300, size=4, n_head=4, n_kv_head=2, n_embd=32, n_prelude=1,
          n_recur_block=2, n_coda=1, num_recur=3, bptt_k=3, num_lanes=3, logit_softcap=12.0)
PADDED = 320  # vocab_size rounded up to a multiple of 64


def nanochat_weights(mode: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of a nanochat GPT of MC + `mode`, random and far from its init (no identity paths)."""
    g = torch.Generator().manual_seed(seed)
    d, hd, L, N = MC["n_embd"], MC["n_embd"] // MC["n_head"], MC["num_recur"], MC["num_lanes"]

    def rnd(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    w = {"transformer.wte.weight": rnd(PADDED, d), "lm_head.weight": rnd(PADDED, d, std=0.3),
         "norm_emb.weight": rnd(d, std=0.2, mean=1), "norm_recur.weight": rnd(d, std=0.2, mean=1),
         "norm_final.weight": rnd(d, std=0.2, mean=1)}
    for sec, n in (("prelude", MC["n_prelude"]), ("recur", MC["n_recur_block"]), ("coda", MC["n_coda"])):
        for i in range(n):
            p = f"transformer.{sec}.{i}."
            w |= {p + "attn.c_q.weight": rnd(MC["n_head"] * hd, d, std=d ** -0.5),
                  p + "attn.c_k.weight": rnd(MC["n_kv_head"] * hd, d, std=d ** -0.5),
                  p + "attn.c_v.weight": rnd(MC["n_kv_head"] * hd, d, std=d ** -0.5),
                  p + "attn.c_proj.weight": rnd(d, d, std=d ** -0.5),
                  p + "mlp.c_fc.weight": rnd(4 * d, d, std=d ** -0.5),
                  p + "mlp.c_proj.weight": rnd(d, 4 * d, std=0.5 * (4 * d) ** -0.5),
                  p + "n1.weight": rnd(d, std=0.2, mean=1), p + "n3.weight": rnd(d, std=0.2, mean=1)}
    if mode == "inject_init_prelude":
        w["inject.weight"] = rnd(d, 2 * d, std=(2 * d) ** -0.5)
    if mode == "hyperconnect":
        w |= {"lane_alpha": rnd(L, N, std=0.5, mean=0.5), "lane_mixing": torch.eye(N) * 0.6 + rnd(L, N, N, std=0.3),
              "lane_beta": rnd(L, N, std=0.5, mean=0.8)}
    return w


def write_nanochat(folder, mode: str, step: int = 1200, seed: int = 0, weights=None, config=None,
                   prefix: str = "_orig_mod.", tokenizer=None):
    """A checkpoint folder as looped-lm-scaling writes it (bf16 matrices, fp32 lane scalars)."""
    folder.mkdir(parents=True, exist_ok=True)
    w = weights if weights is not None else nanochat_weights(mode, seed)
    sd = {prefix + k: (v if k.startswith("lane_") else v.bfloat16()) for k, v in w.items()}
    torch.save(sd, folder / f"model_{step:06d}.pt")
    meta = {"step": step, "val_loss": 3.21, "model_config": config or {**MC, "input_injection": mode}}
    (folder / f"meta_{step:06d}.json").write_text(json.dumps(meta))
    if tokenizer is not None:
        tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def reference_logits(w: dict, mode: str, ids: torch.Tensor, num_recur: int | None = None) -> torch.Tensor:
    """The published forward, written out plainly (fp32 math on the bf16-rounded stored weights)."""
    W = {k: (v if k.startswith("lane_") else v.bfloat16()).float() for k, v in w.items()}
    B, T = ids.shape
    d, H, KV = MC["n_embd"], MC["n_head"], MC["n_kv_head"]
    hd, R = d // H, num_recur or MC["num_recur"]

    def rms(x, weight=None):
        y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return y if weight is None else y * weight

    inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = ang.cos().bfloat16().float()[None, :, None], ang.sin().bfloat16().float()[None, :, None]

    def rotary(x):  # [B, T, h, hd], half split
        a, b = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([a * cos + b * sin, -a * sin + b * cos], -1)

    def block(x, p):
        h = rms(x, W[p + "n1.weight"])
        q = (h @ W[p + "attn.c_q.weight"].T).view(B, T, H, hd)
        k = (h @ W[p + "attn.c_k.weight"].T).view(B, T, KV, hd)
        v = (h @ W[p + "attn.c_v.weight"].T).view(B, T, KV, hd)
        q, k = rms(rotary(q)), rms(rotary(k))
        k, v = k.repeat_interleave(H // KV, 2), v.repeat_interleave(H // KV, 2)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        s = s.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), float("-inf"))
        y = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v).reshape(B, T, d)
        x = x + y @ W[p + "attn.c_proj.weight"].T
        h = rms(x, W[p + "n3.weight"])
        return x + torch.relu(h @ W[p + "mlp.c_fc.weight"].T).square() @ W[p + "mlp.c_proj.weight"].T

    def recur(u):
        for j in range(MC["n_recur_block"]):
            u = block(u, f"transformer.recur.{j}.")
        return rms(u, W["norm_recur.weight"])

    x = rms(W["transformer.wte.weight"][ids], W["norm_emb.weight"])
    for i in range(MC["n_prelude"]):
        x = block(x, f"transformer.prelude.{i}.")
    e = x
    if mode == "hyperconnect":
        lanes = [e] * MC["num_lanes"]
        for r in range(R):
            s = recur(sum(W["lane_alpha"][r, n] * lanes[n] for n in range(len(lanes))))
            lanes = [sum(W["lane_mixing"][r, i, j] * lanes[j] for j in range(len(lanes))) + W["lane_beta"][r, i] * s
                     for i in range(len(lanes))]
        x = sum(lanes)
    else:
        s = torch.zeros_like(e) if mode == "additive" else e
        for _ in range(R):
            u = {"passthrough": s, "additive": s + e}.get(mode)
            s = recur(torch.cat([e, s], -1) @ W["inject.weight"].T if u is None else u)
        x = s
    for i in range(MC["n_coda"]):
        x = block(x, f"transformer.coda.{i}.")
    logits = (rms(x, W["norm_final.weight"]) @ W["lm_head.weight"].T)[..., : MC["vocab_size"]]
    return MC["logit_softcap"] * torch.tanh(logits / MC["logit_softcap"])


@pytest.fixture(scope="module")
def tok():
    from edgeloop.model.data import train_tokenizer

    return train_tokenizer("In the beginning God created the heaven and the earth.\n" * 40, 290)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tok):
    """{mode: (weights, nanochat folder, edgeloop folder, summary)}"""
    out = {}
    for i, mode in enumerate(MODES):
        root = tmp_path_factory.mktemp(mode)
        w = nanochat_weights(mode, seed=i)
        src = write_nanochat(root / "nc", mode, weights=w, tokenizer=tok)
        out[mode] = (w, src, root / "el", import_nanochat(src, root / "el"))
    return out


IDS = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 299, 0, 61, 12, 140, 77, 8, 201, 33],
                    [299, 1, 2, 3, 150, 151, 9, 64, 128, 256, 31, 45, 88, 19, 270, 6]])


@pytest.mark.parametrize("mode", MODES)
def test_logits_equal_the_published_equations(converted, mode):
    w, _, el, s = converted[mode]
    model = load_model(el)
    assert (s["hc"], s["stored_dtype"]) == ("static" if mode == "hyperconnect" else "none", "float32")
    with torch.no_grad():
        for r in (MC["num_recur"], 2):
            ref, got = reference_logits(w, mode, IDS, r), model(IDS, num_loops=r)
            assert got.shape == (2, 16, MC["vocab_size"])
            assert (got - ref).abs().max().item() <= 1e-4, (mode, r)
            assert ref.abs().max() > 1.0  # the logits are not trivially small


@pytest.mark.parametrize("mode", MODES)
def test_kv_cache_decode_equals_full_forward(converted, mode):
    model = load_model(converted[mode][2])
    with torch.no_grad():
        full = model(IDS)
        cache = KVCache(model.cfg)
        steps = [model(IDS[:, :6], cache=cache)] + [model(IDS[:, t:t + 1], cache=cache) for t in range(6, 16)]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_quantizes_and_exports_with_parity(converted, mode, tmp_path):
    from edgeloop.quantize import RTNConfig, quantize_checkpoint

    el = converted[mode][2]
    fp32 = export_checkpoint(el, tmp_path / "onnx-fp32", ExportConfig(format="fp32", decode_steps=4))
    assert fp32["parity"]["reference"] == "fp32" and set(fp32["parity"]["by_num_loops"]) == {"3", "1"}
    quantize_checkpoint(el, tmp_path / "int4", RTNConfig(group_size=16), progress=False)
    int4 = export_checkpoint(tmp_path / "int4", tmp_path / "onnx-int4", ExportConfig(decode_steps=4))
    assert int4["graph"]["loop"] and int4["parity"]["reference"] == "int4-dequantized"


def test_folder_contents_tokenizer_card_and_provenance(converted):
    _, src, el, s = converted["hyperconnect"]
    names = {p.name for p in el.iterdir()}
    assert names == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"}
    cfg = json.loads((el / "config.json").read_text())
    assert (cfg["hc"], cfg["n_streams"], cfg["collapse"], cfg["mlp_hidden"]) == ("static", 3, "sum", 128)
    assert cfg["extra"]["imported_from"]["step"] == 1200
    assert cfg["extra"]["imported_from"]["model_config"]["input_injection"] == "hyperconnect"
    assert (s["padded_vocab"], s["vocab_size"]) == (PADDED, 300) and "bfloat16" in s["source_dtypes"]
    assert str(src.resolve()) in (el / "README.md").read_text()
    tc = json.loads((el / "tokenizer_config.json").read_text())
    assert tc["eos_token"] == "<|endoftext|>" and tc["model_max_length"] == MC["sequence_len"]
    assert (el / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_latest_step_by_default_and_step_selection(tmp_path):
    src = write_nanochat(tmp_path / "nc", "additive", step=100, seed=1, prefix="")
    write_nanochat(src, "additive", step=2000, seed=2)
    assert is_nanochat(src)
    assert import_nanochat(src, tmp_path / "latest")["step"] == 2000
    s = import_nanochat(src, tmp_path / "old", step="100")
    assert s["step"] == 100 and s["model_file"] == "model_000100.pt"
    with torch.no_grad():
        got = load_model(tmp_path / "old")(IDS)
    assert (got - reference_logits(nanochat_weights("additive", 1), "additive", IDS)).abs().max() <= 1e-4


class Evil:
    """Unpickling this runs code (writes the marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_is_refused_not_run(tmp_path, legacy):
    import pickle

    src = write_nanochat(tmp_path / "nc", "passthrough")
    marker, proof = tmp_path / "pwned", tmp_path / "proof"
    payload = {**torch.load(src / "model_001200.pt", weights_only=True), "evil": Evil(marker)}
    with open(src / "model_001200.pt", "wb") as f:
        pickle.dump(payload, f) if legacy else torch.save(payload, f)
    with pytest.raises(NanochatImportError, match="refused") as e:
        import_nanochat(src, tmp_path / "out")
    assert "\n" not in str(e.value) and not marker.exists() and not (tmp_path / "out").exists()
    # the payload is real: an unsafe load runs it (this test's own harmless code, writing another marker)
    with open(src / "model_001200.pt", "wb") as f:
        torch.save({"evil": Evil(proof)}, f)
    torch.load(src / "model_001200.pt", weights_only=False)
    assert proof.exists() and not marker.exists()


def bad_cases(tmp_path):
    """(name, setup(folder) -> kwargs, expected message fragment)"""
    def meta(folder, fn):
        p = folder / "meta_001200.json"
        m = json.loads(p.read_text())
        fn(m)
        p.write_text(json.dumps(m))

    def weights(**edit):
        w = nanochat_weights("inject_init_prelude")
        for k, v in edit.items():
            if v is None:
                w.pop(k.replace("__", "."))
            else:
                w[k.replace("__", ".")] = v
        return w

    return [
        ("no checkpoints", lambda f: (f / "model_001200.pt").unlink(), "no model_<step>.pt"),
        ("missing step", lambda f: {"step": 7}, "no checkpoint for step 7"),
        ("missing meta", lambda f: (f / "meta_001200.json").unlink(), "meta_001200.json is missing"),
        ("no model_config", lambda f: meta(f, lambda m: m.pop("model_config")), "'model_config'"),
        ("bad json", lambda f: (f / "meta_001200.json").write_text("{"), "not valid JSON"),
        ("unknown mode", lambda f: meta(f, lambda m: m["model_config"].update(input_injection="gated")),
         "input_injection' = 'gated'"),
        ("unknown key", lambda f: meta(f, lambda m: m["model_config"].update(n_experts=8)), "'n_experts'"),
        ("zero softcap", lambda f: meta(f, lambda m: m["model_config"].update(logit_softcap=0)), "logit_softcap"),
        ("missing tensor", lambda f: write_nanochat(f, "inject_init_prelude", weights=weights(inject__weight=None)),
         "'inject.weight' is missing"),
        ("extra tensor", lambda f: write_nanochat(f, "inject_init_prelude", weights=weights(
            lane_alpha=torch.ones(3, 3))), "unexpected tensor 'lane_alpha'"),
        ("wrong shape", lambda f: write_nanochat(f, "inject_init_prelude", weights=weights(
            transformer__recur__1__mlp__c_fc__weight=torch.ones(96, 32))),
         "'transformer.recur.1.mlp.c_fc.weight' has shape (96, 32)"),
        ("short vocab", lambda f: write_nanochat(f, "inject_init_prelude", weights=weights(
            lm_head__weight=torch.ones(290, 32))), "'lm_head.weight' has shape (290, 32)"),
        ("mode vs tensors", lambda f: meta(f, lambda m: m["model_config"].update(input_injection="hyperconnect")),
         "'lane_alpha' is missing"),
        ("gqa", lambda f: meta(f, lambda m: m["model_config"].update(n_kv_head=3)), "'n_kv_head' = 3"),
        ("not a state dict", lambda f: torch.save([torch.ones(2)], f / "model_001200.pt"), "expected a state dict"),
        ("corrupt", lambda f: (f / "model_001200.pt").write_bytes(b"PK\x03\x04 truncated"), "cannot be read"),
        ("nan", lambda f: write_nanochat(f, "inject_init_prelude", weights=weights(
            norm_final__weight=torch.full((32,), float("nan")))), "NaN"),
        ("tokenizer", lambda f: {"tokenizer": f / "nope.json"}, "no such tokenizer.json"),
    ]


@pytest.mark.parametrize("case", range(18))
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case):
    name, setup, fragment = bad_cases(tmp_path)[case]
    src = write_nanochat(tmp_path / "nc", "inject_init_prelude")
    kwargs = setup(src)
    kwargs = kwargs if isinstance(kwargs, dict) else {}
    with pytest.raises(NanochatImportError) as e:
        import_nanochat(src, tmp_path / "out", **kwargs)
    assert fragment in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nc"], name


def test_refuses_existing_output_and_missing_folder(tmp_path):
    src = write_nanochat(tmp_path / "nc", "additive")
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        import_nanochat(src, tmp_path / "out")
    with pytest.raises(NanochatImportError, match="no such folder"):
        import_nanochat(tmp_path / "nope", tmp_path / "out2")
    with pytest.raises(NanochatImportError, match="must differ"):
        import_nanochat(src, src, overwrite=True)
    import_nanochat(src, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_cli_import_and_quantize_accepts_a_nanochat_folder(tmp_path, monkeypatch, capsys):
    src = write_nanochat(tmp_path / "nc", "hyperconnect")
    code, out, err = run_cli(monkeypatch, capsys, "import-nanochat", src, "-o", tmp_path / "el", "--json")
    assert code == 0, err
    assert json.loads(out)["hc"] == "static" and (tmp_path / "el" / "model.safetensors").is_file()
    code, out, err = run_cli(monkeypatch, capsys, "import-nanochat", src, "--step", "5", "-o", tmp_path / "x")
    assert code == 2 and "no checkpoint for step 5" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(monkeypatch, capsys, "quantize", src, "-o", tmp_path / "q", "--group-size", "16",
                             "--json")
    assert code == 0, err
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["el", "nc", "q"]  # the temporary import is gone


def test_run_refuses_a_bad_nanochat_folder_before_writing(tmp_path):
    from edgeloop.run import RunConfig, run

    src = write_nanochat(tmp_path / "nc", "additive")
    (src / "meta_001200.json").write_text(json.dumps({"step": 1}))
    with pytest.raises(NanochatImportError, match="model_config"):
        run(src, tmp_path / "out", RunConfig())
    assert sorted(os.listdir(tmp_path)) == ["nc"]
