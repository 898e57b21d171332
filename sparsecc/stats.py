"""Model statistics: op histogram, parameter count and FLOPs per node, from inferred shapes.

Used by `sparsecc inspect`, by the pruning summary (before/after) and by the artifact report. FLOPs count a
multiply-add as two; ops without a dedicated rule count one FLOP per output element. A layer's sparsity is the
fraction of exact zeros in its weight (the largest constant input of a Conv, MatMul or Gemm).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .ir import Model


@dataclass(frozen=True)
class NodeStats:
    name: str
    op: str
    output_shape: tuple[int, ...]
    params: int
    flops: int
    sparsity: float | None = None  # zeros in the weight of a Conv/MatMul/Gemm; None for other ops

    def to_json(self) -> dict:
        return {"name": self.name, "op": self.op, "output_shape": list(self.output_shape),
                "params": self.params, "flops": self.flops, "sparsity": self.sparsity}


def _shapes(proto: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for v in list(proto.graph.input) + list(proto.graph.value_info) + list(proto.graph.output):
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = tuple(d.dim_value if d.HasField("dim_value") else 0 for d in dims)
    for t in proto.graph.initializer:
        shapes[t.name] = tuple(t.dims)
    return shapes


def _conv(node, shp) -> int:
    out, w = shp(node.output[0]), shp(node.input[1])
    return 2 * int(np.prod(out)) * int(np.prod(w[1:])) if out and w else 0


def _conv_transpose(node, shp) -> int:
    x, w = shp(node.input[0]), shp(node.input[1])
    return 2 * int(np.prod(x)) * int(np.prod(w[1:])) if x and w else 0


def _matmul(node, shp) -> int:
    a, out = shp(node.input[0]), shp(node.output[0])
    return 2 * int(np.prod(out)) * a[-1] if a and out else 0


def _gemm(node, shp) -> int:
    a, out = shp(node.input[0]), shp(node.output[0])
    trans_a = any(at.name == "transA" and at.i for at in node.attribute)
    k = a[0] if trans_a else a[-1]
    return 2 * int(np.prod(out)) * k if a and out else 0


FLOP_RULES: dict[str, Callable] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "MatMul": _matmul,
    "Gemm": _gemm,
}


WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def _weight_sparsity(node: onnx.NodeProto, tensors: dict[str, onnx.TensorProto]) -> float | None:
    weights = [tensors[x] for x in node.input if x in tensors]
    if node.op_type not in WEIGHTED_OPS or not weights:
        return None
    w = numpy_helper.to_array(max(weights, key=lambda t: int(np.prod(t.dims))))
    return round(1.0 - np.count_nonzero(w) / w.size, 4) if w.size else None


def node_stats(model: Model) -> list[NodeStats]:
    proto = model.proto
    shapes = _shapes(proto)
    tensors = {t.name: t for t in proto.graph.initializer}
    inits = {name: int(np.prod(t.dims)) for name, t in tensors.items()}

    def shp(name: str) -> tuple[int, ...]:
        return shapes.get(name, ())

    result = []
    for i, node in enumerate(proto.graph.node):
        out = shp(node.output[0]) if node.output else ()
        rule = FLOP_RULES.get(node.op_type)
        flops = rule(node, shp) if rule else int(np.prod(out)) if out else 0
        params = sum(inits.get(x, 0) for x in node.input if x in inits)
        result.append(NodeStats(node.name or f"{node.op_type}_{i}", node.op_type, out, params, flops,
                                _weight_sparsity(node, tensors)))
    return result


def model_summary(model: Model) -> dict:
    """Totals for a model: params (and how many are nonzero), FLOPs, serialized size, op histogram, I/O specs."""
    nodes = node_stats(model)
    params = sum(int(np.prod(t.dims)) for t in model.proto.graph.initializer)
    nonzero = sum(int(np.count_nonzero(numpy_helper.to_array(t))) for t in model.proto.graph.initializer)
    return {
        "inputs": [s.to_json() for s in model.inputs],
        "outputs": [s.to_json() for s in model.outputs],
        "opset": model.opset,
        "nodes": len(nodes),
        "params": params,
        "nonzero_params": nonzero,
        "size_bytes": model.proto.ByteSize(),
        "flops": sum(n.flops for n in nodes),
        "ops": dict(sorted(Counter(n.op for n in nodes).items())),
    }
