"""Standard CNN topologies at their usual sizes, built with the zoo's `GraphBuilder` (random weights).

ResNet-50 (bottlenecks), DenseNet-121 (dense blocks with concatenation and transitions), an Inception-v2
style network (parallel branches), MobileNet-v2 (inverted residuals, depthwise convs, Clip-as-ReLU6),
SqueezeNet 1.1 (fire modules, biased convs without BN) and ShuffleNet-v2 (channel split and shuffle).
`width` scales channels and `size` the input resolution, so tests can build small versions of each.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from sparsecc.models.graph_builder import GraphBuilder


def _ch(c: float, width: float) -> int:
    return max(8, int(round(c * width / 8)) * 8)


def _maxpool(g: GraphBuilder, x: str, k: int = 3, s: int = 2, pad: int = 1) -> str:
    return g.op("MaxPool", [x], kernel_shape=[k, k], strides=[s, s], pads=[pad] * 4)


def _head(g: GraphBuilder, x: str, c: int, classes: int) -> str:
    return g.gemm(g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1), c, classes)


def _conv_bias(g: GraphBuilder, x: str, c_in: int, c_out: int, k: int, stride: int = 1) -> str:
    w = g.const("conv_w", g.he_normal((c_out, c_in, k, k), fan_in=c_in * k * k))
    b = g.small_normal("conv_b", (c_out,))
    return g.op("Relu", [g.op("Conv", [x, w, b], kernel_shape=[k, k], strides=[stride, stride],
                              pads=[k // 2] * 4)])


def resnet50(batch: int = 1, size: int = 224, width: float = 1.0, classes: int = 1000,
             blocks: tuple[int, ...] = (3, 4, 6, 3)) -> onnx.ModelProto:
    g = GraphBuilder("resnet50", 0)
    c = _ch(64, width)
    x = _maxpool(g, g.conv_bn("input", 3, c, 7, stride=2))
    for stage, n in enumerate(blocks):
        mid = _ch(64 * 2**stage, width)
        out = 4 * mid
        for i in range(n):
            stride = 2 if (i == 0 and stage > 0) else 1
            y = g.conv_bn(x, c, mid, 1)
            y = g.conv_bn(y, mid, mid, 3, stride=stride)
            y = g.conv_bn(y, mid, out, 1, relu=False)
            sc = g.conv_bn(x, c, out, 1, stride=stride, relu=False) if (stride != 1 or c != out) else x
            x, c = g.op("Relu", [g.op("Add", [y, sc])]), out
    return g.finish(_head(g, x, c, classes), [batch, 3, size, size], [batch, classes])


def densenet121(batch: int = 1, size: int = 224, growth: int = 32, classes: int = 1000,
                blocks: tuple[int, ...] = (6, 12, 24, 16)) -> onnx.ModelProto:
    g = GraphBuilder("densenet121", 0)
    c = 2 * growth
    x = _maxpool(g, g.conv_bn("input", 3, c, 7, stride=2))
    for bi, n in enumerate(blocks):
        for _ in range(n):
            y = g.op("Relu", [g.batch_norm(x, c)])  # pre-activation: BN/ReLU before each conv
            y = g.conv(y, c, 4 * growth, 1)
            y = g.conv(g.op("Relu", [g.batch_norm(y, 4 * growth)]), 4 * growth, growth, 3)
            x, c = g.op("Concat", [x, y], axis=1), c + growth
        if bi < len(blocks) - 1:
            y = g.conv(g.op("Relu", [g.batch_norm(x, c)]), c, c // 2, 1)
            x, c = g.op("AveragePool", [y], kernel_shape=[2, 2], strides=[2, 2]), c // 2
    x = g.op("Relu", [g.batch_norm(x, c)])
    return g.finish(_head(g, x, c, classes), [batch, 3, size, size], [batch, classes])


def inception(batch: int = 1, size: int = 224, width: float = 1.0, classes: int = 1000) -> onnx.ModelProto:
    """Inception-v2 style: 1x1 / 1x1-3x3 / 1x1-3x3-3x3 / pool-1x1 branches, concatenated."""
    g = GraphBuilder("inception", 0)
    c = _ch(64, width)
    x = _maxpool(g, g.conv_bn("input", 3, c, 7, stride=2))
    x = _maxpool(g, g.conv_bn(g.conv_bn(x, c, c, 1), c, _ch(192, width), 3))
    c = _ch(192, width)
    spec = [(64, 64, 64, 64, 96, 32), (64, 64, 96, 64, 96, 64), "pool", (224, 64, 96, 96, 128, 128),
            (192, 96, 128, 96, 128, 128), (160, 128, 160, 128, 160, 96), "pool", (352, 192, 320, 160, 224, 128),
            (352, 192, 320, 192, 224, 128)]
    for s in spec:
        if s == "pool":
            x = _maxpool(g, x)
            continue
        b1, r3, o3, rd, od, bp = (_ch(v, width) for v in s)
        y1 = g.conv_bn(x, c, b1, 1)
        y2 = g.conv_bn(g.conv_bn(x, c, r3, 1), r3, o3, 3)
        y3 = g.conv_bn(g.conv_bn(g.conv_bn(x, c, rd, 1), rd, od, 3), od, od, 3)
        pool = g.op("AveragePool", [x], kernel_shape=[3, 3], strides=[1, 1], pads=[1] * 4,
                    count_include_pad=1)
        y4 = g.conv_bn(pool, c, bp, 1)
        x, c = g.op("Concat", [y1, y2, y3, y4], axis=1), b1 + o3 + od + bp
    return g.finish(_head(g, x, c, classes), [batch, 3, size, size], [batch, classes])


def _relu6(g: GraphBuilder, x: str) -> str:
    lo = g.const("clip_min", np.array(0.0, np.float32))
    hi = g.const("clip_max", np.array(6.0, np.float32))
    return g.op("Clip", [x, lo, hi])


def _conv_bn6(g: GraphBuilder, x: str, c_in: int, c_out: int, k: int, stride: int = 1, group: int = 1,
              act: bool = True) -> str:
    y = g.conv_bn(x, c_in, c_out, k, stride, group, relu=False)
    return _relu6(g, y) if act else y


def mobilenet_v2(batch: int = 1, size: int = 224, width: float = 1.0, classes: int = 1000) -> onnx.ModelProto:
    g = GraphBuilder("mobilenet_v2", 0)
    c = _ch(32, width)
    x = _conv_bn6(g, "input", 3, c, 3, stride=2)
    for t, ch, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                        (6, 160, 3, 2), (6, 320, 1, 1)]:
        out = _ch(ch, width)
        for i in range(n):
            stride = s if i == 0 else 1
            hid = c * t
            y = _conv_bn6(g, x, c, hid, 1) if t != 1 else x
            y = _conv_bn6(g, y, hid, hid, 3, stride=stride, group=hid)
            y = _conv_bn6(g, y, hid, out, 1, act=False)
            x = g.op("Add", [x, y]) if (stride == 1 and c == out) else y
            c = out
    last = _ch(1280, width)
    x = _conv_bn6(g, x, c, last, 1)
    return g.finish(_head(g, x, last, classes), [batch, 3, size, size], [batch, classes])


def squeezenet(batch: int = 1, size: int = 224, classes: int = 1000) -> onnx.ModelProto:
    """SqueezeNet 1.1: biased convs with ReLU, fire modules (squeeze 1x1, expand 1x1 + 3x3, concat)."""
    g = GraphBuilder("squeezenet", 0)
    x = _maxpool(g, _conv_bias(g, "input", 3, 64, 3, stride=2), pad=0)
    c = 64
    for item in [(16, 64), (16, 64), "pool", (32, 128), (32, 128), "pool", (48, 192), (48, 192), (64, 256),
                 (64, 256)]:
        if item == "pool":
            x = _maxpool(g, x, pad=0)
            continue
        sq, ex = item
        s = _conv_bias(g, x, c, sq, 1)
        x, c = g.op("Concat", [_conv_bias(g, s, sq, ex, 1), _conv_bias(g, s, sq, ex, 3)], axis=1), 2 * ex
    x = _conv_bias(g, x, c, classes, 1)
    out = g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)
    return g.finish(out, [batch, 3, size, size], [batch, classes])


def _shuffle(g: GraphBuilder, x: str, c: int, hw: int, batch: int) -> str:
    shape5 = g.const("shape", np.array([batch, 2, c // 2, hw, hw], np.int64))
    shape4 = g.const("shape", np.array([batch, c, hw, hw], np.int64))
    y = g.op("Transpose", [g.op("Reshape", [x, shape5])], perm=[0, 2, 1, 3, 4])
    return g.op("Reshape", [y, shape4])


def shufflenet_v2(batch: int = 1, size: int = 224, width: float = 1.0, classes: int = 1000) -> onnx.ModelProto:
    g = GraphBuilder("shufflenet_v2", 0)
    c = 24
    x = _maxpool(g, g.conv_bn("input", 3, c, 3, stride=2))
    hw = size // 4
    for out, n in [(_ch(116, width), 4), (_ch(232, width), 8), (_ch(464, width), 4)]:
        half = out // 2
        for i in range(n):
            if i == 0:
                a = g.conv_bn(g.conv_bn(x, c, c, 3, stride=2, group=c, relu=False), c, half, 1)
                b = g.conv_bn(x, c, half, 1)
                b = g.conv_bn(g.conv_bn(b, half, half, 3, stride=2, group=half, relu=False), half, half, 1)
                hw = (hw + 1) // 2
            else:
                split = g.const("split", np.array([half, half], np.int64))
                node = onnx.helper.make_node("Split", [x, split], [g.fresh("split_a"), g.fresh("split_b")],
                                             axis=1, name=g.fresh("split"))
                g.nodes.append(node)
                a, b = node.output
                b = g.conv_bn(b, half, half, 1)
                b = g.conv_bn(g.conv_bn(b, half, half, 3, group=half, relu=False), half, half, 1)
            x, c = _shuffle(g, g.op("Concat", [a, b], axis=1), out, hw, batch), out
    x = g.conv_bn(x, c, 1024, 1)
    return g.finish(_head(g, x, 1024, classes), [batch, 3, size, size], [batch, classes])


CNNS: dict[str, Callable[..., onnx.ModelProto]] = {
    "resnet50": resnet50,
    "densenet121": densenet121,
    "inception": inception,
    "mobilenet_v2": mobilenet_v2,
    "squeezenet": squeezenet,
    "shufflenet_v2": shufflenet_v2,
}
