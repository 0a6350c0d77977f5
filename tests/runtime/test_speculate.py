"""Self-speculative decoding (runtime/speculate.py): greedy tokens identical to plain full-depth decoding for
each model family, KV policy and export form; the cache after a rejected draft equal to plain decoding's; the
speculative sampling rule exact on a tiny vocabulary; bad settings refused in one line."""
import json

import numpy as np
import pytest
import torch

from edgeloop.export import ExportConfig, export_checkpoint
from edgeloop.model.checkpoint import save_checkpoint
from edgeloop.model.data import train_tokenizer
from edgeloop.quantize import RTNConfig, quantize_checkpoint
from edgeloop.runtime import Runtime, RuntimeInputError
from edgeloop.runtime.sampling import acceptance, dense, distribution, residual
from edgeloop.runtime.speculate import Decoder
from tests.conftest import ROOT, perturbed, run_cli

PROMPT = [5, 17, 42, 7, 99, 3, 11]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """name -> export folder: test-huginn (shared and per-step KV, and fused in place per-step), test-ouro (its gate),
    test-none (a plain looped model: the Loop, and unrolled with the loop-count dial)."""
    tok = train_tokenizer("In the beginning God created the heaven and the earth.\n" * 50, 300)
    root = tmp_path_factory.mktemp("spec")
    out = {}
    for name in ("test-huginn", "test-ouro", "test-none"):
        m = perturbed(name)
        if m.exit_gate is not None:  # a gate that does exit early at some tokens
            with torch.no_grad():
                m.exit_gate.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
        save_checkpoint(m, root / name, tokenizer=tok)
    export_checkpoint(root / "test-huginn", root / "huginn-shared", ExportConfig(max_loops=6), progress=False)
    export_checkpoint(root / "test-huginn", root / "huginn-per-step", ExportConfig(kv_policy="per-step", max_loops=6),
                      progress=False)
    quantize_checkpoint(root / "test-huginn", root / "huginn-q", RTNConfig(group_size=32), progress=False)
    export_checkpoint(root / "huginn-q", root / "huginn-fused", ExportConfig(fused=True, max_loops=6,
                                                                             kv_policy="per-step"), progress=False)
    export_checkpoint(root / "test-ouro", root / "ouro", ExportConfig(), progress=False)
    export_checkpoint(root / "test-none", root / "none", ExportConfig(), progress=False)
    export_checkpoint(root / "test-none", root / "none-unrolled", ExportConfig(unroll=True, max_loops=4),
                      progress=False)
    return {p.name: p for p in root.iterdir()}


CASES = [("huginn-per-step", 6, [(1, 3), (3, 5)]), ("huginn-fused", 6, [(1, 4), (2, 2)]),
         ("ouro", 4, [(1, 3), (2, 6)]), ("none", 3, [(1, 2), (2, 5)]), ("none-unrolled", 3, [(1, 4)])]


@pytest.mark.parametrize("name,R,settings", CASES)
def test_greedy_tokens_equal_plain_full_depth_decoding(exports, name, R, settings):
    rt = Runtime(exports[name], threads=1)
    plain = rt.generate_ids([PROMPT], 40, stop=(), num_loops=R)
    for d, k in settings:
        g = rt.generate_ids([PROMPT], 40, stop=(), num_loops=R, draft_loops=d, lookahead=k)
        assert g.tokens == plain.tokens, (name, d, k)
        s = g.speculation
        assert s["draft_loops"] == d and s["lookahead"] == k and s["rounds"] > 0
        assert s["drafted"] >= s["accepted"] and s["tokens"] == 39  # the first token comes from the prefill
        assert s["accepted"] < s["drafted"] or d > 1  # random weights at one loop disagree somewhere
        assert 0 < s["loops_per_token"] < R + k * d
    if rt.gated:
        assert g.loops[0] == plain.loops[0]  # the exit steps of the verified tokens are plain decoding's


