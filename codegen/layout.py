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

The ONNX frontend emits Clip as opaque `call_tir`s of TOPI maximum/minimum, and HardSwish/HardSigmoid with
Relax's `clip`, which layout inference cannot see through either (every ReLU6 or HardSwish would cost two
transposes); `ClipToRelaxOps` turns both into Relax maximum/minimum first.

Sigmoid (SiLU's x * Sigmoid(x), squeeze-excitation gates) legalizes to `exp`, which LLVM leaves as one libm
`expf` call per vector lane: an EfficientNet conv epilogue took 10x its multiply-adds. After the layout is
settled, `FastSigmoid` computes it as 1 / (1 + exp(-x)) with TOPI's `fast_exp` (range reduction and a
polynomial, about 1e-7 relative error; vectorizes), fused into the conv epilogues like any elementwise op.

A batch-1 matmul by a constant weight of a megabyte or more (every ImageNet classifier head, VGG's fully
connected layers) reads the weight from memory on every call; `PackGemvWeights` stores it as column panels, each contiguous over the reduction axis,
and computes it as a batched matmul whose result is already the (1, n) output in memory.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx, topi
from tvm.relax.expr_functor import PyExprMutator, mutator

from .conv_pack import nhwc_conv_weight
from .cpu_schedule import full_rate_widths
from .frontend import rewrite_relax_functions
from .matmul_pad import constant_weight, pad_matmul_columns, padded_columns
from .shuffle import shuffle_to_nhwc
from .sparse.cost import DEFAULT_OPTIONS as SPARSE_OPTIONS
from .sparse.rewrite import static_shape

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
        if call.op == tvm.ir.Op.get("relax.clip"):
            return _clip_as_max_min(call)
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


def _clip_as_max_min(call: relax.Call) -> relax.Expr:
    """`R.clip(x, lo, hi)` (HardSwish, HardSigmoid) as maximum/minimum with constants: Relax's clip has no
    layout inference either."""
    x, lo, hi = call.args
    dtype = x.ty.dtype
    if not all(isinstance(b, (tirx.IntImm, tirx.FloatImm)) for b in (lo, hi)) or not str(dtype).startswith("float"):
        return call
    bound = lambda b: relax.const(float(b.value), dtype)  # noqa: E731
    return relax.op.minimum(relax.op.maximum(x, bound(lo)), bound(hi))


