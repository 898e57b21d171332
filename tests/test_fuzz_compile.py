"""Whole-pipeline property test: random ONNX graphs through grouping, pruning, sparsify and cpu codegen.

Graphs are stacks of random pieces in one of two families: image ([1, C, 8, 8]: conv, conv+BN+ReLU,
depthwise, residual Add, Concat, Split, activations, then Flatten/Reshape -> Gemm or a conv output) and
sequence ([1, S, D]: linear (MatMul + Add), single-head attention, residual, activations, LayerNorm-free Gemm
via Reshape). For every example: channel grouping gives a verdict per group; pruning at a random ratio keeps
a valid model that ONNX Runtime runs with the same output shapes; a sparsified (random pattern and ratio)
model compiles for cpu - half the time with every eligible layer forced onto our sparse kernels - and the
artifact equals ONNX Runtime (the compile's own verification, 1e-4 relative).

~40 examples in the default run (about 2-3 minutes on 2 cores); `SPARSECC_FUZZ_EXAMPLES=500 pytest
tests/test_fuzz_compile.py` for a long run.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import sparsecc
from sparsecc.ir import load_model
from sparsecc.pipeline import make_pass, run_analysis

EXAMPLES = int(os.environ.get("SPARSECC_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 50,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Graph:
    """Append-only ONNX builder with seeded weights."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, value) -> str:
        name = f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32 if np.asarray(value).dtype.kind == "f"
                                                              else np.int64), name))
        return name

    def weight(self, *shape: int) -> str:
        return self.const(self.rng.normal(0, 1 / np.sqrt(np.prod(shape[1:])), shape))

    def op(self, op: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        name = f"{op.lower()}{len(self.nodes)}"
        outs = [f"{name}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        return outs[0] if outputs == 1 else outs

    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1) -> str:
        return self.op("Conv", x, self.weight(cout, cin // group, k, k), self.const(self.rng.normal(0, 0.1, cout)),
                       pads=[k // 2] * 4, group=group)

    def linear(self, x: str, k: int, n: int) -> str:
        y = self.op("MatMul", x, self.weight(k, n))
        return self.op("Add", y, self.const(self.rng.normal(0, 0.1, n)))

    def model(self, x_shape: tuple[int, ...], y: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                                  [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], self.inits)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        proto.ir_version = 8
        return onnx.shape_inference.infer_shapes(proto)  # outputs typed, as exporters write them


ACT = st.sampled_from(["Relu", "Sigmoid", "Tanh", "LeakyRelu"])
WIDTH = st.sampled_from([4, 8, 12, 16])
image_piece = st.one_of(
    st.tuples(st.just("conv"), WIDTH), st.tuples(st.just("conv_bn"), WIDTH), st.tuples(st.just("act"), ACT),
    st.tuples(st.just("residual"), ACT), st.tuples(st.just("concat"), WIDTH), st.tuples(st.just("split"), WIDTH),
    st.tuples(st.just("depthwise"), ACT))
sequence_piece = st.one_of(
    st.tuples(st.just("linear"), WIDTH), st.tuples(st.just("act"), ACT), st.tuples(st.just("attention"), WIDTH),
    st.tuples(st.just("residual"), ACT), st.tuples(st.just("mlp"), WIDTH))
image_spec = st.tuples(st.just("image"), st.lists(image_piece, min_size=1, max_size=5),
                       st.sampled_from(["gemm", "reshape_gemm", "conv"]), st.integers(0, 2**16))
sequence_spec = st.tuples(st.just("sequence"), st.lists(sequence_piece, min_size=1, max_size=4),
                          st.sampled_from(["linear", "reshape_gemm"]), st.integers(0, 2**16))


def _image(pieces, head, g: Graph) -> tuple[tuple[int, ...], str]:
    x, c = "x", 3
    for kind, arg in pieces:
        if kind == "conv":
            x, c = g.conv(x, c, arg), arg
        elif kind == "conv_bn":
            stats = [g.rng.uniform(0.5, 1.5, arg), g.rng.normal(0, .1, arg), g.rng.normal(0, .1, arg),
                     g.rng.uniform(0.5, 1.5, arg)]
            x, c = g.op("Relu", g.op("BatchNormalization", g.conv(x, c, arg), *[g.const(s) for s in stats])), arg
        elif kind == "act":
            x = g.op(arg, x)
        elif kind == "residual":
            x = g.op("Add", x, g.conv(g.op(arg, x), c, c))
        elif kind == "concat":
            x, c = g.op("Concat", g.conv(x, c, arg, k=1), g.conv(x, c, c), axis=1), arg + c
        elif kind == "split":
            lo, hi = g.op("Split", g.conv(x, c, 2 * arg, k=1), g.const(np.array([arg, arg])), outputs=2, axis=1)
            x, c = g.op("Add", lo, g.op("Relu", hi)), arg
        elif kind == "depthwise":
            x = g.op(arg, g.conv(x, c, c, group=c))
    if head == "gemm":
        flat = g.op("Flatten", x, axis=1)
        x = g.op("Gemm", flat, g.weight(10, c * 64), g.const(g.rng.normal(0, .1, 10)), transB=1)
    elif head == "reshape_gemm":
        flat = g.op("Reshape", x, g.const(np.array([1, c * 64])))
        x = g.op("Gemm", flat, g.weight(c * 64, 10), g.const(g.rng.normal(0, .1, 10)))
    else:
        x = g.conv(x, c, 5, k=1)
    return (1, 3, 8, 8), x


def _sequence(pieces, head, g: Graph) -> tuple[tuple[int, ...], str]:
    s, x, d = 6, "x", 16
    for kind, arg in pieces:
        if kind == "linear":
            x, d = g.linear(x, d, arg), arg
        elif kind == "act":
            x = g.op(arg, x)
        elif kind == "residual":
            x = g.op("Add", x, g.linear(g.op(arg, x), d, d))
        elif kind == "mlp":
            x = g.op("Add", x, g.linear(g.op("Relu", g.linear(x, d, 2 * arg)), 2 * arg, d))
        elif kind == "attention":
            q, k, v = (g.linear(x, d, arg) for _ in range(3))
            scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 2, 1])), g.const(arg ** -0.5))
            ctx = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)
            x = g.op("Add", x, g.linear(ctx, arg, d))
    if head == "linear":
        x = g.linear(x, d, 7)
    else:
        flat = g.op("Reshape", x, g.const(np.array([1, s * d])))
        x = g.op("Gemm", flat, g.weight(7, s * d), transB=1)
    return (1, s, 16), x


