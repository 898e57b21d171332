"""Tiny ONNX graphs for the pruning tests, built with onnx.helper (one per coupling pattern)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from sparsecc.ir import Model, load_model


class Net:
    """Append-only builder: each method adds one op with seeded random weights and returns its output name."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def _name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def const(self, value, prefix: str = "c") -> str:
        name = self._name(prefix)
        arr = np.asarray(value)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        name = self._name(op.lower())
        outs = [f"{name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, bias: bool = True) -> str:
        w = self.const(self.rng.normal(0, 0.3, (cout, cin // group, k, k)), "w")
        ins = [x, w] + ([self.const(self.rng.normal(0, 0.1, cout), "b")] if bias else [])
        return self.op("Conv", ins, pads=[k // 2] * 4, group=group)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        params = [r.uniform(0.5, 1.5, c), r.normal(0, 0.1, c), r.normal(0, 0.1, c), r.uniform(0.5, 1.5, c)]
        return self.op("BatchNormalization", [x] + [self.const(p, "bn") for p in params])

    def gemm(self, x: str, k: int, n: int, trans_b: int = 1) -> str:
        shape = (n, k) if trans_b else (k, n)
        w = self.const(self.rng.normal(0, 0.3, shape), "w")
        return self.op("Gemm", [x, w, self.const(self.rng.normal(0, 0.1, n), "b")], transB=trans_b)

    def linear(self, x: str, k: int, n: int) -> str:
        """The exported torch Linear: MatMul(x, W^T) + Add(b)."""
        y = self.op("MatMul", [x, self.const(self.rng.normal(0, 0.3, (k, n)), "w")])
        return self.op("Add", [y, self.const(self.rng.normal(0, 0.1, n), "b")])

    def build(self, inputs: dict[str, tuple[int, ...]], outputs: list[str], opset: int = 17) -> Model:
        graph = helper.make_graph(
            self.nodes,
            "test",
            [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            self.inits,
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        proto.ir_version = 8
        return load_model(proto)


def run(model: Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def random_feeds(model: Model, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i.name: rng.normal(0, 1, i.shape).astype(np.float32) for i in model.inputs}


def zero_channels(model: Model, keep_ratio: float = 0.5, seed: int = 0, attention: str = "heads") -> Model:
    """Zero every producer's weights for a seeded subset of each channel group (the 'already pruned' model)."""
    from sparsecc.passes.grouping import trace_groups

    analysis = trace_groups(model, attention=attention)
    rng = np.random.default_rng(seed)
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    init = {t.name: t for t in proto.graph.initializer}
    for grp in analysis.groups:
        if not grp.prunable or len(grp.channels) < 2:
            continue
        n_zero = int(len(grp.channels) * (1 - keep_ratio))
        zeroed = set(rng.choice(grp.channels, n_zero, replace=False).tolist())
        for m in grp.members:
            if m.const and m.role not in ("in_channels", "in_features") and m.tensor in init:
                arr = numpy_helper.to_array(init[m.tensor]).copy()
                mask = np.isin(m.ids, list(zeroed))
                index = [slice(None)] * arr.ndim
                index[m.axis] = mask
                arr[tuple(index)] = 0
                init[m.tensor].CopyFrom(numpy_helper.from_array(arr, m.tensor))
    return Model(proto, model.source)


def zeroed_channels(model: Model, attention: str = "heads") -> set[int]:
    """Roots of the prunable channels whose producer weights are all zero."""
    from sparsecc.passes.grouping import trace_groups

    analysis = trace_groups(model, attention=attention)
    consts = {t.name: np.asarray(t.values) for t in analysis.graph.tensors().values() if hasattr(t, "values")}
    zero: set[int] = set()
    for grp in analysis.groups:
        if not grp.prunable:
            continue
        for m in grp.members:
            if m.const and m.role in ("out_channels", "out_features", "embedding"):
                w = np.moveaxis(consts[m.tensor], m.axis, 0).reshape(consts[m.tensor].shape[m.axis], -1)
                zero.update(int(r) for r, row in zip(m.ids, w) if r >= 0 and not row.any())
    return zero


def assert_exact_pruning(
    model: Model, keep_ratio: float = 0.5, seed: int = 0, min_removed: int = 1, attention: str = "heads"
) -> Model:
    """Zero a subset of every group, remove exactly those channels, compare with ONNX Runtime (1e-5)."""
    from sparsecc.passes.grouping import trace_groups
    from sparsecc.passes.prune import count_params, remove_channels

    zeroed = zero_channels(model, keep_ratio, seed, attention)
    analysis = trace_groups(zeroed, attention=attention)
    pruned = zeroed_channels(zeroed, attention)
    assert len(pruned) >= min_removed
    before = count_params(analysis.graph)
    out = remove_channels(zeroed, analysis, pruned)
    onnx.checker.check_model(out.proto, full_check=True)
    feeds = random_feeds(model)
    for a, b in zip(run(zeroed, feeds), run(out, feeds)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    assert sum(t.values.size for t in out.graph().tensors().values() if hasattr(t, "values")) < before
    return out


def groups_of(model: Model, attention: str = "heads") -> list:
    from sparsecc.passes.grouping import trace_groups

    return trace_groups(model, attention=attention).groups
