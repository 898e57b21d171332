"""Default CPU schedules (`codegen/cpu_schedule.py`, `codegen/layout.py`) and tuning (`codegen/tuning.py`).

Every rule must keep numerics: small graphs covering each scheduled pattern are compiled through the real
lowering and compared with ONNX Runtime. A structural check makes sure the functions really get scheduled
(parallel and vectorized loops), so a rule that silently stops matching is caught without timing anything.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
import tvm_ffi
from onnx import TensorProto, helper, numpy_helper
from tvm import relax, tirx
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
from tvm.relax.frontend.onnx import from_onnx

from sparsecc.codegen import cpu_schedule, layout, tuning
from sparsecc.codegen.lowering import compile_module
from sparsecc.codegen.targets import cpu_target

RNG = np.random.default_rng(0)


def _target() -> tvm.target.Target:
    return cpu_target(2).target()


def _model(nodes, x_shape, y_shape, inits) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def _check(model: onnx.ModelProto, x_shape) -> None:
    x = RNG.standard_normal(x_shape).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ex = compile_module(from_onnx(model, keep_params_in_input=False), _target())
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    assert out.shape == ref.shape
    rel = np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12)
    assert rel < 1e-4, rel


def _conv(name, x, c_in, c_out, k, stride=1, group=1, bias=True, inits=None, pad=None):
    inits[f"{name}_w"] = RNG.standard_normal((c_out, c_in // group, k, k)) * 0.2
    ins = [x, f"{name}_w"]
    if bias:
        inits[f"{name}_b"] = RNG.standard_normal(c_out) * 0.1
        ins.append(f"{name}_b")
    return helper.make_node("Conv", ins, [name], kernel_shape=[k, k], strides=[stride, stride],
                            pads=[k // 2 if pad is None else pad] * 4, group=group)


@pytest.mark.parametrize(
    "c_in,c_out,k,stride,group,size",
    [
        (8, 32, 3, 1, 1, 9),     # 3x3 stride 1, padded; odd spatial size
        (16, 48, 3, 2, 1, 10),   # stride 2
        (24, 64, 1, 1, 1, 7),    # 1x1
        (3, 24, 3, 2, 1, 16),    # RGB stem
        (32, 32, 3, 1, 32, 8),   # depthwise
        (32, 32, 3, 2, 32, 9),   # depthwise stride 2
        (12, 24, 3, 1, 3, 6),    # grouped
        (20, 10, 1, 1, 1, 5),    # output channels below one vector
        (16, 116, 1, 1, 1, 4),   # channels that are not a multiple of the vector width (ShuffleNet)
        (8, 1000, 1, 1, 1, 3),   # 1000 classes as a 1x1 conv (SqueezeNet)
    ],
)
def test_conv_bias_relu(c_in, c_out, k, stride, group, size):
    inits: dict[str, np.ndarray] = {}
    conv = _conv("c", "x", c_in, c_out, k, stride, group, inits=inits)
    relu = helper.make_node("Relu", ["c"], ["y"])
    out = (size + 2 * (k // 2) - k) // stride + 1
    _check(_model([conv, relu], [1, c_in, size, size], [1, c_out, out, out], inits), [1, c_in, size, size])


def test_conv_bn_residual_relu6_batch():
    """Conv + BatchNorm + residual Add + Clip(0, 6) (ReLU6), batch 2."""
    c, inits = 16, {}
    nodes = [_conv("c1", "x", c, c, 3, bias=False, inits=inits)]
    inits.update(g=RNG.uniform(0.5, 1.5, c), b=RNG.standard_normal(c) * 0.1, m=RNG.standard_normal(c) * 0.1,
                 v=RNG.uniform(0.5, 1.5, c), lo=np.array(0.0), hi=np.array(6.0))
    nodes += [helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["bn"]),
              helper.make_node("Add", ["bn", "x"], ["res"]),
              helper.make_node("Clip", ["res", "lo", "hi"], ["y"])]
    _check(_model(nodes, [2, c, 8, 8], [2, c, 8, 8], inits), [2, c, 8, 8])


@pytest.mark.parametrize("m,k,n", [(1, 37, 50), (3, 64, 10), (8, 100, 33), (5, 16, 128)])
def test_gemm_odd_sizes(m, k, n):
    inits = {"w": RNG.standard_normal((n, k)) * 0.2, "b": RNG.standard_normal(n) * 0.1}
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1), helper.make_node("Relu", ["g"], ["y"])]
    _check(_model(nodes, [m, k], [m, n], inits), [m, k])


def test_matmul_batched_activations():
    inits = {"w": RNG.standard_normal((24, 40)) * 0.2}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    _check(_model(nodes, [2, 7, 24], [2, 7, 40], inits), [2, 7, 24])


@pytest.mark.parametrize("op,attrs", [
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    ("AveragePool", dict(kernel_shape=[2, 2], strides=[2, 2])),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=1)),
])
def test_pooling_after_conv(op, attrs):
    """Pooling between convs runs in NHWC (the layout follows the conv)."""
    inits: dict[str, np.ndarray] = {}
    conv = _conv("c", "x", 8, 32, 3, inits=inits)
    pool = helper.make_node(op, ["c"], ["p"], **attrs)
    gap = helper.make_node("GlobalAveragePool", ["p"], ["y"])
    _check(_model([conv, pool, gap], [1, 8, 12, 12], [1, 32, 1, 1], inits), [1, 8, 12, 12])


def test_softmax_and_concat_fallback():
    inits: dict[str, np.ndarray] = {}
    nodes = [_conv("a", "x", 4, 8, 1, inits=inits), _conv("b", "x", 4, 16, 3, inits=inits),
             helper.make_node("Concat", ["a", "b"], ["cat"], axis=1),
             helper.make_node("Softmax", ["cat"], ["y"], axis=1)]
    _check(_model(nodes, [1, 4, 6, 6], [1, 24, 6, 6], inits), [1, 4, 6, 6])


@pytest.mark.parametrize("op, shape", [("LayerNormalization", [1, 1, 768]), ("LayerNormalization", [4, 128, 96]),
                                       ("Softmax", [1, 4, 64, 128]), ("Softmax", [1, 3, 49, 49])])
def test_row_reductions_sum_whole_vectors(op, shape):
    """Layer norm and softmax reduce each row in vectors of lanes (a lane-wise partial result, then its lanes),
    rows in parallel when there is enough work. A single row (a classifier's final layer norm) is reduced once:
    dlight's rule recomputed both its reductions for each of the 768 outputs."""
    inits = {}
    if op == "Softmax":
        nodes = [helper.make_node("Softmax", ["x"], ["y"], axis=-1)]
    else:
        inits = {"s": RNG.uniform(0.5, 1.5, shape[-1]), "b": RNG.standard_normal(shape[-1])}
        nodes = [helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], axis=-1)]
    model = _model(nodes, shape, shape, inits)
    _check(model, shape)
    text = next(f.script() for name, f in _prim_funcs(model).items() if "softmax" in name or "layer_norm" in name)
    assert ("_rf_update" in text) == (shape[-1] % 4 == 0), text  # 49 columns stay a scalar loop
    rows = int(np.prod(shape[:-1]))
    assert ("T.parallel" in text) == (rows > 1 and rows * shape[-1] >= cpu_schedule.MIN_PARALLEL_WORK), text


