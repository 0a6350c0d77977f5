"""edgeloop against llama.cpp on the same weights, side by side in one run (run by hand, not in CI).

One random-weight model (139.5M parameters at the default shape: d 1024, 16 heads / 4 KV heads, SwiGLU 2816,
vocab 4096, tied, rotate_half rotary) in two shapes: standard (12 layers) and looped (2 + 2 x 4 + 2: the
middle two layers run 4 times; llama.cpp gets it unrolled, 12 layers with the shared weights copied). The
same weights are written as an edgeloop checkpoint and as a llama GGUF (the gguf package; q/k rows permuted
for llama.cpp's rotary on interleaved pairs), checked equal in fp32 (logits through llama-cpp-python,
<= 1e-4), quantized by llama.cpp's own quantizer to Q4_0 and Q4_K_M and by edgeloop to INT4 (RTN, G=32 and
G=128, MatMulNBits at accuracy level 4; the standard shape unrolled, the looped one as one Loop (and, fused
G=128, unrolled with the weights still once); the plain
and the --fused graph; with --genai-python also the builder's choices: G=32 symmetric, the tied table INT4). Then, in interleaved rounds, each engine in a fresh process: a 128-token prompt and
128 greedy new tokens at 1 and 2 threads: decode tokens/s (median step), prefill ms, file bytes, peak RSS.
Prints medians and ratios. llama-cpp-python and gguf are installed from PyPI when missing (llama-cpp-python
builds llama.cpp from source: minutes). With --genai-python (a Python environment of its own holding
onnxruntime-genai and the transformers its builder needs, newer than optimum-onnx allows beside edgeloop), the
standard shape is also written as a Hugging Face llama folder, built by onnxruntime-genai's model builder (fp32
checked against PyTorch, then INT4 block 32, accuracy level 4) and run by onnxruntime-genai's own generator.

    python benchmarks/bench_llamacpp.py --work /tmp/llamacpp-bench [--rounds 5] [--small] [--genai-python PY]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(vocab_size=4096, d_model=1024, n_heads=16, n_kv_heads=4, mlp_hidden=2816, max_seq_len=512)
SHAPES = {"standard": dict(n_begin=0, n_middle=12, n_end=0, num_loops=1),
          "looped": dict(n_begin=2, n_middle=2, n_end=2, num_loops=4)}
PROMPT, NEW = 128, 128


# llama.cpp built for this CPU (-march=native) turns on its AMX kernels where /proc/cpuinfo lists AMX; a VM that
# does not grant the AMX permission then dies with SIGILL in the quantized matmuls. So each x86 extension is
# turned on only where /proc/cpuinfo lists it (an AMD EPYC VM has AVX512-VNNI but not AVX-VNNI: a fixed list
# that turns GGML_AVX_VNNI on dies there in Q4_0), and AMX stays off.
GGML_FLAGS = {"avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "avx512f": "AVX512",
              "avx512vbmi": "AVX512_VBMI", "avx512_vnni": "AVX512_VNNI", "avx512_bf16": "AVX512_BF16",
              "avx_vnni": "AVX_VNNI"}


def cmake_args() -> str:
    """CMAKE_ARGS for llama.cpp: the x86 extensions this CPU lists, AMX off."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split())
    except (OSError, IndexError):
        flags = set()
    on = " ".join(f"-DGGML_{g}={'ON' if f in flags else 'OFF'}" for f, g in GGML_FLAGS.items())
    return f"-DGGML_NATIVE=OFF {on} -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"


def ensure_packages() -> None:
    import os

    missing = [p for p, m in (("llama-cpp-python==0.3.36", "llama_cpp"), ("gguf", "gguf"))
               if importlib.util.find_spec(m) is None]
    if missing:
        print(f"installing {', '.join(missing)} from PyPI (llama-cpp-python compiles llama.cpp: minutes)", flush=True)
        env = {**os.environ, "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", cmake_args())}
        # --no-cache-dir: a wheel pip cached on another machine would keep that CPU's flags
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-cache-dir", *missing], check=True, env=env)


