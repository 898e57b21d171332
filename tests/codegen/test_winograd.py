"""Winograd F(4x4, 3x3) and F(2x2, 3x3) convs: the transforms are right, and compiled models match ORT."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

from conftest import lowered_module, lowered_names, make_model, max_rel_error_vs_ort
from sparsecc.codegen import winograd
from sparsecc.codegen.targets import cpu_target

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("tiling", [winograd.F2, winograd.F4], ids=["F2", "F4"])
def test_transforms_compute_the_correlation(tiling):
    m, a = tiling.m, tiling.alpha
    bt, at = np.array(tiling.bt, dtype=np.float64), np.array(tiling.at, dtype=np.float64)
    g = RNG.standard_normal((3, 3, 5, 7))
    d = RNG.standard_normal((a, a, 5))
    u = winograd.weight_transform(g, tiling).reshape(a, a, 5, 7).astype(np.float64)
    v = np.einsum("ai,ijc,bj->abc", bt, d, bt)
    y = np.einsum("ra,abo,sb->rso", at, np.einsum("abc,abco->abo", v, u), at)
    direct = np.array([[np.einsum("ijc,ijco->o", d[r:r + 3, s:s + 3], g) for s in range(m)] for r in range(m)])
    np.testing.assert_allclose(y, direct, rtol=1e-5, atol=1e-5)  # (the weight transform is rounded to float32)


def _model(c_in: int, c_out: int, size: int, batch: int = 1, residual: bool = False, silu: bool = False,
           **attrs) -> onnx.ModelProto:
    w = (RNG.standard_normal((c_out, c_in, 3, 3)) / np.sqrt(9 * c_in)).astype(np.float32)
    b = RNG.standard_normal(c_out).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], **attrs),
             helper.make_node("Relu", ["c"], ["r"])]
    if silu:  # x * Sigmoid(x): the conv's output read twice
        nodes[-1:] = [helper.make_node("Sigmoid", ["c"], ["s"]), helper.make_node("Mul", ["c", "s"], ["r"])]
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


@pytest.mark.parametrize("case,tiling", [
    (dict(c_in=32, c_out=48, size=11, pads=[1, 1, 1, 1]), winograd.F2),      # odd output: half-empty last tiles
    (dict(c_in=40, c_out=64, size=12, pads=[0, 1, 2, 1]), winograd.F2),      # asymmetric padding
    (dict(c_in=32, c_out=32, size=7, batch=2, residual=True, pads=[1, 1, 1, 1]), winograd.F2),
    (dict(c_in=32, c_out=32, size=13, pads=[1, 1, 1, 1]), winograd.F2),      # 49 tiles: one block, not one per thread
    (dict(c_in=32, c_out=48, size=23, pads=[1, 1, 1, 1]), winograd.F4),      # 23 = 5 x 4 + 3: partial last tiles
    (dict(c_in=40, c_out=64, size=26, pads=[0, 1, 2, 1]), winograd.F4),
    (dict(c_in=32, c_out=32, size=16, batch=2, residual=True, pads=[1, 1, 1, 1]), winograd.F4),
    (dict(c_in=48, c_out=32, size=25, pads=[1, 1, 1, 1]), winograd.F4),      # 49 tiles of 4 x 4
    (dict(c_in=16, c_out=32, size=24, pads=[1, 1, 1, 1]), winograd.F4),      # 16 input channels
], ids=lambda v: None if isinstance(v, dict) else f"F{v.m}")
def test_winograd_conv_matches_ort(case, tiling):
    out = [case.get("batch", 1), case["size"] + sum(case["pads"][::2]) - 2, case["size"] + sum(case["pads"][1::2]) - 2,
           case["c_out"]]
    assert winograd.choose_tiling(case["c_in"], case["c_out"], out) is tiling
    target = cpu_target(2).target()
    model = _model(**case)
    names = lowered_names(model, target)
    assert "winograd_matmul" in names, names  # (both convs of the residual case share it)
    assert not any("conv2d" in n for n in names), names
    assert any(n.startswith("fused_winograd_output") and "relu" in n for n in names), names  # epilogue fused

    x = RNG.standard_normal((case.get("batch", 1), case["c_in"], case["size"], case["size"])).astype(np.float32)
    assert max_rel_error_vs_ort(model, x, target) < 1e-5


def test_transforms_are_unrolled_over_tile_elements():
    """The input transform runs its 36 tile elements unrolled inside each tile and channel vector (so each is
    one constant sum), the output transform its 4 x 4 pixels per tile; both parallel and vectorized."""
    from sparsecc.codegen import cpu_schedule
    target = cpu_target(2).target()
    lanes = cpu_schedule.vector_lanes(target)
    mod = lowered_module(_model(c_in=64, c_out=64, size=28, pads=[1, 1, 1, 1]), target)
    funcs = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    transform_in = funcs["winograd_input"].script()
    assert "T.unroll(36)" in transform_in and f"T.vectorized({lanes})" in transform_in, transform_in
    assert "T.parallel(49)" in transform_in, transform_in  # 7 x 7 tiles
    transform_out = next(f for n, f in funcs.items() if n.startswith("fused_winograd_output")).script()
    assert transform_out.count("T.unroll(T.int64(4))") == 2, transform_out  # one block: the epilogue inlined
    assert "T.parallel(T.int64(49))" in transform_out and f"T.vectorized(T.int64({lanes}))" in transform_out, transform_out


def test_large_tile_weights_keep_the_register_tile():
    """F(4x4)'s transformed weight (36 x 256 x 256 floats, 9 MB) is read at the output column but by no pixel:
    it is reused by every tile, not streamed like a depthwise conv's input, so the matmul keeps a register
    tile of several rows."""
    target = cpu_target(2).target()
    mod = lowered_module(_model(c_in=256, c_out=256, size=14, batch=8, pads=[1, 1, 1, 1]), target)
    matmul = next(f for gv, f in mod.functions_items() if gv.name_hint == "winograd_matmul").script()
    assert "T.Buffer((T.int64(36), T.int64(256), T.int64(256))" in matmul, matmul
    rows = re.search(r"i_1 in T\.unroll\(T\.int64\((\d+)\)\)", matmul)
    assert rows and int(rows.group(1)) >= 4, matmul


def test_weights_are_counted_per_tile_element():
    """The weight panels of the batched matmul are sized by one tile element's weight (512 x 512 floats, 1 MB),
    not all 36: the panel rule then keeps each swept panel in cache."""
    from tvm import s_tir

    from sparsecc.codegen import cpu_schedule
    v = winograd.te.placeholder((1, 36, 32, 512), name="v")
    u = winograd.te.placeholder((36, 512, 512), name="u")
    sch = s_tir.Schedule(winograd.te.create_prim_func([v, u, winograd._batched_matmul(v, u)]))
    assert cpu_schedule._weight_bytes(sch.get(sch.get_sblock("winograd_matmul")), 4) == 512 * 512 * 4


def test_tiles_are_laid_out_in_one_block_per_thread():
    assert winograd.thread_parts(64, 2) == 2 and winograd.thread_parts(128, 4) == 4
    assert winograd.thread_parts(36, 2) == 1  # 18 tiles per thread: weight-bound, split by tile element
    assert winograd.thread_parts(25, 2) == 1 and winograd.thread_parts(36, 1) == 1
    v = winograd._input_transform(winograd.te.placeholder((1, 14, 14, 8), name="d"), 2)
    assert [int(d) for d in v.shape] == [2, 16, 18, 8]  # 6 x 6 tiles: 18 per thread
    v = winograd._input_transform(winograd.te.placeholder((1, 26, 26, 8), name="d"), 2, winograd.F4)
    assert [int(d) for d in v.shape] == [2, 36, 18, 8]  # 6 x 6 tiles of 4 x 4: 18 per thread


@pytest.mark.parametrize("case", [
    dict(c_in=8, c_out=64, size=28, pads=[1, 1, 1, 1]),                  # too few input channels
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


def test_four_by_four_tiles_where_there_are_enough():
    """F(4x4) wherever it has 32 tiles and its transforms fit the cache rules; F(2x2) where only that has
    enough tiles (ResNet's 14 x 14 stage at batch 1: 16 tiles of 4 x 4, 49 of 2 x 2); direct below."""
    assert winograd.choose_tiling(64, 64, [1, 56, 56, 64]) is winograd.F4
    assert winograd.choose_tiling(128, 128, [1, 28, 28, 128]) is winograd.F4
    assert winograd.choose_tiling(256, 256, [1, 14, 14, 256]) is winograd.F2
    assert winograd.choose_tiling(256, 256, [8, 14, 14, 256]) is winograd.F4
    assert winograd.choose_tiling(512, 512, [1, 7, 7, 512]) is None
    # DenseNet's 128 -> 32 at 56 x 56, batch 8: 29 MB transformed by F(4x4) (within the last-level cache
    # rule), 51 MB by F(2x2) (not)
    assert winograd.choose_tiling(128, 32, [8, 56, 56, 32]) is winograd.F4
    assert not winograd.worth_it(128, 32, [8, 56, 56, 32], winograd.F2)
    # SqueezeNet's expand convs: F(4x4) from 16 input channels, and beyond the cache rule F(2x2) needs
    assert winograd.choose_tiling(16, 64, [8, 55, 55, 64]) is winograd.F4
    assert winograd.choose_tiling(32, 128, [8, 27, 27, 128]) is winograd.F4
    assert not winograd.worth_it(32, 128, [8, 27, 27, 128], winograd.F2)
    assert winograd.choose_tiling(16, 64, [1, 12, 12, 64]) is None  # 9 tiles of 4 x 4; too few channels for F(2x2)


def test_outputs_read_twice_are_computed_once_per_tile():
    """Where the epilogue reads the conv's output twice (SiLU: x * Sigmoid(x)), the output transform is
    computed per tile and channel vector into a local buffer: inlined, its chain of selects over the tile's
    16 sums was repeated in each reader (YOLOX-s: 20-30 s to compile each such function, 4.4 min in all)."""
    target = cpu_target(2).target()
    model = _model(c_in=32, c_out=48, size=23, pads=[1, 1, 1, 1], silu=True)
    mod = lowered_module(model, target)
    out = next(f for gv, f in mod.functions_items() if gv.name_hint.startswith("fused_winograd_output")).script()
    assert out.count("T.Select(") == winograd.F4.m ** 2 - 1, out  # one chain of 16 sums
    assert 'scope="local"' in out, out
    x = RNG.standard_normal((1, 32, 23, 23)).astype(np.float32)
    assert max_rel_error_vs_ort(model, x, target) < 1e-5
