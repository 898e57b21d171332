"""The shared tuning directory: bad lines are skipped with a warning, concurrent users are serialised."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.script import tirx as T

from sparsecc.codegen import tuning
from sparsecc.codegen.sparse import cost


@T.prim_func(s_tir=True)
def _add_one(a: T.Buffer((64,), "float32"), b: T.Buffer((64,), "float32")):
    T.func_attr({"global_symbol": "main", "tirx.noalias": True})
    for i in range(64):
        with T.sblock("b"):
            vi = T.axis.spatial(64, i)
            b[vi] = a[vi] + T.float32(1)


def _database(path, records: int = 3) -> tvm.IRModule:
    """A real database written by MetaSchedule's own JSONDatabase: one workload, `records` split schedules."""
    mod = tvm.IRModule({"main": _add_one})
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu"})
    with tuning.locked(path):
        db = tuning.open_database(path)
        workload = db.commit_workload(mod)
        for factor in (2, 4, 8, 16)[:records]:
            sch = tvm.s_tir.Schedule(mod)
            sch.split(sch.get_loops(sch.get_sblock("b"))[0], [None, factor])
            db.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, [1e-6 * factor], target))
    return mod


def test_corrupt_and_foreign_lines_are_skipped_with_a_warning(tmp_path):
    mod = _database(tmp_path)
    records = tmp_path / tuning.RECORDS
    lines = records.read_text().splitlines()
    lines[1] = lines[1][: len(lines[1]) // 2]  # a truncated write
    lines += ["{not json", "[7, [[]]]", '["x"]']  # garbage, a record of a workload that does not exist
    records.write_text("\n".join(lines) + "\n")
    with tuning.locked(tmp_path), pytest.warns(UserWarning, match="skipped 4 corrupt or foreign"):
        db = tuning.open_database(tmp_path)
    assert len(db) == 2
    best = db.query_tuning_record(mod, db.get_all_tuning_records()[0].target, "main")
    assert best is not None
    with tuning.locked(tmp_path):  # repaired on disk: the next open is silent
        assert tuning.repair_database(tmp_path) == 0


def test_corrupt_workload_drops_its_records_and_renumbers(tmp_path):
    _database(tmp_path, records=2)
    workloads = tmp_path / tuning.WORKLOADS
    good = workloads.read_text()
    workloads.write_text('["123", "not a module"]\n' + good)  # now the real workload is line 1
    records = tmp_path / tuning.RECORDS
    records.write_text("".join(json.dumps([1, json.loads(line)[1]]) + "\n"
                               for line in records.read_text().splitlines()))
    with tuning.locked(tmp_path), pytest.warns(UserWarning, match="skipped 1"):
        db = tuning.open_database(tmp_path)
    assert len(db) == 2  # both records kept, now pointing at workload 0


def test_users_of_one_directory_take_turns(tmp_path):
    """A second process cannot open the database while another holds it (tuning holds it throughout)."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from sparsecc.codegen import tuning
        with tuning.locked({str(tmp_path)!r}):
            print("held", flush=True)
            time.sleep(1.5)
        """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    start = time.monotonic()
    with tuning.locked(tmp_path):
        waited = time.monotonic() - start
    holder.wait(timeout=30)
    assert waited > 0.8


def test_concurrent_decision_records_stay_readable(tmp_path):
    """Two processes appending measured decisions at once: every line is whole and readable afterwards."""
    script = textwrap.dedent(f"""
        import numpy as np, tvm
        from sparsecc.codegen.sparse import cost
        target = tvm.target.Target({{"kind": "llvm", "mtriple": "x86_64-linux-gnu"}})
        cache = cost.DecisionCache(__import__("pathlib").Path({str(tmp_path)!r}) / cost.DECISIONS)
        w = np.zeros((16, 16), np.float32); w[::4, ::4] = 1
        for i in range(150):
            d = cost.LayerDecision("l", "MatMul", (1, 16, 16), 0.9, "sparse", None, cost.Timing(2.0, 2.5))
            d.candidates = cost.candidates(w, 1, 8, [(4, 1)])
            d.best = d.candidates[0]
            d.best.timing = cost.Timing(1.0, 1.5)
            cache.store(f"{{__import__('os').getpid()}}-{{i}}" + "x" * 2000, d)
        """)
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(2)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    lines = (tmp_path / cost.DECISIONS).read_text().splitlines()
    assert len(lines) == 300 and all(json.loads(line)["decision"]["chosen"] == "sparse" for line in lines)


def test_cached_decision_is_reused_and_garbage_is_skipped(tmp_path):
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"})
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((128, 128)) * (rng.random((128, 128)) < 0.1)).astype(np.float32)
    problem = cost.matmul_problem("fc", w, 1)
    opts = {"cache_dir": str(tmp_path), "repeat": 2, "number": 2, "measure_top": 1, "threads": 1,
            "record_when_busy": True}
    first = cost.decide(problem, target, opts)
    assert first.dense is not None and first.best.timing is not None
    with open(tmp_path / cost.DECISIONS, "a") as f:
        f.write("{garbage\n")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        again = cost.decide(problem, target, opts)
    assert again.record() == first.record()
    other = cost.decide(cost.matmul_problem("fc", w * 2, 1), target, {**opts, "cache": True})
    assert other.dense is not None  # a different weight is measured, not looked up


