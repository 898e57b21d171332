"""Sparse TIR kernels against numpy: every variant, odd sizes, empty rows, an all-zero weight."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from sparsecc.codegen.sparse.cost import candidates, kernel_specs
from sparsecc.codegen.sparse.kernels import (
    MAX_ACCUMULATOR_FLOATS,
    BSRMatrix,
    KernelSpec,
    bsr_matmul,
    kernel_arrays,
)
from sparsecc.codegen.targets import cpu_target

TARGET = cpu_target(2).target()


def block_sparse(n: int, k: int, block: tuple[int, int], density: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    r, c = block
    keep = rng.random((-(-n // r), -(-k // c))) < density
    w = rng.standard_normal((n, k)).astype(np.float32)
    return w * np.kron(keep, np.ones((r, c)))[:n, :k].astype(np.float32)


def run_kernel(spec: KernelSpec, x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None,
               relu: bool = False) -> np.ndarray:
    mat = BSRMatrix.from_dense(w, spec.block)
    func = bsr_matmul(spec, x.shape[0], mat, relu=relu).with_attr("global_symbol", "main")
    ex = tvm.compile(tvm.IRModule({"main": func}), target=TARGET)
    b = np.zeros(w.shape[0], np.float32) if bias is None else bias
    out = np.zeros((x.shape[0], w.shape[0]), np.float32)
    args = [tvm.runtime.tensor(a) for a in [x, *kernel_arrays(spec, mat), b, out]]
    ex["main"](*args)
    return args[-1].numpy()


def check(spec: KernelSpec, m: int, w: np.ndarray, seed: int = 1, epilogue: bool = False) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, w.shape[1])).astype(np.float32)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    bias = None
    if epilogue:
        bias = rng.standard_normal(w.shape[0]).astype(np.float32)
        ref = np.maximum(ref + bias, 0.0)
    got = run_kernel(spec, x, w, bias, relu=epilogue)
    scale = max(np.abs(ref).max(), 1.0)
    assert np.abs(got - ref).max() / scale < 1e-5, spec.label


@pytest.mark.parametrize("block", [(1, 1), (1, 4), (4, 1), (4, 4), (8, 1), (16, 1), (2, 2)])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_generated_variants_match_numpy(block, m):
    r, c = block
    n, k = 7 * r * (2 if r < 4 else 1), 5 * c * (3 if c < 4 else 1)  # odd block counts
    w = block_sparse(n, k, block, 0.4, seed=r * 10 + c)
    for i, spec in enumerate(kernel_specs(block, m, lanes=16)):
        check(spec, m, w, epilogue=i % 2 == 1)  # every other variant with bias + ReLU


@pytest.mark.parametrize("spec", [
    KernelSpec((4, 4), "rowvec", 1, unroll=3, split=2),
    KernelSpec((4, 4), "batchvec", 5, unroll=2, split=4),
    KernelSpec((1, 1), "batchvec", 10, unroll=8),
    KernelSpec((16, 1), "rowvec", 2, unroll=4),
    KernelSpec((1, 4), "rowvec", 5, unroll=1, split=4),
    KernelSpec((4, 4), "rowvec", 2, unroll=2, split=2, mblock=4),  # batch blocks: parallel tasks over (M, N)
    KernelSpec((1, 1), "batchvec", 5, unroll=2, mblock=5),
])
def test_unroll_tails_and_odd_tiles(spec):
    r, c = spec.block
    w = block_sparse(6 * r, 9 * c, spec.block, 0.6, seed=3)  # 0..9 blocks per row: every unroll tail
    m = 8 if spec.mblock == 4 else 10 if spec.tile in (2, 5, 10) else spec.tile
    check(spec, m, w)


def test_large_batch_is_split_into_cache_sized_blocks():
    """An im2col-sized X: the generated specs tile the batch so each task's rows stay in cache."""
    w = block_sparse(32, 576, (4, 4), 0.2, seed=11)
    specs = kernel_specs((4, 4), 1200, lanes=16, k=576, n=32)
    assert specs and all(s.mblock and 1200 % s.mblock == 0 and s.mblock * 576 * 4 <= 256 * 1024 for s in specs)
    for spec in specs:
        check(spec, 1200, w)


