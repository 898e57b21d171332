"""Real boards through TVM's RPC tracker: benchmark an artifact there, tune kernels with MetaSchedule there.

A device farm is a tracker (`python -m tvm.exec.rpc_tracker --port 9190`) plus one RPC server per board
(`python -m tvm.exec.rpc_server --tracker HOST:9190 --key rk3588`, with the board's TVM runtime installed),
and `python -m tvm.exec.query_rpc_tracker --port 9190` lists them. Here the host asks the tracker for a board by
key: `benchmark_artifact` uploads an artifact's library, runs its Relax VM on the board and times it there;
`tune_over_rpc` tunes TIR functions with MetaSchedule's `RPCRunner` (candidates are built here, linked with the
target's cross compiler, and run on the board) into a tuning database that
`sparsecc compile --target arm64 --tune-db DIR` then applies. The code path is the same for a board and for a
server on this machine (what the tests use).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax, rpc
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from sparsecc.errors import BadInput, Unsupported, one_line
from sparsecc.runtime import load

from .tuning import ForkBuilder, locked, open_database


def parse_tracker(tracker: str) -> tuple[str, int]:
    host, _, port = tracker.rpartition(":")
    if not host or not port.isdigit():
        raise BadInput(f"RPC tracker '{tracker}': expected HOST:PORT")
    return host, int(port)


def connect(tracker: str, key: str, timeout_s: float = 60) -> rpc.RPCSession:
    """A session on a board of kind `key`, handed out by the tracker."""
    host, port = parse_tracker(tracker)
    try:
        client = rpc.connect_tracker(host, port)
        # The tracker queues a request for a key no server has until one registers: refuse it instead.
        keys = sorted({s["key"].split(":", 1)[1] for s in client.summary()["server_info"]
                       if s["key"].startswith("server:")})
        if key not in keys:
            raise Unsupported(f"RPC tracker {tracker}: no board with key '{key}' (keys: {', '.join(keys) or 'none'})")
        return client.request(key, session_timeout=timeout_s)
    except Unsupported:
        raise
    except Exception as e:  # noqa: BLE001 - TVMError / socket errors, multi-line
        raise Unsupported(f"RPC tracker {tracker}, key '{key}': {one_line(e)[:300]}") from None


def benchmark_artifact(artifact: str | Path, tracker: str, key: str, inputs: dict[str, np.ndarray] | None = None,
                       number: int = 10, repeat: int = 3) -> dict[str, Any]:
    """Run an artifact on a board: its outputs for `inputs` (default: random, seed 0) and the time per call
    (mean over `number` calls; min and median over `repeat` rounds), measured on the board."""
    manifest = load(artifact).manifest  # checks every file's hash before anything is sent
    library = manifest.file(manifest.runtime["library"])
    rng = np.random.default_rng(0)
    feeds = inputs or {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in manifest.inputs}
    session = connect(tracker, key)
    session.upload(str(library))
    dev = session.cpu()
    vm = relax.VirtualMachine(session.load_module(library.name), dev)
    args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[s.name]), dev) for s in manifest.inputs]
    result = vm["main"](*args)
    outputs = [result.numpy()] if hasattr(result, "numpy") else [r.numpy() for r in result]
    times = vm.time_evaluator("main", dev, number=number, repeat=repeat)(*args).results
    return {"outputs": outputs, "min_us": min(times) * 1e6, "median_us": float(np.median(times)) * 1e6}


@derived_object
class CrossBuilder(ms.builder.PyBuilder):
    """`tuning.ForkBuilder`'s candidates linked into shared libraries by `fcompile` (a cross compiler),
    since a board's RPC server has no compiler to link the object archive itself."""

    def __init__(self, fcompile):
        super().__init__()
        self.fcompile = fcompile

    def build(self, build_inputs: list[ms.builder.BuilderInput]) -> list[ms.builder.BuilderResult]:
        results = []
        for result in ForkBuilder().build(build_inputs):
            if result.error_msg is not None:
                results.append(result)
                continue
            archive = result.artifact_path
            folder = os.path.dirname(archive)
            tvm.support.tar.untar(archive, folder)
            library = os.path.join(folder, "candidate.so")
            self.fcompile(library, sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".o")))
            results.append(ms.builder.BuilderResult(library, None))
        return results


def tune_over_rpc(mod: tvm.IRModule, target: tvm.target.Target, tracker: str, key: str, trials: int,
                  db_dir: str | Path, fcompile=None) -> ms.database.Database:
    """Tune the PrimFuncs of `mod` with candidates timed on the board; records go to the database in `db_dir`
    (the one `--tune-db` reads). `fcompile`: the target's cross linker (e.g. `tvm.support.cc.cross_compiler(
    "aarch64-linux-gnu-g++")`); None links on the board (the x86 RPC server of the tests)."""
    host, port = parse_tracker(tracker)
    runner = ms.runner.RPCRunner(ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                                     session_timeout_sec=60), max_workers=1)
    builder = CrossBuilder(fcompile) if fcompile else ForkBuilder()
    with locked(db_dir):
        database = open_database(db_dir)
        ms.tir_integration.tune_tir(mod, target, str(db_dir), max_trials_global=trials,
                                    num_trials_per_iter=min(trials, 64), builder=builder, runner=runner,
                                    database=database, cost_model="random")
    return database
