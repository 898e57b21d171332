"""Boards over TVM's RPC tracker, end to end over loopback: a tracker and an RPC server (this machine playing
the board) started as a device farm would start them; an artifact benchmarked there; a kernel tuned there."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tvm
from tvm import te

import sparsecc
from sparsecc.codegen import rpc
from sparsecc.codegen.targets import cpu_target
from sparsecc.errors import Unsupported

KEY = "loopback-board"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tracker():
    port, server_port = _free_port(), _free_port()
    tvm_exec = [sys.executable, "-m"]
    procs = [subprocess.Popen([*tvm_exec, "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
                               "--port-end", str(port + 1), "--silent"])]
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                tvm.rpc.connect_tracker("127.0.0.1", port).summary()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        procs.append(subprocess.Popen([*tvm_exec, "tvm.exec.rpc_server", "--host", "127.0.0.1",
                                       "--port", str(server_port), "--port-end", str(server_port + 1),
                                       "--tracker", f"127.0.0.1:{port}", "--key", KEY, "--silent"]))
        while not tvm.rpc.connect_tracker("127.0.0.1", port).summary()["server_info"]:
            assert time.monotonic() < deadline, "RPC server did not register with the tracker"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)


def test_benchmark_artifact_on_board(tmp_path, conv_path, tracker):
    sparsecc.compile(conv_path, output=tmp_path / "a", verify=False)
    x = np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype(np.float32)
    result = rpc.benchmark_artifact(tmp_path / "a", tracker, KEY, {"x": x}, number=2, repeat=2)
    local = sparsecc.load(tmp_path / "a").run({"x": x})
    np.testing.assert_allclose(result["outputs"][0], local[0], rtol=1e-5, atol=1e-6)
    assert 0 < result["min_us"] <= result["median_us"]


def test_unknown_key_is_one_line(tracker):
    with pytest.raises(Unsupported, match=f"no board with key 'no-such-board' \\(keys: {KEY}\\)") as e:
        rpc.connect(tracker, "no-such-board", timeout_s=2)
    assert "\n" not in str(e.value)


def _matmul(n: int = 64) -> tvm.IRModule:
    a = te.placeholder((n, n), name="a")
    b = te.placeholder((n, n), name="b")
    k = te.reduce_axis((0, n), name="k")
    c = te.compute((n, n), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="c")
    return tvm.IRModule({"main": te.create_prim_func([a, b, c])})


def test_tune_over_rpc_records_board_timings(tmp_path, tracker):
    target = cpu_target(1).target()
    db = rpc.tune_over_rpc(_matmul(), target, tracker, KEY, trials=4, db_dir=tmp_path / "db")
    records = db.get_all_tuning_records()
    assert records and any(r.run_secs and float(r.run_secs[0]) < 1e9 for r in records)
    assert (tmp_path / "db" / "database_tuning_record.json").stat().st_size > 0
