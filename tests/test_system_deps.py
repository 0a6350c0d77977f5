"""scripts/system-deps.sh derives its bookworm-backports source from the machine's apt sources: run with
APT_ROOT (a fake tree) and DRY_RUN=1 (print, write nothing, no apt-get) against one-line and deb822 sources."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "system-deps.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("awk") is None,
                                reason="needs bash and awk")


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    """A fake root holding etc/apt/FILE for each entry."""
    apt = tmp_path / "etc" / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    for name, text in files.items():
        (apt / name).write_text(text)
    return tmp_path


def _dry_run(root: Path) -> subprocess.CompletedProcess:
    before = sorted((p.relative_to(root), p.read_bytes()) for p in root.rglob("*") if p.is_file())
    run = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "APT_ROOT": str(root), "DRY_RUN": "1"},
                         capture_output=True, text=True, timeout=30)
    after = sorted((p.relative_to(root), p.read_bytes()) for p in root.rglob("*") if p.is_file())
    assert before == after, "DRY_RUN=1 wrote into the apt tree"
    return run


def test_one_line_sources_list(tmp_path):
    root = _tree(tmp_path, {"sources.list": (
        "# deb http://old.test/debian bookworm main\n"
        "deb http://archive.test/debian-security bookworm-security main\n"
        "deb-src http://archive.test/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://archive.test/debian bookworm main contrib\n"),
        "sources.list.d/vendor.list": "deb http://vendor.test/apt bookworm main\n"})
    run = _dry_run(root)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        f"system-deps: would write {root}/etc/apt/sources.list.d/backports.list:",
        "deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://archive.test/debian bookworm-backports main"]


def test_deb822_debian_sources(tmp_path):
    root = _tree(tmp_path, {"sources.list.d/debian.sources": (
        "Types: deb\n"
        "# a snapshot of the archive\n"
        "URIs: http://archive.test/debian\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        "\n"
        "Types: deb\n"
        "URIs: http://archive.test/debian-security\n"
        "Suites: bookworm-security\n"
        "Components: main\n")})
    run = _dry_run(root)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        f"system-deps: would write {root}/etc/apt/sources.list.d/backports.sources:",
        "Types: deb", "URIs: http://archive.test/debian", "Suites: bookworm-backports", "Components: main",
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"]


@pytest.mark.parametrize("name,text", [
    ("sources.list.d/backports.list", "deb http://archive.test/debian bookworm-backports main\n"),
    ("sources.list.d/extra.sources",
     "Types: deb\nURIs: http://archive.test/debian\nSuites: bookworm-backports\nComponents: main\n")])
def test_existing_backports_source_is_left_alone(tmp_path, name, text):
    root = _tree(tmp_path, {"sources.list": "deb http://archive.test/debian bookworm main\n", name: text})
    run = _dry_run(root)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"system-deps: a bookworm-backports source exists: {root}/etc/apt/{name}"


@pytest.mark.parametrize("files", [
    {},
    {"sources.list": "# deb http://archive.test/debian bookworm main\n"
                     "deb http://archive.test/debian-security bookworm-security main\n"},
    {"sources.list.d/debian.sources":
     "Types: deb\nURIs: http://archive.test/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n"}],
    ids=["empty", "commented-out", "disabled"])
def test_no_usable_source_fails_in_one_line(tmp_path, files):
    run = _dry_run(_tree(tmp_path, files))
    assert run.returncode == 1 and run.stdout == ""
    assert len(run.stderr.strip().splitlines()) == 1 and "bookworm main" in run.stderr, run.stderr
