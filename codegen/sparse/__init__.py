"""Sparse codegen for CPU targets: TIR kernels (`kernels`), per-layer cost model (`cost`), Relax rewrite.

Entry point for the backend: `rewrite_sparse(mod, target, options) -> (mod, records)`, run on the imported
Relax module before legalization; `layer_names(onnx_model)` names the records after the ONNX nodes.
"""

from .kernels import BSRMatrix, KernelSpec, bsr_matmul
from .rewrite import layer_names, rewrite_sparse

__all__ = ["BSRMatrix", "KernelSpec", "bsr_matmul", "layer_names", "rewrite_sparse"]
