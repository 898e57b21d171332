"""Per-layer choice between the dense op and our sparse kernels, by measurement.

A layer is `Y[M, N] = rows(x)[M, K] @ W[N, K]^T` with W constant (`LayerProblem`: a matmul, or a conv whose
input rows come from a reshape or an im2col). Candidates are every BSR block shape that tiles W without
storing more than `MAX_STORED_DENSITY` of it (CSR is the 1x1 block), in each loop order of `kernels.py` with
register tiles sized for the target's vectors. An analytic cycle count (FMA throughput and latency, layout
work, cache) ranks them; the best `measure_top` are compiled and timed against the original dense op, both
as one-layer Relax modules compiled by `codegen.lowering.compile_module` - so the dense reference gets the CPU
schedules of `cpu_schedule.py` - and called through the Relax VM. Decisions use the minimum over repeats
(noise on a shared machine only adds time); sparse is kept only when it beats dense by `margin`, so sparsity
never makes a layer slower. Dense and sparse candidates are timed in alternating rounds, so bursts of load
from other processes hit them alike. Compiled one-layer modules are cached per process by layer structure.

Measured decisions persist in the target's tuning directory (`sparse_decisions.jsonl`, keyed by target,
layer, weight bytes and options): a second compile of the same model reuses them, so it is fast and writes
the same artifact, bit for bit. Timings taken on an overloaded machine are not recorded (`machine_busy`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax

from sparsecc.runtime import load_above

from .kernels import MAX_ACCUMULATOR_FLOATS, BSRMatrix, KernelSpec, bsr_matmul, kernel_arrays

# Block shapes (rows of N x columns of K) tried on every layer, widest SIMD fit first.
BLOCK_SHAPES: tuple[tuple[int, int], ...] = ((16, 1), (8, 1), (4, 4), (4, 1), (1, 4), (2, 2), (1, 1))
MAX_STORED_DENSITY = 0.6  # a format that stores more than this fraction of W cannot beat dense
DEFAULT_OPTIONS: dict[str, Any] = {
    "measure": True,  # time candidates (False: decide from the analytic model alone)
    "measure_top": 4,  # sparse candidates timed per layer
    "margin": 1.2,  # sparse must beat dense by this factor (timing noise must not flip a layer to slower)
    "min_sparsity": 0.3,  # below this zero fraction a layer is left dense without timing
    "min_params": 4096,  # smaller weights are left dense
    "blocks": BLOCK_SHAPES,
    "number": 10,
    "repeat": 9,  # interleaved rounds (dense and every candidate once per round)
    "force": None,  # tests: "sparse" takes the best sparse candidate whatever dense costs
    "threads": None,
    "cache": True,  # reuse and record measured decisions in the tuning directory
    "record_when_busy": False,  # also record decisions timed while the machine was overloaded
    "cache_dir": None,  # default: codegen.tuning.default_db_dir(target)
}
DECISIONS = "sparse_decisions.jsonl"
# Part of every cached decision's key: bump when the dense code a sparse kernel is measured against changes
# within a release (2: 3x3 convs by Winograd), so that stale dense timings are not reused.
DENSE_REVISION = 2


@dataclass(frozen=True)
class Timing:
    """Per-call time over `repeat` runs: the minimum decides (noise on a shared machine only adds time),
    the median is what reports show."""

    min_us: float
    median_us: float


@dataclass
class Candidate:
    spec: KernelSpec
    matrix: BSRMatrix
    predicted: float  # arbitrary units (vector instructions), for ranking only
    timing: Timing | None = None

    @property
    def measured_us(self) -> float | None:
        return self.timing.min_us if self.timing else None


@dataclass
class LayerDecision:
    """What the cost model decided for one layer; `record()` is what goes into the artifact report."""

    layer: str
    op: str
    shape: tuple[int, int, int]  # (M, K, N)
    sparsity: float  # fraction of exact zeros in W
    chosen: str  # "dense" | "sparse"
    best: Candidate | None
    dense: Timing | None
    candidates: list[Candidate] = field(default_factory=list)
    reason: str = ""

    @property
    def dense_us(self) -> float | None:
        return self.dense.min_us if self.dense else None

    def record(self) -> dict[str, Any]:
        spec = self.best.spec if self.best else None
        return {
            "layer": self.layer,
            "op": self.op,
            "shape": [int(d) for d in self.shape],
            "sparsity": round(float(self.sparsity), 4),
            "format": ("csr" if spec.block == (1, 1) else "bsr") if spec else "dense",
            "block": list(spec.block) if spec else None,
            "kernel": spec.label if spec else None,
            "stored_density": round(float(self.best.matrix.density), 4) if self.best else None,
            "dense_us": _round(self.dense_us),
            "sparse_us": _round(self.best.measured_us) if self.best else None,
            "dense_median_us": _round(self.dense.median_us) if self.dense else None,
            "sparse_median_us": _round(self.best.timing.median_us) if self.best and self.best.timing else None,
            "chosen": self.chosen,
            "reason": self.reason,
            "tried": [{"kernel": c.spec.label, "us": _round(c.measured_us)} for c in self.candidates
                      if c.measured_us is not None],
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 2)


def vector_lanes(target: tvm.target.Target) -> int:
    try:
        bits = int(tvm.target.codegen.llvm_get_vector_width(target))
    except Exception:  # noqa: BLE001 - non-LLVM targets
        bits = 128
    return max(4, (bits if bits > 0 else 128) // 32)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


FMA_LATENCY = 4  # cycles; with 2 FMA pipes, 8 independent accumulators keep them busy
CHAINS = 2 * FMA_LATENCY
MAX_VREGS = 16  # accumulator registers a tile may use (of 16 or 32)


def _chains(spec: KernelSpec, lanes: int) -> int:
    """Independent FMA accumulators of one block iteration (before unroll/split)."""
    r, c = spec.block
    if spec.variant == "rowvec":
        return spec.tile * math.ceil(r / lanes)
    if spec.variant == "blockvec":
        return spec.tile * math.ceil(r * c / lanes)
    return r * math.ceil(spec.tile / lanes)


def _with_chains(spec: KernelSpec, lanes: int) -> KernelSpec:
    """Add split (over block columns) and unroll (over blocks) until enough accumulators are in flight."""
    _, c = spec.block
    base = _chains(spec, lanes)
    split = 1 if spec.variant == "blockvec" else next((s for s in _divisors(c) if base * s >= CHAINS), c)
    unroll = 1
    while base * split * unroll < CHAINS and unroll < 8:
        unroll *= 2
    while unroll > 1 and replace(spec, unroll=unroll, split=split).accumulator_floats() > MAX_ACCUMULATOR_FLOATS:
        unroll //= 2
    while split > 1 and replace(spec, split=split).accumulator_floats() > MAX_ACCUMULATOR_FLOATS:
        split = max(d for d in _divisors(c) if d < split)
    return replace(spec, unroll=unroll, split=split)


X_BLOCK_BYTES = 256 * 1024  # batch rows of X per parallel task are kept within a typical L2
L1_BYTES = 48 * 1024
MIN_TASKS = 8  # parallel tasks wanted at least (row blocks x batch blocks)


def _mblock(m: int, k: int, n_blocks: int, tile: int) -> int:
    """Batch rows per task: all of them while X fits in L2 and there are tasks enough, else fewer."""
    options = [d for d in _divisors(m) if d % tile == 0]
    fits = [d for d in options if d * k * 4 <= X_BLOCK_BYTES] or options[:1]
    mb = max(fits)
    while n_blocks * (m // mb) < MIN_TASKS and any(d < mb for d in options):
        mb = max(d for d in options if d < mb)
    return 0 if mb == m else mb


def kernel_specs(block: tuple[int, int], m: int, lanes: int, k: int = 0, n: int = 0) -> list[KernelSpec]:
    """The variants worth timing for a block shape at batch m (each at most a few register tiles)."""
    specs = _kernel_specs(block, m, lanes)
    if k and n:
        out = []
        for s in specs:
            if s.variant == "blockvec":
                out.append(s)
                continue
            out.append(replace(s, mblock=_mblock(m, k, n // block[0], s.tile)))
        batchvec = [s for s in specs if s.variant == "batchvec"]
        if batchvec and m > lanes and m % lanes == 0 and k * m * 4 > L1_BYTES:
            # One vector of batch rows per task: each task's X^T slice [K, lanes] is as small as it gets.
            narrow = _with_chains(KernelSpec(block, "batchvec", lanes), lanes)
            out.append(replace(narrow, mblock=lanes))
        specs = list(dict.fromkeys(out))
    return specs


def _kernel_specs(block: tuple[int, int], m: int, lanes: int) -> list[KernelSpec]:
    r, _ = block
    vr = math.ceil(r / lanes)
    specs = []
    rows = [d for d in _divisors(m) if d * r <= MAX_ACCUMULATOR_FLOATS and d * vr <= MAX_VREGS]
    for tile in sorted({max(rows), max([d for d in rows if d <= 8] or [1])}):
        specs.append(_with_chains(KernelSpec(block, "rowvec", tile), lanes))
    c = block[1]
    if m <= 4 and c > 1 and r * c >= 4 and r * c <= lanes:
        specs.append(_with_chains(KernelSpec(block, "blockvec", m), lanes))
    if m >= 4 and r <= 8:
        lanes_ok = [d for d in _divisors(m) if r * d <= MAX_ACCUMULATOR_FLOATS and r * math.ceil(d / lanes) <= MAX_VREGS]
        full = [d for d in lanes_ok if d % lanes == 0]
        for tile in sorted(set(full[-2:] if full else lanes_ok[-1:])):
            specs.append(_with_chains(KernelSpec(block, "batchvec", tile), lanes))
    return specs


def predict(spec: KernelSpec, w: BSRMatrix, m: int, lanes: int) -> float:
    """Cycles of one call on one core, from FMA throughput and latency plus the layout work around the loop.
    Only the ranking between candidates and against `predict_dense` matters."""
    r, c = spec.block
    n, k = w.shape
    if spec.variant == "rowvec":
        per_block = c * spec.tile * math.ceil(r / lanes)
    elif spec.variant == "blockvec":
        per_block = spec.tile * math.ceil(r * c / lanes)
    else:
        per_block = c * r * math.ceil(spec.tile / lanes)
    chains = _chains(spec, lanes) * spec.unroll * spec.split
    group = per_block * spec.unroll
    per_group = max(group / 2, FMA_LATENCY * group / chains) + 2
    loop = w.nnzb / spec.unroll * per_group * (m // spec.tile)
    if spec.variant == "batchvec" and k * (spec.mblock or m) * 4 > L1_BYTES:
        loop *= 2  # X^T rows come from L2: the FMAs wait on loads
    if spec.variant == "rowvec":
        extra = n * m / min(r, lanes) + n / r * (m // spec.tile) * 4
    elif spec.variant == "blockvec":
        extra = m * k * r / lanes + n * m * c  # replicate X; sum lanes per output
    else:
        extra = m * k + m * n + n / r * (m // spec.tile) * 4  # scalar transposes in and out
    return float(loop + extra)


def predict_dense(m: int, k: int, n: int, lanes: int) -> float:
    return m * k * n / (2 * lanes) / 0.8  # well-scheduled dense reaches ~80% of FMA peak


def candidates(w: np.ndarray, m: int, lanes: int, blocks=BLOCK_SHAPES) -> list[Candidate]:
    n, k = w.shape
    out = []
    for block in blocks:
        r, c = block
        if n % r or k % c:
            continue
        mat = BSRMatrix.from_dense(w, block)
        if mat.density > MAX_STORED_DENSITY:
            continue
        for spec in kernel_specs(block, m, lanes, k, n):
            out.append(Candidate(spec, mat, predict(spec, mat, m, lanes)))
    out.sort(key=lambda c: c.predicted)
    return out


# ---------------------------------------------------------------------------------------------- timing

_RUNNERS: dict[tuple, Callable[[int], float]] = {}  # compiled one-layer modules, by what they compute


def _runner(mod: tvm.IRModule, target: tvm.target.Target, x: np.ndarray) -> Callable[[int], float]:
    """Compile a one-layer module; the result times `number` calls and returns us per call."""
    from ..lowering import compile_module  # the dense schedules of cpu_schedule.py apply

    dev = tvm.cpu()
    vm = relax.VirtualMachine(compile_module(mod, target), dev)
    arg = tvm.runtime.tensor(x)
    vm["main"](arg)  # warm up (page in constants)

    def run(number: int) -> float:
        return float(vm.time_evaluator("main", dev, number=number, repeat=1)(arg).results[0]) * 1e6

    return run


def time_interleaved(runners: list[Callable[[int], float]], number: int, repeat: int) -> list[Timing]:
    """Time several runners in alternating rounds, so that load from other processes (bursty on a shared
    machine) hits them alike; min and median over the rounds."""
    runs: list[list[float]] = [[] for _ in runners]
    for _ in range(repeat):
        for i, run in enumerate(runners):
            runs[i].append(run(number))
    return [Timing(float(min(r)), float(np.median(r))) for r in runs]


Emit = Callable[[relax.BlockBuilder, relax.Expr], relax.Expr]


@dataclass(frozen=True)
class LayerProblem:
    """One layer as the cost model sees it: `Y[m, N] = prologue(x) @ weight[N, K]^T`.

    `dense` emits the original op on an input of `input_shape` (the reference the sparse kernel must beat);
    `prologue` emits the [m, K] matrix the kernel multiplies (a reshape, or an im2col for a KxK conv);
    `key` identifies layers that time alike (op, shapes and attributes) for the timing caches.
    """

    name: str
    op: str
    weight: np.ndarray  # [N, K]
    m: int
    input_shape: tuple[int, ...]
    dense: Emit
    prologue: Emit
    key: tuple = ()


def matmul_problem(name: str, w: np.ndarray, m: int) -> LayerProblem:
    """A plain `x[m, K] @ w[N, K]^T` (benchmarks and tests)."""
    wt = relax.const(np.ascontiguousarray(w.T))
    return LayerProblem(name, "MatMul", w, m, (m, w.shape[1]), lambda bb, x: bb.emit(relax.op.matmul(x, wt)),
                        lambda bb, x: x, ("matmul",))


def _single_layer(shape: tuple[int, ...], body: Emit) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(body(bb, x))
        bb.emit_func_output(out)
    return bb.get()


def sparse_call(bb: relax.BlockBuilder, x: relax.Expr, spec: KernelSpec, mat: BSRMatrix, m: int,
                name: str = "sparse_matmul", bias: np.ndarray | None = None, relu: bool = False) -> relax.Expr:
    """`call_tir(kernel, x, data, indices, indptr, bias)` for a [m, K] input; the [m, N] result (+ bias, ReLU)."""
    func = bsr_matmul(spec, m, mat, relu=relu)
    gv = bb.add_func(func, name)
    n = mat.shape[0]
    b = np.zeros(n, np.float32) if bias is None else np.ascontiguousarray(bias, dtype=np.float32).reshape(n)
    consts = [relax.const(a) for a in [*kernel_arrays(spec, mat), b]]
    return relax.call_tir(gv, [x, *consts], relax.TensorType((m, n), "float32"))


def dense_module(problem: LayerProblem) -> tvm.IRModule:
    return _single_layer(problem.input_shape, problem.dense)


def sparse_module(problem: LayerProblem, spec: KernelSpec, mat: BSRMatrix) -> tvm.IRModule:
    def body(bb: relax.BlockBuilder, x: relax.Expr) -> relax.Expr:
        return bb.emit(sparse_call(bb, problem.prologue(bb, x), spec, mat, problem.m))

    return _single_layer(problem.input_shape, body)


def _input(problem: LayerProblem) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(problem.input_shape).astype("float32")


def dense_runner(problem: LayerProblem, target: tvm.target.Target) -> Callable[[int], float]:
    key = ("dense", str(target), problem.key, problem.input_shape, problem.weight.shape)  # values do not matter
    if key not in _RUNNERS:
        _RUNNERS[key] = _runner(dense_module(problem), target, _input(problem))
    return _RUNNERS[key]


def sparse_runner(problem: LayerProblem, spec: KernelSpec, mat: BSRMatrix,
                  target: tvm.target.Target) -> Callable[[int], float]:
    # Layers of one shape and about the same block count run alike: reuse the compiled module (within 2%).
    key = ("sparse", str(target), problem.key, problem.input_shape, spec, mat.shape,
           round(math.log(max(mat.nnzb, 1)) / math.log(1.02)))
    if key not in _RUNNERS:
        _RUNNERS[key] = _runner(sparse_module(problem, spec, mat), target, _input(problem))
    return _RUNNERS[key]


def set_threads(threads: int | None) -> None:
    """Time with the runtime's thread count. TVM sizes its pool from TVM_NUM_THREADS (else half the logical
    CPUs on x86) when it first runs parallel code, and config_threadpool cannot grow it past that."""
    if threads:
        os.environ.setdefault("TVM_NUM_THREADS", str(int(threads)))
        tvm.get_global_func("runtime.config_threadpool")(0, int(threads))


# -------------------------------------------------------------------------------------------- decision

def decide(problem: LayerProblem, target: tvm.target.Target, options: dict[str, Any] | None = None) -> LayerDecision:
    """Keep the layer dense or pick the fastest sparse kernel for it, by timing both (or by the model)."""
    opts = {**DEFAULT_OPTIONS, **(options or {})}
    w, m, layer, op = problem.weight, problem.m, problem.name, problem.op
    n, k = w.shape
    sparsity = 1.0 - np.count_nonzero(w) / float(w.size)
    decision = LayerDecision(layer, op, (m, k, n), sparsity, "dense", None, None)
    if w.dtype != np.float32:
        decision.reason = f"dtype {w.dtype}"
        return decision
    if w.size < opts["min_params"]:
        decision.reason = f"{w.size} params < min_params {opts['min_params']}"
        return decision
    if sparsity < opts["min_sparsity"] and opts["force"] != "sparse":
        decision.reason = f"sparsity {sparsity:.3f} < min_sparsity {opts['min_sparsity']}"
        return decision
    lanes = vector_lanes(target)
    cands = candidates(w, m, lanes, [tuple(b) for b in opts["blocks"]])
    decision.candidates = cands
    if not cands:
        decision.reason = "no block format stores less than " f"{MAX_STORED_DENSITY:.0%} of the weight"
        return decision
    if not opts["measure"]:
        best = cands[0]
        dense = predict_dense(m, k, n, lanes)
        decision.best = best
        faster = best.predicted * opts["margin"] < dense
        decision.chosen = "sparse" if faster or opts["force"] == "sparse" else "dense"
        decision.reason = "predicted"
        return decision

    cache = DecisionCache.for_target(target, opts)
    key = cache.key(problem, target, opts) if cache else ""
    if cache and cache.restore(key, decision):
        return decision
    _measure(problem, target, opts, decision)
    if cache and decision.best is not None and decision.dense is not None:
        if opts["record_when_busy"] or not machine_busy():
            cache.store(key, decision)
    return decision


def _measure(problem: LayerProblem, target: tvm.target.Target, opts: dict[str, Any], decision: LayerDecision) -> None:
    cands = decision.candidates
    set_threads(opts["threads"])
    dense_run = None
    try:
        dense_run = dense_runner(problem, target)
    except Exception as e:  # noqa: BLE001 - a failing dense build must not stop the compile
        decision.reason = f"dense reference failed to build: {' '.join(str(e).split())[:160]}"
    built = []
    for cand in cands[: opts["measure_top"]]:
        try:
            built.append((cand, sparse_runner(problem, cand.spec, cand.matrix, target)))
        except Exception:  # noqa: BLE001 - a variant that fails to build is just not a candidate
            pass
    runners = ([dense_run] if dense_run else []) + [run for _, run in built]
    timings = time_interleaved(runners, opts["number"], opts["repeat"])
    if dense_run:
        decision.dense, timings = timings[0], timings[1:]
    for (cand, _), timing in zip(built, timings):
        cand.timing = timing
    timed = [c for c in cands if c.measured_us is not None]
    if not timed:
        decision.reason = decision.reason or "no sparse kernel built"
        return
    best = min(timed, key=lambda c: c.measured_us)
    decision.best = best
    if opts["force"] == "sparse":
        decision.chosen, decision.reason = "sparse", "forced"
    elif decision.dense_us is None:
        decision.reason = decision.reason or "no dense reference"
    elif best.measured_us * opts["margin"] < decision.dense_us:
        decision.chosen = "sparse"
        decision.reason = f"{decision.dense_us / best.measured_us:.2f}x faster than dense"
    else:
        decision.reason = f"dense is faster ({decision.dense_us:.1f} us vs {best.measured_us:.1f} us)"


def machine_busy() -> bool:
    """More runnable threads than 1.5x this process's cores: timings taken now say more about the other
    processes than about the kernels (a parallel kernel waits for descheduled workers), so they are used for
    this compile but not recorded for the next."""
    return load_above(1.5)


class DecisionCache:
    """Measured decisions, one JSON line each, in a file shared by concurrent compiles (appends under the
    tuning directory's lock). Unreadable lines are skipped with a warning."""

    def __init__(self, path: Path):
        self.path = path
        self._entries: dict[str, dict[str, Any]] = {}
        self._stamp: tuple[int, int] | None = None  # (size, mtime) of the file as last read

    @classmethod
    def for_target(cls, target: tvm.target.Target, opts: dict[str, Any]) -> DecisionCache | None:
        if not opts.get("cache") or opts.get("force"):
            return None
        from ..tuning import default_db_dir

        path = Path(opts.get("cache_dir") or default_db_dir(target)) / DECISIONS
        return _DECISION_CACHES.setdefault(path, cls(path))

    @staticmethod
    def key(problem: LayerProblem, target: tvm.target.Target, opts: dict[str, Any]) -> str:
        from sparsecc import __version__

        what = [__version__, DENSE_REVISION, str(target), repr(problem.key), list(problem.input_shape), problem.m,
                [list(b) for b in opts["blocks"]], opts["margin"], opts["measure_top"], opts["threads"]]
        h = hashlib.sha256(json.dumps(what).encode())
        h.update(np.ascontiguousarray(problem.weight).tobytes())
        return h.hexdigest()

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
            return st.st_size, st.st_mtime_ns
        except OSError:
            return None

    def _load(self) -> dict[str, dict[str, Any]]:
        """The entries, re-read when the file changed (another compile may have appended)."""
        stamp = self._file_stamp()
        if stamp is not None and stamp != self._stamp:
            from ..tuning import locked

            with locked(self.path.parent):
                lines = self.path.read_text(errors="replace").splitlines()
                self._stamp = self._file_stamp()
            bad = 0
            for line in lines:
                try:
                    entry = json.loads(line)
                    self._entries[str(entry["key"])] = dict(entry["decision"])
                except (ValueError, KeyError, TypeError):
                    bad += 1
            if bad:
                warnings.warn(f"{self.path}: skipped {bad} unreadable line(s)", stacklevel=3)
        return self._entries

    def restore(self, key: str, decision: LayerDecision) -> bool:
        """Fill `decision` from the cache; False when absent or no longer matching today's candidates."""
        entry = self._load().get(key)
        if entry is None:
            return False
        try:
            by_label = {c.spec.label: c for c in decision.candidates}
            timings = {label: Timing(*t) for label, t in entry["tried"].items()}
            if entry["best"] not in by_label or not set(timings) <= set(by_label):
                return False
            for label, timing in timings.items():
                by_label[label].timing = timing
            decision.dense = Timing(*entry["dense"]) if entry["dense"] else None
            decision.best = by_label[entry["best"]]
            decision.chosen, decision.reason = str(entry["chosen"]), str(entry["reason"])
            return True
        except (KeyError, TypeError, ValueError):
            return False

    def store(self, key: str, decision: LayerDecision) -> None:
        from ..tuning import locked

        entry = {
            "chosen": decision.chosen, "reason": decision.reason, "best": decision.best.spec.label,
            "dense": [decision.dense.min_us, decision.dense.median_us] if decision.dense else None,
            "tried": {c.spec.label: [c.timing.min_us, c.timing.median_us] for c in decision.candidates
                      if c.timing is not None},
        }
        line = json.dumps({"key": key, "decision": entry}, separators=(",", ":")) + "\n"
        try:
            self._load()
            with locked(self.path.parent):
                up_to_date = self._file_stamp() == self._stamp  # nobody appended since we read it
                with open(self.path, "a") as f:
                    f.write(line)
                self._stamp = self._file_stamp() if up_to_date else None
            self._entries[key] = entry
        except OSError as e:  # a read-only cache only costs the next compile its measurements
            warnings.warn(f"{self.path}: cannot record a sparse decision ({e})", stacklevel=3)


_DECISION_CACHES: dict[Path, DecisionCache] = {}

__all__ = ["BLOCK_SHAPES", "Candidate", "LayerDecision", "LayerProblem", "Timing", "candidates", "decide",
           "dense_module", "dense_runner", "matmul_problem", "predict", "sparse_call", "sparse_module",
           "sparse_runner", "time_interleaved"]
