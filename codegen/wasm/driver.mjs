// Runs a sparsecc wasm artifact once for the Python executor:
//   node driver.mjs ARTIFACT_DIR IO_DIR
// reads IO_DIR/input<i>.bin (raw little-endian tensors in the model's input order) and writes
// IO_DIR/output<i>.bin the same way.
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [artifact, io] = process.argv.slice(2);
const { load } = await import(pathToFileURL(join(artifact, "model.mjs")).href);
const model = await load(join(artifact, "model.wasm"));
const ARRAYS = {
  float32: Float32Array, float64: Float64Array, int8: Int8Array, int16: Int16Array, int32: Int32Array,
  int64: BigInt64Array, uint8: Uint8Array, uint16: Uint16Array, uint32: Uint32Array, uint64: BigUint64Array,
  bool: Uint8Array,
};
const feeds = {};
for (const [i, spec] of model.inputs.entries()) {
  const bytes = new Uint8Array(await readFile(join(io, `input${i}.bin`))); // a copy: aligned for any dtype
  feeds[spec.name] = new ARRAYS[spec.dtype](bytes.buffer, 0, bytes.byteLength / ARRAYS[spec.dtype].BYTES_PER_ELEMENT);
}
const outputs = await model.run(feeds);
for (const [i, spec] of model.outputs.entries()) {
  const value = outputs[spec.name];
  await writeFile(join(io, `output${i}.bin`), new Uint8Array(value.buffer, value.byteOffset, value.byteLength));
}
