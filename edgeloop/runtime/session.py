"""Opening an export folder with onnxruntime: folder and convention checks, execution providers,
session options (threads, mmap'd external data, prepacking, profiling) and node placement.

Every problem is a `RuntimeInputError` (a ValueError) with a one-line message.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from edgeloop.kv import Layout
from edgeloop.runtime.plugins import PLUGINS, PluginUnavailable, is_registered, plugin_device, session_failure

# the short names edgeloop accepts -> onnxruntime's provider names
PROVIDERS: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "dml": "DmlExecutionProvider",
}
REQUIRED_FILES = ("model.onnx", "manifest.json")
MAX_SLOTS = 4096  # KV slots: per-step exports have at most 1024 (edgeloop.export.PER_STEP_SLOTS); shared ones
                  # one per unique layer (at most 3 x 1024)


class RuntimeInputError(ValueError):
    """A bad export folder, model, provider or request (one-line message)."""


class NotAnExportError(RuntimeInputError):
    """The folder is not an edgeloop export folder."""


class ConventionError(RuntimeInputError):
    """model.onnx's inputs/outputs do not follow the edgeloop KV-cache convention."""


class ProviderUnavailableError(RuntimeInputError):
    """The requested execution provider is not in this onnxruntime build (never swapped silently)."""


class ContextLengthError(RuntimeInputError):
    """A prompt is longer than the model's context."""


def read_manifest(folder: Path) -> dict[str, Any]:
    """manifest.json of an export folder after checking the folder holds an export and the manifest the fields
    the runtime reads (types and ranges: a manifest sizes the KV cache and the feeds)."""
    from edgeloop.io import JSONFileError, read_json_object

    if not folder.is_dir():
        raise NotAnExportError(f"{folder}: no such export folder")
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    if missing:
        hint = " (a checkpoint folder? export it first: edgeloop export CKPT -o OUT)" \
            if (folder / "model.safetensors").is_file() else ""
        raise NotAnExportError(f"{folder}: not an edgeloop export folder ({', '.join(missing)} missing){hint}")
    try:
        m = read_json_object(folder / "manifest.json")
    except JSONFileError as e:
        raise NotAnExportError(str(e)) from None
    need = ("effective_layers", "num_loops", "max_seq_len", "config")
    lost = next((k for k in need if k not in m), None)
    if lost:
        raise NotAnExportError(f"{folder / 'manifest.json'}: field '{lost}' is missing (not an edgeloop manifest)")
    problem = manifest_problem(m)
    if problem:
        raise NotAnExportError(f"{folder / 'manifest.json'}: {problem}")
    sizes = m.get("file_bytes") if isinstance(m.get("file_bytes"), dict) else {}
    for name in ("model.onnx.data",):  # the weights the export wrote: a short file is a truncated copy
        want, f = sizes.get(name), folder / name
        if isinstance(want, int) and f.is_file() and f.stat().st_size != want:
            raise NotAnExportError(f"{f}: {f.stat().st_size:,} bytes, the export wrote {want:,} (a truncated or "
                                   f"replaced copy: copy the export folder again)")
    return m


