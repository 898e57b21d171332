"""Sparse kernel selection for wasm, timed where the kernels run: in node's WebAssembly engine.

The CPU cost model times candidates through the Relax VM on this host, which cannot run wasm. `NodeTuner`
plugs into the sparse rewrite as its `decide` function: the analytic model (`cost.decide`, measure off)
still filters layers and ranks the candidates; with tuning on, the dense layer and the `trials` best-ranked
sparse kernels are each built as a one-layer wasm module (`emit_artifact`) and timed together in one node
process (`timing.mjs`, interleaved rounds, minimum). The winner of every layer is stored in the persistent
tuning database of the target (`tuning.default_db_dir`, or `--tune-db`), keyed by the layer's structure and
weights, so a second compile of the same model times nothing. Without tuning, stored winners are used
where they exist and the analytic model decides the rest.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tvm

from sparsecc.errors import Unsupported, one_line

from ..sparse import cost
from ..sparse.rewrite import weight_key
from ..tuning import default_db_dir
from . import toolchain

DB_FILE = "wasm_kernels.json"
TIMING = Path(__file__).parent / "timing.mjs"
ROUNDS = 7
REVISION = 2  # part of every record's key: bumped when the kernels timed for a layer change (e.g. its im2col)


def problem_key(problem: cost.LayerProblem) -> str:
    text = json.dumps([REVISION, problem.op, repr(problem.key), list(problem.input_shape), problem.m,
                       weight_key(problem.weight)])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def time_in_node(dirs: list[Path], rounds: int = ROUNDS) -> list[float]:
    """Microseconds per call of each wasm artifact directory, timed in one node process."""
    node = toolchain.tools(("node",))["node"]
    proc = subprocess.run([node, str(TIMING), str(rounds), *map(str, dirs)], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        raise Unsupported(f"wasm tuning: node failed: {one_line(proc.stderr)[-300:]}")
    return [ms * 1000.0 for ms in json.loads(proc.stdout)]


@dataclass
class NodeTuner:
    """`decide` for `rewrite_sparse` on the wasm target (see the module docstring)."""

    target: tvm.target.Target
    trials: int = 0  # sparse candidates timed per layer (0: stored winners and the analytic model only)
    db_dir: Path | None = None
    records: dict[str, Any] = field(default_factory=dict)
    timed_layers: int = 0

    def __post_init__(self) -> None:
        self.db_dir = Path(self.db_dir) if self.db_dir else default_db_dir(self.target)
        path = self.db_dir / DB_FILE
        if path.is_file():
            try:
                self.records = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                self.records = {}  # a damaged cache is only a cache: tune again

    def __call__(self, problem: cost.LayerProblem, target: tvm.target.Target,
                 options: dict[str, Any]) -> cost.LayerDecision:
        analytic = cost.decide(problem, target, {**options, "measure": False})
        if analytic.reason != "predicted" or not analytic.candidates:
            return analytic  # filtered out (too small, not sparse enough, no block format fits)
        key = problem_key(problem)
        record = self.records.get(key)
        if record is None and self.trials > 0 and options.get("measure", True):
            record = self._measure(problem, analytic.candidates[: self.trials], key)
        return _apply(analytic, record, options) if record else analytic

    def _measure(self, problem: cost.LayerProblem, candidates: list[cost.Candidate], key: str) -> dict[str, Any]:
        from .backend import emit_artifact
        from .pack import pack_dense_weights

        with tempfile.TemporaryDirectory(prefix="sparsecc-wasm-tune-") as tmp:
            dirs, labels = [], []
            modules = [("dense", pack_dense_weights(cost.dense_module(problem), self.target))]
            modules += [(c.spec.label, cost.sparse_module(problem, c.spec, c.matrix)) for c in candidates]
            for i, (label, mod) in enumerate(modules):
                out = Path(tmp) / str(i)
                out.mkdir()
                try:
                    emit_artifact(mod, self.target, out, {})
                except Exception:  # noqa: BLE001 - a variant that fails to build is just not a candidate
                    if label == "dense":
                        raise
                    continue
                dirs.append(out)
                labels.append(label)
            times = dict(zip(labels, time_in_node(dirs)))
        self.timed_layers += 1
        record = {"layer": problem.name, "dense_us": round(times.pop("dense"), 2),
                  "tried": {k: round(v, 2) for k, v in sorted(times.items(), key=lambda kv: kv[1])}}
        if record["tried"]:  # when no sparse kernel built, do not store it: a later compiler may build them
            self.records[key] = record
            self._save()
        return record

    def _save(self) -> None:
        self.db_dir.mkdir(parents=True, exist_ok=True)
        path = self.db_dir / DB_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.records, indent=1, sort_keys=True))
        tmp.replace(path)


def _apply(decision: cost.LayerDecision, record: dict[str, Any], options: dict[str, Any]) -> cost.LayerDecision:
    """The analytic decision updated with the node timings of `record`."""
    by_label = {c.spec.label: c for c in decision.candidates}
    tried = {k: v for k, v in record.get("tried", {}).items() if k in by_label}
    if not tried:
        return decision  # recorded for kernels the cost model no longer proposes
    for label, us in tried.items():
        by_label[label].timing = cost.Timing(us, us)
    best = by_label[min(tried, key=tried.get)]
    dense_us = float(record["dense_us"])
    decision.best, decision.dense = best, cost.Timing(dense_us, dense_us)
    margin = float(options.get("margin", cost.DEFAULT_OPTIONS["margin"]))
    if options.get("force") == "sparse" or best.measured_us * margin < dense_us:
        decision.chosen = "sparse"
        decision.reason = f"node: {dense_us / best.measured_us:.2f}x faster than dense"
    else:
        decision.chosen = "dense"
        decision.reason = f"node: dense is faster ({dense_us:.1f} us vs {best.measured_us:.1f} us)"
    return decision


__all__ = ["NodeTuner", "problem_key", "time_in_node"]
