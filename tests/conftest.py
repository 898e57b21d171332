"""Shared fixtures: small hand-built ONNX models and a CLI runner that calls `sparsecc.cli.main` in-process."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

# Tuning records and measured sparse decisions go to a fresh directory per test run, never the user's cache:
# tests must measure, and must not depend on what an earlier run left behind.
os.environ["SPARSECC_TUNING_DIR"] = tempfile.mkdtemp(prefix="sparsecc-test-tuning-")


def make_model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def lowered_module(model: onnx.ModelProto, target):
    """The module a model lowers to on a CPU `target`, every operator a scheduled TIR function."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    from sparsecc.codegen import lowering

    with target:
        return tvm.transform.Sequential(lowering.lowering_passes(target))(from_onnx(model, keep_params_in_input=False))


def lowered_names(model: onnx.ModelProto, target) -> list[str]:
    """Names of the TIR functions a model lowers to on a CPU `target` (which rewrites applied)."""
    import tvm

    return [gv.name_hint for gv, f in lowered_module(model, target).functions_items()
            if isinstance(f, tvm.tirx.PrimFunc)]


def max_rel_error_vs_ort(model: onnx.ModelProto, x: np.ndarray, target) -> float:
    """Compile a one-input model with the CPU lowering pipeline, run it on `x` and return its largest error
    relative to ONNX Runtime's output (shapes asserted equal)."""
    import onnxruntime as ort
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from sparsecc.codegen import lowering

    name = model.graph.input[0].name
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
    ex = lowering.compile_module(from_onnx(model, keep_params_in_input=False), target)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    assert out.shape == ref.shape
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def conv_model(batch="N", seed=0) -> onnx.ModelProto:
    """Conv -> Relu -> Flatten -> Gemm with a dynamic batch dim."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")
    fc = numpy_helper.from_array((rng.standard_normal((10, 8 * 16 * 16)) * 0.05).astype(np.float32), "fc")
    return make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
         helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1, name="fc")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])],
        [w, b, fc],
    )


@pytest.fixture
def conv_path(tmp_path):
    path = tmp_path / "conv.onnx"
    onnx.save(conv_model(), path)
    return path


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process; returns exit code, stdout and stderr."""
    from sparsecc.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def replace_file(path, data: bytes) -> None:
    """Overwrite a file with a new inode. Truncating a library that this process has loaded in place
    would make its mapped pages vanish (SIGBUS); a tampering user replaces the file, and so do we."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    tmp.replace(path)


def require_toolchain(target: str) -> dict:
    """The target's external tools, or skip the test. Under CI (`CI` set) a missing tool is a failure:
    `.ci/run` installs every toolchain with `sparsecc setup`, so a skip there would hide a broken setup."""
    import os

    from sparsecc.errors import Unsupported
    from sparsecc.pipeline import setup_toolchain

    try:
        return setup_toolchain(target, install=False)
    except Unsupported as e:
        if os.environ.get("CI"):
            pytest.fail(f"toolchain for {target} missing under CI: {e}")
        pytest.skip(f"toolchain for {target} not installed: {e}")


def require_executable(name: str) -> str:
    """Path of an external program (e.g. chromium, node), or skip; under CI a missing one is a failure."""
    import os
    import shutil

    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} missing under CI: .ci/run must install it")
    pytest.skip(f"{name} not installed")
