"""Malformed inputs for the fuzz suite (tests/test_fuzz.py): hand-written cases by kind, each an edit of a
copy of a valid base folder, the command that reads it and the words its one-line error must contain; and the
bad values hypothesis draws for config fields and CLI options."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from edgeloop.model.config import LIMITS, PRESETS, REQUIRED_FIELDS
from tests.fuzzkit import st_bytes, st_parts

BASE = PRESETS["test-none"]  # the base checkpoint "ck" (tests/test_fuzz.py); "ckd" is test-dynamic
TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep.\n") * 80


def command(name: str, src: Path, d: Path) -> list:
    """argv of `name` reading folder `src`, any output under d/out."""
    return {"inspect": ["inspect", src],
            "quantize": ["quantize", src, "-o", d / "out", "--group-size", "32"],
            "export": ["export", src, "-o", d / "out"],
            "generate": ["generate", src, "--prompt", "And God said", "--max-new-tokens", "2"],
            "import": ["import", src, "-o", d / "out"],
            "gptq": ["quantize", src, "-o", d / "out", "--group-size", "32", "--method", "gptq", "--calib-samples",
                     "2", "--calib-seq-len", "16"],
            "run": ["run", src, "-o", d / "out", "--method", "rtn", "--group-size", "32", "--eval-tokens", "64",
                    "--no-sweep"],
            "ppl": ["inspect", src, "--ppl", "--tokens", "64"]}[name]


def edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def setter(**kv):
    return lambda d: d.update(kv)


def dropper(key: str):
    return lambda d: d.pop(key)


# ---- config.json ------------------------------------------------------------------------------------------------
def config_raw(text: bytes | str | None):
    """Replace config.json by raw bytes (None: by a folder)."""
    def edit(ck: Path) -> None:
        f = ck / "config.json"
        f.unlink()
        if text is None:
            f.mkdir()
        else:
            f.write_bytes(text.encode() if isinstance(text, str) else text)
    return edit


def config_edit(fn):
    return lambda ck: edit_json(ck / "config.json", fn)


CONFIG_CASES = [  # (edit of ck, command, words)
    (config_edit(setter(num_loops=10**9)), "export", ("num_loops",)),
    (config_edit(setter(num_loops=10**9)), "quantize", ("num_loops",)),
    (config_edit(setter(num_loops=10**9, vocab_size=10)), "inspect", ("num_loops",)),
    (config_edit(setter(vocab_size=10)), "inspect", ("embed.weight",)),
    (config_edit(setter(num_loops=3000, max_loops=3000)), "export", ("--kv-policy shared",)),
    (config_edit(setter(d_model=2**70)), "export", ("d_model",)),
    (config_edit(setter(extra=5)), "inspect", ("extra",)),
    (config_edit(setter(n_loops=3)), "quantize", ("n_loops",)),
    (config_edit(setter(model_type="llama")), "export", ("model_type",)),
    (config_edit(setter(rope_theta=math.nan)), "export", ("rope_theta",)),
    (config_edit(setter(norm_eps=math.inf)), "generate", ("norm_eps",)),
    (config_edit(setter(quantization_config="int4")), "export", ("quantization_config",)),
    (config_edit(setter(quantization_config={"quant_method": "gptq"})), "generate", ("quantization_config",)),
    (config_raw(""), "inspect", ("config.json",)),
    (config_raw("{"), "export", ("config.json",)),
    (config_raw("[1, 2]"), "quantize", ("config.json",)),
    (config_raw(b"\xff\xfe\x00garbage"), "generate", ("config.json",)),
    (config_raw("[" * 100000 + "]" * 100000), "inspect", ("config.json",)),
    (config_raw(None), "export", ("config.json",)),
    (config_raw('{"model_type": "hyperloop"}'), "quantize", ("vocab_size",)),
] + [(config_edit(dropper(f)), ("inspect", "quantize", "export", "generate")[i % 4], (f"'{f}'",))
     for i, f in enumerate(REQUIRED_FIELDS)]

POSITIVE = ("vocab_size", "d_model", "n_heads", "n_kv_heads", "num_loops", "mlp_hidden", "max_seq_len", "sinkhorn_iters")
NON_NEGATIVE = ("n_begin", "n_end", "max_loops")
RESIZERS = ("vocab_size", "d_model", "mlp_hidden", "n_begin", "n_middle", "n_end", "n_kv_heads", "n_heads")
BOOL_FLIPS = ("tie_embeddings", "middle_norm", "loop_embedding", "embed_norm", "qk_bias", "exit_gate")  # change
BOOLS = BOOL_FLIPS + ("qk_norm", "rope_bf16", "post_loop_norm", "norm_each_loop",  # the tensors or are refused
                      "qk_norm_full")
STRINGS = ("kv_policy", "kv_dtype", "collapse", "block", "mlp", "rotary", "hc", "injection")
FLOATS = ("rope_theta", "norm_eps", "embed_scale", "logit_softcap", "early_exit_threshold", "init_std")


def bad_config_values(st):
    """A strategy of (field, bad value or the marker "<missing>") that no valid config of the base
    checkpoint's tensors has."""
    junk = st.one_of(st.text(max_size=8), st.lists(st.integers(), max_size=3), st.none(),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
    not_int = st.one_of(junk, st.booleans(), st.floats(allow_nan=False).filter(lambda x: x != int(x) if
                                                                               math.isfinite(x) else True))
    cases = [st.tuples(st.just(f), st.one_of(not_int, st.integers(max_value=0), st.integers(LIMITS[f] + 1, 2**80)))
             for f in POSITIVE]
    cases += [st.tuples(st.just(f), st.one_of(not_int, st.integers(max_value=-1), st.integers(LIMITS[f] + 1, 2**70)))
              for f in NON_NEGATIVE]
    cases += [st.tuples(st.just(f), st.integers(1, 40).filter(lambda v, f=f: v != getattr(BASE, f))) for f in RESIZERS]
    cases += [st.tuples(st.just("n_middle"), st.one_of(st.just(0), not_int, st.integers(max_value=-1)))]
    cases += [st.tuples(st.just("n_streams"), st.one_of(not_int, st.integers().filter(lambda v: v != 1)))]
    cases += [st.tuples(st.just(f), st.one_of(junk, st.integers(), st.floats())) for f in BOOLS]
    cases += [st.tuples(st.just(f), st.just(not getattr(BASE, f))) for f in BOOL_FLIPS]
    cases += [st.tuples(st.just(f), st.one_of(st.integers(), st.booleans(), st.none(), st.lists(st.text(max_size=3)),
                                              st.text(max_size=12).filter(lambda s: s not in KNOWN_STRINGS)))
              for f in STRINGS]
    cases += [st.tuples(st.just(f), st.one_of(st.text(max_size=5), st.booleans(), st.none(), st.lists(st.floats()),
                                              st.floats(max_value=-1e-9), st.just(math.nan), st.just(math.inf)))
              for f in FLOATS]
    cases += [st.tuples(st.just(f), st.just(0)) for f in ("rope_theta", "norm_eps", "embed_scale")]
    cases += [st.tuples(st.sampled_from(REQUIRED_FIELDS), st.just("<missing>")),
              st.tuples(st.from_regex(r"[a-z_]{3,12}", fullmatch=True).filter(lambda s: s not in KNOWN_FIELDS),
                        st.integers())]
    return st.one_of(cases)


KNOWN_FIELDS = set(BASE.to_dict()) | {"architectures", "quantization_config"}
KNOWN_STRINGS = {"per-step", "shared", "float32", "float16", "mean", "sum", "prenorm", "sandwich", "prepost",
                 "postnorm", "swiglu", "relu2", "geglu", "half", "interleaved", "neox", "dynamic", "static", "none",
                 "passthrough", "additive", "inject", "adapter"}


# ---- model.safetensors ----------------------------------------------------------------------------------------
def st_raw(make):
    """Replace model.safetensors by make(header, body) (the base file's header dict and tensor bytes)."""
    def edit(ck: Path) -> None:
        f = ck / "model.safetensors"
        header, body = st_parts(f.read_bytes())
        f.write_bytes(make(header, body))
    return edit


def st_entry(fn):
    """Edit the header entry of the first tensor (sorted by name) and keep the body."""
    def make(header, body):
        name = sorted(k for k in header if k != "__metadata__")[0]
        fn(header[name])
        return st_bytes(header, body)
    return st_raw(make)


def st_tensors(fn):
    """Edit the tensors themselves (load, fn(state), save)."""
    def edit(ck: Path) -> None:
        sd = load_file(str(ck / "model.safetensors"))
        fn(sd)
        save_file(sd, str(ck / "model.safetensors"))
    return edit


def poke(name: str, value: float):
    return st_tensors(lambda sd: sd[name].view(-1).__setitem__(0, value))


ST = ("model.safetensors",)
SAFETENSORS_CASES = [
    (st_raw(lambda h, b: b""), "inspect", ST),
    (st_raw(lambda h, b: b"\x01\x02\x03"), "export", ST),
    (st_raw(lambda h, b: st_bytes(b"", b"")), "quantize", ST),
    (st_raw(lambda h, b: st_bytes(h, b, length=0)), "generate", ST),
    (st_raw(lambda h, b: st_bytes(h, b, length=7)), "inspect", ST),
    (st_raw(lambda h, b: st_bytes(h, b, length=2**63)), "export", ST),
    (st_raw(lambda h, b: st_bytes(h, b, length=2**64 - 1)), "quantize", ST),
    (st_raw(lambda h, b: st_bytes(h, b, length=len(json.dumps(h)) + len(b) + 1)), "generate", ST),
    (st_raw(lambda h, b: st_bytes(b"{not json", b)), "inspect", ST),
    (st_raw(lambda h, b: st_bytes(b"[1, 2, 3]", b)), "export", ST),
    (st_raw(lambda h, b: st_bytes(b'{"x": 5}', b)), "quantize", ST),
    (st_raw(lambda h, b: st_bytes(b"\xff" * 64, b)), "generate", ST),
    (st_raw(lambda h, b: st_bytes(h, b[: len(b) // 2])), "inspect", ST),
    (st_raw(lambda h, b: st_bytes(h, b + b"\0" * 100)), "export", ST),
    (st_entry(lambda e: e.pop("dtype")), "quantize", ST),
    (st_entry(lambda e: e.update(dtype="Q4")), "generate", ST),
    (st_entry(lambda e: e.update(shape=[-1, 64])), "inspect", ST),
    (st_entry(lambda e: e.update(shape=["a"])), "export", ST),
    (st_entry(lambda e: e.update(shape=[2**40, 2**40])), "quantize", ST),
    (st_entry(lambda e: e.update(data_offsets=e["data_offsets"][::-1])), "generate", ST),
    (st_entry(lambda e: e.update(data_offsets=[0, 2**62])), "inspect", ST),
    (st_entry(lambda e: e.update(data_offsets=[0])), "export", ST),
    (st_entry(lambda e: e.update(data_offsets="0-10")), "quantize", ST),
    (st_tensors(lambda sd: sd.pop("end.0.mlp.c_fc.weight")), "export", ("end.0.mlp.c_fc.weight",)),
    (st_tensors(lambda sd: sd.update(stray=torch.zeros(3))), "quantize", ("stray",)),
    (st_tensors(lambda sd: sd.update({"embed.weight": sd["embed.weight"].double()})), "generate", ("embed.weight",)),
    (st_tensors(lambda sd: sd.update({"final_norm.weight": sd["final_norm.weight"].to(torch.int32)})), "export",
     ("final_norm.weight",)),
    (st_tensors(lambda sd: sd.update({"inject.weight": sd["inject.weight"][:, :64].contiguous()})), "inspect",
     ("inject.weight",)),
    (poke("middle.0.attn.c_q.weight", math.nan), "quantize", ("NaN",)),
    (poke("end.0.mlp.c_proj.weight", math.inf), "export", ("NaN",)),
    (poke("final_norm.weight", -math.inf), "generate", ("NaN",)),
    (poke("embed.weight", math.nan), "run", ("NaN",)),
]


# ---- index files of sharded folders (the huginn_raven importer) ----------------------------------------------
INDEX = "model.safetensors.index.json"


def index_edit(fn):
    return lambda hug: edit_json(hug / INDEX, fn)


def index_raw(text: str):
    return lambda hug: (hug / INDEX).write_text(text)


def first_shard(hug: Path) -> Path:
    return sorted(hug.glob("model-*.safetensors"))[0]


def _remap(d: dict, to: str) -> None:
    k = sorted(d["weight_map"])[0]
    d["weight_map"][k] = to


def _drop_entry(d: dict) -> None:
    d["weight_map"].pop("transformer.adapter.weight")


def _move_entry(d: dict) -> None:
    shards = sorted(set(d["weight_map"].values()))
    k = next(k for k, v in d["weight_map"].items() if v == shards[0])
    d["weight_map"][k] = shards[1]


IX = (INDEX,)
INDEX_CASES = [
    (index_raw(""), "import", IX),
    (index_raw("{"), "quantize", IX),
    (index_raw("[]"), "export", IX),
    (index_edit(setter(weight_map=[])), "import", IX),
    (index_edit(setter(weight_map={})), "quantize", IX),
    (index_edit(dropper("weight_map")), "export", IX),
    (index_edit(lambda d: d["weight_map"].update({"transformer.wte.weight": 5})), "import", IX),
    (index_edit(lambda d: _remap(d, "../outside.safetensors")), "quantize", ("outside.safetensors",)),
    (index_edit(lambda d: _remap(d, "model-00009-of-00009.safetensors")), "export", ("model-00009",)),
    (index_edit(_move_entry), "import", IX),
    (index_edit(_drop_entry), "quantize", ("transformer.adapter.weight",)),
    (lambda hug: first_shard(hug).write_bytes(first_shard(hug).read_bytes()[:1000]), "export", ("model-0000",)),
    (lambda hug: first_shard(hug).unlink(), "import", ("model-0000",)),
    (lambda hug: first_shard(hug).write_bytes(b"\0" * 16), "quantize", ("model-0000",)),
    (lambda hug: edit_json(hug / "config.json", setter(mean_recurrence=10**9)), "export", ("num_loops",)),
    (lambda hug: edit_json(hug / "config.json", setter(n_embd="48")), "import", ("n_embd",)),
]


# ---- tokenizer files ------------------------------------------------------------------------------------------
def tok_write(name: str, content: bytes | str | None):
    def edit(ck: Path) -> None:
        f = ck / name
        f.unlink()
        if content == "<dir>":
            f.mkdir()
        elif content is not None:
            f.write_bytes(content.encode() if isinstance(content, str) else content)
    return edit


def big_tokenizer(ck: Path) -> None:
    from edgeloop.model.data import train_tokenizer

    text = "the quick brown fox jumps over the lazy dog " * 50 + "".join(map(chr, range(300, 700)))
    train_tokenizer(text, 900).save(str(ck / "tokenizer.json"))


def truncated_tokenizer(ck: Path) -> None:
    f = ck / "tokenizer.json"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


TJ, TC = ("tokenizer.json",), ("tokenizer_config.json",)
TOKENIZER_CASES = [
    (tok_write("tokenizer.json", None), "run", TJ),
    (tok_write("tokenizer.json", ""), "gptq", TJ),
    (tok_write("tokenizer.json", "{"), "generate", TJ),
    (tok_write("tokenizer.json", "[1]"), "ppl", TJ),
    (tok_write("tokenizer.json", '{"model": 5}'), "run", TJ),
    (tok_write("tokenizer.json", b"\x00\xff" * 50), "gptq", TJ),
    (tok_write("tokenizer.json", "<dir>"), "generate", TJ),
    (truncated_tokenizer, "run", TJ),
    (big_tokenizer, "run", TJ),
    (big_tokenizer, "gptq", TJ),
    (tok_write("tokenizer_config.json", None), "run", TC),
    (tok_write("tokenizer_config.json", "{"), "run", TC),
    (tok_write("tokenizer_config.json", "[]"), "run", TC),
]


def export_edit(name: str, fn):
    """Edit one file of a copy of the export folder x."""
    def edit(x: Path) -> None:
        fn(x / name)
    return edit


def truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


def copy_over(src: Path):
    return lambda f: shutil.copyfile(src, f)


# ---- generated edits: a safetensors header entry, a manifest field -------------------------------------------
def bad_header_entries(st):
    """(tensor index, entry edit) strategies: a dtype, shape or offsets no valid file of the base tensors has
    (a dtype of the same width keeps the file valid but is not a float one; a permuted shape keeps the size)."""
    dtypes = st.sampled_from(["F64", "I32", "I64", "U8", "I8", "BOOL", "F16", "BF16", "F8_E4M3", "Q4", "", "f32"])
    shapes = st.lists(st.integers(-3, 2**33), min_size=0, max_size=4)
    offsets = st.lists(st.integers(-5, 2**40), min_size=0, max_size=3)
    edit = st.one_of(st.tuples(st.just("dtype"), dtypes), st.tuples(st.just("shape"), shapes),
                     st.tuples(st.just("data_offsets"), offsets), st.tuples(st.just("shape"), st.just("<permute>")),
                     st.tuples(st.sampled_from(["dtype", "shape", "data_offsets"]), st.just("<drop>")))
    return st.tuples(st.integers(0, 10**6), edit)


def apply_header_entry(ck: Path, index: int, key: str, value) -> str:
    """Edit one header entry of ck/model.safetensors in place; the tensor's name."""
    f = ck / "model.safetensors"
    header, body = st_parts(f.read_bytes())
    names = sorted(k for k in header if k != "__metadata__")
    name = names[index % len(names)]
    entry = header[name]
    if value == "<drop>":
        entry.pop(key)
    elif value == "<permute>":
        entry["shape"] = entry["shape"][::-1] + [1] if len(set(entry["shape"])) == 1 else entry["shape"][::-1]
    else:
        entry[key] = value
    f.write_bytes(st_bytes(header, body))
    return name


MANIFEST_FIELDS = ("num_loops", "max_seq_len", "effective_layers", "max_loops", "accuracy_level", "config",
                   "config.vocab_size", "config.early_exit_threshold", "kv", "kv.n_begin", "kv.n_middle", "kv.n_end",
                   "kv.num_loops", "kv.kv_heads", "kv.head_dim", "kv.dtype", "kv.policy", "generation",
                   "generation.eos_token_id", "generation.pad_token_id")


def bad_manifest_values(st):
    """(manifest field, a value of the wrong type or out of range) strategies."""
    junk = st.one_of(st.text(max_size=6), st.none(), st.lists(st.integers(), max_size=2), st.floats(allow_nan=True),
                     st.booleans(), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))
    huge = st.integers(10**7, 2**70)
    optional = ("max_loops", "accuracy_level", "generation", "config.early_exit_threshold")  # None: not recorded
    return st.tuples(st.sampled_from(MANIFEST_FIELDS), st.one_of(junk, huge, st.integers(-2**40, -1))).filter(
        lambda fv: not (fv[0] in optional and fv[1] is None) and fv != ("generation.eos_token_id", []))  # no eos
