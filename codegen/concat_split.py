"""Convolutions of a channel concatenation, computed as a sum of convolutions of its parts.

SqueezeNet's fire modules concatenate two expand convs and feed the result to the next module's squeeze
conv: the concatenation is a copy of the largest activations in the network (12 MB at batch 8), written and
read back from memory. A conv is linear in its input channels, so

    conv(concat(a, b), W) = conv(a, W[:, :, :Ca]) + conv(b, W[:, :, Ca:])

and the sum fuses into the second conv's epilogue (like a residual add). Each split conv writes and reads
back a partial result per part but the last instead of the concatenation's copy, so the rewrite is done
only where those partial results (output channels x (parts - 1), over all users) are fewer channels than
the concatenation, and where every user of the concatenation is such a conv (otherwise the copy stays
anyway). A max pooling of a concatenation is first moved onto the parts (`pool(concat(a, b)) =
concat(pool(a), pool(b))`, channels being pooled independently), so the concatenation that remains is the
pooled, smaller one, which itself feeds convs.

Runs after the layout passes: convs are NHWC with HWIO weights, concatenations along axis 3.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, PyExprVisitor, mutator, visitor

from .conv_pack import dtype_or_none, nhwc_conv_weight

_CONCAT = tvm.ir.Op.get("relax.concat")
_MAX_POOL = tvm.ir.Op.get("relax.nn.max_pool2d")


def _concat_parts(value: relax.Expr, bindings: dict) -> list[relax.Expr] | None:
    """The parts of a channel (axis 3) concatenation of 4-D tensors, or None."""
    if not isinstance(value, relax.Call) or value.op != _CONCAT or int(value.attrs.axis) not in (3, -1):
        return None
    fields = value.args[0]
    if isinstance(fields, relax.Var):
        fields = bindings.get(fields)
    if not isinstance(fields, relax.Tuple) or len(fields.fields) < 2:
        return None
    return list(fields.fields)


@visitor
class _Uses(PyExprVisitor):
    """Bindings of each var and, for each var, the expressions that use it."""

    def __init__(self):
        super().__init__()
        self.bindings: dict[relax.Var, relax.Expr] = {}
        self.users: dict[relax.Var, list[relax.Expr]] = {}
        self._current: relax.Expr | None = None

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        self.bindings[binding.var] = binding.value
        self._current = binding.value
        self.visit_expr(binding.value)
        self._current = None  # a use outside any binding (a function's result) is no call's

    def visit_var_(self, var: relax.Var) -> None:
        self.users.setdefault(var, []).append(self._current)

    def visit_dataflow_var_(self, var: relax.DataflowVar) -> None:
        self.visit_var_(var)


def _channels(expr: relax.Expr) -> int | None:
    shape = getattr(expr.ty, "shape", None)
    if shape is None or not isinstance(shape.values[-1], tvm.tirx.IntImm):
        return None
    return int(shape.values[-1])


def _splittable(conv: relax.Expr) -> bool:
    return isinstance(conv, relax.Call) and nhwc_conv_weight(conv) is not None


@mutator
class _Rewriter(PyExprMutator):
    """Moves the max pools of `pools`' concatenations onto their parts; splits the convs of `splits`'."""

    def __init__(self, mod: tvm.IRModule, pools: dict, splits: dict):
        super().__init__(mod)
        self.pools, self.splits = pools, splits

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        if call.op == _MAX_POOL and call.args[0] in self.pools:
            a = call.attrs
            pooled = [self.builder_.emit(relax.op.nn.max_pool2d(
                self.visit_expr(p), a.pool_size, a.strides, a.padding, a.dilation, a.ceil_mode,
                a.count_include_pad, a.layout, a.out_layout)) for p in self.pools[call.args[0]]]
            return relax.op.concat(pooled, axis=3)
        if call.args and call.args[0] in self.splits and nhwc_conv_weight(call) is not None:
            return self._split(call, self.splits[call.args[0]])
        return super().visit_call_(call)

    def _split(self, call: relax.Call, parts: list[relax.Expr]) -> relax.Expr:
        w = call.args[1].value.numpy()
        a = call.attrs
        convs, start = [], 0
        for part in parts:
            c = _channels(part)
            weight = relax.const(np.ascontiguousarray(w[:, :, start:start + c]))
            start += c
            convs.append(self.builder_.emit(relax.op.nn.conv2d(
                self.visit_expr(part), weight, a.strides, a.padding, a.dilation, a.groups, a.data_layout,
                a.kernel_layout, a.out_layout, dtype_or_none(a.out_dtype))))
        out = convs[0]
        for conv in convs[1:-1]:
            out = self.builder_.emit(relax.op.add(out, conv))
        return relax.op.add(out, convs[-1])


def _pooled(parts: list[relax.Expr], users: list[relax.Expr]) -> bool:
    """Whether the concatenation's only user is an NHWC max pooling."""
    return len(users) == 1 and isinstance(users[0], relax.Call) and users[0].op == _MAX_POOL and \
        str(users[0].attrs.layout) == "NHWC"


def _split(parts: list[relax.Expr], users: list[relax.Expr]) -> bool:
    """Whether every user is a conv, and their partial sums cost less than the concatenation: each user
    writes and reads back one partial sum per part but the last; the copy saved is one."""
    if any(_channels(p) is None for p in parts) or not users or not all(_splittable(u) for u in users):
        return False
    partial = sum((len(parts) - 1) * int(u.args[1].value.shape[3]) for u in users)
    return partial < sum(_channels(p) for p in parts)


def _plan(func: relax.Function, wanted) -> dict[relax.Var, list[relax.Expr]]:
    """The channel concatenations of `func` (var -> parts) whose parts and users `wanted` accepts."""
    uses = _Uses()
    uses.visit_expr(func)
    plan = {}
    for var, value in uses.bindings.items():
        parts = _concat_parts(value, uses.bindings)
        users = uses.users.get(var, [])
        read_as_input = all(isinstance(u, relax.Call) and u.args and u.args[0].same_as(var) for u in users)
        if parts is not None and read_as_input and wanted(parts, users):
            plan[var] = parts
    return plan


def split_concat_convs() -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="SplitConcatConvs")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for pools in (True, False):  # pools first: the pooled concatenations they leave may be split
            for gv, func in list(mod.functions_items()):
                plan = _plan(func, _pooled if pools else _split) if isinstance(func, relax.Function) else None
                if plan:
                    rw = _Rewriter(mod, plan if pools else {}, {} if pools else plan)
                    rw.builder_.update_func(gv, rw.visit_expr(func))
                    mod = relax.transform.DeadCodeElimination()(rw.builder_.get())
        return mod

    return _pass