def ort_cause(e: BaseException, limit: int = 200) -> str:
    """The cause in an onnxruntime error message: without its '[ONNXRuntimeError] : 1 : FAIL :' prefix and
    source locations (file.cc:123 Function), one line, at most `limit` characters."""
    import re

    text = " ".join(str(e).split()) or type(e).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"(?:[\w.-]*/)*[A-Za-z_]\w*\.(?:cc|cpp|h):\d+ [\w:<>~]+\]?", " ", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _int_in(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def manifest_problem(m: dict[str, Any]) -> str | None:
    """What in a manifest the runtime cannot use (the first thing), or None. The bounds are the model
    stage's config limits (edgeloop.model.config.LIMITS), restated: the runtime does not import that stage."""
    c = m["config"]
    if not isinstance(c, dict):
        return "field 'config' must be an object"
    checks = [("num_loops", m["num_loops"], 1, 4096), ("max_seq_len", m["max_seq_len"], 1, 1 << 21),
              ("effective_layers", m["effective_layers"], 1, 1 << 22), ("config.vocab_size", c.get("vocab_size"), 1, 1 << 24)]
    if m.get("max_loops") is not None:
        checks.append(("max_loops", m["max_loops"], 0, 4096))
    if m.get("accuracy_level") is not None:
        checks.append(("accuracy_level", m["accuracy_level"], 0, 4))
    for name, v, lo, hi in checks:
        if not _int_in(v, lo, hi):
            return f"field '{name}' = {v!r}: must be an integer in {lo}..{hi}"
    q = c.get("early_exit_threshold", 1.0)
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not q >= 0:
        return f"field 'config.early_exit_threshold' = {q!r}: must be a number >= 0"
    if "kv" in m and not isinstance(m["kv"], dict):
        return f"field 'kv' = {m['kv']!r}: must be an object (the KV layout)"
    src, where = (m["kv"], "kv") if "kv" in m else (c, "config")  # exports before "kv": the config's fields
    for k in (("n_begin", "n_middle", "n_end", "num_loops", "kv_heads", "head_dim") if "kv" in m else
              ("n_begin", "n_middle", "n_end", "n_kv_heads", "d_model", "n_heads")):
        if not _int_in(src.get(k), 0, 1 << 30):
            return f"field '{where}.{k}' = {src.get(k)!r}: must be a non-negative integer"
    try:
        kv = Layout.of_manifest(m)
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        return f"field 'kv' (or the config's layer fields) cannot be read ({type(e).__name__}: {e})"
    if kv.dtype not in ("float32", "float16") or kv.policy not in ("per-step", "shared"):
        return f"field 'kv': dtype {kv.dtype!r} / policy {kv.policy!r} (float32 or float16 / per-step or shared)"
    for name in ("n_begin", "n_end"):
        if not 0 <= getattr(kv, name) <= 1024:
            return f"field 'kv.{name}' = {getattr(kv, name)}: must be in 0..1024"
    for name, hi in (("n_middle", 1024), ("num_loops", 4096), ("kv_heads", 4096), ("head_dim", 1 << 16)):
        if not 1 <= getattr(kv, name) <= hi:
            return f"field 'kv.{name}' = {getattr(kv, name)}: must be in 1..{hi}"
    if kv.layers > MAX_SLOTS:
        return f"field 'kv': {kv.layers} KV slots, past the {MAX_SLOTS} any export has"
    gen = m.get("generation")
    if gen is not None:
        ids = gen.get("eos_token_id") if isinstance(gen, dict) else None
        if not isinstance(ids, list) or not all(_int_in(t, 0, c["vocab_size"] - 1) for t in ids) or \
                not _int_in(gen.get("pad_token_id", 0), 0, c["vocab_size"] - 1):
            return f"field 'generation' = {gen!r}: eos_token_id must be a list of token ids, pad_token_id one"
    return None


def export_tokenizer(folder: Path, vocab_size: int):
    """An export folder's tokenizer.json (None when it has none), checked to load and to fit the vocabulary."""
    f = folder / "tokenizer.json"
    if not f.exists():
        return None
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(f))
    except BaseException as e:  # a bare Exception on bad JSON, a pyo3 PanicException on worse
        if isinstance(e, (KeyboardInterrupt, SystemExit, MemoryError)):
            raise
        lines = str(e).strip().splitlines()
        raise RuntimeInputError(f"{f}: cannot be read as a tokenizer ({lines[0] if lines else type(e).__name__})") from None
    if tok.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise RuntimeInputError(f"{f}: {tok.get_vocab_size(with_added_tokens=True)} tokens, more than the export's "
                                f"vocab_size {vocab_size}")
    return tok


def provider_names(ep: str) -> list[str]:
    """onnxruntime providers for `ep` (the EP first, CPU behind it for the nodes it does not take)."""
    if ep not in PROVIDERS:
        raise RuntimeInputError(f"--ep {ep!r}: unknown execution provider (one of {', '.join(PROVIDERS)})")
    import onnxruntime as ort

    name = PROVIDERS[ep]
    available = ort.get_available_providers()
    if name not in available and ep in PLUGINS:  # a plugin library (onnxruntime-ep-webgpu): register, find a device
        try:
            plugin_device(ep)
        except PluginUnavailable as e:
            raise ProviderUnavailableError(str(e)) from None
        return [name, PROVIDERS["cpu"]]
    if name not in available:
        have = ", ".join(k for k, v in PROVIDERS.items() if v in available) or "none"
        raise ProviderUnavailableError(
            f"execution provider '{ep}' ({name}) is not available in this onnxruntime {ort.__version__} build "
            f"(available here: {have}); install the onnxruntime package built with it")
    return [name] if ep == "cpu" else [name, PROVIDERS["cpu"]]


