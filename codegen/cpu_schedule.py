"""Default schedules for CPU targets, applied to the TIR functions that Relax legalization produces.

Without this step TVM 0.27 leaves Conv and MatMul as naive loops. `schedule_passes(target)` returns the
module passes inserted between legalization+fusion and lowering: dlight-style rules tried in order on every
fused PrimFunc that no tuning record has scheduled already.

- `Contraction`: one reduction block (conv2d in NHWC incl. depthwise/grouped, matmul/dense, pooling,
  global pooling) with its elementwise epilogue (bias, BN, activation, residual add). The output's
  innermost axis (channels or columns) is tiled into vector registers, the axis above it into a register
  row block; the reduction runs over a local accumulator tile that the epilogue writes out directly, and
  the outer tile loops run in parallel.
- `RowReduction`: softmax, layer norm and the like, rows in parallel, each row reduced in vectors; dlight's
  CPU `Reduction` for the ones it does not match.
- `Elementwise`: the fallback for everything else: inline what can be inlined, parallel outer loops,
  vectorized innermost loop.

All rules only reorder, tile and annotate loops; the arithmetic is the one legalization wrote, so results
match the unscheduled functions up to FMA contraction and, in `RowReduction`, a lane-wise summation order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import get_root_block, get_sblock_info
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width


def vector_lanes(target: Target, dtype_bits: int = 32) -> int:
    """SIMD lanes for `dtype_bits` elements on `target` (AVX-512: 16 floats, AVX2: 8, NEON/SIMD128: 4)."""
    bits = 0
    try:
        bits = int(llvm_get_vector_width(target))
    except Exception:  # non-LLVM or unknown CPU
        bits = 0
    return max(2, (bits if bits > 0 else 128) // dtype_bits)


def vector_registers(target: Target) -> int:
    """Architectural SIMD registers, which bound the accumulator tile."""
    mattr = [str(a) for a in target.attrs.get("mattr", [])]
    if vector_lanes(target) >= 16 or any("avx512" in a for a in mattr):
        return 32
    if "aarch64" in str(target.attrs.get("mtriple", "")):
        return 32
    return 16


def _extent(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class Tile:
    """Register tile of a contraction: `rows` output rows x `cols` output columns (vectorized)."""

    rows: int
    cols: int


def choose_cols(n: int, lanes: int) -> int:
    """Output columns per register tile, a whole number of vector registers.

    Two full vectors when they divide n, else one to four; for other extents (1000 classes) several
    half- or quarter-width vectors that divide n (ShuffleNet's 116 = 4 x 29); failing that, one full vector
    with a masked tail.
    """
    for k in (2, 3, 4, 1):
        if n % (k * lanes) == 0:
            return k * lanes
    for v in (lanes // 2, lanes // 4):
        if v >= 4 and n % v == 0:
            ks = [k for k in _divisors(n // v) if k * v <= 4 * lanes]
            return min(ks, key=lambda k: (abs(k * v - 2 * lanes), -k)) * v
    # A masked tail: TVM scalarizes the predicated vector loop, so this is the slow path (prime extents).
    return lanes


# TVM allocates a register tile's accumulators on the stack when they take fewer bytes than this (its
# kMaxStackAlloca), and LLVM keeps them in registers. A larger tile comes from the workspace pool: two calls per
# tile, and the accumulators stored to it after the reduction and read back by the epilogue. Measured at batch
# 8 with AVX-512 (16 accumulators of 64 bytes against 14): ResNet's 1x1 convs 64 -> 256 at 56x56 5.8 -> 4.3 ms,
# 128 -> 256 9.9 -> 8.0 ms, 512 -> 1024 at 14x14 7.5 -> 7.2 ms; MobileNet-v2's depthwise 56x56x144 at batch 1
# (9 accumulators, always in the pool before) 0.36 -> 0.25 ms. Whole models: ResNet-50 275 -> 251 ms,
# MobileNet-v2 32.6 -> 26.5 ms (batch 1: 4.19 -> 3.41 ms).
STACK_TILE_BYTES = 1024


def choose_tile(m: int, n: int, lanes: int, registers: int, max_vectors: int | None = None) -> Tile:
    """Pick a register tile for an m x n output plane.

    Columns come from `choose_cols`; rows are the largest divisor of m keeping the accumulators within about
    three quarters of the register file (and `max_vectors`). A single-row plane (batch-1 dense) gets a wider
    column tile instead, a plane of prime width that fits the registers one vector of columns per row.
    """
    cols = choose_cols(n, lanes)
    if m == 1 and n % (4 * lanes) == 0:
        return Tile(rows=1, cols=4 * lanes)
    vregs = -(-cols // lanes)
    limit = min(registers * 3 // 4, max_vectors or registers)
    budget = max(1, limit // vregs)
    rows = max(d for d in _divisors(m) if d <= budget)
    if rows < min(4, budget) and m > budget:
        if m <= limit and n % lanes == 0:
            # A prime plane width such as SqueezeNet's 13: one vector of columns for every row, rather than
            # a masked tail that computes 16 rows for 13 (its 512 -> 1000 classifier at batch 8: 6.4 ms
            # against 7.5 ms with 8 x 48).
            return Tile(rows=m, cols=lanes)
        rows = budget  # no good divisor (e.g. prime extents): accept a masked row tail
    return Tile(rows=rows, cols=cols)


def tile_candidates(m: int, n: int, lanes: int, registers: int, max_vectors: int | None = None) -> list[Tile]:
    """`choose_tile`'s pick first, then the other register tiles worth timing when tuning: one to four whole
    vectors of columns that divide n, each with as many rows as the register file holds beside a few
    operand registers (and `max_vectors`): the largest divisor of m, and all of them with a masked tail."""
    first = choose_tile(m, n, lanes, registers, max_vectors)
    tiles = [first]
    for k in (1, 2, 3, 4):
        cols = k * lanes
        if n % cols:
            continue
        budget = max(1, min(registers - 4, max_vectors or registers) // k)
        options = {max(d for d in _divisors(m) if d <= budget), min(m, budget)}
        tiles += [Tile(rows=r, cols=cols) for r in sorted(options)]
    return list(dict.fromkeys(tiles))


def column_tile(m: int, n: int, target: Target) -> int:
    """Output columns per register tile that `Contraction` gives an m x n output plane on `target` (the
    panel width that weights are packed with)."""
    lanes = vector_lanes(target)
    return choose_tile(m, n, lanes, vector_registers(target), stack_vectors(lanes)).cols


def stack_vectors(lanes: int, dtype_bits: int = 32) -> int:
    """The most accumulator vectors of `lanes` elements a register tile keeps on the stack."""
    return (STACK_TILE_BYTES - 1) // (lanes * dtype_bits // 8)


def full_rate_widths(lanes: int) -> tuple[int, ...]:
    """The vector widths that run multiply-adds at the full rate, widest first: full vectors, and half-width
    ones where full ones are 512-bit (Zen 4 issues two 256-bit multiply-adds a cycle, as many lanes as one
    512-bit)."""
    return (lanes, lanes // 2) if lanes >= 16 else (lanes,)


def group_lanes(group: int, lanes: int) -> int | None:
    """Vector lanes for a conv in groups of `group` channels, each vector within one group (its input channels
    are one group's, read by broadcast) and at the full rate (`full_rate_widths`); None where only narrower
    vectors fit (`group_conv` shifts those). Measured on Zen 4 at batch 8, grouped with 8 lanes against
    shifted with 16: ResNeXt-50's 28x28x256 conv in groups of 8 2.6 / 5.1 ms, its stride-2 56x56x256 5.3 /
    7.2 ms; groups of 4 with 4 lanes lost (56x56x128: 5.8 / 5.3 ms), as did 8 lanes for groups of 16
    (14x14x512: 1.5 / 1.2)."""
    return next((width for width in full_rate_widths(lanes) if group % width == 0), None)


def _channel_group(stmt: s_tir.SBlock, n_spatial: int) -> int | None:
    """The channels per group of a grouped conv (input channel `c // k * k + r` for output channel c), or
    None."""
    col = stmt.iter_vars[n_spatial - 1].var

    def divisors(expr):  # the constant divisors of col in floor divisions within an index expression
        if (isinstance(expr, tirx.FloorDiv) and isinstance(expr.b, tirx.IntImm) and int(expr.b) > 1
                and _mentions(expr.a, {col})):
            yield int(expr.b)
        for operand in (getattr(expr, "a", None), getattr(expr, "b", None)):
            if isinstance(operand, tvm.ir.expr.Expr):
                yield from divisors(operand)

    found = {k for read in stmt.reads for k in divisors(read.region[-1].min)}
    return found.pop() if len(found) == 1 else None


def vector_width(cols: int, lanes: int) -> int:
    """Lanes of the vectors a register tile of `cols` columns is computed with: full, half or quarter width."""
    return next(v for v in (lanes, lanes // 2, lanes // 4, 1) if v >= 1 and cols % v == 0)


def _simple_loop_nest(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> bool:
    """Whether the block's loops bind its iter vars one to one, in order (what legalization emits)."""
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    if len(loops) != len(stmt.iter_vars):
        return False
    for loop, iv in zip(loops, stmt.iter_vars):
        if not isinstance(sch.get(loop).extent, tirx.IntImm) or not isinstance(iv.dom.extent, tirx.IntImm):
            return False
        if int(sch.get(loop).extent) != int(iv.dom.extent):
            return False
    return True


def _is_pad(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> bool:
    return bool(tvm.get_global_func("s_tir.schedule.HasIfThenElse")(sch.get(block)))


def _keeps_copy(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> bool:
    """Whether a block with a select stays its own pass instead of being inlined into its consumers.

    Padding with a constant does (the consumers' loops would test bounds). A concatenation is inlined only
    into consumers that permute it (ShuffleNet's concat + channel shuffle + split: one copy instead of two).
    A consumer reading it element for element would select per element, which is slower than the copy
    (DenseNet's concat + BN + ReLU: 1.5x), unless the concatenation is along its innermost axis: `Elementwise`
    inlines that one and cuts the consumer's loop at the parts (`_concat_cuts`). Consumers that only copy
    (the halves of a split after ShuffleNet-v2's shuffle) compute the selection themselves: the shuffled
    tensor was a workspace buffer written and read again (ShuffleNet-v2 at batch 8 15.3 -> 14.6 ms, at batch
    1 2.68 -> 2.39 ms)."""
    body = sch.get(block).body
    value = body.value if isinstance(body, tirx.BufferStore) else None
    if not (isinstance(value, tvm.ir.Call) and str(value.op.name).endswith("if_then_else")):
        return _is_pad(sch, block)
    if any(isinstance(e, (tirx.IntImm, tirx.FloatImm)) for e in value.args[1:]):
        return True
    consumers = [sch.get(c) for c in sch.get_consumers(block)]
    if consumers and all(isinstance(c.body, tirx.BufferStore) and isinstance(c.body.value, tvm.ir.TensorLoad)
                         for c in consumers):
        return False  # copies (the halves of a split): each computes its part of the selection itself
    return any(_reads_in_place(c, body.buffer) for c in consumers)


def _reads_in_place(stmt: tirx.SBlock, buffer: tirx.Buffer) -> bool:
    """Whether `stmt` reads `buffer` at its own iteration point (element for element, same axes)."""
    iters = [iv.var for iv in stmt.iter_vars]
    return any(read.source.same_as(buffer) and len(read.region) == len(iters)
               and all(r.min.same_as(v) for r, v in zip(read.region, iters)) for read in stmt.reads)


def _concat_cuts(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> list[int]:
    """Where a concatenation along the block's innermost axis passes from one part to the next: the
    constants its chain of selects compares that axis with ([] for any other block).

    A select per element costs more than the copy itself (DenseNet-169's concatenation of 13 parts and
    BN + ReLU, 1x28x28x512: 0.78 ms): loops cut at these points read one part each, and the selects fold
    away (0.06 ms)."""
    stmt = sch.get(block)
    if not isinstance(stmt.body, tirx.BufferStore) or not stmt.iter_vars:
        return []
    axis = stmt.iter_vars[-1].var
    value, cuts = stmt.body.value, []
    while isinstance(value, tvm.ir.Call) and str(value.op.name).endswith("if_then_else"):
        cond, then, value = value.args
        if not isinstance(then, tvm.ir.TensorLoad):
            return []
        if isinstance(cond, tirx.LE) and isinstance(cond.a, tirx.IntImm) and cond.b.same_as(axis):
            cuts.append(int(cond.a.value))
        elif isinstance(cond, tirx.LT) and cond.a.same_as(axis) and isinstance(cond.b, tirx.IntImm):
            cuts.append(int(cond.b.value))
        else:
            return []
    return sorted(set(cuts)) if isinstance(value, tvm.ir.TensorLoad) else []


def _cuts(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, concats: list) -> list[int]:
    """Where the block's innermost loop is cut: at its own concatenation's parts (`_concat_cuts`), or at those
    of the first inlined one it reads (`concats`: the parts' buffers, their cuts)."""
    if cuts := _concat_cuts(sch, block):
        return cuts
    reads = [r.source for r in sch.get(block).reads]
    for parts, cuts in concats:
        if all(any(p.same_as(r) for r in reads) for p in parts):
            return cuts
    return []


# Below this many loop iterations a function runs on one thread: waking the pool costs more than it saves.
MIN_PARALLEL_WORK = 32768


# Parallel loop iterations wanted in a spatial function: many more than threads, for load balance.
PARALLEL_CHUNKS = 256


def _work(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> int:
    n = 1
    for loop in sch.get_loops(block):
        n *= _extent(sch, loop) or 1024
    return n


def _schedule_spatial(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int,
                      cuts: list[int] | None = None) -> None:
    """Parallel outer loops, vectorized innermost loop (when it is long enough to fill a vector).

    `cuts`: points of the innermost loop where the block passes from one part of a concatenation to the
    next (`_concat_cuts`); the loop is partitioned there, in vectors that divide every part."""
    loops = sch.get_loops(block)
    if not loops:
        return
    parallel = _work(sch, block) >= MIN_PARALLEL_WORK
    inner_ext = _extent(sch, loops[-1])
    vec = None
    outer = list(loops)
    pieces: list[int] = []
    if cuts and inner_ext is not None:
        bounds = [0, *(c for c in cuts if 0 < c < inner_ext), inner_ext]
        pieces = [b - a for a, b in zip(bounds, bounds[1:])]
        width = math.gcd(lanes, *pieces)
        piece_loop = loops[-1]
        if width > 1:
            piece_loop, vec = sch.split(loops[-1], factors=[None, width])
        pieces = [n // width for n in pieces]
        outer = list(loops[:-1])
    elif inner_ext is not None and inner_ext >= lanes and len(loops) >= 1:
        if inner_ext % lanes == 0 or inner_ext > 4 * lanes:
            outer_loop, vec = sch.split(loops[-1], factors=[None, lanes])
        else:
            vec = loops[-1]
            outer_loop = None
        outer = list(loops[:-1]) + ([outer_loop] if outer_loop is not None else [])
    if outer and parallel:
        # Fuse only the leading loops that give enough parallel chunks: each fused loop costs a division
        # and a modulo per iteration, which dominates a copy such as an RGB image's padding (3 channels).
        lead, n = [], 1
        for loop in outer:
            lead.append(loop)
            n *= _extent(sch, loop) or PARALLEL_CHUNKS
            if n >= PARALLEL_CHUNKS:
                break
        sch.parallel(sch.fuse(*lead) if len(lead) > 1 else lead[0])
    if vec is not None:
        sch.vectorize(vec)
    if len(pieces) > 1:
        sch.loop_partition(piece_loop, [*pieces[:-1], None])


def _root_blocks(rule: CPUScheduleRule, func: tirx.PrimFunc, target: Target) -> tuple | None:
    """A schedule of `func`, the root's child blocks and their infos; None where `rule` is not for `target`."""
    if not isinstance(func, tirx.PrimFunc) or not rule.is_target_available(target):
        return None
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(get_root_block(sch))
    return sch, blocks, [get_sblock_info(sch, b) for b in blocks]


class Contraction(CPUScheduleRule):
    """Conv/matmul/pooling: one reduction block whose output's innermost axis can be vectorized.

    `variant` i > 0 uses the i-th of `tile_candidates` instead of `choose_tile` (None when there is none):
    the schedules tuning times beside the default one."""

    def __init__(self, variant: int = 0):
        super().__init__()
        self.variant = variant

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if (root := _root_blocks(self, func, target)) is None:
            return None
        sch, blocks, infos = root
        reductions = [i for i, info in enumerate(infos) if info.is_reduction()]
        if len(reductions) != 1:
            return None
        r = reductions[0]
        red = blocks[r]
        if not _simple_loop_nest(sch, red):
            return None
        kinds = infos[r].dom_kind()
        n_spatial = len(kinds) - len(kinds.lstrip("S"))
        if n_spatial == 0 or "S" in kinds[n_spatial:]:
            return None
        stmt = sch.get(red)
        if len(stmt.writes) != 1 or str(stmt.writes[0].source.dtype) not in ("float32", "float16", "float64"):
            return None
        out_region = stmt.writes[0].region
        if not out_region[-1].min.same_as(stmt.iter_vars[n_spatial - 1].var):
            return None  # the innermost output axis is not the last spatial iter: no contiguous vector axis
        dtype_bits = tvm.runtime.DataType(str(stmt.writes[0].source.dtype)).bits
        lanes = vector_lanes(target, dtype_bits)
        group = _channel_group(stmt, n_spatial)
        if group is not None:
            lanes = group_lanes(group, lanes) or lanes
        loops = sch.get_loops(red)
        n_ext = _extent(sch, loops[n_spatial - 1])
        if n_ext is None or n_ext < 4:
            return None

        # Prologue: inline what is injective, except padding (kept as its own pass over the input, so
        # the inner loops do not test bounds) unless the input is read better through bounds tests.
        streamed = _streamed_column_input(stmt, n_spatial)
        bounds_tested = [buf for buf in (streamed, _strided_grouped_input(stmt, n_spatial)) if buf is not None]
        pads = []
        for b in reversed(blocks[:r]):
            if _is_pad(sch, b) and not any(sch.get(b).writes[0].source.same_as(buf) for buf in bounds_tested):
                pads.append(b)
                continue
            try:
                sch.compute_inline(b)
            except Exception:  # noqa: BLE001 - TVM's schedule errors are plain TVMError
                pads.append(b)
        # Epilogue: fold the chain of elementwise blocks into its last block. A last block broadcasting the
        # result over a larger tensor (squeeze-and-excitation scaling a feature map by a 1x1 conv of its
        # pooled channels) runs as its own parallel loop over images and rows once the reduction is done,
        # the chain before it folded into the reduction: inside the reduction's tiles it ran on one thread
        # per image or per few channels, while the kernels around it split by rows (EfficientNet-B0 at
        # batch 8 scaled 8x112x112x32 on one thread), and recomputed the chain for every pixel.
        epilogue = list(blocks[r + 1:])
        scale = []
        out_bytes = _buffer_bytes(stmt.writes[0].source)
        if (epilogue and _buffer_bytes(sch.get(epilogue[-1]).writes[0].source) > out_bytes
                and all(_same_shape(sch.get(b).writes[0], stmt.writes[0]) for b in epilogue[:-1])):
            epilogue, scale = epilogue[:-1], epilogue[-1:]
        for b in epilogue[:-1]:
            try:
                sch.compute_inline(b)
            except Exception:  # noqa: BLE001
                return None
        epilogue = epilogue[-1:]

        spatial, reduce = loops[:n_spatial], loops[n_spatial:]
        work = _work(sch, red)
        m_ext = _extent(sch, spatial[-2]) if n_spatial >= 2 else 1
        on_stack = stack_vectors(lanes, dtype_bits)
        tiles = tile_candidates(m_ext or 1, n_ext, lanes, vector_registers(target), on_stack)
        if self.variant >= len(tiles):
            return None
        tile = tiles[self.variant]
        if self.variant == 0 and streamed is not None:
            tile = pixel_tile(m_ext or 1, n_ext, lanes, min(STREAMED_TILE_REGISTERS, on_stack)) or tile
        elif (self.variant == 0 and out_bytes > STREAMED_OUTPUT_BYTES
              and math.prod(_extent(sch, lp) or 1 << 30 for lp in reduce) <= WRITE_BOUND_REDUCTION):
            budget = min(vector_registers(target) * 3 // 4, on_stack)
            tile = pixel_tile(m_ext or 1, n_ext, lanes, budget, min_rows=2) or tile
        vec = vector_width(tile.cols, lanes)
        col_o, col_v, col_i = sch.split(spatial[-1], factors=[None, tile.cols // vec, vec])
        if n_spatial >= 2:
            row_o, row_i = sch.split(spatial[-2], factors=[None, tile.rows])
            outer = list(spatial[:-2]) + [row_o, col_o]
            col_tiles = _extent(sch, col_o) or 1
            panel = _panel_tiles(_weight_bytes(stmt, n_spatial), col_tiles)
            if panel < col_tiles:
                # Sweep all rows over one panel of columns at a time: its weights stay in cache. With
                # several threads, each sweeps its own share of the rows (`_thread_rows`).
                panel_o, col_o = sch.split(col_o, factors=[None, panel])
                rows = outer[:-1]
                share = _thread_rows(sch, rows, target_threads(target))
                if share is not None:
                    outer = [share[0], panel_o, share[1], col_o]
                else:
                    outer = [panel_o] + rows + [col_o]
            sch.reorder(*outer, *reduce, row_i, col_v, col_i)
        else:
            row_i = None
            outer = [col_o]
            sch.reorder(col_o, *reduce, col_v, col_i)

        # Accumulate in a tile of its own (on the stack: `STACK_TILE_BYTES`); the epilogue reads the tile and
        # writes the function's output. (TVM takes only "global" allocations onto the stack.)
        write_back = sch.cache_write(red, 0, "global")
        sub_region = bool(epilogue) and not _same_shape(sch.get(epilogue[0]).writes[0], stmt.writes[0])
        if epilogue and not sub_region:
            sch.reverse_compute_inline(epilogue[0])  # (raises when impossible: the stock schedules take over)
        sch.reverse_compute_at(write_back, outer[-1])
        if sub_region:
            # An epilogue writing fewer elements than the reduction (a slice dropping padded channels) is
            # computed beside the tile: TVM would inline it over the whole domain without a bound check.
            sch.reverse_compute_at(epilogue[0], outer[-1])
            _vectorize_tail(sch, epilogue[0], lanes)
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        if work >= MIN_PARALLEL_WORK:
            sch.parallel(fused)

        # Vectorize while the block is still a complete reduction (the update alone no longer passes the
        # dataflow check), then split off the initialisation; its loops inherit the annotations.
        # One vector register per innermost loop: wider vector types make LLVM shuffle lane by lane.
        if row_i is not None:
            sch.unroll(row_i)
        sch.unroll(col_v)
        sch.vectorize(col_i)
        if reduce:
            sch.decompose_reduction(red, reduce[0])
        _vectorize_tail(sch, write_back, lanes)
        for p in pads:
            _schedule_spatial(sch, p, lanes)
        for b in scale:
            _schedule_spatial(sch, b, lanes)
        rows_input = _streamed_rows_input(sch, sch.get(red), reduce, n_spatial) if tile.cols >= n_ext else None
        if rows_input is not None:
            # Copy the tile's rows of input to a contiguous buffer first: one sequential stream from memory
            # instead of one per row, advancing a float per multiply-add step.
            copy = sch.cache_read(red, rows_input, "global")
            sch.compute_at(copy, fused)
            _vectorize_tail(sch, copy, lanes)
        return sch


def _streamed_rows_input(sch: s_tir.Schedule, stmt: s_tir.SBlock, reduce: list, n_spatial: int) -> int | None:
    """The index among `stmt`'s reads of the input rows of a 1x1 conv or matmul (a reduction over channels
    only) reducing over at least COPIED_ROWS_REDUCTION channels, when the input is too large for the L2s
    (STREAMED_ROWS_BYTES); None otherwise. MobileNet-v2's projections at batch 8, the input coming from
    memory: 144 -> 24 channels at 56x56 2.2 -> 1.8 ms with the tile's rows copied first, 96 -> 24 1.4 -> 1.05
    ms, 192 -> 32 at 28x28 0.68 -> 0.60 ms. The copy repeats per column tile, so only reductions with one
    column tile qualify (ResNet-50's 256 -> 64 lost 12%), and 3x3 convs lost 5% (DenseNet's 128 -> 32 at
    56x56)."""
    extents = [_extent(sch, lp) or 0 for lp in reduce]
    if not extents or max(extents) < COPIED_ROWS_REDUCTION or math.prod(extents) != max(extents):
        return None
    iters = [iv.var for iv in stmt.iter_vars]
    col_var, row_vars = iters[n_spatial - 1], set(iters[: n_spatial - 1])
    for index, read in enumerate(stmt.reads):
        mins = [r.min for r in read.region]
        if (_buffer_bytes(read.source) > STREAMED_ROWS_BYTES and not any(_mentions(m, {col_var}) for m in mins)
                and any(_mentions(m, row_vars) for m in mins)):
            return index
    return None


COPIED_ROWS_REDUCTION = 64
STREAMED_ROWS_BYTES = 4 * 1024 * 1024


def _streamed_column_input(stmt: s_tir.SBlock, n_spatial: int) -> tirx.Buffer | None:
    """The input a reduction reads at its own output column (a depthwise conv reads input channel c for output
    channel c, at the output's pixel) when it is too large to stay in cache; None otherwise. (A weight read at
    the output column but at no pixel, such as Winograd's per tile element, is not one: every row reuses it.)
    Each element of such an input feeds only the few multiply-adds of its window, so the conv runs at the
    speed its input streams from memory:
    - a padding pass over the input costs as much memory traffic as the conv itself, so the conv reads
      through the padding's bounds tests instead (MobileNet-v2's depthwise convs at batch 8: 5.3 ms with
      the pass, 3.3 ms without); on inputs that stay in a core's cache the pass is cheap;
    - the register tile spans whole pixels (`pixel_tile`).
    A grouped conv's input channel also depends on a reduction (its group's channels): each element feeds
    that many more multiply-adds, so it is not streamed. Through bounds tests, ResNeXt-50's 14x14x512 conv
    in groups of 16 took 2.8 ms at batch 8, against 1.5 ms with the padding pass."""
    col = stmt.iter_vars[n_spatial - 1].var
    rows = {stmt.iter_vars[n_spatial - 2].var} if n_spatial >= 2 else set()
    reduced = {iv.var for iv in stmt.iter_vars[n_spatial:] if not _is_one(iv.dom.extent)}
    for read in stmt.reads:
        channel = read.region[-1].min
        if (_buffer_bytes(read.source) > STREAMED_INPUT_BYTES and _mentions(channel, {col})
                and not _mentions(channel, reduced)
                and any(_mentions(r.min, rows) for r in read.region)):
            return read.source
    return None


def _strided_grouped_input(stmt: s_tir.SBlock, n_spatial: int) -> tirx.Buffer | None:
    """The input of a grouped conv with a stride of 2 or more, which it reads through the padding's bounds
    tests rather than after a padding pass. Each input element feeds a quarter of the multiply-adds it feeds
    at stride 1, so the pass costs more than the tests. Groups of 16 at batch 8 (RegNetY's), pass -> tests:
    8x112x112x64 5.8 -> 4.3 ms, 8x56x56x144 3.2 -> 2.6, 8x28x28x320 1.3 -> 1.0, 8x14x14x784 0.66 -> 0.42;
    at batch 1 0.31 -> 0.26 and 0.21 -> 0.16 ms; ResNeXt-50's 8x56x56x256 in groups of 8 4.8 -> 3.7 ms. At
    stride 1 the pass wins (see `_streamed_column_input`; 8x56x56x64 in groups of 16: 2.7 against 2.8 ms)."""
    if n_spatial < 2:
        return None
    col, row = stmt.iter_vars[n_spatial - 1].var, stmt.iter_vars[n_spatial - 2].var
    reduced = {iv.var for iv in stmt.iter_vars[n_spatial:] if not _is_one(iv.dom.extent)}
    for read in stmt.reads:
        channel = read.region[-1].min
        if (len(read.region) >= 2 and _mentions(channel, {col}) and _mentions(channel, reduced)
                and (_coefficient(read.region[-2].min, row) or 0) >= 2):
            return read.source
    return None


def _coefficient(expr: tirx.Expr, var: tirx.Var) -> int | None:
    """The constant factor of `var` in an index built of sums and constant multiples (None otherwise)."""
    if isinstance(expr, tirx.Var):
        return int(expr.same_as(var))
    if isinstance(expr, tirx.Cast):
        return _coefficient(expr.value, var)
    if isinstance(expr, (tirx.Add, tirx.Sub)):
        a, b = _coefficient(expr.a, var), _coefficient(expr.b, var)
        if a is None or b is None:
            return None
        return a + b if isinstance(expr, tirx.Add) else a - b
    if isinstance(expr, tirx.Mul):
        for x, y in ((expr.a, expr.b), (expr.b, expr.a)):
            if isinstance(y, tirx.IntImm):
                c = _coefficient(x, var)
                return None if c is None else c * int(y)
    return None if _mentions(expr, {var}) else 0


# Accumulators of a register tile over a streamed input (`pixel_tile`). Its multiply-adds share no operand
# but the weight, so more rows only lengthen the window of pixels read at once.
STREAMED_TILE_REGISTERS = 9

# Outputs larger than this (half the shared L3) are written to memory. Where each output element also
# takes at most WRITE_BOUND_REDUCTION multiply-adds, writing it is the cost, and `pixel_tile` applies. (A
# compute-bound reduction keeps the usual tile: Inception's first Winograd matmul at batch 8, 77 MB of
# output from 64 channels, took 50 ms with 2 pixels x 192 channels against 21 ms.)
STREAMED_OUTPUT_BYTES = 16 * 1024 * 1024
WRITE_BOUND_REDUCTION = 32


def pixel_tile(m: int, n: int, lanes: int, accumulators: int, min_rows: int = 1) -> Tile | None:
    """A register tile of every channel of a few output pixels, so that each tile reads (or writes) whole
    pixels in address order; None when fewer than `min_rows` pixels fit in `accumulators` vector registers.
    For reductions over a streamed input (`_streamed_column_input`) and outputs beyond the cache. Measured at
    batch 8, against the usual tile of 8 pixels x 32 or 48 channels:
    - MobileNet-v2's stride-2 depthwise conv, 8x112x112x96: 1.35 ms for 1 pixel x 96 channels, 3.1 ms;
      at 8x56x56x144, 1-3 pixels x 144 channels took 1.2-1.5 ms against 1.8-2.1 ms;
    - 1x1 convs with 16 input channels writing 26-51 MB (112x112 x 64, 96, 128 channels): 1.4-2.2x faster
      (16 -> 96: 4 pixels x 96 channels 2.0 ms, against 4.7 ms). At 10-14 MB outputs the tiles tie. With
      the accumulators on the stack (`STACK_TILE_BYTES`), 2 pixels x 96 channels: 1.7 ms."""
    vregs = -(-n // lanes)
    rows = max(d for d in _divisors(m) if d * vregs <= accumulators or d == 1)
    if rows < min_rows or rows * vregs > accumulators:
        return None
    return Tile(rows=rows, cols=n)


# Inputs larger than this come from the shared L3 or memory in a whole model, not from a core's L2 (1 MiB
# on Zen 4). Timed alone, a kernel finds its input in cache at any size, so the threshold was set on whole
# models: MobileNet-v2 was 1.07-1.14x faster at batch 1 and 1.04x at batch 8 with 1 MiB than with 8 MiB.
STREAMED_INPUT_BYTES = 1024 * 1024


def _same_shape(a: tirx.BufferRegion, b: tirx.BufferRegion) -> bool:
    return [int(d) for d in a.source.shape] == [int(d) for d in b.source.shape]


def _buffer_bytes(buf: tirx.Buffer) -> int:
    n = tvm.runtime.DataType(str(buf.dtype)).bits // 8
    for d in buf.shape:
        n *= int(d) if isinstance(d, tirx.IntImm) else 1
    return n


# Weights per column panel: the columns whose weights one sweep over all rows keeps in the core's cache
# (half of a 1 MiB L2, leaving room for the rows' inputs).
WEIGHT_PANEL_BYTES = 512 * 1024


def target_threads(target: Target) -> int:
    """The thread count a target was built for (`--threads`, recorded as its num-cores; 1 when unset)."""
    return int(target.attrs.get("num-cores", 1) or 1)


def _thread_rows(sch: s_tir.Schedule, rows: list, threads: int) -> tuple | None:
    """The row loops (images, output rows, row tiles) fused and split into one share per thread: the
    (share, rows within the share) loops, or None when the rows do not divide evenly (or one thread).

    A parallel loop is split into contiguous equal ranges, one per thread, so a loop over weight panels
    outermost hands each thread half of the output channels of every pixel, while the kernels around it
    split by images or rows: the next kernel's threads would each read half of their input from the other
    core's cache (and the two cores need not share one). Each thread sweeping its own rows over every panel
    keeps the split by rows (ResNet-50 at batch 8, whose 1x1 convs at 14x14 and 7x7 sweep panels: 331 ->
    318 ms where the cores share no L3, unchanged where they do)."""
    if threads < 2:
        return None
    extents = [_extent(sch, lp) for lp in rows]
    if any(e is None for e in extents) or math.prod(extents) % threads or math.prod(extents) < 2 * threads:
        return None
    fused = sch.fuse(*rows) if len(rows) > 1 else rows[0]
    share, within = sch.split(fused, factors=[threads, None])
    return share, within


def _panel_tiles(weight_bytes: int, col_tiles: int) -> int:
    """Column tiles per panel: the most that divide the column tiles and whose weights fit the panel."""
    per_tile = weight_bytes / col_tiles
    return max(d for d in _divisors(col_tiles) if d == 1 or d * per_tile <= WEIGHT_PANEL_BYTES)


def _weight_bytes(stmt: s_tir.SBlock, n_spatial: int) -> int:
    """Bytes of the operands indexed by the column axis and not by the rows (the weights), per slice: a
    weight dimension indexed by an outer spatial axis (Winograd's tile element, a batched matmul's batch) is
    one index at a time."""
    iters = [iv.var for iv in stmt.iter_vars]
    col = {iters[n_spatial - 1]}
    rows = {iters[n_spatial - 2]} if n_spatial >= 2 else set()
    outer = set(iters[: max(n_spatial - 2, 0)])
    total = 0
    for read in stmt.reads:
        mins = [r.min for r in read.region]
        if any(_mentions(m, rows) for m in mins) or not any(_mentions(m, col) for m in mins):
            continue
        size = tvm.runtime.DataType(str(read.source.dtype)).bits // 8
        for m, d in zip(mins, read.source.shape):
            if not _mentions(m, outer) and isinstance(d, tirx.IntImm):
                size *= int(d)
        total += size
    return total


def _is_one(extent: tirx.Expr) -> bool:
    return isinstance(extent, tirx.IntImm) and int(extent) == 1


def _mentions(expr: tirx.Expr, variables: set) -> bool:
    used = tirx.analysis.undefined_vars(expr)
    return any(u.same_as(v) for u in used for v in variables)


def _vectorize_tail(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int) -> None:
    """Vectorize a tile-local block by whole vector registers and unroll the loops above, within the tile."""
    loops = sch.get_loops(block)
    if not loops:
        return
    ext = _extent(sch, loops[-1]) or lanes
    # Half- or quarter-width vectors where full ones do not divide the tile (120 channels: 15 of 8 lanes; 116:
    # 29 of 4). Vectorized whole, LLVM assembled the odd-length vector lane by lane: MobileNet-v3's 5x5
    # depthwise conv over 120 channels with its hard-swish took 0.67 ms at batch 8, against 0.13 ms padded to
    # 128 channels; ShuffleNet-v2's stride-2 depthwise conv over 116, 0.27 ms against 0.08 ms.
    width = vector_width(ext, lanes)
    if ext > lanes and (width == lanes or (width >= 4 and ext <= 32 * width)):
        outer, inner = sch.split(loops[-1], factors=[None, width])
        sch.vectorize(inner)
        sch.unroll(outer)
    else:
        sch.vectorize(loops[-1])
    loops = sch.get_loops(block)
    if len(loops) >= 3 and (_extent(sch, loops[-3]) or 99) <= 16 and not _is_parallel(sch, loops[-3]):
        sch.unroll(loops[-3])  # (a parallel loop of few tiles above a one-row tile stays parallel)


def _is_parallel(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> bool:
    return sch.get(loop).kind == tirx.ForKind.PARALLEL


class Elementwise(CPUScheduleRule):
    """Fallback: inline injective chains, then parallelize and vectorize every remaining block."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(get_root_block(sch))
        tile, tiled = _tile_annotation(sch, blocks)
        concats = []  # (the parts' buffers, where they are cut) of the concatenations inlined in place
        per_tile: list[str] = []  # pixel-tile blocks read by several consumers (`_compute_per_tile`)
        for b in blocks[:-1]:
            if not get_sblock_info(sch, b).is_injective():
                continue
            stmt = sch.get(b)
            consumers = sch.get_consumers(b)
            if tiled(b) and len(consumers) > 1:
                per_tile.append(stmt.name_hint)
                continue
            # A pixel-tile block and the elementwise chain after it are inlined although they select among
            # expressions: each element is computed once anyway. So are a concatenation read in place and
            # what reads it in place after it (their consumer's loop is cut at the parts).
            in_place = all(_reads_in_place(sch.get(c), stmt.writes[0].source) for c in consumers)
            cuts = _cuts(sch, b, concats) if in_place else []
            if tiled(b) or cuts or not _keeps_copy(sch, b):
                try:
                    sch.compute_inline(b)
                except Exception:  # noqa: BLE001
                    continue
                if cuts:
                    concats.append(([r.source for r in stmt.reads], cuts))
        lanes = vector_lanes(target)
        for b in sch.get_child_blocks(get_root_block(sch)):
            info = get_sblock_info(sch, b)
            loops = sch.get_loops(b)
            if not loops or sch.get(b).name_hint in per_tile:
                continue
            if info.is_injective():
                if tiled(b) and _schedule_pixel_tiles(sch, b, tile, lanes):
                    _compute_per_tile(sch, [sch.get_sblock(name) for name in per_tile], b, lanes)
                    per_tile = []
                else:
                    _schedule_spatial(sch, b, lanes, _cuts(sch, b, concats))
            else:
                kinds = info.dom_kind()
                n_lead = len(kinds) - len(kinds.lstrip("S"))
                if n_lead and len(loops) == len(kinds) and _work(sch, b) >= MIN_PARALLEL_WORK:
                    lead = sch.fuse(*loops[:n_lead]) if n_lead > 1 else loops[0]
                    sch.parallel(lead)
        for name in per_tile:  # (no pixel-tile consumer took them)
            _schedule_spatial(sch, sch.get_sblock(name), lanes)
        return sch


class RowReduction(CPUScheduleRule):
    """Layer norm, RMS norm, softmax: reductions over the trailing axes of each row, then elementwise blocks
    over the same rows.

    Rows run in parallel, every block computed inside its row. Each reduction sums (or takes the maximum
    of) vectors of lanes first and then the lanes of one vector: dlight's CPU `Reduction` ran them as one
    scalar chain per row, and where the rows were a single one (a classifier's final layer norm over 768
    channels) it computed both reductions again for every output element. ConvNeXt-tiny's 22 layer norms at
    batch 1: 3.3 -> 0.6 ms; a 6-layer transformer (128 tokens, 384 wide): 17.8 -> 16.7 ms. The summation
    order per row becomes lane-wise, which changes results in the last bits only."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if (root := _root_blocks(self, func, target)) is None:
            return None
        sch, blocks, infos = root
        if len(blocks) < 2 or not infos[-1].is_injective() or all(i.is_injective() for i in infos):
            return None
        if not all(_simple_loop_nest(sch, b) for b in blocks):
            return None
        kinds = [i.dom_kind() for i in infos if not i.is_injective()]
        n_rows = len(kinds[0]) - len(kinds[0].lstrip("S"))
        if any(k != "S" * n_rows + "R" * (len(k) - n_rows) for k in kinds):
            return None  # reduces over a leading axis (NHWC pooling), or over other rows
        rows = [_extent(sch, lp) for lp in sch.get_loops(blocks[-1])[:n_rows]]
        if any([_extent(sch, lp) for lp in sch.get_loops(b)[:n_rows]] != rows for b in blocks):
            return None
        lanes = vector_lanes(target, tvm.runtime.DataType(str(sch.get(blocks[-1]).writes[0].source.dtype)).bits)
        try:
            self._schedule(sch, blocks, [i.is_injective() for i in infos], n_rows, lanes)
        except Exception:  # noqa: BLE001 - a reduction rfactor cannot split: dlight's rule takes the function
            return None
        return sch

    @staticmethod
    def _schedule(sch: s_tir.Schedule, blocks: list, injective: list[bool], n_rows: int, lanes: int) -> None:
        # Vector partial results first, while each reduction is still its own loop nest (rfactor's condition).
        partial = []
        for b in (b for b, inj in zip(blocks, injective) if not inj):
            inner = sch.get_loops(b)[-1]
            width = vector_width(_extent(sch, inner) or 1, lanes)
            if width < 4 or (_extent(sch, inner) or 0) <= width:
                continue
            _, lane = sch.split(inner, factors=[None, width])
            partial.append(sch.rfactor(lane, len(sch.get(b).writes[0].region)))

        last = sch.get_loops(blocks[-1])
        if n_rows:
            row = sch.fuse(*last[:n_rows]) if n_rows > 1 else last[0]
        else:
            row, _ = sch.split(last[0], factors=[1, None])
        for b in reversed(sch.get_child_blocks(get_root_block(sch))[:-1]):
            sch.compute_at(b, row, preserve_unit_loops=True)
        if _work(sch, blocks[-1]) >= MIN_PARALLEL_WORK and (_extent(sch, row) or 0) > 1:
            sch.parallel(row)
        for b in partial:
            # Under the row loop: the lanes, the row's (unit) loops, the reduction's loops. Lanes go innermost.
            lane, *rest = sch.get_loops(b)[1:]
            sch.reorder(*rest, lane)
            sch.vectorize(lane)
            sch.decompose_reduction(b, rest[n_rows])
        for b in (b for b, inj in zip(blocks, injective) if inj):
            loops = sch.get_loops(b)
            width = vector_width(_extent(sch, loops[-1]) or 1, lanes)
            if len(loops) > 1 and width >= 4:
                sch.vectorize(sch.split(loops[-1], factors=[None, width])[1])


# Block annotation of a function computing each NHWC output pixel by one of tile x tile expressions, chosen
# by the pixel's place in its tile (Winograd's output transform). Its rows and columns are split by the tile
# and unrolled (`_schedule_pixel_tiles`).
TILE_ANNOTATION = "sparsecc.pixel_tile"


def _tile_annotation(sch: s_tir.Schedule, blocks: list) -> tuple:
    """The pixel tile of the function's annotated block (or None), and a test for the blocks it applies
    to: those writing a tensor of the annotated block's shape (its elementwise epilogue, not a padding)."""
    annotated = [b for b in blocks if TILE_ANNOTATION in sch.get(b).annotations]
    if not annotated:
        return None, lambda _block: False
    stmt = sch.get(annotated[0])
    tile = int(stmt.annotations[TILE_ANNOTATION])
    return tile, lambda block: _same_shape(sch.get(block).writes[0], stmt.writes[0])


def _schedule_pixel_tiles(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, tile: int, lanes: int) -> bool:
    """Tiles of `tile` x `tile` pixels in parallel, then channel vectors, then the tile's pixels unrolled
    (their expressions then fold to one each, sharing their common terms). False when the block is not an
    NHWC loop nest."""
    loops = sch.get_loops(block)
    extents = [_extent(sch, lp) for lp in loops]
    if len(loops) != 4 or None in extents:
        return False
    n, h, w, c = loops
    h_o, h_i = sch.split(h, factors=[None, tile])
    w_o, w_i = sch.split(w, factors=[None, tile])
    width = math.gcd(extents[3], lanes)
    c_o, c_i = sch.split(c, factors=[None, width])
    sch.reorder(n, h_o, w_o, c_o, h_i, w_i, c_i)
    sch.parallel(sch.fuse(n, h_o, w_o))
    sch.unroll(h_i)
    sch.unroll(w_i)
    if width > 1:
        sch.vectorize(c_i)
    return True


def _compute_per_tile(sch: s_tir.Schedule, blocks: list, consumer: s_tir.schedule.SBlockRV,
                      lanes: int) -> None:
    """Computes each of `blocks` (pixel-tile values that several blocks read, such as a Winograd output plus
    bias that SiLU multiplies by its own sigmoid) per tile and channel vector of `consumer`
    (`_schedule_pixel_tiles`) into a local buffer, its pixels unrolled, instead of inlining a copy of its
    expression into each reader. Inlined, a Winograd output's chain of selects over the tile's 16 sums was
    repeated several times per pixel: 20-30 s to compile each such function of YOLOX-s."""
    channel_loop = sch.get_loops(consumer)[1]
    for block in reversed(blocks):  # the last one's readers are all in `consumer` already
        try:
            sch.compute_at(block, channel_loop, preserve_unit_loops=False)
        except Exception:  # noqa: BLE001 - e.g. a tile the region analysis cannot cover: inline it as before
            sch.compute_inline(block)
            continue
        sch.set_scope(block, 0, "local")
        loops = sch.get_loops(block)[2:]
        for loop in loops[:-1]:
            sch.unroll(loop)
        if loops:
            sch.vectorize(loops[-1])


def _rules() -> list[CPUScheduleRule]:
    return [Contraction(), RowReduction(), dlight.cpu.Reduction(), Elementwise()]


def default_schedule(func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
    """The schedule `schedule_passes` gives `func` (None: no rule applies), e.g. to measure it as a tuning
    candidate."""
    for rule in _rules():
        sch = rule.apply(func, target, False)
        if sch is not None:
            return sch
    return None


def schedule_variants(func: tirx.PrimFunc, target: Target) -> list[s_tir.Schedule]:
    """`default_schedule` followed by the contraction's other register tiles (tuning times them all)."""
    first = default_schedule(func, target)
    if first is None:
        return []
    variants = [first]
    for i in range(1, 32):
        try:
            sch = Contraction(i).apply(func, target, False)
        except Exception:  # noqa: BLE001 - a tile the schedule primitives refuse is not a candidate
            continue
        if sch is None:
            break
        variants.append(sch)
    return variants


def schedule_passes(target: Target) -> list[tvm.transform.Pass]:
    return [dlight.ApplyDefaultSchedule(*_rules())]
