"""3x3 convolutions by Winograd's minimal filtering F(2x2, 3x3): 2.25x fewer multiply-adds.

A stride-1 3x3 conv computes each 2x2 output tile from a 4x4 input tile with 36 multiply-adds per input and
output channel pair; Winograd's F(2x2, 3x3) needs 16 (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", 2016):

    Y = A^T [ (G g G^T) . (B^T d B) ] A

with the filter transform G g G^T folded into the weight at compile time. The conv becomes three functions:

- input transform: V[e, p, c] = (B^T d_p B)[e] for every 4x4 tile p of the zero-padded input (B's entries are
  0 and +-1: each element is a signed sum of four inputs), stored as V[t, e, q, c] with the tiles in one
  block t per thread (`thread_parts`);
- a batched matmul per tile element e: M[e, p, o] = sum_c V[e, p, c] U[e, c, o], the 16 / 36 of the direct
  conv's multiply-adds, scheduled by the default contraction rule like any matmul;
- output transform: Y = A^T M_p A (a signed sum of nine elements), into which the conv's epilogue (bias, BN,
  activation, residual add) fuses.

Both transforms are marked `kOutEWiseFusable` (an op pattern TVM's annotation keeps): the epilogue fuses
into the output transform, and neither is inlined into a neighbour that would recompute its sums several
times per element.

The transforms' entries are exact in floating point (0, +-1 and, in G, +-1/2), so the results match the
direct conv to rounding (a different summation order). `rewrite_winograd(target)` takes the NHWC float32
convs with constant weights where the matmul is large enough to pay for the transforms (`worth_it`).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from .conv_pack import nhwc_conv_weight
from .cpu_schedule import target_threads
from .frontend import mark_out_ewise_fusable, rewrite_relax_functions

# F(2x2, 3x3) (Lavin & Gray, eq. 7).
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
# Row i of B^T as (index, sign) pairs: two nonzeros each.
BT_TERMS = [((0, 1), (2, -1)), ((1, 1), (2, 1)), ((2, 1), (1, -1)), ((1, 1), (3, -1))]

# Below these channel counts the matmul's short reduction or narrow rows do not pay for the transforms'
# extra memory passes.
MIN_CHANNELS = 32
# The transformed weight is 16/9 the size of the direct conv's, and each of its elements is used once per
# tile: with fewer tiles the matmul streams weights from memory instead of computing (ResNet's 7x7 stage at
# batch 1, 16 tiles: 16 MB of weights for 134 MFLOP, 1.2x faster than direct when memory is quiet, slower
# when other processes load it).
MIN_TILES = 32
# The input transform writes 4x its input (16 values per 2x2 tile), which the matmul reads back. Beyond the
# last-level cache, with few output channels to reuse each value for, that traffic costs more than the
# multiply-adds saved (DenseNet's 128 -> 32 convs at batch 8: 51 MB transformed, 11 ms against 9.5 ms
# direct; at 28x28, 12.8 MB, Winograd still wins: 1.8 against 2.1 ms).
STREAMED_TRANSFORM_BYTES = 32 * 1024 * 1024
MIN_STREAMED_COLUMNS = 64
# Where the transformed input and output together leave the cores' L2s, a matmul over fewer than 64 input
# channels is too short a reduction to pay for writing and reading them back (SqueezeNet at batch 8, timed
# inside whole runs: 32 -> 128 channels at 27x27, 16 MB transformed, 2.7 ms against 2.1 ms direct; 48 -> 192
# at 13x13, 6 MB, 1.3 against 1.15 ms; 64 -> 256 at 13x13 still wins, 1.85 against 2.1 ms).
CACHED_TRANSFORM_BYTES = 4 * 1024 * 1024
MIN_STREAMED_CHANNELS = 64


def weight_transform(w_hwio: np.ndarray) -> np.ndarray:
    """HWIO 3x3 weight -> U[e, ci, co] = (G g G^T)[e // 4, e % 4] per (ci, co), computed in float64."""
    u = np.einsum("ak,klio,bl->abio", G, w_hwio.astype(np.float64), G)
    return np.ascontiguousarray(u.reshape(16, *w_hwio.shape[2:]).astype(np.float32))


def _table(values: list[int], index: tirx.PrimExpr) -> tirx.PrimExpr:
    expr = tirx.IntImm("int32", values[-1])
    for i in range(len(values) - 2, -1, -1):
        expr = tirx.Select(index == i, tirx.IntImm("int32", values[i]), expr)
    return expr


def _tiles(out_hw: int) -> int:
    return -(-out_hw // 2)


def _tile_count(out_shape: list[int]) -> int:
    """2x2 output tiles of an NHWC output, over all images."""
    n, ho, wo, _ = out_shape
    return n * _tiles(ho) * _tiles(wo)


def _input_transform(d: te.Tensor, parts: int) -> te.Tensor:
    """`d`: the input zero-padded to whole 4x4 tiles (2 x tiles + 2 rows and columns). V[t, e, q, c] for tile
    p = t * (tiles / parts) + q: one contiguous block of tiles per thread (`thread_parts`)."""
    n, hp, wp, c = (int(x) for x in d.shape)
    th, tw = (hp - 2) // 2, (wp - 2) // 2
    share = n * th * tw // parts
    first = [t[0][0] for t in BT_TERMS]
    second, sign = [t[1][0] for t in BT_TERMS], [t[1][1] for t in BT_TERMS]

    def v(t, e, q, ch):
        eps, nu = e // 4, e % 4
        p = t * share + q
        b, y0, x0 = p // (th * tw), p // tw % th * 2, p % tw * 2
        rows = [(_table(first, eps), 1.0), (_table(second, eps), tirx.Cast(d.dtype, _table(sign, eps)))]
        cols = [(_table(first, nu), 1.0), (_table(second, nu), tirx.Cast(d.dtype, _table(sign, nu)))]
        total = None
        for ri, rs in rows:
            for ci, cs in cols:
                term = d[b, y0 + ri, x0 + ci, ch]
                for s in (rs, cs):
                    if not isinstance(s, float):
                        term = term * s
                total = term if total is None else total + term
        return total

    return te.compute((parts, 16, share, c), v, name="winograd_input")


def _batched_matmul(v: te.Tensor, u: te.Tensor) -> te.Tensor:
    parts, e, share, c = (int(d) for d in v.shape)
    o = int(u.shape[2])
    k = te.reduce_axis((0, c), name="k")
    return te.compute((parts, e, share, o), lambda t, b, i, j: te.sum(v[t, b, i, k] * u[b, k, j], axis=k),
                      name="winograd_matmul")


def _output_transform(m: te.Tensor, out_shape: list[int], out_dtype: str) -> te.Tensor:
    n, ho, wo, o = out_shape
    th, tw = _tiles(ho), _tiles(wo)
    share = int(m.shape[2])

    def y(b, h, w, ch):
        p = b * (th * tw) + h // 2 * tw + w // 2
        t, q = p // share, p % share
        rh, rw = h % 2, w % 2
        # Row r of A^T: elements r, r + 1, r + 2 with signs +, then -(r) twice.
        neg_h = tirx.Cast(m.dtype, 1 - 2 * rh)
        neg_w = tirx.Cast(m.dtype, 1 - 2 * rw)
        total = None
        for k in range(3):
            for j in range(3):
                term = m[t, (rh + k) * 4 + rw + j, q, ch]
                if k:
                    term = term * neg_h
                if j:
                    term = term * neg_w
                total = term if total is None else total + term
        return total.astype(out_dtype) if out_dtype and out_dtype != m.dtype else total

    return te.compute((n, ho, wo, o), y, name="winograd_output")


def thread_parts(tiles: int, threads: int) -> int:
    """Blocks of tiles the transformed tensors are laid out in: one per thread when they divide evenly.

    Each kernel's parallel loop is split into one contiguous range per thread, and the tensors' outer block
    axis is the outermost loop of all three functions: a thread transforms, multiplies and transforms back
    the tiles of its own images or rows, the ones the kernels around them give it. Laid out by tile element
    first, every thread would read half of its tiles from the other core's cache (which need not be shared):
    ResNet-50 at batch 8 took 323 ms against 308 ms where the cores share no L3, and 302 ms either way where
    they do."""
    return threads if threads > 1 and tiles % threads == 0 else 1


def worth_it(ci: int, co: int, out_shape: list[int]) -> bool:
    """Whether Winograd pays off for a conv from `ci` channels to an NHWC output of `out_shape`."""
    tiles = _tile_count(out_shape)
    if 16 * tiles * ci * 4 > STREAMED_TRANSFORM_BYTES and co < MIN_STREAMED_COLUMNS:
        return False
    if 16 * tiles * (ci + co) * 4 > CACHED_TRANSFORM_BYTES and ci < MIN_STREAMED_CHANNELS:
        return False
    return ci >= MIN_CHANNELS and co >= MIN_CHANNELS and tiles >= MIN_TILES


def winograd_conv(call: relax.Call) -> np.ndarray | None:
    """The HWIO weight of a conv this pass rewrites, or None."""
    w = nhwc_conv_weight(call)
    if w is None or call.ty.shape is None:
        return None
    a = call.attrs
    if tuple(w.shape[:2]) != (3, 3) or [int(s) for s in a.strides] != [1, 1] or \
            [int(s) for s in a.dilation] != [1, 1]:
        return None
    out = [int(d) for d in call.ty.shape.values]
    return w.numpy() if worth_it(int(w.shape[2]), int(w.shape[3]), out) else None


@mutator
class _Winograd(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, threads: int):
        super().__init__(mod)
        self.threads = threads
        self.transforms: list[relax.GlobalVar] = []

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        w = winograd_conv(call)
        if w is None:
            return call
        out_shape = [int(d) for d in call.ty.shape.values]
        out_dtype = str(call.ty.dtype)
        _, h, w_in, _ = (int(d) for d in call.args[0].ty.shape.values)
        top, left, _, _ = (int(s) for s in call.attrs.padding)
        # Zero padding as its own op, up to whole tiles: the transform's loop then reads a plain input
        # (padding inside the same function made it 5x slower).
        bottom = 2 * _tiles(out_shape[1]) + 2 - h - top
        right = 2 * _tiles(out_shape[2]) + 2 - w_in - left
        x = call.args[0]
        if top or left or bottom or right:
            x = self.builder_.emit(relax.op.nn.pad(x, [0, 0, top, bottom, left, right, 0, 0]))
        parts = thread_parts(_tile_count(out_shape), self.threads)
        v = self.builder_.emit(self.builder_.call_te(_input_transform, x, parts,
                                                     primfunc_name_hint="winograd_input"))
        m = self.builder_.emit(self.builder_.call_te(
            _batched_matmul, v, relax.const(weight_transform(w)), primfunc_name_hint="winograd_matmul"))
        y = self.builder_.call_te(_output_transform, m, out_shape, out_dtype,
                                  primfunc_name_hint="winograd_output")
        self.transforms += [self.builder_.lookup_binding(v).args[0], y.args[0]]
        return y


def rewrite_winograd(target: tvm.target.Target) -> tvm.transform.Pass:
    """Rewrite the eligible 3x3 convs (see the module docstring), their transforms marked kOutEWiseFusable."""

    @tvm.transform.module_pass(opt_level=0, name="WinogradConv3x3")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Winograd(mod, target_threads(target))
        return mark_out_ewise_fusable(rewrite_relax_functions(mod, rewriter), rewriter.transforms)

    return _pass

