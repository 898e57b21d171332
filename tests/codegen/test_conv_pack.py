"""Conv weights packed as contiguous column panels: the lowered convs read 5-D panels and still match ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from sparsecc.codegen import conv_pack, layout
from sparsecc.codegen.cpu_schedule import column_tile
from sparsecc.codegen.lowering import compile_module
from sparsecc.codegen.targets import cpu_target

RNG = np.random.default_rng(0)


def _conv_model(c_in: int, c_out: int, k: int, size: int, **attrs) -> onnx.ModelProto:
    w = RNG.standard_normal((c_out, c_in // attrs.get("group", 1), k, k)).astype(np.float32)
    b = RNG.standard_normal(c_out).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[k, k], **attrs)
    graph = helper.make_graph(
        [node, helper.make_node("Relu", ["c"], ["y"])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model)


def _packed(model: onnx.ModelProto, target: tvm.target.Target, rank: int = 5) -> list[tuple[int, ...]]:
    """The shapes of the rank-`rank` constants after the layout passes and weight packing."""
    with target:
        mod = tvm.transform.Sequential(layout.layout_passes(target) + [conv_pack.pack_conv_weights(target)])(
            from_onnx(model, keep_params_in_input=False))
    shapes: list[tuple[int, ...]] = []
    relax.analysis.post_order_visit(mod["main"], lambda e: shapes.append(tuple(int(d) for d in e.value.shape))
                                    if isinstance(e, tvm.ir.Constant) and hasattr(e.value, "shape") else None)
    return [s for s in shapes if len(s) == rank]


@pytest.mark.parametrize("attrs", [
    {"pads": [1, 1, 1, 1]},
    {"pads": [0, 1, 2, 1], "strides": [2, 2]},
    {"pads": [2, 2, 2, 2], "dilations": [2, 2]},
])
def test_packed_conv_matches_ort(attrs):
    target = cpu_target(2).target()
    model = _conv_model(24, 96, 3, 11, **attrs)
    packed = _packed(model, target)
    out_w = onnx.shape_inference.infer_shapes(model).graph.output[0].type.tensor_type.shape.dim[3].dim_value
    p = column_tile(out_w, 96, target)
    assert packed == [(96 // p, 3, 3, 24, p)]

    x = RNG.standard_normal((1, 24, 11, 11)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ex = compile_module(from_onnx(model, keep_params_in_input=False), target)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5


def test_single_panel_and_grouped_convs_left_alone():
    target = cpu_target(2).target()
    assert _packed(_conv_model(8, column_tile(6, 32, target), 3, 6, pads=[1, 1, 1, 1]), target) == []
    assert _packed(_conv_model(64, 64, 3, 6, pads=[1, 1, 1, 1], group=64), target) == []
    assert _packed(_conv_model(64, 128, 3, 6, pads=[1, 1, 1, 1], group=2), target) == []


def _matmul_model(x_shape: list[int], n: int) -> onnx.ModelProto:
    k = x_shape[-1]
    inits = [numpy_helper.from_array(RNG.standard_normal((k, n)).astype(np.float32), "w"),
             numpy_helper.from_array(RNG.standard_normal(n).astype(np.float32), "b")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
         helper.make_node("Relu", ["a"], ["y"])], "fc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model)


@pytest.mark.parametrize("x_shape, n", [([8, 512], 256), ([1, 20, 96], 384), ([1, 512], 256)])
def test_matmul_weights_packed_as_panels_match_ort(x_shape, n):
    """A batch-8 fully connected layer or a transformer's projection reads its [k, n] weight as [n / P, k, P]
    panels, contiguous over k (AlexNet's 9216 x 4096 layer at batch 8: 14.3 -> 4.7 ms). Batch-1 matmuls are
    `layout.pack_gemv_weights`' (above 1 MB; this one is smaller and stays [k, n])."""
    target = cpu_target(2).target()
    model = _matmul_model(x_shape, n)
    m, k = int(np.prod(x_shape[:-1])), x_shape[-1]
    p = column_tile(x_shape[-2], n, target)
    assert _packed(model, target, rank=3) == ([(n // p, k, p)] if m > 1 else [])

    x = RNG.standard_normal(x_shape).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ex = compile_module(from_onnx(model, keep_params_in_input=False), target)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5
