"""`edgeloop serve MODEL_DIR`: the in-browser demo (web/) and an export folder over HTTP on loopback only.

    /                       web/index.html (the page), /app.mjs, /edgeloop.mjs
    /node_modules/...       web/node_modules (onnxruntime-web, @huggingface/tokenizers; `npm ci --prefix web`)
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
from typing import Callable
from urllib.parse import unquote, urlsplit

from edgeloop.runtime.session import RuntimeInputError, read_manifest

WEB_DIR = Path(__file__).resolve().parents[2] / "web"
# what the page imports from web/node_modules (see the import map in web/index.html)
NEEDED_MODULES = ("onnxruntime-web/dist/ort.wasm.min.mjs", "onnxruntime-web/dist/ort.webgpu.min.mjs",
                  "@huggingface/tokenizers/dist/tokenizers.min.mjs")
PAGE_FILES = ("index.html", "app.mjs", "edgeloop.mjs")
MIME = {".wasm": "application/wasm", ".mjs": "text/javascript", ".js": "text/javascript",
        ".json": "application/json", ".html": "text/html; charset=utf-8", ".map": "application/json",
        ".onnx": "application/octet-stream", ".data": "application/octet-stream", ".css": "text/css"}


def check_web_dir(web: Path = WEB_DIR) -> None:
    """Raise RuntimeInputError (one line) unless web/ holds the page and its installed JavaScript."""
    if not all((web / f).is_file() for f in PAGE_FILES):
        raise RuntimeInputError(f"{web}: the in-browser demo's files are missing (edgeloop serve runs from a source "
                                "checkout installed with pip install -e .)")
    lost = [m for m in NEEDED_MODULES if not (web / "node_modules" / m).is_file()]
    if lost:
        raise RuntimeInputError(f"{web / 'node_modules'}: the page's JavaScript is not installed ({lost[0]} missing); "
                                f"run: npm ci --prefix {web}")


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
    """Static files from web/ and the export folder, with COOP/COEP and the right MIME types; no listings."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **MIME}

    def __init__(self, *args, web: Path, model: Path, quiet: bool = True, **kw):
        self.web, self.model, self.quiet = web, model, quiet
        super().__init__(*args, directory=str(web), **kw)

    def translate_path(self, path: str) -> str:
        """/model/X -> MODEL_DIR/X, /node_modules/X -> web/node_modules/X, / -> web/index.html, /X -> web/X
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
            return str(self.web.joinpath(*parts))
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


def make_server(model_dir: Path, host: str = "127.0.0.1", port: int = 8008, web: Path = WEB_DIR,
                quiet: bool = True) -> http.server.ThreadingHTTPServer:
    """A server (not yet serving) for the page and `model_dir`; one-line RuntimeInputError for every problem."""
    model_dir = Path(model_dir).resolve()
    read_manifest(model_dir)  # NotAnExportError for a folder that is not an export
    host = check_host(host)
    if not 0 <= port <= 65535:
        raise RuntimeInputError(f"--port {port}: must be in 0..65535 (0 = any free port)")
    check_web_dir(web)
    server_cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6}) if ":" in host else _Server
    try:
        return server_cls((host, port), partial(DemoHandler, web=web, model=model_dir, quiet=quiet))
    except OSError as e:
        raise RuntimeInputError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


def serve(model_dir: Path, host: str = "127.0.0.1", port: int = 8008, quiet: bool = True,
          say: Callable[[str], None] = print) -> None:
    """Serve until interrupted; says the URL first (one line, flushed: scripts read it)."""
    server = make_server(model_dir, host, port, quiet=quiet)
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
