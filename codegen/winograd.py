"""3x3 convolutions by Winograd's minimal filtering F(m x m, 3x3): F(4x4) does 4x fewer multiply-adds, F(2x2) 2.25x.

A stride-1 3x3 conv computes each m x m output tile from an (m + 2) x (m + 2) input tile with 9 m^2
multiply-adds per input and output channel pair; Winograd's algorithm needs (m + 2)^2: 36 instead of 144
for F(4x4, 3x3), 16 instead of 36 for F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", 2016, whose matrices `Tiling` holds):

    Y = A^T [ (G g G^T) . (B^T d B) ] A

with the filter transform G g G^T folded into the weight at compile time. The conv becomes three functions:

- input transform: V[e, p, c] = (B^T d_p B)[e] for every tile p of the zero-padded input, stored as
  V[t, e, q, c] with the tiles in one block t per thread (`thread_parts`). It is scheduled here
  (`_input_schedule`): tiles in parallel, then channel vectors, then the (m + 2)^2 elements unrolled, each
  a constant signed sum of the tile's inputs, which are read once;
- a batched matmul per tile element e: M[e, p, o] = sum_c V[e, p, c] U[e, c, o], scheduled by the default
  contraction rule like any matmul;
- output transform: Y = A^T M_p A, into which the conv's epilogue (bias, BN, activation, residual add)
  fuses. It is marked `kOutEWiseFusable` (an op pattern TVM's annotation keeps), so the epilogue fuses into
  it and it is not inlined into a neighbour; its block carries the tile size, by which the CPU schedule
  splits and unrolls the output rows and columns (`cpu_schedule.TILE_ANNOTATION`).

F(4x4) is used where it has enough tiles (`choose_tiling`), F(2x2) where only that has (ResNet's 14 x 14
stage at batch 1). F(4x4)'s transforms have entries up to 8 and 1/24, so its rounding error is larger
than F(2x2)'s (about 5e-6 of the output's range for a 64-channel conv, against 7e-7), well within the 1e-4
that compiled models are verified to. `rewrite_winograd(target)` takes the NHWC float32 convs with constant
weights where the matmul is large enough to pay for the transforms (`worth_it`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from .conv_pack import nhwc_conv_weight
from .cpu_schedule import TILE_ANNOTATION, target_threads, vector_lanes
from .frontend import mark_out_ewise_fusable, rewrite_relax_functions

# Relax's op pattern for functions no neighbour fuses into.
OPAQUE = 8

@dataclass(frozen=True)
class Tiling:
    """F(m x m, 3x3): m x m output tiles from (m + 2) x (m + 2) input tiles (Lavin & Gray, section 4)."""
    m: int
    bt: tuple  # B^T, (m + 2) x (m + 2)
    g: tuple   # G, (m + 2) x 3
    at: tuple  # A^T, m x (m + 2)

    @property
    def alpha(self) -> int:
        return self.m + 2

    @property
    def elements(self) -> int:
        return self.alpha ** 2


F2 = Tiling(2, bt=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
            g=((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
            at=((1, 1, 1, 0), (0, 1, -1, -1)))
F4 = Tiling(4, bt=((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
                   (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
            g=((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
               (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
            at=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)))
# In order of preference (`choose_tiling`).
TILINGS = (F4, F2)

# Below these channel counts the matmul's short reduction or narrow rows do not pay for the transforms'
# extra memory passes. F(4x4) saves 4x the multiply-adds (F(2x2) 2.25x) for transformed tensors 0.56x the
# size of F(2x2)'s, so it pays off from 16 input channels (SqueezeNet's 16 -> 64 at 55 x 55, batch 8, alone:
# 1.5 against 2.2 ms direct).
MIN_CHANNELS = 32
MIN_CHANNELS_F4 = 16
# The transformed weight is (m + 2)^2 / 9 the size of the direct conv's, and each of its elements is used
# once per tile: with fewer tiles the matmul streams weights from memory instead of computing (ResNet's 7x7
# stage at batch 1, 16 tiles of F(2x2): 16 MB of weights for 134 MFLOP, 1.2x faster than direct when memory
# is quiet, slower when other processes load it).
MIN_TILES = 32
# The input transform writes (m + 2)^2 / m^2 times its input, which the matmul reads back. Beyond the
# last-level cache, with few output channels to reuse each value for, that traffic costs more than the
# multiply-adds saved (DenseNet's 128 -> 32 convs at batch 8 by F(2x2): 51 MB transformed, 11 ms against 9.5
# ms direct; at 28x28, 12.8 MB, Winograd still wins: 1.8 against 2.1 ms).
STREAMED_TRANSFORM_BYTES = 32 * 1024 * 1024
MIN_STREAMED_COLUMNS = 64
# Where the transformed input and output together leave the cores' L2s, a matmul over fewer than 64 input
# channels is too short a reduction to pay for writing and reading them back (SqueezeNet at batch 8 by
# F(2x2), timed inside whole runs: 32 -> 128 channels at 27x27, 16 MB transformed, 2.7 ms against 2.1 ms
# direct; 48 -> 192 at 13x13, 6 MB, 1.3 against 1.15 ms; 64 -> 256 at 13x13 still wins, 1.85 against 2.1).
# F(4x4) does not need the rule: with it on those convs as well, SqueezeNet ran 10% faster at batch 1 and 8
# (whole runs, old and new build alternating: 3.57 -> 3.20 and 28.9 -> 25.9 ms).
CACHED_TRANSFORM_BYTES = 4 * 1024 * 1024
MIN_STREAMED_CHANNELS = 64


def weight_transform(w_hwio: np.ndarray, tiling: Tiling = F2) -> np.ndarray:
    """HWIO 3x3 weight -> U[e, ci, co] = (G g G^T)[e // (m + 2), e % (m + 2)] per (ci, co), in float64."""
    g = np.array(tiling.g, dtype=np.float64)
    u = np.einsum("ak,klio,bl->abio", g, w_hwio.astype(np.float64), g)
    return np.ascontiguousarray(u.reshape(tiling.elements, *w_hwio.shape[2:]).astype(np.float32))


def _signed_sum(terms: list, dtype: str) -> tirx.PrimExpr:
    """sum(c * x for c, x in terms), multiplying only by coefficients other than +-1 and skipping zeros."""
    total = None
    for c, x in terms:
        if c == 0:
            continue
        if abs(c) != 1 or (total is None and c < 0):
            x = x * tirx.const(float(c) if total is None else float(abs(c)), dtype)
        total = x if total is None else (total + x if c > 0 else total - x)
    return total


def _select(index: tirx.PrimExpr, values: list) -> tirx.PrimExpr:
    """values[index], as a chain of selects (which fold to one value where the schedule unrolls `index`)."""
    value = values[-1]
    for i in range(len(values) - 2, -1, -1):
        value = tirx.Select(index == i, values[i], value)
    return value


def _tiles(out_hw: int, m: int) -> int:
    return -(-out_hw // m)


def _tile_count(out_shape: list[int], m: int) -> int:
    """m x m output tiles of an NHWC output, over all images."""
    n, ho, wo, _ = out_shape
    return n * _tiles(ho, m) * _tiles(wo, m)


def _input_transform(d: te.Tensor, parts: int, tiling: Tiling = F2) -> te.Tensor:
    """`d`: the input zero-padded to whole tiles (m x tiles + 2 rows and columns). V[t, e, q, c] = (B^T d_p
    B)[e] for tile p = t * (tiles / parts) + q: one contiguous block of tiles per thread (`thread_parts`).

    The tile element e selects one of (m + 2)^2 signed sums (rows of B^T d first, then columns):
    `_input_schedule` unrolls e, so each sum is compiled with its constants and the shared row sums are
    computed once per tile."""
    n, hp, wp, c = (int(x) for x in d.shape)
    m, a = tiling.m, tiling.alpha
    th, tw = (hp - 2) // m, (wp - 2) // m
    share = n * th * tw // parts

    def v(t, e, q, ch):
        p = t * share + q
        b, y0, x0 = p // (th * tw), p // tw % th * m, p % tw * m
        rows = [[_signed_sum([(tiling.bt[j][k], d[b, y0 + r, x0 + k, ch]) for k in range(a)], d.dtype)
                 for j in range(a)]
                for r in range(a)]  # rows[r][j] = (d B)[r, j]
        sums = [_signed_sum([(tiling.bt[i][r], rows[r][j]) for r in range(a)], d.dtype)
                for i in range(a) for j in range(a)]
        return _select(e, sums)

    return te.compute((parts, tiling.elements, share, c), v, name="winograd_input")


def _input_schedule(shape: list[int], dtype: str, parts: int, tiling: Tiling, lanes: int) -> tirx.PrimFunc:
    """The input transform for an input of `shape`, scheduled: tiles in parallel (each thread its own block),
    then channel vectors, then the unrolled tile elements. Opaque to fusion: its producer is the padding."""
    d = te.placeholder(shape, dtype, name="d")
    sch = s_tir.Schedule(te.create_prim_func([d, _input_transform(d, parts, tiling)]))
    block = sch.get_sblock("winograd_input")
    t, e, q, c = sch.get_loops(block)
    width = math.gcd(shape[3], lanes)
    c_outer, c_inner = sch.split(c, factors=[None, width])
    sch.reorder(t, q, c_outer, e, c_inner)
    sch.parallel(sch.fuse(t, q))
    sch.unroll(e)
    if width > 1:
        sch.vectorize(c_inner)
    func = sch.mod["main"].without_attr("global_symbol")
    return func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", OPAQUE)


def _batched_matmul(v: te.Tensor, u: te.Tensor) -> te.Tensor:
    parts, e, share, c = (int(d) for d in v.shape)
    o = int(u.shape[2])
    k = te.reduce_axis((0, c), name="k")
    return te.compute((parts, e, share, o), lambda t, b, i, j: te.sum(v[t, b, i, k] * u[b, k, j], axis=k),
                      name="winograd_matmul")


def _output_transform(m: te.Tensor, out_shape: list[int], out_dtype: str, tiling: Tiling = F2) -> te.Tensor:
    """Y = A^T M_p A for the tile p holding each output pixel.

    The pixel's place in its tile selects one of m^2 signed sums (rows of M A first, then columns). The block
    is annotated with the tile size (`TILE_ANNOTATION`): the CPU schedule splits the output rows and columns
    by it and unrolls them, so each sum is compiled with its constants and the row sums are shared."""
    n, ho, wo, o = out_shape
    size, a, at = tiling.m, tiling.alpha, tiling.at
    th, tw = _tiles(ho, size), _tiles(wo, size)
    share = int(m.shape[2])

    def y(b, h, w, ch):
        p = b * (th * tw) + h // size * tw + w // size
        t, q = p // share, p % share
        rows = [[_signed_sum([(at[rw][j], m[t, k * a + j, q, ch]) for j in range(a)], m.dtype)
                 for rw in range(size)] for k in range(a)]  # rows[k][rw] = (M A)[k, rw]
        sums = [_signed_sum([(at[rh][k], rows[k][rw]) for k in range(a)], m.dtype)
                for rh in range(size) for rw in range(size)]
        value = _select(h % size * size + w % size, sums)
        return value.astype(out_dtype) if out_dtype and out_dtype != m.dtype else value

    return te.compute((n, ho, wo, o), y, name="winograd_output", attrs={TILE_ANNOTATION: size})


def thread_parts(tiles: int, threads: int) -> int:
    """Blocks of tiles the transformed tensors are laid out in: one per thread when they divide evenly.

    Each kernel's parallel loop is split into one contiguous range per thread, and the tensors' outer block
    axis is the outermost loop of all three functions: a thread transforms, multiplies and transforms back
    the tiles of its own images or rows, the ones the kernels around them give it. Laid out by tile element
    first, every thread would read half of its tiles from the other core's cache (which need not be shared):
    ResNet-50 at batch 8 took 323 ms against 308 ms where the cores share no L3, and 302 ms either way where
    they do.

    With fewer than MIN_TILES tiles per thread the matmul streams its weights (each element used once per
    tile) and there is one block: the threads split the tile elements, each reading its half of the weights
    instead of all of them (ResNet-50's 7 x 7 stage at batch 8, 32 tiles of 4 x 4 and 36 x 1 MB of weights,
    with weight panels sized per element: 6.8 -> 5.3 ms a conv)."""
    return threads if threads > 1 and tiles % threads == 0 and tiles >= MIN_TILES * threads else 1


def worth_it(ci: int, co: int, out_shape: list[int], tiling: Tiling = F2) -> bool:
    """Whether Winograd with `tiling` pays off for a conv from `ci` channels to an NHWC output of `out_shape`."""
    tiles = _tile_count(out_shape, tiling.m)
    if tiling.elements * tiles * ci * 4 > STREAMED_TRANSFORM_BYTES and co < MIN_STREAMED_COLUMNS:
        return False
    if tiling is F4:
        return ci >= MIN_CHANNELS_F4 and co >= MIN_CHANNELS and tiles >= MIN_TILES
    if tiling.elements * tiles * (ci + co) * 4 > CACHED_TRANSFORM_BYTES and ci < MIN_STREAMED_CHANNELS:
        return False
    return ci >= MIN_CHANNELS and co >= MIN_CHANNELS and tiles >= MIN_TILES


def choose_tiling(ci: int, co: int, out_shape: list[int]) -> Tiling | None:
    """F(4x4) where it pays off (4x fewer multiply-adds than direct), else F(2x2) (2.25x), else None."""
    return next((t for t in TILINGS if worth_it(ci, co, out_shape, t)), None)


def winograd_conv(call: relax.Call) -> tuple[np.ndarray, Tiling] | None:
    """The HWIO weight of a conv this pass rewrites and its tiling, or None."""
    w = nhwc_conv_weight(call)
    if w is None or call.ty.shape is None:
        return None
    a = call.attrs
    if tuple(w.shape[:2]) != (3, 3) or [int(s) for s in a.strides] != [1, 1] or \
            [int(s) for s in a.dilation] != [1, 1]:
        return None
    out = [int(d) for d in call.ty.shape.values]
    tiling = choose_tiling(int(w.shape[2]), int(w.shape[3]), out)
    return None if tiling is None else (w.numpy(), tiling)


@mutator
class _Winograd(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target):
        super().__init__(mod)
        self.threads = target_threads(target)
        self.lanes = vector_lanes(target)
        self.transforms: list[relax.GlobalVar] = []

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        rewrite = winograd_conv(call)
        if rewrite is None:
            return call
        w, tiling = rewrite
        out_shape = [int(d) for d in call.ty.shape.values]
        out_dtype = str(call.ty.dtype)
        x = call.args[0]
        n, h, w_in, c = (int(d) for d in x.ty.shape.values)
        top, left, _, _ = (int(s) for s in call.attrs.padding)
        # Zero padding as its own op, up to whole tiles: the transform's loop then reads a plain input
        # (padding inside the same function made it 5x slower).
        bottom = tiling.m * _tiles(out_shape[1], tiling.m) + 2 - h - top
        right = tiling.m * _tiles(out_shape[2], tiling.m) + 2 - w_in - left
        if top or left or bottom or right:
            x = self.builder_.emit(relax.op.nn.pad(x, [0, 0, top, bottom, left, right, 0, 0]))
        padded = [n, h + top + bottom, w_in + left + right, c]
        tiles = _tile_count(out_shape, tiling.m)
        parts = thread_parts(tiles, self.threads)
        gv = self.builder_.add_func(_input_schedule(padded, str(x.ty.dtype), parts, tiling, self.lanes),
                                    "winograd_input")
        v_shape = [parts, tiling.elements, tiles // parts, c]
        v = self.builder_.emit(relax.call_tir(gv, [x], relax.TensorType(v_shape, str(x.ty.dtype))))
        m = self.builder_.emit(self.builder_.call_te(
            _batched_matmul, v, relax.const(weight_transform(w, tiling)), primfunc_name_hint="winograd_matmul"))
        y = self.builder_.call_te(functools.partial(_output_transform, tiling=tiling), m, out_shape, out_dtype,
                                  primfunc_name_hint="winograd_output")
        self.transforms.append(y.args[0])
        return y


def rewrite_winograd(target: tvm.target.Target) -> tvm.transform.Pass:
    """Rewrite the eligible 3x3 convs (see the module docstring), the output transform marked
    kOutEWiseFusable."""

    @tvm.transform.module_pass(opt_level=0, name="WinogradConv3x3")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Winograd(mod, target)
        return mark_out_ewise_fusable(rewrite_relax_functions(mod, rewriter), rewriter.transforms)

    return _pass
