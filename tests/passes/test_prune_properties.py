"""Property tests for channel grouping and pruning on random small ONNX graphs.

Graphs are stacks of pieces (conv, conv+BN, ReLU, residual Add, Concat of two branches, Split + Add,
depthwise conv, NHWC Transpose round trip) ending in a conv output or Flatten -> Gemm. Every example checks:
grouping gives each group a verdict, pruning at a random ratio keeps a valid model (full `onnx.checker`) that
ONNX Runtime runs with the same output shapes, ratio 0 is the identity, and removing channels whose producers
were zeroed gives the zeroed model's outputs (1e-5).

~50 examples by default; `SPARSECC_FUZZ_EXAMPLES=500 pytest tests/passes/test_prune_properties.py` for a long run.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prune_graphs import Net, random_feeds, run, zero_channels, zeroed_channels

from sparsecc.passes.grouping import trace_groups
from sparsecc.passes.prune import PrunePass, remove_channels

EXAMPLES = int(os.environ.get("SPARSECC_FUZZ_EXAMPLES", "50"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=EXAMPLES <= 50,  # the default run is reproducible; long runs explore
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
WIDTHS = st.integers(2, 6)

piece = st.one_of(
    st.tuples(st.just("conv"), WIDTHS),
    st.tuples(st.just("conv_bn"), WIDTHS),
    st.tuples(st.just("relu"), st.just(0)),
    st.tuples(st.just("residual"), st.just(0)),
    st.tuples(st.just("concat"), WIDTHS),
    st.tuples(st.just("split_add"), WIDTHS),
    st.tuples(st.just("depthwise"), st.just(0)),
    st.tuples(st.just("transpose"), st.just(0)),
)
graph_spec = st.tuples(
    st.lists(piece, min_size=1, max_size=6),
    st.sampled_from(["gemm", "conv"]),  # head
    st.integers(0, 2**16),  # weight seed
)


def build(spec) -> object:
    """The ONNX model of a spec: input [1, 3, 4, 4], pieces in order, then the head."""
    pieces, head, seed = spec
    net = Net(seed)
    x, c = "x", 3
    for kind, width in pieces:
        if kind == "conv":
            x, c = net.conv(x, c, width), width
        elif kind == "conv_bn":
            x, c = net.op("Relu", [net.bn(net.conv(x, c, width, bias=False), width)]), width
        elif kind == "relu":
            x = net.op("Relu", [x])
        elif kind == "residual":
            x = net.op("Add", [x, net.conv(net.op("Relu", [x]), c, c)])
        elif kind == "concat":
            a, b = net.conv(x, c, width, k=1), net.conv(x, c, c)
            x, c = net.op("Concat", [a, b], axis=1), width + c
        elif kind == "split_add":
            y = net.conv(x, c, 2 * width, k=1)
            s = net.const(np.array([width, width], np.int64), "split")
            lo, hi = net.op("Split", [y, s], n_out=2, axis=1)
            x, c = net.op("Add", [lo, net.op("Relu", [hi])]), width
        elif kind == "depthwise":
            x = net.op("Relu", [net.conv(x, c, c, group=c)])
        elif kind == "transpose":
            t = net.op("Relu", [net.op("Transpose", [x], perm=[0, 2, 3, 1])])
            x = net.op("Transpose", [t], perm=[0, 3, 1, 2])
    if head == "gemm":
        x = net.gemm(net.op("Flatten", [x], axis=1), c * 16, 5)
    else:
        x = net.conv(x, c, 4, k=1)
    return net.build({"x": (1, 3, 4, 4)}, [x])


def check_runs_like(model, pruned) -> None:
    onnx.checker.check_model(pruned.proto, full_check=True)
    feeds = random_feeds(model)
    for a, b in zip(run(model, feeds), run(pruned, feeds)):
        assert a.shape == b.shape
        assert np.all(np.isfinite(b))


@FUZZ
@given(graph_spec)
def test_grouping_gives_every_group_a_verdict(spec):
    for g in trace_groups(build(spec)).groups:
        assert g.prunable or g.reason, g.to_json()


@FUZZ
@given(graph_spec, st.floats(0.05, 0.9), st.sampled_from(["l1", "l2", "bn"]), st.booleans())
def test_pruning_keeps_a_valid_model(spec, ratio, criterion, global_ranking):
    model = build(spec)
    check_runs_like(model, PrunePass(ratio, criterion, global_ranking=global_ranking)(model, None))


@FUZZ
@given(graph_spec)
def test_ratio_zero_is_identity(spec):
    model = build(spec)
    pruned = PrunePass(0.0)(model, None)
    feeds = random_feeds(model)
    for a, b in zip(run(model, feeds), run(pruned, feeds)):
        np.testing.assert_array_equal(a, b)


@FUZZ
@given(graph_spec, st.floats(0.2, 0.8), st.integers(0, 100))
def test_removing_zeroed_channels_keeps_outputs(spec, keep_ratio, seed):
    zeroed = zero_channels(build(spec), keep_ratio, seed)
    pruned = zeroed_channels(zeroed)
    analysis = trace_groups(zeroed)
    out = remove_channels(zeroed, analysis, pruned) if pruned else zeroed
    onnx.checker.check_model(out.proto, full_check=True)
    feeds = random_feeds(zeroed)
    for a, b in zip(run(zeroed, feeds), run(out, feeds)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
