"""One vectorized im2col kernel for the KxK convolutions the sparse rewrite turns into matmuls (wasm).

The sparse rewrite feeds a KxK conv to its matmul kernel as rows built from Relax ops: `pad`, one
`strided_slice` per kernel tap, `concat` along channels and a `reshape` to [N*OH*OW, KH*KW*C]. Fused and
legalized, that is one kernel whose every element picks its tap through a chain of selects: in V8's wasm
engine it took longer than the sparse matmul it feeds (8.7 us vs 5.3 us for a 32-channel 8x8 conv at batch 1,
170 us vs 88 us at batch 16). `fast_im2col` matches that chain and replaces it by `im2col_nhwc`: per output
row and tap, one bounds test and a vector copy of the C channels (or zeros in the padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.script import tirx as T

from .pack import _static


@dataclass(frozen=True)
class Im2col:
    """Geometry of one NHWC im2col: input [N, H, W, C] (before padding), output [N*OH*OW, KH*KW*C]."""

    n: int
    h: int
    w: int
    c: int
    kh: int
    kw: int
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pad: tuple[int, int]  # top, left
    out: tuple[int, int]  # OH, OW


def im2col_kernel(g: Im2col) -> tirx.PrimFunc:
    """The scheduled PrimFunc `(X[N, H, W, C], Y[N*OH*OW, KH*KW*C])` for `g`."""
    N, H, W, C, KH, KW = g.n, g.h, g.w, g.c, g.kh, g.kw
    (SH, SW), (DH, DW), (TOP, LEFT), (OH, OW) = g.stride, g.dilation, g.pad, g.out
    M = N * OH * OW

    @T.prim_func(private=True, check_well_formed=False)
    def im2col_nhwc(X: T.Buffer((N, H, W, C), "float32"), Y: T.Buffer((M, KH * KW * C), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        with T.sblock("root"):  # the root block Relax's analyses expect of every PrimFunc
            for m in T.serial(M):
                for i in T.serial(KH):
                    for j in T.serial(KW):
                        ih: T.let[T.int32] = m // OW % OH * SH - TOP + i * DH
                        iw: T.let[T.int32] = m % OW * SW - LEFT + j * DW
                        if 0 <= ih and ih < H and 0 <= iw and iw < W:
                            for c in T.vectorized(C):
                                Y[m, (i * KW + j) * C + c] = X[m // (OH * OW), ih, iw, c]
                        else:
                            for c in T.vectorized(C):
                                Y[m, (i * KW + j) * C + c] = T.float32(0)

    return im2col_nhwc


def _ints(expr: relax.Expr) -> tuple[int, ...] | None:
    """The integers of a static shape or of a tuple of integer constants (slice arguments)."""
    values = getattr(expr, "values", None)
    if values is None and isinstance(expr, relax.Tuple):
        values = list(expr.fields)
    if values is None or not all(isinstance(v, tirx.IntImm) for v in values):
        return None
    return tuple(int(v) for v in values)


def _call(expr: relax.Expr, name: str) -> relax.Call | None:
    ok = isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name
    return expr if ok else None


@mutator
class _Im2colRewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod_ = mod

    def transform(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                new = self.visit_expr(func)
                self.builder_.update_func(gv, relax.analysis.remove_all_unused(new))
        return self.builder_.get()

    def _bound(self, expr: relax.Expr) -> relax.Expr:
        if isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            return expr if bound is None else bound
        return expr

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if _call(call, "relax.reshape") is None:
            return call
        match = self._match(call)
        if match is None:
            return call
        source, geometry = match
        gv = self.builder_.add_func(im2col_kernel(geometry), "im2col_nhwc")
        return relax.call_tir(gv, [source], call.ty)

    def _match(self, reshape: relax.Call) -> tuple[relax.Expr, Im2col] | None:
        """(NHWC input, geometry) when `reshape` is `reshape(concat(strided_slice(pad?(x))...), [M, K])`."""
        concat = _call(self._bound(reshape.args[0]), "relax.concat")
        rows = _static(reshape.ty.shape) if isinstance(reshape.ty, relax.TensorType) else None
        if concat is None or rows is None or len(rows) != 2 or int(concat.attrs.axis) not in (3, -1):
            return None
        pieces = [_call(self._bound(f), "relax.strided_slice") for f in self._bound(concat.args[0]).fields]
        if not pieces or any(p is None for p in pieces):
            return None
        padded = pieces[0].args[0]
        shape = _static(padded.ty.shape) if isinstance(padded.ty, relax.TensorType) else None
        if shape is None or len(shape) != 4 or str(padded.ty.dtype) != "float32":
            return None
        slices = []
        for p in pieces:
            axes, begin, end, strides = (_ints(a) for a in p.args[1:5])
            if not p.args[0].same_as(padded) or axes != (1, 2) or None in (begin, end, strides):
                return None
            slices.append((begin, strides))
        return self._geometry(padded, shape, slices, _static(pieces[0].ty.shape), rows)

    def _geometry(self, padded, shape, slices, piece_shape, rows) -> tuple[relax.Expr, Im2col] | None:
        """The geometry the slices describe, if they are the taps of one convolution in (row, column) order."""
        begins = [b for b, _ in slices]
        strides = {s for _, s in slices}
        tops = sorted({b[0] for b in begins})
        lefts = sorted({b[1] for b in begins})
        kh, kw = len(tops), len(lefts)
        if len(strides) != 1 or piece_shape is None or begins != [(t, left) for t in tops for left in lefts]:
            return None
        dh = tops[1] - tops[0] if kh > 1 else 1
        dw = lefts[1] - lefts[0] if kw > 1 else 1
        if tops != [tops[0] + i * dh for i in range(kh)] or lefts != [lefts[0] + j * dw for j in range(kw)]:
            return None
        n, _, _, c = shape
        oh, ow = piece_shape[1], piece_shape[2]
        if rows != (n * oh * ow, kh * kw * c):
            return None
        source, (top, left) = padded, (0, 0)
        pad = _call(self._bound(padded), "relax.nn.pad")
        if pad is not None:
            width = [int(v) for v in pad.attrs.pad_width]
            if (str(pad.attrs.pad_mode) != "constant" or float(pad.attrs.pad_value) != 0.0
                    or any(width[:2]) or any(width[6:])):
                return None
            source, top, left = pad.args[0], width[2], width[4]
        in_shape = _static(source.ty.shape)
        if in_shape is None:
            return None
        (sh, sw), = strides
        return source, Im2col(n, in_shape[1], in_shape[2], c, kh, kw, (sh, sw), (dh, dw),
                              (top - tops[0], left - lefts[0]), (oh, ow))


def fast_im2col(mod: tvm.IRModule) -> tvm.IRModule:
    """`mod` with every pad + strided-slice + concat + reshape im2col chain computed by `im2col_nhwc`."""
    return _Im2colRewriter(mod).transform()


__all__ = ["Im2col", "fast_im2col", "im2col_kernel"]
