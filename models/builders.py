"""Synthetic zoo models: random-weight ONNX graphs shaped like what PyTorch exports, built without torch.

Each builder returns an `onnx.ModelProto` (opset 17, IR 10) with one float input named "input" whose
leading dimension is the symbolic "batch" unless `batch` fixes it, and one output "logits". Together they
cover the patterns the pruning and sparsity passes must handle: chained Gemm or MatMul+Add layers, Conv+BN
with residual Adds, a strided projection shortcut, depthwise convolutions, channel Concats, and explicit
multi-head attention with Reshape/Transpose. Weights are He-initialised from `seed`, so equal arguments give
byte-identical models.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from .graph_builder import GraphBuilder


def _batch_dim(batch: int | None) -> int | str:
    return "batch" if batch is None else batch


def build_mlp(
    in_features: int = 64,
    hidden: tuple[int, ...] = (256, 128),
    classes: int = 10,
    seed: int = 0,
    style: str = "gemm",
    batch: int | None = None,
) -> onnx.ModelProto:
    """An MLP: fully connected + Relu per hidden layer; `style` picks Gemm(transB=1) or MatMul+Add."""
    if style not in ("gemm", "matmul"):
        raise ValueError(f"style must be 'gemm' or 'matmul', not {style!r}")
    g = GraphBuilder(f"mlp_{style}", seed)
    dense = g.gemm if style == "gemm" else g.matmul_add
    x, width = "input", in_features
    for h in hidden:
        x, width = g.op("Relu", [dense(x, width, h)]), h
    b = _batch_dim(batch)
    return g.finish(dense(x, width, classes), [b, in_features], [b, classes])


def build_resnet_cnn(
    channels: int = 3,
    size: int = 32,
    width: int = 16,
    classes: int = 10,
    seed: int = 0,
    batch: int | None = None,
) -> onnx.ModelProto:
    """A small ResNet-style CNN: stem, basic block, strided stage, depthwise-separable block, Concat, head."""
    g = GraphBuilder("resnet_cnn", seed)
    w, w2 = width, 2 * width
    x = g.conv_bn("input", channels, w, 3)

    # Basic block with an identity shortcut: the Add ties the channels of both convs to the stem's.
    y = g.conv_bn(g.conv_bn(x, w, w, 3), w, w, 3, relu=False)
    x = g.op("Relu", [g.op("Add", [y, x])])

    # Strided stage: the shortcut needs a 1x1 stride-2 projection to match shape.
    y = g.conv_bn(g.conv_bn(x, w, w2, 3, stride=2), w2, w2, 3, relu=False)
    x = g.op("Relu", [g.op("Add", [y, g.conv_bn(x, w, w2, 1, stride=2, relu=False)])])

    # Depthwise-separable block: group == channels, so pruning must keep both sides of it in step.
    x = g.conv_bn(g.conv_bn(x, w2, w2, 3, group=w2), w2, w2, 1)

    # Two branches concatenated on channels: each branch owns a slice of the consumer's input channels.
    x = g.op("Concat", [g.conv_bn(x, w2, w, 1), g.conv_bn(x, w2, w, 3)], axis=1)

    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)
    b = _batch_dim(batch)
    return g.finish(g.gemm(x, w2, classes), [b, channels, size, size], [b, classes])


def _attention(g: GraphBuilder, x: str, seq: int, d_model: int, heads: int) -> str:
    """Multi-head self-attention written out op by op, as torch exports a hand-written attention."""
    head_dim = d_model // heads
    # Shape 0 copies the (dynamic) batch dimension, so one constant serves every batch size.
    split_shape = g.const("split_shape", np.array([0, seq, heads, head_dim], np.int64))
    q, k, v = (g.op("Reshape", [g.matmul_add(x, d_model, d_model), split_shape]) for _ in range(3))
    q = g.op("Transpose", [q], perm=[0, 2, 1, 3])
    k_t = g.op("Transpose", [k], perm=[0, 2, 3, 1])
    v = g.op("Transpose", [v], perm=[0, 2, 1, 3])
    scale = g.const("attn_scale", np.array(np.sqrt(head_dim), np.float32))
    probs = g.op("Softmax", [g.op("Div", [g.op("MatMul", [q, k_t]), scale])], axis=-1)
    y = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
    y = g.op("Reshape", [y, g.const("merge_shape", np.array([0, seq, d_model], np.int64))])
    return g.matmul_add(y, d_model, d_model)


def build_transformer(
    seq: int = 16,
    d_model: int = 64,
    heads: int = 4,
    ff: int = 128,
    layers: int = 2,
    classes: int = 10,
    seed: int = 0,
    batch: int | None = None,
) -> onnx.ModelProto:
    """A pre-norm transformer encoder over [batch, seq, d_model] tokens, mean-pooled into a classifier."""
    if d_model % heads:
        raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
    g = GraphBuilder("transformer", seed)
    x = "input"
    for _ in range(layers):
        x = g.op("Add", [x, _attention(g, g.layer_norm(x, d_model), seq, d_model, heads)])
        hidden = g.gelu(g.matmul_add(g.layer_norm(x, d_model), d_model, ff))
        x = g.op("Add", [x, g.matmul_add(hidden, ff, d_model)])
    pooled = g.op("ReduceMean", [g.layer_norm(x, d_model)], axes=[1], keepdims=0)
    b = _batch_dim(batch)
    return g.finish(g.gemm(pooled, d_model, classes), [b, seq, d_model], [b, classes])


BUILDERS: dict[str, Callable[..., onnx.ModelProto]] = {
    "mlp": build_mlp,
    "resnet_cnn": build_resnet_cnn,
    "transformer": build_transformer,
}
