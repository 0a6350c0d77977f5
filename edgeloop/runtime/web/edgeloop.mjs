// Loading an edgeloop export folder with onnxruntime-web and greedy generation through its KV cache.
// No DOM here: the page (app.mjs) and tests use it.
//
// Feeds mirror edgeloop.runtime.Runtime.generate_ids for one prompt (batch 1, no padding):
//   prefill  input_ids [1,S] = the prompt, attention_mask = ones [1,S], position_ids = 0..S-1,
//            past_key_values.{i}.key|value = empty float32 [1, kv_heads, 0, head_dim], i < effective_layers
//            (the names, layers, heads and dtype come from manifest.kv, written by edgeloop/kv.py)
//   decode   input_ids [[t]], position_ids [[last + 1]], attention_mask = ones [1, P+1],
//            past = the previous run's present.{i}.key|value
//   token    argmax of logits[0, -1, :] (first index on ties, as numpy), stop on <|endoftext|>,
//            stop before a position reaches the context (manifest.max_seq_len).
// num_loops: onnxruntime-web only accepts the graph's inputs, not overridable initializers, so the page
// always runs the initializer's default (the trained r), which is also the Python runtime's default.

export const EOT = "<|endoftext|>";

async function fetchBytes(url, onBytes) {
  const res = await fetch(url);
  if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
  if (!res.body || !onBytes) return new Uint8Array(await res.arrayBuffer());
  const total = Number(res.headers.get("Content-Length")) || 0;
  const parts = [];
  let got = 0;
  for (const reader = res.body.getReader(); ;) {
    const { done, value } = await reader.read();
    if (done) break;
    parts.push(value);
    got += value.byteLength;
    onBytes(got, total);
  }
  const out = new Uint8Array(got);
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.byteLength; }
  return out;
}

async function fetchJson(url, optional = false) {
  const res = await fetch(url);
  if (!res.ok) {
    if (optional && res.status === 404) return null;
    throw new Error(`${url}: HTTP ${res.status}`);
  }
  return res.json();
}

/** Whether this browser offers a WebGPU adapter (the page then uses the WebGPU execution provider). */
export async function hasWebGpu() {
  if (typeof navigator === "undefined" || !navigator.gpu) return false;
  try {
    return !!(await navigator.gpu.requestAdapter());
  } catch {
    return false;
  }
}

/**
 * Load the export folder at `base` (a URL ending in "/"): manifest.json, genai_config.json (where written), the tokenizer,
 * model.onnx and model.onnx.data (when the manifest says the export has external data).
 * `ort`: the onnxruntime-web module; `ep`: "webgpu" or "wasm"; `Tokenizer`: @huggingface/tokenizers' class.
 */
export async function loadModel({ ort, Tokenizer, base, ep = "wasm", onStatus = () => {} }) {
  onStatus("reading manifest.json");
  const manifest = await fetchJson(base + "manifest.json");
  // an export onnxruntime-genai cannot drive has none (manifest.genai.why says so): not fetched, no 404
  const genai = manifest.genai?.config === false ? null : await fetchJson(base + "genai_config.json", true);
  const c = manifest.config;
  const kv = manifest.kv ?? { // exports written before manifest.kv: the same convention, restated
    past_key: "past_key_values.%d.key", past_value: "past_key_values.%d.value",
    present_key: "present.%d.key", present_value: "present.%d.value", layers: manifest.effective_layers,
    kv_heads: c.n_kv_heads, head_dim: Number(c.d_model) / Number(c.n_heads), dtype: "float32",
  };
  const model = {
    manifest, genai, ep,
    layers: Number(kv.layers),
    loops: Number(manifest.num_loops),
    ctx: Number(manifest.max_seq_len),
    kvHeads: Number(kv.kv_heads),
    headDim: Number(kv.head_dim),
    kvDtype: kv.dtype,
    names: {
      past: (i, k) => (k === "key" ? kv.past_key : kv.past_value).replace("%d", String(i)),
      present: (i, k) => (k === "key" ? kv.present_key : kv.present_value).replace("%d", String(i)),
    },
    vocab: Number(c.vocab_size),
    tokenizer: null, eos: null, fileBytes: {},
  };
  onStatus("reading the tokenizer");
  const tj = await fetchJson(base + "tokenizer.json", true);
  if (tj) {
    const tc = (await fetchJson(base + "tokenizer_config.json", true)) || {};
    model.tokenizer = new Tokenizer(tj, tc);
    const eot = (tj.added_tokens || []).find((t) => t.content === EOT);
    model.eos = eot ? eot.id : (tj.model?.vocab?.[EOT] ?? null);
  }
  if (manifest.generation?.eos_token_id?.length) { // the source folder's eos tokens (edgeloop/export/folder.py)
    model.eos = manifest.generation.eos_token_id[0];
    model.stopIds = manifest.generation.eos_token_id.map(Number);
  }
  const files = ["model.onnx", ...(manifest.external_data ? ["model.onnx.data"] : [])];
  const bytes = {};
  for (const f of files) {
    bytes[f] = await fetchBytes(base + f, (got, total) =>
      onStatus(`fetching ${f}: ${(got / 2 ** 20).toFixed(1)}${total ? " / " + (total / 2 ** 20).toFixed(1) : ""} MiB`));
    model.fileBytes[f] = bytes[f].byteLength;
  }
  onStatus(`creating the onnxruntime-web session (${ep})`);
  const options = {
    executionProviders: ep === "webgpu" ? ["webgpu", "wasm"] : ["wasm"],
    logSeverityLevel: 3, // num_loops is an input with a default: onnxruntime warns about that by design
    graphOptimizationLevel: "all",
  };
  if (manifest.accuracy_level !== undefined && manifest.accuracy_level !== null) {
    options.extra = { session: { qdq_matmulnbits_accuracy_level: String(manifest.accuracy_level) } };
  }
  if (bytes["model.onnx.data"]) {
    options.externalData = [{ path: "model.onnx.data", data: bytes["model.onnx.data"] }];
  }
  const t0 = performance.now();
  model.session = await ort.InferenceSession.create(bytes["model.onnx"], options);
  model.sessionMs = performance.now() - t0;
  model.ort = ort;
  checkConvention(model);
  return model;
}

