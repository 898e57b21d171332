"""Sparse x dense TIR kernels for NVIDIA GPUs: `Y[M, N] = X[M, K] @ W[N, K]^T` with W a compile-time constant.

- `sparse24_matmul`: W in 2:4 form (at most two nonzeros in every four consecutive elements along K) on the
  sparse tensor cores (`mma.sp.m16n8k32`, fp16/bf16 operands, fp32 accumulation). The kernel computes
  `Y^T = W @ X^T`: W is the sparse A operand (16 rows of N per MMA), X^T the dense B operand (8 batch rows per
  MMA). `Sparse24Matrix` compresses W at compile time into its kept values and 2-bit metadata, already laid
  out in the order each lane of a warp hands them to the instruction (one 16-byte load of values and one word
  of metadata per lane, tile and K step), so the kernel reads no index at run time. Rows are padded to whole
  tiles and K to whole steps with zeros; the batch is guarded.
- `bsr_matmul_gpu`: W in BSR form for high block sparsity, one thread per output (SIMT, fp32 accumulation).
  It is written as plain TIR blocks - the same function runs on the CPU (tests check its index logic there)
  - and `schedule_bsr_gpu` binds its loops to GPU threads.

The fragment layout of `mma.sp.m16n8k32` (A element, B element and metadata word per lane) is the one of TVM's
own `ptx_mma_sp` tests: lane `t`, register element `i` holds compressed A[(i % 4) // 2 * 8 + t // 4,
i // 4 * 8 + t % 4 * 2 + i % 2], B[i // 2 * 8 + t % 4 * 2 + i % 2, t // 4], and reads the metadata word of
row group `t // 4`, K half `t % 2`; accumulator element `v` is C[v // 2 * 8 + t // 4, t % 4 * 2 + v % 2].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm.script import tirx as T

TILE_ROWS = 16  # rows of W per MMA (the sparse A operand's M)
K_STEP = 32  # reduction per MMA (16 kept values of 32)
WARP_TILES = 2  # 16-row tiles of W per warp
WARPS = 4  # warps per thread block, each on its own rows of W
ROWS_PER_BLOCK = TILE_ROWS * WARP_TILES * WARPS


def _lane_a(lane: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, compressed column) of the A tile that register element `i` of `lane` holds."""
    return (i % 4) // 2 * 8 + lane // 4, i // 4 * 8 + lane % 4 * 2 + i % 2


def holds_2_4(w2: np.ndarray) -> bool:
    """At most two nonzeros in every group of four consecutive elements along K (K padded with zeros)."""
    n, k = w2.shape
    groups = np.pad(w2, ((0, 0), (0, -k % 4))).reshape(n, -1, 4)
    return bool(np.all(np.count_nonzero(groups, axis=2) <= 2))


