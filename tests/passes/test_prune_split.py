"""Coupling rule: Split / Slice windows over channels; sizes and bounds are rewritten."""

import numpy as np
from prune_graphs import Net, assert_exact_pruning, groups_of


def split_net(opset=17):
    net = Net(2)
    a = net.op("Relu", [net.conv("x", 3, 8)])
    s1, s2 = net.op("Split", [a, net.const(np.array([3, 5], np.int64))], n_out=2, axis=1)
    y = net.op("Add", [net.conv(s1, 3, 4), net.conv(s2, 5, 4)])
    sl = net.op(
        "Slice",
        [
            a,
            net.const(np.array([2], np.int64)),
            net.const(np.array([7], np.int64)),
            net.const(np.array([1], np.int64)),
        ],
    )
    out = net.op("Concat", [net.conv(y, 4, 2), net.conv(sl, 5, 2)], axis=1)
    return net.build({"x": (1, 3, 5, 5)}, [out], opset=opset)


def test_split_keeps_one_group_for_the_producer():
    g = next(g for g in groups_of(split_net()) if len(g.channels) == 8)
    assert g.prunable


def test_split_and_slice_pruning_is_exact():
    for seed in range(3):
        assert_exact_pruning(split_net(), keep_ratio=0.5, seed=seed)


def test_split_pass_keeps_every_window_nonempty():
    from sparsecc.passes.prune import PrunePass

    out = PrunePass(0.8, max_layer_ratio=0.95)(split_net())
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in out.proto.graph.value_info}
    assert all(all(d > 0 for d in s) for s in shapes.values())