def _scheduled_module(model: onnx.ModelProto) -> tvm.IRModule:
    target = _target()
    with target:
        seq = tvm.transform.Sequential(layout.layout_passes(target) + cpu_generic.legalize_passes(target)
                                       + cpu_schedule.schedule_passes(target))
        return seq(from_onnx(model, keep_params_in_input=False))


def test_batch_norm_is_a_folded_scale_and_shift():
    """A BN no conv can absorb (DenseNet's pre-activation BN after a concatenation) runs as x * scale + shift,
    both folded at compile time: two parameters per channel, no division per element."""
    c = 32
    inits = {"g": np.abs(RNG.standard_normal(2 * c)) + 0.5, "b": RNG.standard_normal(2 * c),
             "m": RNG.standard_normal(2 * c), "v": np.abs(RNG.standard_normal(2 * c)) + 0.1}
    nodes = [_conv("c", "x", 16, c, 3, inits=inits), helper.make_node("Concat", ["c", "x2"], ["cat"], axis=1),
             helper.make_node("BatchNormalization", ["cat", "g", "b", "m", "v"], ["bn"], epsilon=1e-3),
             helper.make_node("Relu", ["bn"], ["r"]), _conv("y", "r", 2 * c, c, 1, inits=inits)]
    nodes.insert(1, _conv("x2", "x", 16, c, 1, inits=inits))
    model = _model(nodes, [1, 16, 14, 14], [1, c, 14, 14], inits)
    funcs = {gv.name_hint: f for gv, f in _scheduled_module(model).functions_items() if isinstance(f, tirx.PrimFunc)}
    bn = [f for name, f in funcs.items() if "multiply_add" in name]
    assert len(bn) == 1 and " / " not in bn[0].script()
    assert len(bn[0].params) == 5  # two conv outputs, scale, shift, the result (in NHWC)
    _check(model, [1, 16, 14, 14])


@pytest.mark.parametrize("shape, axis", [((2, 4, 3, 3), 1), ((5, 4), 1), ((2, 3, 4), 1), ((2, 3, 3, 4), 3)])
@pytest.mark.parametrize("center, scale", [(True, True), (False, True), (True, False)])
def test_batch_norm_scale_shift_matches_the_decomposition(shape, axis, center, scale):
    """Any rank and axis, with or without gamma (`scale`) and beta (`center`): the folded BN computes what
    Relax's own decomposition computes."""
    c = shape[axis]
    params = [relax.const(RNG.standard_normal(c).astype(np.float32)) for _ in range(3)]
    var = relax.const((np.abs(RNG.standard_normal(c)) + 0.1).astype(np.float32))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            bn = bb.emit(relax.op.nn.batch_norm(x, *params, var, axis=axis, epsilon=1e-3, center=center,
                                                scale=scale))
            out = bb.emit_output(relax.TupleGetItem(bn, 0))
        bb.emit_func_output(out)
    data = RNG.standard_normal(shape).astype(np.float32)
    results = []
    for mod in (bb.get(), layout.batch_norm_to_scale_shift(bb.get())):
        ex = tvm.compile(relax.transform.DecomposeOpsForInference()(mod), target=tvm.target.Target({"kind": "llvm"}))
        results.append(relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(data)).numpy())
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-5)


