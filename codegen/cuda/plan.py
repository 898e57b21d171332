"""Per-layer kernel choice for GPUs and the Relax rewrite that applies it.

Nothing can be timed on a build machine without a GPU, so the choice is a rule over the weight's structure
(`choose_kernel`): BSR when at least `BSR_MIN_SPARSITY` of some block shape's blocks are empty (a SIMT kernel
that skips them beats dense tensor cores only at high sparsity), else 2:4 on the sparse tensor cores when
every group of four along K holds at most two nonzeros, else dense (dlight schedules). Matched layers are the
constant-weight `matmul`s (Gemm, MatMul; any input rank) and groups=1 `conv2d`s (im2col into a matmul, as
the CPU rewrite in `codegen.sparse.rewrite` does, whose geometry helper is reused). Each candidate layer
gets one record `{layer, op, kernel, shape: [M, K, N], sparsity, ...}` - what the manifest shows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import tvm
from onnx import numpy_helper
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..frontend import rewrite_relax_functions
from ..sparse.kernels import BSRMatrix
from ..sparse.rewrite import ConvGeometry, const_value, layer_names, static_shape, weight_key
from .kernels import Sparse24Matrix, bsr_matmul_gpu, holds_2_4, schedule_bsr_gpu, sparse24_matmul

BSR_MIN_SPARSITY = 0.75  # fraction of empty blocks from which the BSR kernel is chosen
BSR_BLOCKS: tuple[tuple[int, int], ...] = ((16, 1), (8, 4), (4, 4), (1, 4), (4, 1))
FLOAT_TYPES = ("float32", "float16", "bfloat16")


def _best_bsr(w2: np.ndarray) -> tuple[tuple[int, int], float] | None:
    """The block shape with the most empty blocks, and that fraction."""
    n, k = w2.shape
    best = None
    for r, c in BSR_BLOCKS:
        if n % r or k % c:
            continue
        blocks = np.any(w2.reshape(n // r, r, k // c, c) != 0, axis=(1, 3))
        empty = 1.0 - float(blocks.mean())
        if best is None or empty > best[1]:
            best = ((r, c), empty)
    return best


def choose_kernel(w2: np.ndarray) -> dict[str, Any]:
    """{"kernel": "bsr" | "2:4" | "dense", "reason", "block"?} for a weight seen as [N, K]."""
    bsr = _best_bsr(w2)
    if bsr is not None and bsr[1] >= BSR_MIN_SPARSITY:
        return {"kernel": "bsr", "block": list(bsr[0]), "block_sparsity": round(bsr[1], 4),
                "reason": f"{bsr[1]:.0%} of {bsr[0][0]}x{bsr[0][1]} blocks empty (>= {BSR_MIN_SPARSITY:.0%})"}
    if np.count_nonzero(w2) < w2.size and holds_2_4(w2):
        return {"kernel": "2:4", "reason": "2:4 along K: sparse tensor cores"}
    return {"kernel": "dense", "reason": "no 2:4 pattern, block sparsity below the BSR threshold"}


def rounded_layer_names(model: onnx.ModelProto, dtype: str) -> dict[str, str]:
    """`layer_names` for weights as they appear after conversion to `dtype` (keys hash the values)."""
    if dtype == "float32":
        return layer_names(model)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for init in copy.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype == np.float32:
            init.CopyFrom(numpy_helper.from_array(a.astype(np.float16).astype(np.float32), init.name))
    return layer_names(copy)


@mutator
class _GpuSparseRewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, names: dict[str, str], op_dtype: str):
        super().__init__(mod)
        self.mod_ = mod
        self.names = names
        self.op_dtype = op_dtype
        self.records: list[dict[str, Any]] = []

    def transform(self) -> tvm.IRModule:
        return rewrite_relax_functions(self.mod_, self)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op):
            return call
        handler = {"relax.matmul": self._matmul, "relax.nn.conv2d": self._conv}.get(call.op.name)
        return call if handler is None else handler(call)

    def _record(self, op: str, w2: np.ndarray, m: int, choice: dict[str, Any]) -> dict[str, Any]:
        n, k = w2.shape
        name = self.names.get(weight_key(w2), f"{op}_{len(self.records)}")
        rec = {"layer": name, "op": op, "shape": [int(m), int(k), int(n)],
               "sparsity": round(1.0 - np.count_nonzero(w2) / w2.size, 4), **choice}
        self.records.append(rec)
        return rec

    def _sparse(self, x2d: relax.Expr, w2: np.ndarray, m: int, kernel: str, rec: dict[str, Any],
                out_dtype: str) -> relax.Expr:
        """`call_tir` of the chosen kernel on the [m, K] rows; the [m, N] result in `out_dtype`."""
        bb = self.builder_
        n = w2.shape[0]
        x_dtype = x2d.ty.dtype
        if kernel == "2:4":
            mat = Sparse24Matrix.from_dense(w2, self.op_dtype)
            func = sparse24_matmul(m, mat, x_dtype, out_dtype, self.op_dtype)
            gv = bb.add_func(func, f"sparse24_matmul_{len(self.records)}")
            values = relax.const(mat.values)
            if self.op_dtype == "bfloat16":  # numpy has no bfloat16: converted by TVM, folded at compile time
                values = bb.emit(relax.op.astype(values, "bfloat16"))
            args = [x2d, values, relax.const(mat.meta)]
            return relax.call_tir(gv, args, relax.TensorType((m, n), out_dtype))
        block = tuple(rec["block"])
        mat = BSRMatrix.from_dense(w2.astype(np.float32), block)
        w_dtype = "float16" if self.op_dtype == "float16" else "float32"
        func = schedule_bsr_gpu(bsr_matmul_gpu(m, mat.shape, block, mat.nnzb, x_dtype, w_dtype))
        gv = bb.add_func(func, f"bsr_matmul_{len(self.records)}")
        consts = [relax.const(mat.data.astype(w_dtype)), relax.const(mat.indices), relax.const(mat.indptr)]
        y = relax.call_tir(gv, [x2d, *consts], relax.TensorType((m, n), "float32"))
        return y if out_dtype == "float32" else relax.op.astype(bb.emit(y), out_dtype)

    def _matmul(self, call: relax.Call) -> relax.Expr:
        x, wexpr = call.args
        wt = const_value(wexpr, self.lookup_binding)  # [K, N]
        xshape = static_shape(x)
        if wt is None or wt.ndim != 2 or xshape is None or len(xshape) < 2 or x.ty.dtype not in FLOAT_TYPES:
            return call
        k, n = wt.shape
        m = int(np.prod(xshape[:-1]))
        w2 = np.ascontiguousarray(wt.T.astype(np.float32))
        rec = self._record("MatMul", w2, m, choose_kernel(w2))
        if rec["kernel"] == "dense":
            return call
        x2d = x if len(xshape) == 2 else self.builder_.emit(relax.op.reshape(x, (m, k)))
        y = self._sparse(x2d, w2, m, rec["kernel"], rec, call.ty.dtype)
        return y if len(xshape) == 2 else relax.op.reshape(self.builder_.emit(y), (*xshape[:-1], n))

    def _conv(self, call: relax.Call) -> relax.Expr:
        x, wexpr = call.args
        a = call.attrs
        w = const_value(wexpr, self.lookup_binding)
        xshape = static_shape(x)
        if w is None or xshape is None or x.ty.dtype not in FLOAT_TYPES or int(a.groups) != 1:
            return call
        data_layout, kernel_layout = str(a.data_layout), str(a.kernel_layout)
        if sorted(kernel_layout) != sorted("OIHW") or data_layout not in ("NCHW", "NHWC") or \
                (str(a.out_layout) or data_layout) != data_layout:
            return call
        oihw = np.transpose(w, [kernel_layout.index(ch) for ch in "OIHW"])
        geom = ConvGeometry.of(xshape, data_layout, oihw.shape, a)
        if geom is None:
            return call
        w2 = np.ascontiguousarray(oihw.transpose(0, 2, 3, 1).reshape(oihw.shape[0], -1).astype(np.float32))
        rec = self._record("Conv", w2, geom.m, choose_kernel(w2))
        if rec["kernel"] == "dense":
            return call
        rows = geom.emit_rows(self.builder_, x)
        y = self.builder_.emit(self._sparse(rows, w2, geom.m, rec["kernel"], rec, call.ty.dtype))
        return geom.emit_output(self.builder_, y, oihw.shape[0])


def rewrite_gpu_sparse(mod: tvm.IRModule, names: dict[str, str],
                       op_dtype: str = "float16") -> tuple[tvm.IRModule, list[dict[str, Any]]]:
    """Replace sparse constant-weight matmuls/convs by `call_tir`s of the GPU kernels; one record per layer.
    `op_dtype` is the tensor-core operand type of the 2:4 kernel (float16 or bfloat16)."""
    mod = relax.transform.FoldConstant()(mod)  # Gemm's weight transpose becomes a plain constant
    rewriter = _GpuSparseRewriter(mod, names, op_dtype)
    new_mod = rewriter.transform()
    if any(r["kernel"] != "dense" for r in rewriter.records):
        new_mod = relax.transform.DeadCodeElimination()(new_mod)
    return new_mod, rewriter.records
