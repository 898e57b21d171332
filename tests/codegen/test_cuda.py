"""CUDA target: builds without a GPU (fatbin for the requested arch, `mma.sp` in 2:4 layers, per-layer kernels
in the manifest), the 2:4 compression and BSR index logic checked on the CPU, and - where a GPU is present -
outputs against ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm

import sparsecc
from sparsecc.codegen.cuda.build import gpu_problem
from sparsecc.codegen.cuda.kernels import Sparse24Matrix, bsr_matmul_gpu
from sparsecc.codegen.cuda.plan import choose_kernel
from sparsecc.codegen.sparse.kernels import BSRMatrix
from sparsecc.errors import Unsupported
from sparsecc.models import zoo

pytestmark = pytest.mark.skipif(not __import__("shutil").which("nvcc"), reason="nvcc not installed")
NO_GPU = gpu_problem("sm_80")


def two_four(n: int, k: int, seed: int = 0) -> np.ndarray:
    """A random [n, k] weight keeping the two largest of every four along K."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    groups = w.reshape(n, k // 4, 4)
    keep = np.argsort(-np.abs(groups), axis=2)[:, :, :2]
    mask = np.zeros(groups.shape, bool)
    np.put_along_axis(mask, keep, True, axis=2)
    return (groups * mask).reshape(n, k)


def reference_metadata(mask: np.ndarray) -> np.ndarray:
    """Metadata words of one 16x32 tile as TVM's own mma.sp m16n8k32 test builds them (mask [16, 8, 2])."""
    mask = mask.reshape(16, 2, 8)
    ret = np.zeros((8, 2), np.uint32)
    for i in range(8):
        for k in range(2):
            base = 1
            for blk in range(2):
                for j in range(8):
                    ret[i, k] |= int(mask[blk * 8 + i, k, j]) * base
                    base <<= 2
    return ret.reshape(16)


@pytest.mark.parametrize("shape", [(128, 64), (10, 72), (200, 256)])
def test_2_4_compression_decompresses_to_the_weight(shape):
    w = two_four(*shape)
    w[0, :4] = [0, 0, 0, 1.5]  # a group with a single nonzero: the second slot is a kept zero
    mat = Sparse24Matrix.from_dense(w)
    np.testing.assert_array_equal(mat.to_dense(), w.astype(np.float16).astype(np.float32))


