"""The wasm target: artifacts run in node (and one in headless Chromium) and match ONNX Runtime."""

from __future__ import annotations

import functools
import http.server
import json
import re
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

import sparsecc
from conftest import make_model, require_executable, require_toolchain
from sparsecc.models import model_path, test_data

BATCH = 4


@pytest.fixture(scope="module", autouse=True)
def toolchain(tmp_path_factory):
    tools = require_toolchain("wasm")
    with pytest.MonkeyPatch.context() as mp:  # kernel choices must not depend on this user's tuning records
        mp.setenv("SPARSECC_TUNING_DIR", str(tmp_path_factory.mktemp("tuning")))
        yield tools


def ort_outputs(model: str | Path | onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)


def assert_close(ours: list[np.ndarray], ref: list[np.ndarray], rtol: float = 1e-4) -> None:
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale)


@functools.cache
def zoo_artifact(name: str, root: str, sparse: bool = False) -> Path:
    """A verified wasm artifact of a zoo model (compiled once per module)."""
    out = Path(root) / f"{name}{'-sparse' if sparse else ''}.wasm.sparsecc"
    opts = {"sparsity": 0.9, "pattern": "block:4x1"} if sparse else {}
    art = sparsecc.compile(model_path(name), target="wasm", output=out, batch=BATCH, **opts)
    assert art.verification["status"] == "passed"
    return out


@pytest.fixture(scope="module")
def art_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("wasm"))


def zoo_feeds(name: str) -> dict[str, np.ndarray]:
    x, _ = test_data(name)
    return {"input": x[:BATCH]}


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "digits_transformer"])
def test_zoo_model_runs_in_node_like_ort(name, art_root):
    path = zoo_artifact(name, art_root)
    assert {"model.wasm", "model.mjs", "manifest.json", "report.json"} <= {p.name for p in path.iterdir()}
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["runtime"]["kind"] == "wasm-node"
    assert manifest["target"]["tvm"]["mtriple"] == "wasm32-unknown-unknown-wasm"
    feeds = zoo_feeds(name)
    assert_close(sparsecc.load(path).run(feeds), ort_outputs(path / "model.onnx", feeds))


@pytest.mark.parametrize("name", ["digits_cnn", "digits_transformer"])
def test_sparse_zoo_model_uses_sparse_kernels_and_matches_ort(name, art_root):
    path = zoo_artifact(name, art_root, sparse=True)
    layers = json.loads((path / "report.json").read_text())["codegen"]["sparse_layers"]
    assert any(d["chosen"] == "sparse" and d["block"] == [4, 1] for d in layers)
    feeds = zoo_feeds(name)
    assert_close(sparsecc.load(path).run(feeds), ort_outputs(path / "model.onnx", feeds))
    if name == "digits_cnn":  # its sparse 3x3 convs read their rows from the one-kernel im2col
        assert b"im2col_nhwc" in (path / "model.wasm").read_bytes()


@pytest.mark.parametrize("kernel, strides, padding, dilation", [
    ((3, 3), [1, 1], [1, 1, 1, 1], [1, 1]),
    ((3, 2), [2, 1], [0, 1, 2, 0], [1, 2]),
    ((2, 3), [1, 2], [0, 0, 0, 0], [2, 1]),
])
def test_fast_im2col_computes_the_rows_of_the_relax_im2col(kernel, strides, padding, dilation):
    from tvm import relax

    from sparsecc.codegen.sparse.rewrite import ConvGeometry
    from sparsecc.codegen.wasm.im2col import fast_im2col

    shape = (2, 7, 6, 8)  # NHWC
    geom = ConvGeometry("NHWC", shape[0], shape[3], shape[1], shape[2], *kernel, strides, padding, dilation)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(geom.emit_rows(bb, x))
        bb.emit_func_output(out)
    mod = bb.get()
    fast = fast_im2col(mod)
    assert "im2col_nhwc" in fast.script() and "concat" not in fast["main"].script()
    data = np.random.default_rng(0).standard_normal(shape).astype(np.float32)

    def run(m):
        vm = relax.VirtualMachine(tvm.compile(m, target="llvm"), tvm.cpu())
        return vm["main"](tvm.runtime.tensor(data)).numpy()

    expected = run(mod)
    assert expected.shape == (geom.m, kernel[0] * kernel[1] * shape[3])
    np.testing.assert_array_equal(run(fast), expected)


def test_kernels_use_wasm_simd(art_root):
    objdump = shutil.which("llvm-objdump-14")
    if objdump is None:
        pytest.skip("llvm-objdump-14 not installed")
    path = zoo_artifact("digits_cnn", art_root, sparse=True)
    text = subprocess.run([objdump, "-d", str(path / "model.wasm")], capture_output=True, text=True).stdout
    assert re.search(r"f32x4\.(mul|add)", text)
    assert re.search(r"v128\.load", text)


