"""The Runtime under repetition and concurrency: 20 full-context generations in one process do not grow its
memory, and two Runtimes generating in two threads at once give the tokens they give one at a time."""
from __future__ import annotations

import gc
import threading

import psutil

from edgeloop.runtime import Runtime

PROMPTS = ("In the beginning", "And the earth was without form")
RUNS = 20
# RSS may grow at most this much from after the 2nd run (onnxruntime's arena and numpy's buffers have reached
# their peak by then) to after the 20th. A full-context run of the tiny model keeps ~0.25 MiB of KV live at its
# end; had every step's past stayed alive, each run would leave sum(t for t <= ctx) * KV bytes per token
# (~16 MiB here) behind, ~290 MiB over 18 runs: the test checks that such a leak is well over the bound.
# (Measured on the tiny model: +0 MiB; with every step's past appended to a list, +330 MiB.)
BOUND = 32 * 2 ** 20


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def _full_context(rt: Runtime, prompt: str) -> list[int]:
    out = rt.generate(prompt, max_new_tokens=rt.ctx, stop=())
    # every position filled; the last new token (predicted at position ctx - 1) is never fed
    assert out.finish == ["context"] and out.prompt_tokens[0] + len(out.tokens[0]) == rt.ctx + 1
    return out.tokens[0]


def test_twenty_full_context_generations_do_not_grow_memory(tiny):
    rt = Runtime(tiny["loop"], threads=1)
    leak_per_run = sum(range(1, rt.ctx + 1)) * rt.kv_bytes_per_token()
    assert leak_per_run * (RUNS - 2) > 4 * BOUND  # the bound would catch every step's past kept alive
    first = _full_context(rt, PROMPTS[0])
    for i in range(2, RUNS + 1):
        assert _full_context(rt, PROMPTS[0]) == first  # greedy: the same tokens every time
        if i == 2:
            after_2nd = _rss()
    grown = _rss() - after_2nd
    assert grown < BOUND, f"RSS grew {grown / 2 ** 20:.1f} MiB over {RUNS - 2} full-context runs"


def test_two_runtimes_in_two_threads_generate_what_they_do_alone(tiny):
    rts = [Runtime(tiny["loop"], threads=1) for _ in PROMPTS]
    alone = [_full_context(rt, p) for rt, p in zip(rts, PROMPTS)]
    assert alone[0] != alone[1]
    together: list = [None] * len(rts)
    start = threading.Barrier(len(rts))

    def work(i: int) -> None:
        start.wait()
        together[i] = _full_context(rts[i], PROMPTS[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(rts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone
