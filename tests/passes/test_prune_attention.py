"""Coupling rule: multi-head attention from MatMul/Reshape/Transpose/Softmax is pruned by whole heads, or by
head dims (Q/K and V/out-projection as separate groups), with the Reshape shape constants rewritten."""

import numpy as np
import onnx
import pytest
from prune_graphs import Net, assert_exact_pruning, groups_of, random_feeds, run

from sparsecc.errors import BadInput
from sparsecc.ir import load_model
from sparsecc.models.builders import build_transformer
from sparsecc.passes.grouping import ATTENTION_MODES, trace_groups
from sparsecc.passes.importance import OBSPA, contraction_errors
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
    modes = (("heads", (2, S, H // 2, D // H)), ("head_dims", (2, S, H, D // H // 2)))
    for mode, split in modes + (("auto", (2, S, H, D // H // 2)),):  # 4 heads: auto prunes head dims
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


@pytest.mark.parametrize("heads, expected", [(4, "head_dims"), (8, "heads")])
def test_auto_prunes_head_dims_when_heads_are_few(heads, expected):
    model = load_model(build_transformer(batch=2, seq=S, d_model=32, heads=heads, ff=12))
    p = PrunePass(0.5, "l2")  # attention="auto" is the default
    out = p(model)
    assert p.summary["attention"] == expected
    split = [s for s in reshape_shapes(out) if len(s) == 4]
    per_head = 32 // heads
    want = (2, S, heads, per_head // 2) if expected == "head_dims" else (2, S, heads // 2, per_head)
    assert split == [want] * 6


def test_contraction_errors_measure_the_centred_logits_a_head_dim_carries():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 2, 5, 4))  # [B, H, S, D] queries
    b = rng.normal(size=(3, 2, 4, 5))  # [B, H, D, S] keys, transposed
    a[..., 1] = 0.0  # dim 1 contributes nothing to the logits
    b[:, :, 3, :] = 7.0  # dim 3 adds the same logit to every key: a Softmax does not see it
    roots = np.array([10, 11, 12, 13])
    alone, greedy = contraction_errors(a, b, roots, rng)
    assert alone[11] == 0.0 and alone[13] < 1e-12
    order = sorted(greedy, key=greedy.get)
    assert set(order[:2]) == {11, 13} and greedy[order[-1]] == pytest.approx(1.0)  # all gone: all of S
    s = a[..., [0, 2]] @ b[:, :, [0, 2], :]
    s -= s.mean(axis=-1, keepdims=True)
    part = a[..., [0]] @ b[:, :, [0], :]
    part -= part.mean(axis=-1, keepdims=True)
    assert alone[10] == pytest.approx((part**2).sum() / (s**2).sum())


def test_obspa_scores_query_key_dims_by_their_logits():
    """Head-dim groups read only by Q.K^T get OBS-comparable scores (relative logit error in [0, 1]), not the
    magnitude fallback, so global ranking can weigh them against the other layers."""
    model = load_model(build_transformer(batch=2, seq=S, d_model=D, heads=H, ff=12))
    analysis = trace_groups(model, attention="head_dims")
    scorer = OBSPA(model, analysis, None, 0)
    qk = [g for g in analysis.groups if g.prunable and len(g.sources) == 2]
    assert len(qk) == 2
    for g in qk:
        s = scorer.global_scores[g.id]
        assert np.all(s >= 0) and np.all(s <= 1 + 1e-9) and s.max() == pytest.approx(1.0)
