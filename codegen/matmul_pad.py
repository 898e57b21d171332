"""Matmuls by constant weights computed over a whole number of vectors of output columns.

The default schedule vectorizes a matmul's output columns. When their count is not a multiple of the vector
width it falls back to part-width vectors or a masked tail, which TVM scalarizes: a structurally pruned
transformer (MLP widths such as 447 or 241) then ran slower than the dense model it came from. As with conv
channels (`codegen.layout.pad_conv_channels`), such a matmul is computed with zero weight columns added up to
the next multiple, and a slice drops them again; the default schedule computes the slice (and the epilogue
after it) beside each register tile, so the padded result is never written out.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .frontend import rewrite_relax_functions


def padded_columns(columns: int, lanes: int) -> int:
    """The column count a matmul is computed with: a whole number of vectors (unchanged below one vector)."""
    if columns < lanes or columns % lanes == 0:
        return columns
    return -(-columns // lanes) * lanes


def constant_weight(call: relax.Call) -> tvm.runtime.Tensor | None:
    """The [k, n] float32 constant weight of `relax.matmul(x, W)`, or None for any other call."""
    if call.op != tvm.ir.Op.get("relax.matmul") or not isinstance(call.args[1], tvm.ir.Constant):
        return None
    w = call.args[1].value
    return w if len(w.shape) == 2 and w.dtype == "float32" else None


@mutator
class _ColumnPadder(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, lanes: int):
        super().__init__(mod)
        self.lanes = lanes

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        w = constant_weight(call)
        if w is None:
            return call
        k, n = (int(d) for d in w.shape)
        padded = padded_columns(n, self.lanes)
        if padded == n:
            return call
        wide = np.zeros((k, padded), np.float32)
        wide[:, :n] = w.numpy()
        y = self.builder_.emit(relax.op.matmul(call.args[0], relax.const(wide), call.attrs.out_dtype or None))
        axis = len(call.ty.shape.values) - 1
        return relax.op.strided_slice(y, [axis], [0], [n])


def pad_matmul_columns(lanes: int) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="PadMatmulColumns")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_relax_functions(mod, _ColumnPadder(mod, lanes))

    return _pass