def test_greedy_identity_on_the_demo_with_a_batch_and_stop_tokens(demo_fp32):
    rt = Runtime(demo_fp32, threads=1)
    prompts = [rt.encode("And God said").tolist(), rt.encode("In the beginning").tolist()]
    plain = rt.generate_ids(prompts, 30, stop=())
    spec = rt.generate_ids(prompts, 30, stop=(), draft_loops=2, lookahead=4)
    # a batch is decoded row by row: plain batched decoding of left-padded rows agrees with each row alone here
    assert spec.tokens == plain.tokens and spec.finish == ["length", "length"]
    stop = plain.tokens[0][7]
    a = rt.generate_ids(prompts[:1], 30, stop=[stop])
    b = rt.generate_ids(prompts[:1], 30, stop=[stop], draft_loops=1, lookahead=6)
    assert b.tokens == a.tokens and b.finish == ["stop"] and b.tokens[0][-1] == stop


def test_auto_chooses_a_depth_and_lookahead_and_stays_exact(demo_fp32):
    rt = Runtime(demo_fp32, threads=1)
    ids = rt.encode("And it came to pass, when men began to multiply on the face of the earth").tolist()
    plain = rt.generate_ids([ids], 24, stop=())
    g = rt.generate_ids([ids], 24, stop=(), draft_loops="auto", lookahead=3)
    assert g.tokens == plain.tokens
    auto = g.speculation["auto"]
    assert 0 <= auto["draft_loops"] < rt.r and auto["calibration_tokens"] == len(ids)
    assert {r["draft_loops"] for r in auto["table"]} == {1, 2, 3}
    best = max(auto["table"], key=lambda r: r["speedup"])
    assert auto["projected_speedup"] == best["speedup"]
    assert (auto["draft_loops"], auto["lookahead"]) == ((best["draft_loops"], best["lookahead"])
                                                         if best["speedup"] > 1 else (0, 0))


def _plain_cache(rt, prompt, ids, R):
    """The cache plain decoding holds: the prompt in one call, then `ids` one token at a time, at R loops."""
    n = len(prompt)
    _, past = rt.forward(np.array([prompt]), np.ones((1, n), np.int64), np.arange(n)[None], rt.empty_past(1), R)
    for t, x in enumerate(ids, n):
        _, past = rt.forward(np.array([[x]]), np.ones((1, t + 1), np.int64), np.array([[t]]), past, R)
    return past


@pytest.mark.parametrize("name,R", [("huginn-per-step", 6), ("huginn-per-step", 3), ("huginn-fused", 6), ("ouro", 4)])
def test_the_cache_after_a_rejected_draft_is_plain_decodings(exports, name, R):
    rt = Runtime(exports[name], threads=1)
    past = rt.buffer_past(1, 64) if rt.in_place else rt.empty_past(1)
    dec = Decoder(rt, R, 1, 4, None, dict(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0),
                  np.random.default_rng(0), set(), past, rt.in_place)
    dec.prefill(PROMPT)
    rejected = 0
    for _ in range(12):
        before = dec.stats.accepted
        drafted = dec.stats.drafted
        dec.round(8)
        rejected += (dec.stats.accepted - before) < (dec.stats.drafted - drafted)
    assert rejected, "no draft was rejected: the test would not check the roll-back"
    n = dec.length
    want = _plain_cache(rt, PROMPT, dec.seen[len(PROMPT):n], R)
    for key, ref in want.items():
        got = dec.past[key]
        got = got.numpy() if hasattr(got, "numpy") else np.asarray(got)
        got = got[:, :, :n] if rt.in_place else got  # a buffer: the mask sets the length
        if ref.shape[2] == 0 and not rt.in_place:  # a slot of a loop that never runs stays empty
            assert got.shape[2] == 0, key
            continue
        assert got.shape == ref.shape, key
        np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4, err_msg=key)


