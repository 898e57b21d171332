"""GELU's erf, exp, tanh and softmax are computed by vectorizable approximations (TVM's FastMathTransform),
within the verification tolerance of ONNX Runtime's results."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from sparsecc.codegen import layout
from sparsecc.codegen.lowering import compile_module
from sparsecc.codegen.targets import cpu_target


def _gelu_softmax() -> onnx.ModelProto:
    """y = softmax(gelu(x)) with GELU spelled as BERT exports it: x * 0.5 * (1 + erf(x / sqrt(2)))."""
    consts = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
              (("s", 1.4142135), ("one", 1.0), ("half", 0.5))]
    nodes = [helper.make_node("Div", ["x", "s"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["x", "a"], ["m"]),
             helper.make_node("Mul", ["m", "half"], ["g"]), helper.make_node("Tanh", ["g"], ["t"]),
             helper.make_node("Softmax", ["t"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8, 64])], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def test_fast_math_matches_onnxruntime():
    model, target = _gelu_softmax(), cpu_target(2).target()
    with target:
        mod = tvm.transform.Sequential(layout.layout_passes(target))(from_onnx(model, keep_params_in_input=False))
    text = mod.script()
    assert "R.erf" not in text and "R.tanh" not in text and "R.nn.softmax" not in text
    assert "fast_erf" in text and "fast_tanh" in text and "fast_softmax" in text

    x = (np.random.default_rng(0).standard_normal((4, 8, 64)) * 3).astype(np.float32)
    x[0, 0, :8] = [-40.0, -12.0, -5.0, 0.0, 5.0, 12.0, 40.0, 1e-4]  # the approximations' clamped ranges
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ex = compile_module(from_onnx(model, keep_params_in_input=False), target)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5
