"""`sparsecc bench`: ONNX Runtime vs our dense build vs our pruned/sparse build, timed the same way.

Given an ONNX model, the dense model and (with a prune or sparsify recipe) the transformed one are compiled
into temporary artifacts; given an artifact, it is compared with ONNX Runtime on its bundled `model.onnx`, and
with a dense build of its source model when that file is still there and the artifact was pruned or
sparsified. Every engine gets the same seeded inputs, `warmup` untimed calls, then `repeat` timed calls;
rows report the median and p90 latency, and speedups are ratios of medians against ONNX Runtime on the
dense model and against our dense build. Timings vary with machine load: they are measurements, not results
a test may assert.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .artifact import MODEL_FILE, read_manifest
from .errors import BadInput
from .ir import Model, fix_input_shapes, load_model
from .verify import random_inputs

ORT_DENSE = "onnxruntime dense"
OURS_DENSE = "sparsecc dense"


@dataclass(frozen=True)
class Row:
    """One engine on one model at one batch size."""

    engine: str  # what ran: "onnxruntime dense", "sparsecc dense", "sparsecc prune 0.3 + sparsify 2:4" ...
    model: str  # the ONNX file or artifact it ran
    batch: int
    median_ms: float
    p90_ms: float
    vs_onnxruntime: float | None = None  # median of ORT dense / this median (> 1: faster than ORT)
    vs_dense: float | None = None  # median of our dense build / this median


@dataclass(frozen=True)
class BenchResult:
    target: str
    threads: int
    warmup: int
    repeat: int
    rows: list[Row]

    def to_json(self) -> dict[str, Any]:
        return {"status": "ok", "target": self.target, "threads": self.threads, "warmup": self.warmup,
                "repeat": self.repeat, "rows": [asdict(r) for r in self.rows]}


def time_calls(fn: Callable[[], Any], warmup: int, repeat: int) -> list[float]:
    """Milliseconds of each of `repeat` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure(engine: str, model: str, batch: int, fn: Callable[[], Any], warmup: int, repeat: int) -> Row:
    times = time_calls(fn, warmup, repeat)
    return Row(engine, model, batch, round(float(np.median(times)), 4), round(float(np.percentile(times, 90)), 4))


def with_speedups(rows: list[Row]) -> list[Row]:
    """Fill the speedup columns from the medians of the ORT-dense and our-dense rows of the same batch."""
    out = []
    for r in rows:
        ref = {x.engine: x.median_ms for x in rows if x.batch == r.batch}
        ort_ms, dense_ms = ref.get(ORT_DENSE), ref.get(OURS_DENSE)
        out.append(Row(r.engine, r.model, r.batch, r.median_ms, r.p90_ms,
                       round(ort_ms / r.median_ms, 3) if ort_ms and r.median_ms else None,
                       round(dense_ms / r.median_ms, 3) if dense_ms and r.median_ms else None))
    return out


def ort_runner(model: Model, feeds: dict[str, np.ndarray], threads: int) -> Callable[[], Any]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.serialize(), opts, providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, feeds)


def recipe_label(options: dict[str, Any]) -> str:
    parts = []
    if options.get("prune") is not None:
        parts.append(f"prune {options['prune']:g}")
    if options.get("sparsity") is not None:
        parts.append(f"sparsify {options['sparsity']:g} {options.get('pattern', 'unstructured')}")
    return "sparsecc " + " + ".join(parts) if parts else OURS_DENSE


def _artifact_label(manifest: dict[str, Any]) -> str:
    passes = manifest.get("options", {}).get("passes", [])
    names = {n: o for n, o in passes}
    options = {"prune": names.get("prune", {}).get("ratio"), "sparsity": names.get("sparsify", {}).get("sparsity"),
               "pattern": names.get("sparsify", {}).get("pattern")}
    return recipe_label({k: v for k, v in options.items() if v is not None}) if names else OURS_DENSE


