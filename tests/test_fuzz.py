"""The fuzz suite (issue 16): malformed config.json, safetensors, sharded-folder index files, tokenizer files,
export folders (model.onnx, its external data, manifest.json, genai_config.json), text files and CLI values.
Every case runs in a worker under an address-space limit (tests/fuzzkit.py) and must end in a non-zero exit (or
a ValueError from a library call) with ONE line on stderr naming what is wrong, no traceback, nothing new on
disk (no output folder, no temp folder) and no memory runaway. Generated cases use hypothesis, derandomized
with bounded max_examples, so the suite is deterministic; a few cases run the real `edgeloop` command."""
from __future__ import annotations

import math
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import fuzz_cases as fc
from tests.fuzzkit import ROOT, Worker, child_env, limit_memory, problems, snapshot

SETTINGS = dict(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=list(HealthCheck))
EXAMPLES = {"config": 250, "safetensors": 30, "header": 80, "manifest": 80, "tokenizer": 15,
            "cli": 200}  # generated cases per test
COUNTS: Counter = Counter()  # cases run, by kind (printed at the end of the module)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """Valid inputs the cases edit copies of: float checkpoints ck (test-none) and ckd (test-dynamic), the INT4
    checkpoint q of ck, its export x (external data), a sharded huginn_raven folder hug, text files."""
    from edgeloop.export import ExportConfig, export_checkpoint
    from edgeloop.model.checkpoint import save_checkpoint
    from edgeloop.model.data import train_tokenizer
    from edgeloop.quantize import RTNConfig, quantize_checkpoint
    from tests.conftest import perturbed
    from tests.importers.huginn_folder import write_huginn

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fuzz-bases")
    tok = train_tokenizer(fc.TEXT, 320)
    save_checkpoint(perturbed("test-none"), root / "ck", tokenizer=tok)
    save_checkpoint(perturbed("test-dynamic"), root / "ckd", tokenizer=tok)
    quantize_checkpoint(root / "ck", root / "q", RTNConfig(group_size=32), progress=False)
    export_checkpoint(root / "q", root / "x", ExportConfig(external_data=True, decode_steps=2))
    write_huginn(root / "hug", shards=2, tokenizer=train_tokenizer(fc.TEXT, 300))
    (root / "text.txt").write_text(fc.TEXT, encoding="utf-8")
    (root / "train.txt").write_text(fc.TEXT * 15, encoding="utf-8")  # enough lines for train's validation split
    return {p.name.split(".")[0]: p for p in root.iterdir()}


class Fuzzer:
    """Runs one case: copies the base folders it names into a fresh folder, applies the edit, runs the command
    in the worker and checks the answer and that nothing appeared on disk (there or in the worker's TMPDIR)."""

    def __init__(self, worker: Worker, root: Path, bases: dict[str, Path]):
        self.worker, self.root, self.bases = worker, root, bases

    def check(self, kind: str, base: str | None, edit, make, words: tuple[str, ...], library: bool = False) -> None:
        d = Path(tempfile.mkdtemp(dir=self.root))
        src = None
        if base is not None:
            src = d / base
            shutil.copytree(self.bases[base], src)
            if edit is not None:
                edit(src)
        case = make(src, d)
        case = {"argv": [str(a) for a in case]} if isinstance(case, list) else case
        before, tmp_before = snapshot(d), snapshot(self.worker.tmp)
        ans = self.worker.run(case)
        errs = problems(ans, words, library)
        if snapshot(d) != before:
            errs.append(f"left behind: {sorted(snapshot(d) - before)[:5]} (removed: {sorted(before - snapshot(d))[:5]})")
        if snapshot(self.worker.tmp) != tmp_before:
            errs.append(f"left in TMPDIR: {sorted(snapshot(self.worker.tmp) - tmp_before)[:5]}")
        COUNTS[kind] += 1
        shutil.rmtree(d, ignore_errors=True)
        assert not errs, f"{kind} case {case}: " + "; ".join(errs)


@pytest.fixture(scope="module")
def fz(bases, tmp_path_factory, request):
    worker = Worker(tmp_path_factory.mktemp("fuzz-worker") / "tmp")
    yield Fuzzer(worker, tmp_path_factory.mktemp("fuzz-cases"), bases)
    worker.close()
    tr, cap = (request.config.pluginmanager.get_plugin(n) for n in ("terminalreporter", "capturemanager"))
    if tr is not None and cap is not None and COUNTS:
        with cap.global_and_fixture_disabled():
            tr.write_line(f"\nfuzz cases by kind: {dict(COUNTS)}, {sum(COUNTS.values())} in all")


def cmd(name: str):
    return lambda src, d: fc.command(name, src, d)


# ---- config.json ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("i", range(len(fc.CONFIG_CASES)))
def test_config_cases(fz, i):
    edit, command, words = fc.CONFIG_CASES[i]
    fz.check("config", "ck", edit, cmd(command), words)


@settings(max_examples=EXAMPLES["config"], **SETTINGS)
@given(bad=fc.bad_config_values(st), command=st.sampled_from(["inspect", "quantize", "export", "generate"]))
def test_config_generated(fz, bad, command):
    field, value = bad

    def edit(ck: Path) -> None:
        def change(d: dict) -> None:
            if value == "<missing>":
                d.pop(field)
            else:
                d[field] = value
        fc.edit_json(ck / "config.json", change)
    fz.check("config", "ck", edit, cmd(command), (field, "config says", "tensor '"))


# ---- model.safetensors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("i", range(len(fc.SAFETENSORS_CASES)))
def test_safetensors_cases(fz, i):
    edit, command, words = fc.SAFETENSORS_CASES[i]
    fz.check("safetensors", "ck", edit, cmd(command), words)


@settings(max_examples=EXAMPLES["safetensors"], **SETTINGS)
@given(frac=st.floats(0.0, 0.999), base=st.sampled_from(["ck", "ckd", "q"]),
       command=st.sampled_from(["inspect", "export", "generate"]))
def test_safetensors_truncated(fz, frac, base, command):
    def edit(ck: Path) -> None:
        f = ck / "model.safetensors"
        f.write_bytes(f.read_bytes()[: int(frac * f.stat().st_size)])
    fz.check("safetensors", base, edit, cmd(command), fc.ST)


@settings(max_examples=EXAMPLES["header"], **SETTINGS)
@given(bad=fc.bad_header_entries(st), base=st.sampled_from(["ck", "q"]),
       command=st.sampled_from(["inspect", "export", "generate", "quantize"]))
def test_safetensors_header_generated(fz, bad, base, command):
    index, (key, value) = bad
    if base == "q" and command == "quantize":
        command = "export"  # quantize refuses a quantized folder before reading its header
    fz.check("safetensors", base, lambda ck: fc.apply_header_entry(ck, index, key, value), cmd(command),
             ("model.safetensors", "tensor '"))  # a broken file, or the tensor whose entry was changed


def test_quantized_safetensors_nan_scales(fz):
    fz.check("safetensors", "q", fc.poke("middle.0.attn.c_q.scales", math.nan), cmd("export"), ("NaN",))


# ---- index files of sharded folders ---------------------------------------------------------------------------
@pytest.mark.parametrize("i", range(len(fc.INDEX_CASES)))
def test_index_cases(fz, i):
    edit, command, words = fc.INDEX_CASES[i]
    fz.check("index", "hug", edit, cmd(command), words)


# ---- tokenizer files ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("i", range(len(fc.TOKENIZER_CASES)))
def test_tokenizer_cases(fz, i):
    edit, command, words = fc.TOKENIZER_CASES[i]
    fz.check("tokenizer", "ck", edit, cmd(command), words)


# ---- export folders: model.onnx, external data, manifest.json, genai_config.json, tokenizer ------------------
def x_gen(x, d):
    return ["generate", x, "--prompt", "And God said", "--max-new-tokens", "2"]


def x_eval(bases):
    return lambda x, d: ["eval", x, "--reference", bases["ck"], "--tokens", "64"]


def x_chat(x, d):
    return ["generate", x, "--prompt", "hello", "--max-new-tokens", "2", "--chat"]


def serve_call(x, d):
    return {"target": "edgeloop.runtime.serve:make_server", "args": [str(x)], "kwargs": {"port": 0}}


def manifest(fn):
    return fc.export_edit("manifest.json", lambda f: fc.edit_json(f, fn))


def raw(name: str, content: bytes | str):
    return fc.export_edit(name, lambda f: f.write_bytes(content.encode() if isinstance(content, str) else content))


def _set_kv(d: dict, **kv) -> None:
    d["kv"].update(kv)


IDENTITY = ROOT / "edgeloop" / "runtime" / "identity.onnx"
ONNX, MAN = ("model.onnx",), ("manifest.json",)
EXPORT_CASES = [  # (edit of a copy of x, command (x, d) -> argv or a call, words, library)
    (raw("model.onnx", b"\x08\x07garbage" * 20), x_gen, ONNX),
    (fc.export_edit("model.onnx", fc.truncate), "eval", ONNX),
    (raw("model.onnx", b""), x_gen, ONNX),
    (fc.export_edit("model.onnx", fc.copy_over(IDENTITY)), x_gen, ("convention", "model.onnx")),
    (fc.export_edit("model.onnx", lambda f: (f.unlink(), f.mkdir())), x_gen, ONNX),
    (fc.export_edit("model.onnx.data", fc.truncate), x_gen, ("model.onnx",)),
    (fc.export_edit("model.onnx.data", lambda f: f.unlink()), "eval", ("model.onnx",)),
    (raw("model.onnx.data", b""), x_gen, ("model.onnx",)),
    (raw("manifest.json", ""), x_gen, MAN),
    (raw("manifest.json", "{"), "eval", MAN),
    (raw("manifest.json", "[]"), x_gen, MAN),
    (raw("manifest.json", "[" * 50000), x_gen, MAN),
    (manifest(fc.dropper("num_loops")), x_gen, ("num_loops",)),
    (manifest(fc.dropper("config")), "eval", ("config",)),
    (manifest(fc.setter(num_loops="3")), x_gen, ("num_loops",)),
    (manifest(fc.setter(num_loops=10**9)), x_gen, ("num_loops",)),
    (manifest(fc.setter(max_seq_len=0)), "eval", ("max_seq_len",)),
    (manifest(fc.setter(config=[])), x_gen, ("config",)),
    (manifest(lambda d: d["config"].update(vocab_size="320")), x_gen, ("vocab_size",)),
    (manifest(lambda d: _set_kv(d, n_middle=10**6)), x_gen, ("kv",)),
    (manifest(lambda d: _set_kv(d, n_begin="a")), "eval", ("kv",)),
    (manifest(lambda d: _set_kv(d, dtype="int8")), x_gen, ("kv",)),
    (manifest(lambda d: _set_kv(d, head_dim=32)), x_gen, ("convention", "head_dim")),
    (manifest(lambda d: (d.pop("kv"), d["config"].update(n_middle=5))), x_gen, ("kv", "convention")),
    (manifest(fc.setter(generation={"eos_token_id": "x"})), x_gen, ("generation",)),
    (manifest(fc.setter(accuracy_level=9)), x_gen, ("accuracy_level",)),
    (raw("genai_config.json", "{"), serve_call, ("genai_config.json",), True),
    (raw("genai_config.json", "[1]"), serve_call, ("genai_config.json",), True),
    (raw("tokenizer_config.json", "{"), serve_call, ("tokenizer_config.json",), True),
    (raw("tokenizer.json", "{"), x_gen, ("tokenizer.json",)),
    (fc.export_edit("tokenizer.json", lambda f: fc.big_tokenizer(f.parent)), "eval", ("tokenizer.json",)),
    (raw("tokenizer_config.json", "{"), x_chat, ("tokenizer_config.json",)),
    (raw("tokenizer_config.json", '{"chat_template": [5]}'), x_chat, ("chat_template",)),
]


@settings(max_examples=EXAMPLES["manifest"], **SETTINGS)
@given(bad=fc.bad_manifest_values(st), command=st.sampled_from(["generate", "eval"]))
def test_manifest_generated(fz, bases, bad, command):
    field, value = bad
    *path, key = field.split(".")

    def change(d: dict) -> None:
        for p in path:
            d = d[p]
        d[key] = value
    fz.check("export folder", "x", manifest(change), x_eval(bases) if command == "eval" else x_gen,
             (key, "manifest.json", "convention"))


@settings(max_examples=EXAMPLES["tokenizer"], **SETTINGS)
@given(frac=st.floats(0.0, 0.99), command=st.sampled_from(["generate", "ppl", "run"]))
def test_tokenizer_truncated(fz, frac, command):
    def edit(ck: Path) -> None:
        f = ck / "tokenizer.json"
        f.write_bytes(f.read_bytes()[: int(frac * f.stat().st_size)])
    fz.check("tokenizer", "ck", edit, cmd(command), fc.TJ)


@pytest.mark.parametrize("i", range(len(EXPORT_CASES)))
def test_export_folder_cases(fz, bases, i):
    edit, command, words, *library = EXPORT_CASES[i]
    command = x_eval(bases) if command == "eval" else command
    fz.check("export folder", "x", edit, command, words, library=bool(library))


# ---- text files ---------------------------------------------------------------------------------------------
def text_file(content: bytes | str | None):
    """Write d/t.txt (None: leave it missing; "<dir>": a folder) and return its path."""
    def make(d: Path) -> Path:
        f = d / "t.txt"
        if content == "<dir>":
            f.mkdir()
        elif content is not None:
            f.write_bytes(content.encode() if isinstance(content, str) else content)
        return f
    return make


TEXTS = [None, "", "   \n\n", b"\xff\xfe\xfa broken", "<dir>", "a"]


def text_commands(bases):
    x, ck = bases["x"], bases["ck"]
    return {"eval": lambda f, d: ["eval", x, "--reference", ck, "--tokens", "64", "--text", f],
            "ppl": lambda f, d: ["inspect", ck, "--ppl", "--tokens", "64", "--text", f],
            "calib": lambda f, d: fc.command("gptq", ck, d) + ["--calib-text", f],
            "run": lambda f, d: fc.command("run", ck, d) + ["--eval-text", f],
            "bench": lambda f, d: ["bench", x, "--sweep", "--sweep-tokens", "64", "--text", f, "--decode-tokens", "2",
                                   "--prefill-tokens", "2"]}


TEXT_CASES = [("eval", t) for t in TEXTS] + [("ppl", t) for t in TEXTS[:4]] + [("calib", t) for t in TEXTS] + \
    [("run", t) for t in TEXTS[::2]] + [("bench", b"\xff\xfe")]


@pytest.mark.parametrize("i", range(len(TEXT_CASES)))
def test_text_cases(fz, bases, i):
    which, content = TEXT_CASES[i]
    run = text_commands(bases)[which]
    fz.check("text", None, None, lambda src, d: run(text_file(content)(d), d), ("t.txt", "calibration text"))


# ---- CLI values ---------------------------------------------------------------------------------------------
def options(bases):
    """(argv before the option, option, bad values, words) for every command that takes a value."""
    ck, q, x = bases["ck"], bases["q"], bases["x"]

    def quantize(d):
        return ["quantize", ck, "-o", d / "out"]

    def gptq(d):
        return fc.command("gptq", ck, d) + ["--calib-text", bases["text"]]

    def export(d):
        return ["export", q, "-o", d / "out"]

    def gen_x(d):
        return x_gen(x, d)

    def gen_ck(d):
        return ["generate", ck, "--prompt", "And", "--max-new-tokens", "2"]

    def eval_x(d):
        return ["eval", x, "--reference", ck, "--tokens", "64"]

    def run(d):
        return fc.command("run", ck, d)

    def train(d):
        (d / "broken").write_text('{"model_type": "hyperloop", "d_model": ')
        return ["train", "-o", d / "out", "--config", "test-none", "--steps", "1", "--seq-len", "32", "--text",
                bases["train"]]

    return [
        (quantize, "--group-size", ["7", "0", "-32", "100000", "abc", ""], ("group_size", "--group-size")),
        (quantize, "--bits", ["3", "8", "x"], ("bits",)),
        (quantize, "--method", ["foo", ""], ("algorithm", "method")),
        (quantize, "--scale-dtype", ["bfloat16", "x"], ("scale_dtype",)),
        (quantize, "--keep-dtype", ["int8"], ("keep_dtype",)),
        (quantize, "--embedding-bits", ["2", "5", "16"], ("embedding_bits", "--embedding-bits")),
        (gptq, "--calib-samples", ["0", "-1", "100000"], ("calib_samples", "calibration")),
        (gptq, "--calib-seq-len", ["1", "0", "1000000"], ("calib_seq_len",)),
        (gptq, "--device", ["tpu", "cuda"], ("device",)),
        (export, "--format", ["foo", "fp32", "fp16"], ("format",)),
        (export, "--accuracy-level", ["9", "-1"], ("accuracy-level",)),
        (export, "--max-seq-len", ["0", "-5", str(2**22)], ("max-seq-len", "max_seq_len")),
        (export, "--kv-policy", ["none", ""], ("kv-policy", "kv_policy")),
        (export, "--kv-dtype", ["int8"], ("kv-dtype", "kv_dtype")),
        (export, "--max-loops", ["-1", "2", str(10**9)], ("max-loops", "max_loops")),
        (export, "--init-state", ["ones", "random"], ("init-state",)),
        (export, "--parity-loops", ["a", "0", "1,,2", "100"], ("parity-loops",)),
        (export, "--parity-steps", ["-1"], ("parity-steps",)),
        (export, "--opset", ["20", "0"], ("opset",)),
        (gen_x, "--max-new-tokens", ["-1"], ("max-new-tokens", "max_new_tokens")),
        (gen_x, "--temperature", ["-1", "nan"], ("temperature",)),
        (gen_x, "--top-k", ["-1"], ("top-k", "top_k")),
        (gen_x, "--top-p", ["0", "1.5", "-0.1", "nan"], ("top-p", "top_p")),
        (gen_x, "--num-loops", ["0", "100", "-1"], ("num_loops", "num-loops")),
        (gen_x, "--repetition-penalty", ["0", "-1"], ("repetition",)),
        (gen_x, "--ep", ["foo", "cuda", ""], ("ep", "execution provider")),
        (gen_x, "--threads", ["-1"], ("threads",)),
        (gen_x, "--exit-threshold", ["-1", "0.5"], ("exit", "threshold")),
        (gen_ck, "--num-loops", ["0", "100"], ("num_loops", "num-loops")),
        (gen_ck, "--temperature", ["-1"], ("temperature",)),
        (gen_ck, "--top-k", ["-3"], ("top-k", "top_k")),
        (gen_ck, "--max-new-tokens", ["-1"], ("max-new-tokens", "max_new_tokens")),
        (eval_x, "--tokens", ["1", "0", "-5"], ("tokens",)),
        (eval_x, "--batch-size", ["0", "-1"], ("batch",)),
        (eval_x, "--num-loops", ["0", "99"], ("num_loops", "num-loops")),
        (eval_x, "--ep", ["foo"], ("ep",)),
        (run, "--method", ["foo"], ("method",)),
        (run, "--format", ["fp32", "foo"], ("format",)),
        (run, "--accuracy-level", ["9"], ("accuracy-level",)),
        (run, "--ep", ["foo"], ("ep",)),
        (run, "--eval-tokens", ["1"], ("eval-tokens",)),
        (run, "--group-size", ["7"], ("group_size",)),
        (run, "--embedding-bits", ["5"], ("embedding_bits",)),
        (run, "--threads", ["-1"], ("threads",)),
        (lambda d: ["serve", x], "--port", ["70000", "-1"], ("port",)),
        (lambda d: ["serve", x], "--host", ["8.8.8.8", "example"], ("host",)),
        (lambda d: ["bench", x], "--context", ["0", "-1"], ("context",)),
        (lambda d: ["bench", x], "--prefill-tokens", ["0"], ("prefill",)),
        (lambda d: ["inspect", ck, "--ppl"], "--tokens", ["1", "-1"], ("tokens",)),
        (train, "--steps", ["0", "-1"], ("steps",)),
        (train, "--batch-size", ["0", str(10**9)], ("batch-size",)),
        (train, "--seq-len", ["1", "100000"], ("seq-len", "seq_len")),
        (train, "--lr", ["-1", "0", "nan", "inf"], ("lr",)),
        (train, "--warmup", ["-1"], ("warmup",)),
        (train, "--val-every", ["0"], ("val-every",)),
        (train, "--save-every", ["-5"], ("save-every",)),
        (train, "--val-tokens", ["1"], ("val-tokens",)),
        (train, "--dtype", ["int8"], ("dtype",)),
        (train, "--threads", ["-2"], ("threads",)),
        (train, "--config", ["nowhere.json", "broken"], ("config",)),
        (train, "--text", ["nowhere.txt"], ("nowhere.txt",)),
        (train, "--tokenizer", [str(bases["x"] / "model.onnx")], ("tokenizer",)),
        (gen_x, "--draft-loops", ["0", "3", "two", "-1"], ("draft_loops", "--draft-loops")),
        (lambda d: gen_x(d) + ["--draft-loops", "1"], "--lookahead", ["0", "-3", "100000"], ("lookahead",)),
        (lambda d: gen_x(d) + ["--draft-loops", "1"], "--draft-min-prob", ["1.5", "-0.1"], ("draft_min_prob",)),
        (lambda d: ["bench", x, "--decode-tokens", "4"], "--draft-loops", ["9", "x"], ("draft_loops", "--draft-loops")),
    ]


CLI_HAND = [(0, "7"), (9, "foo"), (11, "0"), (14, str(10**9)), (16, "a"), (22, "1.5"), (23, "100"), (25, "foo"),
            (32, "1"), (36, "foo"), (44, "70000"), (62, "3"), (63, "100000"), (64, "1.5"), (65, "9")]


@pytest.mark.parametrize("row,value", CLI_HAND)
def test_cli_values(fz, bases, row, value):
    make, option, _, words = options(bases)[row]
    fz.check("cli", None, None, lambda src, d: make(d) + [option, value], words)


@settings(max_examples=EXAMPLES["cli"], **SETTINGS)
@given(data=st.data())
def test_cli_values_generated(fz, bases, data):
    table = options(bases)
    make, option, values, words = table[data.draw(st.integers(0, len(table) - 1))]
    value = data.draw(st.sampled_from(values))
    fz.check("cli", None, None, lambda src, d: make(d) + [option, value], words)


# ---- the real command, a few times (start-up included) ------------------------------------------------------------
@pytest.mark.parametrize("argv,words", [
    (lambda b, d: ["export", d / "ck", "-o", d / "out"], ("num_loops",)),
    (lambda b, d: ["quantize", b["ck"], "-o", d / "out", "--group-size", "abc"], ("--group-size",)),
    (lambda b, d: ["generate", b["x"], "--prompt", "And", "--num-loops", "0"], ("num_loops",)),
])
def test_true_cli(bases, tmp_path, argv, words):
    work, tmp = tmp_path / "work", tmp_path / "tmp"  # the case's folder and the command's TMPDIR
    tmp.mkdir()
    shutil.copytree(bases["ck"], work / "ck")
    fc.edit_json(work / "ck" / "config.json", fc.setter(num_loops=10**9))
    before = snapshot(work)
    r = subprocess.run([sys.executable, "-m", "edgeloop.cli", *map(str, argv(bases, work))], capture_output=True,
                       text=True, timeout=300, preexec_fn=limit_memory, cwd=ROOT, env=child_env(tmp))
    COUNTS["true cli"] += 1
    ans = {"code": r.returncode, "stdout": r.stdout, "stderr": r.stderr, "crash": None}
    assert not problems(ans, words), problems(ans, words)
    assert snapshot(work) == before and not snapshot(tmp), (before ^ snapshot(work), snapshot(tmp))


def test_enough_cases():
    """The suite's size by kind, counted from its tables and example budgets (>= 200 in all)."""
    n = {"config": len(fc.CONFIG_CASES) + EXAMPLES["config"],
         "safetensors": len(fc.SAFETENSORS_CASES) + EXAMPLES["safetensors"] + EXAMPLES["header"] + 1,
         "index": len(fc.INDEX_CASES), "tokenizer": len(fc.TOKENIZER_CASES) + EXAMPLES["tokenizer"],
         "export folder": len(EXPORT_CASES) + EXAMPLES["manifest"], "text": len(TEXT_CASES),
         "cli": len(CLI_HAND) + EXAMPLES["cli"], "true cli": 3}
    assert sum(n.values()) >= 200, n