def test_cli_compile_and_run(cli, tmp_path):
    out = tmp_path / "mlp.art"
    r = cli("compile", model_path("digits_mlp"), "--target", "wasm", "-o", out, "--quiet")
    assert r.code == 0, r.err
    x, _ = test_data("digits_mlp")
    np.savez(tmp_path / "in.npz", input=x[:1])
    r = cli("run", out, "--inputs", tmp_path / "in.npz", "-o", tmp_path / "out.npz")
    assert r.code == 0, r.err
    ours = np.load(tmp_path / "out.npz")
    ref = ort_outputs(out / "model.onnx", {"input": x[:1]})
    assert_close([ours[k] for k in ours.files], ref)


def multi_output_model() -> onnx.ModelProto:
    """Four outputs of two inputs: a kernel result, a reshape (a view) of it, a view of an input, and a sum."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w")
    shape_b = numpy_helper.from_array(np.array([2, 64], np.int64), "shape_b")
    shape_c = numpy_helper.from_array(np.array([8, 8], np.int64), "shape_c")
    out = [("a", [4, 32]), ("b", [2, 64]), ("c", [8, 8]), ("d", [4, 32])]
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"]),
         helper.make_node("Relu", ["h"], ["a"]),
         helper.make_node("Reshape", ["a", "shape_b"], ["b"]),
         helper.make_node("Reshape", ["x", "shape_c"], ["c"]),
         helper.make_node("Add", ["a", "x2"], ["d"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16]),
         helper.make_tensor_value_info("x2", TensorProto.FLOAT, [4, 32])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in out],
        [w, shape_b, shape_c],
    )


def test_multiple_outputs_and_views(tmp_path):
    model = multi_output_model()
    art = sparsecc.compile(model, target="wasm", output=tmp_path / "multi.art")
    assert art.verification["status"] == "passed"
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((4, 16)).astype(np.float32),
             "x2": rng.standard_normal((4, 32)).astype(np.float32)}
    runner = art.load()
    assert [s.name for s in runner.outputs] == ["a", "b", "c", "d"]
    assert_close(runner.run(feeds), ort_outputs(model, feeds))


def test_scalar_constants_and_assorted_ops(tmp_path):
    """Conv, pooling, Resize, Concat, Softmax and a Cast whose kernel takes a 0-d constant."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    model = make_model([
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Sigmoid", ["p"], ["s"]),
        helper.make_node("Resize", ["s", "", "scales"], ["r"], mode="nearest"),
        helper.make_node("Concat", ["r", "c"], ["cat"], axis=1),
        helper.make_node("GlobalAveragePool", ["cat"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Softmax", ["f"], ["y"], axis=-1),
        helper.make_node("Mul", ["y", "hundred"], ["y100"]),
        helper.make_node("Cast", ["y100"], ["yi"], to=TensorProto.INT32),
    ], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16]),
         helper.make_tensor_value_info("yi", TensorProto.INT32, [2, 16])],
        [w, scales, numpy_helper.from_array(np.array(100.0, np.float32), "hundred")])
    art = sparsecc.compile(model, target="wasm", output=tmp_path / "ops.art")
    assert art.verification["status"] == "passed"
    feeds = {"x": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)}
    ours, ref = art.load().run(feeds), ort_outputs(model, feeds)
    assert_close(ours[:1], ref[:1])
    assert ours[1].dtype == np.int32 and np.abs(ours[1] - ref[1]).max() <= 1  # float rounding at .5 edges


NODE_SCRIPT = """
import { load } from "./model.mjs";
const model = await load();                                   // default: model.wasm beside model.mjs
const x = Float32Array.from(JSON.parse(process.argv[2]));
const byName = await model.run({ input: x });
const byOrder = await model.run([x]);
let error = null;
try { await model.run({ input: new Float32Array(3) }); } catch (e) { error = String(e); }
console.log(JSON.stringify({
  inputs: model.inputs, outputs: model.outputs, error,
  byName: Array.from(byName.logits), byOrder: Array.from(byOrder.logits),
  type: byName.logits.constructor.name,
}));
"""


def test_mjs_api_from_node_script(art_root, toolchain, tmp_path):
    path = zoo_artifact("digits_cnn", art_root)
    (path / "check.mjs").write_text(NODE_SCRIPT)  # beside model.mjs, as an application would import it
    try:
        x = zoo_feeds("digits_cnn")["input"]
        proc = subprocess.run([toolchain["tools"]["node"], "check.mjs", json.dumps(x.ravel().tolist())],
                              cwd=path, capture_output=True, text=True, timeout=120)
    finally:
        (path / "check.mjs").unlink()
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["inputs"] == [{"name": "input", "shape": [BATCH, 1, 8, 8], "dtype": "float32"}]
    assert got["outputs"] == [{"name": "logits", "shape": [BATCH, 10], "dtype": "float32"}]
    assert got["type"] == "Float32Array"
    assert "input 'input' has 3 elements" in got["error"]
    ref = ort_outputs(path / "model.onnx", {"input": x})[0]
    for key in ("byName", "byOrder"):
        assert_close([np.array(got[key], np.float32).reshape(ref.shape)], [ref])


