"""The artifact report: report.json joins layers with sparsity, kernels and times; report.html is a
self-contained page with plots that headless Chromium renders without console errors."""

from __future__ import annotations

import json
import subprocess
from html.parser import HTMLParser

import numpy as np
import onnx
import pytest

import sparsecc
from conftest import replace_file, require_executable
from sparsecc.artifact import sha256_file
from sparsecc.ir import load_model
from sparsecc.models.zoo import calib_data, model_path
from sparsecc.report import fidelity, render_html

BATCH = 8


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """digits_mlp pruned and sparsified with calibration data (so the report has every section)."""
    out = tmp_path_factory.mktemp("report") / "mlp"
    return sparsecc.compile(model_path("digits_mlp"), output=out, batch=BATCH, prune=0.25, sparsity=0.7,
                            calib=calib_data("digits_mlp"))


@pytest.fixture(scope="module")
def report(artifact):
    return json.loads((artifact.path / "report.json").read_text())


class _Page(HTMLParser):
    """Counts what the report page is made of: tables and their body rows, SVGs, and external references."""

    def __init__(self):
        super().__init__()
        self.rows: dict[str, int] = {}
        self.table: str | None = None
        self.in_body = False
        self.svgs = 0
        self.tags: set[str] = set()
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "table":
            self.table = a.get("id")
            self.rows[self.table] = 0
        elif tag == "tbody":
            self.in_body = True
        elif tag == "tr" and self.in_body:
            self.rows[self.table] += 1
        elif tag == "svg":
            self.svgs += 1
        for k in ("src", "href", "xlink:href"):
            if a.get(k) and not a[k].startswith("#"):
                self.external.append(a[k])

    def handle_endtag(self, tag):
        if tag == "tbody":
            self.in_body = False