def test_2_4_metadata_matches_the_mma_sp_reference_layout():
    w = two_four(16, 32, seed=3)
    mat = Sparse24Matrix.from_dense(w)
    nonzero = w.reshape(16, 8, 4) != 0
    mask = np.stack([np.nonzero(g)[0] for g in nonzero.reshape(-1, 4)]).reshape(16, 8, 2)
    np.testing.assert_array_equal(mat.meta[0, 0], reference_metadata(mask))
    # lane t, element i of the A fragment holds compressed A[(i % 4) // 2 * 8 + t // 4, i // 4 * 8 + t % 4 * 2 + i % 2]
    compressed = w.reshape(16, 8, 4)[np.arange(16)[:, None, None], np.arange(8)[None, :, None], mask].reshape(16, 16)
    lane, i = 5, 6
    assert mat.values[0, 0, lane, i] == np.float16(compressed[(i % 4) // 2 * 8 + lane // 4, i // 4 * 8 + lane % 4 * 2 + i % 2])


def test_2_4_refuses_a_weight_without_the_pattern():
    with pytest.raises(ValueError):
        Sparse24Matrix.from_dense(np.ones((16, 32), np.float32))


@pytest.mark.parametrize("block,w_dtype", [((16, 1), "float32"), ((4, 4), "float16")])
def test_bsr_gpu_kernel_index_logic_on_cpu(block, w_dtype):
    rng = np.random.default_rng(1)
    n, k, m = 64, 48, 5
    w = rng.standard_normal((n, k)).astype(np.float32)
    r, c = block
    empty = rng.random((n // r, k // c)) < 0.8
    w = (w.reshape(n // r, r, k // c, c) * ~empty[:, None, :, None]).reshape(n, k).astype(w_dtype)
    mat = BSRMatrix.from_dense(w, block)
    func = bsr_matmul_gpu(m, (n, k), block, mat.nnzb, "float32", w_dtype)
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    ex["main"](*[tvm.runtime.tensor(a) for a in (x, mat.data, mat.indices, mat.indptr)], y)
    np.testing.assert_allclose(y.numpy(), x @ w.astype(np.float32).T, rtol=1e-5, atol=1e-5)


def test_kernel_choice_rules():
    assert choose_kernel(two_four(64, 64))["kernel"] == "2:4"
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    assert choose_kernel(w)["kernel"] == "dense"
    w[16:] = 0  # 75% of the 16x1 blocks empty
    assert choose_kernel(w)["kernel"] == "bsr"


def _compile(tmp_path, name, target="cuda", tolerance=1e-2, **options):
    art = sparsecc.compile(str(zoo.model_path(name)), target=target, output=tmp_path / "art", quiet=True,
                           tolerance=tolerance, **options)
    library = (art.path / "model.so").read_bytes().decode("latin1")
    report = json.loads((art.path / "report.json").read_text())["codegen"]
    return art, library, report


def _check_verification(art):
    v = art.manifest["verification"]
    if NO_GPU:
        assert v == {"status": "skipped", "reason": NO_GPU}
    else:
        assert v["status"] == "passed", v


@pytest.mark.parametrize("name,dtype", [("digits_cnn", None), ("digits_transformer", "float16")])
def test_zoo_2_4_builds_with_sparse_tensor_core_code(tmp_path, name, dtype):
    options = {"target_options": {"dtype": dtype}} if dtype else {}
    art, library, report = _compile(tmp_path, name, sparsity=0.5, pattern="2:4", tolerance=2e-2, **options)
    runtime = art.manifest["runtime"]
    assert runtime["kind"] == "tvm-vm-cuda" and runtime["arch"] == "sm_80"
    kernels = {layer["layer"]: layer["kernel"] for layer in runtime["layers"]}
    assert "2:4" in kernels.values()
    assert all(layer.startswith("/") for layer in kernels)  # named after the ONNX nodes
    assert [r["kernel"] for r in report["layers"]] == list(kernels.values())
    assert ".target sm_80" in library and "mma.sp.sync.aligned.m16n8k32" in library
    assert 'extern "C" __global__' not in library  # compiled ahead of time: no CUDA source to JIT at load
    _check_verification(art)


def test_dense_build_has_no_sparse_instructions(tmp_path):
    art, library, report = _compile(tmp_path, "digits_mlp", tolerance=1e-4)
    assert set(report["kernels"]) == {"dense", "bsr", "2:4"} and report["kernels"]["dense"] == 3
    assert ".target sm_80" in library and "mma.sp" not in library
    _check_verification(art)


def test_block_sparse_layers_use_the_bsr_kernel(tmp_path):
    art, library, report = _compile(tmp_path, "digits_mlp", sparsity=0.9, pattern="block:16x1", tolerance=1e-4)
    assert [r["kernel"] for r in report["layers"]][:2] == ["bsr", "bsr"]
    assert report["layers"][0]["block"] == [16, 1]
    _check_verification(art)


@pytest.mark.parametrize("target,options,arch", [
    ("nvidia/nvidia-h100", {}, "sm_90a"),
    ('{"kind": "cuda", "arch": "sm_90"}', {}, "sm_90"),
    ("cuda", {"arch": "sm_90"}, "sm_90"),
])
def test_hopper_targets_build_fp16_matmuls_with_dlight(tmp_path, target, options, arch):
    art, library, report = _compile(tmp_path, "digits_mlp", target=target, tolerance=2e-2,
                                    target_options={**options, "dtype": "float16"})
    assert art.manifest["target"]["arch"] == arch and report["dtype"] == "float16"
    assert f".target {arch}" in library and ".target sm_80" not in library


def test_cuda_refuses_cpu_options_and_unknown_arch(tmp_path):
    with pytest.raises(Unsupported, match="--mcpu"):
        _compile(tmp_path, "digits_mlp", target_options={"mcpu": "znver4"})
    with pytest.raises(sparsecc.errors.BadInput, match="--arch"):
        _compile(tmp_path, "digits_mlp", target_options={"arch": "sm_70"})
