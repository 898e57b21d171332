"""`benchmarks/dense_cpu.py` run on a user's ONNX file: timed at the batch its input fixes, else at each of
`--batches`, with the same compile-verify-time path as the built-in models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import dense_cpu  # noqa: E402


def _conv_model(batch: int | str) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8, 8, 8])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_onnx_files_are_timed_at_their_fixed_batch_or_each_requested_one(tmp_path):
    fixed, dynamic = tmp_path / "fixed.onnx", tmp_path / "dynamic.onnx"
    onnx.save(_conv_model(3), str(fixed))
    onnx.save(_conv_model("N"), str(dynamic))
    assert dense_cpu.batches_of(str(fixed), [1, 8]) == [3]
    assert dense_cpu.batches_of(str(dynamic), [1, 8]) == [1, 8]
    assert dense_cpu.batches_of("resnet50", [1, 8]) == [1, 8]

    out = tmp_path / "rows.json"
    dense_cpu.main(["--models", str(fixed), str(dynamic), "--batches", "2", "--rounds", "1", "--runs", "3",
                    "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["batch"]) for r in rows] == [("fixed", 3), ("dynamic", 2)]
    assert all(r["ratio"] > 0 and r["max_rel_error"] < 1e-4 for r in rows)
