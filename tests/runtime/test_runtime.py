"""Runtime vs PyTorch on a tiny perturbed model: greedy tokens at every loop count, perplexity windows,
batched left padding, sampling knobs, context, placement, session options, no torch at import."""
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from edgeloop.model.checkpoint import load_model, load_tokenizer
from edgeloop.model.data import encode as data_encode
from edgeloop.model.evaluate import generate as torch_generate
from edgeloop.model.evaluate import perplexity as torch_perplexity
from edgeloop.model.evaluate import windows as torch_windows
from edgeloop.runtime import ContextLengthError, Runtime, RuntimeInputError, encode, windows

PROMPT = [5, 17, 42, 7, 99, 3]


@pytest.fixture(scope="module")
def rt(tiny):
    return Runtime(tiny["loop"], threads=1)


def test_windows_are_the_references_and_score_every_token_once():
    assert windows is torch_windows  # one definition (edgeloop.strided) for both
    for n in (2, 3, 10, 127, 128, 129, 1000, 4097):
        for ctx, stride in ((128, 64), (128, 127), (64, 1), (512, 256), (7, 3)):
            scored = [t for _, end, first in windows(n, ctx, stride) for t in range(first, end)]
            assert scored == list(range(1, n)), (n, ctx, stride)
            assert all(end - begin <= ctx for begin, end, _ in windows(n, ctx, stride))
    with pytest.raises(ValueError, match="stride < ctx"):
        windows(100, 64, 64)  # the first token of each window would have no context


def test_encode_equals_the_data_stage(tiny):
    tok = load_tokenizer(tiny["ck"])
    text = "In the beginning\nGod created\n\nthe heaven and the earth.\n"
    assert encode(tok, text).tolist() == data_encode(tok, text).tolist()


def test_greedy_tokens_equal_pytorch_at_every_loop_count(rt, tiny):
    model = load_model(tiny["ck"])
    for L in (1, 2, 3):
        ref = list(torch_generate(model, PROMPT, 24, num_loops=L))
        got = rt.generate_ids([PROMPT], 24, stop=(), num_loops=L)
        assert got.tokens[0] == ref, L
        assert got.finish == ["length"]


def test_perplexity_equals_pytorch(rt, tiny):
    model = load_model(tiny["ck"])
    ids = np.random.default_rng(0).integers(0, 320, 400)
    for L, ctx, stride, bs in ((3, None, None, 4), (2, 64, 40, 3), (1, 128, 100, 1)):
        want, n = torch_perplexity(model, ids, ctx, stride, num_loops=L)
        got, m = rt.perplexity(ids, ctx, stride, batch_size=bs, num_loops=L)
        assert m == n and abs(got / want - 1) < 1e-5, (L, got, want)


def test_batched_left_padding_equals_one_by_one(rt):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [40, 41, 42, 43]]
    for L in (3, 1):
        batch = rt.generate_ids(prompts, 16, stop=(), num_loops=L).tokens
        assert batch == [rt.generate_ids([p], 16, stop=(), num_loops=L).tokens[0] for p in prompts]


def test_stop_tokens_streaming_and_sampling(rt):
    first = rt.generate_ids([PROMPT], 10, stop=()).tokens[0]
    sampled = rt.generate_ids([PROMPT], 10, temperature=1.5, seed=1, stop=()).tokens[0]
    k = next(i for i, t in enumerate(sampled) if i > 0 and t not in sampled[:i])  # a token's first appearance
    seen = []
    g = rt.generate_ids([PROMPT], 10, temperature=1.5, seed=1, stop=(sampled[k],),
                        on_token=lambda row, t: seen.append((row, t)))
    assert g.tokens[0] == sampled[:k + 1] and g.finish == ["stop"] and seen == [(0, t) for t in sampled[:k + 1]]
    a = rt.generate_ids([PROMPT], 12, temperature=1.0, top_k=20, top_p=0.9, seed=3, stop=()).tokens
    b = rt.generate_ids([PROMPT], 12, temperature=1.0, top_k=20, top_p=0.9, seed=3, stop=()).tokens
    assert a == b and len(a[0]) == 12
    assert rt.generate_ids([PROMPT], 12, temperature=1.0, top_k=1, seed=5, stop=()).tokens[0] == \
        rt.generate_ids([PROMPT], 12, stop=()).tokens[0]  # top-1 sampling is greedy
    rep = rt.generate_ids([PROMPT], 12, repetition_penalty=50.0, stop=()).tokens[0]
    assert len(set(rep)) > len(set(first[:12]))  # the tiny model repeats itself; a penalty breaks that
    with pytest.raises(RuntimeInputError, match="top_p"):
        rt.generate_ids([PROMPT], 2, top_p=0.0)