def _page(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def test_report_json_summary_layers_pruning_verification(artifact, report):
    compiled = onnx.load(artifact.path / "model.onnx")
    original = load_model(model_path("digits_mlp")).proto
    assert report["before"]["params"] == sum(int(np.prod(t.dims)) for t in original.graph.initializer)
    assert report["after"]["params"] == sum(int(np.prod(t.dims)) for t in compiled.graph.initializer)
    assert report["after"]["params"] < report["before"]["params"]
    assert report["after"]["nonzero_params"] < 0.5 * report["after"]["params"]
    assert report["after"]["size_bytes"] < report["before"]["size_bytes"]
    assert report["target"]["name"] == "cpu" and report["versions"]["tvm"]
    # one row per node of the compiled model, joined with the sparsify pass and the cost model
    assert [r["name"] for r in report["layers"]] == [n.name for n in compiled.graph.node]
    sparsified = next(e for e in report["passes"] if e["pass"] == "sparsify")["layers"]
    decisions = {d["layer"]: d for d in report["codegen"]["sparse_layers"]}
    for row in report["layers"]:
        if row["name"] in sparsified:
            assert row["pattern"] == "unstructured"
            assert row["sparsity"] == pytest.approx(sparsified[row["name"]]["sparsity"], abs=1e-3)
        if row["name"] in decisions:
            d = decisions[row["name"]]
            assert row["chosen"] == d["chosen"] and row["dense_us"] == d["dense_us"]
            assert row["kernel"] == (d["kernel"] if d["chosen"] == "sparse" else "dense")
    assert any(r["dense_us"] for r in report["layers"])  # at least one layer was timed
    prune_log = next(e for e in report["passes"] if e["pass"] == "prune")
    assert report["pruning"] == prune_log and report["pruning"]["groups_pruned"] > 0
    v = artifact.manifest["verification"]
    assert report["verification"]["max_rel_error"] == v["max_rel_error"] and v["status"] == "passed"


def test_sweep_matches_an_independent_measurement(artifact, report):
    """The sweep's requested sparsify point is the compiled model; recompute its fidelity with ORT here."""
    import onnxruntime as ort

    curves = {c["pass"]: c for c in report["accuracy_sweep"]}
    assert set(curves) == {"prune", "sparsify"}
    for c in curves.values():
        ratios = [p["ratio"] for p in c["points"]]
        assert ratios == sorted(ratios) and ratios[0] == 0.0 and len(ratios) >= 4
        assert sum(p["requested"] for p in c["points"]) == 1
    assert curves["prune"]["points"][0]["cosine"] == pytest.approx(1.0)  # ratio 0 is the dense model
    x = calib_data("digits_mlp")["input"]
    n = (min(len(x), 256) // BATCH) * BATCH

    def run(path):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.concatenate([sess.run(None, {"input": x[i:i + BATCH]})[0] for i in range(0, n, BATCH)])

    dense = load_model(model_path("digits_mlp"))
    dense_path = artifact.path.parent / "dense.onnx"
    dense.save(dense_path)
    ours = run(artifact.path / "model.onnx")
    ref = run(dense_path)
    requested = next(p for p in curves["sparsify"]["points"] if p["requested"])
    expected = fidelity(ref, ours)
    assert requested["cosine"] == pytest.approx(expected["cosine"], abs=2e-4)
    assert requested["top1_agreement"] == pytest.approx(expected["top1_agreement"], abs=1e-9)


def test_report_html_is_self_contained_with_tables_and_plots(artifact, report):
    text = (artifact.path / "report.html").read_text()
    assert artifact.manifest["files"]["report.html"] == sha256_file(artifact.path / "report.html")
    page = _page(text)
    assert page.rows["layers"] == len(report["layers"])
    assert page.rows["summary"] == 5 and page.rows["pruning"] > 5
    assert page.svgs == 4  # sparsity bars, latency bars, one fidelity curve per swept pass
    assert page.external == [] and "script" not in page.tags and "http://" not in text.replace(
        'xmlns="http://www.w3.org/2000/svg"', "").replace('xmlns:xlink="http://www.w3.org/1999/xlink"', "")
    assert text == render_html(report, text.split("<title>")[1].split("</title>")[0])  # deterministic


def test_report_without_passes_has_no_sparsity_plots(tmp_path, conv_path):
    art = sparsecc.compile(conv_path, output=tmp_path / "a")
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["pruning"] is None and "accuracy_sweep" not in report
    assert report["before"]["params"] == report["after"]["params"]
    page = _page((art.path / "report.html").read_text())
    assert page.svgs == 1  # the sparsity bars (all 0%); no layer was timed, nothing swept
    assert page.rows["layers"] == 4


def test_tampered_report_html_is_refused(tmp_path, conv_path):
    sparsecc.compile(conv_path, output=tmp_path / "a")
    path = tmp_path / "a" / "report.html"
    replace_file(path, path.read_bytes().replace(b"<h1>", b"<h1>x"))
    with pytest.raises(sparsecc.BadInput, match="'report.html' does not match"):
        sparsecc.load(tmp_path / "a")


def _chromium(*args: str) -> subprocess.CompletedProcess:
    exe = require_executable("chromium")
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                           *args], capture_output=True, text=True, timeout=120)


def _console(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def test_chromium_console_check_catches_errors(tmp_path):
    """The console check below can fail: a page with a script error shows up in it."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><p>x</p><script>undefinedFunction();</script></body></html>")
    r = _chromium("--dump-dom", bad.as_uri())
    assert any("undefinedFunction" in line for line in _console(r.stderr)), r.stderr[-2000:]


def test_report_renders_in_headless_chromium(artifact, tmp_path):
    from PIL import Image

    uri = (artifact.path / "report.html").as_uri()
    r = _chromium("--dump-dom", uri)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _console(r.stderr) == []
    page = _page(r.stdout)  # the DOM Chromium built
    assert page.svgs == 4 and page.rows["layers"] > 0
    shot = tmp_path / "report.png"
    r = _chromium(f"--screenshot={shot}", "--window-size=1200,1800", "--hide-scrollbars", uri)
    assert r.returncode == 0 and _console(r.stderr) == [], r.stderr[-2000:]
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape == (1800, 1200, 3)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # text, tables and coloured bars, not a blank page
    assert (image.min(axis=2) < 128).mean() > 0.01  # dark pixels: text and axes were drawn
