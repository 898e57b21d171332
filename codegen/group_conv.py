"""Grouped convolutions with few channels per group, computed as shifted depthwise sums.

A grouped conv (ResNeXt's 3x3 convs: 32 groups of 4 to 32 channels) whose groups have as many input as
output channels computes output channel c from input channels g*k .. g*k + k - 1, g = c // k, k channels per
group. Vectorized over c, that input index is a gather (each lane's group start), which LLVM scalarizes:
ResNeXt-50's 56x56x128 conv in groups of 4 ran at 9 GFLOP/s. Written with the shift d = j - c % k,

    y[c] = sum_{kh, kw, d} x[c + d] * w'[kh, kw, d, c],    w'[., ., d, c] = w[., ., c % k + d, c] (0 outside),

every read is a contiguous vector at a constant offset from c, like a depthwise conv's, and the default
contraction schedule vectorizes it. The 2k - 1 shifts cost (2k - 1) / k as many multiply-adds as the grouped
conv; the zero-padded input (k - 1 channels on each side) keeps every shifted read in bounds.

`rewrite_grouped_convs(target)` takes the NHWC float32 convs with a constant weight, more than one group, and
equal input and output channels per group, where the default schedule's vectors would span several groups
and no vector of `cpu_schedule.group_lanes` fits in one (depthwise convs, one channel per group, are
vectorized as they are; with AVX-512, groups of 8 are computed with 8-lane vectors).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te
from tvm.relax.expr_functor import PyExprMutator, mutator

from .conv_pack import dtype_or_none, nhwc_conv_weight
from .cpu_schedule import column_tile, group_lanes, vector_lanes, vector_width
from .frontend import mark_out_ewise_fusable, rewrite_relax_functions

# Measured at batch 1, 2 threads, AVX-512 (16 lanes), grouped against shifted: ResNeXt-50's 3x3 convs at
# 56x56x128 in groups of 4 3064 / 713 us; 28x28x256 in groups of 8 3032 / 457 us (25.4 / 4.4 ms at batch 8).
# Where each vector of the schedule lies within one group, the grouped conv vectorizes as it is: 14x14x512
# in groups of 16 181 / 465 us, 7x7x1024 in groups of 32 228 / 484 us, and RegNet's 28x28x56 in groups of 8
# (computed with 8-lane vectors, 56 not being a multiple of 16) 50 / 101 us. So the rewrite takes the convs
# whose vectors span several groups. Groups of 8 later took 8-lane vectors too (`group_lanes`): ResNeXt-50 at
# batch 8 388 -> 381 ms.


def shifted_weight(w_hwio: np.ndarray) -> np.ndarray:
    """Grouped HWIO weight [KH, KW, k, C] -> [KH, KW, 2k - 1, C], entry d + k - 1 of column c holding the
    weight of input channel c + d (zero where that channel is outside c's group)."""
    kh, kw, k, c = w_hwio.shape
    out = np.zeros((kh, kw, 2 * k - 1, c), dtype=w_hwio.dtype)
    pos = np.arange(c) % k
    for j in range(k):
        out[:, :, j - pos + k - 1, np.arange(c)] = w_hwio[:, :, j, :]
    return out


def _shifted_conv(x: te.Tensor, w: te.Tensor, out_shape: list[int], strides: list[int],
                  dilation: list[int], out_dtype: str | None) -> te.Tensor:
    """`x`: the input padded spatially and by k - 1 channels on each side; `w`: `shifted_weight`."""
    kh, kw, shifts, _ = (int(d) for d in w.shape)
    rh, rw, rd = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw"), te.reduce_axis((0, shifts), "rd")
    dtype = out_dtype or x.dtype

    def y(n, h, col, c):
        value = x[n, h * strides[0] + rh * dilation[0], col * strides[1] + rw * dilation[1], c + rd]
        return te.sum(value.astype(dtype) * w[rh, rw, rd, c].astype(dtype), axis=[rh, rw, rd])

    return te.compute(out_shape, y, name="group_conv2d_shifted")


def grouped_conv_weight(call: relax.Call, target: tvm.target.Target) -> np.ndarray | None:
    """The grouped HWIO weight of a conv this pass rewrites on `target`, or None."""
    w = nhwc_conv_weight(call, groups=None)
    groups = int(call.attrs.groups) if w is not None else 1
    if groups == 1 or call.ty.shape is None:
        return None
    k, c_out = int(w.shape[2]), int(w.shape[3])
    if k == 1 or c_out != groups * k:
        return None
    out_w = int(call.ty.shape.values[2])
    width = vector_width(column_tile(out_w, c_out, target), vector_lanes(target))
    if (width <= k and k % width == 0) or group_lanes(k, vector_lanes(target)) is not None:
        return None  # each vector lies within one group: the grouped conv vectorizes as it is
    return w.numpy()


@mutator
class _GroupedConvs(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target):
        super().__init__(mod)
        self.target = target
        self.convs: list[relax.GlobalVar] = []

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        w = grouped_conv_weight(call, self.target)
        if w is None:
            return call
        a, k = call.attrs, w.shape[2]
        top, left, bottom, right = (int(p) for p in a.padding)
        x = self.builder_.emit(relax.op.nn.pad(call.args[0], [0, 0, top, bottom, left, right, k - 1, k - 1]))
        y = self.builder_.call_te(
            _shifted_conv, x, relax.const(shifted_weight(w)), [int(d) for d in call.ty.shape.values],
            [int(s) for s in a.strides], [int(d) for d in a.dilation], dtype_or_none(a.out_dtype),
            primfunc_name_hint="group_conv2d_shifted")
        self.convs.append(y.args[0])
        return y


def rewrite_grouped_convs(target: tvm.target.Target) -> tvm.transform.Pass:
    """Rewrite the eligible grouped convs (see the module docstring), marked kOutEWiseFusable."""

    @tvm.transform.module_pass(opt_level=0, name="GroupedConvShifts")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _GroupedConvs(mod, target)
        return mark_out_ewise_fusable(rewrite_relax_functions(mod, rewriter), rewriter.convs)

    return _pass
