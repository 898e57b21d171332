// Times wasm artifacts in one node process, in interleaved rounds so background load hits them alike:
//   node timing.mjs ROUNDS ARTIFACT_DIR...
// prints a JSON array: per artifact, the minimum over the rounds of the milliseconds per call. Time is this
// process's CPU time (`process.cpuUsage`): on a busy machine, wall time mostly measures the other processes.
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [rounds, ...dirs] = process.argv.slice(2);

function cpuMs() {
  const { user, system } = process.cpuUsage();
  return (user + system) / 1000;
}

const runs = [];
for (const dir of dirs) {
  const { load } = await import(pathToFileURL(join(dir, "model.mjs")).href);
  const model = await load(join(dir, "model.wasm"));
  const feeds = model.inputs.map((s) => new Float32Array(s.shape.reduce((a, b) => a * b, 1)).fill(0.5));
  model.runSync(feeds);
  let calls = 1;
  for (let t = 0; t < 10; calls *= 2) {  // ~10 ms per round
    const t0 = cpuMs();
    for (let i = 0; i < calls; i++) model.runSync(feeds);
    t = cpuMs() - t0;
  }
  runs.push({ run: () => model.runSync(feeds), calls, best: Infinity });
}
for (let r = 0; r < Number(rounds); r++) {
  for (const x of runs) {
    const t0 = cpuMs();
    for (let i = 0; i < x.calls; i++) x.run();
    x.best = Math.min(x.best, (cpuMs() - t0) / x.calls);
  }
}
console.log(JSON.stringify(runs.map((x) => x.best)));