def config(shape: str, small: bool):
    from edgeloop.model.config import HyperloopConfig

    dims = dict(SHAPE, d_model=256, n_heads=4, n_kv_heads=1, mlp_hidden=768) if small else SHAPE
    return HyperloopConfig(**dims, **SHAPES[shape], hc="none", n_streams=1, injection="passthrough", block="prenorm",
                           mlp="swiglu", rotary="neox", qk_norm=False, loop_embedding=False, tie_embeddings=True,
                           norm_eps=1e-5, rope_theta=10000.0)


def write_model(cfg, folder: Path, seed: int = 0):
    """A random-weight edgeloop checkpoint (the norms and every matrix far from an identity)."""
    import torch

    from edgeloop.model.checkpoint import save_checkpoint
    from edgeloop.model.model import Hyperloop

    torch.manual_seed(seed)
    model = Hyperloop(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) * p.shape[-1] ** -0.5
                    if p.ndim == 2 and "embed" not in name else torch.randn_like(p) * 0.02)
    save_checkpoint(model, folder, overwrite=True)
    return model.eval()


def write_gguf(model, path: Path) -> None:
    """The same weights as a llama GGUF (f32), the looped middle layers written once per loop (unrolled)."""
    import gguf
    import numpy as np

    cfg = model.cfg
    layers = list(model.begin) + [m for _ in range(cfg.num_loops) for m in model.middle] + list(model.end)
    hd = cfg.head_dim
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("edgeloop-random")
    w.add_block_count(len(layers))
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.mlp_hidden)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(0)  # all f32
    w.add_tokenizer_model("llama")  # a placeholder vocabulary: the benchmark feeds token ids
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"<t{i}>" for i in range(3, cfg.vocab_size)])
    w.add_token_scores([0.0] * cfg.vocab_size)
    w.add_token_types([2, 3, 3] + [1] * (cfg.vocab_size - 3))

    def t(x):
        return x.detach().float().numpy().astype(np.float32)

    def permute(x, heads):  # rotate_half rows -> llama.cpp's interleaved pairs (as convert_hf_to_gguf does)
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    w.add_tensor("token_embd.weight", t(model.embed.weight))
    for i, blk in enumerate(layers):
        a, m = blk.attn, blk.mlp
        w.add_tensor(f"blk.{i}.attn_norm.weight", t(blk.norm1.weight))
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(t(a.c_q.weight), cfg.n_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(t(a.c_k.weight), cfg.n_kv_heads))
        w.add_tensor(f"blk.{i}.attn_v.weight", t(a.c_v.weight))
        w.add_tensor(f"blk.{i}.attn_output.weight", t(a.c_proj.weight))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", t(blk.norm2.weight))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(m.c_gate.weight))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(m.c_fc.weight))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(m.c_proj.weight))
    w.add_tensor("output_norm.weight", t(model.final_norm.weight))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_hf_llama(model, folder: Path) -> None:
    """The standard shape's weights as a Hugging Face llama folder (rotate_half rotary, no permutation), the
    input of onnxruntime-genai's model builder."""
    from safetensors.torch import save_file

    cfg = model.cfg
    assert cfg.num_loops == 1 and not len(model.begin) and not len(model.end)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_hidden, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "num_hidden_layers": cfg.n_middle, "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": True, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2}, indent=1))
    t = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.final_norm.weight}
    for i, blk in enumerate(model.middle):
        a, m, p = blk.attn, blk.mlp, f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": blk.norm1.weight, p + "post_attention_layernorm.weight": blk.norm2.weight,
              p + "self_attn.q_proj.weight": a.c_q.weight, p + "self_attn.k_proj.weight": a.c_k.weight,
              p + "self_attn.v_proj.weight": a.c_v.weight, p + "self_attn.o_proj.weight": a.c_proj.weight,
              p + "mlp.gate_proj.weight": m.c_gate.weight, p + "mlp.up_proj.weight": m.c_fc.weight,
              p + "mlp.down_proj.weight": m.c_proj.weight}
    save_file({k: v.detach().float().contiguous() for k, v in t.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    from tokenizers import Tokenizer, models  # a placeholder vocabulary (the benchmark feeds token ids)

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<t{i}>": i for i in range(3, cfg.vocab_size)}
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


def build_genai(python: str, hf: Path, out: Path, precision: str = "int4") -> None:
    """onnxruntime-genai's model builder (INT4: block 32, accuracy level 4; CPU) in its own environment."""
    extra = ["--extra_options", "block_size=32", "accuracy_level=4"] if precision == "int4" else []
    r = subprocess.run([python, "-m", "onnxruntime_genai.models.builder", "-m", "edgeloop-random", "-i", str(hf),
                        "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out / "cache"), *extra],
                       capture_output=True, text=True, timeout=3600)
    if r.returncode:
        raise RuntimeError("the genai model builder failed: " + (r.stderr.strip().splitlines() or ["?"])[-1])


GENAI_LOGITS = r"""
import json, sys, numpy as np
import onnxruntime_genai as og
model = og.Model(sys.argv[1])
p = og.GeneratorParams(model); p.set_search_options(max_length=64, do_sample=False)
g = og.Generator(model, p); g.append_tokens(json.loads(sys.argv[2]))
print(json.dumps(np.asarray(g.get_logits()).reshape(-1).tolist()))
"""


def check_genai(python: str, model, folder: Path) -> float:
    """Max |last-token logit difference| between the builder's fp32 graph (through onnxruntime-genai) and PyTorch."""
    import numpy as np
    import torch

    ids = np.random.default_rng(0).integers(3, model.cfg.vocab_size, 24).tolist()
    r = subprocess.run([python, "-c", GENAI_LOGITS, str(folder), json.dumps(ids)], capture_output=True, text=True,
                       timeout=600, check=True)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0, -1].numpy()
    return float(np.abs(np.array(json.loads(r.stdout.strip().splitlines()[-1])) - ref).max())


def check_gguf(model, path: Path) -> float:
    """Max |logit difference| between llama.cpp (f32 GGUF) and the PyTorch model on one prompt."""
    import numpy as np
    import torch
    from llama_cpp import Llama

    ids = np.random.default_rng(0).integers(3, model.cfg.vocab_size, 24).tolist()
    llm = Llama(str(path), n_ctx=64, logits_all=True, n_threads=2, verbose=False, type_k=0, type_v=0)  # f32 KV
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].numpy()
    return float(np.abs(got - ref).max())


def quantize_gguf(src: Path, dst: Path, ftype: int) -> None:
    import ctypes

    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src}")


