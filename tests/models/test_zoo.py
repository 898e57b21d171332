"""The model zoo: builder models are valid, runnable and deterministic; shipped models match their README."""

from __future__ import annotations

import hashlib
import re
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from sparsecc import models as zoo
from sparsecc.errors import BadInput

CLASSES = 10
MAX_FILE_BYTES = 1_500_000
MODELS_DIR = zoo.model_path(zoo.TRAINED[0]).parent
ACCURACY_FLOOR = {
    "digits_mlp": 0.95,
    "digits_cnn": 0.95,
    "digits_cnn_folded": 0.95,
    "digits_transformer": 0.90,
}


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return session(model).run(None, {"input": x})[0]


def ops(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


def input_dims(model: onnx.ModelProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]


def random_input(model: onnx.ModelProto, batch: int) -> np.ndarray:
    shape = [batch, *input_dims(model)[1:]]
    return np.random.default_rng(1).normal(size=shape).astype(np.float32)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def attr(node: onnx.NodeProto, name: str, default=None):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def depthwise_convs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Convs whose group equals their channel count: weight shape [C, 1, k, k] with group C > 1."""
    found = []
    for node in model.graph.node:
        group = attr(node, "group", 1)
        if node.op_type == "Conv" and group > 1:
            weight = initializer(model, node.input[1])
            if weight.shape[0] == group and weight.shape[1] == 1:
                found.append(node)
    return found


# --- builders -----------------------------------------------------------------------------------------

BUILDER_CASES = {
    "mlp": {},
    "mlp_matmul": {"style": "matmul"},
    "resnet_cnn": {},
    "transformer": {},
}


def build(case: str, **kwargs) -> onnx.ModelProto:
    return zoo.BUILDERS[case.removesuffix("_matmul")](**BUILDER_CASES[case], **kwargs)


@pytest.mark.parametrize("case", BUILDER_CASES)
@pytest.mark.parametrize("batch", [1, 3])
def test_builder_dynamic_batch_runs(case: str, batch: int) -> None:
    model = build(case)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 10
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert [i.name for i in model.graph.input] == ["input"]
    assert input_dims(model)[0] == "batch"
    out = run(model, random_input(model, batch))
    assert out.shape == (batch, CLASSES)
    assert np.all(np.isfinite(out)) and out.std() > 1e-3


@pytest.mark.parametrize("case", BUILDER_CASES)
@pytest.mark.parametrize("batch", [1, 3])
def test_builder_fixed_batch_runs(case: str, batch: int) -> None:
    model = build(case, batch=batch)
    onnx.checker.check_model(model, full_check=True)
    assert input_dims(model)[0] == batch
    assert run(model, random_input(model, batch)).shape == (batch, CLASSES)


@pytest.mark.parametrize("case", BUILDER_CASES)
def test_builder_is_deterministic(case: str) -> None:
    assert build(case).SerializeToString() == build(case).SerializeToString()
    assert build(case, seed=1).SerializeToString() != build(case).SerializeToString()


def test_builder_arguments_shape_the_model() -> None:
    mlp = zoo.build_mlp(in_features=20, hidden=(8, 8, 8), classes=3)
    assert ops(mlp) == Counter({"Gemm": 4, "Relu": 3})
    assert run(mlp, random_input(mlp, 2)).shape == (2, 3)
    cnn = zoo.build_resnet_cnn(channels=1, size=8, width=4, classes=5)
    assert run(cnn, random_input(cnn, 2)).shape == (2, 5)
    vit = zoo.build_transformer(seq=4, d_model=16, heads=2, ff=32, layers=3, classes=7)
    assert ops(vit)["Softmax"] == 3
    assert run(vit, random_input(vit, 2)).shape == (2, 7)


def test_mlp_styles_compute_the_same_function() -> None:
    gemm, matmul = zoo.build_mlp(), zoo.build_mlp(style="matmul")
    assert ops(gemm) == Counter({"Gemm": 3, "Relu": 2})
    assert ops(matmul) == Counter({"MatMul": 3, "Add": 3, "Relu": 2})
    x = random_input(gemm, 4)
    np.testing.assert_allclose(run(gemm, x), run(matmul, x), rtol=1e-5, atol=1e-5)


def test_builders_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="style"):
        zoo.build_mlp(style="linear")
    with pytest.raises(ValueError, match="divisible"):
        zoo.build_transformer(d_model=30, heads=4)


def test_resnet_cnn_has_every_pruning_pattern() -> None:
    model = zoo.build_resnet_cnn(width=8)
    counts = ops(model)
    assert counts["BatchNormalization"] == counts["Conv"] == 10
    assert counts["Add"] == 2 and counts["Concat"] == 1
    assert [n.input[1] for n in depthwise_convs(model)], "expected a depthwise Conv"
    strided = [n for n in model.graph.node if n.op_type == "Conv" and attr(n, "strides") == [2, 2]]
    kernels = sorted(attr(n, "kernel_shape")[0] for n in strided)
    assert kernels == [1, 3], "expected a strided 3x3 conv and a strided 1x1 projection shortcut"
    for bn in (n for n in model.graph.node if n.op_type == "BatchNormalization"):
        assert not np.allclose(initializer(model, bn.input[3]), 0.0)  # running mean
        assert not np.allclose(initializer(model, bn.input[4]), 1.0)  # running var


def test_transformer_attention_is_explicit() -> None:
    model = zoo.build_transformer(seq=16, d_model=64, heads=4, layers=2)
    counts = ops(model)
    assert counts["Softmax"] == 2 and counts["Erf"] == 2 and counts["LayerNormalization"] == 5
    assert counts["Reshape"] == counts["Transpose"] == 8
    shapes = {tuple(initializer(model, n.input[1])) for n in model.graph.node if n.op_type == "Reshape"}
    assert shapes == {(0, 16, 4, 16), (0, 16, 64)}


# --- trained models -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=zoo.TRAINED)
def trained(request: pytest.FixtureRequest) -> tuple[str, onnx.ModelProto]:
    return request.param, onnx.load(zoo.model_path(request.param))


def test_trained_model_is_valid_and_small(trained: tuple[str, onnx.ModelProto]) -> None:
    name, model = trained
    assert zoo.model_path(name).stat().st_size < MAX_FILE_BYTES
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert [i.name for i in model.graph.input] == ["input"]
    x, _ = zoo.test_data(name)
    assert input_dims(model) == ["batch", *x.shape[1:]]


def test_trained_model_reaches_documented_accuracy(trained: tuple[str, onnx.ModelProto]) -> None:
    name, model = trained
    x, y = zoo.test_data(name)
    assert x.dtype == np.float32 and y.dtype == np.int64 and len(x) == len(y)
    assert zoo.accuracy(run(model, x), y) >= ACCURACY_FLOOR[name]


def test_trained_model_runs_at_batch_one_and_three(trained: tuple[str, onnx.ModelProto]) -> None:
    name, model = trained
    x, _ = zoo.test_data(name)
    full = run(model, x[:3])
    np.testing.assert_allclose(run(model, x[:1]), full[:1], rtol=1e-5, atol=1e-5)
    assert full.shape == (3, CLASSES)


def test_calibration_feed_matches_model_inputs(trained: tuple[str, onnx.ModelProto]) -> None:
    name, model = trained
    feed = zoo.calib_data(name)
    assert set(feed) == {i.name for i in model.graph.input}
    assert feed["input"].dtype == np.float32 and len(feed["input"]) == 128
    assert session(model).run(None, feed)[0].shape == (128, CLASSES)


EXPECTED_OPS = {
    "digits_mlp": {"Gemm": 3, "Relu": 2},
    "digits_cnn": {"Conv": 10, "BatchNormalization": 10, "Add": 2, "Concat": 1, "GlobalAveragePool": 1},
    "digits_cnn_folded": {"Conv": 10, "BatchNormalization": 0, "Add": 2, "Concat": 1, "GlobalAveragePool": 1},
    "digits_transformer": {"LayerNormalization": 5, "Softmax": 2, "Reshape": 8, "Transpose": 8, "Erf": 2},
}


def test_trained_model_has_expected_ops(trained: tuple[str, onnx.ModelProto]) -> None:
    name, model = trained
    counts = ops(model)
    assert {op: counts[op] for op in EXPECTED_OPS[name]} == EXPECTED_OPS[name]
    assert counts["Identity"] == 0
    if name.startswith("digits_cnn"):
        assert len(depthwise_convs(model)) == 1


def test_folded_cnn_matches_unfolded() -> None:
    x, _ = zoo.test_data("digits_cnn")
    plain = run(onnx.load(zoo.model_path("digits_cnn")), x)
    folded = run(onnx.load(zoo.model_path("digits_cnn_folded")), x)
    np.testing.assert_allclose(plain, folded, rtol=1e-4, atol=1e-4)


def test_readme_records_every_shipped_file_hash() -> None:
    readme = (MODELS_DIR / "README.md").read_text()
    recorded = dict(re.findall(r"`([\w.]+\.(?:onnx|npz))`[^\n]*`([0-9a-f]{64})`", readme))
    shipped = [*(zoo.model_path(n) for n in zoo.TRAINED), MODELS_DIR / "digits_data.npz"]
    assert recorded == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in shipped}


def test_unknown_name_is_bad_input() -> None:
    for accessor in (zoo.model_path, zoo.test_data, zoo.calib_data):
        with pytest.raises(BadInput, match="unknown zoo model"):
            accessor("resnet50")


def test_accuracy_counts_top1_hits() -> None:
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], np.float32)
    assert zoo.accuracy(logits, np.array([1, 0, 0])) == pytest.approx(2 / 3)
