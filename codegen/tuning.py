"""MetaSchedule tuning of the fused TIR functions, with a persistent per-target JSON database.

Runs between legalization+fusion and the default CPU schedules: `tuning_passes(target, trials, db_dir)`
tunes the functions the database has no record for (when `trials > 0`; each function's default schedule and
the default rule's other register tiles are measured and recorded first, so the search starts from the best
of them and has to beat it), then applies every record it has,
marking those functions scheduled so the default rules leave them alone. A second compile of the same model
finds all its functions in the database and tunes nothing. Candidates are timed with cold caches
(`EVALUATOR`), as they run inside a model.

Candidates are built in children forked from this process (`ForkBuilder`), each within a time limit:
MetaSchedule's `LocalBuilder` starts a worker pool per batch whose build function imports
`tvm.s_tir.tensor_intrin` (~46 s here), which makes tuning crawl.
Records are keyed by the structural hash of each PrimFunc as fusion emits it (attributes included), so the
functions are tuned and looked up in exactly the same form.

The database is shared by every compile for the target, possibly at once: each access holds a lock file in
its directory (exclusive while tuning, since MetaSchedule numbers workloads by their line in the file), and a
line that does not load (a truncated write, a foreign or hand-edited record) is dropped with a warning
before TVM reads the files, because TVM's loader aborts on the first bad line.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from . import cpu_schedule
from .cpu_schedule import schedule_variants

TUNING_LOG = "tuning_log.txt"
WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"


@functools.cache
def _rules_digest() -> str:
    """A digest of the default CPU schedule rules' source and of how candidates are timed (`EVALUATOR`). A
    record only had to beat the defaults of its day, timed the way of its day, and a database's records are
    applied on every later compile: after the defaults improve, an old record would pin a function to a
    schedule slower than the new default (register tiles that spilled to the workspace pool, before
    `cpu_schedule.STACK_TILE_BYTES`, ran 5-25% slower than today's defaults)."""
    timing = repr(EVALUATOR).encode()  # (a named tuple: every field, by name)
    return hashlib.sha256(Path(cpu_schedule.__file__).read_bytes() + timing).hexdigest()[:16]


def default_db_dir(target: tvm.target.Target) -> Path:
    """`~/.cache/sparsecc/tuning/<hash>` (or `$SPARSECC_TUNING_DIR/<hash>`), the hash of the target and of the
    default schedule rules (`_rules_digest`): new rules start a new database."""
    base = os.environ.get("SPARSECC_TUNING_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    key = hashlib.sha256(json.dumps([str(target), _rules_digest()]).encode()).hexdigest()[:16]
    return Path(base) / ("" if os.environ.get("SPARSECC_TUNING_DIR") else "sparsecc/tuning") / key


def database_exists(db_dir: str | Path) -> bool:
    return (Path(db_dir) / RECORDS).is_file()


@contextmanager
def locked(db_dir: str | Path) -> Iterator[Path]:
    """Hold the database directory's lock (one reader or writer at a time across processes)."""
    path = Path(db_dir)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def _load_workload(line: str) -> ms.database.Workload | None:
    """The workload on `line`, or None when TVM's loader would abort on it."""
    try:
        return ms.database.Workload.from_json(json.loads(line))
    except Exception:  # noqa: BLE001 - any failure means TVM's loader would abort on this line
        return None


def _load_record(line: str, workloads: dict[int, tuple[int, ms.database.Workload]]) -> str | None:
    """The record on `line` renumbered to its workload's new index, or None when it would not load."""
    try:
        index, record = json.loads(line)
        new_index, workload = workloads[index]
        ms.database.TuningRecord.from_json(record, workload)
        return json.dumps([new_index, record], separators=(",", ":"))
    except Exception:  # noqa: BLE001
        return None


def repair_database(db_dir: str | Path) -> int:
    """Drop every line TVM's loader would abort on (and records of dropped workloads); returns lines dropped.
    Call with the lock held."""
    path = Path(db_dir)
    old_workloads = _lines(path / WORKLOADS)
    kept: list[str] = []
    workloads: dict[int, tuple[int, ms.database.Workload]] = {}
    for i, line in enumerate(old_workloads):
        if (workload := _load_workload(line)) is not None:
            workloads[i] = (len(kept), workload)
            kept.append(line)
    old_records = _lines(path / RECORDS)
    records = [r for r in (_load_record(line, workloads) for line in old_records) if r is not None]
    dropped = len(old_workloads) - len(kept) + len(old_records) - len(records)
    if dropped:
        for name, lines in ((WORKLOADS, kept), (RECORDS, records)):
            tmp = path / f".{name}.tmp"
            tmp.write_text("".join(line + "\n" for line in lines))
            tmp.replace(path / name)
        warnings.warn(f"tuning database {path}: skipped {dropped} corrupt or foreign line(s)", stacklevel=2)
    return dropped


def _stamp(path: Path) -> str:
    """Sizes and modification times of the database files ('' when there are none)."""
    return " ".join(f"{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in (path / WORKLOADS, path / RECORDS)
                    if f.is_file())


def open_database(db_dir: str | Path) -> ms.database.JSONDatabase:
    """Open (creating) the database; call with the lock held. Bad lines are dropped first."""
    path = Path(db_dir)
    path.mkdir(parents=True, exist_ok=True)
    checked = path / ".checked"  # the files' stamp when last found clean: no need to decode them again
    stamp = _stamp(path)
    if stamp and (not checked.is_file() or checked.read_text() != stamp):
        repair_database(path)
        checked.write_text(_stamp(path))
    return ms.database.JSONDatabase(
        path_workload=str(Path(db_dir) / WORKLOADS),
        path_tuning_record=str(Path(db_dir) / RECORDS),
        module_equality="structural",
    )


# A candidate that takes longer than this to build is dropped as failed. Searched schedules can unroll and
# vectorize a function into one basic block so large that LLVM's backend works on it for tens of minutes
# (ShuffleNet-v2 at batch 8: one candidate still building after 20 minutes); the default schedules of the
# largest functions here build in under 35 s.
BUILD_TIMEOUT_S = 90.0


def _build_candidate(mod: tvm.IRModule, target: tvm.target.Target, path: str) -> None:
    """Runs in a forked child: build one candidate into `path`; a failure's message goes to `path`.err."""
    try:
        mod = tvm.s_tir.transform.RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
        tvm.compile(mod, target=target).export_library(path, fcompile=tvm.support.tar.tar)
    except Exception as e:  # noqa: BLE001 - a failed candidate is reported, not raised
        Path(path + ".err").write_text(f"{type(e).__name__}: {e}"[:2000])
        raise SystemExit(1) from None


@derived_object
class ForkBuilder(ms.builder.PyBuilder):
    """Builds candidates in children forked from this process, one per core at a time, each within
    `BUILD_TIMEOUT_S` (see the module docstring for why not `LocalBuilder`: a fork starts with TVM loaded)."""

    def build(self, build_inputs: list[ms.builder.BuilderInput]) -> list[ms.builder.BuilderResult]:
        fork = multiprocessing.get_context("fork")
        workers = max(1, len(os.sched_getaffinity(0)))
        results: list[ms.builder.BuilderResult | None] = [None] * len(build_inputs)
        pending = list(enumerate(build_inputs))
        running: dict[int, tuple] = {}
        while pending or running:
            while pending and len(running) < workers:
                i, bi = pending.pop(0)
                # One directory per candidate: MetaSchedule removes it once the candidate has run.
                path = os.path.join(tempfile.mkdtemp(prefix="sparsecc-ms-"), "candidate.tar")
                child = fork.Process(target=_build_candidate, args=(bi.mod, bi.target, path), daemon=True)
                with warnings.catch_warnings():  # Python 3.12+ warns on fork beside threads; the child only builds
                    warnings.simplefilter("ignore", DeprecationWarning)
                    child.start()
                running[i] = (child, path, time.monotonic() + BUILD_TIMEOUT_S)
            soonest = min(deadline for _, _, deadline in running.values())
            multiprocessing.connection.wait([c.sentinel for c, _, _ in running.values()],
                                            timeout=max(0.0, soonest - time.monotonic()))
            for i, (child, path, deadline) in list(running.items()):
                if child.exitcode is None and time.monotonic() < deadline:
                    continue
                del running[i]
                if child.exitcode is None:
                    child.kill()
                    error = f"build took longer than {BUILD_TIMEOUT_S:g} s"
                elif child.exitcode == 0 and os.path.isfile(path):
                    error = None
                else:
                    err = Path(path + ".err")
                    error = err.read_text() if err.is_file() else f"build exited with code {child.exitcode}"
                child.join()
                if error:
                    shutil.rmtree(os.path.dirname(path), ignore_errors=True)
                results[i] = ms.builder.BuilderResult(None if error else path, error)
        return results


@derived_object
class TuningProgress(ms.measure_callback.PyMeasureCallback):
    """Trials done, of how many, and the best time so far, beside the build stage's spinner."""

    def __init__(self, total: int, names: list[str]):
        self.total, self.names, self.done, self.best = total, names, 0, float("inf")

    def apply(self, _scheduler, task_id: int, candidates, _builder_results, runner_results) -> None:
        from sparsecc.pipeline import report_progress

        self.done += len(candidates)
        for r in runner_results:
            if r.run_secs:
                self.best = min(self.best, float(sum(float(s) for s in r.run_secs) / len(r.run_secs)))
        best = f", best {self.best * 1e6:.0f} us" if self.best < float("inf") else ""
        report_progress(f"tuning {self.names[task_id]}: {min(self.done, self.total)}/{self.total} trials{best}")


def _tasks(mod: tvm.IRModule) -> dict[str, tvm.IRModule]:
    """The unscheduled PrimFuncs, each as the one-function module MetaSchedule tunes and looks up."""
    tasks: dict[str, tvm.IRModule] = {}
    seen: set[int] = set()
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
            continue
        task = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
        h = tvm_ffi.structural_hash(task)
        if h not in seen:
            seen.add(h)
            tasks[gv.name_hint] = task
    return tasks


def tune(mod: tvm.IRModule, target: tvm.target.Target, trials: int, db_dir: str | Path) -> int:
    """Tune the functions of `mod` missing from the database with `trials` trials in all; returns tasks tuned."""
    with locked(db_dir):
        return _tune_locked(mod, target, trials, db_dir)


def _use_threads(n: int) -> None:
    """Runs in the measuring worker before its thread pool starts: time candidates with the threads the
    artifact will run with."""
    os.environ["TVM_NUM_THREADS"] = str(n)


# How candidates are timed: each call with its weights and output flushed from the caches (all arguments but
# the first, the input, which the producing layer has just written), as they are inside a model. MetaSchedule's
# default runs a function again and again for 100 ms with everything in cache; there the default rule's other
# register tiles and searched schedules measured level with or 1-3% faster than the default, and inside
# DenseNet-121 the same functions ran 20-30% slower (its 28x28 1x1 convs 0.23 -> 0.29 ms, Winograd batched
# matmuls 1.2 -> 1.6 ms): the tuned model 4.5% slower than the untuned one. Timed flushed, they rank as they
# do in the model (the 1x1 conv 227 against 267 us, where cached timing gave 215 / 215).
EVALUATOR = ms.runner.EvaluatorConfig(number=1, repeat=16, min_repeat_ms=0, enable_cpu_cache_flush=True)


def _search() -> ms.search_strategy.SearchStrategy:
    """Evolutionary search on a smaller population than MetaSchedule's default (512 over 4 generations):
    on a few cores, evolving the population costs more than building and timing the candidates it picks."""
    return ms.search_strategy.EvolutionarySearch(population_size=128, init_min_unmeasured=32, genetic_num_iters=2)


def _tune_locked(mod: tvm.IRModule, target: tvm.target.Target, trials: int, db_dir: str | Path) -> int:
    db = open_database(db_dir)
    todo = {name: task for name, task in _tasks(mod).items() if not db.has_workload(task)}
    if not todo or trials <= 0:
        return 0
    names = list(todo)
    contexts = [
        ms.TuneContext(mod=todo[n], target=target, space_generator="post-order-apply",
                       search_strategy=_search(), task_name=n, num_threads="physical").clone()
        for n in names
    ]
    threads = target.attrs.get("num-cores")
    runner = ms.runner.LocalRunner(evaluator_config=EVALUATOR,
                                   initializer=functools.partial(_use_threads, int(threads)) if threads else None)
    builder = ForkBuilder()
    _commit_defaults(todo, target, db, builder, runner)
    try:
        import xgboost  # noqa: F401

        cost_model = "xgb"
    except ImportError:
        cost_model = "random"
    per_iter = max(1, min(64, trials // max(1, len(names)) or 1))
    ms.tune.tune_tasks(
        tasks=contexts,
        task_weights=[1.0] * len(contexts),
        work_dir=str(db_dir),
        max_trials_global=max(trials, len(names)),
        num_trials_per_iter=per_iter,
        builder=builder,
        runner=runner,
        database=db,
        cost_model=cost_model,
        measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"),
                           TuningProgress(max(trials, len(names)), names)],
    )
    return len(names)


def _commit_defaults(tasks: dict[str, tvm.IRModule], target: tvm.target.Target, db: ms.database.Database,
                     builder: ms.builder.Builder, runner: ms.runner.Runner) -> None:
    """Measure each task's default schedule, and its other register tiles, like any candidate and record
    them: the search starts from the best, and a tuned schedule replaces it only where it measured faster,
    so tuning never slows a function down."""
    candidates = [(n, sch) for n, t in tasks.items() for sch in schedule_variants(t["main"], target)]
    built = builder.build([ms.builder.BuilderInput(sch.mod, target) for _, sch in candidates])
    runs = []
    for (name, sch), b in zip(candidates, built):
        if b.artifact_path:
            args = ms.arg_info.ArgInfo.from_prim_func(tasks[name]["main"])
            runs.append((name, sch, args, ms.runner.RunnerInput(b.artifact_path, "cpu", args)))
    futures = runner.run([r[-1] for r in runs]) if runs else []
    for (name, sch, args, ri), future in zip(runs, futures):
        result = future.result()
        shutil.rmtree(os.path.dirname(ri.artifact_path), ignore_errors=True)
        if result.run_secs and not result.error_msg:
            db.commit_tuning_record(ms.database.TuningRecord(
                sch.trace, db.commit_workload(tasks[name]), [float(s) for s in result.run_secs], target, args))


def apply_database(db_dir: str | Path) -> tvm.transform.Pass:
    """Replace every function the database has a record for by its best schedule (marked scheduled)."""

    @tvm.transform.module_pass(opt_level=0, name="SparseccApplyTuningDatabase")
    def _apply(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with locked(db_dir):
            db = open_database(db_dir)
        with db:
            return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)

    return _apply


def tuning_passes(target: tvm.target.Target, trials: int, db_dir: str | Path | None) -> list[tvm.transform.Pass]:
    """Passes to run on the fused module before the default schedules; empty when there is nothing to do."""
    path = Path(db_dir) if db_dir else default_db_dir(target)
    if trials <= 0 and not database_exists(path):
        return []

    @tvm.transform.module_pass(opt_level=0, name="SparseccMetaScheduleTune")
    def _tune(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        tune(mod, target, trials, path)
        return mod

    return ([_tune] if trials > 0 else []) + [apply_database(path)]
