"""End-to-end sparse CPU benchmark: whole models, as users run them.

For each model, the weights are made block-sparse with the sparsify pass and saved as a plain ONNX file (the
zeros sit in dense tensors, as another pruning tool would leave them); that file is compiled with plain
`sparsecc.compile(path, target="cpu")` - no sparsity flags: the compiler finds the zeros and its cost model
picks kernels per layer - and timed through `sparsecc.load(...).run(...)` against ONNX Runtime on the same
file and against a dense compile of the original model. Timing harness: `dense_cpu.compare` (one child
process per timing, ORT and ours alternating over rounds; ratio = median over rounds of ORT time / ours).

    python benchmarks/sparse_models.py                                  # default models, 90% block:4x4
    python benchmarks/sparse_models.py --models ffn768 --sparsity 0.7 0.9 --pattern block:4x1 --batches 1 16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from dense_cpu import compare  # noqa: E402


def ffn(batch: int, d: int = 768, hidden: int = 3072, seed: int = 0) -> onnx.ModelProto:
    """A transformer feed-forward block, x[B, d] -> MatMul -> Add -> Relu -> MatMul -> Add."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32), n)
             for n, s in (("w1", (d, hidden)), ("w2", (hidden, d)))]
    inits += [numpy_helper.from_array(np.zeros(n, np.float32), b) for b, n in (("b1", hidden), ("b2", d))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["o"]),
             helper.make_node("Add", ["o", "b2"], ["y"])]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def build(name: str, batch: int) -> onnx.ModelProto:
    from sparsecc.ir import fix_input_shapes, load_model
    from sparsecc.models import BUILDERS, model_path

    if name == "ffn768":
        return ffn(batch)
    if name == "resnet_cnn":
        return BUILDERS["resnet_cnn"](batch=batch)
    return fix_input_shapes(load_model(str(model_path(name))), {}, batch).proto


def sparsified(model: onnx.ModelProto, sparsity: float, pattern: str) -> onnx.ModelProto:
    from sparsecc.ir import load_model
    from sparsecc.pipeline import make_pass

    return make_pass("sparsify", sparsity=sparsity, pattern=pattern)(load_model(model), None).proto


def main(argv: list[str] | None = None) -> None:
    import sparsecc
    from sparsecc.compiler import physical_cores

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["ffn768", "digits_transformer", "digits_cnn", "resnet_cnn"])
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 16])
    ap.add_argument("--sparsity", nargs="*", type=float, default=[0.9])
    ap.add_argument("--pattern", default="block:4x4")
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    args = ap.parse_args(argv)
    threads = args.threads or physical_cores()
    work = Path(tempfile.mkdtemp(prefix="sparsecc-sparse-bench-"))
    print(f"threads={threads}; pattern {args.pattern}; work dir {work}", flush=True)
    rows = []
    for name in args.models:
        for batch in args.batches:
            dense = build(name, batch)
            dense_file = work / f"{name}_b{batch}.onnx"
            onnx.save(dense, str(dense_file))
            dense_art = sparsecc.compile(dense_file, output=work / f"{name}_b{batch}_dense", force=True,
                                         threads=threads)
            for s in args.sparsity:
                tag = f"{name}_b{batch}_s{int(s * 100)}"
                sparse_file = work / f"{tag}.onnx"
                onnx.save(sparsified(dense, s, args.pattern), str(sparse_file))
                art = sparsecc.compile(sparse_file, output=work / tag, force=True, threads=threads)
                layers = json.loads((art.path / "report.json").read_text())["codegen"].get("sparse_layers", [])
                chosen = sum(r["chosen"] == "sparse" for r in layers)
                inputs = work / f"{tag}_inputs.npz"
                rng = np.random.default_rng(0)
                np.savez(inputs, **{i.name: rng.standard_normal(i.shape).astype(i.dtype) for i in art.load().inputs})
                res = compare(sparse_file, {"dense": dense_art.path, "sparse": art.path}, threads, inputs,
                              args.rounds, args.runs)
                (ort_ms, dense_ms, dense_ratio), (_, sparse_ms, sparse_ratio) = res["dense"], res["sparse"]
                row = dict(model=name, batch=batch, sparsity=s, pattern=args.pattern, ort_ms=ort_ms,
                           dense_ms=dense_ms, sparse_ms=sparse_ms, sparse_vs_ort=sparse_ratio,
                           dense_vs_ort=dense_ratio, sparse_vs_dense=dense_ms / sparse_ms,
                           sparse_layers=f"{chosen}/{len(layers)}")
                rows.append(row)
                print(f"{name:>18} b{batch:<3} {s:.0%}: ORT {ort_ms:8.3f} ms  dense {dense_ms:8.3f}  sparse "
                      f"{sparse_ms:8.3f}  | sparse x ORT {sparse_ratio:5.2f}  x dense {dense_ms / sparse_ms:5.2f}"
                      f"  (layers sparse {chosen}/{len(layers)})", flush=True)
    print("\nx ORT = ORT time / sparse time; x dense = our dense time / our sparse time (higher is better)")
    print("| model | batch | sparsity | ORT ms | ours dense ms | ours sparse ms | sparse x ORT | sparse x dense "
          "| dense x ORT | sparse layers |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['sparsity']:.0%} {r['pattern']} | {r['ort_ms']:.3f} | "
              f"{r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | {r['sparse_vs_ort']:.2f} | {r['sparse_vs_dense']:.2f} | "
              f"{r['dense_vs_ort']:.2f} | {r['sparse_layers']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