LLAMA_CHILD = r"""
import json, sys, time, numpy as np
from llama_cpp import Llama
path, threads, prompt_n, new_n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = Llama(path, n_ctx=prompt_n + new_n + 8, n_threads=threads, n_threads_batch=threads, verbose=False)
ids = np.random.default_rng(1).integers(3, llm.n_vocab(), prompt_n).tolist()
llm.eval(ids[:8]); llm.reset()  # warm-up
t = time.perf_counter(); llm.eval(ids); prefill = time.perf_counter() - t
steps = []
for _ in range(new_n):
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t = time.perf_counter(); llm.eval([tok]); steps.append(time.perf_counter() - t)
rss = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"decode_tokens_per_s": 1 / float(np.median(steps)), "prefill_ms": 1000 * prefill, "peak_rss_bytes": rss}))
"""

EDGELOOP_CHILD = r"""
import json, sys, time, numpy as np
from edgeloop.runtime import Runtime
folder, threads, prompt_n, new_n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rt = Runtime(folder, threads=threads)
ids = np.random.default_rng(1).integers(3, rt.vocab_size, prompt_n).tolist()
rt.generate_ids([ids[:8]], 4, stop=())  # warm-up
x = np.asarray([ids], np.int64)
t = time.perf_counter(); rt.forward(x, np.ones_like(x), np.arange(prompt_n)[None], rt.empty_past(1), rt.num_loops)
prefill = time.perf_counter() - t
stamps = []
rt.generate_ids([ids], new_n + 1, stop=(), on_token=lambda b, tok: stamps.append(time.perf_counter()))
rss = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"decode_tokens_per_s": 1 / float(np.median(np.diff(stamps))), "prefill_ms": 1000 * prefill,
                  "peak_rss_bytes": rss}))
"""


