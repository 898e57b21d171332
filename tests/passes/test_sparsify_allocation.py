"""Sensitivity-based per-layer sparsity allocation and the least-squares refit of the kept weights."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from sparsecc.errors import BadInput
from sparsecc.ir import Model, load_model
from sparsecc.models import zoo
from sparsecc.passes.sparsify import SparsifyPass, allocate, find_weights, refit, sparsegpt
from sparsecc.passes.sparsity_patterns import NMPattern, Unstructured
from sparsecc.pipeline import PassContext


def logits(model: Model, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.serialize(), providers=["CPUExecutionProvider"]).run(None, {zoo.INPUT_NAME: x})[0]


@pytest.mark.parametrize("name, sparsity", [("digits_cnn", 0.6)])
def test_sensitivity_allocation_keeps_ratio_and_lowers_error(name, sparsity):
    """Per-layer sparsities differ, the pruned count over all layers is exactly the target's, and the
    held-out logits are closer to the dense model's than with the same sparsity everywhere."""
    model = load_model(str(zoo.model_path(name)))
    calib, (x, _) = zoo.calib_data(name), zoo.test_data(name)
    x = x[:256]
    ref = logits(model, x)
    errors = {}
    for allocation in ("uniform", "sensitivity"):
        ctx = PassContext(quiet=True)
        out = SparsifyPass(sparsity, calib=calib, allocation=allocation)(model, ctx)
        weights = out.initializers()
        views = find_weights(model)
        total = sum(weights[v.weight].size for v in views)
        zeros = sum(weights[v.weight].size - np.count_nonzero(weights[v.weight]) for v in views)
        if allocation == "sensitivity":  # uniform rounds per layer instead
            assert zeros == round(sparsity * total)
        else:
            assert all(weights[v.weight].size - np.count_nonzero(weights[v.weight])
                       == round(sparsity * weights[v.weight].size) for v in views)
        spread = {round(layer["sparsity"], 3) for layer in ctx.log[-1]["layers"].values()}
        assert (len(spread) > 1) == (allocation == "sensitivity")
        errors[allocation] = np.linalg.norm(logits(out, x) - ref) / np.linalg.norm(ref)
    assert errors["sensitivity"] < errors["uniform"], errors


def test_allocate_is_exact_and_follows_costs():
    sizes = np.array([1000, 3000, 517])
    grid = np.linspace(0.25, 0.75, 51)
    costs = np.stack([k * grid ** 3 for k in (1.0, 5.0, 0.2)])  # the second layer is the most sensitive
    counts = allocate(sizes, costs, grid, 0.5)
    assert counts.sum() == round(0.5 * sizes.sum())
    s = counts / sizes
    assert s[1] < 0.5 < s[2] and s[1] < s[0] < s[2]


def test_refit_keeps_mask_and_lowers_error():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 48)) @ rng.standard_normal((48, 48))  # correlated inputs
    h = 2 * x.T @ x / len(x)
    w = rng.standard_normal((32, 48))
    err = lambda a: np.einsum("ij,jk,ik->", a - w, h, a - w)  # noqa: E731
    for pattern in (Unstructured(), NMPattern(2, 4)):
        pruned = sparsegpt(w, h, pattern, 0.5, damp=0.01)
        fitted = refit(pruned, w, h, damp=0.01)
        assert np.array_equal(fitted != 0, pruned != 0)
        assert err(fitted) < 0.9 * err(pruned), pattern


def test_allocation_needs_calibration_and_free_sparsity():
    calib = zoo.calib_data("digits_mlp")
    with pytest.raises(BadInput, match="allocation"):
        SparsifyPass(0.5, allocation="sensitivity")
    with pytest.raises(BadInput, match="allocation"):
        SparsifyPass(0.5, "2:4", calib=calib, allocation="sensitivity")
    with pytest.raises(BadInput, match="allocation"):
        SparsifyPass(0.5, calib=calib, allocation="owl-ish")
