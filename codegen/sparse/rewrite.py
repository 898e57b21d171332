"""Relax rewrite: constant-weight matmuls and convolutions -> `call_tir` of our sparse kernels.

Runs on the module from `codegen.frontend.to_relax`, before legalization, so every layer left dense still
gets the dense CPU schedules. The CPU layout passes (`codegen.layout`) are applied first (option `layout`),
so convolutions are matched and timed in NHWC as they will run. What the ONNX frontend produces, and what is
matched:

- Gemm(transB=1): `lv = permute_dims(W[N, K], [1, 0]); matmul(x, lv)` (after FoldConstant: `matmul(x, W^T)`),
- MatMul (+ Add): `matmul(x, W[K, N])` with x of any rank >= 2 (leading dims flattened into M),
- Conv (groups 1): `conv2d(x, W)` in NHWC/HWIO after the layout passes (NCHW/OIHW too; any kernel layout is
  read through its layout string). 1x1 stride-1 convs are a reshape away from a matmul; KxK convs (any
  stride, padding, dilation) become im2col (pad + strided slices + concat, in NHWC) + the sparse matmul.

Each match is handed to the cost model (`cost.decide`), which times the original op against the sparse
kernel with its prologue (reshape / im2col) and keeps it dense or picks a kernel. A following bias `add` and
`relu` (when each is the only user) are folded into the kernel's epilogue, as the dense schedules fuse them
too; the replaced ops become dead and DeadCodeElimination drops them. A chosen kernel becomes
`call_tir(kernel, [x2d, data, indices, indptr, bias])` with the BSR arrays as Relax constants, so they are
compile-time constants of the artifact. Layer names come from `layer_names(onnx_model)` when given.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import tvm
from onnx import numpy_helper
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from sparsecc.pipeline import report_progress

from .cost import LayerDecision, LayerProblem, decide, sparse_call


def weight_key(w: np.ndarray) -> str:
    """Content key of a weight in [N, K] layout (how layers are named across ONNX and Relax)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    return hashlib.sha1(str(w.shape).encode() + w.tobytes()).hexdigest()[:16]


def layer_names(model: onnx.ModelProto) -> dict[str, str]:
    """{weight_key: node name} for the MatMul/Gemm/Conv nodes whose weight is an initializer."""
    inits = {t.name: t for t in model.graph.initializer}
    names: dict[str, str] = {}
    for i, node in enumerate(model.graph.node):
        if len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        label = node.name or f"{node.op_type}_{i}"
        if node.op_type == "MatMul" and w.ndim == 2:
            names[weight_key(w.T)] = label
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            names[weight_key(w if trans_b else w.T)] = label
        elif node.op_type == "Conv" and w.ndim == 4:
            names[weight_key(w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1))] = label
    return names


def static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    ty = getattr(expr, "ty", None) if expr is not None else None
    shape = getattr(ty, "shape", None)
    values = getattr(shape, "values", None)
    if values is None:
        return None
    dims = []
    for d in values:
        if not isinstance(d, tvm.tirx.IntImm):
            return None
        dims.append(int(d))
    return tuple(dims)


def _dtype(expr: relax.Expr) -> str | None:
    return getattr(getattr(expr, "ty", None), "dtype", None)


def const_value(expr: relax.Expr, lookup) -> np.ndarray | None:
    """The value of a constant, also through bindings of permute_dims / reshape of constants."""
    if isinstance(expr, tvm.ir.Constant):
        return expr.value.numpy()
    if not isinstance(expr, relax.Var):
        return None
    bound = lookup(expr)
    if bound is None or bound.same_as(expr):
        return None
    if isinstance(bound, tvm.ir.Constant):
        return bound.value.numpy()
    if isinstance(bound, relax.Call) and isinstance(bound.op, tvm.ir.Op):
        if bound.op.name == "relax.permute_dims":
            inner = const_value(bound.args[0], lookup)
            axes = bound.attrs.axes
            return None if inner is None else np.transpose(inner, None if axes is None else [int(a) for a in axes])
        if bound.op.name == "relax.reshape":
            inner = const_value(bound.args[0], lookup)
            shape = static_shape(bound)
            return None if inner is None or shape is None else inner.reshape(shape)
    return None


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:160]


def _is_op(expr, name: str) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


@dataclass
class _Rewrite:
    """A layer the cost model turned sparse: how to emit it where its (fused) result is bound."""

    decision: LayerDecision
    x: relax.Expr
    m: int
    rows: Callable[[relax.BlockBuilder, relax.Expr], relax.Expr]
    output: Callable[[relax.BlockBuilder, relax.Expr], relax.Expr]
    bias: np.ndarray | None = None
    relu: bool = False