@dataclass(frozen=True)
class Sparse24Matrix:
    """W [N, K] compressed for `mma.sp`: `values[tile, step, lane, 8]` and `meta[tile, step, 16]` (uint32)."""

    values: np.ndarray
    meta: np.ndarray
    shape: tuple[int, int]  # (N, K) of the dense weight

    @classmethod
    def from_dense(cls, w2: np.ndarray, dtype: str = "float16") -> Sparse24Matrix:
        if not holds_2_4(w2):
            raise ValueError("weight is not 2:4 sparse along K")
        n, k = w2.shape
        w = np.pad(w2.astype(np.float32), ((0, -n % ROWS_PER_BLOCK), (0, -k % K_STEP)))
        rows, cols = w.shape
        groups = w.reshape(rows, cols // 4, 4)
        # The two kept positions of each group, ascending: its nonzeros first, then zero slots to fill up.
        order = np.argsort(groups == 0, axis=2, kind="stable")[:, :, :2]
        idx = np.sort(order, axis=2)  # [rows, groups, 2]
        kept = np.take_along_axis(groups, idx, axis=2)  # [rows, groups, 2]
        tiles, steps = rows // TILE_ROWS, cols // K_STEP
        kept = kept.reshape(tiles, TILE_ROWS, steps, 16).transpose(0, 2, 1, 3)  # [tile, step, 16 rows, 16]
        idx = idx.reshape(tiles, TILE_ROWS, steps, 2, 8).transpose(0, 2, 1, 3, 4)  # [tile, step, row, half, 8]
        lane, i = np.meshgrid(np.arange(32), np.arange(8), indexing="ij")
        r, c = _lane_a(lane, i)
        values = kept[:, :, r, c]  # [tile, step, 32, 8]
        shifts = 2 * np.arange(8, dtype=np.uint32)
        bits = (idx.astype(np.uint32) << shifts).sum(axis=-1, dtype=np.uint32)  # [tile, step, row, half]
        words = bits[:, :, :8] | (bits[:, :, 8:] << np.uint32(16))  # rows g and g + 8 in one word
        meta = words.reshape(tiles, steps, 16)  # word g * 2 + half
        np_dtype = "float16" if dtype == "float16" else "float32"  # bfloat16 is converted by TVM
        return cls(np.ascontiguousarray(values, dtype=np_dtype), np.ascontiguousarray(meta), (n, k))

    @property
    def tiles(self) -> int:
        return int(self.values.shape[0])

    @property
    def steps(self) -> int:
        return int(self.values.shape[1])

    def to_dense(self) -> np.ndarray:
        """Decompress by the instruction's rules: which lane feeds which value and which metadata bits."""
        tiles, steps = self.tiles, self.steps
        out = np.zeros((tiles, TILE_ROWS, steps, K_STEP), np.float32)
        for lane in range(32):
            for i in range(8):
                r, c = _lane_a(np.int64(lane), np.int64(i))
                # Lanes 4g and 4g + 1 hand in the words of row group g for K halves 0 and 1.
                word = self.meta[:, :, lane // 4 * 2 + c // 8]
                pos = (word >> np.uint32(2 * ((r // 8) * 8 + c % 8))) & np.uint32(3)
                k = ((c // 2) * 4 + pos).astype(np.int64)
                np.put_along_axis(out[:, r], k[:, :, None], self.values[:, :, lane, i, None].astype(np.float32),
                                  axis=2)
        dense = out.reshape(tiles * TILE_ROWS, steps * K_STEP)
        n, k = self.shape
        return dense[:n, :k]


def sparse24_matmul(m: int, w: Sparse24Matrix, x_dtype: str, out_dtype: str,
                    op_dtype: str = "float16") -> tvm.tirx.PrimFunc:
    """The PrimFunc `(X[M, K], values, meta, Y[M, N])`: `Y = X @ W^T` on the sparse tensor cores."""
    M = m
    N, K = w.shape
    NT, KS = w.tiles, w.steps
    TN, WP = WARP_TILES, WARPS
    TM = 1 if M <= 8 else 2 if M <= 16 else 4  # 8-row batch tiles per warp
    MB = (M + 8 * TM - 1) // (8 * TM)
    op = op_dtype
    mma = (T.ptx.mma.sp.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 if op == "float16"
           else T.ptx.mma.sp.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32)

    @T.prim_func(private=True, s_tir=True)
    def sparse24_matmul(X: T.Buffer((M, K), x_dtype), values: T.Buffer((NT, KS, 32, 8), op),
                        meta: T.Buffer((NT, KS, 16), "uint32"), Y: T.Buffer((M, N), out_dtype)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "sparsecc.sparse_kernel": True})
        bx = T.env_thread("blockIdx.x")
        by = T.env_thread("blockIdx.y")
        ty = T.env_thread("threadIdx.y")
        tx = T.env_thread("threadIdx.x")
        T.launch_thread(bx, NT // (TN * WP))
        T.launch_thread(by, MB)
        T.launch_thread(ty, WP)
        T.launch_thread(tx, 32)
        a = T.decl_buffer([TN * 8], op, scope="local")
        b = T.decl_buffer([TM * 8], op, scope="local")
        acc = T.decl_buffer([TN * TM * 4], "float32", scope="local")
        e = T.decl_buffer([TN], "uint32", scope="local")
        a_words = T.decl_buffer([TN * 4], "uint32", data=a.data, scope="local")
        b_words = T.decl_buffer([TM * 4], "uint32", data=b.data, scope="local")
        for i in T.unroll(TN * TM * 4):
            acc[i] = T.float32(0)
        for ks in T.serial(KS):
            for tn in T.unroll(TN):
                for v in T.vectorized(8):
                    a[tn * 8 + v] = values[(bx * WP + ty) * TN + tn, ks, tx, v]
                e[tn] = meta[(bx * WP + ty) * TN + tn, ks, tx // 4 * 2 + tx % 2]
            for tm in T.unroll(TM):
                for v in T.unroll(8):
                    b[tm * 8 + v] = T.if_then_else(
                        by * TM * 8 + tm * 8 + tx // 4 < M and ks * 32 + v // 2 * 8 + tx % 4 * 2 + v % 2 < K,
                        T.Cast(op, X[T.min(by * TM * 8 + tm * 8 + tx // 4, M - 1),
                                     T.min(ks * 32 + v // 2 * 8 + tx % 4 * 2 + v % 2, K - 1)]),
                        T.Cast(op, 0))
            for tn in T.unroll(TN):
                for tm in T.unroll(TM):
                    mma(acc[(tn * TM + tm) * 4 + 0], acc[(tn * TM + tm) * 4 + 1],
                        acc[(tn * TM + tm) * 4 + 2], acc[(tn * TM + tm) * 4 + 3],
                        a_words[tn * 4 + 0], a_words[tn * 4 + 1], a_words[tn * 4 + 2], a_words[tn * 4 + 3],
                        b_words[tm * 4 + 0], b_words[tm * 4 + 1], b_words[tm * 4 + 2], b_words[tm * 4 + 3],
                        acc[(tn * TM + tm) * 4 + 0], acc[(tn * TM + tm) * 4 + 1],
                        acc[(tn * TM + tm) * 4 + 2], acc[(tn * TM + tm) * 4 + 3],
                        e[tn], 0)
        for tn in T.unroll(TN):
            for tm in T.unroll(TM):
                for v in T.unroll(4):
                    if (((bx * WP + ty) * TN + tn) * 16 + v // 2 * 8 + tx // 4 < N
                            and by * TM * 8 + tm * 8 + tx % 4 * 2 + v % 2 < M):
                        Y[by * TM * 8 + tm * 8 + tx % 4 * 2 + v % 2,
                          ((bx * WP + ty) * TN + tn) * 16 + v // 2 * 8 + tx // 4] = T.Cast(
                            out_dtype, acc[(tn * TM + tm) * 4 + v])

    return sparse24_matmul


def bsr_matmul_gpu(m: int, shape: tuple[int, int], block: tuple[int, int], nnzb: int, x_dtype: str,
                   w_dtype: str) -> tvm.tirx.PrimFunc:
    """The PrimFunc `(X[M, K], data[nnzb, R, C], indices, indptr, Y[M, N] float32)`: `Y = X @ W^T`, one
    output per block iteration, accumulated in fp32. Unscheduled: runs as is on CPUs; `schedule_bsr_gpu`
    binds it to GPU threads."""
    M = m
    N, K = shape
    R, C = block
    NB, KB = N // R, K // C

    @T.prim_func(private=True, s_tir=True)
    def bsr_matmul_gpu(X: T.Buffer((M, K), x_dtype), data: T.Buffer((nnzb, R, C), w_dtype),
                       indices: T.Buffer((nnzb,), "int32"), indptr: T.Buffer((NB + 1,), "int32"),
                       Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.noalias": True, "sparsecc.sparse_kernel": True})
        for io, mi, r in T.grid(NB, M, R):
            with T.sblock("bsr"):
                vi, vm, vr = T.axis.remap("SSS", [io, mi, r])
                acc = T.sblock_alloc_buffer((1,), "float32", scope="local")
                acc[0] = T.float32(0)
                for j in range(T.min(T.max(indptr[vi], 0), nnzb), T.min(T.max(indptr[vi + 1], 0), nnzb)):
                    for c in range(C):
                        acc[0] = acc[0] + T.Cast("float32", data[j, vr, c]) * T.Cast(
                            "float32", X[vm, T.min(T.max(indices[j], 0), KB - 1) * C + c])
                Y[vm, vi * R + vr] = acc[0]

    return bsr_matmul_gpu


def schedule_bsr_gpu(func: tvm.tirx.PrimFunc, threads: int = 256) -> tvm.tirx.PrimFunc:
    """One GPU thread per output element; the block rows R are innermost, so a warp reads whole blocks."""
    sch = tvm.s_tir.Schedule(func)
    blk = sch.get_sblock("bsr")
    fused = sch.fuse(*sch.get_loops(blk))
    bx, tx = sch.split(fused, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