GENAI_CHILD = r"""
import json, sys, time, numpy as np
import onnxruntime_genai as og
folder, threads, prompt_n, new_n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cfg = og.Config(folder)
cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
model = og.Model(cfg)
vocab = json.load(open(folder + "/genai_config.json"))["model"]["vocab_size"]
ids = np.random.default_rng(1).integers(3, vocab, prompt_n).tolist()

def generator():
    p = og.GeneratorParams(model)
    p.set_search_options(max_length=prompt_n + new_n + 8, do_sample=False)
    return og.Generator(model, p)

g = generator(); g.append_tokens(ids[:8]); g.generate_next_token(); del g  # warm-up
g = generator()
t = time.perf_counter(); g.append_tokens(ids); prefill = time.perf_counter() - t
steps = []
for _ in range(new_n):
    t = time.perf_counter(); g.generate_next_token(); steps.append(time.perf_counter() - t)
rss = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"decode_tokens_per_s": 1 / float(np.median(steps)), "prefill_ms": 1000 * prefill, "peak_rss_bytes": rss}))
"""


def measure(child: str, path: Path, threads: int, python: str = sys.executable) -> dict:
    r = subprocess.run([python, "-c", child, str(path), str(threads), str(PROMPT), str(NEW)],
                       capture_output=True, text=True, timeout=1800)
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("model.onnx*")) if path.is_dir() else path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--small", action="store_true", help="d 256 (checks the script quickly)")
    ap.add_argument("--genai-python", default=None,
                    help="a Python with onnxruntime-genai (and its builder's transformers and torch): adds the builder's "
                         "graph for the standard shape")
    a = ap.parse_args()
    ensure_packages()
    from edgeloop.export import ExportConfig, export_checkpoint
    from edgeloop.quantize import RTNConfig, quantize_checkpoint

    a.work.mkdir(parents=True, exist_ok=True)
    engines: dict[str, tuple[str, Path, str, str]] = {}  # label -> (shape, path, child, python)
    checks = {}
    for shape in SHAPES:
        cfg = config(shape, a.small)
        root = a.work / shape
        model = write_model(cfg, root / "ck")
        write_gguf(model, root / "f32.gguf")
        checks[shape] = check_gguf(model, root / "f32.gguf")
        print(f"{shape}: {sum(p.numel() for p in model.parameters()):,} parameters; llama.cpp f32 vs PyTorch max "
              f"|logit difference| {checks[shape]:.2e}", flush=True)
        for name, ftype in (("Q4_0", 2), ("Q4_K_M", 15)):
            quantize_gguf(root / "f32.gguf", root / f"{name}.gguf", ftype)
            engines[f"{shape} llama.cpp {name}"] = (shape, root / f"{name}.gguf", LLAMA_CHILD, sys.executable)
        if a.genai_python and shape == "standard":
            write_hf_llama(model, root / "hf")
            build_genai(a.genai_python, root / "hf", root / "genai-fp32", "fp32")
            checks["genai builder"] = check_genai(a.genai_python, model, root / "genai-fp32")
            print(f"genai builder fp32 vs PyTorch max |logit difference| {checks['genai builder']:.2e}", flush=True)
            build_genai(a.genai_python, root / "hf", root / "genai-g32")
            engines[f"{shape} genai builder G32"] = (shape, root / "genai-g32", GENAI_CHILD, a.genai_python)
        quants = {f"G{G}": RTNConfig(group_size=G) for G in (32, 128)}
        if a.genai_python and shape == "standard":  # the builder's own choices: symmetric, the tied table INT4 too
            quants["G32 sym, INT4 embedding"] = RTNConfig(group_size=32, sym=True, embedding_bits=4)
        for i, (q, rc) in enumerate(quants.items()):
            quantize_checkpoint(root / "ck", root / f"int4-{i}", rc, progress=False, overwrite=True)
            for fused in (False, True) if i < 2 else (True,):
                out = root / f"x-{i}{'-fused' if fused else ''}"
                export_checkpoint(root / f"int4-{i}", out, ExportConfig(accuracy_level=4, unroll=shape == "standard",
                                                                       fused=fused, external_data=True), overwrite=True)
                engines[f"{shape} edgeloop {q}{' fused' if fused else ''}"] = (shape, out, EDGELOOP_CHILD,
                                                                                 sys.executable)
            if shape == "looped" and q == "G128":  # the same weights, once, with the loops written out (--unroll)
                out = root / f"x-{i}-fused-unrolled"
                export_checkpoint(root / f"int4-{i}", out, ExportConfig(accuracy_level=4, unroll=True, fused=True,
                                                                       external_data=True), overwrite=True)
                engines[f"{shape} edgeloop {q} fused, unrolled"] = (shape, out, EDGELOOP_CHILD, sys.executable)
    threads = [int(t) for t in a.threads.split(",")]
    runs: dict[tuple[str, int], list[dict]] = {(e, t): [] for e in engines for t in threads}
    for rnd in range(a.rounds):
        t0 = time.time()
        for t in threads:
            for label, (_, path, child, python) in engines.items():
                runs[label, t].append(measure(child, path, t, python))
        print(f"round {rnd + 1}/{a.rounds}: {time.time() - t0:.0f} s", flush=True)
    res = {"checks": checks, "rounds": a.rounds, "engines": {}}
    for (label, t), rows in runs.items():
        ok = [r for r in rows if "decode_tokens_per_s" in r]
        med = {k: statistics.median(r[k] for r in ok) if ok else math.nan
               for k in ("decode_tokens_per_s", "prefill_ms", "peak_rss_bytes")}
        res["engines"][f"{label} @{t}"] = {**med, "file_bytes": file_bytes(engines[label][1]),
                                          "errors": [r["error"] for r in rows if "error" in r]}
    (a.work / "results.json").write_text(json.dumps(res, indent=2))
    for shape in SHAPES:
        print(f"\n{shape} (medians of {a.rounds} interleaved rounds; ratios to llama.cpp Q4_0 at the same threads)")
        print("| engine | threads | decode tok/s | ÷ Q4_0 | prefill ms | file MB | peak RSS MB |\n|---|---|---|---|---|---|---|")
        for t in threads:
            base = res["engines"][f"{shape} llama.cpp Q4_0 @{t}"]["decode_tokens_per_s"]
            for label in (l for l in engines if engines[l][0] == shape):
                r = res["engines"][f"{label} @{t}"]
                print(f"| {label[len(shape) + 1:]} | {t} | {r['decode_tokens_per_s']:.1f} | "
                      f"{r['decode_tokens_per_s'] / base:.2f}× | {r['prefill_ms']:.1f} | {r['file_bytes'] / 1e6:.1f} | "
                      f"{r['peak_rss_bytes'] / 1e6:.0f} |")
        for label in (l for l in engines if engines[l][0] == shape):
            one, two = (res["engines"][f"{label} @{t}"]["decode_tokens_per_s"] for t in (threads[0], threads[-1]))
            print(f"  {label[len(shape) + 1:]}: {threads[-1]} threads ÷ {threads[0]} = {two / one:.2f}×")


if __name__ == "__main__":
    main()
