"""CUDA sparse kernels on a GPU: correctness against ONNX Runtime and fp16 GEMM speed against cuBLAS and TVM.

Three steps, so that the GPU machine needs only TVM, numpy and torch (no onnx / ONNX Runtime / sparsecc deps):

  python benchmarks/cuda_sparse.py prepare DIR --arch sm_90a   # here: zoo artifacts + ORT reference outputs
  python benchmarks/cuda_sparse.py check DIR                    # on the GPU: artifacts vs the references
  python benchmarks/cuda_sparse.py bench [--quick]              # on the GPU: GEMMs, ratios printed

`bench` times, per shape Y[M, N] = X[M, K] @ W[N, K]^T in fp16: torch.matmul (cuBLAS), TVM dense (dlight),
ours 2:4 (sparse tensor cores) and ours BSR at 70% and 90% block sparsity, each checked against torch first.
Shapes: 4096^3, 768x3072 at batch 16..4096, and the four GEMMs of a BERT-base encoder layer (128 tokens x 8).
`benchmarks/cuda_device_check.sh` runs all three with one command.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ZOO_CASES = {  # artifact name -> (zoo model, compile options)
    "mlp_dense": ("digits_mlp", {}),
    "mlp_2_4": ("digits_mlp", {"sparsity": 0.5, "pattern": "2:4"}),
    "mlp_bsr": ("digits_mlp", {"sparsity": 0.9, "pattern": "block:16x1"}),
    "cnn_2_4": ("digits_cnn", {"sparsity": 0.5, "pattern": "2:4"}),
    "transformer_2_4_fp16": ("digits_transformer", {"sparsity": 0.5, "pattern": "2:4", "dtype": "float16"}),
}
BATCH = 16


def _load(name: str, path: Path):
    """Import one module by file path (not through the sparsecc package, whose deps the GPU box lacks)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ---- prepare (build machine)
def prepare(out: Path, arch: str) -> None:
    import sparsecc
    from sparsecc.models import zoo
    from sparsecc.verify import run_onnxruntime

    out.mkdir(parents=True, exist_ok=True)
    index = {}
    for case, (model, options) in ZOO_CASES.items():
        options = dict(options)
        target_options = {"arch": arch.removesuffix("a")}
        if "dtype" in options:
            target_options["dtype"] = options.pop("dtype")
        target = "nvidia/nvidia-h100" if arch == "sm_90a" else "cuda"
        if target != "cuda":
            target_options.pop("arch")
        art = sparsecc.compile(str(zoo.model_path(model)), target=target, output=out / case, force=True,
                               quiet=True, batch=BATCH, target_options=target_options, **options)
        x, labels = zoo.test_data(model)
        feeds = {zoo.INPUT_NAME: x[:BATCH]}
        from sparsecc.ir import load_model

        ref = run_onnxruntime(load_model(str(art.path / "model.onnx")), feeds)
        np.savez(out / case / "reference.npz", input=x[:BATCH], labels=labels[:BATCH], **{f"out{i}": r for i, r in
                                                                                           enumerate(ref)})
        for extra in ("model.onnx", "report.html"):  # not needed on the GPU machine; the carry is size-limited
            (art.path / extra).unlink(missing_ok=True)
        index[case] = {"tolerance": art.manifest["runtime"]["tolerance"],
                       "layers": art.manifest["runtime"]["layers"]}
        print(f"prepared {case}: {[layer['kernel'] for layer in index[case]['layers']]}")
    (out / "index.json").write_text(json.dumps(index, indent=1))


# ---- check (GPU machine)
def check(out: Path) -> bool:
    import tvm
    from tvm import relax

    dev = tvm.cuda(0)
    print(f"device: {dev.device_name} (sm_{dev.compute_version.replace('.', '')})")
    ok = True
    for case, info in json.loads((out / "index.json").read_text()).items():
        ref = np.load(out / case / "reference.npz")
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(out / case / "model.so")), dev)
        got = vm["main"](tvm.runtime.tensor(ref["input"], dev))
        got = got.numpy() if hasattr(got, "numpy") else got[0].numpy()
        want = ref["out0"]
        rel = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))
        agree = float((got.argmax(-1) == want.argmax(-1)).mean())
        passed = rel <= info["tolerance"]
        ok &= passed
        kernels = {k: sum(layer["kernel"] == k for layer in info["layers"]) for k in ("dense", "bsr", "2:4")}
        print(f"{case:24s} rel err {rel:.2e} (tol {info['tolerance']:g}) top-1 agreement {agree:.2f} "
              f"{'PASS' if passed else 'FAIL'}  kernels {kernels}")
    return ok


# ---- bench (GPU machine)
def _shapes(quick: bool) -> list[tuple[str, int, int, int]]:
    shapes = [("square 4096", 4096, 4096, 4096)]
    shapes += [(f"768x3072 b{b}", b, 768, 3072) for b in ((16, 256, 4096) if quick else (16, 64, 256, 1024, 4096))]
    tokens = 128 * 8
    shapes += [("bert qkv", tokens, 768, 2304), ("bert out", tokens, 768, 768),
               ("bert ffn1", tokens, 768, 3072), ("bert ffn2", tokens, 3072, 768)]
    return shapes


