// A sparsecc model compiled to WebAssembly. Works in node (>= 18) and in browsers:
//
//   import { load } from "./model.mjs";
//   const model = await load();                    // or load("path/or/url/to/model.wasm")
//   const outputs = await model.run({ input: new Float32Array(64) });   // or run([x]) in input order
//   outputs.logits                                 // a Float32Array; model.outputs lists names and shapes
//
// The module imports nothing: kernels, executor and weights are all in model.wasm.

const MODEL = /*SPARSECC_MODEL*/ {};

const ARRAYS = {
  float32: Float32Array, float64: Float64Array, int8: Int8Array, int16: Int16Array, int32: Int32Array,
  int64: BigInt64Array, uint8: Uint8Array, uint16: Uint16Array, uint32: Uint32Array, uint64: BigUint64Array,
  bool: Uint8Array,
};

const isNode = typeof process !== "undefined" && !!process.versions?.node;

async function readBytes(source) {
  if (source instanceof ArrayBuffer || ArrayBuffer.isView(source)) return source;
  const text = String(source);
  if (isNode && !/^(https?|data|blob):/.test(text)) {
    const { readFile } = await import("node:fs/promises");
    return readFile(text.startsWith("file:") ? new URL(text) : text);
  }
  const response = await fetch(source);
  if (!response.ok) throw new Error(`${text}: HTTP ${response.status}`);
  return response.arrayBuffer();
}

function elements(shape) {
  return shape.reduce((a, b) => a * b, 1);
}

function cString(memory, ptr) {
  const bytes = new Uint8Array(memory.buffer, ptr);
  return new TextDecoder().decode(bytes.subarray(0, bytes.indexOf(0)));
}

class Model {
  constructor(exports) {
    this.exports = exports;
    this.base = exports.sparsecc_arena();
    this.inputs = MODEL.inputs.map(({ name, shape, dtype }) => ({ name, shape, dtype }));
    this.outputs = MODEL.outputs.map(({ name, shape, dtype }) => ({ name, shape, dtype }));
  }

  view(spec) {
    // A fresh view every time: growing the memory (kernel workspaces) detaches older ones.
    return new ARRAYS[spec.dtype](this.exports.memory.buffer, this.base + spec.offset, elements(spec.shape));
  }

  /** Run the model: `feeds` is {name: TypedArray} or an array in input order; resolves to {name: TypedArray}. */
  async run(feeds) {
    return this.runSync(feeds);
  }

  runSync(feeds) {
    MODEL.inputs.forEach((spec, i) => {
      const value = Array.isArray(feeds) ? feeds[i] : feeds[spec.name];
      if (value === undefined) throw new Error(`missing input '${spec.name}'`);
      if (value.length !== elements(spec.shape)) {
        throw new Error(`input '${spec.name}' has ${value.length} elements, expected ${elements(spec.shape)} (shape [${spec.shape}])`);
      }
      this.view(spec).set(value);
    });
    this.exports.sparsecc_clear_error();
    if (this.exports.sparsecc_run() !== 0) {
      throw new Error(`model failed: ${cString(this.exports.memory, this.exports.sparsecc_error())}`);
    }
    return Object.fromEntries(MODEL.outputs.map((spec) => [spec.name, this.view(spec).slice()]));
  }
}

/** Load the model: `source` is a path (node), a URL, or the bytes of model.wasm; default: beside this file. */
export async function load(source = new URL("./model.wasm", import.meta.url)) {
  const module = await WebAssembly.compile(await readBytes(isNode && source instanceof URL ? source.href : source));
  const instance = await WebAssembly.instantiate(module, {});
  const [params] = WebAssembly.Module.customSections(module, MODEL.paramsSection);
  const ex = instance.exports;
  new Uint8Array(ex.memory.buffer, ex.sparsecc_arena() + MODEL.paramsOffset, params.byteLength)
    .set(new Uint8Array(params));
  return new Model(ex);
}

export const spec = MODEL;
