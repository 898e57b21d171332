"""Channel shuffles in NHWC (`codegen/shuffle.py`, wired into `codegen/layout.py`).

A ShuffleNet-v2 unit in miniature (conv, shuffle, channel Split or Slice, conv, Concat, shuffle, conv) must
compile through the real pipeline, match ONNX Runtime, and after the layout passes run entirely in NHWC:
transposes only at the graph's boundaries, and every split, concatenation and shuffle on the channel axis (3).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

import sparsecc
from sparsecc.codegen import layout
from sparsecc.codegen.frontend import to_relax
from sparsecc.codegen.targets import cpu_target
from sparsecc.ir import load_model

RNG = np.random.default_rng(0)
N, C, H, W = 2, 16, 6, 6


def _conv(name: str, x: str, c_in: int, c_out: int, k: int, inits: dict, group: int = 1) -> list[onnx.NodeProto]:
    inits[f"{name}_w"] = RNG.standard_normal((c_out, c_in // group, k, k)) * 0.3
    inits[f"{name}_b"] = RNG.standard_normal(c_out) * 0.1
    conv = helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_c"], kernel_shape=[k, k],
                            pads=[k // 2] * 4, group=group)
    return [conv, helper.make_node("Relu", [f"{name}_c"], [name])]


def _shuffle(name: str, x: str, groups: int, inits: dict) -> list[onnx.NodeProto]:
    inits[f"{name}_s5"] = np.array([N, groups, C // groups, H, W], np.int64)
    inits[f"{name}_s4"] = np.array([N, C, H, W], np.int64)
    return [helper.make_node("Reshape", [x, f"{name}_s5"], [f"{name}_5"]),
            helper.make_node("Transpose", [f"{name}_5"], [f"{name}_t"], perm=[0, 2, 1, 3, 4]),
            helper.make_node("Reshape", [f"{name}_t", f"{name}_s4"], [name])]


def _halves(x: str, split: str, inits: dict) -> list[onnx.NodeProto]:
    if split == "split":
        inits["halves"] = np.array([C // 2, C // 2], np.int64)
        return [helper.make_node("Split", [x, "halves"], ["a", "b"], axis=1)]
    inits.update(zero=np.array([0], np.int64), mid=np.array([C // 2], np.int64), end=np.array([C], np.int64),
                 axis=np.array([1], np.int64))
    return [helper.make_node("Slice", [x, "zero", "mid", "axis"], ["a"]),
            helper.make_node("Slice", [x, "mid", "end", "axis"], ["b"])]


def shuffle_unit(split: str = "split", groups: int = 2, tail_conv: bool = True) -> onnx.ModelProto:
    """conv -> shuffle -> halves a, b -> b: 1x1, depthwise 3x3 -> concat(a, b) -> shuffle [-> 1x1 conv]."""
    inits: dict[str, np.ndarray] = {}
    nodes = _conv("stem", "x", 3, C, 3, inits) + _shuffle("s1", "stem", groups, inits) + _halves("s1", split, inits)
    nodes += _conv("b1", "b", C // 2, C // 2, 1, inits) + _conv("b2", "b1", C // 2, C // 2, 3, inits, group=C // 2)
    nodes += [helper.make_node("Concat", ["a", "b2"], ["cat"], axis=1)] + _shuffle("s2", "cat", groups, inits)
    out, c_out = "s2", C
    if tail_conv:
        nodes += _conv("head", "s2", C, 8, 1, inits)
        out, c_out = "head", 8
    graph = helper.make_graph(
        nodes, "shuffle_unit", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [N, 3, H, W])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [N, c_out, H, W])],
        [numpy_helper.from_array(v.astype(np.float32) if v.dtype == np.float64 else v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def _layout_ir(model: onnx.ModelProto) -> relax.Function:
    target = cpu_target(2).target()
    with target:
        mod = tvm.transform.Sequential(layout.layout_passes(target))(to_relax(load_model(model)))
    return mod["main"]


def _calls(func: relax.Function) -> list[relax.Call]:
    calls: list[relax.Call] = []
    relax.analysis.post_order_visit(func, lambda e: calls.append(e) if isinstance(e, relax.Call) else None)
    return calls


def _op(call: relax.Call) -> str:
    return call.op.name if isinstance(call.op, tvm.ir.Op) else ""


def _shape(expr: relax.Expr) -> tuple[int, ...]:
    return tuple(int(d) for d in expr.ty.shape.values)


@pytest.mark.parametrize("split,groups", [("split", 2), ("slice", 2), ("split", 4)])
def test_shuffle_stays_nhwc(split, groups):
    calls = _calls(_layout_ir(shuffle_unit(split, groups)))
    transposes = [c for c in calls if _op(c) == "relax.permute_dims" and len(_shape(c)) == 4]
    # The input's NCHW -> NHWC and the output's NHWC -> NCHW, nothing between.
    assert [tuple(int(a) for a in c.attrs.axes) for c in transposes] == [(0, 2, 3, 1), (0, 3, 1, 2)]
    assert isinstance(transposes[0].args[0], relax.Var) and _shape(transposes[0].args[0]) == (N, 3, H, W)
    grouped = [_shape(c) for c in calls if _op(c) == "relax.reshape" and len(_shape(c)) == 5]
    assert grouped == [(N, H, W, groups, C // groups)] * 2  # both shuffles, on the channel axis of NHWC
    swaps = [tuple(int(a) for a in c.attrs.axes) for c in calls if _op(c) == "relax.permute_dims"
             and len(_shape(c)) == 5]
    assert swaps == [(0, 1, 2, 4, 3)] * 2
    channel_ops = [c for c in calls if _op(c) in ("relax.split", "relax.concat", "relax.strided_slice")]
    assert {"relax.concat", "relax.split" if split == "split" else "relax.strided_slice"} <= {_op(c) for c in channel_ops}
    for c in channel_ops:
        axes = [int(a.value) for a in c.args[1].fields] if _op(c) == "relax.strided_slice" else [int(c.attrs.axis)]
        assert axes == [3], c


def test_shuffle_at_the_output_is_left_to_the_boundary():
    """A shuffle whose result leaves the graph still goes back to NCHW once, after the NHWC shuffle."""
    calls = _calls(_layout_ir(shuffle_unit(tail_conv=False)))
    transposes = [tuple(int(a) for a in c.attrs.axes) for c in calls
                  if _op(c) == "relax.permute_dims" and len(_shape(c)) == 4]
    assert transposes == [(0, 2, 3, 1), (0, 3, 1, 2)]


@pytest.mark.parametrize("split,groups,tail_conv", [("split", 2, True), ("slice", 4, False)])
def test_compiled_shuffle_matches_onnxruntime(tmp_path, split, groups, tail_conv):
    model = shuffle_unit(split, groups, tail_conv)
    art = sparsecc.compile(model, target="cpu", output=tmp_path / "art", threads=2)
    assert art.verification["status"] == "passed"
    report = json.loads((art.path / "report.json").read_text())
    assert report["codegen"]["schedules"] == "sparsecc"  # our pipeline, not the stock fallback
    x = RNG.standard_normal((N, 3, H, W)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    out = sparsecc.load(art.path).run({"x": x})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
