// Times sparsecc wasm artifacts against onnxruntime-web (wasm backend, SIMD, one thread) in one node process.
//   ORT_WEB_DIR=<dir holding node_modules/onnxruntime-web> node wasm_bench.mjs CASES.json
// CASES.json: [{"name", "artifact", "onnx"}]; ORT runs the artifact's own model.onnx (same weights, zeros
// included), so both sides compute the same function. Prints one JSON line per case:
// {"name", "ours_ms", "ort_ms", "ours_wall_ms", "ort_wall_ms", "max_abs_diff"}: per-call times over
// interleaved rounds (~20 ms of calls each): the minimum CPU time of this process (on a shared machine wall
// time mostly measures the other processes; onnxruntime-web runs in this thread with numThreads = 1) and
// the median wall time.
import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const require = createRequire(join(process.env.ORT_WEB_DIR ?? process.cwd(), "noop.js"));
const ort = require("onnxruntime-web");
ort.env.wasm.numThreads = 1;
ort.env.wasm.simd = true;
ort.env.logLevel = "error";

const cases = JSON.parse(await readFile(process.argv[2], "utf8"));
const rounds = Number(process.env.BENCH_ROUNDS ?? 15);

function randomInput(n) {
  const x = new Float32Array(n);
  let s = 12345;
  for (let i = 0; i < n; i++) {
    s = (s * 1103515245 + 12345) >>> 0;
    x[i] = (s / 4294967296) * 2 - 1;
  }
  return x;
}

async function timeOne(fn) {
  // Calls per round: enough for ~20 ms.
  await fn();
  let calls = 1;
  for (;;) {
    const t0 = performance.now();
    for (let i = 0; i < calls; i++) await fn();
    const dt = performance.now() - t0;
    if (dt > 20 || calls > 1e5) break;
    calls *= 2;
  }
  return calls;
}

function cpuMs() {
  const { user, system } = process.cpuUsage();
  return (user + system) / 1000;
}

async function round(fn, calls) {
  const c0 = cpuMs();
  const t0 = performance.now();
  for (let i = 0; i < calls; i++) await fn();
  return { wall: (performance.now() - t0) / calls, cpu: (cpuMs() - c0) / calls };
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

for (const c of cases) {
  const { load } = await import(pathToFileURL(join(c.artifact, "model.mjs")).href);
  const model = await load(join(c.artifact, "model.wasm"));
  const spec = model.inputs[0];
  const x = randomInput(spec.shape.reduce((a, b) => a * b, 1));
  const session = await ort.InferenceSession.create(await readFile(c.onnx), {
    executionProviders: ["wasm"], graphOptimizationLevel: "all",
  });
  const feeds = { [spec.name]: new ort.Tensor("float32", x, spec.shape) };
  const ours = () => model.runSync({ [spec.name]: x });
  const theirs = () => session.run(feeds);
  const a = ours()[model.outputs[0].name];
  const b = (await theirs())[session.outputNames[0]].data;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff = Math.max(diff, Math.abs(a[i] - b[i]));
  const n1 = await timeOne(ours);
  const n2 = await timeOne(theirs);
  const t1 = [];
  const t2 = [];
  for (let r = 0; r < rounds; r++) {
    t1.push(await round(ours, n1));
    t2.push(await round(theirs, n2));
  }
  console.log(JSON.stringify({
    name: c.name, ours_ms: Math.min(...t1.map((t) => t.cpu)), ort_ms: Math.min(...t2.map((t) => t.cpu)),
    ours_wall_ms: median(t1.map((t) => t.wall)), ort_wall_ms: median(t2.map((t) => t.wall)), max_abs_diff: diff,
  }));
  await session.release();
}
