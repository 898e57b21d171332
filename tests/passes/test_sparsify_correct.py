"""Error correction of calibrated sparsity (dense-output targets, residual drift, bias shift) and the token mask."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparsecc.errors import BadInput
from sparsecc.ir import Model, load_model
from sparsecc.passes.sparsify import SparsifyPass, find_weights, output_links
from sparsecc.passes.sparsity_patterns import parse_pattern

B, S, D = 4, 6, 32


def residual_mlp(depth: int = 3, seed: int = 0) -> Model:
    """x[B, S, D] -> depth x (x + W2 relu(W1 x + b1) + b2) -> y = x * mask[B, S, 1]: MatMul, bias Add, residual Add."""
    rng = np.random.default_rng(seed)
    nodes, inits, cur = [], [], "x"

    def init(name, *shape, scale):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))

    for i in range(depth):
        init(f"w1_{i}", D, 2 * D, scale=1.2 / np.sqrt(D))
        init(f"b1_{i}", 2 * D, scale=0.3)
        init(f"w2_{i}", 2 * D, D, scale=1.2 / np.sqrt(2 * D))
        init(f"b2_{i}", D, scale=0.3)
        nodes += [helper.make_node("MatMul", [cur, f"w1_{i}"], [f"m1_{i}"], name=f"up{i}"),
                  helper.make_node("Add", [f"m1_{i}", f"b1_{i}"], [f"a1_{i}"], name=f"up_bias{i}"),
                  helper.make_node("Relu", [f"a1_{i}"], [f"r{i}"], name=f"relu{i}"),
                  helper.make_node("MatMul", [f"r{i}", f"w2_{i}"], [f"m2_{i}"], name=f"down{i}"),
                  helper.make_node("Add", [f"b2_{i}", f"m2_{i}"], [f"a2_{i}"], name=f"down_bias{i}"),
                  helper.make_node("Add", [f"a2_{i}", cur], [f"x{i + 1}"], name=f"residual{i}")]
        cur = f"x{i + 1}"
    nodes += [helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT, name="cast"),
              helper.make_node("Unsqueeze", ["maskf", "axis"], ["mask3"], name="unsqueeze"),
              helper.make_node("Mul", [cur, "mask3"], ["y"], name="masked")]
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "axis"))
    graph = helper.make_graph(nodes, "residual_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, D]),
                               helper.make_tensor_value_info("mask", TensorProto.INT64, [B, S])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, S, D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return load_model(model)


def feeds(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, S, D)).astype(np.float32), "mask": np.ones((n, S), np.int64)}


def output_error(model: Model, ref: Model, data: dict[str, np.ndarray]) -> float:
    run = lambda m: ort.InferenceSession(m.serialize(), providers=["CPUExecutionProvider"]).run(None, data)[0]  # noqa: E731
    y, y_ref = run(model), run(ref)
    return float(np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref))


def test_output_links():
    model = residual_mlp()
    links = output_links(model, find_weights(model, min_params=0))
    assert links["up0"].bias == "b1_0" and links["up0"].residual is None  # Relu follows the bias
    assert links["down1"].bias == "b2_1" and links["down1"].residual == "x1"  # bias operand first, then residual


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.6), ("2:4", 0.5)])
def test_correction_lowers_held_out_error(pattern, sparsity):
    """Targets from the dense model's outputs (input and residual drift corrected) and shifted biases: the
    output error on held-out inputs is below plain sequential SparseGPT's, and the pattern still holds."""
    model = residual_mlp()
    calib, held_out = feeds(256, 1), feeds(B, 2)
    errors = {}
    for correct in (False, True):
        out = SparsifyPass(sparsity, pattern, calib=calib, min_params=0, correct=correct)(model, None)
        errors[correct] = output_error(out, model, held_out)
        weights, dense = out.initializers(), model.initializers()
        for v in find_weights(model, min_params=0):
            assert parse_pattern(pattern).holds(v.to_2d(weights[v.weight]), sparsity), v.node
        changed = {n for n in ("b1_0", "b2_0") if not np.array_equal(weights[n], dense[n])}
        assert changed == ({"b1_0", "b2_0"} if correct else set())
    assert errors[True] < 0.9 * errors[False], errors


def test_token_mask_ignores_masked_positions():
    """Positions the mask zeroes do not reach the statistics: garbage there changes nothing with the mask."""
    model = residual_mlp(depth=1)
    calib = feeds(64, 3)
    calib["mask"][:, 4:] = 0

    def sparsified(garbage: float, token_mask: str | None) -> dict[str, np.ndarray]:
        data = {k: v.copy() for k, v in calib.items()}
        data["x"][:, 4:] = garbage
        return SparsifyPass(0.5, calib=data, min_params=0, token_mask=token_mask)(model, None).initializers()

    a, b = sparsified(5.0, "mask"), sparsified(-7.0, "mask")
    assert all(np.array_equal(a[n], b[n]) for n in ("w1_0", "w2_0", "b1_0", "b2_0"))
    a, b = sparsified(5.0, None), sparsified(-7.0, None)
    assert not np.array_equal(a["w1_0"], b["w1_0"])
    with pytest.raises(BadInput, match="token_mask"):
        SparsifyPass(0.5, calib=calib, min_params=0, token_mask="x")(model, None)
