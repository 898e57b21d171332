"""End to end: every zoo model compiled for cpu (API and CLI) equals ONNX Runtime and keeps its accuracy."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import sparsecc
from sparsecc.ir import load_model
from sparsecc.models import BUILDERS, TRAINED, accuracy, model_path, test_data
from sparsecc.verify import compare, run_onnxruntime

REL_TOL = 1e-4


def _max_rel(ours, ref):
    return max(e.rel for e in compare([str(i) for i in range(len(ref))], ours, ref))


@pytest.mark.parametrize("name", TRAINED)
def test_trained_model_matches_ort_and_keeps_accuracy(tmp_path, name):
    x, y = test_data(name)
    batch = 64
    art = sparsecc.compile(model_path(name), target="cpu", output=tmp_path / "a", shapes={"input": (batch, *x.shape[1:])})
    assert art.verification["status"] == "passed"
    assert art.verification["max_rel_error"] < REL_TOL
    runner = sparsecc.load(tmp_path / "a")
    assert runner.inputs[0].shape == (batch, *x.shape[1:])
    n = (len(x) // batch) * batch
    ours = np.concatenate([runner.run({"input": x[i:i + batch]})[0] for i in range(0, n, batch)])
    ref = run_onnxruntime(load_model(model_path(name)), {"input": x[:n]})[0]
    assert _max_rel([ours], [ref]) < REL_TOL
    assert accuracy(ours, y[:n]) == pytest.approx(accuracy(ref, y[:n]), abs=1e-9)
    assert accuracy(ours, y[:n]) > 0.9


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_builder_models_match_ort(tmp_path, name):
    proto = BUILDERS[name]()
    art = sparsecc.compile(proto, target="cpu", output=tmp_path / "a", batch=2)
    assert art.verification["status"] == "passed"
    runner = art.load()
    rng = np.random.default_rng(1)
    feeds = {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in runner.inputs}
    ref = run_onnxruntime(load_model(proto), feeds)
    assert _max_rel(runner.run(feeds), ref) < REL_TOL
    assert [tuple(o.shape) for o in ref] == [s.shape for s in runner.outputs]


def test_given_verification_inputs_and_npz(tmp_path, conv_path):
    x = np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    art = sparsecc.compile(conv_path, output=tmp_path / "a", inputs=str(tmp_path / "in.npz"))
    assert art.verification["inputs"].endswith("in.npz")
    art2 = sparsecc.compile(conv_path, output=tmp_path / "b", inputs={"x": x})
    assert art2.verification["inputs"] == "given"
    with pytest.raises(sparsecc.BadInput, match="do not match"):
        np.savez(tmp_path / "wrong.npz", nope=x)
        sparsecc.compile(conv_path, output=tmp_path / "c", inputs=str(tmp_path / "wrong.npz"))
    assert not (tmp_path / "c").exists()


def test_dump_dir_has_model_after_every_pass(tmp_path, conv_path):
    sparsecc.compile(conv_path, output=tmp_path / "a", dump_dir=str(tmp_path / "dump"))
    dumped = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert dumped == ["00_input.onnx", "01_simplify.onnx"]
    for p in (tmp_path / "dump").iterdir():
        onnx.checker.check_model(onnx.load(p), full_check=True)


def test_manifest_contents(tmp_path, conv_path):
    art = sparsecc.compile(conv_path, output=tmp_path / "a", threads=1)
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["schema"] == 1
    assert set(m["files"]) == {"model.onnx", "model.so", "report.json", "report.html"}
    assert m["inputs"] == [{"name": "x", "shape": [1, 3, 16, 16], "dtype": "float32"}]
    assert m["outputs"] == [{"name": "y", "shape": [1, 10], "dtype": "float32"}]
    assert m["target"]["name"] == "cpu" and m["target"]["tvm"]["kind"] == "llvm"
    assert {"sparsecc", "tvm", "onnx", "onnxruntime"} <= set(m["versions"])
    assert m["runtime"]["threads"] == 1 and m["options"]["threads"] == 1
    assert {t["name"] for t in m["timings"]} >= {"load", "simplify", "verify vs ONNX Runtime"}
    assert m["verification"]["tolerance"] == pytest.approx(1e-4)
    assert art.manifest == m
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["model"]["ops"] == {"Conv": 1, "Flatten": 1, "Gemm": 1, "Relu": 1}
    assert report["model"]["flops"] > 0


def test_raw_tvm_target_json(tmp_path, conv_path):
    from sparsecc.codegen.targets import host_cpu

    raw = json.dumps({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": host_cpu()})
    art = sparsecc.compile(conv_path, target=raw, output=tmp_path / "a")
    assert art.manifest["target"]["name"] == "raw"
    assert art.verification["status"] == "passed"


def test_unknown_target_lists_known(tmp_path, conv_path):
    with pytest.raises(sparsecc.Unsupported, match="known targets: .*cpu"):
        sparsecc.compile(conv_path, target="tpu", output=tmp_path / "a")


def test_unknown_option_is_refused(tmp_path, conv_path):
    with pytest.raises(sparsecc.BadInput, match="unknown compile option"):
        sparsecc.compile(conv_path, output=tmp_path / "a", prune_everything=True)


def test_model_our_schedules_cannot_build_falls_back_to_tvm_default(tmp_path):
    """NonMaxSuppression trips the scheduled pipeline; the stock TVM pipeline still builds it correctly."""
    from onnx import TensorProto, helper, numpy_helper

    consts = [numpy_helper.from_array(np.array([10], np.int64), "max_out"),
              numpy_helper.from_array(np.array([0.5], np.float32), "iou"),
              numpy_helper.from_array(np.array([0.0], np.float32), "score")]
    graph = helper.make_graph(
        [helper.make_node("NonMaxSuppression", ["boxes", "scores", "max_out", "iou", "score"], ["selected"])], "nms",
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 50, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, 50])],
        [helper.make_tensor_value_info("selected", TensorProto.INT64, None)], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    art = sparsecc.compile(model, output=tmp_path / "a")
    assert art.verification["status"] == "passed"
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["codegen"]["schedules"] in ("sparsecc", "tvm-default")


def test_compile_with_block_sparsity_uses_sparse_kernels_and_matches_ort(tmp_path):
    from sparsecc.models import build_mlp

    art = sparsecc.compile(build_mlp(in_features=256, hidden=(512,), seed=2), output=tmp_path / "a", batch=4,
                           sparsity=0.9, pattern="block:4x4")
    assert art.verification["status"] == "passed"
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    layers = report["codegen"]["sparse_layers"]
    assert layers and all(d["chosen"] in ("sparse", "dense") for d in layers)
    weights = onnx.load(tmp_path / "a" / "model.onnx").graph.initializer
    big = [onnx.numpy_helper.to_array(t) for t in weights if t.dims and np.prod(t.dims) >= 256 * 512]
    assert big and all(np.mean(w == 0) >= 0.89 for w in big)


def test_manifest_records_target_options(tmp_path, conv_path):
    art = sparsecc.compile(conv_path, output=tmp_path / "a", target_options={"sparse_options": {"margin": 1.5}})
    assert art.manifest["options"]["target_options"] == {"sparse_options": {"margin": 1.5}}