@tvm.transform.module_pass(opt_level=0, name="ClipToRelaxOps")
def clip_to_relax_ops(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    return relax.transform.DeadCodeElimination()(rewrite_relax_functions(mod, _ClipRewriter(mod)))


def padded_channels(channels: int, lanes: int) -> int:
    """The output channel count a conv is computed with: a whole number of vectors. Part-vectors cost as
    many instructions as whole ones (24 channels: three half-width FMAs per row, two when padded to 32).
    A whole number of any vector width at the full multiply-add rate stays unpadded (with 512-bit vectors,
    256-bit ones: `cpu_schedule.full_rate_widths`), and the slice after the padded conv goes too.
    MobileNet-v2 at batch 8 (its 24- and 40-channel convs) 33.8 -> 33.1 ms, at batch 1 4.54 -> 4.41 ms."""
    if any(channels % width == 0 for width in full_rate_widths(lanes)):
        return channels
    return padded_columns(channels, lanes)


@mutator
class _ChannelPadder(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, lanes: int):
        super().__init__(mod)
        self.lanes = lanes

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        weight = nhwc_conv_weight(call)
        if weight is None:
            return call
        attrs = call.attrs
        w = weight.numpy()
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


# Weights above this size are read from memory rather than cache on a batch-1 call: the model's other weights
# and activations evict them between calls (every ImageNet classifier head: 1280 x 1000 is 5 MB).
STREAMED_WEIGHT_BYTES = 1 << 20


def gemv_panel(n: int, target: tvm.target.Target) -> int | None:
    """Columns per contiguous weight panel of a batch-1 matmul: its register tile, or None (one panel)."""
    from .cpu_schedule import column_tile

    panel = column_tile(1, n, target)
    return panel if n % panel == 0 and n > panel else None


@mutator
class _GemvPacker(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target):
        super().__init__(mod)
        self.target = target

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        w = constant_weight(call)
        x_shape = static_shape(call.args[0]) if w is not None else None
        if x_shape is None or int(np.prod(x_shape[:-1])) != 1:
            return call
        k, n = (int(d) for d in w.shape)
        panel = gemv_panel(n, self.target)
        if panel is None or k * n * 4 < STREAMED_WEIGHT_BYTES:
            return call
        w = w.numpy()
        if np.count_nonzero(w) <= (1.0 - SPARSE_OPTIONS["min_sparsity"]) * w.size:
            return call  # left as a plain matmul for the sparse rewrite to consider (it runs these passes first)
        packed = np.ascontiguousarray(w.reshape(k, n // panel, panel).transpose(1, 0, 2))
        y = self.builder_.emit(relax.op.matmul(relax.op.reshape(call.args[0], (1, k)), relax.const(packed)))
        return relax.op.reshape(y, call.ty.shape)  # (n / panel, 1, panel) is (1, n) in memory


def pack_gemv_weights(target: tvm.target.Target) -> tvm.transform.Pass:
    """Batch-1 matmuls by large constant weights read them as column panels, each contiguous over k: a
    [k, n] weight makes every k step jump a whole row to the next register tile's columns, which halves the rate DRAM
    streams at (VGG's fully connected layers: 24 -> 12 ms)."""

    @tvm.transform.module_pass(opt_level=0, name="PackGemvWeights")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_relax_functions(mod, _GemvPacker(mod, target))

    return _pass


@mutator
class _BatchNormRewriter(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op != tvm.ir.Op.get("relax.nn.batch_norm") or not all(
                isinstance(a, tvm.ir.Constant) for a in call.args[1:5]):
            return call
        x = call.args[0]
        rank = x.ty.ndim
        if rank < 0:
            return call  # unknown rank: no broadcast shape for the constants
        gamma, beta, mean, var = (a.value.numpy().astype(np.float64) for a in call.args[1:5])
        gamma = gamma if call.attrs.scale else np.ones_like(gamma)
        beta = beta if call.attrs.center else np.zeros_like(beta)
        scale = gamma / np.sqrt(var + float(call.attrs.epsilon))
        shift = beta - mean * scale
        axis = int(call.attrs.axis) % rank
        dims = (1,) * axis + (-1,) + (1,) * (rank - 1 - axis)  # x's rank: layout inference converts them with x
        dtype = str(x.ty.dtype)
        y = relax.op.add(relax.op.multiply(x, relax.const(scale.reshape(dims).astype(dtype))),
                         relax.const(shift.reshape(dims).astype(dtype)))
        return relax.Tuple([y, call.args[3], call.args[4]])  # batch_norm's (output, mean, var)


@tvm.transform.module_pass(opt_level=0, name="BatchNormToScaleShift")
def batch_norm_to_scale_shift(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Inference BN with constant statistics as x * scale + shift, the two folded from its four parameters
    at compile time. Relax's decomposition computes (x - mean) / sqrt(var + eps) * gamma + beta, which after
    constant folding still loads four parameters and divides per element (DenseNet's pre-activation BNs,
    which no conv before them can absorb)."""
    return rewrite_relax_functions(mod, _BatchNormRewriter(mod))


def _fast_sigmoid(x: te.Tensor) -> te.Tensor:
    e = topi.fast_exp(topi.negative(x))
    return te.compute(x.shape, lambda *i: tirx.const(1, x.dtype) / (tirx.const(1, x.dtype) + e(*i)),
                      name="fast_sigmoid", tag="elemwise")


@mutator
class _SigmoidRewriter(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op == tvm.ir.Op.get("relax.sigmoid") and call.ty.dtype == "float32":
            return self.builder_.call_te(_fast_sigmoid, call.args[0], primfunc_name_hint="fast_sigmoid")
        return call


@tvm.transform.module_pass(opt_level=0, name="FastSigmoid")
def fast_sigmoid(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    return rewrite_relax_functions(mod, _SigmoidRewriter(mod))


def layout_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    from .cpu_schedule import vector_lanes

    return [
        relax.transform.FoldConstant(),  # Clip bounds arrive as where(isnan(c), inf, c)
        clip_to_relax_ops,
        batch_norm_to_scale_shift,
        relax.transform.DecomposeOpsForInference(),  # BNs left (statistics computed at run time) -> scale/shift
        relax.transform.ConvertLayout(CONV_LAYOUTS),
        shuffle_to_nhwc,  # layout inference stops at channel shuffles' reshapes
        relax.transform.FoldConstant(),
        pad_conv_channels(vector_lanes(target)),
        pad_matmul_columns(vector_lanes(target)),  # pruned widths (447, 241): whole vectors of columns
        pack_gemv_weights(target),
        fast_sigmoid,  # after ConvertLayout: a call_tir has no layout inference
        relax.transform.FastMathTransform(),  # erf (GELU), exp, tanh, softmax: vector code, not scalar libm calls
        relax.transform.CanonicalizeBindings(),
    ]
