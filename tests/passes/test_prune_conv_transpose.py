"""Coupling rules of detection heads and FPNs: ConvTranspose (weight [C_in, C_out/group, kh, kw]: consumer on
axis 0, producer on axis 1), nearest Resize x2 by scales (channels pass through) merged by Add or Concat, and a
Sigmoid head whose channels reach a graph output (blocked, with a reason)."""

import numpy as np
from prune_graphs import Net, assert_exact_pruning, groups_of


def conv_transpose(net, x, cin, cout):
    w = net.const(net.rng.normal(0, 0.3, (cin, cout, 2, 2)), "w")
    return net.op("ConvTranspose", [x, w, net.const(net.rng.normal(0, 0.1, cout), "b")], strides=[2, 2])


def upsample(net, x, scales=(1, 1, 2, 2)):
    return net.op("Resize", [x, "", net.const(np.array(scales, np.float32))], mode="nearest")


def fpn_head_net():
    net = Net(4)
    c1 = net.op("Relu", [net.bn(net.conv("x", 3, 6), 6)])  # 1/1
    c2 = net.op("Relu", [net.conv(net.op("MaxPool", [c1], kernel_shape=[2, 2], strides=[2, 2]), 6, 8)])  # 1/2
    p1 = net.op("Add", [net.conv(c1, 6, 5, k=1), upsample(net, net.conv(c2, 8, 5, k=1))])  # top-down
    fuse = net.op("Concat", [net.conv(p1, 5, 3), upsample(net, net.conv(c2, 8, 4))], axis=1)
    h = net.op("Relu", [net.bn(conv_transpose(net, fuse, 7, 6), 6)])
    prob = net.op("Sigmoid", [conv_transpose(net, h, 6, 2)])
    return net.build({"x": (1, 3, 4, 4)}, [prob])


def test_fpn_head_groups():
    groups = groups_of(fpn_head_net())
    sizes = sorted(len(g.channels) for g in groups if g.prunable)
    assert sizes == [3, 4, 5, 6, 6, 8]  # the two laterals merge (5); the ConvTranspose opens a space (6)
    head = next(g for g in groups if len(g.channels) == 2)
    assert not head.prunable and "graph output" in head.reason


def test_fpn_head_pruning_is_exact():
    out = assert_exact_pruning(fpn_head_net())
    ct = [n for n in out.proto.graph.node if n.op_type == "ConvTranspose"]
    shapes = {i.name: tuple(i.dims) for i in out.proto.graph.initializer}
    assert shapes[ct[0].input[1]][0] < 7 and shapes[ct[0].input[1]][1] < 6  # both axes of the weight shrank


def test_grouped_conv_transpose_is_blocked_with_a_reason():
    net = Net(2)
    a = net.op("Relu", [net.conv("x", 3, 4)])
    w = net.const(net.rng.normal(0, 0.3, (4, 1, 2, 2)), "w")
    out = net.conv(net.op("ConvTranspose", [a, w], strides=[2, 2], group=2), 2, 2)
    g = next(g for g in groups_of(net.build({"x": (1, 3, 3, 3)}, [out])) if len(g.channels) == 4)
    assert not g.prunable and "grouped" in g.reason


def test_resize_by_scales_passes_channels_with_a_dynamic_batch():
    net = Net(6)
    up = upsample(net, net.op("Relu", [net.conv("x", 3, 6)]))
    out = net.conv(up, 6, 2)
    groups = groups_of(net.build({"x": ("N", 3, 4, 4)}, [out]))
    assert [len(g.channels) for g in groups if g.prunable] == [6]


def test_resize_over_channels_is_blocked():
    net = Net(6)
    up = upsample(net, net.op("Relu", [net.conv("x", 3, 6)]), scales=(1, 2, 1, 1))
    g = groups_of(net.build({"x": (1, 3, 4, 4)}, [net.conv(up, 12, 2)]))[0]
    assert not g.prunable and "mixes values across the channel axis" in g.reason
