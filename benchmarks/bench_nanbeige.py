"""Nanbeige4.2 through edgeloop, and against llama.cpp on the same weights (run by hand, not in CI).

Random bf16 weights of the `nanbeige` architecture (std 0.02 matrices, norms 1 + 0.05 noise), written as the Hub
ships them: config.json like Nanbeige/Nanbeige4.2-3B's, `model-0000k-of-0000n.safetensors` shards (~3 GB, written
shard by shard) + model.safetensors.index.json, a placeholder WordLevel tokenizer ("<t123>" is token 123).

--stages (shape 3b: d 3072, 22 layers x 2 loops, 48 / 8 heads of 128, SwiGLU 10752, vocab 166144, untied):
    edgeloop import -> quantize (RTN INT4 G128, embedding and lm_head INT8) -> export (Loop graph, --fused,
    accuracy level 4, context 4096, parity check on at tolerance 1.0) -> generate (16 greedy tokens)
each in a fresh process under /usr/bin/time (wall time, peak RSS); the INT4 file's bytes by part.
--speed (shape small by default: d 1024, 8 layers x 2 loops, 16 / 4 heads of 128, SwiGLU 3584, vocab 32768):
    the same writer -> a nanbeige GGUF (gguf package; q/k rows permuted as llama.cpp's converter does; block_count
    physical, nanbeige.num_loops), llama.cpp's f32 logits checked against edgeloop's PyTorch model (also at the 3B
    width with 2 layers), llama.cpp's quantizer -> Q4_0, Q4_K_M; edgeloop INT4 G32 / G128, plain and --fused
    (Loop graph, accuracy level 4; parity at 2 loops, 4 steps); interleaved rounds, each engine in a fresh process
    (bench_llamacpp's children): decode tok/s, prefill, peak RSS at 1 and 2 threads; file bytes; and the unrolled
    contrast: the same weights as a standard model with every looped layer stored once per loop (what an unrolled
    ONNX holds), INT4-exported. Before each run it waits (--quiet-wait) for other processes to leave the CPUs, and
    records the share of CPU time they took during the run (a shared VM: oversubscription hurts llama.cpp's
    OpenMP threads most). --shape 3b reuses the stages' folder (run them with --keep) and one group size.
Prints tables and the issue's goals (decode >= 1.2x llama.cpp Q4_0 at 1 and 2 threads, peak RSS <= llama.cpp's,
file <= 0.55x the unrolled ONNX); writes WORK/results-*.json. Needs llama-cpp-python >= 0.3.35 (installed when
missing, built from source: minutes) and ~40 GB of disk for --stages at 3b.

    python benchmarks/bench_nanbeige.py --work /work/nb-bench [--stages-only | --speed-only] [--shape small|3b]
        [--rounds 3] [--prompt 128 --new 64] [--keep]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_llamacpp as blc  # noqa: E402  (same folder: llama.cpp install, quantizer, children, measure)
from bench_huginn import timed  # noqa: E402  (a command under /usr/bin/time: wall seconds, peak RSS)

REAL = dict(model_type="nanbeige", architectures=["NanbeigeForCausalLM"], hidden_size=3072, num_hidden_layers=22,
            num_loops=2, loop_loss_weights=[], skip_loop_final_norm=False, num_attention_heads=48,
            num_key_value_heads=8, head_dim=128, kv_channels=128, intermediate_size=10752, vocab_size=166144,
            max_position_embeddings=262144, rope_theta=70000000.0, rope_scaling=None, rms_norm_eps=1e-05,
            hidden_act="silu", attention_bias=False, attention_dropout=0.0, tie_word_embeddings=False,
            pretraining_tp=1, bos_token_id=166100, eos_token_id=166101, pad_token_id=0, torch_dtype="bfloat16",
            qk_layernorm=False, enable_hyper_connection=False, enable_mhc=False, enable_double_loop_split=False,
            loop_share_kv=False, enable_depth_attention=False, emb_neighbor_num=None,
            auto_map={"AutoConfig": "configuration_nanbeige.NanbeigeConfig",
                      "AutoModelForCausalLM": "modeling_nanbeige.NanbeigeForCausalLM"})
SHAPES = {"3b": {}, "3b-2layer": dict(num_hidden_layers=2),
          "small": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                        intermediate_size=3584, vocab_size=32768, max_position_embeddings=4096, bos_token_id=32700,
                        eos_token_id=32701)}
CTX = 4096  # the export's context (--max-seq-len): the rotary tables of 262144 positions would be ~130 MB of file
LAYER = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
GGUF_NAMES = dict(zip(LAYER, ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
                              "ffn_up", "ffn_down")))


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process's finished children) so far."""
    import os
    import resource

    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK"), r.ru_utime + r.ru_stime


