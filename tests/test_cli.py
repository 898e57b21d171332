"""The CLI contract: commands, JSON output, exit codes, one-line errors, no partial artifacts."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import conv_model, make_model, replace_file


def test_compile_run_verify_inspect(cli, tmp_path, conv_path):
    art = tmp_path / "art"
    r = cli("compile", conv_path, "--target", "cpu", "-o", art, "--json")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    assert data["verification"]["status"] == "passed"
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    r = cli("run", art, "--inputs", tmp_path / "in.npz", "-o", tmp_path / "out.npz")
    assert r.code == 0, r.err
    with np.load(tmp_path / "out.npz") as out:
        assert list(out.files) == ["y"] and out["y"].shape == (1, 10)
    r = cli("verify", art, "--inputs", tmp_path / "in.npz", "--json")
    assert r.code == 0 and json.loads(r.out)["status"] == "passed"
    r = cli("inspect", conv_path, "--json")
    info = json.loads(r.out)
    assert info["ops"] == {"Conv": 1, "Flatten": 1, "Gemm": 1, "Relu": 1}
    conv = next(layer for layer in info["layers"] if layer["op"] == "Conv")
    assert conv["flops"] == 2 * 8 * 16 * 16 * 27 and conv["params"] == 8 * 27 + 8


def test_shape_option(cli, tmp_path, conv_path):
    r = cli("compile", conv_path, "-o", tmp_path / "a", "--shape", "x=3,3,16,16", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["inputs"][0]["shape"] == [3, 3, 16, 16]


def _errors_cleanly(r, code, *words):
    assert r.code == code, (r.code, r.err)
    lines = [ln for ln in r.err.splitlines() if ln.strip() and not ln.strip().startswith("✓")]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.err
    assert "Traceback" not in r.err
    for w in words:
        assert w in lines[0]


@pytest.mark.parametrize("content", [b"", b"\x08\x07garbage\xff" * 40, b"not a model\n"])
def test_bad_files_exit_2(cli, tmp_path, content):
    (tmp_path / "m.onnx").write_bytes(content)
    _errors_cleanly(cli("compile", tmp_path / "m.onnx", "-o", tmp_path / "a"), 2, "m.onnx")
    assert not (tmp_path / "a").exists()


def test_truncated_file_exit_2(cli, tmp_path, conv_path):
    (tmp_path / "t.onnx").write_bytes(conv_path.read_bytes()[:700])
    _errors_cleanly(cli("compile", tmp_path / "t.onnx", "-o", tmp_path / "a"), 2, "t.onnx")
    assert not (tmp_path / "a").exists()


def test_unknown_op_exit_3(cli, tmp_path):
    m = make_model([helper.make_node("FooBar", ["x"], ["y"], name="mystery")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(m, tmp_path / "m.onnx")
    _errors_cleanly(cli("compile", tmp_path / "m.onnx", "-o", tmp_path / "a"), 3, "mystery", "FooBar")
    assert not (tmp_path / "a").exists()


def test_op_tvm_cannot_import_exit_3(cli, tmp_path):
    # A valid ONNX op that the TVM frontend lacks: refused up front, naming node and op.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    m = make_model([helper.make_node("Celu", ["x"], ["y"], name="celu_node")], [x], [y])
    onnx.save(m, tmp_path / "m.onnx")
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    if "Celu" in _get_convert_map():
        pytest.skip("frontend supports Celu now")
    _errors_cleanly(cli("compile", tmp_path / "m.onnx", "-o", tmp_path / "a"), 3, "celu_node", "Celu")


def test_too_new_opset_exit_3(cli, tmp_path):
    m = conv_model()
    m.opset_import[0].version = 99
    onnx.save(m, tmp_path / "m.onnx")
    _errors_cleanly(cli("compile", tmp_path / "m.onnx", "-o", tmp_path / "a"), 3, "opset 99")


def test_missing_shape_exit_2(cli, tmp_path):
    m = conv_model()
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    onnx.save(m, tmp_path / "m.onnx")
    _errors_cleanly(cli("compile", tmp_path / "m.onnx", "-o", tmp_path / "a"), 2, "'x'", "dim 2", "--shape")
    assert not (tmp_path / "a").exists()


def test_bad_options_exit_2(cli, tmp_path, conv_path):
    _errors_cleanly(cli("compile", conv_path, "--bogus"), 2)
    _errors_cleanly(cli("compile", conv_path, "--shape", "x=1,a"), 2, "--shape")
    _errors_cleanly(cli("compile", conv_path, "-t", "tpu", "-o", tmp_path / "a"), 3, "tpu", "cpu")


def test_verification_failure_exit_4(cli, tmp_path, conv_path):
    r = cli("compile", conv_path, "-o", tmp_path / "a", "--tolerance", "0")
    # fp32 TVM and ORT never agree to the last bit on a conv + gemm; a zero tolerance must fail cleanly
    _errors_cleanly(r, 4, "'y'", "ONNX Runtime")
    assert not (tmp_path / "a").exists()


def test_verify_command_failure_exit_4(cli, tmp_path, conv_path):
    assert cli("compile", conv_path, "-o", tmp_path / "a").code == 0
    _errors_cleanly(cli("verify", tmp_path / "a", "--tolerance", "0"), 4, "'y'", "ONNX Runtime")


def test_tampered_artifact_run_exit_2(cli, tmp_path, conv_path):
    assert cli("compile", conv_path, "-o", tmp_path / "a").code == 0
    replace_file(tmp_path / "a" / "model.so", b"evil")
    np.savez(tmp_path / "in.npz", x=np.zeros((1, 3, 16, 16), np.float32))
    _errors_cleanly(cli("run", tmp_path / "a", "--inputs", tmp_path / "in.npz"), 2, "model.so", "sha256")


def test_run_with_wrong_inputs_exit_2(cli, tmp_path, conv_path):
    assert cli("compile", conv_path, "-o", tmp_path / "a").code == 0
    np.savez(tmp_path / "in.npz", z=np.zeros((1, 3, 16, 16), np.float32))
    _errors_cleanly(cli("run", tmp_path / "a", "--inputs", tmp_path / "in.npz"), 2, "in.npz")


def test_real_process_exit_code_and_no_traceback(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"junk")
    proc = subprocess.run([sys.executable, "-m", "sparsecc", "compile", str(tmp_path / "m.onnx")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_demo(cli, tmp_path):
    r = cli("demo", "-o", tmp_path / "demo", "--json")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    assert data["verification"]["status"] == "passed"
    assert data["accuracy_sparsecc"] == pytest.approx(data["accuracy_onnxruntime"])
    assert data["accuracy_sparsecc"] > 0.95


def test_setup_check(cli):
    r = cli("setup", "cpu", "--check", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["toolchains"] == [{"target": "cpu", "status": "ready", "tools": {}}]
    r = cli("setup", "no-such-target", "--check")
    assert r.code == 3 and "unknown target" in r.err


@pytest.mark.parametrize("target", ['{"kind": "llvm", "mtriple": ', '{"kind": "no-such-kind"}'])
def test_malformed_raw_target_is_bad_input(cli, conv_path, tmp_path, target):
    r = cli("compile", conv_path, "--target", target, "-o", tmp_path / "a")
    assert r.code == 2 and "target" in r.err and "internal" not in r.err
    assert not (tmp_path / "a").exists()
