"""Coupling rule: Flatten/Reshape maps channel c to the block of c*H*W features of the next Gemm/MatMul."""

import numpy as np
from prune_graphs import Net, assert_exact_pruning, groups_of


def flatten_net(kind="Flatten", trans_b=1):
    net = Net(4)
    a = net.op("Relu", [net.bn(net.conv("x", 3, 6), 6)])
    a = net.op("MaxPool", [a], kernel_shape=[2, 2], strides=[2, 2])
    if kind == "Flatten":
        f = net.op("Flatten", [a])
    else:
        f = net.op("Reshape", [a, net.const(np.array([2, -1], np.int64))])
    h = net.op("Relu", [net.gemm(f, 6 * 3 * 3, 7, trans_b=trans_b)])
    out = net.linear(h, 7, 3)  # the exported MatMul + Add pattern
    return net.build({"x": (2, 3, 6, 6)}, [out])


def test_flatten_gemm_groups():
    sizes = sorted(len(g.channels) for g in groups_of(flatten_net()) if g.prunable)
    assert sizes == [6, 7]


def test_flatten_gemm_exact():
    assert_exact_pruning(flatten_net("Flatten", 1))


def test_reshape_gemm_exact_no_transb():
    out = assert_exact_pruning(flatten_net("Reshape", 0))
    reshape = next(n for n in out.graph().nodes if n.op == "Reshape")
    assert list(reshape.inputs[1].values) == [2, -1]