def test_functions_are_scheduled():
    inits: dict[str, np.ndarray] = {}
    nodes = [_conv("c", "x", 16, 32, 3, inits=inits), helper.make_node("Relu", ["c"], ["y"])]
    mod = _scheduled_module(_model(nodes, [1, 16, 14, 14], [1, 32, 14, 14], inits))
    funcs = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    assert all(f.attrs.get("tirx.is_scheduled", False) for f in funcs.values()), list(funcs)
    conv = next(f for name, f in funcs.items() if "conv2d" in name)
    text = conv.script()
    assert "T.parallel" in text and "T.vectorized" in text and "conv2d_nhwc_intermediate_global" in text
    # The layout change happened once, at the Relax level: the conv reads NHWC and HWIO weights.
    assert "T.int64(3), T.int64(3), T.int64(16), T.int64(32)" in text


def test_copies_parallelize_only_the_leading_loops():
    """An RGB image's padding runs in parallel over rows, each row a plain loop nest: fusing every loop
    would cost a division and a modulo per copied element."""
    inits: dict[str, np.ndarray] = {}
    nodes = [_conv("c", "x", 3, 32, 3, stride=2, inits=inits), helper.make_node("Relu", ["c"], ["y"])]
    model = _model(nodes, [1, 3, 300, 300], [1, 32, 150, 150], inits)
    conv = next(f for gv, f in _scheduled_module(model).functions_items() if "conv2d" in gv.name_hint)
    text = conv.script()
    assert "T.parallel(T.int64(302))" in text, text  # the padded rows
    assert "T.parallel(T.int64(273612))" not in text  # not all 302 x 302 x 3 elements fused
    _check(model, [1, 3, 300, 300])


@pytest.mark.parametrize("size,group,inlined", [(100, 320, True), (20, 320, False), (100, 20, False)])
def test_depthwise_padding_is_inlined_for_inputs_beyond_the_cache(size, group, inlined):
    """A depthwise conv over a 12 MB input reads it through bounds tests instead of a padding pass (which
    would double the conv's memory traffic); on a small input the pass stays. A grouped conv (16 channels
    per group) reuses each input element 16 times more and keeps the pass at any size."""
    inits: dict[str, np.ndarray] = {}
    nodes = [_conv("c", "x", 320, 320, 3, group=group, inits=inits), helper.make_node("Relu", ["c"], ["y"])]
    model = _model(nodes, [1, 320, size, size], [1, 320, size, size], inits)
    conv = next(f for gv, f in _scheduled_module(model).functions_items() if "conv2d" in gv.name_hint)
    assert "shifted" not in conv.script()
    assert (320 * (size + 2) ** 2 * 4 > cpu_schedule.STREAMED_INPUT_BYTES and group == 320) == inlined
    assert ("sblock(\"pad_temp\")" not in conv.script()) == inlined  # no padding pass
    _check(model, [1, 320, size, size])


