"""Artifacts: deterministic, atomic, and refused when tampered with."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import sparsecc
from conftest import replace_file
from sparsecc.artifact import atomic_directory


def test_same_input_same_hashes(tmp_path, conv_path):
    a = sparsecc.compile(conv_path, output=tmp_path / "a")
    b = sparsecc.compile(conv_path, output=tmp_path / "b")
    assert a.manifest["files"] == b.manifest["files"]


def test_measured_sparse_choices_are_deterministic(tmp_path):
    """Kernel choices are timed on the first compile and reused from the tuning directory on the next,
    so the same model and options give the same bytes."""
    from sparsecc.models import zoo

    opts = {"sparsity": 0.9, "pattern": "block:4x1", "threads": 1,
            "target_options": {"sparse_options": {"record_when_busy": True}}}  # CI machines are shared
    a = sparsecc.compile(zoo.model_path("digits_mlp"), output=tmp_path / "a", **opts)
    b = sparsecc.compile(zoo.model_path("digits_mlp"), output=tmp_path / "b", **opts)
    layers = json.loads((a.path / "report.json").read_text())["codegen"]["sparse_layers"]
    assert any(r["dense_us"] and r["sparse_us"] for r in layers)  # really timed, so noisy without the cache
    assert a.manifest["files"] == b.manifest["files"]


@pytest.mark.parametrize("victim", ["model.so", "model.onnx", "report.json"])
def test_tampered_file_is_refused(tmp_path, conv_path, victim):
    sparsecc.compile(conv_path, output=tmp_path / "a")
    path = tmp_path / "a" / victim
    replace_file(path, path.read_bytes() + b"\0")
    with pytest.raises(sparsecc.BadInput, match=f"'{victim}' does not match its sha256"):
        sparsecc.load(tmp_path / "a")


def test_truncated_or_missing_files_are_refused(tmp_path, conv_path):
    sparsecc.compile(conv_path, output=tmp_path / "a")
    lib = tmp_path / "a" / "model.so"
    replace_file(lib, lib.read_bytes()[:100])
    with pytest.raises(sparsecc.BadInput, match="model.so"):
        sparsecc.load(tmp_path / "a")
    lib.unlink()
    with pytest.raises(sparsecc.BadInput, match="missing"):
        sparsecc.load(tmp_path / "a")
    (tmp_path / "a" / "manifest.json").write_text("{not json")
    with pytest.raises(sparsecc.BadInput, match="unreadable manifest"):
        sparsecc.load(tmp_path / "a")
    with pytest.raises(sparsecc.BadInput, match="not an artifact"):
        sparsecc.load(tmp_path)


def test_manifest_path_escape_is_refused(tmp_path, conv_path):
    sparsecc.compile(conv_path, output=tmp_path / "a")
    mpath = tmp_path / "a" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["files"]["../../etc/passwd"] = "0" * 64
    mpath.write_text(json.dumps(m))
    with pytest.raises(sparsecc.BadInput, match="leaves the artifact"):
        sparsecc.load(tmp_path / "a")


def test_outputs_stay_valid_across_calls(tmp_path):
    """Input buffers are reused between calls: an output that is a view of the input must not change."""
    from onnx import TensorProto, helper

    from conftest import make_model

    model = make_model(
        [helper.make_node("Reshape", ["x", "shape"], ["y"]), helper.make_node("Relu", ["x"], ["z"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 6])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [3, 4])],
    )
    runner = sparsecc.compile(model, output=tmp_path / "a").load()
    x = np.arange(12, dtype=np.float32).reshape(2, 6) - 6
    first = runner.run({"x": x})
    kept = [o.copy() for o in first]
    second = runner.run({"x": -x})
    for a, b in zip(first, kept):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(second[0], -x.reshape(3, 4))
    np.testing.assert_array_equal(first[1], np.maximum(x, 0))


def test_runner_checks_feeds(tmp_path, conv_path):
    runner = sparsecc.compile(conv_path, output=tmp_path / "a").load()
    x = np.zeros((1, 3, 16, 16), np.float32)
    assert runner.run({"x": x})[0].shape == (1, 10)
    assert runner.run({"x": x.astype(np.float64)})[0].dtype == np.float32  # same-kind cast is fine
    with pytest.raises(sparsecc.BadInput, match="missing"):
        runner.run({})
    with pytest.raises(sparsecc.BadInput, match="shape"):
        runner.run({"x": np.zeros((2, 3, 16, 16), np.float32)})
    with pytest.raises(sparsecc.BadInput, match="dtype"):
        runner.run({"x": x.astype(np.complex64)})


def test_existing_output_needs_force(tmp_path, conv_path):
    sparsecc.compile(conv_path, output=tmp_path / "a")
    with pytest.raises(sparsecc.BadInput, match="--force"):
        sparsecc.compile(conv_path, output=tmp_path / "a")
    art = sparsecc.compile(conv_path, output=tmp_path / "a", force=True, batch=2)
    assert art.load().inputs[0].shape == (2, 3, 16, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "conv.onnx"]


def test_failure_inside_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_sigterm_mid_compile_leaves_no_artifact(tmp_path, conv_path):
    code = (
        "import time, sparsecc.artifact as a\n"
        f"with a.atomic_directory(__import__('pathlib').Path({str(tmp_path / 'out')!r})) as t:\n"
        "    (t / 'partial').write_text('x'); print('ready', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    time.sleep(0.1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.onnx"]


def test_running_does_not_pin_the_calling_thread(tmp_path, conv_path):
    before = os.sched_getaffinity(0)
    runner = sparsecc.compile(conv_path, output=tmp_path / "a", threads=2).load()
    runner.run({"x": np.zeros((1, 3, 16, 16), np.float32)})
    assert os.sched_getaffinity(0) == before


_IDLE_CPU = """
import os, sys, time
import numpy as np
import sparsecc
runner = sparsecc.load(sys.argv[1])
for _ in range(5):
    runner.run({"x": np.ones((16, 3, 16, 16), np.float32)})
before = os.times()
time.sleep(0.5)
after = os.times()
print(os.environ.get("TVM_THREAD_POOL_SPIN_COUNT"), after.user + after.system - before.user - before.system)
"""


def _idle_cpu_after_runs(art, env: dict) -> tuple[str, float]:
    setting, cpu = subprocess.run([sys.executable, "-c", _IDLE_CPU, str(art.path)], env=env, check=True,
                                  capture_output=True, text=True).stdout.split()
    return setting, float(cpu)


def test_pool_workers_do_not_spin_on_a_busy_machine(tmp_path, conv_path):
    """With the cores busy, idle thread-pool workers sleep between calls instead of spinning (a spinning
    worker starts each kernel a time slice late there)."""
    art = sparsecc.compile(conv_path, output=tmp_path / "a", threads=2, batch=16)
    env = {k: v for k, v in os.environ.items() if k != "TVM_THREAD_POOL_SPIN_COUNT"}
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * (os.cpu_count() or 1))]
    try:
        time.sleep(0.3)
        setting, cpu = _idle_cpu_after_runs(art, env)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert setting == "0" and cpu < 0.02, (setting, cpu)


def test_explicit_spin_count_wins(tmp_path, conv_path):
    art = sparsecc.compile(conv_path, output=tmp_path / "a", threads=2, batch=16)
    setting, cpu = _idle_cpu_after_runs(art, {**os.environ, "TVM_THREAD_POOL_SPIN_COUNT": "300000"})
    assert setting == "300000" and cpu > 0.02, cpu  # the workers spun while the caller slept
