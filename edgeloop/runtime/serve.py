"""`edgeloop serve MODEL_DIR`: the in-browser demo and an export folder over HTTP on loopback only.

    /                       the page: edgeloop/runtime/web/index.html (package data), /app.mjs, /edgeloop.mjs
    /node_modules/...       onnxruntime-web and @huggingface/tokenizers: --web-modules DIR, else the package's
                            web/node_modules, else a checkout's web/node_modules (`npm ci --prefix web`)
    /model/FILE             the export folder's files (model.onnx, model.onnx.data, manifest.json, ...)

Every response carries Cross-Origin-Opener-Policy: same-origin and Cross-Origin-Embedder-Policy: require-corp,
so the page is cross-origin isolated: SharedArrayBuffer for onnxruntime-web's WASM threads, and
performance.measureUserAgentSpecificMemory() for the page's memory. Standard library only.
"""
from __future__ import annotations

import http.server
import ipaddress
import os
import posixpath
import socket
import sys
from functools import partial
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import unquote, urlsplit

from edgeloop.io import JSONFileError, read_json_object
from edgeloop.runtime.session import RuntimeInputError, read_manifest

PAGE_DIR = Path(__file__).resolve().parent / "web"  # the page, package.json and package-lock.json (package data)
_ROOT = Path(__file__).resolve().parents[2]
# a source checkout's web/ (package.json links to PAGE_DIR's; `npm ci --prefix web` fills web/node_modules)
CHECKOUT_WEB: Optional[Path] = (_ROOT / "web" if (_ROOT / "pyproject.toml").is_file()
                                and (_ROOT / "web" / "package.json").is_file() else None)
# what the page imports from node_modules (see the import map in index.html)
NEEDED_MODULES = ("onnxruntime-web/dist/ort.wasm.min.mjs", "onnxruntime-web/dist/ort.webgpu.min.mjs",
                  "@huggingface/tokenizers/dist/tokenizers.min.mjs")
PAGE_FILES = ("index.html", "app.mjs", "edgeloop.mjs")
MIME = {".wasm": "application/wasm", ".mjs": "text/javascript", ".js": "text/javascript",
        ".json": "application/json", ".html": "text/html; charset=utf-8", ".map": "application/json",
        ".onnx": "application/octet-stream", ".data": "application/octet-stream", ".css": "text/css"}


def check_page_dir(web: Path = PAGE_DIR) -> None:
    """Raise RuntimeInputError (one line) unless `web` holds the page's files."""
    lost = [f for f in PAGE_FILES if not (web / f).is_file()]
    if lost:
        raise RuntimeInputError(f"{web}: the in-browser demo's {lost[0]} is missing (reinstall edgeloop)")


def _missing_module(modules: Path) -> Optional[str]:
    return next((m for m in NEEDED_MODULES if not (modules / m).is_file()), None)


def find_modules(explicit: Optional[Path] = None, web: Path = PAGE_DIR) -> Path:
    """The node_modules folder to serve: `explicit` (--web-modules), else web/node_modules, else a checkout's
    web/node_modules; one-line RuntimeInputError naming the `npm ci --prefix DIR` to run when none has them."""
    if explicit is not None:
        modules = Path(explicit).expanduser().resolve()
        lost = _missing_module(modules)
        if lost:
            prefix = CHECKOUT_WEB or web
            raise RuntimeInputError(f"--web-modules {modules}: {lost} missing (DIR is a node_modules folder: "
                                    f"npm ci --prefix {prefix} makes {prefix / 'node_modules'})")
        return modules
    places = [web / "node_modules"] + ([CHECKOUT_WEB / "node_modules"] if CHECKOUT_WEB is not None else [])
    for modules in places:
        if _missing_module(modules) is None:
            return modules
    lost = _missing_module(places[-1])
    raise RuntimeInputError(f"{places[-1]}: the page's JavaScript is not installed ({lost} missing); run: "
                            f"npm ci --prefix {CHECKOUT_WEB or web} (the folder with its package.json), "
                            "or pass --web-modules DIR")


