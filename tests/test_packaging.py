"""A wheel of this checkout, installed into a fresh venv, works away from the checkout: the CLI inspects and
generates, and `edgeloop serve` serves the page shipped as package data.

The fresh venv gets the project's dependencies through PYTHONPATH: a folder of links to every top-level entry
of the running interpreter's site-packages except edgeloop itself (its dist-info and an editable install's
finder and .pth files), so only the wheel's copy of edgeloop can be imported."""
from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.conftest import DEMO, ROOT, perturbed

SHIPPED = ["edgeloop/runtime/identity.onnx", "edgeloop/runtime/web/index.html", "edgeloop/runtime/web/app.mjs",
           "edgeloop/runtime/web/edgeloop.mjs", "edgeloop/runtime/web/package.json",
           "edgeloop/runtime/web/package-lock.json"]


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, **kw)


def _deps_dir(folder: Path) -> Path:
    """Links to the dev environment's site-packages entries, edgeloop and editable-install files left out."""
    folder.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        n = entry.name
        if n.startswith(("edgeloop", "_edgeloop", "__editable__", "__pycache__")) or n.endswith(".pth"):
            continue
        (folder / n).symlink_to(entry)
    return folder


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """{"wheel", "venv", "env", "cwd", "export"}: the wheel installed into a fresh venv, the environment and
    working folder (outside the checkout) to run it in, and a tiny export made with the dev code."""
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"  # a copy, so the build leaves no build/ or *.egg-info in the checkout (nor reads stale ones)
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / f, src / f)
    shutil.copytree(ROOT / "edgeloop", src / "edgeloop",
                    ignore=shutil.ignore_patterns("__pycache__", "node_modules", "*.egg-info"))
    run = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                "-w", root / "dist", src])
    assert run.returncode == 0, run.stderr[-3000:]
    wheel = next((root / "dist").glob("edgeloop-*.whl"))
    venv = root / "venv"
    run = _run([sys.executable, "-m", "venv", "--without-pip", venv])
    assert run.returncode == 0, run.stderr[-3000:]
    run = _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps",
                "--no-index", wheel])
    assert run.returncode == 0, run.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=str(_deps_dir(root / "deps")), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    cwd = root / "elsewhere"
    cwd.mkdir()

    from edgeloop.export import ExportConfig, export_checkpoint
    from edgeloop.model.checkpoint import save_checkpoint
    from edgeloop.model.data import train_tokenizer

    tok = train_tokenizer("In the beginning God created the heaven and the earth.\n" * 50, 300)
    save_checkpoint(perturbed("test-dynamic"), root / "ck", tokenizer=tok)
    export_checkpoint(root / "ck", root / "export", ExportConfig())
    return {"wheel": wheel, "venv": venv, "env": env, "cwd": cwd, "export": root / "export"}


def _edgeloop(installed: dict, *args) -> subprocess.CompletedProcess:
    return _run([installed["venv"] / "bin" / "edgeloop", *args], env=installed["env"], cwd=installed["cwd"])


def test_the_wheel_ships_the_page_and_the_venv_imports_the_wheels_copy(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    assert set(SHIPPED) <= names, set(SHIPPED) - names
    assert not any("node_modules" in n for n in names)
    run = _run([installed["venv"] / "bin" / "python", "-c",
                "import edgeloop.runtime.serve as s; print(s.PAGE_DIR); print(s.CHECKOUT_WEB)"],
               env=installed["env"], cwd=installed["cwd"])
    assert run.returncode == 0, run.stderr[-3000:]
    page_dir, checkout = run.stdout.split()
    assert Path(page_dir).is_relative_to(installed["venv"]) and checkout == "None"
    assert (Path(page_dir) / "index.html").is_file()


def test_the_installed_cli_inspects_and_generates_outside_the_checkout(installed):
    run = _edgeloop(installed, "serve", "--help")
    assert run.returncode == 0 and "--web-modules" in run.stdout, run.stderr[-3000:]
    run = _edgeloop(installed, "inspect", DEMO)
    assert run.returncode == 0, run.stderr[-3000:]
    run = _edgeloop(installed, "generate", installed["export"], "--prompt", "In the beginning",
                    "--max-new-tokens", "4")
    assert run.returncode == 0 and run.stdout.startswith("In the beginning"), (run.stdout, run.stderr[-3000:])


def test_the_installed_serve_names_the_npm_ci_to_run(installed):
    run = _edgeloop(installed, "serve", installed["export"], "--port", "0")
    page_dir = installed["venv"] / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / \
        "site-packages" / "edgeloop" / "runtime" / "web"
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert f"npm ci --prefix {page_dir}" in " ".join(run.stderr.split()), run.stderr


def test_the_installed_serve_serves_the_page(installed):
    modules = ROOT / "web" / "node_modules"
    if not (modules / "onnxruntime-web").is_dir():
        pytest.skip(f"no {modules}: run npm ci --prefix {ROOT / 'web'}")
    proc = subprocess.Popen([installed["venv"] / "bin" / "edgeloop", "serve", installed["export"], "--host",
                             "127.0.0.1", "--port", "0", "--web-modules", modules], env=installed["env"],
                            cwd=installed["cwd"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + 30
        try:
            first = lines.get(timeout=30)
        except queue.Empty:
            pytest.fail("edgeloop serve printed no URL in 30 s")
        url = next(w for w in first.split() if w.startswith("http://127.0.0.1:"))
        status = None
        while status != 200 and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    status, body = r.status, r.read()
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        assert status == 200, f"GET {url}: no 200 in 30 s"
        assert b"<title>edgeloop in the browser</title>" in body
    finally:
        proc.terminate()
        proc.wait(10)
