"""`sparsecc.compile`: the whole pipeline from an ONNX model to a verified artifact directory.

load -> fix input shapes -> simplify -> requested passes (prune, sparsify, ...) -> codegen for the target ->
artifact (written to a temp dir) -> verification against ONNX Runtime -> report (json, html) -> manifest ->
atomic rename. `compile_targets` runs the ONNX passes once and then codegen for each of several targets.
"""

from __future__ import annotations

import functools
import os
import platform
from contextlib import ExitStack
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
from .report import REPORT_HTML, build_report, ratio_sweep, render_html
from .runtime import Runner
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
    sweep: bool = True  # with calibration data: report fidelity vs ratio (each pass re-run at other ratios)
    simplify: bool = True
    verify: bool = True
    inputs: dict[str, np.ndarray] | str | None = None
    tolerance: float | None = None  # default: DEFAULT_TOLERANCE, or looser where the target says (fp16)
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


def _verify(model: Model, runner: Runner, opts: CompileOptions, target_tolerance: float | None = None) -> dict[str, Any]:
    if isinstance(opts.inputs, str):
        feeds = load_npz(opts.inputs, model.inputs)
        origin = opts.inputs
    elif opts.inputs is not None:
        feeds = {k: np.asarray(v) for k, v in opts.inputs.items()}
        origin = "given"
    else:
        feeds = random_inputs(model.inputs, opts.seed)
        origin = f"random(seed={opts.seed})"
    tolerance = opts.tolerance if opts.tolerance is not None else max(DEFAULT_TOLERANCE, target_tolerance or 0.0)
    result = verify_against_ort(model, runner.run, feeds, tolerance, origin)
    require_passed(result, model.source)
    return result


@dataclass
class _Prepared:
    """The model after the ONNX passes, shared by every target of one compile."""

    model: Model  # what is compiled
    source: Model  # as loaded, before any pass (the report's "before")
    requested: list[tuple[str, dict[str, Any]]]
    sweep: list[dict[str, Any]]


def _prepare(model: str | Path | onnx.ModelProto, opts: CompileOptions, ctx: PassContext) -> _Prepared:
    """load -> fix shapes -> simplify -> requested passes (and the fidelity sweep when calibration data is given)."""
    with ctx.stage("load"):
        m = load_model(model)
        m = fix_input_shapes(m, opts.shapes, opts.batch)
    ctx.dump(0, "input", m)
    source = m
    requested = _passes(opts, m)
    if opts.simplify:
        m = PassManager([make_pass("simplify")]).run(m, ctx)
    simplified = m
    m = PassManager([make_pass(n, **o) for n, o in requested]).run(m, ctx, first_index=1 + int(opts.simplify))
    sweep: list[dict[str, Any]] = []
    calib = next((o["calib"] for _, o in requested if o.get("calib") is not None), None)
    if calib is not None and opts.sweep and requested:
        with ctx.stage("fidelity sweep (calibration data)"):
            sweep = ratio_sweep(simplified, requested, calib, make_pass, compiled=m)
    return _Prepared(m, source, requested, sweep)


def _build_artifact(prepared: _Prepared, backend: Any, tmp: Path, out: Path, model: Any, opts: CompileOptions,
                    threads: int, ctx: PassContext, shared_timings: int) -> Artifact:
    """Codegen for one target into `tmp` (renamed to `out` by the caller), verification, report, manifest."""
    m = prepared.model
    first = len(ctx.timings)
    (tmp / MODEL_FILE).write_bytes(m.serialize())
    build = backend.build(m, tmp, ctx)
    manifest: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "versions": _versions(),
        "target": build.target,
        "runtime": build.runtime,
        "inputs": [s.to_json() for s in m.inputs],
        "outputs": [s.to_json() for s in m.outputs],
        "source": str(model) if isinstance(model, (str, Path)) else "<ModelProto>",
        "options": {"shapes": {k: list(v) for k, v in opts.shapes.items()}, "batch": opts.batch,
                    "passes": [[n, _jsonable(o)] for n, o in prepared.requested], "threads": threads,
                    "tune": opts.tune, "target_options": _jsonable(opts.target_options)},
    }
    if opts.verify and build.cannot_run:
        manifest["verification"] = {"status": "skipped", "reason": build.cannot_run}
    elif opts.verify:
        with ctx.stage("verify vs ONNX Runtime"):
            manifest["verification"] = _verify(m, Runner(Manifest(tmp, manifest)), opts,
                                                   build.runtime.get("tolerance"))
    else:
        manifest["verification"] = {"status": "skipped"}
    with ctx.stage("report"):
        report = build_report(m, prepared.source, ctx.log, build.report, build.target, manifest["verification"],
                              manifest["versions"], prepared.sweep)
        write_json(tmp / REPORT_FILE, report)
        title = f"sparsecc report: {Path(manifest['source']).name} for {build.target.get('name')}"
        (tmp / REPORT_HTML).write_text(render_html(report, title), encoding="utf-8")
    files = {MODEL_FILE, REPORT_FILE, REPORT_HTML, *build.files}
    manifest["files"] = {f: sha256_file(tmp / f) for f in sorted(files)}
    manifest["timings"] = ctx.timings[:shared_timings] + ctx.timings[first:]
    write_json(tmp / MANIFEST, manifest)
    return Artifact(out, manifest)