def test_speculative_sampling_rule_gives_the_target_distribution_exactly():
    """P(token) = q(token) min(1, p/q) + P(reject) residual(token) = p(token), for every pair of distributions,
    including zeros on either side, equal ones and the processed (top-k / top-p) ones the runtime uses."""
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(50):
        p, q = rng.dirichlet(np.ones(7) * 0.5), rng.dirichlet(np.ones(7) * 0.5)
        p[rng.integers(7)] = 0
        q[rng.integers(7)] = 0
        pairs.append((p / p.sum(), q / q.sum()))
    pairs.append((pairs[0][0], pairs[0][0].copy()))
    logits_p, logits_q = rng.normal(size=9), rng.normal(size=9)
    for kw in (dict(temperature=0.7, top_k=4), dict(temperature=1.3, top_p=0.6), dict(temperature=1.0)):
        pairs.append(tuple(dense(*distribution(lg, [2, 3], repetition_penalty=1.2, **kw), 9)
                           for lg in (logits_p, logits_q)))
    for p, q in pairs:
        keep = np.array([q[x] * acceptance(p, q, x) for x in range(len(p))])
        out = keep + (1 - keep.sum()) * residual(p, q)
        np.testing.assert_allclose(out, p, atol=1e-12)
        assert all(0 <= acceptance(p, q, x) <= 1 for x in range(len(p)) if q[x] > 0)


def test_sampled_speculation_draws_from_the_verifier_distribution(demo_fp32):
    """One round from a fixed cache and pending token, 600 seeds: the kept token's frequencies equal the
    full-depth distribution p (chi-square; top-k 5 keeps 4 degrees of freedom), while the draft (one loop) is
    rejected often enough that the residual draw is exercised."""
    rt = Runtime(demo_fp32, threads=1)
    ids = rt.encode("And God said unto").tolist()
    kw = dict(temperature=1.5, top_k=5, top_p=1.0, repetition_penalty=1.0)
    dec = Decoder(rt, rt.r, 1, 1, None, kw, np.random.default_rng(0), set(), rt.empty_past(1), False)
    dec.prefill(ids)
    t = dec.pending
    logits, _ = rt.forward(np.array([ids + [t]]), np.ones((1, len(ids) + 1), np.int64),
                           np.arange(len(ids) + 1)[None], rt.empty_past(1), rt.r)
    order, p = distribution(logits[0, -1], ids + [t], **kw)
    state = (dec.past, dec.length, list(dec.seen))
    counts = dict.fromkeys(order.tolist(), 0)
    for seed in range(600):
        dec.past, dec.length, dec.seen, dec.pending = state[0], state[1], list(state[2]), t
        dec.rng = np.random.default_rng(seed)
        counts[dec.round(1)[0]] += 1
    assert sum(counts.values()) == 600  # every kept token is in the verifier's top-k
    assert 30 < dec.stats.drafted - dec.stats.accepted  # rejections happened: the residual draw ran
    chi2 = sum((counts[x] - 600 * px) ** 2 / (600 * px) for x, px in zip(order.tolist(), p))
    assert chi2 < 25, (counts, p)  # 4 degrees of freedom: p < 1e-4 for a correct sampler


def test_a_shared_cache_or_early_exits_need_approximate(exports):
    """Where one verification call cannot compute what one-token calls do, speculation says so, in one line,
    and runs when told to (its tokens are then those of a decode fed in chunks)."""
    rt = Runtime(exports["huginn-shared"], threads=1)
    with pytest.raises(RuntimeInputError, match="shared across loops.*--kv-policy per-step"):
        rt.generate_ids([PROMPT], 8, draft_loops=2)
    g = rt.generate_ids([PROMPT], 24, stop=(), draft_loops=2, lookahead=4, approximate=True)
    assert len(g.tokens[0]) == 24 and g.speculation["tokens"] == 23
    ouro = Runtime(exports["ouro"], threads=1)
    with pytest.raises(RuntimeInputError, match="exit threshold 0.5: early exits"):
        ouro.generate_ids([PROMPT], 8, draft_loops=1, exit_threshold=0.5)
    assert len(ouro.generate_ids([PROMPT], 8, stop=(), draft_loops=1, exit_threshold=0.5,
                                 approximate=True).tokens[0]) == 8