def test_unsupported_builtin_is_refused_in_one_line(cli, tmp_path):
    model = make_model([helper.make_node("NonZero", ["x"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.INT64, None)])
    onnx.save(model, tmp_path / "nonzero.onnx")
    r = cli("compile", tmp_path / "nonzero.onnx", "--target", "wasm", "-o", tmp_path / "out", "--quiet")
    assert r.code == 3
    assert "static executor does not support relax.run.nonzero" in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_kernel_calling_the_runtime_is_refused(tmp_path):
    model = make_model([helper.make_node("TopK", ["x", "k"], ["y", "i"], axis=-1)],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3]),
                        helper.make_tensor_value_info("i", TensorProto.INT64, [1, 3])],
                       [numpy_helper.from_array(np.array([3], np.int64), "k")])
    with pytest.raises(sparsecc.errors.Unsupported, match="tvm.contrib.sort.topk"):
        sparsecc.compile(model, target="wasm", output=tmp_path / "topk.art")


def test_target_options_are_refused(cli):
    r = cli("compile", model_path("digits_mlp"), "--target", "wasm", "--arch", "sm_80", "--no-verify")
    assert r.code == 3 and "--arch is not supported for target 'wasm'" in r.err


def test_missing_node_is_one_clear_error(art_root, monkeypatch):
    path = zoo_artifact("digits_mlp", art_root)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(sparsecc.errors.Unsupported, match="node >= 18.*sparsecc setup wasm"):
        sparsecc.load(path)


PAGE = """<!doctype html><html><body><pre id="out" style="white-space: pre-wrap">running</pre>
<script type="module">
import { load } from "./model.mjs";
const out = document.getElementById("out");
try {
  const input = await (await fetch("./input.json")).json();
  const model = await load();
  const feeds = Object.fromEntries(model.inputs.map((s) => [s.name, Float32Array.from(input[s.name])]));
  const result = await model.run(feeds);
  out.textContent = "RESULT " + JSON.stringify(Object.fromEntries(
    Object.entries(result).map(([k, v]) => [k, Array.from(v)])));
} catch (e) {
  out.textContent = "ERROR " + e;
}
</script></body></html>
"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_runs_in_headless_chromium(art_root, tmp_path):
    chromium = require_executable("chromium")
    path = zoo_artifact("digits_cnn", art_root, sparse=True)
    site = tmp_path / "site"
    site.mkdir()
    for name in ("model.wasm", "model.mjs"):
        shutil.copy(path / name, site / name)
    x = zoo_feeds("digits_cnn")["input"]
    (site / "input.json").write_text(json.dumps({"input": x.ravel().tolist()}))
    (site / "index.html").write_text(PAGE)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/index.html"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=30000"]
    try:
        dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        shot = tmp_path / "chromium.png"
        subprocess.run([*flags, "--window-size=1000,400", f"--screenshot={shot}", url], capture_output=True,
                       timeout=120)
    finally:
        server.shutdown()
    match = re.search(r"RESULT (\{.*?\})</pre>", dom)
    assert match, dom[:500]
    logits = np.array(json.loads(match.group(1))["logits"], np.float32).reshape(BATCH, 10)
    assert_close([logits], ort_outputs(path / "model.onnx", {"input": x}))
    assert shot.is_file() and shot.stat().st_size > 1000


def test_kernels_are_tuned_in_node_and_remembered(tmp_path):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((256, 512)).astype(np.float32)
    w *= np.kron(rng.random((64, 512)) < 0.1, np.ones((4, 1))).astype(np.float32)  # 90% sparse, 4x1 blocks
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 256])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 512])],
                       [numpy_helper.from_array(w, "w")])
    db = tmp_path / "db"

    def compile_layer(out: str) -> tuple[dict, Path]:
        art = sparsecc.compile(model, target="wasm", output=tmp_path / out, tune=2, tune_db=str(db))
        assert art.verification["status"] == "passed"
        return json.loads((tmp_path / out / "report.json").read_text())["codegen"], tmp_path / out

    first, path = compile_layer("a.art")
    assert first["tuning"]["layers_timed"] == 1
    (layer,) = first["sparse_layers"]
    assert layer["reason"].startswith("node:") and layer["dense_us"] > 0 and len(layer["tried"]) == 2
    records = json.loads((db / "wasm_kernels.json").read_text())
    assert [r["layer"] for r in records.values()] == [layer["layer"]]
    second, path2 = compile_layer("b.art")
    assert second["tuning"]["layers_timed"] == 0  # the winner came from the database
    assert second["sparse_layers"][0]["kernel"] == layer["kernel"]
    assert (path / "model.wasm").read_bytes() == (path2 / "model.wasm").read_bytes()
    x = rng.standard_normal((8, 256)).astype(np.float32)
    assert_close(sparsecc.load(path2).run({"x": x}), ort_outputs(model, {"x": x}))