def _weights(n: int, k: int, rng) -> dict[str, np.ndarray]:
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    groups = w.reshape(n, k // 4, 4)
    keep = np.argsort(-np.abs(groups), axis=2)[:, :, :2]
    mask = np.zeros(groups.shape, bool)
    np.put_along_axis(mask, keep, True, axis=2)
    out = {"dense": w, "2:4": (groups * mask).reshape(n, k)}
    for sparsity in (0.7, 0.9):
        empty = rng.random((n // 16, k)) < sparsity  # 16x1 blocks
        out[f"bsr{int(sparsity * 100)}"] = w * ~np.repeat(empty, 16, axis=0)
    return out


def _timer(fn, dev, number: int = 20, repeat: int = 5) -> float:
    """Median over `repeat` of the mean of `number` calls, in microseconds (device synchronised)."""
    fn()
    dev.sync()
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        dev.sync()
        runs.append((time.perf_counter() - start) / number * 1e6)
    return float(np.median(runs))


def bench(quick: bool) -> None:
    import torch
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl

    kernels = _load("cuda_kernels", ROOT / "codegen" / "cuda" / "kernels.py")
    sparse = _load("sparse_kernels", ROOT / "codegen" / "sparse" / "kernels.py")
    dev = tvm.cuda(0)
    arch = "sm_" + dev.compute_version.replace(".", "")
    arch = arch + "a" if arch == "sm_90" else arch
    target = tvm.target.Target({**{k: v for k, v in tvm.target.Target("nvidia/nvidia-h100").export().items()
                                   if k in ("kind", "max_num_threads", "max_threads_per_block", "thread_warp_size",
                                            "max_shared_memory_per_block", "registers_per_block")}, "arch": arch})
    print(f"device: {dev.device_name} ({arch}); torch {torch.__version__}; times in us (median)")
    rng = np.random.default_rng(0)
    header = f"{'shape':18s} {'M':>5s} {'K':>5s} {'N':>5s} {'cuBLAS':>9s} {'TVM':>9s} {'2:4':>9s} {'bsr70':>9s} " \
             f"{'bsr90':>9s} | {'2:4/cuBLAS':>10s} {'bsr90/cuBLAS':>12s} {'2:4/TVM':>8s}"
    print(header)

    def build(func):
        with target:
            return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)

    def dense_tvm(m, k, n):
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((m, k), "float16"))
        w = relax.Var("w", relax.TensorType((k, n), "float16"))
        with bb.function("main", [x, w]):
            with bb.dataflow():
                y = bb.emit_output(relax.op.matmul(x, w))
            bb.emit_func_output(y)
        mod = bb.get()
        with target:
            mod = relax.transform.LegalizeOps()(mod)
            mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                          dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
        return relax.VirtualMachine(tvm.compile(mod, target=target), dev)

    for label, m, k, n in _shapes(quick):
        ws = _weights(n, k, rng)
        x = (rng.standard_normal((m, k))).astype(np.float16)
        xt = torch.from_numpy(x).cuda()
        times = {}
        ref = {}
        for key, w in ws.items():
            wt = torch.from_numpy(w.astype(np.float16)).cuda()
            ref[key] = (xt @ wt.T).float().cpu().numpy()
            if key == "dense":
                times["cuBLAS"] = _timer(lambda a=xt, b=wt.T: torch.matmul(a, b), dev)
        xd = tvm.runtime.tensor(x, dev)
        vm = dense_tvm(m, k, n)
        wd = tvm.runtime.tensor(np.ascontiguousarray(ws["dense"].T.astype(np.float16)), dev)
        f = vm["main"]
        times["TVM"] = _timer(lambda f=f, a=(xd, wd): f(*a), dev)
        mat = kernels.Sparse24Matrix.from_dense(ws["2:4"])
        lib = build(kernels.sparse24_matmul(m, mat, "float16", "float16"))
        args = [xd, tvm.runtime.tensor(mat.values, dev), tvm.runtime.tensor(mat.meta, dev),
                tvm.runtime.tensor(np.zeros((m, n), np.float16), dev)]
        times["2:4"] = _timer(lambda f=lib, a=args: f(*a), dev)
        _agree("2:4", args[-1].numpy(), ref["2:4"])
        for key in ("bsr70", "bsr90"):
            bsr = sparse.BSRMatrix.from_dense(ws[key].astype(np.float16), (16, 1))
            func = kernels.schedule_bsr_gpu(kernels.bsr_matmul_gpu(m, (n, k), (16, 1), bsr.nnzb, "float16", "float16"))
            blib = build(func)
            bargs = [xd, *(tvm.runtime.tensor(a, dev) for a in (bsr.data, bsr.indices, bsr.indptr)),
                     tvm.runtime.tensor(np.zeros((m, n), np.float32), dev)]
            times[key] = _timer(lambda f=blib, a=bargs: f(*a), dev, number=5, repeat=3)
            _agree(key, bargs[-1].numpy(), ref[key])
        c = times["cuBLAS"]
        print(f"{label:18s} {m:5d} {k:5d} {n:5d} {c:9.1f} {times['TVM']:9.1f} {times['2:4']:9.1f} "
              f"{times['bsr70']:9.1f} {times['bsr90']:9.1f} | {c / times['2:4']:10.2f}x {c / times['bsr90']:11.2f}x "
              f"{times['TVM'] / times['2:4']:7.2f}x")


def _agree(name: str, got: np.ndarray, want: np.ndarray) -> None:
    rel = float(np.abs(got.astype(np.float32) - want).max() / max(np.abs(want).max(), 1e-12))
    if rel > 2e-2:
        raise SystemExit(f"{name}: wrong result, relative error {rel:.3g} vs torch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("out", type=Path)
    p.add_argument("--arch", default="sm_90a")
    c = sub.add_parser("check")
    c.add_argument("out", type=Path)
    b = sub.add_parser("bench")
    b.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.cmd == "prepare":
        prepare(args.out, args.arch)
    elif args.cmd == "check":
        sys.exit(0 if check(args.out) else 1)
    else:
        bench(args.quick)


if __name__ == "__main__":
    main()
