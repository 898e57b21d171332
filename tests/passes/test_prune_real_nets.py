"""Real OCR and detection exports pruned at 30%: valid, runnable, same output shapes, >= 20% fewer parameters.

tests/data holds small torch exports (models/export_test_nets.py; random weights, dynamic batch, opset 17):
`crnn_ocr` (Conv+BN backbone -> (W, B, C*H) -> 2-layer BiLSTM -> Linear; BN not folded) and `dbnet_det`
(residual backbone, FPN with nearest Resize x2 + Add and Concat, ConvTranspose heads with Sigmoid; BN folded).
`sparsecc prune` fixes the batch and writes a static model; the pass on the dynamic export keeps the dynamic
batch (with fewer groups: shapes it cannot resolve block) and must stay valid too.
"""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from prune_graphs import run

from sparsecc.ir import load_model
from sparsecc.passes.prune import PrunePass

DATA = Path(__file__).resolve().parents[1] / "data"
NETS = ["crnn_ocr", "dbnet_det"]


def feeds(model, batch):
    inp = model.proto.graph.input[0]
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]]
    return {inp.name: np.random.default_rng(0).normal(size=[batch, *dims]).astype(np.float32)}


def n_params(proto):
    return sum(int(np.prod(t.dims)) for t in proto.graph.initializer)


@pytest.mark.parametrize("criterion, batch", [("l1", 1), ("l1", 2), ("obspa", 1)])
@pytest.mark.parametrize("name", NETS)
def test_prune_command_at_30_percent(cli, tmp_path, name, criterion, batch):
    out = tmp_path / "pruned.onnx"
    r = cli("prune", DATA / f"{name}.onnx", "--ratio", "0.3", "--criterion", criterion,
            "--batch", batch, "-o", out, "--json")  # fmt: skip
    assert r.code == 0, r.err
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)
    original = load_model(str(DATA / f"{name}.onnx"))
    x = feeds(original, batch)
    assert pruned.graph.input[0].type.tensor_type.shape.dim[0].dim_value == batch  # written static
    want = [y.shape for y in run(original, x)]
    assert [y.shape for y in run(load_model(pruned), x)] == want
    assert n_params(pruned) <= 0.8 * n_params(original.proto)
    data = json.loads(r.out)
    assert data["after"]["params"] <= 0.8 * data["before"]["params"]


@pytest.mark.parametrize("name", NETS)
def test_prune_pass_on_the_dynamic_export_keeps_the_batch_axis(name):
    m = load_model(str(DATA / f"{name}.onnx"))
    p = PrunePass(0.3)
    out = p(m)
    onnx.checker.check_model(out.proto, full_check=True)
    assert p.summary["params_after"] < p.summary["params_before"]
    for batch in (1, 3):
        x = feeds(m, batch)
        assert [y.shape for y in run(out, x)] == [y.shape for y in run(m, x)]


@pytest.mark.parametrize("name", NETS)
def test_inspect_groups_gives_a_reason_for_every_blocked_group(cli, name):
    r = cli("inspect", DATA / f"{name}.onnx", "--groups", "--json")
    assert r.code == 0, r.err
    groups = json.loads(r.out)["groups"]
    assert sum(g["params"] for g in groups if g["prunable"]) > 0.5 * json.loads(r.out)["params"]
    blocked = [g for g in groups if not g["prunable"]]
    assert blocked and all(g["reason"] for g in blocked)  # the heads reach graph outputs
    assert not any(g["prunable"] and g["channels"] < 2 for g in groups)
