"""Coupling rule: Concat keeps each input's channel space separate, at its offset (also cascaded)."""

from prune_graphs import Net, assert_exact_pruning, groups_of


def concat_net():
    net = Net(1)
    a = net.op("Relu", [net.conv("x", 3, 6)])
    b = net.op("Relu", [net.conv("x", 3, 4, k=1)])
    c = net.op("Concat", [a, b], axis=1)
    d = net.op(
        "Concat", [c, net.op("Relu", [net.conv(c, 10, 5)]), "x"], axis=1
    )  # cascaded, with a fixed part
    out = net.conv(d, 18, 2)
    return net.build({"x": (1, 3, 5, 5)}, [out])


def test_concat_groups_stay_separate():
    sizes = sorted(len(g.channels) for g in groups_of(concat_net()) if g.prunable)
    assert sizes == [4, 5, 6]


def test_concat_pruning_is_exact():
    assert_exact_pruning(concat_net())