function checkConvention(m) {
  const need = ["input_ids", "attention_mask", "position_ids"];
  for (let i = 0; i < m.layers; i++) need.push(m.names.past(i, "key"), m.names.past(i, "value"));
  const lost = need.find((n) => !m.session.inputNames.includes(n));
  if (lost) throw new Error(`model.onnx does not follow the edgeloop KV convention: input '${lost}' is missing`);
  if (!m.session.outputNames.includes("logits")) throw new Error("model.onnx has no 'logits' output");
}

/** Token ids of a prompt: the whole text, no special tokens (as Runtime.generate encodes it). */
export function encode(model, text) {
  if (!model.tokenizer) throw new Error("the export folder has no tokenizer.json");
  return model.tokenizer.encode(text, { add_special_tokens: false }).ids.map(Number);
}

export function decode(model, ids) {
  return model.tokenizer ? model.tokenizer.decode(ids) : "";
}

function int64(values, dims, ort) {
  return new ort.Tensor("int64", BigInt64Array.from(values, (v) => BigInt(v)), dims);
}

function argmaxLast(logits) {
  const V = logits.dims[logits.dims.length - 1];
  const data = logits.data;
  const off = data.length - V;
  let best = 0, bestV = data[off];
  for (let j = 1; j < V; j++) if (data[off + j] > bestV) { bestV = data[off + j]; best = j; }
  return best;
}

/** KV-cache bytes one token adds (keys and values of every effective layer). */
export function kvBytesPerToken(model) {
  return 2 * model.layers * model.kvHeads * model.headDim * (model.kvDtype === "float16" ? 2 : 4);
}

/**
 * Greedy generation of up to `maxNewTokens` after `promptIds`. `onToken(id, index)` is awaited after each
 * token (the page repaints there). Returns {ids, finish, prefillMs, decodeMs, decodeTokensPerS, tokensPerS}.
 * `stop`: token ids that end the generation (default: <|endoftext|>).
 */
export async function generateIds(model, promptIds, maxNewTokens, { onToken = null, stop = null } = {}) {
  const { ort, session } = model;
  const prompt = promptIds.map(Number);
  if (!prompt.length) throw new Error("the prompt is empty (no tokens)");
  const bad = prompt.find((t) => !(Number.isInteger(t) && t >= 0 && t < model.vocab));
  if (bad !== undefined) throw new Error(`token id ${bad} is outside the vocabulary (0..${model.vocab - 1})`);
  if (prompt.length > model.ctx) {
    throw new Error(`the prompt has ${prompt.length} tokens; the model's context is ${model.ctx}`);
  }
  const stops = new Set(stop ?? model.stopIds ?? (model.eos !== null ? [model.eos] : []));
  let past = {};
  const presentOf = {}; // present name -> the past name it feeds next step
  const empty = model.kvDtype === "float16" ? new Uint16Array(0) : new Float32Array(0);
  for (let i = 0; i < model.layers; i++) {
    for (const k of ["key", "value"]) {
      past[model.names.past(i, k)] = new ort.Tensor(model.kvDtype, empty, [1, model.kvHeads, 0, model.headDim]);
      presentOf[model.names.present(i, k)] = model.names.past(i, k);
    }
  }
  let ids = prompt, pos = prompt.map((_, j) => j), total = prompt.length;
  const out = [];
  let finish = "length", prefillMs = 0, decodeMs = 0;
  const t0 = performance.now();
  for (let step = 0; step < maxNewTokens; step++) {
    if (pos[pos.length - 1] >= model.ctx) { finish = "context"; break; } // no rotary position left
    const ts = performance.now();
    const feeds = {
      input_ids: int64(ids, [1, ids.length], ort),
      attention_mask: int64(new Array(total).fill(1), [1, total], ort),
      position_ids: int64(pos, [1, pos.length], ort),
      ...past,
    };
    const res = await session.run(feeds);
    const t = argmaxLast(res.logits);
    const next = {};
    for (const [name, tensor] of Object.entries(res)) {
      if (name in presentOf) next[presentOf[name]] = tensor;
      else tensor.dispose?.();
    }
    for (const tensor of Object.values(past)) tensor.dispose?.();
    past = next;
    const ms = performance.now() - ts;
    if (step === 0) prefillMs = ms; else decodeMs += ms;
    out.push(t);
    if (onToken) await onToken(t, step);
    if (stops.has(t)) { finish = "stop"; break; }
    ids = [t];
    pos = [pos[pos.length - 1] + 1];
    total += 1;
  }
  for (const tensor of Object.values(past)) tensor.dispose?.();
  const allMs = performance.now() - t0;
  return {
    ids: out, finish, prefillMs, decodeMs, wallMs: allMs,
    decodeTokensPerS: out.length > 1 ? (out.length - 1) / (decodeMs / 1000) : null,
    tokensPerS: out.length ? out.length / (allMs / 1000) : null,
    // the cache after the last run holds the prompt and every new token but the last (never fed back)
    kvBytes: (prompt.length + Math.max(out.length - 1, 0)) * kvBytesPerToken(model),
  };
}
