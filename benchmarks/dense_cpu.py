"""Dense CPU benchmark: ONNX Runtime vs sparsecc artifacts (untuned, and tuned with `--tune N`).

Models: the zoo's shipped and synthetic models plus standard CNN topologies (`cnn_models.py`: ResNet-50,
DenseNet-121, Inception, MobileNet-v2, SqueezeNet, ShuffleNet-v2), at batch 1 and 8; `--models` also takes
the topologies kept out of the default list (`EXTRA_CNNS`: EfficientNet-B0, MobileNet-v3-small, ResNet-18,
VGG-11, ResNeXt-50, AlexNet, ConvNeXt-tiny, RegNetY-800MF, YOLOX-s) and paths to ONNX files (timed at their
own batch size where it is fixed, else at each of `--batches`). Every artifact is built with the real pipeline
(`sparsecc.compile(..., target="cpu")`, verified against ONNX Runtime) and run with
`sparsecc.load(...).run(...)`; ONNX Runtime gets the same thread count (`intra_op_num_threads`).

Each timing runs in its own child process, alternating ORT and ours for `--rounds` rounds; a round's ratio
compares two medians taken seconds apart, and the table reports the median ratio over rounds. Separate
processes matter: in one process, the TVM runtime's thread pool (spinning workers) and ORT's
compete for the same cores and whichever runs second is slowed. Ratio = ORT time / our time (> 1: faster).

Where gcc is available, each round also measures how long the first two CPUs take to hand each other a cache
line (`core_latency.c`, ns, printed per round as `c2c`): about 30 ns when they share an L3, about 170 ns on the
machines in results/ when a virtual machine's two CPUs sit on different core complexes, which slows both
ORT and us (by different amounts) and can change from one minute to the next.

    python benchmarks/dense_cpu.py                          # all models, batch 1 and 8, untuned
    python benchmarks/dense_cpu.py --models resnet50 --batches 1 --tune 2000
    python benchmarks/dense_cpu.py --models my_model.onnx
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cnn_models import CNNS, EXTRA_CNNS  # noqa: E402


def zoo_models(batch: int) -> dict[str, onnx.ModelProto]:
    from sparsecc.models import BUILDERS, TRAINED, model_path

    out = {"zoo_resnet_cnn": BUILDERS["resnet_cnn"](batch=batch)}
    for name in TRAINED:
        if "cnn" in name and "folded" not in name:
            out[f"zoo_{name}"] = onnx.load(str(model_path(name)))
    return out


def build(name: str, batch: int) -> onnx.ModelProto:
    if name.endswith(".onnx"):
        return onnx.load(name)
    cnns = {**CNNS, **EXTRA_CNNS}
    if name in cnns:
        return cnns[name](batch=batch)
    return zoo_models(batch)[name]


def batches_of(name: str, batches: list[int]) -> list[int]:
    """The batch sizes to time `name` at: an ONNX file whose first input fixes its leading dim has only that
    one."""
    if not name.endswith(".onnx"):
        return batches
    graph = onnx.load(name, load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    first = next(v for v in graph.input if v.name not in inits)
    dims = first.type.tensor_type.shape.dim
    return [dims[0].dim_value] if dims and dims[0].dim_value > 0 else batches


def all_names() -> list[str]:
    try:
        return list(zoo_models(1)) + list(CNNS)
    except Exception:  # noqa: BLE001 - the zoo is optional
        return list(CNNS)


_WORKER = r"""
import json, sys, time
import numpy as np
kind, path, threads, inputs, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
feeds = dict(np.load(inputs))
if kind == "ort":
    import onnxruntime as ort
    so = ort.SessionOptions(); so.intra_op_num_threads = threads; so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    run = lambda: sess.run(None, feeds)
else:
    import sparsecc
    runner = sparsecc.load(path)
    run = lambda: runner.run(feeds)
for _ in range(3):
    run()
times = []
deadline = time.perf_counter() + 20.0
for _ in range(runs):
    t = time.perf_counter(); run(); times.append(time.perf_counter() - t)
    if time.perf_counter() > deadline and len(times) >= 3:
        break
