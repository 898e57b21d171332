"""The `sparsecc` command line: compile, bench, prune, sparsify, run, verify, inspect, setup, demo.

Every command reports errors as one line on stderr with the documented exit code (0 ok, 2 bad input or
usage, 3 unsupported, 4 verification failed, 1 internal error); `--debug` adds the traceback. `--json`
prints one machine-readable object on stdout for build pipelines; `compile` and `bench` also read a recipe
(`--config`, or `./sparsecc.toml`; see `config.py`) whose values any flag overrides.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import EXIT_BAD_INPUT, EXIT_INTERNAL, BadInput, SparseccError, one_line

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="sparsecc: ONNX in; pruned, sparsified, tuned, verified TVM artifacts out.")
out = Console()
err = Console(stderr=True)

ShapeOpt = Annotated[list[str] | None, typer.Option("--shape", help="Fix an input shape: NAME=d0,d1,... (repeatable).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
CriterionOpt = Annotated[str, typer.Option("--criterion", help="l1 | l2 | bn | activation | obspa")]
CalibOpt = Annotated[Path | None, typer.Option("--calib", help="Calibration samples (.npz keyed by input name, [N, ...]).")]
RoundToOpt = Annotated[int, typer.Option("--round-to", help="Keep channel counts multiples of K.", min=1)]
GlobalOpt = Annotated[bool, typer.Option("--global", help="Rank groups globally instead of a uniform ratio.")]
IgnoreOpt = Annotated[list[str] | None, typer.Option("--ignore", help="Node name to leave unpruned (repeatable).")]
MaxLayerOpt = Annotated[float, typer.Option("--max-layer-ratio", help="Never prune more than this of one group.")]
McpuOpt = Annotated[str | None, typer.Option("--mcpu", help="CPU to generate code for (e.g. cortex-a76, neoverse-n1).")]
MattrOpt = Annotated[list[str] | None, typer.Option("--mattr", help="CPU feature, e.g. +neon, +dotprod (repeatable).")]
ArchOpt = Annotated[str | None, typer.Option("--arch", help="GPU architecture for cuda: sm_80 | sm_86 | sm_89 | sm_90.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Compute dtype: float32 | float16 | bfloat16 (GPU targets).")]
PatternOpt = Annotated[str, typer.Option("--pattern", help="unstructured | block:RxC (e.g. block:4x4) | N:M (e.g. 2:4)")]
PruneOpt = Annotated[float | None, typer.Option("--prune", help="Remove this ratio of channels (0..1).")]
SparsityOpt = Annotated[float | None, typer.Option("--sparsity", help="Zero this fraction of weights (0..1).")]
ThreadsOpt = Annotated[int | None, typer.Option(help="Runtime threads (default: physical cores).", min=1)]
TuneOpt = Annotated[int, typer.Option("--tune", help="MetaSchedule trials (0: default schedules).", min=0)]
TuneDbOpt = Annotated[Path | None, typer.Option("--tune-db", help="Tuning database directory.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="Recipe (TOML); default ./sparsecc.toml if present. "
                                                "Command-line flags override it.")]
NoConfigOpt = Annotated[bool, typer.Option("--no-config", help="Ignore ./sparsecc.toml.")]


AttentionOpt = Annotated[str, typer.Option("--attention", help=(
    "What attention layers lose: auto (head dims when a layer has fewer than 8 heads, else whole heads) | "
    "heads | head_dims (the same dims of every head)."))]


def _prune_options(criterion: str, round_to: int, global_: bool, ignore: list[str] | None,
                   max_layer_ratio: float, attention: str = "auto") -> dict[str, Any]:
    return {"criterion": criterion, "round_to": round_to, "global_ranking": global_,
            "ignore": tuple(ignore or ()), "max_layer_ratio": max_layer_ratio, "attention": attention}


def _target_options(mcpu: str | None, mattr: list[str] | None, arch: str | None, dtype: str) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if mcpu:
        opts["mcpu"] = mcpu
    if mattr:
        opts["mattr"] = tuple(mattr)
    if arch:
        opts["arch"] = arch
    if dtype != "float32":
        opts["dtype"] = dtype
    return opts


def _version(value: bool) -> None:
    if value:
        out.print(f"sparsecc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    """sparsecc: ONNX in; pruned, sparsified, tuned, verified TVM artifacts out."""


def _emit(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _verification_line(v: dict[str, Any]) -> str:
    if v.get("status") != "passed":
        reason = f" ({v['reason']})" if v.get("reason") else ""
        return f"verification: {v.get('status', 'none')}{reason}"
    return (f"verification: [green]passed[/] vs {v['reference']} — max relative error {v['max_rel_error']:.2e} "
            f"(tolerance {v['tolerance']:g})")


@app.command("compile")
def compile_cmd(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="The ONNX model.")],
    target: Annotated[str, typer.Option("--target", "-t", help=(
        "cpu (host x86-64), arm64, wasm, cuda (or a tag such as nvidia/nvidia-h100), or a TVM target as JSON; "
        "several, comma-separated, give one artifact each (-o OUT: OUT/<target>)."))] = "cpu",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Artifact directory.")] = None,
    shape: ShapeOpt = None,
    batch: Annotated[int, typer.Option(help="Value for a dynamic leading batch dim.", min=1)] = 1,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check the artifact against ONNX Runtime.")] = True,
    inputs: Annotated[Path | None, typer.Option("--inputs", help="Verification inputs (.npz keyed by input name).")] = None,
    tolerance: Annotated[float | None, typer.Option(help=(
        "Max relative error vs ONNX Runtime (default 1e-4; the target may loosen it, e.g. fp16 on GPUs)."))] = None,
    threads: ThreadsOpt = None,
    tune: TuneOpt = 0,
    tune_db: TuneDbOpt = None,
    dump_dir: Annotated[Path | None, typer.Option("--dump-dir", help="Write the ONNX model after every pass.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    prune: PruneOpt = None,
    criterion: CriterionOpt = "l1",
    calib: CalibOpt = None,
    round_to: RoundToOpt = 1,
    global_: GlobalOpt = False,
    ignore: IgnoreOpt = None,
    max_layer_ratio: MaxLayerOpt = 0.9,
    attention: AttentionOpt = "auto",
    sparsity: SparsityOpt = None,
    pattern: PatternOpt = "unstructured",
    sweep: Annotated[bool, typer.Option("--sweep/--no-sweep", help="With --calib: report fidelity vs ratio "
                                        "(re-runs each prune/sparsify pass at other ratios).")] = True,
    mcpu: McpuOpt = None,
    mattr: MattrOpt = None,
    arch: ArchOpt = None,
    dtype: DtypeOpt = "float32",
    config: ConfigOpt = None,
    no_config: NoConfigOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Compile MODEL for one or more targets into verified artifact directories."""
    from .compiler import compile as compile_model
    from .compiler import compile_targets, split_targets

    p, recipe = _with_recipe(ctx, config, no_config)
    if recipe and not (p["quiet"] or p["as_json"]):
        err.print(f"recipe {recipe.path}", highlight=False)
    kwargs = {**_recipe_options(p), "batch": p["batch"], "verify": p["verify"], "inputs": _str(p["inputs"]),
              "tolerance": p["tolerance"], "dump_dir": _str(p["dump_dir"]), "force": p["force"],
              "quiet": p["quiet"] or p["as_json"], "sweep": p["sweep"]}
    targets = split_targets(p["target"])
    if len(targets) == 1:
        artifacts = [compile_model(str(model), target=targets[0], output=p["output"], **kwargs)]
    else:
        artifacts = compile_targets(str(model), targets, output=p["output"], **kwargs)
    records = [_artifact_record(a) for a in artifacts]
    if as_json:
        extra = {"config": str(recipe.path) if recipe else None}
        _emit({**records[0], **extra} if len(targets) == 1 else {"status": "ok", "artifacts": records, **extra})
        return
    if not p["quiet"]:
        for a in artifacts:
            out.print(f"[bold]artifact[/] {a.path}  (target {a.manifest['target']['name']})")
            out.print(_verification_line(a.manifest["verification"]))
            out.print(f"report: {_artifact_record(a)['report']}")