def test_context_enforced(rt):
    assert rt.ctx == 128
    with pytest.raises(ContextLengthError, match="129 tokens; the model's context is 128"):
        rt.generate_ids([[1] * 129], 4)
    g = rt.generate_ids([[1] * 120], 50, stop=())
    assert len(g.tokens[0]) == 9 and g.finish == ["context"]  # positions 120..127, then one last token


def test_num_loops_knob_and_unrolled(rt, tiny):
    with pytest.raises(RuntimeInputError, match="1..3"):
        rt.generate_ids([PROMPT], 2, num_loops=4)
    un = Runtime(tiny["unrolled"], threads=1)
    assert not un.has_num_loops
    assert un.generate_ids([PROMPT], 12, stop=()).tokens == rt.generate_ids([PROMPT], 12, stop=()).tokens
    with pytest.raises(RuntimeInputError, match="unrolled"):
        un.generate_ids([PROMPT], 2, num_loops=2)
    assert rt.kv_bytes_per_token(1) < rt.kv_bytes_per_token()


def test_placement_from_profiling(rt, tiny):
    p = rt.placement()
    assert list(p) == ["CPUExecutionProvider"]
    assert p["CPUExecutionProvider"]["ops"]["Loop"] == 1 and p["CPUExecutionProvider"]["nodes"] > 50
    prof = Runtime(tiny["loop"], threads=1, profile=True)
    prof.generate_ids([PROMPT], 3)
    assert prof.placement()["CPUExecutionProvider"]["ops"]["Loop"] == 1
    prof.close()


def test_session_options_and_external_data(rt, tiny, tmp_path):
    """mmap on/off and prepacking on/off give the same logits, also with the weights in model.onnx.data."""
    ext = tmp_path / "ext"
    shutil.copytree(tiny["loop"], ext)
    m = onnx.load(str(ext / "model.onnx"))
    onnx.save(m, str(ext / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=1024)
    assert (ext / "model.onnx.data").stat().st_size > 500_000
    want = rt.generate_ids([PROMPT], 8, stop=()).tokens
    x = np.array([PROMPT], np.int64)
    ref, _ = rt.forward(x, np.ones_like(x), np.arange(6)[None], rt.empty_past(1), 3)
    for mmap in (True, False):
        for prepack in (True, False):
            r = Runtime(ext, threads=1, mmap=mmap, prepack=prepack)
            assert r.session.get_session_options().get_session_config_entry("session.disable_prepacking") == \
                ("0" if prepack else "1")
            got, _ = r.forward(x, np.ones_like(x), np.arange(6)[None], r.empty_past(1), 3)
            np.testing.assert_allclose(got, ref, atol=1e-5)
            assert r.generate_ids([PROMPT], 8, stop=()).tokens == want


def test_import_and_generate_without_torch(tiny):
    code = ("import sys, json; sys.modules['torch'] = None\n"
            "from edgeloop.runtime import Runtime\n"
            f"rt = Runtime({str(tiny['loop'])!r}, threads=1)\n"
            f"g = rt.generate_ids([{PROMPT}], 8, stop=())\n"
            "t = rt.generate('In the beginning', 4)\n"
            "print(json.dumps({'tokens': g.tokens[0], 'text': t.text[0], 'torch': 'torch' in sys.modules and "
            "sys.modules['torch'] is not None}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["torch"] is False and len(res["tokens"]) == 8
    assert res["tokens"] == Runtime(tiny["loop"], threads=1).generate_ids([PROMPT], 8, stop=()).tokens[0]