@mutator
class _SparseRewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target, options: dict[str, Any]):
        super().__init__(mod)
        self.mod_ = mod
        self.target = target
        self.options = options
        self.names = options.get("layer_names") or {}
        self.fuse = options.get("fuse_epilogue", True)
        self.decisions: list[LayerDecision] = []
        self.counter = 0
        self.started = time.monotonic()
        self._var: relax.Var | None = None  # the (original) var of the binding being visited
        self._users: dict = {}
        self._values: dict = {}
        self._deferred: dict = {}  # original var -> _Rewrite emitted at its binding

    def transform(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self._values = dict(relax.analysis.get_var2val(func).items())
                self._users = {}
                for block in getattr(func.body, "blocks", []):
                    if isinstance(block, relax.DataflowBlock):
                        self._users.update({k: list(v) for k, v in relax.analysis.udchain(block).items()})
                self.builder_.update_func(gv, self.visit_expr(func))
                for rw in self._deferred.values():  # never reached (not expected): the dense op stayed
                    rw.decision.chosen, rw.decision.reason = "dense", "epilogue binding not found"
                self._deferred = {}
        return self.builder_.get()

    def visit_var_binding_(self, binding) -> None:
        self._var = binding.var
        super().visit_var_binding_(binding)
        self._var = None

    def _constant(self, expr: relax.Expr) -> np.ndarray | None:
        return const_value(expr, self.lookup_binding)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        var = self._var
        if var is not None and var in self._deferred:
            rw = self._deferred.pop(var)
            try:
                return self._emit(rw)
            except Exception as e:  # noqa: BLE001 - keep the dense ops (still in the graph): never fail a build
                rw.decision.chosen, rw.decision.reason = "dense", f"emission failed: {_short(e)}"
        call = super().visit_call_(call)
        if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op):
            return call
        handler = {"relax.matmul": self._matmul, "relax.nn.conv2d": self._conv}.get(call.op.name)
        if handler is None:
            return call
        count = len(self.decisions)
        try:
            return handler(call, var)
        except Exception as e:  # noqa: BLE001 - an unexpected graph or TVM error keeps the layer dense
            if len(self.decisions) > count:
                self.decisions[-1].chosen, self.decisions[-1].reason = "dense", f"rewrite failed: {_short(e)}"
            return call

    # ---- decisions and emission
    def _decide(self, op: str, w: np.ndarray, m: int, input_shape, dense, prologue, key) -> LayerDecision:
        name = self.names.get(weight_key(w), f"{op}_{len(self.decisions)}")
        problem = LayerProblem(name, op, w, m, tuple(input_shape), dense, prologue, key)
        options = self.options
        if options.get("measure", True) and time.monotonic() - self.started > options.get("budget_s", 300):
            # Out of measuring time: decide from the model, and only on a clear predicted win.
            options = {**options, "measure": False, "margin": max(2.0, options.get("margin", 1.2))}
        report_progress(f"layer {name} ({len(self.decisions) + 1} so far)")
        decision = (options.get("decide") or decide)(problem, self.target, options)
        self.decisions.append(decision)
        return decision

    def _emit(self, rw: _Rewrite) -> relax.Expr:
        self.counter += 1
        best = rw.decision.best
        x2d = rw.rows(self.builder_, rw.x)
        y = self.builder_.emit(sparse_call(self.builder_, x2d, best.spec, best.matrix, rw.m,
                                           name=f"sparse_matmul_{self.counter}", bias=rw.bias, relu=rw.relu))
        return rw.output(self.builder_, y)

    def _epilogue(self, var, n: int, channel_axis: int, rank: int) -> tuple[relax.Var, np.ndarray | None, bool]:
        """Follow `var -> add(., bias) -> relu` while each step is the only user, for fusion into the kernel."""
        if not self.fuse or var is None:
            return var, None, False
        end, bias, relu = var, None, False

        def only_user(v):
            users = self._users.get(v, [])
            return users[0] if isinstance(v, relax.DataflowVar) and len(users) == 1 else None

        user = only_user(end)
        value = self._values.get(user) if user is not None else None
        if _is_op(value, "relax.add"):
            other = value.args[1] if value.args[0].same_as(end) else value.args[0]
            c = const_value(other, self._values.get)
            if c is not None and c.size == n and c.ndim <= rank and static_shape(value) == static_shape(end):
                shape = (1,) * (rank - c.ndim) + tuple(c.shape)
                if shape[channel_axis] == n:
                    end, bias = user, c.reshape(n).astype(np.float32)
                    user = only_user(end)
                    value = self._values.get(user) if user is not None else None
        if _is_op(value, "relax.nn.relu"):
            end, relu = user, True
        return end, bias, relu

    def _plan(self, var, rw: _Rewrite, channel_axis: int, rank: int) -> relax.Expr | None:
        """Emit the sparse kernel now, or defer it to the binding of the bias add / ReLU it absorbs."""
        end, bias, relu = self._epilogue(var, rw.decision.best.matrix.shape[0], channel_axis, rank)
        if end is var:
            return self._emit(rw)
        rw.bias, rw.relu = bias, relu
        self._deferred[end] = rw
        return None  # the dense op stays until DeadCodeElimination drops it (its result is unused now)

    def _matmul(self, call: relax.Call, var) -> relax.Expr:
        x, wexpr = call.args
        wt = self._constant(wexpr)  # [K, N]
        xshape = static_shape(x)
        if wt is None or wt.ndim != 2 or xshape is None or len(xshape) < 2 or _dtype(x) != "float32":
            return call
        if str(call.attrs.out_dtype or "float32") not in ("float32", "void"):
            return call
        k, n = wt.shape
        if xshape[-1] != k:
            return call
        m = int(np.prod(xshape[:-1]))
        wconst = relax.const(np.ascontiguousarray(wt))

        def rows(bb, xv):
            return xv if len(xshape) == 2 else bb.emit(relax.op.reshape(xv, (m, k)))

        def output(bb, y):
            return y if len(xshape) == 2 else relax.op.reshape(y, (*xshape[:-1], n))

        decision = self._decide("MatMul", np.ascontiguousarray(wt.T), m, xshape,
                                dense=lambda bb, xv: bb.emit(relax.op.matmul(xv, wconst)), prologue=rows,
                                key=("matmul",))
        if decision.chosen != "sparse":
            return call
        out = self._plan(var, _Rewrite(decision, x, m, rows, output), len(xshape) - 1, len(xshape))
        return call if out is None else out

    def _conv(self, call: relax.Call, var) -> relax.Expr:
        x, wexpr = call.args
        a = call.attrs
        w = self._constant(wexpr)
        xshape = static_shape(x)
        if w is None or xshape is None or _dtype(x) != "float32" or int(a.groups) != 1:
            return call
        data_layout, kernel_layout = str(a.data_layout), str(a.kernel_layout)
        out_layout = str(a.out_layout) or data_layout
        if sorted(kernel_layout) != sorted("OIHW") or data_layout not in ("NCHW", "NHWC") or out_layout != data_layout:
            return call
        if str(a.out_dtype or "float32") not in ("float32", "void"):
            return call
        oihw = np.transpose(w, [kernel_layout.index(ch) for ch in "OIHW"])
        geom = ConvGeometry.of(xshape, data_layout, oihw.shape, a)
        if geom is None:
            return call
        # Reduction axis (kh, kw, I), input channels innermost: what an NHWC im2col row holds.
        w2 = np.ascontiguousarray(oihw.transpose(0, 2, 3, 1).reshape(oihw.shape[0], -1))
        wconst = relax.const(np.ascontiguousarray(w))
        attrs = {"strides": [int(v) for v in a.strides], "padding": [int(v) for v in a.padding],
                 "dilation": [int(v) for v in a.dilation], "data_layout": data_layout, "kernel_layout": kernel_layout}
        decision = self._decide(
            "Conv", w2, geom.m, xshape,
            dense=lambda bb, xv: bb.emit(relax.op.nn.conv2d(xv, wconst, **attrs)),
            prologue=geom.emit_rows, key=("conv", tuple(sorted((k, str(v)) for k, v in attrs.items()))))
        if decision.chosen != "sparse":
            return call
        o = oihw.shape[0]
        rw = _Rewrite(decision, x, geom.m, geom.emit_rows, lambda bb, y: geom.emit_output(bb, y, o))
        out = self._plan(var, rw, 3 if data_layout == "NHWC" else 1, 4)
        return call if out is None else out


