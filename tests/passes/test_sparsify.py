"""The sparsify pass: patterns hold exactly, the model stays valid and runnable in ONNX Runtime, options."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from sparsecc.errors import BadInput
from sparsecc.ir import Model, load_model
from sparsecc.passes.sparsify import METADATA_KEY, SparsifyPass, find_weights, read_annotation
from sparsecc.passes.sparsity_patterns import BlockPattern, NMPattern, Unstructured, parse_pattern
from sparsecc.pipeline import PassContext


def mixed_model(batch: int = 2, seed: int = 0) -> onnx.ModelProto:
    """Conv3x3 -> Conv1x1 -> Flatten -> Gemm(transB=1) -> Relu -> MatMul -> Add -> Gemm(transB=0)."""
    rng = np.random.default_rng(seed)

    def init(name, *shape, scale=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [init("wc3", 16, 8, 3, 3), init("wc1", 16, 16, 1, 1), init("w1", 64, 16 * 6 * 6, scale=0.05),
             init("b1", 64), init("w2", 64, 48), init("b2", 48), init("w3", 48, 12)]
    nodes = [
        helper.make_node("Conv", ["x", "wc3"], ["c3"], pads=[1, 1, 1, 1], name="conv3x3"),
        helper.make_node("Conv", ["c3", "wc1"], ["c1"], name="conv1x1"),
        helper.make_node("Flatten", ["c1"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w1", "b1"], ["g1"], transB=1, name="fc1"),
        helper.make_node("Relu", ["g1"], ["r1"], name="relu"),
        helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="fc2"),
        helper.make_node("Add", ["m2", "b2"], ["a2"], name="add2"),
        helper.make_node("Gemm", ["a2", "w3"], ["y"], name="fc3"),
    ]
    graph = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 12])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


@pytest.fixture(scope="module")
def model() -> Model:
    return load_model(mixed_model())


def run_ort(m: Model, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(m.serialize(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def views_2d(m: Model) -> dict[str, np.ndarray]:
    inits = m.initializers()
    return {v.node: v.to_2d(inits[v.weight]) for v in find_weights(m, min_params=0)}


X = np.random.default_rng(7).standard_normal((2, 8, 6, 6)).astype(np.float32)


@pytest.mark.parametrize("pattern", ["unstructured", "block:4x4", "4x4", "block:1x4", "16x1", "block:4x1"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_pattern_is_exact_and_model_runs(model, pattern, sparsity):
    ctx = PassContext(quiet=True)
    out = SparsifyPass(sparsity, pattern, min_params=0)(model, ctx)
    onnx.checker.check_model(out.proto, full_check=True)
    y = run_ort(out, X)
    assert y.shape == (2, 12) and np.isfinite(y).all()
    p = parse_pattern(pattern)
    for node, w2 in views_2d(out).items():
        achieved = 1.0 - np.count_nonzero(w2) / w2.size
        if isinstance(p, BlockPattern):
            zero_blocks = p.zero_blocks(w2)
            # Every block is entirely zero or untouched (random weights have no zeros of their own).
            expanded = p.expand(~zero_blocks, w2.shape)
            assert ((w2 != 0) == expanded).all(), node
            assert abs(zero_blocks.mean() - sparsity) <= 1.0 / zero_blocks.size + 1e-9, node
        else:
            assert abs(achieved - sparsity) <= 1.0 / w2.size + 1e-9, node
    log = ctx.log[-1]
    assert log["pass"] == "sparsify" and log["pattern"] == p.name
    assert set(log["layers"]) == {"conv3x3", "conv1x1", "fc1", "fc2", "fc3"}


def test_two_four_along_reduction_axis(model):
    out = SparsifyPass(0.5, "2:4", min_params=0)(model, None)
    for node, w2 in views_2d(out).items():
        k = w2.shape[1]
        groups = np.pad(w2 != 0, ((0, 0), (0, -k % 4))).reshape(w2.shape[0], -1, 4)
        assert (groups.sum(axis=2) <= 2).all(), node
        if k % 4 == 0:
            assert (groups.sum(axis=2) == 2).all(), node  # exactly the 2 largest survive
    # The reduction axis of a Conv is (kh, kw, I) with I innermost: groups run along input channels.
    w = out.initializers()["wc1"][:, :, 0, 0]
    assert (np.count_nonzero(w.reshape(16, 4, 4), axis=2) == 2).all()


def test_keeps_largest_magnitudes(model):
    out = SparsifyPass(0.75, "unstructured", min_params=0)(model, None)
    before, after = model.initializers()["w2"], out.initializers()["w2"]
    kept = np.abs(before[after != 0])
    dropped = np.abs(before[after == 0])
    assert kept.min() >= dropped.max()
    assert np.array_equal(after[after != 0], before[after != 0])  # magnitude pruning does not rescale


def test_annotation_and_log(model):
    ctx = PassContext(quiet=True)
    out = SparsifyPass(0.6, "block:4x4", min_params=0)(model, ctx)
    ann = read_annotation(out)
    assert ann is not None and ann["pattern"] == "block:4x4" and ann["target"] == 0.6
    assert ann["layers"]["fc1"]["weight"] == "w1" and ann["layers"]["fc1"]["shape"] == [64, 576]
    # A second run replaces the annotation rather than adding another.
    again = SparsifyPass(0.8, "unstructured", min_params=0)(out, ctx)
    props = [p for p in again.proto.metadata_props if p.key == METADATA_KEY]
    assert len(props) == 1 and json.loads(props[0].value)["pattern"] == "unstructured"
    assert len(ctx.log) == 2


def test_global_scope_reaches_overall_target(model):
    ctx = PassContext(quiet=True)
    SparsifyPass(0.8, "unstructured", scope="global", min_params=0)(model, ctx)
    layers = ctx.log[-1]["layers"]
    total = sum(np.prod(v["shape"]) for v in layers.values())
    zeros = sum(v["sparsity"] * np.prod(v["shape"]) for v in layers.values())
    assert abs(zeros / total - 0.8) < 0.01
    assert len({round(v["sparsity"], 2) for v in layers.values()}) > 1  # per-layer sparsity differs


def test_ignore_and_min_params(model):
    ctx = PassContext(quiet=True)
    out = SparsifyPass(0.9, "unstructured", ignore=["fc1", "w2"], min_params=600)(model, ctx)
    layers = ctx.log[-1]["layers"]
    assert "fc1" not in layers and "fc2" not in layers  # by node name and by weight name
    assert "fc3" not in layers and "conv1x1" not in layers  # 576 and 256 params < min_params
    assert set(layers) == {"conv3x3"}
    assert np.array_equal(out.initializers()["w1"], model.initializers()["w1"])


def test_calibration_compensates(model):
    # 256 samples: fc1 reduces over 576 features, fewer rows would leave its Hessian rank-deficient.
    calib = {"x": np.random.default_rng(3).standard_normal((256, 8, 6, 6)).astype(np.float32)}
    ref = run_ort(model, calib["x"][:2])
    for pattern, s in [("unstructured", 0.7), ("block:4x4", 0.6), ("2:4", 0.5)]:
        plain = SparsifyPass(s, pattern, min_params=0)(model, None)
        ctx = PassContext(quiet=True)
        comp = SparsifyPass(s, pattern, calib=calib, min_params=0)(model, ctx)
        assert ctx.log[-1]["compensated"]
        err_plain = np.linalg.norm(run_ort(plain, calib["x"][:2]) - ref)
        err_comp = np.linalg.norm(run_ort(comp, calib["x"][:2]) - ref)
        assert err_comp < err_plain, pattern
        p = parse_pattern(pattern)
        for _node, w2 in views_2d(comp).items():  # the pattern still holds after the weight update
            if isinstance(p, NMPattern):
                assert p.holds(w2)
            elif isinstance(p, BlockPattern):
                assert ((w2 != 0) == p.expand(~p.zero_blocks(w2), w2.shape)).all()


def test_calibration_from_npz(model, tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.random.default_rng(3).standard_normal((4, 8, 6, 6)).astype(np.float32))
    ctx = PassContext(quiet=True)
    SparsifyPass(0.5, "unstructured", calib=str(path), min_params=0)(model, ctx)
    assert ctx.log[-1]["compensated"]
    with pytest.raises(BadInput, match="lacks input"):
        SparsifyPass(0.5, calib={"y": np.zeros((2, 8, 6, 6), np.float32)}, min_params=0)(model, None)
    with pytest.raises(BadInput, match="sample shape"):
        SparsifyPass(0.5, calib={"x": np.zeros((2, 8, 5, 5), np.float32)}, min_params=0)(model, None)


@pytest.mark.parametrize("text, expected", [
    ("unstructured", Unstructured()), ("block:4x4", BlockPattern(4, 4)), ("4x4", BlockPattern(4, 4)),
    ("block:16x1", BlockPattern(16, 1)), ("1x4", BlockPattern(1, 4)), ("2:4", NMPattern(2, 4)),
    (" 1:8 ", NMPattern(1, 8)),
])
def test_parse_pattern(text, expected):
    assert parse_pattern(text) == expected


@pytest.mark.parametrize("text", ["", "block", "block:4", "4x", "1x1", "0x4", "4:2", "4:4", "0:4", "dense", "2:4:8"])
def test_bad_pattern(text):
    with pytest.raises(BadInput, match="pattern"):
        SparsifyPass(0.5, text)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, "abc", None])
def test_bad_sparsity(sparsity):
    with pytest.raises(BadInput, match="sparsity"):
        SparsifyPass(sparsity, "unstructured")


def test_nm_fixes_sparsity():
    assert SparsifyPass(0.5, "2:4").sparsity == 0.5
    assert SparsifyPass(0.0, "1:4").sparsity == 0.75  # 0 means "whatever the pattern implies"
    with pytest.raises(BadInput, match="fixes the sparsity"):
        SparsifyPass(0.9, "2:4")


def test_bad_scope():
    with pytest.raises(BadInput, match="scope"):
        SparsifyPass(0.5, scope="everywhere")


def test_registered_with_pipeline():
    from sparsecc.pipeline import make_pass

    p = make_pass("sparsify", sparsity=0.5, pattern="4x4")
    assert p.name == "sparsify" and p.pattern == BlockPattern(4, 4)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 40), sparsity=st.floats(0.0, 0.99),
       r=st.sampled_from([1, 2, 4, 16]), c=st.sampled_from([1, 4, 8]), seed=st.integers(0, 2**16))
def test_block_mask_property(n, k, sparsity, r, c, seed):
    if r * c < 2:
        return
    p = BlockPattern(r, c)
    scores = np.random.default_rng(seed).random((n, k))
    keep = p.mask(scores, sparsity)
    assert keep.shape == (n, k)
    groups = p.group_scores(scores)
    zero_blocks = p.zero_blocks(np.where(keep, 1.0, 0.0))
    assert zero_blocks.sum() == int(round(sparsity * groups.size))
    assert (keep == p.expand(~zero_blocks, (n, k))).all()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), k=st.integers(1, 30), nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (4, 8)]),
       seed=st.integers(0, 2**16))
def test_nm_mask_property(n, k, nm, seed):
    p = NMPattern(*nm)
    w = np.random.default_rng(seed).standard_normal((n, k))
    keep = p.mask(w ** 2)
    assert p.holds(np.where(keep, w, 0.0))
    # Full groups keep exactly N.
    full = k // p.m * p.m
    assert (keep[:, :full].reshape(n, -1, p.m).sum(axis=2) == p.n).all()


def deep_mlp(width: int = 48, depth: int = 5, seed: int = 0) -> onnx.ModelProto:
    """x[8, width] -> depth x (MatMul -> Add -> Relu) -> MatMul: errors of early layers reach the later ones."""
    rng = np.random.default_rng(seed)
    nodes, inits, cur = [], [], "x"
    for i in range(depth + 1):
        inits.append(numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width) * 1.4)
                                             .astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [f"m{i}"], name=f"fc{i}"))
        cur = f"m{i}"
        if i < depth:
            inits.append(numpy_helper.from_array((rng.standard_normal(width) * 0.1).astype(np.float32), f"b{i}"))
            nodes += [helper.make_node("Add", [cur, f"b{i}"], [f"a{i}"], name=f"add{i}"),
                      helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}")]
            cur = f"r{i}"
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, width])],
                              [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [8, width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def test_sequential_calibration_beats_one_shot():
    """With calibration data each layer's Hessian comes from what the already sparsified layers feed it, so
    the output error (on held-out inputs, through ONNX Runtime) is below that of Hessians from the dense model."""
    model = load_model(deep_mlp())
    rng = np.random.default_rng(5)
    calib = {"x": rng.standard_normal((512, 48)).astype(np.float32)}
    held_out = rng.standard_normal((8, 48)).astype(np.float32)
    sess = lambda m: ort.InferenceSession(m.serialize(), providers=["CPUExecutionProvider"])  # noqa: E731
    ref = sess(model).run(None, {"x": held_out})[0]
    errors = {}
    for pattern, s in [("unstructured", 0.7), ("2:4", 0.5)]:
        for sequential in (False, True):
            ctx = PassContext(quiet=True)
            out = SparsifyPass(s, pattern, calib=calib, min_params=0, sequential=sequential)(model, ctx)
            assert ctx.log[-1]["compensated"] and ctx.log[-1]["sequential"] == sequential
            assert parse_pattern(pattern).holds(views_2d(out)["fc3"], s)
            y = sess(out).run(None, {"x": held_out})[0]
            errors[pattern, sequential] = np.linalg.norm(y - ref) / np.linalg.norm(ref)
        assert errors[pattern, True] < errors[pattern, False], (pattern, errors)
    assert SparsifyPass(0.5, calib=calib).sequential  # the default with calibration data