def check_host(host: str) -> str:
    """The host to bind: loopback addresses only (the demo serves local files and is never public)."""
    try:
        addr = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host)
    except ValueError:
        raise RuntimeInputError(f"--host {host!r}: not an IP address (use 127.0.0.1)") from None
    if not addr.is_loopback:
        raise RuntimeInputError(f"--host {host}: edgeloop serve binds loopback addresses only (127.0.0.1, ::1)")
    return str(addr)


class DemoHandler(http.server.SimpleHTTPRequestHandler):
    """The page, node_modules and the export folder, with COOP/COEP and the right MIME types; no listings."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **MIME}

    def __init__(self, *args, web: Path, modules: Path, model: Path, quiet: bool = True, **kw):
        self.web, self.modules, self.model, self.quiet = web, modules, model, quiet
        super().__init__(*args, directory=str(web), **kw)

    def translate_path(self, path: str) -> str:
        """/model/X -> MODEL_DIR/X, /node_modules/X -> MODULES/X, / -> web/index.html, /X -> web/X
        (page files only); anything else (or a '..' step) maps to a path that does not exist -> 404."""
        parts = [p for p in posixpath.normpath(unquote(urlsplit(path).path)).split("/") if p and p != "."]
        nowhere = str(self.web / "__no_such_file__")
        if any(p == ".." or p.startswith(".") or os.sep in p for p in parts):
            return nowhere
        if not parts:
            return str(self.web / "index.html")
        if parts[0] == "model" and len(parts) == 2:
            return str(self.model / parts[1])
        if parts[0] == "node_modules" and len(parts) > 1:
            return str(self.modules.joinpath(*parts[1:]))
        if len(parts) == 1 and parts[0] in PAGE_FILES:
            return str(self.web / parts[0])
        return nowhere

    def list_directory(self, path):
        self.send_error(404, "File not found")
        return None

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:
        if not self.quiet:
            super().log_message(format, *args)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


def make_server(model_dir: Path, host: str = "127.0.0.1", port: int = 8008, web: Path = PAGE_DIR,
                quiet: bool = True, modules: Optional[Path] = None) -> http.server.ThreadingHTTPServer:
    """A server (not yet serving) for the page in `web`, the JavaScript in `modules` (None: find_modules) and
    `model_dir`; one-line RuntimeInputError for every problem."""
    model_dir = Path(model_dir).resolve()
    read_manifest(model_dir)  # NotAnExportError for a folder that is not an export
    for name in ("genai_config.json", "tokenizer_config.json"):  # the other JSON the page reads, where present
        if (model_dir / name).exists():
            try:
                read_json_object(model_dir / name)
            except JSONFileError as e:
                raise RuntimeInputError(str(e)) from None
    host = check_host(host)
    if not 0 <= port <= 65535:
        raise RuntimeInputError(f"--port {port}: must be in 0..65535 (0 = any free port)")
    check_page_dir(web)
    modules = find_modules(modules, web)
    server_cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6}) if ":" in host else _Server
    try:
        return server_cls((host, port), partial(DemoHandler, web=web, modules=modules, model=model_dir,
                                                    quiet=quiet))
    except OSError as e:
        raise RuntimeInputError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


def serve(model_dir: Path, host: str = "127.0.0.1", port: int = 8008, quiet: bool = True,
          say: Callable[[str], None] = print, modules: Optional[Path] = None) -> None:
    """Serve until interrupted; says the URL first (one line, flushed: scripts read it)."""
    server = make_server(model_dir, host, port, quiet=quiet, modules=modules)
    h, p = server.server_address[:2]
    url = f"http://{'[' + h + ']' if ':' in h else h}:{p}/"
    missing = [f for f in ("tokenizer.json", "tokenizer_config.json") if not (Path(model_dir) / f).is_file()]
    say(f"serving {model_dir} at {url} (Ctrl-C to stop)")
    if missing:
        say(f"warning: {', '.join(missing)} missing in {model_dir}: the page needs tokenizer.json for text prompts")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
