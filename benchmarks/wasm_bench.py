"""WebAssembly: sparsecc's wasm artifacts vs onnxruntime-web (wasm backend, SIMD, one thread) in one node process.

    python benchmarks/wasm_bench.py [--batch 1,16] [--sparsity 0,0.7,0.9] [--pattern block:4x1]
        [--models digits_cnn,mlp768x3072] [--tune 4] [--rounds 15] [--out benchmarks/results/wasm.md]

Each model is compiled with `sparsecc compile --target wasm` per batch and sparsity (0 = dense; otherwise the
sparsify pass with `--pattern`; each layer's kernel is picked by timing the dense op and the `--tune` best
predicted sparse kernels in node, winners kept in the tuning database), verified against ONNX Runtime, and timed by
`wasm_bench.mjs` against onnxruntime-web running the artifact's own model.onnx (same weights). The mlp is the
768 -> 3072 -> 768 block of a BERT-base layer (Gemm + Relu + Gemm). onnxruntime-web is installed with npm
into `~/.cache/sparsecc/npm` (or `$SPARSECC_NPM_DIR`) on first use, never into the repository.
Prints the table (speedup = onnxruntime-web time / ours) and writes it as markdown to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx

import sparsecc
from sparsecc.models import build_mlp, model_path

HERE = Path(__file__).parent
ORT_WEB = "onnxruntime-web@1.30"


def npm_dir() -> Path:
    """A directory with node_modules/onnxruntime-web, installed on first use."""
    root = Path(os.environ.get("SPARSECC_NPM_DIR") or Path.home() / ".cache" / "sparsecc" / "npm")
    if not (root / "node_modules" / "onnxruntime-web").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        print(f"installing {ORT_WEB} into {root}", file=sys.stderr)
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(root), ORT_WEB],
                       check=True)
    return root


def source_model(name: str, work: Path) -> Path:
    if name.startswith("mlp"):
        d, h = (int(v) for v in name[3:].split("x"))
        proto = build_mlp(in_features=d, hidden=(h,), classes=d)
        proto.ir_version = 10  # onnxruntime-web 1.30 reads IR <= 13
        path = work / f"{name}.onnx"
        onnx.save(proto, path)
        return path
    return model_path(name)


def compile_case(src: Path, out: Path, batch: int, sparsity: float, pattern: str, tune: int) -> dict:
    opts = {"sparsity": sparsity, "pattern": pattern, "tune": tune} if sparsity else {}
    start = time.perf_counter()
    art = sparsecc.compile(src, target="wasm", output=out, batch=batch, force=True, **opts)
    seconds = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())["codegen"]
    layers = report.get("sparse_layers", [])
    return {"compile_s": seconds, "max_rel_error": art.verification.get("max_rel_error"),
            "sparse_layers": f"{sum(d['chosen'] == 'sparse' for d in layers)}/{len(layers)}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits_cnn,mlp768x3072")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--sparsity", default="0,0.7,0.9")
    ap.add_argument("--pattern", default="block:4x1")
    ap.add_argument("--tune", type=int, default=4, help="sparse kernels timed in node per layer (0: analytic)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=str(HERE / "results" / "wasm.md"))
    args = ap.parse_args(argv)
    ort_dir = npm_dir()
    rows = []
    with tempfile.TemporaryDirectory(prefix="sparsecc-wasm-bench-") as tmp:
        work = Path(tmp)
        cases = []
        for name in args.models.split(","):
            src = source_model(name, work)
            for batch in (int(b) for b in args.batch.split(",")):
                for sparsity in (float(s) for s in args.sparsity.split(",")):
                    label = f"{name} b{batch} s{sparsity:g}"
                    out = work / label.replace(" ", "_")
                    info = compile_case(src, out, batch, sparsity, args.pattern, args.tune)
                    print(f"compiled {label}: {info}", file=sys.stderr)
                    rows.append({"model": name, "batch": batch, "sparsity": sparsity, **info})
                    cases.append({"name": label, "artifact": str(out), "onnx": str(out / "model.onnx")})
        (work / "cases.json").write_text(json.dumps(cases))
        proc = subprocess.run(["node", str(HERE / "wasm_bench.mjs"), str(work / "cases.json")], check=True,
                              capture_output=True, text=True,
                              env={**os.environ, "ORT_WEB_DIR": str(ort_dir), "BENCH_ROUNDS": str(args.rounds)})
    for row, line in zip(rows, proc.stdout.strip().splitlines()):
        row.update(json.loads(line))
    table = format_table(rows, args.pattern)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n")
    return 0


def format_table(rows: list[dict], pattern: str) -> str:
    lines = [
        "# WebAssembly: sparsecc vs onnxruntime-web",
        "",
        f"`python benchmarks/wasm_bench.py` on {platform.processor() or platform.machine()}, "
        f"node {subprocess.run(['node', '--version'], capture_output=True, text=True).stdout.strip()}, "
        f"{ORT_WEB} (wasm backend, SIMD, 1 thread), one node process, interleaved rounds; "
        f"sparsity pattern {pattern}, sparse kernels picked by timing in node. Times are the minimum CPU time per "
        "call over the rounds (median wall time in brackets: this machine is shared); "
        "speedup = onnxruntime-web / sparsecc CPU times.",
        "",
        "| model | batch | sparsity | sparse layers | sparsecc ms | onnxruntime-web ms | speedup | max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['sparsity']:.0%} | {r['sparse_layers']} | "
            f"{r['ours_ms']:.3f} ({r['ours_wall_ms']:.3f}) | {r['ort_ms']:.3f} ({r['ort_wall_ms']:.3f}) | "
            f"**{r['ort_ms'] / r['ours_ms']:.2f}x** | {r['max_abs_diff']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