class ConvGeometry:
    """Shapes of a groups=1 conv2d and the Relax ops that turn its input into [N*OH*OW, KH*KW*C] rows."""

    def __init__(self, layout, n, c, h, w, kh, kw, strides, padding, dilation):
        self.layout, self.n, self.c, self.h, self.w = layout, n, c, h, w
        self.kh, self.kw, self.strides, self.dilation = kh, kw, strides, dilation
        self.padding = padding  # top, left, bottom, right
        sh, sw = strides
        dh, dw = dilation
        top, left, bottom, right = padding
        self.oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
        self.ow = (w + left + right - dw * (kw - 1) - 1) // sw + 1
        self.m = n * self.oh * self.ow

    @classmethod
    def of(cls, xshape, layout, oihw_shape, attrs) -> ConvGeometry | None:
        if len(xshape) != 4:
            return None
        n, c, h, w = xshape if layout == "NCHW" else (xshape[0], xshape[3], xshape[1], xshape[2])
        o, i, kh, kw = oihw_shape
        pad = [int(v) for v in attrs.padding]
        pad = pad * 2 if len(pad) == 2 else pad
        if i != c or len(pad) != 4:
            return None
        geom = cls(layout, n, c, h, w, kh, kw, [int(v) for v in attrs.strides], pad,
                   [int(v) for v in attrs.dilation])
        return geom if geom.oh > 0 and geom.ow > 0 else None

    def emit_rows(self, bb: relax.BlockBuilder, x: relax.Expr) -> relax.Expr:
        if self.layout == "NCHW":
            x = bb.emit(relax.op.permute_dims(x, [0, 2, 3, 1]))
        pointwise = self.kh == self.kw == 1 and self.strides == [1, 1] and not any(self.padding)
        if not pointwise:
            top, left, bottom, right = self.padding
            if any(self.padding):
                x = bb.emit(relax.op.nn.pad(x, [0, 0, top, bottom, left, right, 0, 0]))
            (sh, sw), (dh, dw) = self.strides, self.dilation
            pieces = []
            for i in range(self.kh):
                for j in range(self.kw):
                    begin = [i * dh, j * dw]
                    end = [i * dh + sh * (self.oh - 1) + 1, j * dw + sw * (self.ow - 1) + 1]
                    pieces.append(bb.emit(relax.op.strided_slice(x, [1, 2], begin, end, [sh, sw])))
            x = bb.emit(relax.op.concat(pieces, axis=3)) if len(pieces) > 1 else pieces[0]
        return bb.emit(relax.op.reshape(x, (self.m, self.kh * self.kw * self.c)))

    def emit_output(self, bb: relax.BlockBuilder, y: relax.Expr, channels: int) -> relax.Expr:
        nhwc = (self.n, self.oh, self.ow, channels)
        if self.layout == "NHWC":
            return relax.op.reshape(y, nhwc)
        return relax.op.permute_dims(bb.emit(relax.op.reshape(y, nhwc)), [0, 3, 1, 2])