def _artifact_record(artifact: Any) -> dict[str, Any]:
    from .report import REPORT_HTML

    m = artifact.manifest
    return {"status": "ok", "artifact": str(artifact.path), "target": m["target"], "inputs": m["inputs"],
            "outputs": m["outputs"], "verification": m["verification"], "timings": m["timings"],
            "report": str(artifact.path / REPORT_HTML)}


def _str(path: Path | None) -> str | None:
    return str(path) if path else None


def _recipe_options(p: dict[str, Any]) -> dict[str, Any]:
    """Compile options shared by `compile` and `bench`, from (recipe-merged) command-line parameters."""
    return {"shapes": p["shape"] or [], "threads": p["threads"], "tune": p["tune"], "tune_db": _str(p["tune_db"]),
            "prune": p["prune"],
            "prune_options": _prune_options(p["criterion"], p["round_to"], p["global_"], p["ignore"],
                                            p["max_layer_ratio"], p["attention"]),
            "sparsity": p["sparsity"], "pattern": p["pattern"], "calib": _str(p["calib"]),
            "target_options": _target_options(p["mcpu"], p["mattr"], p["arch"], p["dtype"])}


def _with_recipe(ctx: typer.Context, config: Path | None, no_config: bool) -> tuple[dict[str, Any], Any]:
    """The command's parameters, with the recipe's values for every one not given on the command line."""
    from .config import find_recipe

    params = dict(ctx.params)
    recipe = find_recipe(config, no_config)
    for name, value in (recipe.values.items() if recipe else ()):
        source = ctx.get_parameter_source(name)
        if name in params and (source is None or source.name in ("DEFAULT", "DEFAULT_MAP")):
            params[name] = value
    return params, recipe


