"""Relax-level layout rewrite for CPU targets, run once before legalization.

Convolutions are switched to NHWC activations with HWIO weights: the output channels become the innermost,
contiguous axis that the CPU schedules vectorize, and pooling, concatenation and elementwise ops follow the
layout through Relax's layout inference. Transposes remain only at the graph's boundaries (and around ops
that cannot follow); weight transposes are folded into the constants at compile time.

Output channel counts that no whole vector divides (ShuffleNet's 116 = 4 x 29) would leave the conv
schedules part-width vectors; such convs get zero output channels added up to a whole number of vectors,
and a slice drops them again (`PadConvChannels`: 116 -> 128 costs 10% more multiply-adds for 4x wider
vectors).

Channel shuffles (Reshape, Transpose, Reshape: no layout inference) are moved to NHWC afterwards, with the
splits and concatenations around them (`codegen.shuffle`).

The ONNX frontend emits Clip as opaque `call_tir`s of TOPI maximum/minimum, which layout inference cannot
see through (every ReLU6 would cost two transposes); `ClipToRelaxOps` turns them back into Relax ops first.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, s_tir, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from .frontend import rewrite_relax_functions
from .matmul_pad import pad_matmul_columns
from .shuffle import shuffle_to_nhwc

CONV_LAYOUTS = {"relax.nn.conv2d": ["NHWC", "HWIO"]}


def _scalar_binary_op(func: tirx.PrimFunc) -> str | None:
    """'maximum' / 'minimum' if `func` computes max/min(x, scalar) elementwise in one block, else None."""
    try:
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except Exception:  # noqa: BLE001 - not a schedulable function
        return None
    if len(blocks) != 1:
        return None
    body = sch.get(blocks[0]).body
    if not isinstance(body, tirx.BufferStore):
        return None
    if isinstance(body.value, tirx.Max):
        return "maximum"
    if isinstance(body.value, tirx.Min):
        return "minimum"
    return None


@mutator
class _ClipRewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod = mod

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op != tvm.ir.Op.get("relax.call_tir") or not isinstance(call.args[0], relax.GlobalVar):
            return call
        args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else None
        if args is None or len(args) != 2:
            return call
        x, bound = args
        if not isinstance(bound, tvm.ir.Constant) or len(bound.value.shape) != 0:
            return call
        func = self.mod[call.args[0]]
        kind = _scalar_binary_op(func) if isinstance(func, tirx.PrimFunc) else None
        if kind is None or tuple(x.ty.shape) != tuple(call.ty.shape) or x.ty.dtype != bound.value.dtype:
            return call
        return (relax.op.maximum if kind == "maximum" else relax.op.minimum)(x, bound)


@tvm.transform.module_pass(opt_level=0, name="ClipToRelaxOps")
def clip_to_relax_ops(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    return relax.transform.DeadCodeElimination()(rewrite_relax_functions(mod, _ClipRewriter(mod)))


def padded_channels(channels: int, lanes: int) -> int:
    """The output channel count a conv is computed with: a whole number of vectors. Part-vectors cost as
    many instructions as whole ones (24 channels: three half-width FMAs per row, two when padded to 32)."""
    if channels < lanes or channels % lanes == 0:
        return channels
    return -(-channels // lanes) * lanes


@mutator
class _ChannelPadder(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, lanes: int):
        super().__init__(mod)
        self.lanes = lanes

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op != tvm.ir.Op.get("relax.nn.conv2d") or not isinstance(call.args[1], tvm.ir.Constant):
            return call
        attrs = call.attrs
        if (str(attrs.data_layout), str(attrs.kernel_layout), int(attrs.groups)) != ("NHWC", "HWIO", 1):
            return call
        if str(attrs.out_layout) not in ("NHWC", "") or call.args[1].value.dtype != "float32":
            return call
        w = call.args[1].value.numpy()
        channels = w.shape[3]
        padded = padded_channels(channels, self.lanes)
        if padded == channels:
            return call
        wide = np.zeros(w.shape[:3] + (padded,), w.dtype)
        wide[..., :channels] = w
        conv = relax.op.nn.conv2d(call.args[0], relax.const(wide), attrs.strides, attrs.padding, attrs.dilation,
                                  1, "NHWC", "HWIO", "NHWC", attrs.out_dtype or None)
        return relax.op.strided_slice(self.builder_.emit(conv), [3], [0], [channels])


def pad_conv_channels(lanes: int) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="PadConvChannels")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_relax_functions(mod, _ChannelPadder(mod, lanes))

    return _pass


def layout_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    from .cpu_schedule import vector_lanes

    return [
        relax.transform.FoldConstant(),  # Clip bounds arrive as where(isnan(c), inf, c)
        clip_to_relax_ops,
        relax.transform.DecomposeOpsForInference(),  # batch_norm -> scale/shift, foldable into epilogues
        relax.transform.ConvertLayout(CONV_LAYOUTS),
        shuffle_to_nhwc,  # layout inference stops at channel shuffles' reshapes
        relax.transform.FoldConstant(),
        pad_conv_channels(vector_lanes(target)),
        pad_matmul_columns(vector_lanes(target)),  # pruned widths (447, 241): whole vectors of columns
        relax.transform.FastMathTransform(),  # erf (GELU), exp, tanh, softmax: vector code, not scalar libm calls
        relax.transform.CanonicalizeBindings(),
    ]