def test_csr_with_prime_sizes_and_empty_rows():
    w = block_sparse(37, 29, (1, 1), 0.15, seed=5)
    w[3] = 0.0
    w[20:25] = 0.0
    for spec in kernel_specs((1, 1), 7, lanes=16) + kernel_specs((1, 1), 1, lanes=16):
        check(spec, spec.tile if spec.tile in (1, 7) else 7, w)


def test_all_zero_weight():
    w = np.zeros((32, 16), np.float32)
    mat = BSRMatrix.from_dense(w, (4, 4))
    assert mat.nnzb == 1 and not mat.data.any()  # one explicit zero block keeps the buffers non-empty
    for spec in kernel_specs((4, 4), 4, lanes=16):
        x = np.ones((4, 16), np.float32)
        assert not run_kernel(spec, x, w).any()


@pytest.mark.parametrize("block", [(1, 1), (4, 4), (16, 1), (2, 8)])
def test_bsr_round_trip(block):
    w = block_sparse(32, 48, block, 0.3, seed=9)
    mat = BSRMatrix.from_dense(w, block)
    assert np.array_equal(mat.to_dense(), w)
    assert mat.indptr[-1] == mat.nnzb and (np.diff(mat.indptr) >= 0).all()
    assert mat.density == pytest.approx(mat.nnzb * block[0] * block[1] / w.size)


def test_bad_specs_are_refused():
    w = block_sparse(16, 16, (4, 4), 0.5)
    mat = BSRMatrix.from_dense(w, (4, 4))
    with pytest.raises(ValueError, match="does not tile"):
        BSRMatrix.from_dense(w[:, :15], (4, 4))
    with pytest.raises(ValueError, match="tile must divide"):
        bsr_matmul(KernelSpec((4, 4), "rowvec", 3), 16, mat)
    with pytest.raises(ValueError, match="exceed"):
        bsr_matmul(KernelSpec((16, 1), "rowvec", 16), 16, BSRMatrix.from_dense(w, (16, 1)))
    assert KernelSpec((16, 1), "rowvec", 15).accumulator_floats() <= MAX_ACCUMULATOR_FLOATS


def test_candidates_skip_dense_formats():
    w = block_sparse(64, 64, (4, 4), 0.1)
    blocks = {c.spec.block for c in candidates(w, 16, 16)}
    assert (4, 4) in blocks and (1, 1) in blocks
    dense = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    assert candidates(dense, 16, 16) == []  # nothing stores less than the dense weight


@pytest.mark.parametrize("spec", [KernelSpec((4, 4), "rowvec", 2, unroll=2, split=2),
                                  KernelSpec((4, 4), "batchvec", 4, split=2),
                                  KernelSpec((4, 4), "blockvec", 2, unroll=4),
                                  KernelSpec((1, 1), "batchvec", 4, unroll=4)])
def test_garbage_indices_stay_in_bounds(spec):
    """A tuner's runner fills every argument with random data; the kernels clamp index reads instead of
    reading out of bounds (the result is then meaningless but finite, and nothing crashes)."""
    w = block_sparse(32, 32, spec.block, 0.5)
    mat = BSRMatrix.from_dense(w, spec.block)
    m = 4 if spec.variant == "batchvec" else 2
    func = bsr_matmul(spec, m, mat).with_attr("global_symbol", "main")
    ex = tvm.compile(tvm.IRModule({"main": func}), target=TARGET)
    rng = np.random.default_rng(0)
    data, indices, indptr = kernel_arrays(spec, mat)
    for trial in range(3):
        bad_ind = rng.integers(-2**31, 2**31 - 1, indices.shape, dtype=np.int64).astype(np.int32)
        bad_ptr = rng.integers(-2**31, 2**31 - 1, indptr.shape, dtype=np.int64).astype(np.int32)
        if trial == 2:
            bad_ptr = np.sort(rng.integers(0, 10 * mat.nnzb, indptr.shape)).astype(np.int32)
        out = np.zeros((m, 32), np.float32)
        args = [tvm.runtime.tensor(a) for a in [np.ones((m, 32), np.float32), data, bad_ind, bad_ptr,
                                                np.zeros(32, np.float32), out]]
        ex["main"](*args)
        assert np.isfinite(args[-1].numpy()).all()
