"""The WebGPU execution provider (onnxruntime-ep-webgpu plugin) on the INT4 Loop export of the demo model.

On a machine without a GPU this runs on Mesa's lavapipe, a software Vulkan driver (scripts/system-deps.sh
installs it): the GPU code path is checked for correctness, not speed. Placement is asserted from
onnxruntime's profiling, never inferred from numbers (a silent CPU fallback would give the same numbers).
In CI a missing adapter fails the test; elsewhere it skips with the reason.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from edgeloop.runtime import Runtime
from edgeloop.runtime.plugins import SOFTWARE_ENV
from edgeloop.runtime.session import ProviderUnavailableError, provider_names

LOGIT_ATOL = 1e-3  # logits are O(10); measured difference on lavapipe: ~2e-5
PPL_RTOL = 0.005  # the bound; measured: ~1e-8


@pytest.fixture(scope="module")
def webgpu(demo_int4):
    """(WebGPU runtime, CPU runtime) on the INT4 demo export; software adapter allowed."""
    os.environ[SOFTWARE_ENV] = "1"
    try:  # the session, not just the device list: with software allowed the plugin always lists a device
        gpu = Runtime(demo_int4, ep="webgpu", threads=1)
    except ProviderUnavailableError as e:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"WebGPU provider cannot be set up in CI: {e}")
        pytest.skip(str(e))
    return gpu, Runtime(demo_int4, threads=1)


def test_matmulnbits_run_on_webgpu(webgpu):
    gpu, _ = webgpu
    placement = gpu.placement()
    on_gpu = placement.get("WebGpuExecutionProvider", {}).get("ops", {})
    on_cpu = placement.get("CPUExecutionProvider", {}).get("ops", {})
    assert on_gpu.get("MatMulNBits", 0) > 0, placement
    assert "MatMulNBits" not in on_cpu, placement  # every INT4 matmul, the Loop body's included
    assert on_gpu.get("LpNormalization", 0) > 0  # the Sinkhorn iterations inside the Loop body too


def test_logits_and_perplexity_match_cpu(webgpu, demo_dir):
    from edgeloop.model.checkpoint import load_tokenizer
    from edgeloop.model.data import corpus_split, encode

    gpu, cpu = webgpu
    x = np.array([list(range(5, 37))], np.int64)
    feeds = (x, np.ones_like(x), np.arange(x.shape[1])[None], gpu.empty_past(1))
    a, b = gpu.forward(*feeds, gpu.num_loops)[0], cpu.forward(*feeds, cpu.num_loops)[0]
    assert np.abs(a - b).max() <= LOGIT_ATOL
    ids = encode(load_tokenizer(demo_dir), corpus_split("validation"))[:256]
    p_gpu, p_cpu = gpu.perplexity(ids)[0], cpu.perplexity(ids)[0]
    assert abs(p_gpu / p_cpu - 1) <= PPL_RTOL, (p_gpu, p_cpu)
    assert gpu.generate_ids([[5, 6, 7]], 8, stop=()).tokens == cpu.generate_ids([[5, 6, 7]], 8, stop=()).tokens


def test_no_adapter_is_a_clear_error(demo_int4):
    """Without the software adapter and without a GPU, --ep webgpu fails in one line (no CPU run)."""
    env = {k: v for k, v in os.environ.items() if k != SOFTWARE_ENV}
    r = subprocess.run([sys.executable, "-m", "edgeloop.cli", "bench", str(demo_int4), "--ep", "webgpu", "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    if r.returncode == 0:
        pytest.skip("this machine has a hardware WebGPU adapter")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if "no WebGPU adapter" in ln]
    assert lines and SOFTWARE_ENV in lines[0], r.stderr


def test_no_vulkan_driver_is_a_clear_error(demo_int4):
    """Software adapters allowed but no Vulkan driver (CI without lavapipe): the same one-line error."""
    env = {**os.environ, SOFTWARE_ENV: "1", "VK_ICD_FILENAMES": os.devnull, "VK_DRIVER_FILES": os.devnull}
    r = subprocess.run([sys.executable, "-m", "edgeloop.cli", "generate", str(demo_int4), "--prompt", "And",
                        "--ep", "webgpu", "--max-new-tokens", "2"], capture_output=True, text=True, env=env,
                       timeout=300)
    if r.returncode == 0:
        pytest.skip("this machine has a WebGPU adapter outside Vulkan (Metal or D3D12)")
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if "no WebGPU adapter" in ln]
    assert lines and "lavapipe" in lines[0] and "EP_FAIL" not in lines[0], r.stderr


def test_missing_plugin_package_is_a_clear_error(monkeypatch):
    from edgeloop.runtime import plugins

    monkeypatch.setitem(plugins.PLUGINS, "webgpu", ("edgeloop_no_such_module", "WebGpuExecutionProvider",
                                                    "onnxruntime-ep-webgpu"))
    monkeypatch.setattr(plugins, "_registered", set())
    import onnxruntime as ort  # once registered, a plugin provider is listed as available: hide it

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ProviderUnavailableError, match="pip install onnxruntime-ep-webgpu"):
        provider_names("webgpu")


def test_eval_reports_drift_and_placement_on_webgpu(webgpu, demo_int4, demo_dir, monkeypatch, capsys):
    import json

    from tests.conftest import run_cli

    by_ep = {}
    for ep in ("webgpu", "cpu"):
        code, out, _ = run_cli(monkeypatch, capsys, "eval", demo_int4, "--ep", ep, "--reference", demo_dir,
                               "--tokens", "128", "--threads", "1", "--json")
        assert code == 0
        by_ep[ep] = json.loads(out)
    r = by_ep["webgpu"]
    assert r["ep"] == "webgpu" and abs(r["drift_pct"]) < 5.0  # INT4 RTN on 128 tokens
    assert abs(r["ppl"] - by_ep["cpu"]["ppl"]) <= 2e-3 * by_ep["cpu"]["ppl"]  # the same numbers as the CPU provider
    assert r["placement"]["WebGpuExecutionProvider"]["ops"]["MatMulNBits"] > 0


@pytest.mark.parametrize("unroll", [False, True], ids=["Loop", "unrolled"])
def test_the_fused_graph_runs_on_webgpu(webgpu, tmp_path, unroll):
    """export --fused: GroupQueryAttention and the RMSNorm kernels run on the WebGPU provider too, at the
    trained loop count, fewer and more; as one Loop and unrolled (loops past the first behind If nodes)."""
    from edgeloop.export import ExportConfig, export_checkpoint

    _, cpu = webgpu
    export_checkpoint(cpu.folder.parent / "ck", tmp_path / "fused", ExportConfig(fused=True, unroll=unroll,
                                                                                   decode_steps=2))
    gpu_f, cpu_f = Runtime(tmp_path / "fused", ep="webgpu", threads=1), Runtime(tmp_path / "fused", threads=1)
    on_gpu = gpu_f.placement().get("WebGpuExecutionProvider", {}).get("ops", {})
    assert on_gpu.get("GroupQueryAttention", 0) > 0 and on_gpu.get("SimplifiedLayerNormalization", 0) > 0, on_gpu
    x = np.array([list(range(5, 21))], np.int64)
    feeds = (x, np.ones_like(x), np.arange(x.shape[1])[None], gpu_f.empty_past(1))
    assert gpu_f.max_loops > gpu_f.num_loops  # the demo's dial: fewer loops than the per-step slots route presents
    for loops in (gpu_f.num_loops, max(1, gpu_f.num_loops // 2), gpu_f.max_loops):
        assert np.abs(gpu_f.forward(*feeds, loops)[0] - cpu_f.forward(*feeds, loops)[0]).max() <= LOGIT_ATOL
    assert gpu_f.generate_ids([[5, 6, 7]], 6, stop=()).tokens == cpu_f.generate_ids([[5, 6, 7]], 6, stop=()).tokens


@pytest.mark.parametrize("name", ["test-standard", "test-ouro"])
def test_rotary_inside_group_query_attention_on_webgpu(webgpu, tmp_path, name):
    """GroupQueryAttention's own rotary (no QK-norm, exact tables: the fused graph drops RotaryEmbedding) on
    WebGPU: a left-padded batch's logits and the generated tokens equal the CPU provider's (Loop; ouro: the
    exit-gated stack)."""
    from edgeloop.export import ExportConfig, export_checkpoint
    from edgeloop.model.checkpoint import save_checkpoint
    from edgeloop.model.data import train_tokenizer
    from edgeloop.quantize import RTNConfig, quantize_checkpoint
    from tests.conftest import perturbed

    tok = train_tokenizer("In the beginning God created the heaven and the earth.\n" * 50, 300)
    save_checkpoint(perturbed(name), tmp_path / "ck", tokenizer=tok)
    quantize_checkpoint(tmp_path / "ck", tmp_path / "q", RTNConfig(group_size=32), progress=False)
    export_checkpoint(tmp_path / "q", tmp_path / "fused", ExportConfig(fused=True, decode_steps=2))
    gpu, cpu = Runtime(tmp_path / "fused", ep="webgpu", threads=1), Runtime(tmp_path / "fused", threads=1)
    assert gpu.placement().get("WebGpuExecutionProvider", {}).get("ops", {}).get("GroupQueryAttention", 0) > 0
    x = np.array([list(range(5, 21)), [0] * 6 + list(range(5, 15))], np.int64)
    mask = (np.arange(16)[None] >= np.array([[0], [6]])).astype(np.int64)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    got = gpu.forward(x, mask, pos, gpu.empty_past(2), gpu.num_loops)[0]
    want = cpu.forward(x, mask, pos, cpu.empty_past(2), cpu.num_loops)[0]
    assert np.abs(got[0] - want[0]).max() <= LOGIT_ATOL and np.abs(got[1, 6:] - want[1, 6:]).max() <= LOGIT_ATOL
    prompts = [[5, 6, 7], [9, 8]]
    assert gpu.generate_ids(prompts, 6, stop=()).tokens == cpu.generate_ids(prompts, 6, stop=()).tokens