@app.command("bench")
def bench_cmd(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="An ONNX model, or an artifact directory.")],
    target: Annotated[str, typer.Option("--target", "-t", help="Target to build the ONNX model for.")] = "cpu",
    batch: Annotated[list[int] | None, typer.Option("--batch", help="Batch size (repeatable; default 1).",
                                                    min=1)] = None,
    shape: ShapeOpt = None,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed calls before timing.", min=0)] = 10,
    repeat: Annotated[int, typer.Option("--repeat", help="Timed calls per engine.", min=1)] = 50,
    threads: ThreadsOpt = None,
    tune: TuneOpt = 0,
    tune_db: TuneDbOpt = None,
    prune: PruneOpt = None,
    criterion: CriterionOpt = "l1",
    calib: CalibOpt = None,
    round_to: RoundToOpt = 1,
    global_: GlobalOpt = False,
    ignore: IgnoreOpt = None,
    max_layer_ratio: MaxLayerOpt = 0.9,
    attention: AttentionOpt = "auto",
    sparsity: SparsityOpt = None,
    pattern: PatternOpt = "unstructured",
    mcpu: McpuOpt = None,
    mattr: MattrOpt = None,
    arch: ArchOpt = None,
    dtype: DtypeOpt = "float32",
    config: ConfigOpt = None,
    no_config: NoConfigOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Time ONNX Runtime vs our dense build vs our pruned/sparse build (median, p90, speedups)."""
    from .bench import bench_artifact, bench_model
    from .compiler import physical_cores, split_targets
    from .ir import parse_shape_option

    p, _ = _with_recipe(ctx, config, no_config)
    if model.is_dir():
        given = [n for n in ("prune", "sparsity", "shape") if ctx.get_parameter_source(n).name == "COMMANDLINE"]
        if given:
            raise BadInput(f"{model}: an artifact is benchmarked as built; --{given[0]} applies to ONNX models only")
        result = bench_artifact(model, p["batch"] or [], p["warmup"], p["repeat"])
    else:
        targets = split_targets(p["target"])
        if len(targets) != 1:
            raise BadInput(f"bench takes one target, got {', '.join(targets)}")
        options = _recipe_options(p)
        options["shapes"] = dict(parse_shape_option(s) for s in options["shapes"])
        threads = options.pop("threads") or physical_cores()
        if options["prune"] is None:
            options.pop("prune_options")
        result = bench_model(model, targets[0], p["batch"] or [1], p["warmup"], p["repeat"], threads, options)
    if as_json:
        _emit(result.to_json())
        return
    _print_bench(result)


def _print_bench(result: Any) -> None:
    table = Table(title=f"target {result.target}, threads {result.threads}",
                  caption=f"{result.warmup} warm-up + {result.repeat} timed calls per row; speedup = ratio of medians")
    table.add_column("engine", no_wrap=True)
    for name in ("batch", "median ms", "p90 ms", "vs ORT", "vs dense"):
        table.add_column(name, justify="right", no_wrap=True)
    for r in result.rows:
        table.add_row(r.engine, str(r.batch), f"{r.median_ms:.4g}", f"{r.p90_ms:.4g}",
                      f"{r.vs_onnxruntime:.2f}x" if r.vs_onnxruntime else "–",
                      f"{r.vs_dense:.2f}x" if r.vs_dense else "–")
    out.print(table)


@app.command("setup")
def setup_cmd(
    targets: Annotated[list[str] | None, typer.Argument(help="Targets to prepare (default: all that need tools).")] = None,
    check: Annotated[bool, typer.Option("--check", help="Only report what is missing; install nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Install or check the external tools a target needs (cross compilers, emulators, foreign runtimes)."""
    from .pipeline import known_toolchains, setup_toolchain

    results = [setup_toolchain(t, install=not check) for t in (targets or known_toolchains())]
    if as_json:
        _emit({"status": "ok", "toolchains": results})
        return
    for r in results:
        out.print(f"[green]✓[/] {r['target']}: {r['status']}" + ("" if r.get("tools") else " (nothing external)"))
        for name, path in r.get("tools", {}).items():
            out.print(f"    {name}: {path}", soft_wrap=True, highlight=False)


