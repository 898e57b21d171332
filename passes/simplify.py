"""Graph simplification with onnxslim: constant folding, shape-arithmetic folding, dead-node removal.

Runs first, after input shapes are fixed, so that `Shape -> Gather -> Concat -> Reshape` chains become
constants that both the grouping pass and the TVM frontend can read.
"""

from __future__ import annotations

import onnxslim

from sparsecc.errors import one_line
from sparsecc.ir import Model, infer_shapes, validate
from sparsecc.pipeline import PassContext, register_pass


class SimplifyPass:
    name = "simplify"

    def __call__(self, model: Model, ctx: PassContext | None = None) -> Model:
        before = len(model.proto.graph.node)
        try:
            slim = onnxslim.slim(model.proto)
        except Exception as e:  # onnxslim rejects some exotic graphs; the unsimplified model is still valid
            if ctx is not None:
                ctx.log.append({"pass": self.name, "skipped": one_line(e)[:200]})
            return model
        slim.ir_version = model.proto.ir_version
        validate(slim, model.source)
        result = Model(infer_shapes(slim, model.source), model.source)
        if ctx is not None:
            ctx.log.append({"pass": self.name, "nodes_before": before, "nodes_after": len(slim.graph.node)})
        return result


@register_pass("simplify")
def make_simplify() -> SimplifyPass:
    return SimplifyPass()
