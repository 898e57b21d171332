"""Coupling rule: RNN/GRU/LSTM read channels through W's input columns; their hidden units are a channel space
(unit h of both directions together) owning gate rows of W/R/B, R's columns and the last axis of Y/Y_h/Y_c."""

import numpy as np
import onnx
from prune_graphs import Net, assert_exact_pruning, groups_of

from sparsecc.passes.prune import PrunePass


def rnn_net(op="LSTM", direction="bidirectional", hidden=5):
    """Conv feature map -> (W, B, C*H) sequence -> recurrent layer -> GRU -> Linear, zero initial states
    shared between the layers (as torch exports them)."""
    net = Net(3)
    dirs, gates = (2 if direction == "bidirectional" else 1), {"RNN": 1, "GRU": 3, "LSTM": 4}[op]
    f = net.op("Relu", [net.conv("x", 3, 6)])  # (1, 6, 2, 7)
    seq = net.op("Reshape", [net.op("Transpose", [f], perm=[3, 0, 1, 2]), net.const(np.array([7, 1, 12]))])
    zeros = net.const(np.zeros((dirs, 1, hidden), np.float32), "h0")
    ins = [
        seq,
        net.const(net.rng.normal(0, 0.3, (dirs, gates * hidden, 12)), "w"),
        net.const(net.rng.normal(0, 0.3, (dirs, gates * hidden, hidden)), "r"),
        net.const(net.rng.normal(0, 0.1, (dirs, 2 * gates * hidden)), "b"),
        "",
        zeros,
    ] + ([zeros] if op == "LSTM" else [])
    y = net.op(op, ins, n_out=2, hidden_size=hidden, direction=direction)[0]  # (7, dirs, 1, hidden)
    y = net.op("Reshape", [net.op("Transpose", [y], perm=[0, 2, 1, 3]), net.const(np.array([7, 1, -1]))])
    g_ins = [
        y,
        net.const(net.rng.normal(0, 0.3, (1, 12, dirs * hidden)), "w"),
        net.const(net.rng.normal(0, 0.3, (1, 12, 4)), "r"),
        net.const(net.rng.normal(0, 0.1, (1, 24)), "b"),
    ]
    g = net.op("GRU", g_ins, hidden_size=4)  # (7, 1, 1, 4)
    out = net.linear(net.op("Squeeze", [g, net.const(np.array([1]))]), 4, 3)
    return net.build({"x": (1, 3, 2, 7)}, [out])


def test_rnn_hidden_units_are_groups():
    groups = {g.sources[0]: g for g in groups_of(rnn_net())}
    assert {src.rstrip("0123456789"): len(g.channels) for src, g in groups.items() if g.prunable} == {
        "conv": 6,
        "lstm": 5,
        "gru": 4,
    }


def test_lstm_pruning_is_exact():
    out = assert_exact_pruning(rnn_net("LSTM"))
    lstm = next(n for n in out.proto.graph.node if n.op_type == "LSTM")
    hidden = next(a.i for a in lstm.attribute if a.name == "hidden_size")
    assert hidden < 5


def test_unidirectional_gru_and_rnn_pruning_is_exact():
    assert_exact_pruning(rnn_net("GRU", "forward"))
    assert_exact_pruning(rnn_net("RNN", "forward", hidden=6))


def test_rnn_with_a_non_constant_initial_state_is_blocked():
    m = rnn_net("GRU", "forward")
    proto = m.proto
    h0 = next(i for i in proto.graph.initializer if i.name.startswith("h0"))
    proto.graph.initializer.remove(h0)
    proto.graph.input.append(onnx.helper.make_tensor_value_info(h0.name, onnx.TensorProto.FLOAT, (1, 1, 5)))
    from sparsecc.ir import load_model

    groups = groups_of(load_model(proto))
    g = next(g for g in groups if g.sources[0].startswith("gru") and len(g.channels) == 5)
    assert not g.prunable and "non-constant input" in g.reason


def test_rnn_net_prunes_with_every_default_criterion():
    m = rnn_net()
    for criterion in ("l1", "obspa"):
        p = PrunePass(0.4, criterion)
        out = p(m)
        onnx.checker.check_model(out.proto, full_check=True)
        assert p.summary["params_after"] < p.summary["params_before"]
