"""Grouped convs with narrow groups, computed as shifted depthwise sums: the algebra holds, and compiled
models match ORT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import lowered_module, lowered_names, make_model, max_rel_error_vs_ort
from sparsecc.codegen import group_conv
from sparsecc.codegen.cpu_schedule import group_lanes, vector_lanes
from sparsecc.codegen.targets import cpu_target

RNG = np.random.default_rng(0)


def test_shifted_weight_computes_the_grouped_sum():
    """sum_d x[c + d] w'[d, c] over the 2k - 1 shifts equals the grouped conv's sum over c's group."""
    k, groups = 4, 3
    c = k * groups
    w = RNG.standard_normal((1, 1, k, c))
    x = RNG.standard_normal(c)
    grouped = np.array([x[o // k * k:o // k * k + k] @ w[0, 0, :, o] for o in range(c)])
    shifted_w = group_conv.shifted_weight(w)[0, 0]
    padded = np.concatenate([np.zeros(k - 1), x, np.zeros(k - 1)])
    shifted = np.array([padded[o:o + 2 * k - 1] @ shifted_w[:, o] for o in range(c)])
    np.testing.assert_allclose(shifted, grouped, rtol=1e-12)


def _model(c: int, groups: int, size: int, batch: int = 1, c_out: int | None = None, **attrs) -> onnx.ModelProto:
    c_out = c_out or c
    w = (RNG.standard_normal((c_out, c // groups, 3, 3)) / np.sqrt(9 * c // groups)).astype(np.float32)
    b = RNG.standard_normal(c_out).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], group=groups, **attrs),
             helper.make_node("Relu", ["c"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c, size, size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    return onnx.shape_inference.infer_shapes(make_model(nodes, [x], [y], inits))


@pytest.mark.parametrize("case", [
    dict(c=128, groups=32, size=14, pads=[1, 1, 1, 1]),                      # ResNeXt's groups of 4
    dict(c=32, groups=8, size=11, batch=2, pads=[1, 1, 1, 1], strides=[2, 2]),
    dict(c=48, groups=16, size=9, pads=[0, 1, 2, 1], dilations=[2, 2]),      # groups of 3, asymmetric pads
])
def test_shifted_grouped_conv_matches_ort(case):
    target = cpu_target(2).target()
    model = _model(**case)
    names = lowered_names(model, target)
    assert any(n.startswith("fused_group_conv2d_shifted") and "relu" in n for n in names), names  # epilogue fused
    assert not any("conv2d_nhwc" in n or n.startswith("fused_conv2d") for n in names), names

    x = RNG.standard_normal((case.get("batch", 1), case["c"], case["size"], case["size"])).astype(np.float32)
    assert max_rel_error_vs_ort(model, x, target) < 1e-5


@pytest.mark.parametrize("case", [
    dict(c=512, groups=32, size=7, pads=[1, 1, 1, 1]),             # groups of 16: a whole vector per group
    dict(c=64, groups=64, size=7, pads=[1, 1, 1, 1]),              # depthwise
    dict(c=64, groups=16, size=7, c_out=128, pads=[1, 1, 1, 1]),   # 4 inputs but 8 outputs per group
    dict(c=56, groups=7, size=28, pads=[1, 1, 1, 1]),              # RegNet: 56 channels in 8-lane vectors
    dict(c=64, groups=8, size=11, batch=2, pads=[1, 1, 1, 1], strides=[2, 2]),  # groups of 8
])
def test_other_grouped_convs_stay_grouped(case):
    target = cpu_target(2).target()
    assert vector_lanes(target) <= 16
    model = _model(**case)
    names = lowered_names(model, target)
    assert not any("shifted" in n for n in names), names
    x = RNG.standard_normal((case.get("batch", 1), case["c"], case["size"], case["size"])).astype(np.float32)
    assert max_rel_error_vs_ort(model, x, target) < 1e-5


def test_group_lanes_keep_each_vector_within_a_group():
    assert group_lanes(16, 16) == 16 and group_lanes(32, 16) == 16
    assert group_lanes(8, 16) == 8 and group_lanes(24, 16) == 8  # half-width 256-bit vectors
    assert group_lanes(4, 16) is None and group_lanes(12, 16) is None  # shifted instead
    assert group_lanes(8, 8) == 8 and group_lanes(4, 8) is None  # AVX2: no half-width vectors
    assert group_lanes(4, 4) == 4 and group_lanes(2, 4) is None


def test_groups_of_8_use_8_lane_vectors():
    """With 16-lane vectors, a conv in groups of 8 is computed with 8-lane ones, each within a group."""
    target = cpu_target(2).target()
    if vector_lanes(target) != 16:
        pytest.skip("needs a 16-lane (AVX-512) target")
    model = _model(c=256, groups=32, size=28, batch=2, pads=[1, 1, 1, 1])
    conv = next(f for gv, f in lowered_module(model, target).functions_items() if "conv2d" in gv.name_hint)
    text = conv.script()
    assert "T.vectorized(T.int64(8))" in text and "T.vectorized(T.int64(16))" not in text, text
