"""`sparsecc.compile`: the whole pipeline from an ONNX model to a verified artifact directory.

load -> fix input shapes -> simplify -> requested passes (prune, sparsify, ...) -> codegen for the target ->
artifact (written to a temp dir) -> verification against ONNX Runtime -> manifest -> atomic rename.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime

from . import __version__
from .artifact import (
    MANIFEST,
    MODEL_FILE,
    REPORT_FILE,
    SCHEMA_VERSION,
    Manifest,
    atomic_directory,
    check_output,
    sha256_file,
    write_json,
)
from .errors import BadInput
from .ir import Model, fix_input_shapes, load_model, parse_shape_option
from .pipeline import PassContext, PassManager, make_backend, make_pass
from .runtime import Runner
from .stats import model_summary, node_stats
from .verify import (
    DEFAULT_TOLERANCE,
    load_calibration,
    load_npz,
    random_inputs,
    require_passed,
    verify_against_ort,
)


@functools.cache
def physical_cores() -> int:
    """Physical cores (not hyper-threads) available to this process."""
    try:
        cores = set()
        block: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines() + [""]:
            if not line.strip():
                if "processor" in block and int(block["processor"]) in os.sched_getaffinity(0):
                    cores.add((block.get("physical id"), block.get("core id", block["processor"])))
                block = {}
            elif ":" in line:
                k, v = line.split(":", 1)
                block[k.strip()] = v.strip()
        return max(1, len(cores))
    except (OSError, ValueError, AttributeError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class CompileOptions:
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    batch: int = 1
    passes: tuple[tuple[str, dict[str, Any]], ...] = ()
    prune: float | None = None  # ratio of channels to remove (structured pruning pass)
    prune_options: dict[str, Any] = field(default_factory=dict)  # criterion, round_to, global_ranking, ignore...
    sparsity: float | None = None  # fraction of weights to zero (sparsify pass)
    pattern: str = "unstructured"
    sparsify_options: dict[str, Any] = field(default_factory=dict)
    calib: dict[str, np.ndarray] | str | None = None  # calibration samples for prune/sparsify
    simplify: bool = True
    verify: bool = True
    inputs: dict[str, np.ndarray] | str | None = None
    tolerance: float = DEFAULT_TOLERANCE
    seed: int = 0
    threads: int | None = None
    tune: int = 0  # MetaSchedule trials; 0 = default schedules (and tuning records already in the database)
    tune_db: str | None = None
    target_options: dict[str, Any] = field(default_factory=dict)  # mcpu, mattr, arch, dtype... (per target)
    dump_dir: str | None = None
    force: bool = False
    quiet: bool = True

    @classmethod
    def from_kwargs(cls, options: dict[str, Any]) -> CompileOptions:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise BadInput(f"unknown compile option(s) {unknown}; known: {sorted(known)}")
        opts = dict(options)
        shapes = opts.get("shapes") or {}
        if isinstance(shapes, (list, tuple)):
            shapes = dict(parse_shape_option(s) for s in shapes)
        opts["shapes"] = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        opts["passes"] = tuple((name, dict(o)) for name, o in opts.get("passes", ()))
        return cls(**opts)


@dataclass
class Artifact:
    """A compiled artifact directory and its manifest."""

    path: Path
    manifest: dict[str, Any]

    def load(self) -> Runner:
        from .runtime import load

        return load(self.path)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.load().run(feeds)

    @property
    def verification(self) -> dict[str, Any]:
        return self.manifest.get("verification", {})


def _default_output(model: Any, target: str) -> Path:
    stem = Path(model).stem if isinstance(model, (str, Path)) else "model"
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in target)[:40]
    return Path(f"{stem}-{safe}.sparsecc")


def _verify(model: Model, runner: Runner, opts: CompileOptions) -> dict[str, Any]:
    if isinstance(opts.inputs, str):
        feeds = load_npz(opts.inputs, model.inputs)
        origin = opts.inputs
    elif opts.inputs is not None:
        feeds = {k: np.asarray(v) for k, v in opts.inputs.items()}
        origin = "given"
    else:
        feeds = random_inputs(model.inputs, opts.seed)
        origin = f"random(seed={opts.seed})"
    result = verify_against_ort(model, runner.run, feeds, opts.tolerance, origin)
    require_passed(result, model.source)
    return result


def _report(model: Model, ctx: PassContext, build_report: dict[str, Any], target: dict[str, Any]) -> dict[str, Any]:
    """The deterministic machine-readable report (no timings: those live in the manifest)."""
    return {
        "model": model_summary(model),
        "target": target,
        "passes": ctx.log,
        "layers": [n.to_json() for n in node_stats(model)],
        "codegen": build_report,
    }


def compile(model: str | Path | onnx.ModelProto, target: str = "cpu", output: str | Path | None = None,
            **options: Any) -> Artifact:
    """Compile an ONNX model (path or ModelProto) for `target` into a verified artifact directory."""
    opts = CompileOptions.from_kwargs(options)
    threads = opts.threads or physical_cores()
    out = Path(output) if output is not None else _default_output(model, target)
    check_output(out, opts.force)  # fail before the expensive work; checked again at the rename
    ctx = PassContext(options={"threads": threads}, quiet=opts.quiet,
                      dump_dir=Path(opts.dump_dir) if opts.dump_dir else None)
    backend = make_backend(target, {**opts.target_options, "threads": threads, "tune": opts.tune,
                                    "tune_db": opts.tune_db})

    with ctx.stage("load"):
        m = load_model(model)
        m = fix_input_shapes(m, opts.shapes, opts.batch)
    ctx.dump(0, "input", m)
    requested = _passes(opts, m)
    passes = ([make_pass("simplify")] if opts.simplify else []) + [make_pass(n, **o) for n, o in requested]
    m = PassManager(passes).run(m, ctx)

    with atomic_directory(out, force=opts.force) as tmp:
        (tmp / MODEL_FILE).write_bytes(m.serialize())
        build = backend.build(m, tmp, ctx)
        write_json(tmp / REPORT_FILE, _report(m, ctx, build.report, build.target))
        manifest: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "versions": _versions(),
            "target": build.target,
            "runtime": build.runtime,
            "inputs": [s.to_json() for s in m.inputs],
            "outputs": [s.to_json() for s in m.outputs],
            "source": str(model) if isinstance(model, (str, Path)) else "<ModelProto>",
            "options": {"shapes": {k: list(v) for k, v in opts.shapes.items()}, "batch": opts.batch,
                        "passes": [[n, _jsonable(o)] for n, o in requested], "threads": threads,
                        "tune": opts.tune, "target_options": _jsonable(opts.target_options)},
        }
        manifest["files"] = {f: sha256_file(tmp / f) for f in sorted({MODEL_FILE, REPORT_FILE, *build.files})}
        if opts.verify and build.cannot_run:
            manifest["verification"] = {"status": "skipped", "reason": build.cannot_run}
        elif opts.verify:
            with ctx.stage("verify vs ONNX Runtime"):
                manifest["verification"] = _verify(m, Runner(Manifest(tmp, manifest)), opts)
        else:
            manifest["verification"] = {"status": "skipped"}
        manifest["timings"] = ctx.timings
        write_json(tmp / MANIFEST, manifest)
    return Artifact(out, manifest)


def _passes(opts: CompileOptions, model: Model) -> list[tuple[str, dict[str, Any]]]:
    """The requested passes: explicit ones, then pruning, then sparsity (prune first: it changes shapes)."""
    calib = opts.calib
    if isinstance(calib, str):
        calib = load_calibration(calib, model.inputs)
    extra = {"calib": calib} if calib is not None else {}
    passes = list(opts.passes)
    if opts.prune is not None:
        passes.append(("prune", {"ratio": opts.prune, **extra, **opts.prune_options}))
    if opts.sparsity is not None:
        passes.append(("sparsify", {"sparsity": opts.sparsity, "pattern": opts.pattern, **extra,
                                    **opts.sparsify_options}))
    return passes


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    """Options as recorded in the manifest: arrays (calibration data) are summarised, not embedded."""
    return {k: (f"<array {list(v.shape)}>" if isinstance(v, np.ndarray) else
                f"<{len(v)} arrays>" if isinstance(v, dict) else v) for k, v in options.items()}


def _versions() -> dict[str, str]:
    import tvm

    return {"sparsecc": __version__, "tvm": tvm.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}
