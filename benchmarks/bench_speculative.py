"""Self-speculative decoding against plain full-depth decoding, side by side (run by hand).

    python benchmarks/bench_speculative.py --work /tmp/spec-bench [--rounds 5] [--tokens 96] [--huginn-shape]

For models/huginn-tiny (at its mean depth R = 16) and the shipped demo (R = 4): RTN INT4 (G = 128), exported
fused, accuracy level 4, with the per-step KV cache (exact verification; Huginn's default shared cache is
also run, with --draft-approximate, for contrast) and the loop-count dial; first whether greedy tokens are
plain decoding's at accuracy levels 4 (int8 activations) and 0 (fp32), and where not, how close plain
decoding's top two logits were where they parted; then, in one process per thread
count (1 and 2), for each (d, k) of a grid: greedy generations of --tokens tokens from four validation-text
prompts, plain and speculative interleaved round by round; a rate is the new tokens after the first over the
time from the first to the last; medians over rounds and prompts. Prints the table (tok/s, ratio, tokens kept
per verification, loops per token, identical tokens) and the choice of --draft-loops auto, and writes
WORK/results.json.

--huginn-shape adds the cost side at Huginn-0125's real shape (random bf16 weights, bench_huginn.py's writer;
import -> RTN G = 32 -> export per-step, --max-loops 32): one draft step at d and one verification of k + 1
tokens at 32 steps, each over one plain step, and the speed-up projected at huginn-tiny's measured agreement:
a projection, since random weights agree on nothing.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {"huginn-tiny": (ROOT / "models" / "huginn-tiny", 16, [(1, 4), (2, 4), (2, 6), (4, 6), (4, 8), (2, 8)]),
          "demo": (ROOT / "models" / "hyperloop-tiny", 4, [(1, 2), (1, 4), (2, 3), (2, 5), (3, 6)])}


def edgeloop(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "edgeloop.cli", *args], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)


def prepare(work: Path, name: str, src: Path, R: int) -> dict[str, Path]:
    """INT4 exports of `src`: fused, accuracy level 4, per-step KV (and shared, for Huginn), dial up to 2R."""
    out = {}
    q = work / f"{name}-q"
    if not q.exists():
        edgeloop("quantize", str(src), "-o", str(q), "--method", "rtn", "--group-size", "128")
    variants = [("per-step", "4"), ("per-step", "0")] + ([("shared", "4")] if name.startswith("huginn") else [])
    for policy, level in variants:
        x = work / f"{name}-{policy}-acc{level}"
        if not x.exists():
            max_loops = 2 * R if name.startswith("huginn") else 6
            edgeloop("export", str(q), "-o", str(x), "--fused", "--accuracy-level", level, "--kv-policy", policy,
                     "--max-loops", str(max_loops))
        out[policy if level == "4" else f"{policy}-acc0"] = x
    return out


def identity(folder: Path, R: int, d: int, k: int, tokens: int) -> dict:
    """Greedy tokens of plain and speculative decoding from the four prompts: how many generations are equal
    and, where one parts, the gap between plain decoding's top two logits there (a near-tie flipped by rounding)."""
    from edgeloop.runtime import Runtime

    rt = Runtime(folder, threads=1)
    same, gaps = 0, []
    for p in prompts(rt):
        a = rt.generate_ids([p], tokens, stop=(), num_loops=R).tokens[0]
        b = rt.generate_ids([p], tokens, stop=(), num_loops=R, draft_loops=d, lookahead=k).tokens[0]
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if at is None:
            same += 1
            continue
        seq = p + a[:at]
        logits, _ = rt.forward(np.array([seq]), np.ones((1, len(seq)), np.int64), np.arange(len(seq))[None],
                               rt.empty_past(1), R)
        top = np.sort(logits[0, -1])[-2:]
        gaps.append(float(top[1] - top[0]))
    return {"identical": same, "of": 4, "gaps_at_parting": gaps}


def prompts(rt, n: int = 4, length: int = 32) -> list[list[int]]:
    from edgeloop.model.data import corpus_split

    ids = rt.encode(corpus_split("validation")).tolist()
    step = len(ids) // n
    return [ids[i * step: i * step + length] for i in range(n)]


def rate(rt, prompt, tokens: int, R: int, **spec) -> tuple[float, object]:
    """tokens after the first over their time (edgeloop.runtime.measure.first_to_last_rate) at R loops."""
    from edgeloop.runtime.measure import first_to_last_rate

    return first_to_last_rate(rt, prompt, tokens + 1, num_loops=R, **spec)