def test_timings_from_an_overloaded_machine_are_not_recorded(tmp_path, monkeypatch):
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"})
    w = np.zeros((64, 128), np.float32)
    w[::4, ::8] = 1.0
    monkeypatch.setattr(cost, "machine_busy", lambda: True)
    decision = cost.decide(cost.matmul_problem("fc", w, 1), target,
                           {"cache_dir": str(tmp_path), "repeat": 1, "number": 1, "measure_top": 1, "threads": 1})
    assert decision.dense is not None  # measured and used for this compile...
    assert not (tmp_path / cost.DECISIONS).exists()  # ...but not kept for the next


def test_default_directory_follows_the_target_and_the_schedule_rules(tmp_path, monkeypatch):
    """Records beat the default schedules of their day: new default rules (or another target) get a database
    of their own, the same ones find the same directory."""
    monkeypatch.setenv("SPARSECC_TUNING_DIR", str(tmp_path))
    x86 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu"})
    arm = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})
    today = tuning.default_db_dir(x86)
    assert today.parent == tmp_path and today == tuning.default_db_dir(x86) != tuning.default_db_dir(arm)
    monkeypatch.setattr(tuning, "_rules_digest", lambda: "new rules")
    assert tuning.default_db_dir(x86) != today


def test_candidates_are_timed_with_cold_caches_and_that_keys_the_directory(monkeypatch):
    """Candidates are timed one call at a time with all but the input flushed from the caches (as inside a
    model, not as in a hot loop), and records timed another way belong to another directory."""
    assert tuning.EVALUATOR.enable_cpu_cache_flush and tuning.EVALUATOR.number == 1
    assert tuning.EVALUATOR.min_repeat_ms == 0 and tuning.EVALUATOR.repeat > 1
    x86 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu"})
    tuning._rules_digest.cache_clear()
    today = tuning.default_db_dir(x86)
    monkeypatch.setattr(tuning, "EVALUATOR", ms.runner.EvaluatorConfig())  # MetaSchedule's hot loop
    tuning._rules_digest.cache_clear()
    try:
        assert tuning.default_db_dir(x86) != today
    finally:
        monkeypatch.undo()
        tuning._rules_digest.cache_clear()
    assert tuning.default_db_dir(x86) == today


def test_candidates_build_in_parallel_within_a_time_limit(monkeypatch):
    """A candidate whose build does not end (LLVM on one huge basic block) is dropped after `BUILD_TIMEOUT_S`,
    its child killed; one that fails or crashes reports why; the others build."""

    def candidate(flag: str) -> tvm.IRModule:
        return tvm.IRModule({"main": _add_one.with_attr(flag, True) if flag else _add_one})

    compile_ = tvm.compile

    def flaky_compile(mod, target):
        attrs = mod["main"].attrs
        if attrs.get("stuck", False):
            time.sleep(600)
        if attrs.get("broken", False):
            raise RuntimeError("no code for this candidate")
        if attrs.get("crash", False):
            os.kill(os.getpid(), signal.SIGSEGV)
        return compile_(mod, target=target)

    monkeypatch.setattr(tvm, "compile", flaky_compile)
    monkeypatch.setattr(tuning, "BUILD_TIMEOUT_S", 3.0)
    x86 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu"})
    flags = ["", "stuck", "broken", "crash", ""]
    start = time.monotonic()
    results = tuning.ForkBuilder().build([ms.builder.BuilderInput(candidate(f), x86) for f in flags])
    assert time.monotonic() - start < 30
    assert results[0].error_msg is None and results[0].artifact_path.endswith(".tar")
    assert results[4].error_msg is None and results[4].artifact_path != results[0].artifact_path
    assert results[1].artifact_path is None and "longer than 3 s" in results[1].error_msg
    assert results[2].artifact_path is None and results[2].error_msg == "RuntimeError: no code for this candidate"
    assert results[3].artifact_path is None and str(-signal.SIGSEGV) in results[3].error_msg
    assert not multiprocessing.active_children()  # the stuck build was killed and reaped