@pytest.mark.parametrize("stride, group_size", [(2, 16), (1, 16), (2, 8)])
def test_strided_grouped_convs_read_through_bounds_tests(stride, group_size):
    """A grouped conv with stride 2 reads its input through the padding's bounds tests (each input element
    feeds a quarter of the multiply-adds it feeds at stride 1, and the pass cost more than the tests); at
    stride 1 the padding pass stays, whatever the input's size."""
    inits: dict[str, np.ndarray] = {}
    nodes = [_conv("c", "x", 64, 64, 3, stride=stride, group=64 // group_size, inits=inits),
             helper.make_node("Relu", ["c"], ["y"])]
    model = _model(nodes, [1, 64, 14, 14], [1, 64, 14 // stride, 14 // stride], inits)
    conv = next(f for gv, f in _scheduled_module(model).functions_items() if "conv2d" in gv.name_hint)
    assert "shifted" not in conv.script()
    assert ("sblock(\"pad_temp\")" in conv.script()) == (stride == 1)
    _check(model, [1, 64, 14, 14])


def test_streamed_depthwise_tiles_span_whole_pixels():
    """A depthwise conv over an input beyond the cache computes all channels of one pixel per register tile
    (96 channels: six vectors), reading each input pixel whole; the result still matches ONNX Runtime."""
    lanes = cpu_schedule.vector_lanes(_target())
    assert cpu_schedule.pixel_tile(56, 96, 16, 9) == cpu_schedule.Tile(rows=1, cols=96)
    assert cpu_schedule.pixel_tile(112, 32, 16, 9) == cpu_schedule.Tile(rows=4, cols=32)
    assert cpu_schedule.pixel_tile(28, 192, 16, 9) is None  # 12 vectors: the usual tile
    assert cpu_schedule.pixel_tile(112, 96, 16, 24, min_rows=2) == cpu_schedule.Tile(rows=4, cols=96)
    assert cpu_schedule.pixel_tile(112, 256, 16, 24, min_rows=2) is None
    inits: dict[str, np.ndarray] = {}
    nodes = [_conv("c", "x", 96, 96, 3, stride=2, group=96, inits=inits), helper.make_node("Relu", ["c"], ["y"])]
    model = _model(nodes, [1, 96, 112, 112], [1, 96, 56, 56], inits)
    conv = next(f for gv, f in _scheduled_module(model).functions_items() if "conv2d" in gv.name_hint)
    text = conv.script()
    assert f"T.unroll(T.int64({96 // lanes}))" in text and f"T.vectorized(T.int64({lanes}))" in text, text
    assert "T.parallel(T.int64(3136))" in text, text  # one pixel of 56 x 56 per parallel iteration
    _check(model, [1, 96, 112, 112])


def test_outputs_beyond_the_cache_are_written_in_whole_pixels():
    """A 1x1 conv from 16 channels writing 19 MB (beyond half the L3) computes all 96 channels of as many
    pixels as stay on the stack (2) per register tile, so each tile writes its pixels whole. A 5 MB output
    keeps the usual tile of 32 or 48 channels, and so does a 3x3 conv, whose 144 multiply-adds per output make
    it compute-bound."""
    lanes = cpu_schedule.vector_lanes(_target())
    rows = (cpu_schedule.STACK_TILE_BYTES - 1) // (96 * 4)
    for batch, k, whole in ((4, 1, True), (1, 1, False), (4, 3, False)):
        inits: dict[str, np.ndarray] = {}
        nodes = [_conv("c", "x", 16, 96, k, inits=inits), helper.make_node("Relu", ["c"], ["y"])]
        model = _model(nodes, [batch, 16, 112, 112], [batch, 96, 112, 112], inits)
        assert (batch * 112 * 112 * 96 * 4 > cpu_schedule.STREAMED_OUTPUT_BYTES) == (batch == 4)
        conv = next(f for gv, f in _scheduled_module(model).functions_items() if "conv2d" in gv.name_hint)
        text = conv.script()
        assert (f"T.parallel(T.int64({batch * 112 * 112 // rows}))" in text) == whole, text
        assert (f"T.unroll(T.int64({96 // lanes}))" in text) == whole, text
        if whole:
            _check(model, [batch, 16, 112, 112])


def test_projection_input_rows_are_copied_per_tile():
    """A 1x1 projection from 144 channels reading 4.7 MB (beyond the L2s) copies each tile's input rows to a
    contiguous buffer before the multiply-adds; a 1.8 MB input, or 32 input channels, is read in place."""
    for size, c_in, copied in ((90, 144, True), (56, 144, False), (200, 32, False)):
        inits: dict[str, np.ndarray] = {}
        nodes = [_conv("c", "x", c_in, 32, 1, inits=inits), helper.make_node("Relu", ["c"], ["y"])]
        model = _model(nodes, [1, c_in, size, size], [1, 32, size, size], inits)
        conv = next(f for gv, f in _scheduled_module(model).functions_items() if "conv2d" in gv.name_hint)
        text = conv.script()  # (the accumulators' tile is the other global buffer)
        assert text.count("_global = T.sblock_alloc_buffer") == (2 if copied else 1), text
        if copied:
            _check(model, [1, c_in, size, size])


def test_odd_channel_counts_are_padded_to_whole_vectors():
    """116 output channels (ShuffleNet) are computed as 128 with full-width vectors, then sliced."""
    from sparsecc.codegen.layout import padded_channels

    lanes = cpu_schedule.vector_lanes(_target())
    assert padded_channels(116, 16) == 128 and padded_channels(58, 4) == 60
    assert padded_channels(10, 16) == 10 and padded_channels(464, 16) == 464  # below a vector; whole vectors
    assert padded_channels(24, 16) == 24 and padded_channels(24, 8) == 24  # whole 256-bit vectors
    assert padded_channels(12, 8) == 16 and padded_channels(116, 8) == 120
    inits: dict[str, np.ndarray] = {}
    nodes = [_conv("c", "x", 24, 116, 1, inits=inits), helper.make_node("Relu", ["c"], ["y"])]
    model = _model(nodes, [1, 24, 14, 14], [1, 116, 14, 14], inits)
    mod = _scheduled_module(model)
    conv = next(f for gv, f in mod.functions_items() if "conv2d" in gv.name_hint)
    text = conv.script()
    assert f"T.int64({padded_channels(116, lanes)})), \"float32\")" in text  # the padded weight
    assert f"T.vectorized(T.int64({lanes}))" in text
    _check(model, [1, 24, 14, 14])


def test_channels_in_whole_half_width_vectors_stay_unpadded():
    """With 16 lanes, 24 output channels are computed as three 8-lane vectors: no zero columns, no slice."""
    if cpu_schedule.vector_lanes(_target()) != 16:
        pytest.skip("needs a 16-lane (AVX-512) target")
    inits: dict[str, np.ndarray] = {}
    nodes = [_conv("c", "x", 96, 24, 1, inits=inits), helper.make_node("Relu", ["c"], ["y"])]
    model = _model(nodes, [2, 96, 14, 14], [2, 24, 14, 14], inits)
    conv = next(f for gv, f in _scheduled_module(model).functions_items() if "conv2d" in gv.name_hint)
    text = conv.script()
    assert "strided_slice" not in text and "T.vectorized(T.int64(8))" in text, text
    _check(model, [2, 96, 14, 14])


def test_weights_larger_than_the_cache_are_swept_in_column_panels():
    """A 3x3 conv with 2.25 MiB of weights: all rows are swept over one cache-sized panel of columns at a
    time (with two threads, each thread sweeps its half of the rows), and the result still matches ONNX
    Runtime."""
    assert cpu_schedule._panel_tiles(4 << 20, 64) == 8            # 64 KiB a tile: 8 tiles fill 512 KiB
    assert cpu_schedule._panel_tiles(100 << 10, 4) == 4           # small weights: one panel
    assert cpu_schedule._panel_tiles(8 << 20, 8) == 1             # 1 MiB a tile: one tile at a time
    def conv_splits(c_in: int, threads: int = 2) -> int:
        inits: dict[str, np.ndarray] = {}
        nodes = [_conv("c", "x", c_in, 256, 3, inits=inits), helper.make_node("Relu", ["c"], ["y"])]
        model = _model(nodes, [2, c_in, 6, 6], [2, 256, 6, 6], inits)
        target = cpu_target(threads).target()
        with target:
            fused = tvm.transform.Sequential(layout.layout_passes(target) + cpu_generic.legalize_passes(target))(
                from_onnx(model, keep_params_in_input=False))
        conv = next(f for gv, f in fused.functions_items() if "conv2d" in gv.name_hint)
        trace = str(cpu_schedule.default_schedule(conv, target).trace)
        return model, trace.count("sch.split(")

    model, big = conv_splits(256)  # 2.25 MiB of weights
    _, small = conv_splits(16)     # 144 KiB: one panel
    assert big == small + 2        # the panels, and the rows' split into one share per thread
    assert conv_splits(256, threads=1)[1] == conv_splits(16, threads=1)[1] + 1
    _check(model, [2, 256, 6, 6])


@pytest.mark.parametrize("c_in,c_out,group,size", [(64, 256, 1, 28), (144, 144, 144, 60), (256, 256, 32, 28)])
def test_accumulator_tiles_stay_on_the_stack(c_in, c_out, group, size):
    """Each register tile's accumulators take under STACK_TILE_BYTES, so TVM allocates them on the stack (and
    LLVM in registers): the compiled convs (1x1, depthwise over an input beyond the cache, groups of 8
    unpadded; none with a padding pass, which takes a buffer of its own) call no workspace allocator."""
    from tvm.relax.frontend.onnx import from_onnx

    from sparsecc.codegen import lowering

    target = _target()
    on_stack = cpu_schedule.stack_vectors(16)  # 512-bit vectors of floats
    assert on_stack == 15
    assert all(t.rows * t.cols * 4 < cpu_schedule.STACK_TILE_BYTES
               for t in cpu_schedule.tile_candidates(56, 256, 16, 32, max_vectors=on_stack))
    assert cpu_schedule.choose_tile(56, 256, 16, 32, max_vectors=on_stack) == cpu_schedule.Tile(rows=7, cols=32)
    inits: dict[str, np.ndarray] = {}
    k = 1 if group == 1 else 3
    pad = 0 if group == 32 else k // 2
    conv = _conv("c", "x", c_in, c_out, k, group=group, inits=inits, pad=pad)
    out = size + 2 * pad - k + 1
    model = _model([conv, helper.make_node("Relu", ["c"], ["y"])], [2, c_in, size, size], [2, c_out, out, out], inits)
    ex = lowering.compile_module(from_onnx(model, keep_params_in_input=False), target)
    assert not any("TVMBackendAllocWorkspace" in m.inspect_source("ll") for m in ex.mod.imports)
    _check(model, [2, c_in, size, size])


def test_half_width_channel_tiles_have_no_masked_lanes():
    """120 channels (15 vectors of 8 lanes): the register tile's columns divide them, even where the stack's
    limit leaves few rows (a plane 14 pixels wide), and a depthwise conv's per-pixel epilogue runs in 8-lane
    vectors rather than one 120-lane vector that LLVM assembles lane by lane; 116 channels in 4-lane ones
    (ShuffleNet-v2's stride-2 depthwise conv at 8x14x14x116: 0.27 -> 0.08 ms)."""
    assert 120 % cpu_schedule.choose_tile(14, 120, 16, 32, max_vectors=15).cols == 0
    # the weights' panels are packed as wide as the schedule's tile, also where only the stack limits it
    target = _target()
    lanes, regs = cpu_schedule.vector_lanes(target), cpu_schedule.vector_registers(target)
    for m in (13, 14, 17, 19):
        tile = cpu_schedule.choose_tile(m, 32 * lanes, lanes, regs, cpu_schedule.stack_vectors(lanes))
        assert cpu_schedule.column_tile(m, 32 * lanes, target) == tile.cols
    assert cpu_schedule.choose_tile(13, 1008, 16, 32, max_vectors=15) == cpu_schedule.Tile(rows=13, cols=16)
    if cpu_schedule.vector_lanes(_target()) != 16:
        pytest.skip("needs a 16-lane (AVX-512) target")
    inits: dict[str, np.ndarray] = {}
    nodes = [_conv("c", "x", 120, 120, 5, group=120, inits=inits), helper.make_node("HardSwish", ["c"], ["y"])]
    model = _model(nodes, [2, 120, 40, 40], [2, 120, 40, 40], inits)
    conv = next(f for gv, f in _scheduled_module(model).functions_items() if "conv2d" in gv.name_hint)
    text = conv.script()
    assert "T.vectorized(T.int64(120))" not in text and "T.vectorized(T.int64(8))" in text, text
    _check(model, [2, 120, 40, 40])
    # ShuffleNet's 116 channels: quarter-width vectors (29 of 4 lanes), none of 116 lanes
    nodes = [_conv("c", "x", 116, 116, 3, stride=2, group=116, inits=inits), helper.make_node("Relu", ["c"], ["y"])]
    model = _model(nodes, [8, 116, 28, 28], [8, 116, 14, 14], inits)
    conv = next(f for gv, f in _scheduled_module(model).functions_items() if "conv2d" in gv.name_hint)
    assert "T.vectorized(T.int64(116))" not in conv.script()
    _check(model, [8, 116, 28, 28])


def test_choose_cols_uses_whole_vectors():
    assert cpu_schedule.choose_cols(256, 16) == 32
    assert cpu_schedule.choose_cols(144, 16) == 48
    assert cpu_schedule.choose_cols(1000, 16) == 40   # five half-width vectors
    assert cpu_schedule.choose_cols(24, 8) == 24      # AVX2: three vectors
    assert cpu_schedule.choose_cols(116, 16) == 4
    tile = cpu_schedule.choose_tile(56, 64, 16, 32)
    assert tile.cols == 32 and 56 % tile.rows == 0 and tile.rows * 2 <= 24
    assert cpu_schedule.choose_tile(13, 1008, 16, 32) == cpu_schedule.Tile(13, 16)  # no masked row tail
    assert cpu_schedule.choose_tile(31, 64, 16, 32) == cpu_schedule.Tile(12, 32)  # too wide: masked tail


def test_tile_candidates_start_with_the_default():
    tiles = cpu_schedule.tile_candidates(13, 1008, 16, 32)
    assert tiles[0] == cpu_schedule.choose_tile(13, 1008, 16, 32)
    assert len(set(tiles)) == len(tiles) and all(1008 % t.cols == 0 for t in tiles[1:])
    assert cpu_schedule.Tile(13, 16) in tiles  # a whole 13-wide plane row without a masked tail
    assert all(t.rows * (t.cols // 16) <= 28 for t in tiles[1:])


def test_tuning_database_is_reused(tmp_path, monkeypatch):
    """`--tune N` records go to the database; a second compile of the same model tunes nothing."""
    shown: list[str] = []
    monkeypatch.setattr("sparsecc.pipeline.report_progress", shown.append)
    inits = {"w": RNG.standard_normal((32, 48)) * 0.2}
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [4, 32], [4, 48], inits)
    target = _target()
    with target:
        fused = tvm.transform.Sequential(layout.layout_passes(target) + cpu_generic.legalize_passes(target))(
            from_onnx(model, keep_params_in_input=False))
    runners = []
    local_runner = tuning.ms.runner.LocalRunner
    monkeypatch.setattr(tuning.ms.runner, "LocalRunner", lambda **kw: runners.append(kw) or local_runner(**kw))
    assert tuning.tune(fused, target, 8, tmp_path) >= 1
    assert runners and all(kw["evaluator_config"] is tuning.EVALUATOR for kw in runners)  # timed flushed
    assert shown and "trials" in shown[-1]  # progress beside the build spinner
    assert tuning.database_exists(tmp_path)
    # Every task's default schedule was measured and recorded beside the searched ones, so the database's
    # best is never slower than the default.
    db = tuning.open_database(tmp_path)
    records = db.get_all_tuning_records()
    for name, task in tuning._tasks(fused).items():
        default = cpu_schedule.default_schedule(task["main"], target)
        if default is None:
            continue
        mine = [r for r in records if tvm_ffi.structural_equal(r.workload.mod, task)]
        assert any(str(r.trace) == str(default.trace) and r.run_secs for r in mine), name
        # So were the default rule's other register tiles (4 x 16 beside the default 4 x 48 for the matmul).
        variants = cpu_schedule.schedule_variants(task["main"], target)
        assert len(variants) >= (2 if "matmul" in name else 1), name
        for v in variants:
            assert any(str(r.trace) == str(v.trace) for r in mine), name
        assert len(mine) >= 2, name  # and the search measured candidates of its own
    assert tuning.tune(fused, target, 8, tmp_path) == 0  # everything is in the database already
    with target:
        applied = tuning.apply_database(tmp_path)(fused)
    matmul = next(f for gv, f in applied.functions_items() if "matmul" in gv.name_hint)
    assert matmul.attrs.get("tirx.is_scheduled", False)
    # And the whole pipeline with records only (tune=0) builds and matches ONNX Runtime.
    x = RNG.standard_normal((4, 32)).astype(np.float32)
    ex = compile_module(from_onnx(model, keep_params_in_input=False), target, tune=0, tune_db=str(tmp_path))
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(out, x @ inits["w"].astype(np.float32), rtol=1e-4, atol=1e-4)


def _blocks_after_elementwise(make_out) -> int:
    from tvm import te, topi
    from tvm.s_tir.dlight.analysis import get_root_block

    a, b = te.placeholder((2, 6, 6, 8), name="a"), te.placeholder((2, 6, 6, 8), name="b")
    out = make_out(topi, a, b)
    func = te.create_prim_func([a, b, *(out if isinstance(out, list) else [out])])
    sch = cpu_schedule.Elementwise().apply(func, _target(), False)
    return len(sch.get_child_blocks(get_root_block(sch)))


def test_concat_inlined_only_into_permuting_consumers():
    """A channel concat read through a permutation (ShuffleNet's concat + shuffle) is inlined: one copy, not
    two; read element for element (DenseNet's concat + BN + ReLU) it is inlined too, its loop cut into the
    parts (`test_concatenation_read_in_place_is_cut_into_its_parts`); padding stays.
    The shuffled channels split in halves (ShuffleNet-v2's next unit) are computed by the halves' copies
    themselves, without the shuffled tensor in between (ShuffleNet-v2 at batch 8: 15.3 -> 14.6 ms)."""
    shuffle = lambda topi, a, b: topi.transpose(  # noqa: E731
        topi.reshape(topi.concatenate([a, b], axis=3), (2, 6, 6, 2, 8)), (0, 1, 2, 4, 3))
    relu = lambda topi, a, b: topi.nn.relu(topi.concatenate([a, b], axis=3))  # noqa: E731
    pad = lambda topi, a, b: topi.nn.relu(topi.nn.pad(topi.add(a, b), [0, 1, 1, 0], [0, 1, 1, 0]))  # noqa: E731
    assert _blocks_after_elementwise(shuffle) == 1
    halves = lambda topi, a, b: list(topi.split(topi.reshape(shuffle(topi, a, b), (2, 6, 6, 16)), 2, axis=3))  # noqa: E731
    assert _blocks_after_elementwise(halves) == 2
    assert _blocks_after_elementwise(relu) == 1
    assert _blocks_after_elementwise(pad) == 2


@pytest.mark.parametrize("channels, lanes", [((16, 32, 8), 8), ((16, 32, 48, 64), 16), ((12, 20, 4), 4),
                                            ((6, 9, 3), None)])
def test_concatenation_read_in_place_is_cut_into_its_parts(channels, lanes):
    """A channel concatenation of many parts read element for element (DenseNet-169's 13 feature maps + BN +
    ReLU) is one pass whose channel loop is cut where the parts meet, in vectors dividing every part: once
    lowered, each piece reads its part with no select per element (that concat + BN + ReLU: 0.78 -> 0.06 ms)."""
    from tvm import s_tir, te, topi

    target = _target()
    parts = [te.placeholder((2, 5, 7, c), name=f"p{i}") for i, c in enumerate(channels)]
    out = topi.nn.relu(topi.subtract(topi.concatenate(parts, axis=3), te.placeholder((sum(channels),), name="m")))
    func = te.create_prim_func([*parts, out.op.input_tensors[0].op.input_tensors[1], out])
    sch = cpu_schedule.Elementwise().apply(func, target, False)
    mod = tvm.IRModule({"main": sch.mod["main"].with_attrs({"global_symbol": "main", "target": target})})
    lowered = tvm.transform.Sequential([
        s_tir.transform.ConvertBlocksToOpaque(), s_tir.transform.LowerOpaqueBlock(), tirx.transform.FlattenBuffer(),
        s_tir.transform.StmtSimplify(), tirx.transform.VectorizeLoop(True), tirx.transform.StmtSimplify()])(mod)
    text = lowered["main"].script()
    assert "if_then_else" not in text and "sblock_alloc_buffer" not in sch.mod["main"].script()
    if lanes:  # whole vectors of the parts' common divisor
        assert f", 1, {lanes})" in text and not any(f", 1, {n})" in text for n in (4, 8, 16) if n != lanes)
    ex = tvm.compile(mod, target=target)
    xs = [RNG.standard_normal((2, 5, 7, c)).astype(np.float32) for c in channels]
    m = RNG.standard_normal(sum(channels)).astype(np.float32)
    got = tvm.runtime.tensor(np.zeros((2, 5, 7, sum(channels)), np.float32))
    ex["main"](*[tvm.runtime.tensor(x) for x in xs], tvm.runtime.tensor(m), got)
    np.testing.assert_array_equal(got.numpy(), np.maximum(np.concatenate(xs, axis=3) - m, 0))


def _prim_funcs(model: onnx.ModelProto) -> dict[str, tirx.PrimFunc]:
    mod = _scheduled_module(model)
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


def test_silu_and_squeeze_excitation_use_vectorized_exp():
    """EfficientNet's conv + SiLU (x * Sigmoid(x)) and squeeze-excitation (global pool, 1x1 convs, Sigmoid,
    broadcast Mul): the sigmoid is computed with a polynomial exp fused into the conv epilogue, since LLVM
    turns a vector `exp` into one libm call per lane."""
    c, inits = 32, {}
    nodes = [_conv("c1", "x", 16, c, 1, inits=inits), helper.make_node("Sigmoid", ["c1"], ["s1"]),
             helper.make_node("Mul", ["c1", "s1"], ["a"]),
             _conv("dw", "a", c, c, 5, group=c, inits=inits), helper.make_node("Sigmoid", ["dw"], ["s2"]),
             helper.make_node("Mul", ["dw", "s2"], ["b"]),
             helper.make_node("GlobalAveragePool", ["b"], ["g"]),
             _conv("se1", "g", c, 8, 1, inits=inits), helper.make_node("Relu", ["se1"], ["r"]),
             _conv("se2", "r", 8, c, 1, inits=inits), helper.make_node("Sigmoid", ["se2"], ["gate"]),
             helper.make_node("Mul", ["b", "gate"], ["y"])]
    model = _model(nodes, [1, 16, 14, 14], [1, c, 14, 14], inits)
    _check(model, [1, 16, 14, 14])
    funcs = _prim_funcs(model)
    convs = {name: f.script() for name, f in funcs.items() if "conv2d" in name}
    assert sum("fast_sigmoid" in name for name in convs) >= 3, list(convs)  # fused into the three convs
    for name, text in convs.items():
        assert "T.exp(" not in text and "T.sigmoid(" not in text, name
    first = next(text for name, text in convs.items() if "fast_sigmoid" in name and "T.int64(16), T.int64(32)" in text)
    assert "T.vectorized" in first and "T.parallel" not in first.split("T.vectorized")[1]


def test_squeeze_excitation_scaling_a_large_map_runs_in_parallel():
    """The gate conv of squeeze-and-excitation is tiny (8 -> 32 channels per image), but its broadcast Mul
    scales the whole 4 x 56 x 56 x 32 feature map: the Mul runs as its own loop, in parallel over images and
    rows like the kernels around it, instead of inside the conv's tiles (on one thread), and the sigmoid
    is computed once per channel, not once per pixel."""
    c, inits = 32, {}
    nodes = [_conv("dw", "x", c, c, 3, group=c, inits=inits), helper.make_node("Relu", ["dw"], ["b"]),
             helper.make_node("GlobalAveragePool", ["b"], ["g"]),
             _conv("se1", "g", c, 8, 1, inits=inits), helper.make_node("Relu", ["se1"], ["r"]),
             _conv("se2", "r", 8, c, 1, inits=inits), helper.make_node("Sigmoid", ["se2"], ["gate"]),
             helper.make_node("Mul", ["b", "gate"], ["y"])]
    model = _model(nodes, [4, c, 56, 56], [4, c, 56, 56], inits)
    gate = next(f.script() for name, f in _prim_funcs(model).items() if "conv2d" in name and "multiply" in name)
    scaling = gate.split("T.parallel(T.int64(12544))")  # 4 x 56 x 56 pixels
    assert len(scaling) == 2 and "T.floor" in scaling[0] and "T.floor" not in scaling[1], gate  # (fast exp)
    _check(model, [4, c, 56, 56])


def test_hard_swish_and_hard_sigmoid_follow_the_conv_layout():
    """MobileNet-v3's HardSwish and HardSigmoid arrive as Relax `clip`: rewritten to maximum/minimum, they are
    fused into the conv epilogues in NHWC instead of running between two transposes."""
    c, inits = 32, {}
    nodes = [_conv("c1", "x", 8, c, 3, inits=inits), helper.make_node("HardSwish", ["c1"], ["a"]),
             helper.make_node("GlobalAveragePool", ["a"], ["g"]),
             _conv("se", "g", c, c, 1, inits=inits),
             helper.make_node("HardSigmoid", ["se"], ["gate"], alpha=1.0 / 6.0, beta=0.5),
             helper.make_node("Mul", ["a", "gate"], ["y"])]
    model = _model(nodes, [1, 8, 12, 12], [1, c, 12, 12], inits)
    _check(model, [1, 8, 12, 12])
    funcs = _prim_funcs(model)
    assert not any("clip" in name for name in funcs), list(funcs)
    transposes = [name for name in funcs if "transpose" in name]
    assert len(transposes) <= 2, transposes  # only the graph's input and output
    assert any("conv2d" in name and "maximum" in name and "minimum" in name for name in funcs), list(funcs)


def test_batch1_matmul_reads_large_weights_as_contiguous_panels():
    """A batch-1 Gemm with 1 MiB of weights (VGG's classifier, scaled down) reads them as column panels
    contiguous over k, in parallel over its panels (a parallel loop of 16 or fewer tiles used to be unrolled
    instead), and still matches ONNX Runtime."""
    from sparsecc.codegen.layout import STREAMED_WEIGHT_BYTES, gemv_panel

    k, n = 1024, STREAMED_WEIGHT_BYTES // (4 * 1024)
    inits = {"w": RNG.standard_normal((n, k)) * 0.05, "b": RNG.standard_normal(n) * 0.1}
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1), helper.make_node("Relu", ["g"], ["y"])]
    model = _model(nodes, [1, k], [1, n], inits)
    _check(model, [1, k])
    panel = gemv_panel(n, _target())
    matmul = next(f for name, f in _prim_funcs(model).items() if "matmul" in name)
    text = matmul.script()
    assert f"T.int64({n // panel}), T.int64({k}), T.int64({panel})" in text  # the packed weight
    assert "T.parallel" in text and "T.vectorized" in text
    # Batch 2 keeps the plain layout, and so does a half-zero weight, left to the sparse rewrite.
    plain = next(f for name, f in _prim_funcs(_model(nodes, [2, k], [2, n], inits)).items() if "matmul" in name)
    assert f"T.int64({k}), T.int64({n})" in plain.script()
    sparse = {**inits, "w": inits["w"] * (RNG.random((n, k)) < 0.5)}
    plain = next(f for name, f in _prim_funcs(_model(nodes, [1, k], [1, n], sparse)).items() if "matmul" in name)
    assert f"T.int64({k}), T.int64({n})" in plain.script()


def test_classifier_head_with_1000_classes_is_packed():
    """1000 classes are computed as 1008 columns (whole vectors), packed as panels of the register tile."""
    from sparsecc.codegen.layout import gemv_panel

    k, n = 512, 1000
    inits = {"w": RNG.standard_normal((n, k)) * 0.05, "b": RNG.standard_normal(n) * 0.1}
    model = _model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], [1, k], [1, n], inits)
    _check(model, [1, k])
    padded = -(-n // cpu_schedule.vector_lanes(_target())) * cpu_schedule.vector_lanes(_target())
    panel = gemv_panel(padded, _target())
    assert panel is not None and padded % panel == 0
    matmul = next(f for name, f in _prim_funcs(model).items() if "matmul" in name)
    assert f"T.int64({padded // panel}), T.int64({k}), T.int64({panel})" in matmul.script()
