"""Matmuls whose column count is not a whole number of vectors (pruned widths) are padded, then sliced."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from sparsecc.codegen import layout
from sparsecc.codegen.cpu_schedule import vector_lanes
from sparsecc.codegen.lowering import compile_module
from sparsecc.codegen.matmul_pad import padded_columns
from sparsecc.codegen.targets import cpu_target

RNG = np.random.default_rng(0)


def _mlp(k: int, hidden: int, out: int) -> onnx.ModelProto:
    """x [2, 5, k] -> MatMul(hidden) + bias -> Relu -> MatMul(out): a transformer MLP pruned to odd widths."""
    inits = {"w1": RNG.standard_normal((k, hidden)), "b1": RNG.standard_normal(hidden),
             "w2": RNG.standard_normal((hidden, out))}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, out])],
        [numpy_helper.from_array(v.astype(np.float32), n) for n, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def test_padded_columns():
    assert padded_columns(447, 16) == 448 and padded_columns(241, 16) == 256
    assert padded_columns(384, 16) == 384 and padded_columns(12, 16) == 12


def test_odd_widths_padded_and_exact():
    target = cpu_target(2).target()
    lanes = vector_lanes(target)
    model = _mlp(24, 37, 21)
    with target:
        mod = tvm.transform.Sequential(layout.layout_passes(target))(from_onnx(model, keep_params_in_input=False))
    text = mod["main"].script()
    widths = {int(c.value.shape[1]) for c in _constants(mod["main"]) if len(getattr(c.value, "shape", ())) == 2}
    assert widths == {padded_columns(37, lanes), padded_columns(21, lanes)}, widths
    assert text.count("R.strided_slice") == 2

    x = RNG.standard_normal((2, 5, 24)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ex = compile_module(from_onnx(model, keep_params_in_input=False), target)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    assert out.shape == ref.shape == (2, 5, 21)
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5


def _constants(func: relax.Function) -> list[tvm.ir.Constant]:
    found: list[tvm.ir.Constant] = []
    relax.analysis.post_order_visit(func, lambda e: found.append(e) if isinstance(e, tvm.ir.Constant) else None)
    return found
