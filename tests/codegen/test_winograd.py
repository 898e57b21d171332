"""Winograd F(2x2, 3x3) convs: the transforms are right, and compiled models match ORT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import lowered_names, make_model, max_rel_error_vs_ort
from sparsecc.codegen import winograd
from sparsecc.codegen.targets import cpu_target

RNG = np.random.default_rng(0)


def test_transforms_compute_the_correlation():
    bt = np.zeros((4, 4))
    for i, terms in enumerate(winograd.BT_TERMS):
        for j, s in terms:
            bt[i, j] = s
    at = np.array([[1, 1, 1, 0], [0, 1, -1, -1]])
    g = RNG.standard_normal((3, 3, 5, 7))
    d = RNG.standard_normal((4, 4, 5))
    u = winograd.weight_transform(g).reshape(4, 4, 5, 7).astype(np.float64)
    v = np.einsum("ai,ijc,bj->abc", bt, d, bt)
    y = np.einsum("ra,abo,sb->rso", at, np.einsum("abc,abco->abo", v, u), at)
    direct = np.array([[np.einsum("ijc,ijco->o", d[r:r + 3, s:s + 3], g) for s in range(2)] for r in range(2)])
    np.testing.assert_allclose(y, direct, rtol=1e-6, atol=1e-6)


def _model(c_in: int, c_out: int, size: int, batch: int = 1, residual: bool = False, **attrs) -> onnx.ModelProto:
    w = (RNG.standard_normal((c_out, c_in, 3, 3)) / np.sqrt(9 * c_in)).astype(np.float32)
    b = RNG.standard_normal(c_out).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], **attrs),
             helper.make_node("Relu", ["c"], ["r"])]
    if residual:  # a second conv whose output is added to the first's: an epilogue with two inputs
        nodes += [helper.make_node("Conv", ["r", "w2", "b"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                  helper.make_node("Add", ["c2", "r"], ["y"])]
    else:
        nodes[-1].output[0] = "y"
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    if residual:
        w2 = (RNG.standard_normal((c_out, c_out, 3, 3)) / np.sqrt(9 * c_out)).astype(np.float32)
        inits.append(numpy_helper.from_array(w2, "w2"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c_in, size, size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return onnx.shape_inference.infer_shapes(make_model(nodes, [x], [y], inits))


@pytest.mark.parametrize("case", [
    dict(c_in=32, c_out=48, size=11, pads=[1, 1, 1, 1]),                # odd output: half-empty last tiles
    dict(c_in=40, c_out=64, size=12, pads=[0, 1, 2, 1]),                # asymmetric padding
    dict(c_in=32, c_out=32, size=7, batch=2, residual=True, pads=[1, 1, 1, 1]),
    dict(c_in=32, c_out=32, size=13, pads=[1, 1, 1, 1]),                # 49 tiles: one block, not one per thread
])
def test_winograd_conv_matches_ort(case):
    target = cpu_target(2).target()
    model = _model(**case)
    names = lowered_names(model, target)
    assert "winograd_matmul" in names, names  # (both convs of the residual case share it)
    assert not any("conv2d" in n for n in names), names
    assert any(n.startswith("fused_winograd_output") and "relu" in n for n in names), names  # epilogue fused

    x = RNG.standard_normal((case.get("batch", 1), case["c_in"], case["size"], case["size"])).astype(np.float32)
    assert max_rel_error_vs_ort(model, x, target) < 1e-5


def test_tiles_are_laid_out_in_one_block_per_thread():
    assert winograd.thread_parts(36, 2) == 2 and winograd.thread_parts(36, 4) == 4
    assert winograd.thread_parts(25, 2) == 1 and winograd.thread_parts(36, 1) == 1
    v = winograd._input_transform(winograd.te.placeholder((1, 14, 14, 8), name="d"), 2)
    assert [int(d) for d in v.shape] == [2, 16, 18, 8]  # 6 x 6 tiles: 18 per thread


@pytest.mark.parametrize("case", [
    dict(c_in=16, c_out=64, size=12, pads=[1, 1, 1, 1]),                 # too few input channels
    dict(c_in=64, c_out=64, size=7, pads=[1, 1, 1, 1]),                  # too few tiles: weight-bound
    dict(c_in=64, c_out=64, size=12, pads=[1, 1, 1, 1], strides=[2, 2]),
    dict(c_in=64, c_out=64, size=12, pads=[2, 2, 2, 2], dilations=[2, 2]),
    dict(c_in=64, c_out=64, size=12, pads=[1, 1, 1, 1], group=2),
])
def test_other_convs_stay_direct(case):
    w_in = case["c_in"] // case.get("group", 1)
    model = _model(**case)
    if case.get("group"):  # the weight of a grouped conv has c_in / group input channels
        w = next(i for i in model.graph.initializer if i.name == "w")
        w.CopyFrom(numpy_helper.from_array(RNG.standard_normal((case["c_out"], w_in, 3, 3)).astype(np.float32), "w"))
    names = lowered_names(model, cpu_target(2).target())
    assert not any("winograd" in n for n in names), names


def test_transforms_beyond_the_cache_need_enough_channels():
    assert winograd.worth_it(128, 32, [8, 28, 28, 32])      # 12.8 MB transformed: still in the last-level cache
    assert not winograd.worth_it(128, 32, [8, 56, 56, 32])  # 51 MB read back for 32 columns each
    assert winograd.worth_it(128, 64, [8, 56, 56, 64])      # 51 MB, reused for 64 columns
    assert not winograd.worth_it(32, 128, [8, 27, 27, 128])  # 16 MB for a 32-long reduction
    assert winograd.worth_it(32, 128, [1, 27, 27, 128])      # 2 MB: in cache
    assert winograd.worth_it(64, 256, [8, 13, 13, 256])