def build(spec) -> onnx.ModelProto:
    family, pieces, head, seed = spec
    g = Graph(seed)
    shape, y = (_image if family == "image" else _sequence)(pieces, head, g)
    return g.model(shape, y)


def _ort(proto: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


@FUZZ
@given(spec=st.one_of(image_spec, sequence_spec), ratio=st.sampled_from([0.0, 0.25, 0.5]),
       pattern=st.sampled_from(["unstructured:0.5", "unstructured:0.9", "block:4x1:0.75", "block:1x4:0.9",
                                "2:4:0.5"]),
       force_sparse=st.booleans())
def test_random_graphs_prune_sparsify_and_compile_like_ort(tmp_path_factory, spec, ratio, pattern, force_sparse):
    proto = build(spec)
    onnx.checker.check_model(proto)
    x = np.random.default_rng(1).standard_normal(tuple(d.dim_value for d in
                                                        proto.graph.input[0].type.tensor_type.shape.dim))
    x = x.astype(np.float32)
    reference_shapes = [o.shape for o in _ort(proto, x)]

    groups = run_analysis("groups", load_model(proto))
    assert all("prunable" in grp for grp in groups)

    pruned = make_pass("prune", ratio=ratio)(load_model(proto), None)
    onnx.checker.check_model(pruned.proto, full_check=True)
    assert [o.shape for o in _ort(pruned.proto, x)] == reference_shapes
    if ratio == 0.0:
        np.testing.assert_allclose(_ort(pruned.proto, x)[0], _ort(proto, x)[0], rtol=1e-5, atol=1e-5)

    kind, _, sparsity = pattern.rpartition(":")
    sparse_options = {"force": "sparse", "min_params": 0, "min_sparsity": 0.0, "measure": False} if force_sparse else {}
    out = tmp_path_factory.mktemp("fuzz") / "a"
    artifact = sparsecc.compile(pruned.proto, output=out, sparsity=float(sparsity), pattern=kind,
                                sparsify_options={"min_params": 0}, inputs={"x": x}, threads=1,
                                target_options={"sparse_options": sparse_options})
    assert artifact.verification["status"] == "passed"
    assert [o.shape for o in artifact.run({"x": x})] == reference_shapes
