"""Convolution and matmul weights stored as column panels, each contiguous over the reduction axes.

An NHWC conv's HWIO weight is read by the default schedule one register tile of output channels at a time:
32 floats (128 bytes) per input channel, then a jump of a whole weight row (2 KB for 512 channels) to the
next. Hardware prefetchers do not follow such a walk across pages, so a weight that does not stay in cache
(every ResNet-50 layer once the model's 100 MB of weights have gone through, and the 9 MB 3x3 convs of its
last stage even when hot) is read at cache-miss latency. `pack_conv_weights` stores the weight at compile
time as [O / P, KH, KW, I, P] panels, P the schedule's column tile, so the reduction walks each panel
front to back. The conv itself is TOPI's (the one legalization would emit), reading its HWIO filter through
an index map that the schedule inlines: same arithmetic, same summation order.

A matmul by a constant [k, n] weight over more than one row (a batch-8 fully connected layer, a
transformer's projections) is stored the same way, as [n / P, k, P] panels, and computed by `packed_matmul`
(which the wasm backend's dense packing uses too). Its weights jumped a whole row per reduction step as well:
AlexNet's 9216 x 4096 layer at batch 8 took 14.3 ms (10.6 GB/s of weights) against 4.7 ms packed, the two
following ones 5.8 + 1.0 -> 2.1 + 0.7 ms; a 384-wide transformer's projections at 128 tokens ran at 91 -> 96
GMAC/s.
Batch-1 matmuls are packed earlier, by `layout.pack_gemv_weights`.

Runs in the lowering pipeline after the sparse rewrite, which matches the plain conv2d ops.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax, te, topi
from tvm.relax.expr_functor import PyExprMutator, mutator

from .cpu_schedule import column_tile
from .frontend import rewrite_relax_functions
from .matmul_pad import constant_weight
from .sparse.rewrite import static_shape


def _conv_with_packed_weight(x: te.Tensor, panels: te.Tensor, strides, padding, dilation,
                             out_dtype: str | None) -> te.Tensor:
    n_panels, kh, kw, ci, p = (int(d) for d in panels.shape)
    hwio = te.compute((kh, kw, ci, n_panels * p), lambda h, w, i, o: panels[o // p, h, w, i, o % p],
                      name="weight_panels")
    return topi.nn.conv(x, hwio, strides, padding, dilation, 1, "NHWC", "HWIO", out_dtype)


def packed_matmul(x: te.Tensor, wp: te.Tensor) -> te.Tensor:
    """`x[..., K] @ W[K, N]` with W given packed as `wp[N / c, K, c]` (also the wasm backend's dense matmul)."""
    nb, k_ext, c = (int(d) for d in wp.shape)
    k = te.reduce_axis((0, k_ext), name="k")
    return te.compute((*x.shape[:-1], nb * c),
                      lambda *i: te.sum(x[(*i[:-1], k)] * wp[i[-1] // c, k, i[-1] % c], axis=k),
                      name="packed_matmul")


def dtype_or_none(dtype) -> str | None:
    return None if str(dtype) in ("", "void", "None") else str(dtype)


def nhwc_conv_weight(call: relax.Call, groups: int | None = 1) -> tvm.runtime.Tensor | None:
    """The HWIO float32 constant weight of an NHWC `relax.nn.conv2d` with `groups` groups (None: any number),
    or None for any other call."""
    if call.op != tvm.ir.Op.get("relax.nn.conv2d") or not isinstance(call.args[1], tvm.ir.Constant):
        return None
    attrs = call.attrs
    if (str(attrs.data_layout), str(attrs.kernel_layout)) != ("NHWC", "HWIO") or \
            groups not in (None, int(attrs.groups)):
        return None
    w = call.args[1].value
    return w if str(attrs.out_layout) in ("NHWC", "") and w.dtype == "float32" else None


@mutator
class _ConvWeightPacker(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target):
        super().__init__(mod)
        self.target = target

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if (w := constant_weight(call)) is not None:
            return self._pack_matmul(call, w)
        w = nhwc_conv_weight(call)
        if w is None or call.ty.shape is None:
            return call
        attrs = call.attrs
        out_shape = [int(d) for d in call.ty.shape.values]
        kh, kw, ci, co = (int(d) for d in w.shape)
        p = column_tile(out_shape[2], co, self.target)
        if co % p or co == p:
            return call  # a single panel is the HWIO weight already
        panels = np.ascontiguousarray(w.numpy().reshape(kh, kw, ci, co // p, p).transpose(3, 0, 1, 2, 4))
        return self.builder_.call_te(_conv_with_packed_weight, call.args[0], relax.const(panels),
                                     [int(s) for s in attrs.strides], [int(s) for s in attrs.padding],
                                     [int(s) for s in attrs.dilation], dtype_or_none(attrs.out_dtype),
                                     primfunc_name_hint="conv2d")

    def _pack_matmul(self, call: relax.Call, w: tvm.runtime.Tensor) -> relax.Expr:
        shape = static_shape(call.args[0])
        if (shape is None or len(shape) < 2 or math.prod(shape[:-1]) == 1
                or dtype_or_none(call.attrs.out_dtype) not in (None, "float32")):
            return call  # (batch-1 matmuls are packed by `layout.pack_gemv_weights`)
        k, n = (int(d) for d in w.shape)
        p = column_tile(shape[-2], n, self.target)
        if n % p or n == p:
            return call
        panels = np.ascontiguousarray(w.numpy().reshape(k, n // p, p).transpose(1, 0, 2))
        return self.builder_.call_te(packed_matmul, call.args[0], relax.const(panels),
                                     primfunc_name_hint="matmul")


def pack_conv_weights(target: tvm.target.Target) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="PackConvWeights")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_relax_functions(mod, _ConvWeightPacker(mod, target))

    return _pass