def foreign_share(fn, *args):
    """fn(*args), and the share of the machine's CPU time that other processes (not fn's children) took while it
    ran: this VM is shared, and llama.cpp's OpenMP threads suffer most from an oversubscribed CPU."""
    import os

    t0, (b0, c0) = time.time(), cpu_seconds()
    out = fn(*args)
    (b1, c1), wall = cpu_seconds(), time.time() - t0
    return out, max(0.0, (b1 - b0 - (c1 - c0)) / (wall * os.cpu_count()))


def wait_quiet(max_busy: float = 0.15, wait: float = 600.0) -> float:
    """Wait up to `wait` s until other processes use < max_busy of the CPUs (over 2 s); returns that share."""
    import os

    end = time.time() + wait
    while True:
        b0, t0 = cpu_seconds()[0], time.time()
        time.sleep(2)
        busy = (cpu_seconds()[0] - b0) / ((time.time() - t0) * os.cpu_count())
        if busy < max_busy or time.time() > end:
            return busy


def hf_config(shape: str) -> dict:
    return {**REAL, **SHAPES[shape]}


def hf_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Tensor name -> [out, in] shape, in the Hub's order."""
    d, q, kv, I, V = (c["hidden_size"], c["num_attention_heads"] * c["head_dim"],
                      c["num_key_value_heads"] * c["head_dim"], c["intermediate_size"], c["vocab_size"])
    out = {"model.embed_tokens.weight": (V, d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out |= {p + k + ".weight": s for k, s in zip(LAYER, ((d,), (q, d), (kv, d), (kv, d), (d, q), (d,), (I, d),
                                                             (I, d), (d, I)))}
    return out | {"model.norm.weight": (d,), "lm_head.weight": (V, d)}


def write_hf(folder: Path, shape: str, shard_bytes: float = 3e9, seed: int = 0) -> int:
    """A random bf16 `nanbeige` folder as the Hub lays it out, one shard in memory at a time; returns bytes."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    c, g = hf_config(shape), torch.Generator().manual_seed(seed)
    shapes = hf_shapes(c)
    plan, size, total = [[]], 0, sum(math.prod(s) * 2 for s in shapes.values())
    for name, s in shapes.items():  # shards of ~shard_bytes, in order (the count is in every file name)
        if size >= shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += math.prod(s) * 2
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for k, names in enumerate(plan):
        file = f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors"
        part = {n: (1 + 0.05 * torch.randn(shapes[n], generator=g) if len(shapes[n]) == 1 else
                    0.02 * torch.randn(shapes[n], generator=g)).bfloat16() for n in names}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
        del part
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}, indent=1))
    (folder / "config.json").write_text(json.dumps(c, indent=1))
    special = {0: "<pad>", c["bos_token_id"]: "<|endoftext|>", c["eos_token_id"]: "<|im_end|>"}
    tok = Tokenizer(models.WordLevel({special.get(i, f"<t{i}>"): i for i in range(c["vocab_size"])}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        "pad_token": "<pad>"}))
    return total


def write_gguf(hf: Path, path: Path, dtype: str = "f32") -> None:
    """The folder's weights as a llama.cpp `nanbeige` GGUF (f32, or bf16 matrices: lossless for bf16 weights),
    streamed tensor by tensor. As llama.cpp's converter (conversion/nanbeige.py, a LlamaModel with undo_permute):
    block_count is the physical layer count, nanbeige.num_loops / skip_loop_final_norm, key/value_length =
    head_dim, rope dimension count head_dim, q/k rows permuted for llama.cpp's NORM rotary (pairs)."""
    import gguf
    import numpy as np
    import torch
    from safetensors import safe_open

    c = json.loads((hf / "config.json").read_text())
    where = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    H, KV, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    w = gguf.GGUFWriter(str(path), "nanbeige")
    w.add_name("nanbeige-random")
    w.add_block_count(c["num_hidden_layers"])
    w.add_uint32("nanbeige.num_loops", c["num_loops"])
    w.add_bool("nanbeige.skip_loop_final_norm", c["skip_loop_final_norm"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_vocab_size(c["vocab_size"])
    w.add_file_type(0 if dtype == "f32" else 32)  # LLAMA_FTYPE_ALL_F32 / MOSTLY_BF16
    V = c["vocab_size"]  # a placeholder vocabulary (as bench_llamacpp): the benchmark feeds token ids
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"<t{i}>" for i in range(3, V)])
    w.add_token_scores([0.0] * V)
    w.add_token_types([2, 3, 3] + [1] * (V - 3))
    w.add_bos_token_id(c["bos_token_id"])
    w.add_eos_token_id(c["eos_token_id"])
    names = {"token_embd.weight": ("model.embed_tokens.weight", 0)}
    for i in range(c["num_hidden_layers"]):
        names |= {f"blk.{i}.{GGUF_NAMES[k]}.weight": (f"model.layers.{i}.{k}.weight",
                                                      H if k.endswith("q_proj") else KV if k.endswith("k_proj") else 0)
                  for k in LAYER}
    names |= {"output_norm.weight": ("model.norm.weight", 0), "output.weight": ("lm_head.weight", 0)}
    shapes = hf_shapes(c)
    for g, (h, _) in names.items():
        bf = dtype == "bf16" and len(shapes[h]) == 2  # norms stay f32, as the converter keeps them
        w.add_tensor_info(g, shapes[h], np.dtype(np.uint16 if bf else np.float32), math.prod(shapes[h]) * (2 if bf else 4),
                          gguf.GGMLQuantizationType.BF16 if bf else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    with contextlib.ExitStack() as stack:
        files = {f: stack.enter_context(safe_open(str(hf / f), "pt")) for f in set(where.values())}
        for g, (h, heads) in names.items():
            t = files[where[h]].get_tensor(h)
            if heads:  # rotate_half rows -> llama.cpp's pairs (LlamaModel.permute)
                t = t.reshape(heads, 2, t.shape[0] // heads // 2, t.shape[1]).swapaxes(1, 2).reshape(t.shape)
            bf = dtype == "bf16" and t.ndim == 2
            w.write_tensor_data(t.contiguous().view(torch.int16).numpy().view(np.uint16) if bf else t.float().numpy())
    w.close()


def check_gguf(ck: Path, gguf_path: Path) -> dict:
    """llama.cpp (f32 GGUF, f32 KV) against edgeloop's PyTorch model in fp32: max |logit difference| (absolute and
    relative to the largest |logit|) over a 24-token prompt (bench_llamacpp.check_gguf)."""
    import numpy as np
    import torch

    from edgeloop.model.checkpoint import load_model

    model = load_model(ck)
    err = blc.check_gguf(model, gguf_path)
    ids = np.random.default_rng(0).integers(3, model.cfg.vocab_size, 24).tolist()  # check_gguf's prompt
    with torch.no_grad():
        scale = float(model(torch.tensor([ids])).abs().max())
    return {"max_abs": err, "max_abs_logit": scale, "rel": err / scale, "ok": err / scale <= 1e-3}


def onnx_bytes(export: Path) -> dict[str, int]:
    """The export's tensor bytes by part: embedding, lm_head, the looped stack, the rest (and the file total)."""
    import onnx

    m = onnx.load(str(export / "model.onnx"), load_external_data=False)
    parts = dict.fromkeys(("embedding", "lm_head", "layers", "other"), 0)

    def walk(g):
        for t in g.initializer:
            ext = {e.key: e.value for e in t.external_data}
            n = int(ext["length"]) if "length" in ext else len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
            parts["embedding" if "embed" in t.name else "lm_head" if "lm_head" in t.name else
                  "layers" if "middle" in t.name or "layers" in t.name else "other"] += n
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(m.graph)
    return {**parts, "file": blc.file_bytes(export)}


def edge(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgeloop.cli", *args]


def stages(a, w: Path) -> dict:
    """The 3B pipeline, each stage a fresh process under /usr/bin/time."""
    graph, x = ([], w / "x128") if a.plain else (["--fused"], w / "x128-fused")
    steps = {
        "write HF shards": [sys.executable, __file__, "--work", str(w), "--write-hf", str(w / "hf"),
                            "--shape", a.shape],
        "import": edge("import", str(w / "hf"), "-o", str(w / "ck"), "--overwrite", "--json"),
        "quantize RTN G128": edge("quantize", str(w / "ck"), "-o", str(w / "q128"), "--group-size", "128",
                                  "--method", "rtn", "--embedding-bits", "8", "--overwrite", "--json"),
        # int8 activations (accuracy level 4) over 44 random-weight layers err by ~0.53 logits (0.5 is the default
        # tolerance at level 4): checked at 1.0, as bench_ouro does for its random 24 x 4 layers
        "export": edge("export", str(w / "q128"), "-o", str(x), *graph, "--accuracy-level", "4",
                       "--max-seq-len", str(CTX), "--external-data", "--tolerance", "1.0", "--overwrite", "--json"),
        "generate 16 tokens": edge("generate", str(x), "--prompt", " ".join(f"<t{i}>" for i in range(5, 37)),
                                   "--max-new-tokens", "16", "--threads", "2"),
    }
    made = {"write HF shards": w / "hf", "import": w / "ck", "quantize RTN G128": w / "q128", "export": x}
    old = a.work / f"results-stages-{a.shape}.json"  # a rerun resumes: stages done before keep their figures
    res: dict = {"shape": a.shape, "stages": {}}
    done = json.loads(old.read_text())["stages"] if old.is_file() else {}
    for name, cmd in steps.items():
        if not done.get(name, {}).get("rc", 1) and name in made and any(made[name].glob("*.json")):
            res["stages"][name] = done[name]
            continue
        r, r["foreign_cpu_share"] = foreign_share(timed, cmd, w / f"stage-{name.split()[0]}.log")
        out = r.pop("stdout")
        res["stages"][name] = r
        print(f"{name}: {r['seconds']} s, peak RSS {r['peak_rss_gib']:.2f} GiB, rc {r['rc']}, other processes' CPU "
              f"share {r['foreign_cpu_share']:.0%} {r.get('error', '')}", flush=True)
        if name == "export" and not r["rc"]:
            res["parity"] = json.loads((x / "manifest.json").read_text()).get("parity")
        if name.startswith("generate"):
            res["generated"] = out.strip()[-300:]
        if r["rc"]:
            break
    if (x / "model.onnx").is_file():
        res["int4_bytes"] = onnx_bytes(x)
    return res


def standard_twin(ck: Path, out: Path) -> None:
    """The same weights as a standard (num_loops 1) model with the looped layers written once per loop: what an
    unrolled export (onnxruntime-genai's builder) stores, every layer weight twice at 2 loops."""
    import dataclasses

    from edgeloop.model.checkpoint import load_config, load_state, save_checkpoint
    from edgeloop.model.model import meta_model

    cfg = load_config(ck)
    L, r = cfg.n_middle, cfg.num_loops
    twin = dataclasses.replace(cfg, n_middle=L * r, num_loops=1, norm_each_loop=False, extra={})
    state = {k: v.float() for k, v in load_state(ck, cfg).items()}
    for k in [k for k in state if k.startswith("middle.")]:
        i, rest = k.split(".", 2)[1:]
        for j in range(1, r):
            state[f"middle.{int(i) + j * L}.{rest}"] = state[k]
    model = meta_model(twin.validate())
    model.load_state_dict(state, strict=True, assign=True)
    save_checkpoint(model.init_buffers(), out, dtype=__import__("torch").bfloat16, overwrite=True)


def speed_setup(a, w: Path) -> tuple[dict, dict]:
    """Folders, checks and the engines of the speed comparison (label -> (path, child)); what is already there
    (a GGUF, an INT4 checkpoint, an export with its manifest) is reused, so a rerun goes straight to the rounds.
    At 3b: the stages' folder (run them with --keep first) and no f32 check (16.7 GB)."""
    from edgeloop.export import ExportConfig, export_checkpoint
    from edgeloop.importers import as_checkpoint
    from edgeloop.quantize import RTNConfig, quantize_checkpoint

    info: dict = {"shape": {k: hf_config(a.shape)[k] for k in ("hidden_size", "num_hidden_layers", "num_loops",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size")}}
    d = a.work / "stages-3b" if a.shape == "3b" else w / a.shape
    checks = ([] if a.shape == "3b" else [a.shape]) + (["3b-2layer"] if a.check_3b_width else [])
    for shape in checks:  # llama.cpp f32 vs PyTorch fp32, on this shape and on the 3B width (2 layers)
        c = w / shape
        if not (c / "hf" / "config.json").is_file():
            write_hf(c / "hf", shape)
        if not (c / "ck" / "config.json").is_file():
            as_checkpoint(c / "hf", c / "ck", overwrite=True)
        if not (c / "f32.gguf").is_file():
            write_gguf(c / "hf", c / "f32.gguf")
        info[f"check {shape}"] = check_gguf(c / "ck", c / "f32.gguf")
        print(f"llama.cpp f32 vs edgeloop PyTorch fp32 ({shape}): {info[f'check {shape}']}", flush=True)
        if shape != a.shape:
            shutil.rmtree(c)
    engines: dict[str, tuple[Path, str]] = {}
    # 3b: llama.cpp quantizes from bf16 (lossless for these bf16 weights; an f32 file would be 16.7 GB)
    src = d / ("bf16.gguf" if a.shape == "3b" else "f32.gguf")
    for name, ftype in (("Q4_0", 2), ("Q4_K_M", 15)):
        if not (d / f"{name}.gguf").is_file():
            if not src.is_file():
                write_gguf(d / "hf", src, "bf16")
            blc.quantize_gguf(src, d / f"{name}.gguf", ftype)
        engines[f"llama.cpp {name}"] = (d / f"{name}.gguf", blc.LLAMA_CHILD)
    src.unlink(missing_ok=True)
    for G in a.groups:
        for fused in [g == "fused" for g in a.graphs.split(",")]:
            out = d / f"x{G}{'-fused' if fused else ''}"
            if not (out / "manifest.json").is_file():
                if not (d / f"q{G}" / "config.json").is_file():
                    quantize_checkpoint(d / "ck", d / f"q{G}", RTNConfig(group_size=G), progress=False, overwrite=True)
                export_checkpoint(d / f"q{G}", out, ExportConfig(  # parity at the trained loops only, 4 steps
                    accuracy_level=4, fused=fused, external_data=True, max_seq_len=CTX, verify=a.shape != "3b",
                    parity_loops=(hf_config(a.shape)["num_loops"],), decode_steps=4), overwrite=True)
            engines[f"edgeloop G{G}{' fused' if fused else ''}"] = (out, blc.EDGELOOP_CHILD)
            info[f"bytes G{G}{' fused' if fused else ''}"] = onnx_bytes(out)
    for G in a.groups if a.shape != "3b" else ():  # the unrolled contrast, measured: the standard twin, INT4
        out = d / f"twin-x{G}"
        if not (out / "manifest.json").is_file():
            if not (d / "twin" / "config.json").is_file():
                standard_twin(d / "ck", d / "twin")
            quantize_checkpoint(d / "twin", d / f"twin-q{G}", RTNConfig(group_size=G), progress=False, overwrite=True)
            export_checkpoint(d / f"twin-q{G}", out, ExportConfig(accuracy_level=4, external_data=True,
                                                                  max_seq_len=CTX, verify=False), overwrite=True)
            shutil.rmtree(d / f"twin-q{G}")
        info[f"bytes unrolled G{G}"] = onnx_bytes(out)
    shutil.rmtree(d / "twin", ignore_errors=True)
    return info, engines


def speed(a, w: Path) -> dict:
    info, engines = speed_setup(a, w)
    blc.PROMPT, blc.NEW = a.prompt, a.new  # bench_llamacpp's children read these
    threads = [int(t) for t in a.threads.split(",")]
    runs: dict = {(e, t): [] for e in engines for t in threads}
    for rnd in range(a.rounds):
        t0 = time.time()
        for t in threads:
            for label, (path, child) in engines.items():
                wait_quiet(wait=a.quiet_wait)
                r, share = foreign_share(blc.measure, child, path, t)
                runs[label, t].append({**r, "foreign_cpu_share": share})
        print(f"round {rnd + 1}/{a.rounds}: {time.time() - t0:.0f} s", flush=True)
    res = {**info, "prompt": a.prompt, "new": a.new, "rounds": a.rounds, "engines": {}}
    for (label, t), rows in runs.items():
        ok = [r for r in rows if "decode_tokens_per_s" in r]
        res["engines"][f"{label} @{t}"] = {
            **{k: statistics.median(r[k] for r in ok) if ok else math.nan
               for k in ("decode_tokens_per_s", "prefill_ms", "peak_rss_bytes")},
            "foreign_cpu_share": [round(r["foreign_cpu_share"], 3) for r in rows],
            "file_bytes": blc.file_bytes(engines[label][0]), "errors": [r["error"] for r in rows if "error" in r]}
    E = res["engines"]
    print(f"\n{a.shape} shape {info['shape']}: medians of {a.rounds} interleaved rounds, prompt {a.prompt}, "
          f"{a.new} new tokens\n| engine | threads | decode tok/s | ÷ Q4_0 | prefill ms | ÷ Q4_0 | file MB | "
          "peak RSS MB | other processes' CPU |\n|---|---|---|---|---|---|---|---|---|")
    for t in threads:
        base = E[f"llama.cpp Q4_0 @{t}"]
        for label in engines:
            r = E[f"{label} @{t}"]
            print(f"| {label} | {t} | {r['decode_tokens_per_s']:.2f} | "
                  f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}× | {r['prefill_ms']:.0f} | "
                  f"{r['prefill_ms'] / base['prefill_ms']:.2f}× | {r['file_bytes'] / 1e6:.1f} | "
                  f"{r['peak_rss_bytes'] / 1e6:.0f} | {statistics.median(r['foreign_cpu_share']):.0%} |")
    print("\ngoals (per edgeloop engine):")
    rss_llama = min(E[f"{l} @{t}"]["peak_rss_bytes"] for l in engines if l.startswith("llama") for t in threads)
    for label in (l for l in engines if l.startswith("edgeloop")):
        ratios = [E[f"{label} @{t}"]["decode_tokens_per_s"] / E[f"llama.cpp Q4_0 @{t}"]["decode_tokens_per_s"]
                  for t in threads]
        rss = max(E[f"{label} @{t}"]["peak_rss_bytes"] for t in threads)
        line = (f"  {label}: decode ÷ Q4_0 {', '.join(f'{x:.2f}×' for x in ratios)} -> "
                f"{'MET' if min(ratios) >= 1.2 else 'not met'} (>= 1.2×); peak RSS {rss / 1e6:.0f} MB vs llama.cpp's "
                f"lowest {rss_llama / 1e6:.0f} MB -> {'MET' if rss <= rss_llama else 'not met'}")
        res.setdefault("goals", {})[label] = {"decode_ratios": ratios, "rss_ok": rss <= rss_llama}
        print(line)
    return res


def unrolled_report(res: dict, loops: int) -> None:
    """File vs the unrolled ONNX: measured (the standard twin) where it was built, else its tensor-byte sum (the
    Loop export plus the looped stack once more per extra loop)."""
    print("\nfile vs the unrolled ONNX (same INT4 format, every layer stored once per loop):")
    for key in [k for k in res if k.startswith("bytes G")]:
        b, G = res[key], key.split()[1]
        est = b["file"] + (loops - 1) * b["layers"]
        real = res.get(f"bytes unrolled {G}", {}).get("file")
        unrolled = real or est
        res.setdefault("unrolled", {})[key] = {"loop_file": b["file"], "unrolled_sum": est, "unrolled_measured": real,
                                               "ratio": b["file"] / unrolled}
        print(f"  {key[6:]}: {b['file'] / 1e6:.1f} MB vs unrolled {unrolled / 1e6:.1f} MB "
              f"({'measured' if real else 'tensor-byte sum'}; sum {est / 1e6:.1f} MB) = {b['file'] / unrolled:.3f}× -> "
              f"{'MET' if b['file'] / unrolled <= 0.55 else 'not met'} (<= 0.55×); embedding + lm_head "
              f"{(b['embedding'] + b['lm_head']) / b['file']:.1%} of the file")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--shape", choices=("small", "3b"), default=None,
                    help="default: 3b for the stages, small for the speed comparison")
    ap.add_argument("--stages-only", action="store_true")
    ap.add_argument("--speed-only", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompt", type=int, default=128, help="speed: prompt tokens")
    ap.add_argument("--new", type=int, default=64, help="speed: greedy new tokens")
    ap.add_argument("--quiet-wait", type=float, default=60.0,
                    help="speed: wait up to this many seconds before each run for other processes to leave the CPUs")
    ap.add_argument("--groups", type=lambda s: [int(x) for x in s.split(",")], default=[32, 128])
    ap.add_argument("--graphs", default="plain,fused", help="speed: the edgeloop graphs (plain, fused)")
    ap.add_argument("--plain", action="store_true", help="stages: export the plain graph, not --fused")
    ap.add_argument("--no-check-3b-width", dest="check_3b_width", action="store_false",
                    help="speed: skip the fp32 llama.cpp check at the 3B width (2 layers)")
    ap.add_argument("--keep", action="store_true", help="keep the multi-GB folders of the 3b stages")
    ap.add_argument("--write-hf", type=Path, help=argparse.SUPPRESS)  # the stages' first child
    a = ap.parse_args()
    if a.write_hf:
        print(json.dumps({"bytes": write_hf(a.write_hf, a.shape)}))
        return
    blc.ensure_packages()
    import llama_cpp

    print(f"llama-cpp-python {llama_cpp.__version__}", flush=True)
    if not a.speed_only:
        sa = argparse.Namespace(**{**vars(a), "shape": a.shape or "3b"})
        w = a.work / f"stages-{sa.shape}"
        w.mkdir(parents=True, exist_ok=True)
        res = stages(sa, w)
        b = res.get("int4_bytes")
        if b:
            res["bytes G128"] = b
            unrolled_report(res, hf_config(sa.shape)["num_loops"])
        print("\n| stage | wall s | peak RSS GiB | other processes' CPU |\n|---|---|---|---|")
        for name, r in res["stages"].items():
            print(f"| {name} | {r['seconds']} | {r['peak_rss_gib']:.2f} | {r['foreign_cpu_share']:.0%} |")
        (a.work / f"results-stages-{sa.shape}.json").write_text(json.dumps(res, indent=2))
        if not a.keep:
            for d in ("hf", "ck", "q128"):
                shutil.rmtree(w / d, ignore_errors=True)
    if not a.stages_only:
        sa = argparse.Namespace(**{**vars(a), "shape": a.shape or "small"})
        w = a.work / "speed"
        w.mkdir(parents=True, exist_ok=True)
        res = speed(sa, w)
        unrolled_report(res, hf_config(sa.shape)["num_loops"])
        (a.work / f"results-speed-{sa.shape}.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