def session_options(threads: int = 0, mmap: bool = True, prepack: bool = True, profile: bool = False,
                    profile_prefix: str | None = None):
    """SessionOptions: intra-op threads (0 = onnxruntime's default), prepacking on/off
    (session.disable_prepacking), mmap of model files (session.use_memory_mapped_ort_model; ONNX
    external data is mapped by onnxruntime itself when `mmap`, else read into memory, see make_session)."""
    import onnxruntime as ort

    if threads < 0:
        raise RuntimeInputError(f"--threads {threads}: must be 0 (default) or positive")
    so = ort.SessionOptions()
    so.log_severity_level = 3  # num_loops is an input with a default: ORT warns about that by design
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.disable_prepacking", "0" if prepack else "1")
    so.add_session_config_entry("session.use_memory_mapped_ort_model", "1" if mmap else "0")
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix or os.path.join(tempfile.gettempdir(), "edgeloop-profile")
    return so


def external_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("model.onnx.data*") if p.is_file())


def make_session(folder: Path, providers: list[str], so, mmap: bool = True, model_file: str = "model.onnx"):
    """An InferenceSession on folder/model.onnx; with mmap=False the external data files are read into
    memory and handed to onnxruntime (otherwise onnxruntime maps them). Checks that the requested
    provider really is in the session (onnxruntime can drop one whose libraries fail to load)."""
    import onnxruntime as ort

    keep = []
    if not mmap:
        files = external_files(folder)
        if files:
            keep = [np.fromfile(p, dtype=np.uint8) for p in files]
            so.add_external_initializers_from_files_in_memory([p.name for p in files], keep, [len(b) for b in keep])
    kw = {"providers": providers}
    plugin = next((k for k, v in PROVIDERS.items() if v == providers[0] and k in PLUGINS), None)
    if plugin is not None and is_registered(plugin):
        so.add_provider_for_devices([plugin_device(plugin)], {})  # CPU takes what the plugin does not
        kw = {}
    try:
        sess = ort.InferenceSession(str(folder / model_file), so, **kw)
    except Exception as e:  # onnxruntime raises its own exception types
        if plugin is not None and (clear := session_failure(plugin, str(e))):
            raise ProviderUnavailableError(clear) from None
        raise RuntimeInputError(f"{folder / model_file}: onnxruntime cannot load it ({ort_cause(e)})") from None
    if providers[0] not in sess.get_providers():
        raise ProviderUnavailableError(f"execution provider {providers[0]} failed to initialise "
                                       f"(onnxruntime fell back to {', '.join(sess.get_providers())})")
    sess._edgeloop_buffers = keep  # the in-memory external data must outlive the session
    return sess


def check_convention(sess, kv: Layout) -> bool:
    """Raise ConventionError unless the session's inputs/outputs follow the KV convention of `kv`
    (edgeloop.kv); returns whether the model takes `num_loops` (an overridable initializer; absent in
    unrolled exports)."""
    problem = kv.problem([(i.name, i.type, i.shape) for i in sess.get_inputs()], [o.name for o in sess.get_outputs()])
    if problem:
        raise ConventionError(f"model.onnx does not follow the edgeloop KV convention: {problem}")
    loops = {i.name for i in [*sess.get_inputs(), *sess.get_overridable_initializers()]}
    return "num_loops" in loops


def placement_from_profile(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{provider: {"nodes": n, "ops": {op_type: n}}} from an onnxruntime profiling JSON (the nodes that
    ran, Loop-body nodes included)."""
    with open(path, encoding="utf-8") as f:
        events = json.load(f)
    seen: dict[str, tuple[str, str]] = {}
    for ev in events:
        args = ev.get("args") or {}
        if ev.get("cat") == "Node" and "provider" in args and str(ev.get("name", "")).endswith("_kernel_time"):
            seen[ev["name"][: -len("_kernel_time")]] = (args["provider"], args.get("op_name", "?"))
    by_provider: dict[str, Counter] = {}
    for provider, op in seen.values():
        by_provider.setdefault(provider, Counter())[op] += 1
    return {p: {"nodes": sum(c.values()), "ops": dict(sorted(c.items()))} for p, c in sorted(by_provider.items())}
