"""Coupling rule: depthwise Conv (group == C) moves in lockstep with its input; grouped conv in whole groups."""

import onnx_graphsurgeon as gs
from prune_graphs import Net, assert_exact_pruning, groups_of


def separable_net(multiplier=1, groups=None):
    net = Net(3)
    a = net.op("Relu", [net.bn(net.conv("x", 3, 8, k=1), 8)])
    g = groups or 8
    d = net.op("Relu", [net.bn(net.conv(a, 8, 8 * multiplier, group=g), 8 * multiplier)])
    out = net.conv(d, 8 * multiplier, 3, k=1)
    return net.build({"x": (1, 3, 6, 6)}, [out])


def test_depthwise_joins_its_producer_group():
    g = next(g for g in groups_of(separable_net()) if g.prunable)
    assert len(g.channels) == 8 and {m.op for m in g.members} >= {"Conv", "BatchNormalization"}
    assert len(g.sources) == 1  # the depthwise conv opens no space of its own


def test_depthwise_pruning_is_exact_and_updates_group():
    out = assert_exact_pruning(separable_net())
    dw = [n for n in out.graph().nodes if n.op == "Conv" and n.attrs.get("group", 1) > 1]
    assert dw and dw[0].attrs["group"] == dw[0].inputs[1].shape[0] < 8


def test_depthwise_with_channel_multiplier_is_exact():
    assert_exact_pruning(separable_net(multiplier=2))


def test_grouped_conv_prunes_whole_groups():
    g = next(g for g in groups_of(separable_net(groups=2)) if g.prunable)
    assert len(g.channels) == 2  # 2 groups of 4 channels
    out = assert_exact_pruning(separable_net(groups=2), keep_ratio=0.5)
    conv = [n for n in out.graph().nodes if n.op == "Conv" and isinstance(n.inputs[1], gs.Constant)]
    assert any(n.attrs.get("group", 1) == 1 and n.inputs[1].shape[1] == 4 for n in conv)