def _write_npz(path: Path, names: list[str], values: list[np.ndarray]) -> None:
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **dict(zip(names, values)))
    tmp.replace(path)


def _transform(model: Path, output: Path, shape: list[str] | None, batch: int | None, force: bool,
               pass_name: str, options: dict[str, Any], calib: Path | None, quiet: bool) -> dict[str, Any]:
    """Load -> fix shapes -> simplify -> one pass -> save ONNX atomically; returns before/after stats."""
    from .ir import fix_input_shapes, load_model, parse_shape_option
    from .pipeline import PassContext, make_pass
    from .stats import model_summary
    from .verify import load_calibration

    if output.exists() and not force:
        raise BadInput(f"{output}: already exists (use --force to replace it)")
    m = load_model(str(model))
    m = fix_input_shapes(m, dict(parse_shape_option(s) for s in shape or []), batch or 1)
    if calib:
        options["calib"] = load_calibration(str(calib), m.inputs)
    ctx = PassContext(quiet=quiet)
    with ctx.stage("simplify"):
        m = make_pass("simplify")(m, ctx)
    before = model_summary(m)
    p = make_pass(pass_name, **options)
    with ctx.stage(pass_name):
        result = p(m, ctx)
    after = model_summary(result)
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        result.save(tmp)
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
    return {"status": "ok", "output": str(output), "before": {k: before[k] for k in ("params", "flops", "nodes")},
            "after": {k: after[k] for k in ("params", "flops", "nodes")}, "log": ctx.log}


def _print_before_after(data: dict[str, Any]) -> None:
    b, a = data["before"], data["after"]
    table = Table("", "before", "after", "ratio")
    table.add_row("params", f"{b['params']:,}", f"{a['params']:,}", f"{a['params'] / max(b['params'], 1):.3f}")
    table.add_row("MFLOPs", f"{b['flops'] / 1e6:,.3f}", f"{a['flops'] / 1e6:,.3f}", f"{a['flops'] / max(b['flops'], 1):.3f}")
    out.print(table)
    out.print(f"wrote {data['output']}")