def _compile_all(model: str | Path | onnx.ModelProto, targets: list[tuple[str, Path]],
                 opts: CompileOptions) -> list[Artifact]:
    """The ONNX passes once, then one artifact per (target, output); all are written, or none."""
    threads = opts.threads or physical_cores()
    outs = [out for _, out in targets]
    if len(set(outs)) != len(outs):
        raise BadInput(f"two targets would write the same artifact: {', '.join(map(str, outs))}")
    for out in outs:
        check_output(out, opts.force)  # fail before the expensive work; checked again at the rename
    ctx = PassContext(options={"threads": threads}, quiet=opts.quiet,
                      dump_dir=Path(opts.dump_dir) if opts.dump_dir else None)
    backends = [make_backend(t, {**opts.target_options, "threads": threads, "tune": opts.tune,
                                 "tune_db": opts.tune_db}) for t, _ in targets]
    prepared = _prepare(model, opts, ctx)
    shared = len(ctx.timings)
    with ExitStack() as stack:
        tmps = [stack.enter_context(atomic_directory(out, force=opts.force)) for out in outs]
        return [_build_artifact(prepared, backend, tmp, out, model, opts, threads, ctx, shared)
                for backend, tmp, out in zip(backends, tmps, outs)]


def compile(model: str | Path | onnx.ModelProto, target: str = "cpu", output: str | Path | None = None,
            **options: Any) -> Artifact:
    """Compile an ONNX model (path or ModelProto) for `target` into a verified artifact directory."""
    opts = CompileOptions.from_kwargs(options)
    out = Path(output) if output is not None else _default_output(model, target)
    return _compile_all(model, [(target, out)], opts)[0]


def split_targets(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """`cpu,arm64,wasm` -> ['cpu', 'arm64', 'wasm']; commas inside a JSON target do not split it."""
    if not isinstance(spec, str):
        return [t for s in spec for t in split_targets(s)]
    parts, depth, current = [], 0, ""
    for ch in spec:
        depth += {"{": 1, "[": 1, "}": -1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    targets = [p.strip() for p in parts if p.strip()]
    if not targets:
        raise BadInput(f"--target '{spec}': no target given")
    return targets


def target_dir_name(target: str, taken: set[str]) -> str:
    """The folder name of one target's artifact under a multi-target output (`raw`, `raw-2` for JSON targets)."""
    base = "raw" if target.lstrip().startswith("{") else "".join(
        c if c.isalnum() or c in "-_" else "_" for c in target)[:40]
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    taken.add(name)
    return name


def compile_targets(model: str | Path | onnx.ModelProto, targets: str | list[str],
                    output: str | Path | None = None, **options: Any) -> list[Artifact]:
    """Compile for several targets (a list, or `"cpu,arm64,wasm"`), running the ONNX passes once. With
    `output`, artifacts go to `output/<target>`; without it, each to its default `<model>-<target>.sparsecc`.
    All artifacts are written, or none."""
    opts = CompileOptions.from_kwargs(options)
    names = split_targets(targets)
    taken: set[str] = set()
    outs = [Path(output) / target_dir_name(t, taken) if output is not None else _default_output(model, t)
            for t in names]
    return _compile_all(model, list(zip(names, outs)), opts)


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
    def summary(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            return f"<array {list(v.shape)}>"
        if isinstance(v, dict):
            arrays = any(isinstance(x, np.ndarray) for x in v.values())
            return f"<{len(v)} arrays>" if arrays else _jsonable(v)
        return list(v) if isinstance(v, tuple) else v

    return {k: summary(v) for k, v in options.items()}


def _versions() -> dict[str, str]:
    import tvm

    return {"sparsecc": __version__, "tvm": tvm.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}