def bench_model(path: Path, target: str, batches: list[int], warmup: int, repeat: int, threads: int,
                options: dict[str, Any]) -> BenchResult:
    """ORT on the dense model, our dense build and (with prune/sparsity in `options`) our transformed build."""
    from .compiler import compile as compile_model

    transformed = options.get("prune") is not None or options.get("sparsity") is not None
    common = {k: v for k, v in options.items() if k not in ("prune", "sparsity", "pattern", "prune_options",
                                                            "calib")}
    rows = []
    with tempfile.TemporaryDirectory(prefix="sparsecc-bench-") as tmp:
        for batch in batches:
            dense_model = fix_input_shapes(load_model(str(path)), common.get("shapes", {}), batch)
            feeds = random_inputs(dense_model.inputs)
            rows.append(measure(ORT_DENSE, str(path), batch, ort_runner(dense_model, feeds, threads), warmup, repeat))
            builds = [(OURS_DENSE, common)] + ([(recipe_label(options), options)] if transformed else [])
            for i, (label, opts) in enumerate(builds):
                art = compile_model(str(path), target=target, output=Path(tmp) / f"b{batch}-{i}", batch=batch,
                                    threads=threads, quiet=True, **opts)
                runner = art.load()
                rows.append(measure(label, str(path), batch, lambda r=runner, f=feeds: r.run(f), warmup, repeat))
    return BenchResult(target, threads, warmup, repeat, with_speedups(rows))


def bench_artifact(path: Path, batches: list[int], warmup: int, repeat: int) -> BenchResult:
    """The artifact vs ORT on its model (and on its source model), and vs a dense build of its source model."""
    from .compiler import compile as compile_model
    from .runtime import load

    manifest = read_manifest(path).data
    runner = load(path)
    batch = runner.inputs[0].shape[0] if runner.inputs and runner.inputs[0].shape else 1
    if batches and batches != [batch]:
        raise BadInput(f"{path}: the artifact was compiled for batch {batch}; got --batch {batches}")
    threads = int(manifest["runtime"].get("threads") or manifest.get("options", {}).get("threads") or 1)
    feeds = random_inputs(runner.inputs)
    label = _artifact_label(manifest)
    source = Path(manifest.get("source", ""))
    rows = []
    if label != OURS_DENSE and source.is_file():
        opts = manifest["options"]
        shapes = {k: tuple(v) for k, v in opts.get("shapes", {}).items()}
        dense_model = fix_input_shapes(load_model(str(source)), shapes, opts.get("batch", batch))
        rows.append(measure(ORT_DENSE, str(source), batch, ort_runner(dense_model, feeds, threads), warmup, repeat))
        with tempfile.TemporaryDirectory(prefix="sparsecc-bench-") as tmp:
            dense = compile_model(str(source), target=_target_spec(manifest), output=Path(tmp) / "dense",
                                  shapes=opts.get("shapes", {}), batch=opts.get("batch", batch), threads=threads,
                                  target_options=opts.get("target_options", {}), quiet=True)
            dense_runner = dense.load()
            rows.append(measure(OURS_DENSE, str(source), batch, lambda: dense_runner.run(feeds), warmup, repeat))
        rows.append(measure(f"onnxruntime ({label.removeprefix('sparsecc ')})", str(path / MODEL_FILE), batch,
                            ort_runner(load_model(str(path / MODEL_FILE)), feeds, threads), warmup, repeat))
    else:
        rows.append(measure(ORT_DENSE, str(path / MODEL_FILE), batch,
                            ort_runner(load_model(str(path / MODEL_FILE)), feeds, threads), warmup, repeat))
    rows.append(measure(label, str(path), batch, lambda: runner.run(feeds), warmup, repeat))
    return BenchResult(manifest["target"].get("name", "?"), threads, warmup, repeat, with_speedups(rows))


def _target_spec(manifest: dict[str, Any]) -> str:
    """The `--target` that rebuilds an artifact's target (a raw TVM target as its JSON)."""
    target = manifest["target"]
    return json.dumps(target["tvm"]) if target.get("name") == "raw" else target["name"]