def test_bad_settings_are_one_line(exports, tiny, monkeypatch, capsys):
    rt = Runtime(exports["none"], threads=1)
    for kw, what in ((dict(draft_loops=3), "draft_loops 3: an integer in 1..2"),
                     (dict(draft_loops=0), "draft_loops 0"), (dict(draft_loops=1, lookahead=0), "lookahead 0"),
                     (dict(draft_loops=1, lookahead=10_000), "lookahead 10000: at most 64"),
                     (dict(draft_loops=1, num_loops=1), "leaves no draft depth"),
                     (dict(draft_loops=1, draft_min_prob=1.5), "draft_min_prob 1.5")):
        with pytest.raises(RuntimeInputError, match=what):
            rt.generate_ids([PROMPT], 4, **kw)
    with pytest.raises(RuntimeInputError, match="no num_loops input"):
        Runtime(tiny["unrolled"], threads=1).generate_ids([PROMPT], 4, draft_loops=1)
    code, out, err = run_cli(monkeypatch, capsys, "generate", exports["none"], "--prompt", "In the", "--draft-loops",
                             "5")
    assert code == 2 and "draft_loops 5" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(monkeypatch, capsys, "generate", exports["none"], "--prompt", "In the", "--draft-loops",
                             "two")
    assert code == 2 and "--draft-loops 'two'" in err
    code, out, err = run_cli(monkeypatch, capsys, "generate", tiny["ck"], "--prompt", "In the", "--draft-loops", "1")
    assert code == 2 and "export folder" in err


def test_cli_generate_and_bench_report_speculation(exports, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "generate", exports["huginn-per-step"], "--prompt", "In the",
                             "--max-new-tokens", "12", "--draft-loops", "2", "--lookahead", "3")
    assert code == 0 and "self-speculation d = 2, k = 3, R = 4" in " ".join(err.split())
    code, out, err = run_cli(monkeypatch, capsys, "bench", exports["huginn-per-step"], "--threads", "1",
                             "--prefill-tokens", "8", "--decode-tokens", "16", "--draft-loops", "1", "--lookahead",
                             "3", "--json")
    assert code == 0, err
    r = json.loads(out)
    for key in ("decode_tokens_per_s", "plain_decode_tokens_per_s", "acceptance_rate", "accepted_per_verify",
                "loops_per_token", "speculative_speedup"):
        assert isinstance(r[key], float) and r[key] >= 0, key
    assert r["identical_tokens"] and r["draft_loops"] == 1 and r["lookahead"] == 3


HUGINN_TINY = ROOT / "models" / "huginn-tiny"


@pytest.mark.skipif(not (HUGINN_TINY / "model.safetensors").is_file(), reason="models/huginn-tiny is not built")
def test_trained_huginn_tiny_drafts_agree_at_few_steps(tmp_path_factory):
    """The trained test bed: the Huginn folder exported as it is (per-step cache, the dial to 16 steps);
    speculation at its mean depth keeps most drafts of 2 steps, and its tokens are plain decoding's."""
    from edgeloop.importers import import_folder

    root = tmp_path_factory.mktemp("huginn-tiny")
    out = root / "x"
    import_folder(HUGINN_TINY, root / "ck")
    export_checkpoint(root / "ck", out, ExportConfig(kv_policy="per-step", max_loops=16, decode_steps=2,
                                                     parity_loops=(2,)), progress=False)
    rt = Runtime(out, threads=1)
    ids = rt.encode("And it came to pass, when the king heard").tolist()
    plain = rt.generate_ids([ids], 40, stop=())
    g = rt.generate_ids([ids], 40, stop=(), draft_loops=2, lookahead=4)
    assert g.tokens == plain.tokens and rt.r == 16
    assert g.speculation["acceptance_rate"] > 0.6 and g.speculation["loops_per_token"] < 8
