"""The `prune` pass and `groups` analysis: options, criteria, blockers, summary, registry."""

import numpy as np
import onnx
import pytest
from prune_graphs import Net, groups_of, random_feeds, run

from sparsecc.errors import BadInput
from sparsecc.passes.prune import PrunePass
from sparsecc.pipeline import PassContext, make_pass, run_analysis


def cnn(batch=2):
    net = Net(8)
    a = net.op("Relu", [net.bn(net.conv("x", 3, 16), 16)])
    b = net.op("Relu", [net.bn(net.conv(a, 16, 16), 16)])
    c = net.op("Add", [a, b])
    out = net.gemm(net.op("Flatten", [net.op("GlobalAveragePool", [net.conv(c, 16, 12)])]), 12, 4)
    return net.build({"x": (batch, 3, 6, 6)}, [out])


def calib(n=8):
    return {"x": np.random.default_rng(0).normal(size=(n, 3, 6, 6)).astype(np.float32)}


def test_ratio_zero_is_identity():
    m = cnn()
    assert PrunePass(0.0)(m) is m


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn", "activation", "obspa"])
def test_every_criterion_gives_a_valid_smaller_model(criterion):
    m = cnn()
    p = PrunePass(0.5, criterion, calib() if criterion == "activation" else None)
    out = p(m)
    onnx.checker.check_model(out.proto, full_check=True)
    feeds = random_feeds(m)
    assert run(out, feeds)[0].shape == run(m, feeds)[0].shape
    s = p.summary
    assert s["channels_after"] == s["channels_before"] - 14  # half of 16 and 12
    assert s["params_after"] < 0.6 * s["params_before"] and s["flops_after"] < s["flops_before"]


def test_obspa_reconstruction_beats_plain_removal():
    m, data = cnn(), calib(32)
    feeds = {"x": data["x"][:2]}
    ref = run(m, feeds)[0]
    err = {}
    for crit in ("l2", "obspa"):
        err[crit] = np.abs(run(PrunePass(0.5, crit, data)(m), feeds)[0] - ref).mean()
    assert err["obspa"] < err["l2"]


def test_round_to_and_global_and_max_layer_ratio():
    m = cnn()
    p = PrunePass(0.3, round_to=4)
    p(m)
    assert p.summary["channels_after"] == 12 + 12  # 16*0.7 -> 12, 12*0.7 -> 9 -> 12
    g = PrunePass(0.5, global_ranking=True, max_layer_ratio=0.6)
    g(m)
    # global: half of the prunable groups' parameters, cheapest score per parameter first, caps 9 of 16, 7 of 12
    assert 28 - 9 - 7 <= g.summary["channels_after"] < 28 - 10
    assert g.summary["params_after"] < 0.7 * g.summary["params_before"]


def test_ignore_blocks_a_group():
    m = cnn()
    conv = next(n.name for n in m.proto.graph.node if n.op_type == "Conv" and n.input[0] != "x")
    p = PrunePass(0.5, ignore=(conv,))
    p(m)
    assert p.summary["groups_prunable"] == 1
    with pytest.raises(BadInput, match="unknown node"):
        PrunePass(0.5, ignore=("nope",))(m)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": 0.5, "criterion": "taylor"}, "unknown criterion"),
        ({"ratio": 0.5, "round_to": 0}, "round_to"),
        ({"ratio": 0.5, "calib": {"y": np.zeros((4, 3, 6, 6), np.float32)}}, "names"),
        ({"ratio": 0.5, "calib": {"x": np.zeros((4, 3, 5, 6), np.float32)}}, "shape"),
        ({"ratio": 0.5, "criterion": "activation"}, "calibration"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(BadInput, match=match):
        PrunePass(**kwargs)(cnn())


def test_summary_goes_to_ctx_log_and_registry():
    ctx = PassContext(quiet=True)
    p = make_pass("prune", ratio=0.25)
    assert p.name == "prune"
    p(cnn(), ctx)
    assert ctx.log[-1]["pass"] == "prune" and ctx.log[-1]["groups_pruned"] == 2


def test_groups_analysis_is_json():
    import json

    groups = run_analysis("groups", cnn())
    json.dumps(groups)
    assert {g["channels"] for g in groups} == {16, 12, 4}
    out = next(g for g in groups if g["channels"] == 4)
    assert not out["prunable"] and "graph output" in out["reason"]
    assert all(g["params"] > 0 and g["flops"] > 0 for g in groups)


def test_unknown_op_blocks_with_reason():
    net = Net(9)
    a = net.conv("x", 3, 4)
    out = net.conv(net.op("DepthToSpace", [net.conv(a, 4, 4)], blocksize=2), 1, 2)
    groups = groups_of(net.build({"x": (1, 3, 4, 4)}, [out]))
    blocked = [g for g in groups if not g.prunable and "DepthToSpace" in g.reason]
    assert len(blocked) == 1


def test_shared_weight_with_unprunable_use_is_blocked():
    net = Net(10)
    w = net.const(np.random.default_rng(0).normal(size=(4, 4, 1, 1)))
    a = net.op("Conv", [net.conv("x", 3, 4, k=1), w])
    b = net.op("Conv", ["y", w])  # same weight on a fixed-channel input
    groups = groups_of(net.build({"x": (1, 3, 2, 2), "y": (1, 4, 2, 2)}, [net.op("Add", [a, b])]))
    first = next(g for g in groups if any(m.tensor == w and m.axis == 1 for m in g.members))
    assert not first.prunable and "shared" in first.reason
