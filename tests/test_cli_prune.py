"""CLI glue for pruning and sparsity: `prune`, `inspect --groups`, `compile --prune/--sparsity`."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from sparsecc.ir import load_model
from sparsecc.models import accuracy, calib_data, model_path, test_data
from sparsecc.verify import run_onnxruntime


@pytest.fixture
def calib_npz(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, **calib_data("digits_cnn"))
    return path


def test_prune_command_shrinks_and_keeps_accuracy(cli, tmp_path, calib_npz):
    out = tmp_path / "pruned.onnx"
    r = cli("prune", model_path("digits_cnn"), "--ratio", "0.5", "--criterion", "obspa", "--calib", calib_npz,
            "--batch", "4", "-o", out, "--json")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    assert data["after"]["params"] < 0.6 * data["before"]["params"]
    assert data["after"]["flops"] < data["before"]["flops"]
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    x, y = test_data("digits_cnn")
    dense = run_onnxruntime(load_model(model_path("digits_cnn")), {"input": x})[0]
    pruned_model = load_model(out)  # pruned at a fixed batch of 4
    pruned = np.concatenate([run_onnxruntime(pruned_model, {"input": x[i:i + 4]})[0] for i in range(0, len(x), 4)])
    assert pruned.shape == dense.shape
    assert accuracy(pruned, y) >= accuracy(dense, y) - 0.01


def test_prune_bad_options(cli, tmp_path, calib_npz):
    m = model_path("digits_cnn")
    for args, code in [(["--ratio", "1.5"], 2), (["--ratio", "0.3", "--criterion", "magic"], 2),
                       (["--ratio", "0.3", "--criterion", "activation"], 2)]:
        r = cli("prune", m, *args, "-o", tmp_path / "p.onnx")
        assert r.code == code, (args, r.err)
        assert r.err.strip().splitlines()[-1].startswith("error:")
        assert not (tmp_path / "p.onnx").exists()
    np.savez(tmp_path / "wrong.npz", nope=np.zeros((4, 1, 8, 8), np.float32))
    r = cli("prune", m, "--ratio", "0.3", "--calib", tmp_path / "wrong.npz", "-o", tmp_path / "p.onnx")
    assert r.code == 2 and "wrong.npz" in r.err
    np.savez(tmp_path / "shape.npz", input=np.zeros((4, 1, 9, 8), np.float32))
    r = cli("prune", m, "--ratio", "0.3", "--calib", tmp_path / "shape.npz", "-o", tmp_path / "p.onnx")
    assert r.code == 2 and "shape" in r.err


def test_inspect_groups_json(cli):
    r = cli("inspect", model_path("digits_cnn"), "--groups", "--json")
    assert r.code == 0, r.err
    groups = json.loads(r.out)["groups"]
    assert any(g["prunable"] for g in groups)
    blocked = [g for g in groups if not g["prunable"]]
    assert blocked and all(g["reason"] for g in blocked)  # the logits group reaches the graph output


def test_compile_with_prune_matches_ort(cli, tmp_path, calib_npz):
    r = cli("compile", model_path("digits_cnn"), "-o", tmp_path / "a", "--prune", "0.3", "--criterion", "obspa",
            "--calib", calib_npz, "--json")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    assert data["verification"]["status"] == "passed"
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    prune_log = [entry for entry in report["passes"] if entry.get("pass") == "prune" or "params_after" in entry]
    assert prune_log, report["passes"]
    compiled = onnx.load(tmp_path / "a" / "model.onnx")
    original = load_model(model_path("digits_cnn")).proto
    count = lambda m: sum(int(np.prod(t.dims)) for t in m.graph.initializer)  # noqa: E731
    assert count(compiled) < 0.8 * count(original)


@pytest.mark.parametrize("attention", ["heads", "head_dims"])
def test_prune_command_attention_modes(cli, tmp_path, attention):
    """`--attention heads` removes whole heads, `head_dims` the same dims of every head: both shrink the
    transformer and keep it valid with the same output shape."""
    out = tmp_path / f"{attention}.onnx"
    r = cli("prune", model_path("digits_transformer"), "--ratio", "0.5", "--attention", attention,
            "-o", out, "--json")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    assert data["after"]["params"] < data["before"]["params"]
    onnx.checker.check_model(onnx.load(out), full_check=True)
    x, _ = test_data("digits_transformer")
    pruned = run_onnxruntime(load_model(out), {"input": x[:1]})[0]
    dense = run_onnxruntime(load_model(model_path("digits_transformer")), {"input": x[:1]})[0]
    assert pruned.shape == dense.shape


def test_prune_command_refuses_unknown_attention_mode(cli, tmp_path):
    r = cli("prune", model_path("digits_transformer"), "--ratio", "0.5", "--attention", "rows",
            "-o", tmp_path / "x.onnx")
    assert r.code == 2 and "attention" in r.err and not (tmp_path / "x.onnx").exists()
