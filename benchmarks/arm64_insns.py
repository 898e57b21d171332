"""aarch64 instructions retired per call under qemu: dense vs block-sparse kernels of one linear layer.

    python benchmarks/arm64_insns.py [--shape 768x3072] [--sparsity 0.9] [--blocks 1x4,4x1,8x1,4x4]
        [--batch 1] [--mcpu cortex-a72] [--markdown OUT.md]

qemu timings say nothing about a board, so the proxy is the instruction count. Every variant is a one-layer
Relax module (`Y[B, O] = X[B, I] @ W^T`, W [O, I] random, pruned by magnitude with the block pattern), compiled
for `--target arm64` as `sparsecc compile` would (dense: our CPU schedules; sparse: the kernel the cost model
ranks first for NEON), linked with the cross compiler and run by the artifact runner under
`qemu-aarch64-static -singlestep -d exec,nochain`, which logs one line per executed instruction. The log goes
through a pipe to a counter; loading and setup cancel out as the difference between runs with 3 and 1 calls,
on one thread. Needs `sparsecc setup arm64`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import tvm

from sparsecc.codegen import arm64
from sparsecc.codegen.lowering import compile_module
from sparsecc.codegen.sparse import cost
from sparsecc.codegen.sparse.kernels import BSRMatrix
from sparsecc.passes.sparsity_patterns import parse_pattern

CALLS = (1, 3)


def pruned_weight(o: int, i: int, sparsity: float, block: str, seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal((o, i)).astype(np.float32)
    return (w * parse_pattern(block).mask(w.astype(np.float64) ** 2, sparsity)).astype(np.float32)


def export(mod: tvm.IRModule, target: tvm.target.Target, path: Path) -> Path:
    compile_module(mod, target).export_library(str(path), fcompile=tvm.support.cc.cross_compiler(arm64.CXX))
    return path


def instructions(library: Path, x: Path, calls: int, workdir: Path) -> int:
    """Instructions the runner executes with `calls` calls of main (one thread), counted from qemu's log."""
    fifo = workdir / f"{library.stem}-{calls}.fifo"
    os.mkfifo(fifo)
    count = [0]

    def counter() -> None:
        with open(fifo, "rb") as f:
            while chunk := f.read(1 << 22):
                count[0] += chunk.count(b"\n")  # with -singlestep every line is one `Trace` line

    reader = threading.Thread(target=counter)
    reader.start()
    cmd = [arm64.QEMU, "-L", str(arm64.SYSROOT), "-singlestep", "-d", "exec,nochain", "-D", str(fifo),
           str(arm64.runner_binary()), str(library), "--repeat", str(calls), "--out", str(workdir), str(x)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=arm64.runner_env(threads=1))
    reader.join()
    if proc.returncode:
        raise SystemExit(f"runner failed: {proc.stderr.strip()[-300:]}")
    return count[0]


def per_call(library: Path, x: Path, workdir: Path) -> int:
    low, high = (instructions(library, x, n, workdir) for n in CALLS)
    return round((high - low) / (CALLS[1] - CALLS[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="768x3072", help="IxO: inputs x outputs")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--blocks", default="1x4,4x1,8x1,4x4", help="RxC blocks of W [O, I]")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--mcpu", default=arm64.DEFAULT_MCPU)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    arm64.require_toolchain()
    i, o = (int(v) for v in args.shape.split("x"))
    target = arm64.arm64_target(args.mcpu).target()
    lanes = cost.vector_lanes(target)
    rows = []
    with tempfile.TemporaryDirectory(prefix="arm64-insns-") as tmp:
        work = Path(tmp)
        x = work / "x.npy"
        np.save(x, np.random.default_rng(1).standard_normal((args.batch, i)).astype(np.float32))
        dense_w = np.random.default_rng(0).standard_normal((o, i)).astype(np.float32)
        problem = cost.matmul_problem("dense", dense_w, args.batch)
        dense = per_call(export(cost.dense_module(problem), target, work / "dense.so"), x, work)
        rows.append(("dense", "scheduled dense", 1.0, dense, 1.0))
        for block in args.blocks.split(","):
            r, c = (int(v) for v in block.split("x"))
            w = pruned_weight(o, i, args.sparsity, f"block:{block}")
            best = cost.candidates(w, args.batch, lanes, [(r, c)])[0]
            mat = BSRMatrix.from_dense(w, (r, c))
            problem = cost.matmul_problem(block, w, args.batch)
            lib = export(cost.sparse_module(problem, best.spec, mat), target, work / f"bsr{block}.so")
            n = per_call(lib, x, work)
            rows.append((f"{block} @ {args.sparsity:.0%}", best.spec.label, mat.density, n, dense / n))
    lines = [f"Instructions per call, {args.shape} layer (W [{o}, {i}]), batch {args.batch}, aarch64 "
             f"{args.mcpu} +neon under qemu-aarch64 (one thread; difference of {CALLS[1]} and {CALLS[0]} calls)",
             "", "| weight | kernel | stored density | instructions | fewer than dense |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {kernel} | {density:.3f} | {count:,} | {ratio:.2f}x |"
              for name, kernel, density, count, ratio in rows]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
