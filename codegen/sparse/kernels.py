"""Sparse x dense TIR kernels: `Y[M, N] = X[M, K] @ W[N, K]^T` with W stored as BSR (CSR = 1x1 blocks).

TVM 0.27 has no sparse operators left, so these PrimFuncs are ours. Each is written already scheduled (loop
kinds set in the script, `tirx.is_scheduled`), because no schedule rule understands loops whose bounds come
from `indptr`. Two loop orders cover the shapes that matter on CPUs:

- `rowvec`: vectorized along the block rows R (data stored [nnzb, C, R]); each block is R outputs of a
  contiguous output row, so results are stored as vectors. Best for tall blocks (16x1, 8x1) and batch 1.
- `batchvec`: vectorized along the batch M. X is transposed once into a scratch buffer [K, M] so a block column
  reads one contiguous vector per k; each weight is broadcast and FMA'd into R accumulators. Best for wide or
  square blocks (1x4, 4x4) and CSR at batch >= 8.
- `blockvec`: vectorized over the whole R x C block (4x4 = one AVX-512 vector): X is first copied into
  `XR[M, K/C, R*C]`, each C-slice repeated R times, so a block is one FMA; lanes are summed per row at the
  end. For small batches (1-4) with blocks wider than one column.

Every index read is clamped into range, so a kernel stays memory-safe whatever its index arguments hold (a
MetaSchedule runner fills arguments with random data). Weights, indices, indptr and the bias are arguments here; the Relax rewrite (`rewrite.py`) passes them as
constants, so they are compile-time constants of the artifact. The epilogue adds the bias (zeros when the
layer has none) and optionally applies ReLU, so a Gemm+bias+ReLU stays one kernel as on the dense path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm.script import tirx as T

VARIANTS = ("rowvec", "batchvec", "blockvec")


@dataclass(frozen=True)
class BSRMatrix:
    """W [N, K] in block-sparse-row form: blocks of R rows (of N) x C columns (of K)."""

    data: np.ndarray  # [nnzb, R, C]
    indices: np.ndarray  # [nnzb] block column of each stored block
    indptr: np.ndarray  # [N // R + 1]
    shape: tuple[int, int]  # (N, K)
    block: tuple[int, int]  # (R, C)

    @classmethod
    def from_dense(cls, w: np.ndarray, block: tuple[int, int]) -> BSRMatrix:
        n, k = w.shape
        r, c = block
        if n % r or k % c:
            raise ValueError(f"block {r}x{c} does not tile a {n}x{k} weight")
        blocks = w.reshape(n // r, r, k // c, c).transpose(0, 2, 1, 3)  # [NB, KB, R, C]
        nonzero = np.any(blocks != 0, axis=(2, 3))
        rows, cols = np.nonzero(nonzero)
        data = np.ascontiguousarray(blocks[rows, cols], dtype=w.dtype)
        if len(rows) == 0:  # keep every buffer non-empty: one explicit zero block
            rows, cols = np.array([0]), np.array([0])
            data = np.zeros((1, r, c), w.dtype)
        indptr = np.zeros(n // r + 1, np.int32)
        np.cumsum(np.bincount(rows, minlength=n // r), out=indptr[1:])
        return cls(data, cols.astype(np.int32), indptr, (n, k), (r, c))

    @property
    def nnzb(self) -> int:
        return int(self.indices.shape[0])

    @property
    def density(self) -> float:
        """Stored fraction of the weight (what the kernel computes on, zeros inside blocks included)."""
        n, k = self.shape
        return self.nnzb * self.block[0] * self.block[1] / float(n * k)

    def to_dense(self) -> np.ndarray:
        n, k = self.shape
        r, c = self.block
        out = np.zeros((n // r, k // c, r, c), self.data.dtype)
        rows = np.repeat(np.arange(n // r), np.diff(self.indptr))
        out[rows, self.indices] = self.data
        return out.transpose(0, 2, 1, 3).reshape(n, k)


@dataclass(frozen=True)
class KernelSpec:
    """One sparse kernel variant.

    `tile`: batch rows (rowvec) or batch lanes (batchvec) per register tile. `unroll` (U) and `split` (S) give
    the FMA chains more independent accumulators - U consecutive blocks and S groups of block columns each
    sum into their own registers - so the loop is not bound by FMA latency when the tile alone has few.
    """

    block: tuple[int, int]
    variant: str  # "rowvec" | "batchvec"
    tile: int
    unroll: int = 1
    split: int = 1
    mblock: int = 0  # batch rows per parallel task (0: all); keeps a large X (im2col) block in cache

    @property
    def label(self) -> str:
        r, c = self.block
        fmt = "csr" if self.block == (1, 1) else f"bsr{r}x{c}"
        mb = f"m{self.mblock}" if self.mblock else ""
        return f"{fmt}/{self.variant}/t{self.tile}u{self.unroll}s{self.split}{mb}"

    def accumulator_floats(self) -> int:
        r, c = self.block
        return self.unroll * self.split * self.tile * r * (c if self.variant == "blockvec" else 1)


# Accumulators must stay below TVM's stack-allocation limit (runtime::kMaxStackAlloca = 1024 bytes): above
# it LowerTVMBuiltin turns them into a workspace allocation per row block.
MAX_ACCUMULATOR_FLOATS = 255


def kernel_arrays(spec: KernelSpec, w: BSRMatrix) -> list[np.ndarray]:
    """The constant arguments of the kernel, in the layout its variant reads."""
    if spec.variant == "rowvec":
        data = w.data.transpose(0, 2, 1)  # [nnzb, C, R]
    elif spec.variant == "blockvec":
        data = w.data.reshape(w.nnzb, -1)  # [nnzb, R*C]
    else:
        data = w.data
    return [np.ascontiguousarray(data, dtype="float32"), w.indices, w.indptr]


def bsr_matmul(spec: KernelSpec, m: int, w: BSRMatrix, relu: bool = False) -> tvm.tirx.PrimFunc:
    """The PrimFunc `(X[M, K], data, indices, indptr, bias[N], Y[M, N])` for `spec` and the structure of `w`:
    `Y = X @ W^T + bias`, then max(., 0) when `relu` (the epilogue the dense schedules would fuse too)."""
    n, k = w.shape
    r, c = spec.block
    if spec.block != w.block:
        raise ValueError(f"kernel block {spec.block} != matrix block {w.block}")
    mblock = spec.mblock or m
    if m % mblock or mblock % spec.tile or c % spec.split:
        raise ValueError(f"{spec.label}: tile must divide the batch block, which must divide the batch {m}, "
                         f"and split the block width {c}")
    if spec.accumulator_floats() > MAX_ACCUMULATOR_FLOATS:
        raise ValueError(f"{spec.label}: {spec.accumulator_floats()} accumulators exceed {MAX_ACCUMULATOR_FLOATS}")
    build = {"rowvec": _rowvec, "batchvec": _batchvec, "blockvec": _blockvec}[spec.variant]
    return build(m, k, n, r, c, w.nnzb, spec.tile, spec.unroll, spec.split, mblock, bool(relu))


def _rowvec(M: int, K: int, N: int, R: int, C: int, nnzb: int, MT: int, U: int, S: int,
            MB: int, RELU: bool) -> tvm.tirx.PrimFunc:
    NB = N // R
    KB = K // C
    A = U * S
    NMB = M // MB

    @T.prim_func(private=True)
    def bsr_matmul_rowvec(X: T.Buffer((M, K), "float32"), data: T.Buffer((nnzb, C, R), "float32"),
                          indices: T.Buffer((nnzb,), "int32"), indptr: T.Buffer((NB + 1,), "int32"),
                          bias: T.Buffer((N,), "float32"), Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "sparsecc.sparse_kernel": True})
        for task in T.parallel(NMB * NB):
            acc = T.alloc_buffer((A, MT, R), "float32")
            io: T.let[T.int32] = task % NB
            m0: T.let[T.int32] = task // NB * MB
            start: T.let[T.int32] = T.min(T.max(indptr[io], 0), nnzb)
            count: T.let[T.int32] = T.min(T.max(indptr[io + 1], start), nnzb) - start
            for mo in T.serial(MB // MT):
                for a in T.unroll(A):
                    for mi in T.unroll(MT):
                        for r in T.vectorized(R):
                            acc[a, mi, r] = T.float32(0)
                for jo in T.serial(count // U):
                    for u in T.unroll(U):
                        for c in T.unroll(C):
                            for mi in T.unroll(MT):
                                for r in T.vectorized(R):
                                    acc[u * S + c % S, mi, r] = acc[u * S + c % S, mi, r] + data[
                                        start + jo * U + u, c, r] * X[
                                        m0 + mo * MT + mi, T.min(T.max(indices[start + jo * U + u], 0), KB - 1) * C + c]
                for jt in T.serial(count % U):
                    for c in T.unroll(C):
                        for mi in T.unroll(MT):
                            for r in T.vectorized(R):
                                acc[c % S, mi, r] = acc[c % S, mi, r] + data[
                                    start + count // U * U + jt, c, r] * X[
                                    m0 + mo * MT + mi, T.min(T.max(indices[start + count // U * U + jt], 0), KB - 1) * C + c]
                for a in T.unroll(1, A):
                    for mi in T.unroll(MT):
                        for r in T.vectorized(R):
                            acc[0, mi, r] = acc[0, mi, r] + acc[a, mi, r]
                for mi in T.unroll(MT):
                    for r in T.vectorized(R):
                        if RELU:
                            Y[m0 + mo * MT + mi, io * R + r] = T.max(acc[0, mi, r] + bias[io * R + r], T.float32(0))
                        else:
                            Y[m0 + mo * MT + mi, io * R + r] = acc[0, mi, r] + bias[io * R + r]

    return bsr_matmul_rowvec


def _batchvec(M: int, K: int, N: int, R: int, C: int, nnzb: int, MV: int, U: int, S: int,
              MB: int, RELU: bool) -> tvm.tirx.PrimFunc:
    NB = N // R
    KB = K // C
    A = U * S
    NMB = M // MB

    @T.prim_func(private=True)
    def bsr_matmul_batchvec(X: T.Buffer((M, K), "float32"), data: T.Buffer((nnzb, R, C), "float32"),
                            indices: T.Buffer((nnzb,), "int32"), indptr: T.Buffer((NB + 1,), "int32"),
                            bias: T.Buffer((N,), "float32"), Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "sparsecc.sparse_kernel": True})
        XT = T.alloc_buffer((NMB, K, MB), "float32")  # X transposed per batch block: [K, MB] contiguous
        for t in T.parallel(NMB * K):
            for m in T.serial(MB):
                XT[t // K, t % K, m] = X[t // K * MB + m, t % K]
        for task in T.parallel(NMB * NB):
            acc = T.alloc_buffer((A, R, MV), "float32")
            io: T.let[T.int32] = task % NB
            mb: T.let[T.int32] = task // NB
            start: T.let[T.int32] = T.min(T.max(indptr[io], 0), nnzb)
            count: T.let[T.int32] = T.min(T.max(indptr[io + 1], start), nnzb) - start
            for mo in T.serial(MB // MV):
                for a in T.unroll(A):
                    for r in T.unroll(R):
                        for mi in T.vectorized(MV):
                            acc[a, r, mi] = T.float32(0)
                for jo in T.serial(count // U):
                    for u in T.unroll(U):
                        for c in T.unroll(C):
                            for r in T.unroll(R):
                                for mi in T.vectorized(MV):
                                    acc[u * S + c % S, r, mi] = acc[u * S + c % S, r, mi] + data[
                                        start + jo * U + u, r, c] * XT[
                                        mb, T.min(T.max(indices[start + jo * U + u], 0), KB - 1) * C + c, mo * MV + mi]
                for jt in T.serial(count % U):
                    for c in T.unroll(C):
                        for r in T.unroll(R):
                            for mi in T.vectorized(MV):
                                acc[c % S, r, mi] = acc[c % S, r, mi] + data[start + count // U * U + jt, r, c] * XT[
                                    mb, T.min(T.max(indices[start + count // U * U + jt], 0), KB - 1) * C + c, mo * MV + mi]
                for a in T.unroll(1, A):
                    for r in T.unroll(R):
                        for mi in T.vectorized(MV):
                            acc[0, r, mi] = acc[0, r, mi] + acc[a, r, mi]
                for r in T.unroll(R):
                    for mi in T.serial(MV):
                        if RELU:
                            Y[mb * MB + mo * MV + mi, io * R + r] = T.max(acc[0, r, mi] + bias[io * R + r], T.float32(0))
                        else:
                            Y[mb * MB + mo * MV + mi, io * R + r] = acc[0, r, mi] + bias[io * R + r]

    return bsr_matmul_batchvec


def _blockvec(M: int, K: int, N: int, R: int, C: int, nnzb: int, MT: int, U: int, S: int,
              MB: int, RELU: bool) -> tvm.tirx.PrimFunc:
    NB = N // R
    KB = K // C
    RC = R * C

    @T.prim_func(private=True)
    def bsr_matmul_blockvec(X: T.Buffer((M, K), "float32"), data: T.Buffer((nnzb, RC), "float32"),
                            indices: T.Buffer((nnzb,), "int32"), indptr: T.Buffer((NB + 1,), "int32"),
                            bias: T.Buffer((N,), "float32"), Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "sparsecc.sparse_kernel": True})
        XR = T.alloc_buffer((M, KB, RC), "float32")  # each C-wide slice of X repeated R times
        for t in T.serial(M * KB):  # small (M <= 4): a parallel region would cost more than the copy
            for r in T.unroll(R):
                for c in T.vectorized(C):
                    XR[t // KB, t % KB, r * C + c] = X[t // KB, t % KB * C + c]
        for io in T.parallel(NB):
            acc = T.alloc_buffer((U, MT, RC), "float32")
            row = T.alloc_buffer((MT, R), "float32")
            start: T.let[T.int32] = T.min(T.max(indptr[io], 0), nnzb)
            count: T.let[T.int32] = T.min(T.max(indptr[io + 1], start), nnzb) - start
            for mo in T.serial(M // MT):
                for u in T.unroll(U):
                    for mi in T.unroll(MT):
                        for v in T.vectorized(RC):
                            acc[u, mi, v] = T.float32(0)
                for jo in T.serial(count // U):
                    for u in T.unroll(U):
                        for mi in T.unroll(MT):
                            for v in T.vectorized(RC):
                                acc[u, mi, v] = acc[u, mi, v] + data[start + jo * U + u, v] * XR[
                                    mo * MT + mi, T.min(T.max(indices[start + jo * U + u], 0), KB - 1), v]
                for jt in T.serial(count % U):
                    for mi in T.unroll(MT):
                        for v in T.vectorized(RC):
                            acc[0, mi, v] = acc[0, mi, v] + data[start + count // U * U + jt, v] * XR[
                                mo * MT + mi, T.min(T.max(indices[start + count // U * U + jt], 0), KB - 1), v]
                for u in T.unroll(1, U):
                    for mi in T.unroll(MT):
                        for v in T.vectorized(RC):
                            acc[0, mi, v] = acc[0, mi, v] + acc[u, mi, v]
                for mi in T.unroll(MT):
                    for r in T.unroll(R):
                        row[mi, r] = bias[io * R + r]
                        for c in T.unroll(C):
                            row[mi, r] = row[mi, r] + acc[0, mi, r * C + c]
                        if RELU:
                            Y[mo * MT + mi, io * R + r] = T.max(row[mi, r], T.float32(0))
                        else:
                            Y[mo * MT + mi, io * R + r] = row[mi, r]

    return bsr_matmul_blockvec
