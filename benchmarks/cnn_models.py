"""Standard CNN topologies at their usual sizes, built with the zoo's `GraphBuilder` (random weights).

ResNet-50 (bottlenecks), DenseNet-121 (dense blocks with concatenation and transitions), an Inception-v2
style network (parallel branches), MobileNet-v2 (inverted residuals, depthwise convs, Clip-as-ReLU6),
SqueezeNet 1.1 (fire modules, biased convs without BN) and ShuffleNet-v2 (channel split and shuffle).
`width` scales channels and `size` the input resolution, so tests can build small versions of each.

`EXTRA_CNNS` holds topologies kept out of the default benchmark list (run them by name): EfficientNet-B0
(MBConv with 3x3/5x5 depthwise convs, SiLU as x * Sigmoid(x), squeeze-excitation), MobileNet-v3-small
(HardSwish, HardSigmoid squeeze-excitation), ResNet-18 (basic blocks) and VGG-11 (large 3x3 convs, max
pooling, a 25088 x 4096 fully connected layer), ResNeXt-50 (grouped 3x3 convs), AlexNet (11x11 stride-4
and 5x5 convs), ConvNeXt-tiny (7x7 depthwise convs, layer norms, GELU MLPs on channels-last tensors) and
RegNetY-800MF (convs in groups of 16 channels, squeeze-excitation) and YOLOX-s, a 416x416 detector (Focus
slicing, SPP max pools, nearest upsampling, multi-level heads).
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


def _silu(g: GraphBuilder, x: str) -> str:
    return g.op("Mul", [x, g.op("Sigmoid", [x])])


def _hard_sigmoid(g: GraphBuilder, x: str) -> str:
    return g.op("HardSigmoid", [x], alpha=1.0 / 6.0, beta=0.5)  # torch's hardsigmoid: relu6(x + 3) / 6


_ACTIVATIONS: dict[str, Callable[[GraphBuilder, str], str]] = {
    "relu": lambda g, x: g.op("Relu", [x]),
    "silu": _silu,
    "hswish": lambda g, x: g.op("HardSwish", [x]),
}


def _conv_bn_act(g: GraphBuilder, x: str, c_in: int, c_out: int, k: int, stride: int = 1, group: int = 1,
                 act: str | None = "relu") -> str:
    y = g.conv_bn(x, c_in, c_out, k, stride, group, relu=False)
    return _ACTIVATIONS[act](g, y) if act else y


def _squeeze_excite(g: GraphBuilder, x: str, c: int, squeeze: int, act: str, gate: str) -> str:
    """x * gate(conv(act(conv(GlobalAveragePool(x))))), both 1x1 convs biased (as torchvision's)."""
    s = _ACTIVATIONS[act](g, _conv_bias_only(g, g.op("GlobalAveragePool", [x]), c, squeeze))
    s = _conv_bias_only(g, s, squeeze, c)
    s = g.op("Sigmoid", [s]) if gate == "sigmoid" else _hard_sigmoid(g, s)
    return g.op("Mul", [x, s])


def _conv_bias_only(g: GraphBuilder, x: str, c_in: int, c_out: int) -> str:
    w = g.const("conv_w", g.he_normal((c_out, c_in, 1, 1), fan_in=c_in))
    return g.op("Conv", [x, w, g.small_normal("conv_b", (c_out,))], kernel_shape=[1, 1])


def efficientnet_b0(batch: int = 1, size: int = 224, width: float = 1.0, classes: int = 1000) -> onnx.ModelProto:
    """EfficientNet-B0: MBConv blocks (expand 1x1, depthwise kxk, squeeze-excitation, project 1x1), SiLU."""
    g = GraphBuilder("efficientnet_b0", 0)
    c = _ch(32, width)
    x = _conv_bn_act(g, "input", 3, c, 3, stride=2, act="silu")
    for t, k, s, ch, n in [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                           (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]:
        out = _ch(ch, width)
        for i in range(n):
            stride = s if i == 0 else 1
            hid = c * t
            y = _conv_bn_act(g, x, c, hid, 1, act="silu") if t != 1 else x
            y = _conv_bn_act(g, y, hid, hid, k, stride=stride, group=hid, act="silu")
            y = _squeeze_excite(g, y, hid, max(1, c // 4), "silu", "sigmoid")
            y = _conv_bn_act(g, y, hid, out, 1, act=None)
            x = g.op("Add", [x, y]) if (stride == 1 and c == out) else y
            c = out
    last = _ch(1280, width)
    x = _conv_bn_act(g, x, c, last, 1, act="silu")
    return g.finish(_head(g, x, last, classes), [batch, 3, size, size], [batch, classes])


def mobilenet_v3_small(batch: int = 1, size: int = 224, width: float = 1.0,
                       classes: int = 1000) -> onnx.ModelProto:
    """MobileNet-v3-small: inverted residuals with ReLU or HardSwish, HardSigmoid squeeze-excitation."""
    g = GraphBuilder("mobilenet_v3_small", 0)
    c = _ch(16, width)
    x = _conv_bn_act(g, "input", 3, c, 3, stride=2, act="hswish")
    for k, exp, ch, se, act, s in [(3, 16, 16, True, "relu", 2), (3, 72, 24, False, "relu", 2),
                                   (3, 88, 24, False, "relu", 1), (5, 96, 40, True, "hswish", 2),
                                   (5, 240, 40, True, "hswish", 1), (5, 240, 40, True, "hswish", 1),
                                   (5, 120, 48, True, "hswish", 1), (5, 144, 48, True, "hswish", 1),
                                   (5, 288, 96, True, "hswish", 2), (5, 576, 96, True, "hswish", 1),
                                   (5, 576, 96, True, "hswish", 1)]:
        hid, out = _ch(exp, width), _ch(ch, width)
        y = _conv_bn_act(g, x, c, hid, 1, act=act) if hid != c else x
        y = _conv_bn_act(g, y, hid, hid, k, stride=s, group=hid, act=act)
        if se:
            y = _squeeze_excite(g, y, hid, _ch(hid / 4, 1.0), "relu", "hard_sigmoid")
        y = _conv_bn_act(g, y, hid, out, 1, act=None)
        x = g.op("Add", [x, y]) if (s == 1 and c == out) else y
        c = out
    last = _ch(576, width)
    x = _conv_bn_act(g, x, c, last, 1, act="hswish")
    x = g.op("HardSwish", [g.gemm(g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1), last, 1024)])
    return g.finish(g.gemm(x, 1024, classes), [batch, 3, size, size], [batch, classes])


def resnet18(batch: int = 1, size: int = 224, width: float = 1.0, classes: int = 1000) -> onnx.ModelProto:
    """ResNet-18: basic blocks (two 3x3 convs), 2 per stage."""
    g = GraphBuilder("resnet18", 0)
    c = _ch(64, width)
    x = _maxpool(g, g.conv_bn("input", 3, c, 7, stride=2))
    for stage in range(4):
        out = _ch(64 * 2**stage, width)
        for i in range(2):
            stride = 2 if (i == 0 and stage > 0) else 1
            y = g.conv_bn(g.conv_bn(x, c, out, 3, stride=stride), out, out, 3, relu=False)
            sc = g.conv_bn(x, c, out, 1, stride=stride, relu=False) if (stride != 1 or c != out) else x
            x, c = g.op("Relu", [g.op("Add", [y, sc])]), out
    return g.finish(_head(g, x, c, classes), [batch, 3, size, size], [batch, classes])


def vgg11(batch: int = 1, size: int = 224, width: float = 1.0, classes: int = 1000,
          hidden: int = 4096) -> onnx.ModelProto:
    """VGG-11 (torchvision `vgg11`: biased convs, no BN): 3x3 convs and max pooling, then three fully
    connected layers on the flattened 512 x 7 x 7 map."""
    g = GraphBuilder("vgg11", 0)
    x, c, hw = "input", 3, size
    for item in [64, "pool", 128, "pool", 256, 256, "pool", 512, 512, "pool", 512, 512, "pool"]:
        if item == "pool":
            x, hw = _maxpool(g, x, k=2, s=2, pad=0), hw // 2
            continue
        out = _ch(item, width)
        x, c = _conv_bias(g, x, c, out, 3), out
    x = g.op("Flatten", [x], axis=1)
    x = g.op("Relu", [g.gemm(x, c * hw * hw, hidden)])
    x = g.op("Relu", [g.gemm(x, hidden, hidden)])
    return g.finish(g.gemm(x, hidden, classes), [batch, 3, size, size], [batch, classes])


def resnext50(batch: int = 1, size: int = 224, width: float = 1.0, classes: int = 1000,
              groups: int = 32) -> onnx.ModelProto:
    """ResNeXt-50 32x4d (torchvision `resnext50_32x4d`): ResNet-50's bottlenecks with twice the middle
    channels, their 3x3 convs in 32 groups."""
    g = GraphBuilder("resnext50", 0)
    c = _ch(64, width)
    x = _maxpool(g, g.conv_bn("input", 3, c, 7, stride=2))
    for stage, n in enumerate((3, 4, 6, 3)):
        mid, out = _ch(128 * 2**stage, width), _ch(256 * 2**stage, width)
        for i in range(n):
            stride = 2 if (i == 0 and stage > 0) else 1
            y = g.conv_bn(x, c, mid, 1)
            y = g.conv_bn(y, mid, mid, 3, stride=stride, group=groups)
            y = g.conv_bn(y, mid, out, 1, relu=False)
            sc = g.conv_bn(x, c, out, 1, stride=stride, relu=False) if (stride != 1 or c != out) else x
            x, c = g.op("Relu", [g.op("Add", [y, sc])]), out
    return g.finish(_head(g, x, c, classes), [batch, 3, size, size], [batch, classes])


def alexnet(batch: int = 1, size: int = 224, width: float = 1.0, classes: int = 1000,
            hidden: int = 4096) -> onnx.ModelProto:
    """AlexNet (torchvision `alexnet`): an 11x11 stride-4 conv, a 5x5 conv, three 3x3 convs, overlapping
    3x3 stride-2 max pools, then three fully connected layers on the 256 x 6 x 6 map."""
    g = GraphBuilder("alexnet", 0)

    def conv(x: str, c_in: int, c_out: int, k: int, stride: int, pad: int) -> str:
        w = g.const("conv_w", g.he_normal((c_out, c_in, k, k), fan_in=c_in * k * k))
        b = g.small_normal("conv_b", (c_out,))
        return g.op("Relu", [g.op("Conv", [x, w, b], kernel_shape=[k, k], strides=[stride, stride],
                                  pads=[pad] * 4)])

    c1, c2, c3, c4 = (_ch(c, width) for c in (64, 192, 384, 256))
    x = _maxpool(g, conv("input", 3, c1, 11, 4, 2), pad=0)
    x = _maxpool(g, conv(x, c1, c2, 5, 1, 2), pad=0)
    x = _maxpool(g, conv(conv(conv(x, c2, c3, 3, 1, 1), c3, c4, 3, 1, 1), c4, c4, 3, 1, 1), pad=0)
    hw = ((size + 4 - 11) // 4 + 1 - 3) // 2 + 1
    hw = ((hw - 3) // 2 + 1 - 3) // 2 + 1
    x = g.op("Flatten", [x], axis=1)
    x = g.op("Relu", [g.gemm(x, c4 * hw * hw, hidden)])
    x = g.op("Relu", [g.gemm(x, hidden, hidden)])
    return g.finish(g.gemm(x, hidden, classes), [batch, 3, size, size], [batch, classes])


def convnext_tiny(batch: int = 1, size: int = 224, width: float = 1.0, classes: int = 1000,
                  depths: tuple[int, ...] = (3, 3, 9, 3)) -> onnx.ModelProto:
    """ConvNeXt-tiny as torchvision exports it: a 4x4 stride-4 stem, blocks of a 7x7 depthwise conv, then
    channels-last layer norm, Linear 4x, exact GELU, Linear and a layer scale (MatMul + Add on the NHWC
    tensor between two Transposes) plus the residual; channels-first layer norms (Transpose, LayerNorm,
    Transpose) before each 2x2 stride-2 downsampling conv and the classifier."""
    g = GraphBuilder("convnext_tiny", 0)
    dims = [_ch(d, width) for d in (96, 192, 384, 768)]

    def conv(x: str, c_in: int, c_out: int, k: int, group: int = 1) -> str:
        w = g.const("conv_w", g.he_normal((c_out, c_in // group, k, k), fan_in=c_in // group * k * k))
        stride, pad = (1, k // 2) if group > 1 else (k, 0)
        return g.op("Conv", [x, w, g.small_normal("conv_b", (c_out,))], kernel_shape=[k, k],
                    strides=[stride, stride], pads=[pad] * 4, group=group)

    def layer_norm_2d(x: str, c: int) -> str:
        y = g.layer_norm(g.op("Transpose", [x], perm=[0, 2, 3, 1]), c)
        return g.op("Transpose", [y], perm=[0, 3, 1, 2])

    c = dims[0]
    x = layer_norm_2d(conv("input", 3, c, 4), c)
    for stage, n in enumerate(depths):
        if stage:
            x, c = conv(layer_norm_2d(x, c), c, dims[stage], 2), dims[stage]
        for _ in range(n):
            y = g.op("Transpose", [conv(x, c, c, 7, group=c)], perm=[0, 2, 3, 1])
            y = g.matmul_add(g.gelu(g.matmul_add(g.layer_norm(y, c), c, 4 * c)), 4 * c, c)
            y = g.op("Mul", [y, g.small_normal("layer_scale", (c,), 0.5)])
            x = g.op("Add", [x, g.op("Transpose", [y], perm=[0, 3, 1, 2])])
    x = g.op("Flatten", [layer_norm_2d(g.op("GlobalAveragePool", [x]), c)], axis=1)
    return g.finish(g.gemm(x, c, classes), [batch, 3, size, size], [batch, classes])


def regnety_800mf(batch: int = 1, size: int = 224, width: float = 1.0, classes: int = 1000,
                  group_width: int = 16) -> onnx.ModelProto:
    """RegNetY-800MF (torchvision `regnet_y_800mf`): ResNet-style bottlenecks without expansion whose 3x3
    convs run in groups of 16 channels, with squeeze-excitation (ReLU, Sigmoid) on a quarter of the block's
    input channels."""
    g = GraphBuilder("regnety_800mf", 0)
    c = _ch(32, width)
    x = _conv_bn_act(g, "input", 3, c, 3, stride=2)
    for w, n in ((64, 1), (144, 3), (320, 8), (784, 2)):
        w = _ch(w, width)
        for i in range(n):
            stride = 2 if i == 0 else 1
            y = _conv_bn_act(g, x, c, w, 1)
            y = _conv_bn_act(g, y, w, w, 3, stride=stride, group=w // min(group_width, w))
            y = _squeeze_excite(g, y, w, max(1, round(c / 4)), "relu", "sigmoid")
            y = _conv_bn_act(g, y, w, w, 1, act=None)
            sc = _conv_bn_act(g, x, c, w, 1, stride=stride, act=None) if (stride != 1 or c != w) else x
            x, c = g.op("Relu", [g.op("Add", [y, sc])]), w
    return g.finish(_head(g, x, c, classes), [batch, 3, size, size], [batch, classes])


def yolox_s(batch: int = 1, size: int = 416, width: float = 1.0, classes: int = 80) -> onnx.ModelProto:
    """YOLOX-s as its ONNX export looks: a Focus stem (four strided Slices, Concat), a CSPDarknet backbone
    with SiLU and an SPP block (max pools of 5, 9, 13), a PAFPN neck (nearest Resize x2 up, strided convs
    down, Concats), and decoupled heads whose [box, Sigmoid(objectness), Sigmoid(classes)] maps are flattened
    and concatenated over the three levels into [batch, anchors, 5 + classes]."""
    g = GraphBuilder("yolox_s", 0)

    def cba(x: str, c_in: int, c_out: int, k: int, stride: int = 1) -> str:
        return _conv_bn_act(g, x, c_in, c_out, k, stride, act="silu")

    def csp(x: str, c_in: int, c_out: int, n: int, shortcut: bool = True) -> str:
        hid = c_out // 2
        y, z = cba(x, c_in, hid, 1), cba(x, c_in, hid, 1)
        for _ in range(n):
            b = cba(cba(y, hid, hid, 1), hid, hid, 3)
            y = g.op("Add", [y, b]) if shortcut else b
        return cba(g.op("Concat", [y, z], axis=1), 2 * hid, c_out, 1)

    def up(x: str) -> str:
        scales = g.const("scales", np.array([1, 1, 2, 2], np.float32))
        return g.op("Resize", [x, "", scales], mode="nearest")

    c = [_ch(ch, width) for ch in (32, 64, 128, 256, 512)]
    i64 = lambda v: g.const("slice", np.array(v, np.int64))  # noqa: E731
    parts = [g.op("Slice", ["input", i64([h, w]), i64([size, size]), i64([2, 3]), i64([2, 2])])
             for h, w in ((0, 0), (1, 0), (0, 1), (1, 1))]
    x = cba(g.op("Concat", parts, axis=1), 12, c[0], 3)
    x = csp(cba(x, c[0], c[1], 3, 2), c[1], c[1], 1)
    dark3 = csp(cba(x, c[1], c[2], 3, 2), c[2], c[2], 3)
    dark4 = csp(cba(dark3, c[2], c[3], 3, 2), c[3], c[3], 3)
    x = cba(cba(dark4, c[3], c[4], 3, 2), c[4], c[3], 1)
    pools = [g.op("MaxPool", [x], kernel_shape=[k, k], strides=[1, 1], pads=[k // 2] * 4) for k in (5, 9, 13)]
    x = cba(g.op("Concat", [x, *pools], axis=1), 4 * c[3], c[4], 1)
    dark5 = csp(x, c[4], c[4], 1, shortcut=False)
    fpn0 = cba(dark5, c[4], c[3], 1)
    f = csp(g.op("Concat", [up(fpn0), dark4], axis=1), c[4], c[3], 1, shortcut=False)
    fpn1 = cba(f, c[3], c[2], 1)
    pan2 = csp(g.op("Concat", [up(fpn1), dark3], axis=1), c[3], c[2], 1, shortcut=False)
    p = cba(pan2, c[2], c[2], 3, 2)
    pan1 = csp(g.op("Concat", [p, fpn1], axis=1), c[3], c[3], 1, shortcut=False)
    p = cba(pan1, c[3], c[3], 3, 2)
    pan0 = csp(g.op("Concat", [p, fpn0], axis=1), c[4], c[4], 1, shortcut=False)
    outs = []
    for x, ch in ((pan2, c[2]), (pan1, c[3]), (pan0, c[4])):
        stem = cba(x, ch, c[2], 1)
        cls = _conv_bias_only(g, cba(cba(stem, c[2], c[2], 3), c[2], c[2], 3), c[2], classes)
        reg = cba(cba(stem, c[2], c[2], 3), c[2], c[2], 3)
        box, obj = _conv_bias_only(g, reg, c[2], 4), _conv_bias_only(g, reg, c[2], 1)
        y = g.op("Concat", [box, g.op("Sigmoid", [obj]), g.op("Sigmoid", [cls])], axis=1)
        outs.append(g.op("Reshape", [y, g.const("shape", np.array([batch, 5 + classes, -1], np.int64))]))
    anchors = sum((size // s) ** 2 for s in (8, 16, 32))
    y = g.op("Transpose", [g.op("Concat", outs, axis=2)], perm=[0, 2, 1])
    return g.finish(y, [batch, 3, size, size], [batch, anchors, 5 + classes])


CNNS: dict[str, Callable[..., onnx.ModelProto]] = {
    "resnet50": resnet50,
    "densenet121": densenet121,
    "inception": inception,
    "mobilenet_v2": mobilenet_v2,
    "squeezenet": squeezenet,
    "shufflenet_v2": shufflenet_v2,
}

# Not in the default benchmark list (`dense_cpu.py` runs them when named): they add minutes to a full run.
EXTRA_CNNS: dict[str, Callable[..., onnx.ModelProto]] = {
    "efficientnet_b0": efficientnet_b0,
    "mobilenet_v3_small": mobilenet_v3_small,
    "resnet18": resnet18,
    "vgg11": vgg11,
    "resnext50": resnext50,
    "alexnet": alexnet,
    "convnext_tiny": convnext_tiny,
    "regnety_800mf": regnety_800mf,
    "yolox_s": yolox_s,
}
