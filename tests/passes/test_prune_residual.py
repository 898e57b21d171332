"""Coupling rule: residual Add merges the channel spaces of both branches into one group."""

from prune_graphs import Net, assert_exact_pruning, groups_of


def residual_net():
    net = Net()
    x = net.op("Relu", [net.bn(net.conv("x", 3, 8), 8)])
    y = net.op("Relu", [net.bn(net.conv(x, 8, 8), 8)])
    z = net.op("Add", [x, net.bn(net.conv(y, 8, 8), 8)])
    z = net.op("Relu", [net.op("Add", [z, net.conv(z, 8, 8, k=1)])])  # second residual joins the same space
    out = net.gemm(net.op("Flatten", [net.op("GlobalAveragePool", [z])]), 8, 4)
    return net.build({"x": (2, 3, 6, 6)}, [out])


def test_residual_merges_producers_into_one_group():
    groups = groups_of(residual_net())
    merged = [g for g in groups if len(g.sources) == 3]
    assert len(merged) == 1 and merged[0].prunable and len(merged[0].channels) == 8


def test_residual_pruning_is_exact():
    assert_exact_pruning(residual_net(), keep_ratio=0.5)


def test_residual_with_graph_input_is_blocked():
    net = Net()
    y = net.op("Add", ["x", net.conv("x", 4, 4)])
    out = net.conv(y, 4, 2)
    groups = groups_of(net.build({"x": (1, 4, 5, 5)}, [out]))
    g = next(g for g in groups if len(g.channels) == 4)
    assert not g.prunable and "unprunable" in g.reason
