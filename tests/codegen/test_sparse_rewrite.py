"""The Relax rewrite: which imported ops are matched, the rewritten module matches ONNX Runtime, end to end."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from sparsecc.codegen.frontend import to_relax
from sparsecc.codegen.lowering import compile_module
from sparsecc.codegen.sparse import layer_names, rewrite_sparse
from sparsecc.codegen.targets import cpu_target
from sparsecc.ir import load_model
from sparsecc.passes.sparsify import SparsifyPass

TARGET = cpu_target(2).target()
FORCE = {"measure": False, "force": "sparse", "min_params": 0}


def blocky(n: int, k: int, block=(4, 4), density=0.2, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    r, c = block
    w = (rng.standard_normal((n, k)) * 0.2).astype(np.float32)
    return w * np.kron(rng.random((n // r, k // c)) < density, np.ones(block)).astype(np.float32)


def onnx_model(nodes, inits, x_shape, y_shape) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def compare_with_ort(proto: onnx.ModelProto, options: dict, x: np.ndarray) -> tuple[list[dict], tvm.IRModule]:
    model = load_model(proto)
    mod, records = rewrite_sparse(to_relax(model), TARGET, {**options, "layer_names": layer_names(model.proto)})
    vm = relax.VirtualMachine(compile_module(mod, TARGET), tvm.cpu())
    ours = vm["main"](tvm.runtime.tensor(x)).numpy()
    ref = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-6) < 1e-4
    return records, mod


def sparse_calls(mod: tvm.IRModule) -> int:
    return sum(1 for gv in mod.functions if gv.name_hint.startswith("sparse_matmul"))


def test_gemm_trans_b():
    w = blocky(64, 32)
    proto = onnx_model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, name="fc")],
                       {"w": w, "b": np.arange(64, dtype=np.float32)}, [3, 32], [3, 64])
    records, mod = compare_with_ort(proto, FORCE, np.random.default_rng(1).standard_normal((3, 32)).astype(np.float32))
    assert sparse_calls(mod) == 1
    (rec,) = records
    assert rec["layer"] == "fc" and rec["chosen"] == "sparse" and rec["shape"] == [3, 32, 64]
    assert rec["format"] in ("bsr", "csr") and rec["sparsity"] == pytest.approx(1 - np.count_nonzero(w) / w.size, abs=1e-4)


def test_matmul_add_rank3_input():
    w = blocky(48, 40, block=(16, 1), density=0.3).T.copy()  # MatMul weight is [K, N]
    proto = onnx_model([helper.make_node("MatMul", ["x", "w"], ["t"], name="mm"),
                        helper.make_node("Add", ["t", "b"], ["y"], name="add")],
                       {"w": w, "b": np.ones(48, np.float32)}, [2, 5, 40], [2, 5, 48])
    records, mod = compare_with_ort(proto, FORCE, np.random.default_rng(2).standard_normal((2, 5, 40)).astype(np.float32))
    assert sparse_calls(mod) == 1 and records[0]["layer"] == "mm" and records[0]["shape"] == [10, 40, 48]


def test_conv_layout_is_nhwc_after_rewrite():
    """By default the CPU layout passes run first: a 1x1 conv becomes reshape -> kernel -> reshape."""
    w = blocky(32, 16, density=0.25).reshape(32, 16, 1, 1)
    proto = onnx_model([helper.make_node("Conv", ["x", "w"], ["c"], name="pw"),
                        helper.make_node("Relu", ["c"], ["y"], name="relu")], {"w": w}, [1, 16, 5, 7], [1, 32, 5, 7])
    _, mod = compare_with_ort(proto, FORCE, np.random.default_rng(3).standard_normal((1, 16, 5, 7)).astype(np.float32))
    text = mod["main"].script()
    assert text.count("R.permute_dims") == 2  # only at the graph boundary (NCHW in, NCHW out)
    assert "R.nn.relu" not in text and "R.nn.conv2d" not in text


def test_conv1x1_nchw():
    w = blocky(32, 16, density=0.25).reshape(32, 16, 1, 1)
    proto = onnx_model([helper.make_node("Conv", ["x", "w"], ["y"], name="pw")], {"w": w}, [1, 16, 5, 7],
                       [1, 32, 5, 7])
    records, mod = compare_with_ort(proto, {**FORCE, "layout": False},
                                    np.random.default_rng(3).standard_normal((1, 16, 5, 7)).astype(np.float32))
    assert sparse_calls(mod) == 1 and records[0]["op"] == "Conv" and records[0]["shape"] == [35, 16, 32]


@pytest.mark.parametrize("attrs, out_hw", [
    ({"pads": [1, 1, 1, 1]}, (5, 6)),
    ({"pads": [0, 1, 2, 1], "strides": [2, 1]}, (3, 6)),
    ({"pads": [2, 2, 2, 2], "dilations": [2, 2]}, (5, 6)),
    ({"strides": [2, 2]}, (2, 2)),
])
def test_kxk_conv_through_im2col(attrs, out_hw):
    # Blocks of 4 along input channels at one (kh, kw): the sparsify pass's [O, kh*kw*I] view.
    w2 = blocky(32, 3 * 3 * 16, block=(4, 4), density=0.3)
    w = w2.reshape(32, 3, 3, 16).transpose(0, 3, 1, 2).copy()
    proto = onnx_model([helper.make_node("Conv", ["x", "w"], ["y"], name="c3", **attrs)], {"w": w},
                       [2, 16, 5, 6], [2, 32, *out_hw])
    x = np.random.default_rng(4).standard_normal((2, 16, 5, 6)).astype(np.float32)
    records, mod = compare_with_ort(proto, FORCE, x)
    assert sparse_calls(mod) == 1 and records[0]["layer"] == "c3"
    assert records[0]["shape"] == [2 * out_hw[0] * out_hw[1], 144, 32]


def test_conv1x1_nhwc_hwio():
    """The layout the CPU pipeline converts convolutions to."""
    w = blocky(32, 24, block=(8, 1), density=0.3)  # [O, I]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 4, 4, 24), "float32"))
    hwio = relax.const(np.ascontiguousarray(w.T.reshape(1, 1, 24, 32)))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, hwio, data_layout="NHWC", kernel_layout="HWIO"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod, records = rewrite_sparse(bb.get(), TARGET, FORCE)
    assert sparse_calls(mod) == 1 and records[0]["shape"] == [32, 24, 32]
    xv = np.random.default_rng(5).standard_normal((2, 4, 4, 24)).astype(np.float32)
    got = relax.VirtualMachine(compile_module(mod, TARGET), tvm.cpu())["main"](tvm.runtime.tensor(xv)).numpy()
    np.testing.assert_allclose(got, (xv.reshape(-1, 24) @ w.T).reshape(2, 4, 4, 32), rtol=1e-4, atol=1e-5)


def test_dense_weight_left_alone():
    w = np.random.default_rng(6).standard_normal((64, 64)).astype(np.float32)
    proto = onnx_model([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="fc")], {"w": w}, [4, 64], [4, 64])
    model = load_model(proto)
    mod = to_relax(model)
    new, records = rewrite_sparse(mod, TARGET, {"measure": False, "layout": False})
    assert new.same_as(mod)  # nothing chosen: the module is returned as it was
    assert records[0]["chosen"] == "dense" and "min_sparsity" in records[0]["reason"]


def test_measured_decision_records_both_times():
    w = blocky(256, 256, block=(16, 1), density=0.05)
    proto = onnx_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], {"w": w.T.copy()}, [4, 256], [4, 256])
    records, _ = compare_with_ort(proto, {"measure_top": 2, "repeat": 3, "number": 3},
                                  np.random.default_rng(7).standard_normal((4, 256)).astype(np.float32))
    (rec,) = records
    assert rec["dense_us"] > 0 and rec["sparse_us"] > 0 and rec["chosen"] in ("dense", "sparse")
    assert len(rec["tried"]) == 2
    if rec["chosen"] == "sparse":  # sparse is only kept when it wins by the margin
        assert rec["sparse_us"] * 1.2 < rec["dense_us"]


def mlp(batch: int = 4, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = {"w1": (rng.standard_normal((128, 64)) * 0.1).astype(np.float32), "b1": rng.standard_normal(128).astype(np.float32),
             "w2": (rng.standard_normal((128, 96)) * 0.1).astype(np.float32), "b2": rng.standard_normal(96).astype(np.float32),
             "w3": (rng.standard_normal((10, 96)) * 0.1).astype(np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], transB=1, name="fc1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="fc2"),
             helper.make_node("Add", ["m2", "b2"], ["h2"], name="add2"),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("Gemm", ["r2", "w3"], ["y"], transB=1, name="fc3")]
    return onnx_model(nodes, inits, [batch, 64], [batch, 10])


def test_sparsified_mlp_end_to_end():
    """sparsify (90%, 4x4 blocks) -> import -> rewrite -> compile, against ONNX Runtime on the sparse model."""
    model = SparsifyPass(0.9, "block:4x4", min_params=0)(load_model(mlp()), None)
    x = np.random.default_rng(8).standard_normal((4, 64)).astype(np.float32)
    records, mod = compare_with_ort(model.proto, {**FORCE, "blocks": [(4, 4)]}, x)
    assert [r["layer"] for r in records] == ["fc1", "fc2", "fc3"]
    assert all(r["chosen"] == "sparse" and r["block"] == [4, 4] for r in records[:2])
    assert sparse_calls(mod) >= 2
    assert all(r["sparsity"] == pytest.approx(0.9, abs=0.02) for r in records[:2])
    # Bias adds and ReLUs were folded into the kernels' epilogues; only fc3 (10 rows: no 4x4 tiling) is dense.
    text = mod["main"].script()
    assert "R.nn.relu" not in text and "R.add" not in text and text.count("R.matmul") == 1


def test_epilogue_not_fused_when_shared():
    """A matmul result used twice keeps its own kernel; the add and relu stay Relax ops."""
    w = blocky(32, 32, density=0.2)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1, name="fc"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Add", ["h", "r"], ["y"], name="residual")]
    proto = onnx_model(nodes, {"w": w, "b": np.ones(32, np.float32)}, [4, 32], [4, 32])
    records, mod = compare_with_ort(proto, FORCE, np.random.default_rng(10).standard_normal((4, 32)).astype(np.float32))
    text = mod["main"].script()
    assert sparse_calls(mod) == 1 and "R.nn.relu" in text


def test_compile_api_with_sparsify_pass(tmp_path):
    """The public entry point; uses our kernels once `rewrite_sparse` is wired into codegen."""
    import sparsecc

    art = sparsecc.compile(mlp(), target="cpu", output=tmp_path / "a.sparsecc",
                           passes=[("sparsify", {"sparsity": 0.9, "pattern": "block:4x4"})])
    assert art.verification["status"] == "passed"
    x = np.random.default_rng(9).standard_normal((4, 64)).astype(np.float32)
    ours = sparsecc.load(art.path).run({"x": x})[0]
    ref = ort.InferenceSession((art.path / "model.onnx").read_bytes(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4


def test_rewrite_failure_keeps_layer_dense(monkeypatch):
    """Any failure while emitting a kernel leaves the layer dense and the model correct."""
    import sparsecc.codegen.sparse.rewrite as rewrite_mod

    def boom(*args, **kwargs):
        raise RuntimeError("kernel emission exploded")

    monkeypatch.setattr(rewrite_mod, "sparse_call", boom)
    model = SparsifyPass(0.9, "block:4x4", min_params=0)(load_model(mlp()), None)
    records, mod = compare_with_ort(model.proto, {**FORCE, "blocks": [(4, 4)]},
                                    np.random.default_rng(11).standard_normal((4, 64)).astype(np.float32))
    assert sparse_calls(mod) == 0
    assert [r["chosen"] for r in records] == ["dense"] * 3
    assert all("failed" in r["reason"] for r in records[:2])  # fc1, fc2 (fc3 has no 4x4 tiling)


def test_measuring_budget_falls_back_to_the_model():
    w = blocky(128, 128, block=(16, 1), density=0.05)
    proto = onnx_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], {"w": w.T.copy()}, [4, 128], [4, 128])
    records, _ = compare_with_ort(proto, {"budget_s": 0}, np.random.default_rng(12).standard_normal((4, 128)).astype(np.float32))
    assert records[0]["reason"] == "predicted" and records[0]["dense_us"] is None