print(json.dumps(float(np.median(times))))
"""


def time_in_child(kind: str, path: Path, threads: int, inputs: Path, runs: int) -> float:
    out = subprocess.run([sys.executable, "-c", _WORKER, kind, str(path), str(threads), str(inputs), str(runs)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def latency_probe(work: Path) -> Callable[[], float | None]:
    """A function returning the first two CPUs' cache-line handoff latency in ns (`core_latency.c`), or None
    (no C compiler, one CPU)."""
    exe = work / "core_latency"
    try:
        subprocess.run(["gcc", "-O2", "-pthread", str(HERE / "core_latency.c"), "-o", str(exe)],
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return lambda: None

    def probe() -> float | None:
        try:
            return float(subprocess.run([str(exe)], capture_output=True, text=True, timeout=30, check=True).stdout)
        except (OSError, ValueError, subprocess.SubprocessError):
            return None

    return probe


def _c2c(latency: list[float | None]) -> str:
    return "/".join("?" if ns is None else f"{ns:.0f}" for ns in latency)


def compare(model_file: Path, artifacts: dict[str, Path], threads: int, inputs: Path, rounds: int,
            runs: int, probe: Callable[[], float | None]) -> tuple[dict[str, tuple[float, float, float]], list]:
    """Per variant: (ORT median ms, ours median ms, median over rounds of ORT/ours); and the CPUs' handoff
    latency before each round."""
    ort_t: list[float] = []
    ours: dict[str, list[float]] = {k: [] for k in artifacts}
    ratios: dict[str, list[float]] = {k: [] for k in artifacts}
    latency = []
    for _ in range(rounds):
        latency.append(probe())
        o = time_in_child("ort", model_file, threads, inputs, runs)
        ort_t.append(o)
        for k, art in artifacts.items():
            u = time_in_child("ours", art, threads, inputs, runs)
            ours[k].append(u)
            ratios[k].append(o / u)
    return {k: (1e3 * float(np.median(ort_t)), 1e3 * float(np.median(ours[k])), float(np.median(ratios[k])))
            for k in artifacts}, latency


def main(argv: list[str] | None = None) -> None:
    import sparsecc
    from sparsecc.compiler import physical_cores

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=None,
                    help=f"default: all of {all_names()}; also: {list(EXTRA_CNNS)} and ONNX files")
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("--tune", type=int, default=0, help="also build tuned artifacts with this many trials")
    ap.add_argument("--tune-db", default=None, help="tuning database directory (default: the user cache)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the models and artifacts in the work directory")
    args = ap.parse_args(argv)
    threads = args.threads or physical_cores()
    names = args.models or all_names()
    work = Path(tempfile.mkdtemp(prefix="sparsecc-bench-"))
    print(f"threads={threads} (ORT intra_op_num_threads={threads}); work dir {work}", flush=True)
    probe = latency_probe(work)

    rows = []
    for name in names:
        for batch in batches_of(name, args.batches):
            model = build(name, batch)
            label = Path(name).stem if name.endswith(".onnx") else name
            tag = f"{label}_b{batch}"
            model_file = work / f"{tag}.onnx"
            onnx.save(model, str(model_file))
            artifacts: dict[str, Path] = {}
            compile_s: dict[str, float] = {}
            variants = [("untuned", 0)] + ([("tuned", args.tune)] if args.tune > 0 else [])
            for variant, trials in variants:
                t = time.time()
                art = sparsecc.compile(model_file, target="cpu", output=work / f"{tag}_{variant}", force=True, batch=batch,
                                       threads=threads, tune=trials, tune_db=args.tune_db)
                compile_s[variant] = time.time() - t
                artifacts[variant] = art.path
                err = art.verification.get("max_rel_error")
            inputs = work / f"{tag}_inputs.npz"
            rng = np.random.default_rng(0)
            runner = sparsecc.load(artifacts["untuned"])
            np.savez(inputs, **{s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in runner.inputs})
            del runner
            res, latency = compare(model_file, artifacts, threads, inputs, args.rounds, args.runs, probe)
            if not args.keep:  # (VGG-11's artifacts at batch 8 take 1 GB)
                for path in (model_file, inputs, *artifacts.values()):
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
            for variant, (o, u, r) in res.items():
                rows.append(dict(model=label, batch=batch, variant=variant, ort_ms=o, ours_ms=u, ratio=r,
                                 compile_s=compile_s[variant], max_rel_error=err, c2c_ns=latency))
                print(f"{label:>18} b{batch:<2} {variant:>8}: ORT {o:9.2f} ms  ours {u:9.2f} ms  "
                      f"ratio {r:5.2f}  (compile {compile_s[variant]:.0f} s, rel err {err:.1e}, c2c ns {_c2c(latency)})",
                      flush=True)

    print("\nratio = ORT time / our time (higher is better; >1 means faster than ONNX Runtime)")
    print(f"{'model':>20} {'batch':>5} {'variant':>8} {'ORT ms':>9} {'ours ms':>9} {'ratio':>6}  c2c ns")
    for r in rows:
        print(f"{r['model']:>20} {r['batch']:>5} {r['variant']:>8} {r['ort_ms']:9.2f} {r['ours_ms']:9.2f} "
              f"{r['ratio']:6.2f}  {_c2c(r['c2c_ns'])}")
    for variant in sorted({r["variant"] for r in rows}):
        rs = [r["ratio"] for r in rows if r["variant"] == variant]
        geo = math.exp(sum(math.log(x) for x in rs) / len(rs))
        print(f"{variant}: geometric mean ratio {geo:.2f}, min {min(rs):.2f} over {len(rs)} model x batch")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": threads, "rows": rows}, indent=1))
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
