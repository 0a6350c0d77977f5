// The page: picks the backend (WebGPU when the browser has an adapter, else WASM; ?ep=wasm|webgpu forces
// one), loads the export folder served at /model/, and generates greedily with live statistics.
import { Tokenizer } from "@huggingface/tokenizers";
import { decode, encode, generateIds, hasWebGpu, kvBytesPerToken, loadModel } from "./edgeloop.mjs";

const $ = (id) => document.getElementById(id);
const status = (text, state) => {
  $("status").textContent = text;
  if (state) $("status").dataset.state = state;
};
const mib = (b) => (b / 2 ** 20).toFixed(2) + " MiB";
const stats = {};
function stat(key, value) {
  stats[key] = value;
  const body = $("stats").tBodies[0];
  let row = body.querySelector(`tr[data-key="${key}"]`);
  if (!row) {
    row = body.insertRow();
    row.dataset.key = key;
    row.insertCell().textContent = key;
    row.insertCell();
  }
  row.cells[1].textContent = value;
}

async function pickBackend() {
  const asked = new URLSearchParams(location.search).get("ep") || "auto";
  $("ep").value = ["webgpu", "wasm"].includes(asked) ? asked : "auto";
  const gpu = await hasWebGpu();
  if (asked === "webgpu" && !gpu) throw new Error("?ep=webgpu: this browser offers no WebGPU adapter (try ?ep=wasm)");
  return asked === "wasm" ? "wasm" : asked === "webgpu" || gpu ? "webgpu" : "wasm";
}

async function pageMemory() {
  if (!self.crossOriginIsolated || !performance.measureUserAgentSpecificMemory) return;
  try {
    const m = await performance.measureUserAgentSpecificMemory();
    stat("page memory", mib(m.bytes) + " (measureUserAgentSpecificMemory)");
  } catch { /* not offered here */ }
}

function heap() {
  if (performance.memory) stat("JS heap", mib(performance.memory.usedJSHeapSize) + " (excludes WASM memory)");
}

let model = null;

async function run() {
  const out = $("output");
  $("generate").disabled = true;
  out.textContent = "";
  out.dataset.ids = "[]";
  try {
    const prompt = $("prompt").value;
    const n = Math.max(1, parseInt($("max-tokens").value, 10) || 1);
    const promptIds = encode(model, prompt);
    out.dataset.promptIds = JSON.stringify(promptIds);
    const span = document.createElement("span");
    span.className = "prompt";
    span.textContent = prompt;
    const gen = document.createElement("span");
    out.append(span, gen);
    status(`generating ${n} tokens…`, "running");
    const ids = [];
    const r = await generateIds(model, promptIds, n, {
      onToken: async (t, i) => {
        ids.push(t);
        gen.textContent = decode(model, ids);
        status(`generating: ${i + 1} / ${n} tokens`, "running");
        // let the page repaint (requestAnimationFrame; the timeout keeps a background tab going)
        await new Promise((ok) => { requestAnimationFrame(() => ok()); setTimeout(ok, 100); });
      },
    });
    out.dataset.ids = JSON.stringify(r.ids);
    out.dataset.finish = r.finish;
    gen.textContent = decode(model, r.ids);
    stat("prompt tokens", String(promptIds.length));
    stat("new tokens", `${r.ids.length} (${r.finish})`);
    stat("prefill", `${r.prefillMs.toFixed(1)} ms`);
    stat("decode tokens/s", r.decodeTokensPerS === null ? "n/a (one token)" : r.decodeTokensPerS.toFixed(1));
    stat("end-to-end tokens/s", r.tokensPerS.toFixed(1));
    stat("KV cache", `${mib(r.kvBytes)} (${kvBytesPerToken(model)} B/token, fp32)`);
    heap();
    window.edgeloopDemo.last = r;
    status(`done: ${r.ids.length} tokens, ${r.decodeTokensPerS?.toFixed(1) ?? "n/a"} tokens/s decode`, "done");
    pageMemory();
  } catch (e) {
    status(`error: ${e.message ?? e}`, "error");
    console.error(e);
  } finally {
    $("generate").disabled = false;
  }
}

async function main() {
  window.edgeloopDemo = {};
  $("ep").addEventListener("change", () => {
    const q = new URLSearchParams(location.search);
    q.set("ep", $("ep").value);
    location.search = q.toString();
  });
  try {
    const ep = await pickBackend();
    const ort = ep === "webgpu" ? await import("onnxruntime-web/webgpu") : await import("onnxruntime-web/wasm");
    model = await loadModel({ ort, Tokenizer, base: "/model/", ep, onStatus: (s) => status(s, "loading") });
    if (!model.tokenizer) throw new Error("the export folder has no tokenizer.json: the page needs it for text prompts");
    window.edgeloopDemo.model = model;
    const m = model.manifest;
    $("model-line").textContent = `${m.format ?? "?"} export · ${model.layers} effective layers ` +
      `(r = ${model.loops} loops) · context ${model.ctx} · vocabulary ${model.vocab}`;
    $("max-tokens").max = String(model.ctx);
    const threads = ort.env.wasm.numThreads;
    const isolation = self.crossOriginIsolated ? "" : " (page not cross-origin isolated)";
    stat("backend", ep === "webgpu" ? "WebGPU (WASM for the nodes WebGPU does not take)"
      : `WASM, ${threads} thread${threads === 1 ? "" : "s"}${isolation}`);
    stat("onnxruntime-web", ort.env.versions?.web ?? "?");
    const fetched = Object.values(model.fileBytes).reduce((a, b) => a + b, 0);
    const each = Object.entries(model.fileBytes).map(([f, b]) => `${f} ${mib(b)}`).join(", ");
    stat("model bytes fetched", `${mib(fetched)} (${each})`);
    stat("session created in", `${model.sessionMs.toFixed(0)} ms`);
    heap();
    $("generate").disabled = false;
    $("generate").addEventListener("click", run);
    status(`ready (${ep})`, "ready");
  } catch (e) {
    status(`error: ${e.message ?? e}`, "error");
    console.error(e);
  }
}

main();
