"""Coupling rule: multi-head attention from MatMul/Reshape/Transpose/Softmax is pruned by whole heads, or by
head dims (Q/K and V/out-projection as separate groups), with the Reshape shape constants rewritten."""

import numpy as np
import onnx
import pytest
from prune_graphs import Net, assert_exact_pruning, groups_of, random_feeds, run

from sparsecc.errors import BadInput
from sparsecc.ir import load_model
from sparsecc.models.builders import build_transformer
from sparsecc.passes.grouping import ATTENTION_MODES
from sparsecc.passes.prune import PrunePass

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


# ------------------------------------------------------------------------- BERT-style export, head dims
B, HB, DH = 2, 3, 4  # batch, heads, head dim of the BERT-style graph
E = HB * DH


def bert_attention_net():
    """The HF BERT self-attention as torch exports it: Add(bias, MatMul), Reshape [B, S, H, D], K transposed
    straight to [B, H, D, S], Mul by 1/sqrt(D), additive mask [B, 1, 1, S], Softmax, a second layer after."""
    net = Net(8)

    def proj(x):
        y = net.op("MatMul", [x, net.const(net.rng.normal(0, 0.3, (E, E)), "w")])
        return net.op("Add", [net.const(net.rng.normal(0, 0.1, E), "b"), y])

    def heads(t, perm):
        r = net.op("Reshape", [t, net.const(np.array([B, S, HB, DH], np.int64))])
        return net.op("Transpose", [r], perm=perm)

    x = "x"
    for _ in range(2):
        q, k, v = heads(proj(x), [0, 2, 1, 3]), heads(proj(x), [0, 2, 3, 1]), heads(proj(x), [0, 2, 1, 3])
        scores = net.op("Mul", [net.op("MatMul", [q, k]), net.const(np.array(DH**-0.5, np.float32))])
        attn = net.op("Softmax", [net.op("Add", [scores, "mask"])], axis=-1)
        o = net.op("Transpose", [net.op("MatMul", [attn, v])], perm=[0, 2, 1, 3])
        o = net.op("Reshape", [o, net.const(np.array([B, S, E], np.int64))])
        x = net.op("Add", [x, proj(o)])
    out = net.op("ReduceMean", [x], axes=[1], keepdims=0)
    return net.build({"x": (B, S, E), "mask": (B, 1, 1, S)}, [out])


def reshape_shapes(model) -> list[tuple[int, ...]]:
    return sorted(tuple(int(v) for v in n.inputs[1].values) for n in model.graph().nodes if n.op == "Reshape")


def test_bert_heads_are_one_group_per_layer():
    groups = [g for g in groups_of(bert_attention_net()) if g.prunable]
    assert [len(g.channels) for g in groups] == [HB, HB]
    assert all(len(g.sources) == 3 for g in groups)


def test_bert_head_pruning_is_exact_and_rewrites_reshapes():
    out = assert_exact_pruning(bert_attention_net(), keep_ratio=0.3)  # 1 of 3 heads kept per layer
    assert reshape_shapes(out) == [(B, S, 1, DH)] * 6 + [(B, S, DH)] * 2


def test_bert_head_dims_split_qk_from_v():
    groups = [g for g in groups_of(bert_attention_net(), "head_dims") if g.prunable]
    assert sorted(len(g.sources) for g in groups) == [1, 1, 2, 2]  # Q+K and V per layer
    assert all(len(g.channels) == DH for g in groups)


def test_bert_head_dim_pruning_is_exact_and_rewrites_reshapes():
    out = assert_exact_pruning(bert_attention_net(), keep_ratio=0.5, attention="head_dims")
    split = [s for s in reshape_shapes(out) if len(s) == 4]
    assert all(s[:3] == (B, S, HB) and s[3] == DH // 2 for s in split) and len(split) == 6
    merge = [s for s in reshape_shapes(out) if len(s) == 3]
    assert merge == [(B, S, HB * DH // 2)] * 2


def test_zoo_transformer_ratio_zero_is_identity_in_both_modes():
    model = load_model(build_transformer(batch=2, seq=S, d_model=D, heads=H, ff=12))
    feeds = random_feeds(model)
    for mode in ATTENTION_MODES:
        out = PrunePass(0.0, attention=mode)(model)
        for a, b in zip(run(model, feeds), run(out, feeds)):
            np.testing.assert_array_equal(a, b)


def test_zoo_transformer_pruned_heads_and_dims_give_valid_smaller_models():
    model = load_model(build_transformer(batch=2, seq=S, d_model=D, heads=H, ff=12))
    feeds = random_feeds(model)
    for mode, split in (("heads", (2, S, H // 2, D // H)), ("head_dims", (2, S, H, D // H // 2))):
        p = PrunePass(0.5, "l2", attention=mode)
        out = p(model)
        onnx.checker.check_model(out.proto, full_check=True)
        assert [o.shape for o in out.outputs] == [o.shape for o in model.outputs]
        assert [a.shape for a in run(out, feeds)] == [a.shape for a in run(model, feeds)]
        assert p.summary["params_after"] < p.summary["params_before"]
        assert [s for s in reshape_shapes(out) if len(s) == 4] == [split] * 6  # 2 layers x Q, K, V
        assert [s for s in reshape_shapes(out) if len(s) == 3] == [(2, S, D // 2)] * 2


def test_unknown_attention_mode_is_refused():
    with pytest.raises(BadInput, match="attention"):
        PrunePass(0.5, attention="rows")
