"""The dense benchmark's standard CNN topologies (`benchmarks/cnn_models.py`), scaled down to a quarter of their
channels and 64x64 inputs: each compiles for cpu with our schedules (no fallback to TVM's stock pipeline) and
equals ONNX Runtime on fresh inputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import sparsecc
from sparsecc.ir import load_model
from sparsecc.verify import compare, run_onnxruntime

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from cnn_models import CNNS, EXTRA_CNNS  # noqa: E402

TOPOLOGIES = {**CNNS, **EXTRA_CNNS}
SMALL = {"densenet121": {"growth": 8, "blocks": (2, 3, 4, 3)}, "squeezenet": {}, "vgg11": {"hidden": 256, "size": 32},
         "alexnet": {"hidden": 256}}


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_standard_cnn_compiles_with_our_schedules_and_matches_ort(tmp_path, name):
    proto = TOPOLOGIES[name](**{"batch": 2, "size": 64, "classes": 10, **SMALL.get(name, {"width": 0.25})})
    art = sparsecc.compile(proto, target="cpu", output=tmp_path / "a")
    assert art.verification["status"] == "passed"
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["codegen"]["schedules"] == "sparsecc", report["codegen"].get("fallback_reason")
    runner = art.load()
    feeds = {s.name: np.random.default_rng(1).standard_normal(s.shape).astype(s.dtype) for s in runner.inputs}
    ref = run_onnxruntime(load_model(proto), feeds)
    errors = compare([s.name for s in runner.outputs], runner.run(feeds), ref)
    assert max(e.rel for e in errors) < 1e-4