def side_by_side(folder: Path, R: int, grid, threads: int, rounds: int, tokens: int, approximate: bool = False):
    from edgeloop.runtime import Runtime

    rt = Runtime(folder, threads=threads)
    ps = prompts(rt)
    rows = []
    for d, k in grid:
        spec = dict(draft_loops=d, lookahead=k, approximate=approximate)
        rate(rt, ps[0], 8, R)
        rate(rt, ps[0], 8, R, **spec)  # warm both paths
        plain, fast, same, st = [], [], [], []
        for _ in range(rounds):
            for p in ps:
                a, ga = rate(rt, p, tokens, R)
                b, gb = rate(rt, p, tokens, R, **spec)
                plain.append(a)
                fast.append(b)
                same.append(ga.tokens == gb.tokens)
                st.append(gb.speculation)
        rows.append({"draft_loops": d, "lookahead": k, "threads": threads,
                     "plain_tokens_per_s": float(np.median(plain)), "speculative_tokens_per_s": float(np.median(fast)),
                     "ratio": float(np.median(np.array(fast) / np.array(plain))),
                     "acceptance_rate": float(np.mean([s["acceptance_rate"] for s in st])),
                     "accepted_per_verify": float(np.mean([s["accepted_per_verify"] for s in st])),
                     "loops_per_token": float(np.mean([s["loops_per_token"] for s in st])),
                     "identical_tokens": float(np.mean(same))})
        r = rows[-1]
        print(f"  {folder.name} t={threads} d={d} k={k}: plain {r['plain_tokens_per_s']:.1f} tok/s, speculative "
              f"{r['speculative_tokens_per_s']:.1f} ({r['ratio']:.2f}x), kept {r['acceptance_rate']:.0%}, "
              f"{r['accepted_per_verify']:.2f}/verify, {r['loops_per_token']:.2f} loops/token, identical "
              f"{r['identical_tokens']:.0%}", flush=True)
    plain, fast, st = [], [], []  # --draft-loops auto, as a user runs it (the calibration before the first token)
    for _ in range(rounds):
        for p in ps:
            plain.append(rate(rt, p, tokens, R)[0])
            r, g = rate(rt, p, tokens, R, draft_loops="auto", lookahead=8, approximate=approximate)
            fast.append(r)
            st.append(g.speculation)
    auto = {k: v for k, v in st[-1]["auto"].items() if k not in ("table", "costs")}
    auto.update(ratio=float(np.median(np.array(fast) / np.array(plain))),
                acceptance_rate=float(np.mean([s["acceptance_rate"] for s in st])),
                lookahead_used=[s["auto"].get("lookahead_used") for s in st])
    return rows, auto


def call_costs(rt, R: int, ds, ks, reps: int = 5, N: int = 32) -> dict:
    """Seconds of one call after an N-token cache (median of reps, after an untimed first call of the shape):
    a plain step (one token at R loops), a draft step at each d, a verification of k + 1 tokens at R, the last
    two over the first. In-place buffers where the export has them, as generation uses them."""
    past = rt.buffer_past(1, N + max(ks) + 2) if rt.in_place else rt.empty_past(1)
    _, past = rt.forward(np.arange(N)[None] + 100, np.ones((1, N), np.int64), np.arange(N)[None], past, R,
                         keep_kv=True, in_place=rt.in_place)

    def timed(S: int, L: int) -> float:
        ts = []
        for i in range(reps + 1):
            t0 = time.perf_counter()
            rt.forward(np.full((1, S), 7), np.ones((1, N + S), np.int64), np.arange(N, N + S)[None], past, L,
                       keep_kv=True, in_place=rt.in_place)
            if i:
                ts.append(time.perf_counter() - t0)
        return float(np.median(ts))

    plain = timed(1, R)
    return {"plain_step_s": plain, "draft_over_plain": {d: timed(1, d) / plain for d in ds},
            "verify_over_plain": {k: timed(k + 1, R) / plain for k in ks}}


