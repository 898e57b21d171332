"""Real exported models (torch exports with BN folded and not, dynamic batch) and the zoo builders."""

import numpy as np
import onnx
import pytest
from prune_graphs import assert_exact_pruning, random_feeds, run

from sparsecc.ir import fix_input_shapes, load_model
from sparsecc.models import BUILDERS, accuracy, calib_data, model_path, test_data
from sparsecc.passes.prune import PrunePass

TRAINED = ["digits_mlp", "digits_cnn", "digits_cnn_folded", "digits_transformer"]


def trained(name, batch=4):
    return fix_input_shapes(load_model(model_path(name)), batch=batch)  # the export has a dynamic batch


@pytest.mark.parametrize("name", TRAINED)
def test_trained_export_prunes_to_a_valid_smaller_model(name):
    m = trained(name)
    p = PrunePass(0.3, "l1")
    out = p(m)
    onnx.checker.check_model(out.proto, full_check=True)
    feeds = random_feeds(m)
    assert [a.shape for a in run(out, feeds)] == [a.shape for a in run(m, feeds)]
    assert p.summary["params_after"] <= 0.8 * p.summary["params_before"]


@pytest.mark.parametrize("name", TRAINED)
def test_trained_export_zeroed_channels_prune_exactly(name):
    assert_exact_pruning(trained(name, batch=2), keep_ratio=0.5)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_builders_prune_exactly(name):
    model = load_model(BUILDERS[name](batch=1))
    assert_exact_pruning(model, keep_ratio=0.6)


def test_obspa_with_calibration_keeps_accuracy_at_half_the_channels():
    m = trained("digits_cnn", batch=64)
    x, y = test_data("digits_cnn")
    n = len(x) // 64 * 64

    def top1(model):
        sess_out = [run(model, {"input": x[i : i + 64]})[0] for i in range(0, n, 64)]
        return accuracy(np.concatenate(sess_out), y[:n])

    p = PrunePass(0.5, "obspa", calib_data("digits_cnn"))
    pruned = p(m)
    assert p.summary["channels_after"] <= 0.5 * p.summary["channels_before"] + 1
    assert top1(m) - top1(pruned) <= 0.01


def test_obspa_global_with_calibration_keeps_transformer_accuracy_at_half_the_params():
    """4 heads per layer: `auto` prunes head dims; half the prunable parameters go within 1 point top-1."""
    m = trained("digits_transformer", batch=64)
    x, y = test_data("digits_transformer")
    n = len(x) // 64 * 64

    def top1(model):
        return accuracy(
            np.concatenate([run(model, {"input": x[i : i + 64]})[0] for i in range(0, n, 64)]), y[:n]
        )

    p = PrunePass(0.5, "obspa", calib_data("digits_transformer"), global_ranking=True)
    pruned = p(m)
    assert p.summary["attention"] == "head_dims"
    assert p.summary["params_after"] <= 0.55 * p.summary["params_before"]
    assert top1(m) - top1(pruned) <= 0.01
