"""The arm64 target: cross-compiled artifacts run by their runner under qemu equal ONNX Runtime, dense and
block-sparse; the generated code is aarch64 NEON; options and a missing toolchain give one-line errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import sparsecc
from conftest import require_toolchain
from sparsecc.errors import BadInput, Unsupported
from sparsecc.ir import load_model
from sparsecc.models import accuracy, build_mlp, model_path, test_data
from sparsecc.verify import compare, run_onnxruntime

REL_TOL = 1e-4
EM_AARCH64 = 183  # ELF e_machine


@pytest.fixture(autouse=True)
def _toolchain():
    require_toolchain("arm64")


def _max_rel(ours, ref):
    return max(e.rel for e in compare([str(i) for i in range(len(ref))], ours, ref))


def _elf_machine(path) -> int:
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and head[4] == 2  # 64-bit
    return int.from_bytes(head[18:20], "little")


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "digits_transformer"])
def test_zoo_model_runs_under_qemu_and_matches_ort(tmp_path, name):
    x, y = test_data(name)
    batch = 64
    art = sparsecc.compile(model_path(name), target="arm64", output=tmp_path / "a",
                           shapes={"input": (batch, *x.shape[1:])})
    assert art.verification["status"] == "passed" and art.verification["max_rel_error"] < REL_TOL
    m = art.manifest
    assert m["runtime"]["kind"] == "aarch64" and m["target"]["tvm"]["mtriple"] == "aarch64-linux-gnu"
    assert {"model.so", "runner"} <= set(m["files"])
    for f in ("model.so", "runner"):
        assert _elf_machine(tmp_path / "a" / f) == EM_AARCH64
    runner = sparsecc.load(tmp_path / "a")
    ours = runner.run({"input": x[:batch]})[0]
    ref = run_onnxruntime(load_model(model_path(name)), {"input": x[:batch]})[0]
    assert _max_rel([ours], [ref]) < REL_TOL
    assert accuracy(ours, y[:batch]) == pytest.approx(accuracy(ref, y[:batch]), abs=1e-9)


@pytest.mark.parametrize("block", ["1x4", "8x1"])
def test_block_sparse_mlp_chooses_sparse_kernels(tmp_path, block):
    r, c = (int(v) for v in block.split("x"))
    art = sparsecc.compile(build_mlp(in_features=256, hidden=(512,), seed=2), target="arm64",
                           output=tmp_path / "a", batch=4, sparsity=0.9, pattern=f"block:{block}")
    assert art.verification["status"] == "passed" and art.verification["max_rel_error"] < REL_TOL
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    layers = {d["shape"][2]: d for d in report["codegen"]["sparse_layers"]}
    # Off the host nothing is timed: the analytic model for NEON decides, and takes the 90% sparse layers.
    assert all(d["chosen"] == "sparse" and d["reason"] == "predicted" for d in layers.values())
    hidden = layers[512]  # 256 -> 512, pruned in exact RxC blocks: its own block shape stores only the nonzeros
    assert hidden["block"] == [r, c] and hidden["stored_density"] == pytest.approx(0.1, abs=0.01)
    x = np.random.default_rng(5).standard_normal((4, 256)).astype(np.float32)
    ours = sparsecc.load(tmp_path / "a").run({"input": x})[0]
    ref = run_onnxruntime(load_model(tmp_path / "a" / "model.onnx"), {"input": x})[0]
    assert _max_rel([ours], [ref]) < REL_TOL


def test_kernels_are_neon():
    from sparsecc.codegen.arm64 import arm64_target
    from sparsecc.codegen.lowering import compile_module
    from sparsecc.codegen.sparse import cost
    from sparsecc.codegen.sparse.kernels import BSRMatrix

    target = arm64_target().target()
    assert cost.vector_lanes(target) == 4  # 128-bit NEON, fp32
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32) * np.kron(rng.random((16, 32)) < 0.2, np.ones((4, 1)))
    best = cost.candidates(w.astype(np.float32), 4, 4, [(4, 1)])[0]
    problem = cost.matmul_problem("layer", w.astype(np.float32), 4)
    for mod in (cost.sparse_module(problem, best.spec, BSRMatrix.from_dense(w, (4, 1))), cost.dense_module(problem)):
        asm = compile_module(mod, target).mod.imports[0].inspect_source("asm")
        assert re.search(r"\bfmla\s+v\d+\.4s", asm), "no NEON fp32 FMA in the generated code"


def test_target_options_and_raw_dict(tmp_path, conv_path):
    art = sparsecc.compile(conv_path, target="aarch64", output=tmp_path / "a",
                           target_options={"mcpu": "neoverse-n1", "mattr": ("+dotprod",)})
    tvm_target = art.manifest["target"]["tvm"]
    assert tvm_target["mcpu"] == "neoverse-n1" and tvm_target["mattr"] == ["+neon", "+dotprod"]
    assert art.verification["status"] == "passed"
    raw = json.dumps({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "mattr": ["+neon"]})
    art = sparsecc.compile(conv_path, target=raw, output=tmp_path / "b", verify=False)
    assert art.manifest["target"]["name"] == "arm64" and art.manifest["runtime"]["kind"] == "aarch64"
    with pytest.raises(BadInput, match="--mcpu skylake"):
        sparsecc.compile(conv_path, target="arm64", output=tmp_path / "c", target_options={"mcpu": "skylake"})
    with pytest.raises(BadInput, match=r"--mattr \+avx2"):
        sparsecc.compile(conv_path, target="arm64", output=tmp_path / "c", target_options={"mattr": ("+avx2",)})
    with pytest.raises(Unsupported, match="--arch"):
        sparsecc.compile(conv_path, target="arm64", output=tmp_path / "c", target_options={"arch": "sm_80"})
    assert not (tmp_path / "c").exists()


def test_cli_run_then_missing_toolchain_is_one_clean_line(tmp_path, conv_path, cli, monkeypatch):
    assert cli("compile", conv_path, "--target", "arm64", "-o", tmp_path / "a", "--quiet").code == 0
    x = np.random.default_rng(4).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    assert cli("run", tmp_path / "a", "--inputs", tmp_path / "in.npz", "-o", tmp_path / "out.npz").code == 0
    ref = run_onnxruntime(load_model(conv_path), {"x": x})[0]
    assert _max_rel([np.load(tmp_path / "out.npz")["y"]], [ref]) < REL_TOL

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("XDG_CACHE_HOME", str(empty))
    res = cli("compile", conv_path, "--target", "arm64", "-o", tmp_path / "b")
    assert res.code == 3 and not (tmp_path / "b").exists()
    (line,) = res.err.strip().splitlines()
    for missing in ("aarch64-linux-gnu-g++", "qemu-aarch64-static", "aarch64 TVM runtime", "sparsecc setup arm64"):
        assert missing in line
    res = cli("run", tmp_path / "a", "--inputs", tmp_path / "in.npz")
    assert res.code == 3 and len(res.err.strip().splitlines()) == 1 and "sparsecc setup arm64" in res.err
    res = cli("setup", "arm64", "--check")
    assert res.code == 3 and "qemu-aarch64-static" in res.err
