"""ONNX -> Relax import, with unsupported ops refused up front by name.

TVM's ONNX frontend raises deep inside conversion for ops it lacks; checking every node against its convert
map first gives users one line naming the node and op (exit 3) instead of a traceback.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator
from tvm.relax.frontend.onnx import from_onnx
from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

from sparsecc.errors import Unsupported, one_line
from sparsecc.ir import Model


def check_supported(model: Model) -> None:
    supported = _get_convert_map()
    for node in model.proto.graph.node:
        if node.op_type not in supported:
            name = node.name or (node.output[0] if node.output else "?")
            raise Unsupported(f"{model.source}: node '{name}': op {node.op_type} is not supported by the TVM frontend")


def to_relax(model: Model) -> tvm.IRModule:
    """Import a static-shape model into Relax with its weights as constants."""
    check_supported(model)
    shapes = {s.name: list(s.shape) for s in model.inputs}
    dtypes = {s.name: s.dtype for s in model.inputs}
    try:
        return from_onnx(model.proto, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=False)
    except Exception as e:  # the frontend raises a mix of TVMError, ValueError, KeyError, AssertionError
        raise Unsupported(f"{model.source}: TVM cannot import the model: {one_line(e)[:400]}") from None


# relax's OpPatternKind::kOutEWiseFusable. TVM's AnnotateTIROpPattern keeps a pattern a PrimFunc already has.
OUT_EWISE_FUSABLE = 4


def mark_out_ewise_fusable(mod: tvm.IRModule, funcs: list[relax.GlobalVar]) -> tvm.IRModule:
    """Give the PrimFuncs `funcs` op pattern kOutEWiseFusable: an elementwise epilogue (bias, BN, activation,
    residual add) fuses into them, and they are not inlined into a neighbour that would recompute them."""
    for gv in funcs:
        mod[gv] = mod[gv].with_attr("op_pattern", OUT_EWISE_FUSABLE)
    return mod


def rewrite_relax_functions(mod: tvm.IRModule, mutator: PyExprMutator) -> tvm.IRModule:
    """Run a Relax mutator (constructed over `mod`) on every Relax function of `mod`; the rewritten module."""
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()