@app.command("prune")
def prune_cmd(
    model: Annotated[Path, typer.Argument(help="The ONNX model.")],
    ratio: Annotated[float, typer.Option("--ratio", help="Ratio of channels to remove, in [0, 1).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The pruned ONNX model.")],
    criterion: CriterionOpt = "l1",
    calib: CalibOpt = None,
    round_to: RoundToOpt = 1,
    global_: GlobalOpt = False,
    ignore: IgnoreOpt = None,
    max_layer_ratio: MaxLayerOpt = 0.9,
    attention: AttentionOpt = "auto",
    shape: ShapeOpt = None,
    batch: Annotated[int | None, typer.Option(help="Value for a dynamic leading batch dim.", min=1)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove whole coupled channel groups, physically shrinking the model."""
    options = {"ratio": ratio, **_prune_options(criterion, round_to, global_, ignore, max_layer_ratio, attention)}
    data = _transform(model, output, shape, batch, force, "prune", options, calib, quiet=as_json)
    _emit(data) if as_json else _print_before_after(data)


@app.command("sparsify")
def sparsify_cmd(
    model: Annotated[Path, typer.Argument(help="The ONNX model.")],
    sparsity: Annotated[float, typer.Option("--sparsity", help="Fraction of weights to zero, in [0, 1).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The sparsified ONNX model.")],
    pattern: PatternOpt = "unstructured",
    calib: CalibOpt = None,
    shape: ShapeOpt = None,
    batch: Annotated[int | None, typer.Option(help="Value for a dynamic leading batch dim.", min=1)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Zero weights in a pattern (zeros stay in the dense ONNX weights, so ORT still runs it)."""
    data = _transform(model, output, shape, batch, force, "sparsify", {"sparsity": sparsity, "pattern": pattern},
                      calib, quiet=as_json)
    _emit(data) if as_json else _print_before_after(data)


@app.command("run")
def run_cmd(
    artifact: Annotated[Path, typer.Argument(help="An artifact directory.")],
    inputs: Annotated[Path, typer.Option("--inputs", help=".npz keyed by input names.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write outputs to this .npz.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run an artifact on inputs from an .npz file."""
    from .runtime import load
    from .verify import load_npz

    runner = load(artifact)
    feeds = load_npz(str(inputs), runner.inputs)
    results = runner.run(feeds)
    names = [s.name for s in runner.outputs]
    if output:
        _write_npz(output, names, results)
    summary = [{"name": n, "shape": list(r.shape), "dtype": str(r.dtype)} for n, r in zip(names, results)]
    if as_json:
        _emit({"status": "ok", "outputs": summary, "written": str(output) if output else None})
    else:
        for s, r in zip(summary, results):
            out.print(f"{s['name']}: shape {s['shape']} {s['dtype']}  mean {float(np.mean(r)):.6g}")
        if output:
            out.print(f"wrote {output}")


@app.command("verify")
def verify_cmd(
    artifact: Annotated[Path, typer.Argument(help="An artifact directory.")],
    inputs: Annotated[Path | None, typer.Option("--inputs", help=".npz keyed by input names.")] = None,
    tolerance: Annotated[float | None, typer.Option(help="Default: the tolerance recorded at compile time.")] = None,
    seed: int = 0,
    as_json: JsonOpt = False,
) -> None:
    """Re-run an artifact against ONNX Runtime on its bundled model."""
    from .artifact import MODEL_FILE
    from .ir import load_model
    from .runtime import load
    from .verify import load_npz, random_inputs, require_passed, verify_against_ort

    runner = load(artifact)
    tol = tolerance if tolerance is not None else runner.manifest.verification.get("tolerance", 1e-4)
    feeds = load_npz(str(inputs), runner.inputs) if inputs else random_inputs(runner.inputs, seed)
    origin = str(inputs) if inputs else f"random(seed={seed})"
    result = verify_against_ort(load_model(artifact / MODEL_FILE), runner.run, feeds, tol, origin)
    ok = result["status"] == "passed"
    if as_json:
        _emit(result)
    else:
        for e in result["outputs"]:
            out.print(f"{e['name']}: max abs error {e['max_abs_error']:.3e}, relative {e['rel_error']:.3e}")
        out.print(f"[{'green' if ok else 'red'}]{'passed' if ok else 'FAILED'}[/] (tolerance {tol:g})")
    require_passed(result, str(artifact))


@app.command("inspect")
def inspect_cmd(
    model: Annotated[Path, typer.Argument(help="The ONNX model.")],
    shape: ShapeOpt = None,
    groups: Annotated[bool, typer.Option("--groups", help="Show prunable channel groups.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show inputs/outputs, op histogram, parameters and FLOPs per node (and channel groups)."""
    from .ir import fix_input_shapes, load_model, parse_shape_option
    from .pipeline import make_pass, run_analysis
    from .stats import model_summary, node_stats

    m = load_model(str(model))
    try:
        m = fix_input_shapes(m, dict(parse_shape_option(s) for s in shape or []))
    except BadInput:
        if shape:
            raise  # a user-given shape that does not fit is an error; otherwise show what is static
    summary, nodes = model_summary(m), node_stats(m)
    group_info = run_analysis("groups", make_pass("simplify")(m, None)) if groups else None
    if as_json:
        data = {**summary, "layers": [n.to_json() for n in nodes]}
        if groups:
            data["groups"] = group_info
        _emit(data)
        return
    out.print(f"[bold]{model}[/]  opset {summary['opset']}, {summary['nodes']} nodes, "
              f"{summary['params']:,} params, {summary['flops'] / 1e6:,.2f} MFLOPs")
    for kind in ("inputs", "outputs"):
        for s in summary[kind]:
            out.print(f"  {kind[:-1]:6} {s['name']}: {s['dtype']} {s['shape']}")
    out.print("  ops: " + ", ".join(f"{k} x{v}" for k, v in summary["ops"].items()))
    table = Table("node", "op", "output shape", "params", "MFLOPs", title="layers")
    for n in nodes:
        table.add_row(n.name, n.op, str(list(n.output_shape)), f"{n.params:,}", f"{n.flops / 1e6:.3f}")
    out.print(table)
    if groups:
        _print_groups(group_info)


def _print_groups(groups: list[dict[str, Any]]) -> None:
    table = Table("group", "channels", "params", "MFLOPs", "prunable", "members", title="channel groups")
    for g in groups:
        nodes = dict.fromkeys(str(m.get("node", m)) if isinstance(m, dict) else str(m) for m in g.get("members", []))
        members = ", ".join(nodes)
        table.add_row(str(g.get("id")), str(g.get("channels")), f"{g.get('params', 0):,}",
                      f"{g.get('flops', 0) / 1e6:.3f}", "yes" if g.get("prunable") else f"no: {g.get('reason', '')}",
                      members[:120])
    out.print(table)


@app.command("demo")
def demo_cmd(
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the demo artifact.")] = Path(
        "sparsecc-demo"),
    as_json: JsonOpt = False,
) -> None:
    """Compile a bundled trained model for this CPU, verify it, and check its accuracy."""
    from .compiler import compile as compile_model
    from .ir import load_model
    from .models import accuracy, model_path, test_data
    from .verify import run_onnxruntime

    name = "digits_cnn"
    x, y = test_data(name)
    artifact = compile_model(str(model_path(name)), target="cpu", output=output, force=True, quiet=as_json)
    runner = artifact.load()
    input_name = runner.inputs[0].name
    logits = np.concatenate([runner.run({input_name: x[i:i + 1]})[0] for i in range(len(x))])
    ref_model = load_model(str(model_path(name)))
    ref = run_onnxruntime(ref_model, {input_name: x})[0]
    result = {"model": name, "artifact": str(artifact.path), "target": artifact.manifest["target"],
              "verification": artifact.verification, "test_samples": int(len(y)),
              "accuracy_onnxruntime": accuracy(ref, y), "accuracy_sparsecc": accuracy(logits, y)}
    if as_json:
        _emit(result)
        return
    out.print(f"[bold]demo[/]: {name} -> {artifact.path} (target cpu, {artifact.manifest['target'].get('host_cpu')})")
    out.print(_verification_line(artifact.verification))
    out.print(f"accuracy on {len(y)} held-out digits: sparsecc {result['accuracy_sparsecc']:.2%}, "
              f"ONNX Runtime {result['accuracy_onnxruntime']:.2%}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, turning every error into one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        code = app(args=args, prog_name="sparsecc", standalone_mode=False)
    except typer.Abort:
        err.print("error: interrupted", highlight=False)
        sys.exit(130)
    except typer.TyperException as e:  # usage errors (exit 2); bare `sparsecc` already printed its help
        if one_line(e.format_message()):
            sys.stderr.write(f"error: {one_line(e.format_message())}\n")
        sys.exit(e.exit_code if e.exit_code else EXIT_BAD_INPUT)
    except SparseccError as e:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"error: {one_line(e)}\n")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
    except Exception as e:  # an internal error: still one line unless --debug
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"internal error: {type(e).__name__}: {one_line(e)[:500]} (rerun with --debug)\n")
        sys.exit(EXIT_INTERNAL)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
