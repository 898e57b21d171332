"""Pre-packed weights for the dense matmuls left after the sparse rewrite (wasm).

The CPU `Contraction` schedule walks one register tile of output columns over the whole reduction, reading
`W[k, n0:n0+cols]` for every k: a stride of N floats between reads. For a 768x3072 layer that is a new page
per multiply-add, which in V8's wasm engine made the layer memory-latency bound (slower than onnxruntime-web,
whose GEMM packs its weights; packing made a 768x3072 layer 2.4x faster at batch 1, 1.8x at batch 16). Packing the constant weight at compile time as
`Wp[N / cols, K, cols]` and computing `Y[.., n] = sum_k X[.., k] * Wp[n // cols, k, n % cols]` makes each
tile's weights one contiguous stream. `cols` is the tile width `Contraction` picks for the layer
(`choose_tile`), so its split of `n` folds the index arithmetic away; bias and activation epilogues still fuse
into the kernel as into a matmul.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..conv_pack import packed_matmul
from ..cpu_schedule import column_tile
from ..frontend import rewrite_relax_functions

MIN_WEIGHT_BYTES = 64 * 1024  # below this the weights stay in cache whatever their layout


def _static(shape) -> tuple[int, ...] | None:
    values = getattr(shape, "values", None)
    if values is None or not all(isinstance(d, tirx.IntImm) for d in values):
        return None
    return tuple(int(d) for d in values)


@mutator
class _Packer(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target):
        super().__init__(mod)
        self.mod_ = mod
        self.target = target

    def transform(self) -> tvm.IRModule:
        return rewrite_relax_functions(self.mod_, self)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul"):
            return call
        x, w = call.args
        xshape = _static(x.ty.shape) if isinstance(x.ty, relax.TensorType) else None
        if not isinstance(w, tvm.ir.Constant) or xshape is None or len(xshape) < 2:
            return call
        wv = w.value.numpy()
        if wv.ndim != 2 or wv.dtype != np.float32 or str(x.ty.dtype) != "float32" or wv.nbytes < MIN_WEIGHT_BYTES:
            return call
        k, n = wv.shape
        m = int(np.prod(xshape[:-1]))
        cols = column_tile(m, n, self.target)
        if n % cols or xshape[-1] != k:
            return call
        wp = np.ascontiguousarray(wv.reshape(k, n // cols, cols).transpose(1, 0, 2))
        return self.builder_.call_te(packed_matmul, x, relax.const(wp), primfunc_name_hint="packed_matmul")


def pack_dense_weights(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """`mod` with every large constant-weight float32 matmul computed from packed weights."""
    return _Packer(mod, target).transform()


__all__ = ["pack_dense_weights"]
