"""The in-browser demo: `edgeloop serve` (loopback only, COOP/COEP, MIME types, one-line errors) and the page
end to end in headless Chromium (playwright-core, WASM backend): its greedy tokens equal the Python runtime's.

The end-to-end test needs node, Chromium (/usr/bin/chromium, or $CHROMIUM) and `npm ci --prefix web`; without
them it fails in CI (CI=true) and is skipped elsewhere, with the reason."""
from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edgeloop.runtime import serve
from edgeloop.runtime.serve import PAGE_FILES, find_modules, make_server
from edgeloop.runtime.session import NotAnExportError, RuntimeInputError
from tests.conftest import ROOT, run_cli

WEB = ROOT / "web"  # package.json (npm ci --prefix web), test/e2e.mjs and node_modules; the page is package data

PROMPT = "In the beginning God created the heaven and the earth."
N_TOKENS = 32
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def _fake_export(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(b"\0" * 16)
    (folder / "manifest.json").write_text(json.dumps(
        {"effective_layers": 1, "num_loops": 1, "max_seq_len": 8,  # the least manifest the runtime reads
         "config": {"vocab_size": 8, "n_begin": 0, "n_middle": 1, "n_end": 0, "n_kv_heads": 1, "n_heads": 1,
                    "d_model": 2}}))
    return folder


def _fake_web(folder: Path, node_modules: bool = True) -> Path:
    for f in PAGE_FILES:
        (folder / f).parent.mkdir(parents=True, exist_ok=True)
        (folder / f).write_text(f"<!-- {f} -->")
    if node_modules:
        for rel in ("onnxruntime-web/dist/ort.wasm.min.mjs", "onnxruntime-web/dist/ort.webgpu.min.mjs",
                    "onnxruntime-web/dist/ort-wasm-simd-threaded.wasm",
                    "@huggingface/tokenizers/dist/tokenizers.min.mjs"):
            (folder / "node_modules" / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / "node_modules" / rel).write_bytes(b"\0asm" if rel.endswith(".wasm") else b"export {};")
    return folder


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, b""


def test_serve_paths_mime_types_and_isolation_headers(tmp_path):
    model = _fake_export(tmp_path / "export")
    (tmp_path / "secret.txt").write_text("not served")
    server = make_server(model, "127.0.0.1", 0, web=_fake_web(tmp_path / "web"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for path, mime in [("/", "text/html"), ("/app.mjs", "text/javascript"),
                           ("/node_modules/onnxruntime-web/dist/ort.wasm.min.mjs", "text/javascript"),
                           ("/node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.wasm", "application/wasm"),
                           ("/model/manifest.json", "application/json"),
                           ("/model/model.onnx", "application/octet-stream")]:
            code, headers, body = _get(base + path)
            assert code == 200 and headers["content-type"].startswith(mime), (path, code, headers)
            assert headers["cross-origin-opener-policy"] == "same-origin"
            assert headers["cross-origin-embedder-policy"] == "require-corp"
        assert _get(base + "/model/model.onnx")[2] == b"\0" * 16
        for path in ("/model/../secret.txt", "/model/%2e%2e/secret.txt", "/../secret.txt", "/node_modules/",
                     "/model/", "/model/nope.json", "/secret.txt", "/node_modules/../../secret.txt"):
            assert _get(base + path)[0] == 404, path
    finally:
        server.shutdown()
        server.server_close()


def test_serve_refuses_bad_folders_hosts_and_missing_javascript(tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "serve", tmp_path / "nope")
    assert code == 2 and "no such export folder" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(monkeypatch, capsys, "serve", tmp_path)
    assert code == 2 and "not an edgeloop export folder" in err and len(err.strip().splitlines()) == 1
    model = _fake_export(tmp_path / "export")
    code, out, err = run_cli(monkeypatch, capsys, "serve", model, "--host", "0.0.0.0")
    assert code == 2 and "loopback" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(NotAnExportError):
        make_server(tmp_path, web=_fake_web(tmp_path / "web"))
    monkeypatch.setattr(serve, "CHECKOUT_WEB", None)  # not the checkout's web/node_modules either
    with pytest.raises(RuntimeInputError, match=r"npm ci --prefix"):
        make_server(model, "127.0.0.1", 0, web=_fake_web(tmp_path / "bare", node_modules=False))


def test_serve_finds_the_pages_javascript_in_order(tmp_path, monkeypatch, capsys):
    """--web-modules DIR, else the page folder's node_modules, else the checkout's web/node_modules."""
    model = _fake_export(tmp_path / "export")
    page = _fake_web(tmp_path / "page", node_modules=False)
    checkout = _fake_web(tmp_path / "checkout")
    mine = _fake_web(tmp_path / "mine") / "node_modules"
    monkeypatch.setattr(serve, "CHECKOUT_WEB", checkout)
    assert find_modules(web=page) == checkout / "node_modules"
    assert find_modules(web=_fake_web(tmp_path / "full")) == tmp_path / "full" / "node_modules"
    assert find_modules(mine, web=page) == mine.resolve()
    with pytest.raises(RuntimeInputError, match=r"^--web-modules .*missing.*npm ci --prefix"):
        find_modules(tmp_path / "page", web=page)  # the folder above node_modules: not what DIR means
    (mine / "onnxruntime-web/dist/ort.wasm.min.mjs").write_text("export const mine = 1;")
    server = make_server(model, "127.0.0.1", 0, web=page, modules=mine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        got = _get(f"http://127.0.0.1:{server.server_address[1]}/node_modules/onnxruntime-web/dist/ort.wasm.min.mjs")
        assert got[0] == 200 and got[2] == b"export const mine = 1;"
    finally:
        server.shutdown()
        server.server_close()
    code, out, err = run_cli(monkeypatch, capsys, "serve", model, "--web-modules", tmp_path / "nope")
    assert code == 2 and "--web-modules" in err and len(err.strip().splitlines()) == 1


def test_the_page_ships_in_the_package_and_web_installs_its_lockfile():
    serve.check_page_dir()  # edgeloop/runtime/web: index.html, app.mjs, edgeloop.mjs
    for f in ("package.json", "package-lock.json"):  # web/F links to the package's, so npm ci --prefix web
        assert (WEB / f).read_bytes() == (serve.PAGE_DIR / f).read_bytes(), f  # installs the shipped lockfile


def _missing_tools() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if not os.access(CHROMIUM, os.X_OK):
        return f"Chromium is not installed at {CHROMIUM} (bash scripts/system-deps.sh)"
    if not (WEB / "node_modules" / "playwright-core" / "package.json").is_file():
        return f"playwright-core is not installed: run npm ci --prefix {WEB}"
    try:
        find_modules()
    except RuntimeInputError as e:
        return str(e)
    return None


def _start_serve(folder: Path) -> tuple[subprocess.Popen, str]:
    """`edgeloop serve FOLDER --port 0` in a subprocess; (process, the URL it printed)."""
    proc = subprocess.Popen([sys.executable, "-m", "edgeloop.cli", "serve", str(folder), "--port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        first = lines.get(timeout=30)
    except queue.Empty:
        proc.kill()
        pytest.fail(f"edgeloop serve printed no URL in 30 s: {proc.stderr.read() if proc.poll() is not None else ''}")
    url = next((w for w in first.split() if w.startswith("http://")), None)
    if url is None:
        proc.kill()
        pytest.fail(f"edgeloop serve: unexpected first line {first!r}; stderr: {proc.communicate()[1]}")
    return proc, url


def _run_page(folder: Path, prompt: str, n: int) -> dict:
    """The page (WASM) served by `edgeloop serve FOLDER` generates n tokens from `prompt`: e2e.mjs's JSON."""
    missing = _missing_tools()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the in-browser demo test cannot run in CI: {missing}")
        pytest.skip(missing)
    proc, url = _start_serve(folder)
    try:
        run = subprocess.run(["node", str(WEB / "test" / "e2e.mjs"), "--url", url, "--prompt", prompt,
                              "--tokens", str(n), "--ep", "wasm", "--chromium", CHROMIUM],
                             capture_output=True, text=True, timeout=120)
    finally:
        proc.terminate()
        proc.wait(10)
    assert run.stdout.strip(), f"e2e.mjs printed nothing (exit {run.returncode}): {run.stderr[-2000:]}"
    page = json.loads(run.stdout.strip().splitlines()[-1])
    assert page["state"] == "done", (page.get("status"), page.get("errors"), run.stderr[-2000:])
    assert not page["errors"], page["errors"]
    assert page["crossOriginIsolated"] is True
    assert page["stats"]["backend"].startswith("WASM")
    return page


def _python_greedy(folder: Path, prompt: str, n: int):
    from edgeloop.runtime import Runtime

    rt = Runtime(folder, threads=1)
    ids = rt.tokenizer.encode(prompt, add_special_tokens=False).ids
    return ids, rt.generate_ids([ids], n)


def test_page_generates_the_python_runtimes_greedy_tokens(demo_int4):
    page = _run_page(demo_int4, PROMPT, N_TOKENS)
    prompt_ids, want = _python_greedy(demo_int4, PROMPT, N_TOKENS)
    assert page["promptIds"] == prompt_ids  # @huggingface/tokenizers == tokenizers (Rust)
    assert page["ids"] == want.tokens[0], (page["ids"], want.tokens[0])
    assert page["finish"] == want.finish[0]
    assert page["text"] == PROMPT + want.text[0]  # the page's decoded text
    assert page["decodeTokensPerS"] > 0 and page["prefillMs"] > 0
    fetched = (demo_int4 / "model.onnx").stat().st_size
    assert f"{fetched / 2 ** 20:.2f} MiB" in page["stats"]["model bytes fetched"]
    print(f"\nin-browser WASM: {page['decodeTokensPerS']:.1f} decode tokens/s, prefill {page['prefillMs']:.0f} ms")


def test_page_loads_external_data(demo_int4, tmp_path):
    """The same INT4 checkpoint exported with model.onnx.data: the page fetches both files."""
    from edgeloop.export import ExportConfig, export_checkpoint

    folder = tmp_path / "int4-external"
    export_checkpoint(demo_int4.parent / "ck", folder, ExportConfig(external_data=True))
    assert (folder / "model.onnx.data").is_file()
    prompt, n = "And God said", 8
    page = _run_page(folder, prompt, n)
    _, want = _python_greedy(folder, prompt, n)
    assert page["ids"] == want.tokens[0], (page["ids"], want.tokens[0])
    assert "model.onnx.data" in page["stats"]["model bytes fetched"]
