"""Convs of channel concatenations computed as sums of convs of the parts (SqueezeNet's fire modules)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from conftest import lowered_names, make_model
from sparsecc.codegen import lowering
from sparsecc.codegen.targets import cpu_target

RNG = np.random.default_rng(0)


def _fire(pool: bool, concat_is_output: bool, squeeze: int = 16, second: int = 0) -> onnx.ModelProto:
    """x -> 1x1 and 3x3 expand convs -> concat [-> max pool] -> 1x1 squeeze conv -> relu."""
    def w(o, i, k):
        return numpy_helper.from_array((RNG.standard_normal((o, i, k, k)) / np.sqrt(i * k * k)).astype(np.float32),
                                       f"w{len(inits)}")
    inits: list[onnx.TensorProto] = []
    for shape in ((32, 8, 1), (48, 8, 3), (squeeze, 80, 1)):
        inits.append(w(*shape))
    nodes = [helper.make_node("Conv", ["x", inits[0].name], ["e1"], kernel_shape=[1, 1]),
             helper.make_node("Conv", ["x", inits[1].name], ["e3"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["e1", "e3"], ["cat"], axis=1)]
    src = "cat"
    if pool:
        nodes.append(helper.make_node("MaxPool", ["cat"], ["pooled"], kernel_shape=[3, 3], strides=[2, 2]))
        src = "pooled"
    nodes += [helper.make_node("Conv", [src, inits[2].name], ["s"], kernel_shape=[1, 1]),
              helper.make_node("Relu", ["s"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if second:  # a second conv reading the (pooled) concatenation
        inits.append(w(second, 80, 1))
        nodes.append(helper.make_node("Conv", [src, inits[-1].name], ["y2"], kernel_shape=[1, 1]))
        outputs.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, None))
    if concat_is_output:
        outputs.append(helper.make_tensor_value_info("cat", TensorProto.FLOAT, None))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 15, 15])
    return onnx.shape_inference.infer_shapes(make_model(nodes, [x], outputs, inits))


@pytest.mark.parametrize("pool,concat_is_output,squeeze,second,split", [
    (False, False, 16, 0, True),
    (True, False, 16, 0, True),     # the pool moves onto the parts, then the pooled concat is split
    (False, True, 16, 0, False),    # the concatenation is needed anyway
    (False, False, 96, 0, False),   # more output channels than the concatenation: the partial sum costs more
    (False, False, 16, 32, True),   # two convs: 16 + 32 partial channels against 80
    (True, False, 48, 48, False),   # 48 + 48 > 80
])
def test_concat_split_matches_ort(pool, concat_is_output, squeeze, second, split):
    target = cpu_target(2).target()
    model = _fire(pool, concat_is_output, squeeze, second)
    names = lowered_names(model, target)
    assert (not any("concatenate" in n for n in names)) == split, names

    x = RNG.standard_normal((2, 8, 15, 15)).astype(np.float32)
    refs = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    ex = lowering.compile_module(from_onnx(model, keep_params_in_input=False), target)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))
    outs = [out] if isinstance(out, tvm.runtime.Tensor) else list(out)
    for o, ref in zip(outs, refs):
        assert o.numpy().shape == ref.shape
        assert np.abs(o.numpy() - ref).max() / np.abs(ref).max() < 1e-5
