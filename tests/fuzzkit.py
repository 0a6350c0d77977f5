"""The fuzz harness: a worker process under an address-space limit that runs edgeloop's entry points (the CLI's
main() in-process, or a library function) one case at a time, and the checks every malformed-input case passes:
a non-zero exit (or a ValueError subclass), one line on stderr naming what is wrong, no traceback, nothing left
behind (no output folder, no temp folder), bounded memory (a runaway fails its case, not the machine).

    python -m tests.fuzzkit FD      the worker: reads cases (JSON lines) on stdin, answers on file descriptor FD
"""
from __future__ import annotations

import io
import json
import os
import re
import queue
import resource
import struct
import subprocess
import sys
import tempfile
import threading
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEMORY_LIMIT = 4 << 30  # RLIMIT_AS: the imports take ~0.8 GiB of address space; a tiny model's work fits in the rest
CASE_TIMEOUT = 90.0  # seconds: a hang fails its case


def limit_memory() -> None:
    """preexec_fn of every fuzzed process: an address-space limit, so a runaway allocation raises MemoryError."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def child_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "EDGELOOP_DEBUG"}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), TMPDIR=str(tmp),
               MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1", COLUMNS="200")
    return env


class Worker:
    """One worker process; `run(case)` sends a case and waits for its answer (restarting a worker that died)."""

    def __init__(self, tmp: Path):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.proc = None
        self._start()

    def _start(self) -> None:
        r, w = os.pipe()
        self.log = open(self.tmp.parent / f"worker-{len(os.listdir(self.tmp.parent))}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fuzzkit", str(w)], stdin=subprocess.PIPE,
                                     stdout=self.log, stderr=self.log, pass_fds=(w,), preexec_fn=limit_memory,
                                     cwd=ROOT, env=child_env(self.tmp))
        os.close(w)
        self.answers: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(os.fdopen(r, "r"), self.answers), daemon=True).start()

    @staticmethod
    def _read(f, q: queue.Queue) -> None:
        for line in f:
            q.put(json.loads(line))
        q.put(None)  # the worker exited

    def run(self, case: dict, timeout: float = CASE_TIMEOUT) -> dict:
        self.proc.stdin.write((json.dumps(case) + "\n").encode())
        self.proc.stdin.flush()
        try:
            ans = self.answers.get(timeout=timeout)
        except queue.Empty:
            ans = {"died": f"no answer in {timeout:.0f} s (killed)"}
            self.proc.kill()
        if ans is None:
            ans = {"died": f"the worker exited with {self.proc.wait()}"}
        if "died" in ans:
            self.proc.wait()
            self._start()
        return ans

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


# ---- the worker side ---------------------------------------------------------------------------------------
def _target(name: str):
    mod, _, attr = name.partition(":")
    obj = __import__(mod, fromlist=["_"])
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _capture_fds():
    """Point file descriptors 1 and 2 at temp files (what native code writes), returning a restore function
    that gives back (native stdout, native stderr)."""
    saved = [os.dup(1), os.dup(2)]
    files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    for fd, f in zip((1, 2), files):
        os.dup2(f.fileno(), fd)

    def restore() -> tuple[str, str]:
        out = []
        for fd, f, s in zip((1, 2), files, saved):
            os.dup2(s, fd)
            os.close(s)
            f.seek(0)
            out.append(f.read().decode("utf-8", "replace"))
            f.close()
        return out[0], out[1]
    return restore


def run_case(case: dict) -> dict:
    """{"argv": [...]} runs `edgeloop ARGV`; {"target": "module:function", "args": [...], "kwargs": {...}}
    calls a library function. Answers: code, stdout, stderr (Python's and native), and for a call whether it
    raised a ValueError, with the exception's type and message; "crash" holds any traceback."""
    ans: dict = {"code": None, "crash": None}
    out, err = io.StringIO(), io.StringIO()
    restore = _capture_fds()
    argv = sys.argv
    try:
        with redirect_stdout(out), redirect_stderr(err):
            if "argv" in case:
                from edgeloop import cli

                sys.argv = ["edgeloop", *case["argv"]]
                try:
                    cli.main()
                    ans["code"] = 0
                except SystemExit as e:
                    ans["code"] = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            else:
                try:
                    ret = _target(case["target"])(*case.get("args", []), **case.get("kwargs", {}))
                    ans["returned"] = repr(ret)[:300]
                except ValueError as e:
                    ans.update(raised=type(e).__name__, message=str(e))
    except BaseException as e:  # anything else (MemoryError included) is a crash
        ans["crash"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"[-4000:]
    finally:
        sys.argv = argv
        n_out, n_err = restore()
    ans["stdout"], ans["stderr"] = out.getvalue() + n_out, err.getvalue() + n_err
    return ans


def serve(fd: int) -> None:
    import onnxruntime  # noqa: F401  (the imports once, not per case; they leave THIRD_PARTY files in TMPDIR)
    import torch._dynamo  # noqa: F401

    import edgeloop.cli  # noqa: F401
    import edgeloop.export  # noqa: F401
    import edgeloop.runtime.drift  # noqa: F401

    answers = os.fdopen(fd, "w")
    for line in sys.stdin:
        answers.write(json.dumps(run_case(json.loads(line))) + "\n")
        answers.flush()


# ---- the checks ---------------------------------------------------------------------------------------------
THIRD_PARTY = (".ses", "torchinductor_")  # what onnxruntime (a session-id file) and torch (its compile cache)
                                          # leave in TMPDIR when imported: not edgeloop's to remove


def snapshot(root: Path) -> set[str]:
    """Every path under `root` (files and folders, hidden ones too), less the libraries' THIRD_PARTY files."""
    return {str(p.relative_to(root)) for p in Path(root).rglob("*") if not p.name.startswith(THIRD_PARTY)
            and not any(part.startswith(THIRD_PARTY) for part in p.relative_to(root).parts)}


def problems(ans: dict, names: tuple[str, ...], library: bool = False) -> list[str]:
    """What is wrong with a refused-input answer (empty: the case passed)."""
    bad = []
    if ans.get("died"):
        return [f"the process died: {ans['died']}"]
    if ans.get("crash"):
        return [f"crash (not a one-line error): {ans['crash']}"]
    if library:
        if "raised" not in ans:
            return [f"returned {ans.get('returned')} instead of raising a ValueError"]
        text = ans["message"]
        if ans["stderr"].strip():
            bad.append(f"wrote to stderr: {ans['stderr'][:500]!r}")
    else:
        if ans["code"] in (0, None):
            return [f"exit {ans['code']}: the malformed input was accepted (stdout {ans['stdout'][-300:]!r})"]
        if ans["code"] != 2:
            bad.append(f"exit {ans['code']}, expected 2")
        text = ans["stderr"]
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if len(lines) != 1:
        bad.append(f"{len(lines)} lines instead of one: {text[-1500:]!r}")
    if lines and len(re.sub(r"/\S+", "/P", lines[0])) > 300:  # paths aside, an error line stays short
        bad.append(f"a line of {len(lines[0])} characters: {lines[0][:400]!r}")
    if "Traceback" in text:
        bad.append("a traceback")
    if names and not any(n.lower() in text.lower() for n in names):
        bad.append(f"does not name any of {names}: {text.strip()[:400]!r}")
    return bad


# ---- malformed safetensors ----------------------------------------------------------------------------------
def st_parts(data: bytes) -> tuple[dict, bytes]:
    """(header dict, tensor bytes) of a safetensors file."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def st_bytes(header: dict | bytes, body: bytes, length: int | None = None) -> bytes:
    """A safetensors file from a header (a dict, or raw bytes) and the tensor bytes; `length` overrides the
    8-byte header length."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(hb) if length is None else length) + hb + body


if __name__ == "__main__":
    serve(int(sys.argv[1]))
