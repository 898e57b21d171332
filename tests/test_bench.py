"""`sparsecc bench`: the rows it measures and the ratios it derives from them (never the timings themselves)."""

from __future__ import annotations

import json

import pytest

import sparsecc
from sparsecc.bench import ORT_DENSE, OURS_DENSE, Row, measure, with_speedups
from sparsecc.models.zoo import model_path


def _check_ratios(rows: list[dict]) -> None:
    """Every speedup is the ratio of medians against ORT dense and our dense build of the same batch."""
    for r in rows:
        same = {x["engine"]: x["median_ms"] for x in rows if x["batch"] == r["batch"]}
        assert r["p90_ms"] >= r["median_ms"] > 0
        assert r["vs_onnxruntime"] == pytest.approx(same[ORT_DENSE] / r["median_ms"], rel=2e-3)
        if OURS_DENSE in same:
            assert r["vs_dense"] == pytest.approx(same[OURS_DENSE] / r["median_ms"], rel=2e-3)


def test_measure_calls_warmup_plus_repeat_times():
    calls = []
    row = measure("e", "m", 1, lambda: calls.append(1), warmup=3, repeat=7)
    assert len(calls) == 10
    assert row.p90_ms >= row.median_ms >= 0


def test_speedups_are_ratios_of_medians_per_batch():
    rows = with_speedups([Row(ORT_DENSE, "m", 1, 2.0, 3.0), Row(OURS_DENSE, "m", 1, 4.0, 5.0),
                          Row("sparsecc sparsify 0.9", "m", 1, 1.0, 1.5), Row(ORT_DENSE, "m", 8, 10.0, 11.0)])
    assert [(r.vs_onnxruntime, r.vs_dense) for r in rows] == [(1.0, 2.0), (0.5, 1.0), (2.0, 4.0), (1.0, None)]


def test_bench_onnx_model_dense_and_sparse(cli):
    r = cli("bench", model_path("digits_mlp"), "--sparsity", "0.8", "--batch", "2", "--warmup", "1",
            "--repeat", "5", "--threads", "1", "--json")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    assert (data["warmup"], data["repeat"], data["threads"], data["target"]) == (1, 5, 1, "cpu")
    assert [(x["engine"], x["batch"]) for x in data["rows"]] == [
        (ORT_DENSE, 2), (OURS_DENSE, 2), ("sparsecc sparsify 0.8 unstructured", 2)]
    _check_ratios(data["rows"])


@pytest.fixture(scope="module")
def sparse_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "mlp"
    return sparsecc.compile(str(model_path("digits_mlp")), output=out, sparsity=0.8, batch=4, threads=1)


def test_bench_artifact_against_ort_and_a_dense_build_of_its_source(cli, sparse_artifact):
    r = cli("bench", sparse_artifact.path, "--warmup", "1", "--repeat", "5", "--json")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    label = "sparsecc sparsify 0.8 unstructured"
    assert [x["engine"] for x in data["rows"]] == [ORT_DENSE, OURS_DENSE, "onnxruntime (sparsify 0.8 unstructured)",
                                                  label]
    assert {x["batch"] for x in data["rows"]} == {4} and data["threads"] == 1
    assert data["rows"][-1]["model"] == str(sparse_artifact.path)
    _check_ratios(data["rows"])


def test_bench_artifact_refuses_options_it_cannot_apply(cli, sparse_artifact):
    r = cli("bench", sparse_artifact.path, "--batch", "8")
    assert r.code == 2 and "compiled for batch 4" in r.err
    r = cli("bench", sparse_artifact.path, "--prune", "0.3")
    assert r.code == 2 and "ONNX models only" in r.err


def test_bench_table_shows_counts(cli, sparse_artifact):
    r = cli("bench", sparse_artifact.path, "--warmup", "2", "--repeat", "3")
    assert r.code == 0, r.err
    assert "2 warm-up + 3 timed calls" in r.out and ORT_DENSE in r.out
