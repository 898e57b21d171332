"""Channel shuffles, splits and concatenations kept in NHWC after the CPU layout conversion.

`ConvertLayout` (codegen.layout) carries NHWC forward through ops that have layout inference, but ShuffleNet's
channel shuffle (Reshape (N,C,H,W)->(N,g,C/g,H,W), Transpose (0,2,1,3,4), Reshape back) has none: Relax's
reshape cannot follow a layout. Each shuffle then runs in NCHW between an NHWC->NCHW and an NCHW->NHWC
transpose, and the Split and Concat around it stay in NCHW with it. In NHWC the shuffle is a permutation of the
innermost axis: reshape (N,H,W,C)->(N,H,W,g,C/g), swap the last two axes, reshape back; legalization fuses
the three into one copy.

`ShuffleToNHWC` runs right after `ConvertLayout`. Each shuffle whose input derives from NHWC values without
a transpose is computed in NHWC and followed by one NHWC->NCHW transpose; each NCHW->NHWC transpose
`permute_dims(v, [0,2,3,1])` is then replaced by an NHWC computation of v when one exists: through the
NHWC->NCHW transposes (ConvertLayout's and the shuffles'), channel concatenations, splits and slices (one rule
per op in `_RULES`). Transposes that cancel disappear, and so do the NCHW ops left unused.
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .frontend import rewrite_relax_functions
from .sparse.rewrite import static_shape

TO_NHWC = (0, 2, 3, 1)
TO_NCHW = (0, 3, 1, 2)


def _nhwc_axis(axis: int) -> int:
    """The NHWC axis of NCHW axis `axis`."""
    return TO_NHWC.index(axis % 4)


def _axes(call: relax.Call) -> tuple[int, ...] | None:
    axes = call.attrs.axes
    return None if axes is None else tuple(int(a) for a in axes)


def _is_op(expr: relax.Expr | None, name: str) -> bool:
    return isinstance(expr, relax.Call) and expr.op == tvm.ir.Op.get(name)


def shuffle_nhwc(x: relax.Expr, groups: int, shape: tuple[int, ...]) -> relax.Expr:
    """Channel shuffle of NHWC `x` (of `shape`): channel i*groups + j of the result is channel j*(C/groups) + i."""
    n, h, w, c = shape
    y = relax.op.reshape(x, (n, h, w, groups, c // groups))
    return relax.op.reshape(relax.op.permute_dims(y, [0, 1, 2, 4, 3]), shape)


@mutator
class _ShuffleToNHWC(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.nhwc: dict[relax.Var, relax.Expr | None] = {}

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if _is_op(call, "relax.permute_dims") and _axes(call) == TO_NHWC:
            nhwc = self.nhwc_of(call.args[0])
            return call if nhwc is None else nhwc
        if _is_op(call, "relax.reshape"):
            # The NCHW result becomes a transpose of the NHWC shuffle: consumers moved to NHWC cancel it,
            # and one left in NCHW (a graph output) pays for one transpose.
            shuffled = _shuffle(self, call)
            if shuffled is not None:
                return relax.op.permute_dims(self.builder_.emit(shuffled), TO_NCHW)
        return call

    def nhwc_of(self, v: relax.Expr) -> relax.Expr | None:
        """`v` (an NCHW tensor, or a tuple of them) computed in NHWC without a transpose; None if it cannot be."""
        if not isinstance(v, relax.Var):
            return None
        if v not in self.nhwc:
            self.nhwc[v] = self._derive(self.lookup_binding(v))
        return self.nhwc[v]

    def _derive(self, value: relax.Expr | None) -> relax.Expr | None:
        if isinstance(value, relax.TupleGetItem):
            parts = self.nhwc_of(value.tuple_value)
            return None if parts is None else self.builder_.emit(relax.TupleGetItem(parts, value.index))
        if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
            return None
        rule = _RULES.get(value.op.name)
        if rule is None:
            return None
        expr = rule(self, value)
        return None if expr is None else self.builder_.emit(expr)


def _from_transpose(m: _ShuffleToNHWC, call: relax.Call) -> relax.Expr | None:
    return call.args[0] if _axes(call) == TO_NCHW else None


def _concat(m: _ShuffleToNHWC, call: relax.Call) -> relax.Expr | None:
    if not isinstance(call.args[0], relax.Tuple) or call.attrs.axis is None:
        return None
    parts = [m.nhwc_of(f) for f in call.args[0].fields]
    if any(p is None for p in parts):
        return None
    return relax.op.concat(parts, axis=_nhwc_axis(int(call.attrs.axis)))


def _split(m: _ShuffleToNHWC, call: relax.Call) -> relax.Expr | None:
    x = m.nhwc_of(call.args[0])
    if x is None:
        return None
    sections = call.attrs.indices_or_sections
    sections = int(sections) if isinstance(sections, tvm.tirx.IntImm) else [int(i) for i in sections]
    return relax.op.split(x, sections, axis=_nhwc_axis(int(call.attrs.axis)))


def _strided_slice(m: _ShuffleToNHWC, call: relax.Call) -> relax.Expr | None:
    x = m.nhwc_of(call.args[0])
    if x is None or not all(isinstance(a, relax.Tuple) for a in call.args[1:]):
        return None
    axes = [_nhwc_axis(int(a.value)) for a in call.args[1].fields]
    begin, end, *strides = call.args[2:]
    return relax.op.strided_slice(x, axes, begin, end, strides[0] if strides else None,
                                  assume_inbound=bool(call.attrs.assume_inbound))


def _shuffle(m: _ShuffleToNHWC, call: relax.Call) -> relax.Expr | None:
    """The final reshape of Reshape (N,C,H,W)->(N,g,C/g,H,W), Transpose (0,2,1,3,4), Reshape (N,C,H,W)."""
    swap = m.lookup_binding(call.args[0]) if isinstance(call.args[0], relax.Var) else None
    if not _is_op(swap, "relax.permute_dims") or _axes(swap) != (0, 2, 1, 3, 4):
        return None
    split = m.lookup_binding(swap.args[0]) if isinstance(swap.args[0], relax.Var) else None
    if not _is_op(split, "relax.reshape"):
        return None
    shape, grouped = static_shape(split.args[0]), static_shape(split)
    if shape is None or len(shape) != 4 or static_shape(call) != shape or grouped is None:
        return None
    n, c, h, w = shape
    if len(grouped) != 5 or grouped[0] != n or grouped[3:] != (h, w) or grouped[1] * grouped[2] != c:
        return None
    x = m.nhwc_of(split.args[0])
    return None if x is None else shuffle_nhwc(x, grouped[1], (n, h, w, c))


_RULES: dict[str, Callable[[_ShuffleToNHWC, relax.Call], relax.Expr | None]] = {
    "relax.permute_dims": _from_transpose,
    "relax.concat": _concat,
    "relax.split": _split,
    "relax.strided_slice": _strided_slice,
}


@tvm.transform.module_pass(opt_level=0, name="ShuffleToNHWC")
def shuffle_to_nhwc(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Channel shuffles (and the splits, slices and concatenations around them) computed in NHWC."""
    return relax.transform.DeadCodeElimination()(rewrite_relax_functions(mod, _ShuffleToNHWC(mod)))