def huginn_shape(work: Path, agreement: dict[int, float], ds=(1, 2, 4, 8), ks=(4, 8), R: int = 32,
                 reps: int = 2) -> dict:
    """The cost side at Huginn-0125's shape: draft step at d and verification of k+1 tokens at R, over a plain
    step (one process, default threads), and the speed-up projected at agreement[d] (huginn-tiny's kept share
    at that draft depth, the nearest measured one below it otherwise; i.i.d. acceptance)."""
    from benchmarks.bench_huginn import REAL, write_checkpoint

    src, q, x = work / "huginn-3.5b", work / "huginn-3.5b-q", work / "huginn-3.5b-x"
    if not (src / "config.json").exists():
        write_checkpoint(src, REAL)
        (src / "config.json").write_text(json.dumps(REAL))
    if not q.exists():
        edgeloop("quantize", str(src), "-o", str(q), "--method", "rtn", "--group-size", "32")
    if not x.exists():
        edgeloop("export", str(q), "-o", str(x), "--external-data", "--accuracy-level", "4", "--kv-policy", "per-step",
                 "--max-loops", str(R), "--parity-loops", "1", "--parity-steps", "1")
    from edgeloop.runtime import Runtime

    c = call_costs(Runtime(x), R, ds, ks, reps)
    plain, draft, verify = c["plain_step_s"], c["draft_over_plain"], c["verify_over_plain"]
    proj = []
    for d in ds:
        a = agreement[max((x for x in agreement if x <= d), default=min(agreement))]
        for k in ks:
            tok = (1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1
            proj.append({"draft_loops": d, "lookahead": k, "agreement": a,
                         "projected_speedup": tok / (k * draft[d] + verify[k])})
    return {"plain_step_s": plain, "draft_over_plain": draft, "verify_over_plain": verify, "agreement": agreement,
            "projection": proj}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--models", default="huginn-tiny,demo")
    ap.add_argument("--huginn-shape", action="store_true")
    ap.add_argument("--costs-only", action="store_true", help="only the identity check and the call costs")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "rounds": a.rounds, "tokens": a.tokens}
    for name in [m for m in a.models.split(",") if m]:
        src, R, grid = MODELS[name]
        ex = prepare(a.work, name, src, R)
        d0, k0 = grid[1]
        results.setdefault(name, {})["identity"] = {
            "accuracy_level_4": identity(ex["per-step"], R, d0, k0, a.tokens),
            "accuracy_level_0": identity(ex["per-step-acc0"], R, d0, k0, a.tokens)}
        print(f"  {name} identity (d={d0}, k={k0}): {results[name]['identity']}", flush=True)
        from edgeloop.runtime import Runtime

        for threads in map(int, a.threads.split(",")):
            results[name][f"costs threads={threads}"] = c = call_costs(
                Runtime(ex["per-step"], threads=threads), R, sorted({d for d, _ in grid}), (2, 4, 8))
            print(f"  {name} t={threads} costs: plain step {1000 * c['plain_step_s']:.2f} ms; draft step / plain "
                  f"{c['draft_over_plain']}; verification of k+1 / plain {c['verify_over_plain']}", flush=True)
            if a.costs_only:
                continue
            rows, auto = side_by_side(ex["per-step"], R, grid, threads, a.rounds, a.tokens)
            results[name][f"threads={threads}"] = {"rows": rows, "auto": auto}
            print(f"  auto: d={auto['draft_loops']} k={auto['lookahead']} (then {auto['lookahead_used']}), projected "
                  f"{auto['projected_speedup']:.2f}x, measured {auto['ratio']:.2f}x", flush=True)
            if "shared" in ex and not a.costs_only:
                rows, _ = side_by_side(ex["shared"], R, grid[:2], threads, max(1, a.rounds // 2), a.tokens, True)
                results[name][f"shared threads={threads}"] = {"rows": rows}
    if a.huginn_shape:
        tiny = results.get("huginn-tiny") or json.loads((a.work / "results.json").read_text())["huginn-tiny"]
        agreement: dict[int, float] = {}
        for r in tiny["threads=1"]["rows"]:  # huginn-tiny's kept share at each draft depth (its best lookahead)
            agreement[r["draft_loops"]] = max(agreement.get(r["draft_loops"], 0.0), r["acceptance_rate"])
        results["huginn-3.5b"] = huginn_shape(a.work, agreement)
        print(json.dumps(results["huginn-3.5b"], indent=1))
    name = "results.json" if a.models and not a.costs_only else "results-extra.json"
    (a.work / name).write_text(json.dumps(results, indent=1))
    print(f"wrote {a.work / name}")


if __name__ == "__main__":
    main()
