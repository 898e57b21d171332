"""Coupling rule: multi-head attention from MatMul/Reshape/Transpose/Softmax is pruned by whole heads."""

import numpy as np
from prune_graphs import Net, assert_exact_pruning, groups_of

S, D, H = 5, 16, 4


def attention_net():
    net = Net(6)

    def heads(t, perm):
        r = net.op("Reshape", [t, net.const(np.array([1, S, H, D // H], np.int64))])
        return net.op("Transpose", [r], perm=perm)

    q = heads(net.linear("x", D, D), [0, 2, 1, 3])
    k = heads(net.linear("x", D, D), [0, 2, 3, 1])
    v = heads(net.linear("x", D, D), [0, 2, 1, 3])
    scores = net.op("Mul", [net.op("MatMul", [q, k]), net.const(np.array(0.5, np.float32))])
    attn = net.op("Softmax", [scores], axis=-1)
    o = net.op("Transpose", [net.op("MatMul", [attn, v])], perm=[0, 2, 1, 3])
    o = net.op("Reshape", [o, net.const(np.array([1, S, D], np.int64))])
    y = net.op("Add", ["x", net.linear(o, D, D)])  # residual on the input: the model width stays fixed
    out = net.linear(net.op("Relu", [net.linear(y, D, 12)]), 12, 3)
    return net.build({"x": (1, S, D)}, [out])


def test_heads_are_the_channels():
    groups = [g for g in groups_of(attention_net()) if g.prunable]
    heads = next(g for g in groups if len(g.sources) == 3)
    assert len(heads.channels) == H
    assert sorted(len(g.channels) for g in groups) == [H, 12]


def test_head_pruning_is_exact_and_rewrites_reshapes():
    out = assert_exact_pruning(attention_net(), keep_ratio=0.5)
    shapes = sorted(tuple(n.inputs[1].values) for n in out.graph().nodes if n.op == "Reshape")
    assert shapes == sorted([(1, S, 8)] + [(1, S, 2, D // H)] * 3)


def test_transformer_model_width_is_blocked_by_layernorm():
    net = Net(7)
    h = net.linear("x", D, D)
    ln = net.op("LayerNormalization", [h, net.const(np.ones(D)), net.const(np.zeros(D))], axis=-1)
    out = net.linear(ln, D, 2)
    g = next(g for g in groups_of(net.build({"x": (1, S, D)}, [out])) if len(g.channels) == D)
    assert not g.prunable and "LayerNormalization" in g.reason