def _cpu_layout(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The CPU pipeline's layout passes (NHWC convs, folded weight transposes), applied here first so that
    layers are matched and timed as they will run: a 1x1 conv is then a plain reshape away from a matmul,
    and the dense reference conv has no layout transposes around it. The pipeline re-runs them as no-ops."""
    from ..layout import layout_passes

    with target:
        return tvm.transform.Sequential(layout_passes(target))(mod)


def rewrite_sparse(mod: tvm.IRModule, target: tvm.target.Target,
                   options: dict[str, Any] | None = None) -> tuple[tvm.IRModule, list[dict[str, Any]]]:
    """Replace sparse-enough constant-weight matmuls/1x1 convs by our kernels where they are faster.

    Options (all optional): see `cost.DEFAULT_OPTIONS` (measure, margin, min_sparsity, blocks, threads,
    force, ...) plus `layer_names` ({weight_key: ONNX node name}, from `layer_names(model.proto)`),
    `layout` (default True: apply the CPU layout passes first), `fuse_epilogue` (default True) and
    `budget_s` (default 300: seconds of measuring, after which layers are decided by the analytic model with
    margin 2), and `decide` (replaces `cost.decide`, same signature: for targets whose kernels are timed
    elsewhere, e.g. wasm in node). A layer whose rewrite fails for any reason stays dense (its record says why).
    Returns the new module and one decision record per candidate layer.
    """
    options = dict(options or {})
    if options.get("layout", True):
        mod = _cpu_layout(mod, target)
    rewriter = _SparseRewriter(mod, target, options)
    new_mod = rewriter.transform()
    if any(d.chosen == "sparse" for d in rewriter.decisions):
        new_mod = relax.transform.DeadCodeElimination()(new_mod)  # the dense weights are no longer used
    else:
        new_mod = mod  # (after the layout passes, which the pipeline applies anyway)
    return new_mod, [d.record() for d in rewriter.decisions]
