"""Planned intermediate tensors are centred in their storage blocks, and results still match ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from conftest import make_model, max_rel_error_vs_ort
from sparsecc.codegen import lowering, storage
from sparsecc.codegen.targets import cpu_target


def _shrinking_model():
    """Convs whose outputs shrink (stride 2, fewer channels): later tensors reuse larger, dead blocks."""
    rng = np.random.default_rng(0)
    specs = [(3, 32, 1), (32, 32, 2), (32, 16, 1), (16, 24, 2), (24, 8, 1)]
    nodes, inits, x = [], [], "x"
    for i, (ci, co, stride) in enumerate(specs):
        inits.append(numpy_helper.from_array((rng.standard_normal((co, ci, 3, 3)) / ci).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1], strides=[stride, stride]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x = f"r{i}"
    nodes[-1] = helper.make_node("Relu", ["c4"], ["y"])
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 32, 32])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 8, 8])], inits)


@pytest.fixture(scope="module")
def target():
    return cpu_target(threads=2).target()


def _planned_main(model, target):
    with target:
        mod = tvm.transform.Sequential(lowering.lowering_passes(target) + [
            relax.transform.StaticPlanBlockMemory(), storage.center_tensors()])(
                from_onnx(model, keep_params_in_input=False))
    return mod["main"]


def test_tensors_are_centred_in_their_storage(target):
    sizes, placements = {}, []
    for block in _planned_main(_shrinking_model(), target).body.blocks:
        for b in block.bindings:
            v = b.value
            if storage._is_call(v, "relax.memory.alloc_storage"):
                sizes[b.var] = int(v.args[0].values[0])
            elif storage._is_call(v, "relax.memory.alloc_tensor") and v.args[0] in sizes:
                placements.append((sizes[v.args[0]], int(v.args[1].value), storage._tensor_bytes(v)))
    assert any(offset > 0 for _, offset, _ in placements), placements  # some tensor reuses a larger block
    for size, offset, nbytes in placements:
        assert offset % storage.ALIGNMENT == 0 and offset + nbytes <= size
        assert abs((offset + nbytes / 2) - size / 2) < storage.ALIGNMENT  # the tensor's middle is the block's


def test_centred_tensors_match_onnxruntime(target):
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert max_rel_error_vs_ort(_shrinking_model(), x, target) < 1e-4
