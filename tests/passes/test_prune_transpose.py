"""Coupling rule: Transpose moves the channel axis; a MatMul on the last axis then consumes it."""

from prune_graphs import Net, assert_exact_pruning, groups_of


def transpose_net():
    net = Net(5)
    a = net.op("Relu", [net.conv("x", 3, 6)])
    t = net.op("Transpose", [a], perm=[0, 2, 3, 1])  # NHWC, channels last
    h = net.op("Relu", [net.linear(t, 6, 5)])
    back = net.op("Transpose", [h], perm=[0, 3, 1, 2])
    out = net.conv(back, 5, 2)
    return net.build({"x": (1, 3, 4, 4)}, [out])


def test_transpose_groups():
    assert sorted(len(g.channels) for g in groups_of(transpose_net()) if g.prunable) == [5, 6]


def test_transpose_pruning_is_exact():
    assert_exact_pruning(transpose_net())
