"""ONNX-level passes; importing a module registers its passes and analyses with `sparsecc.pipeline`."""

from . import grouping, prune, simplify, sparsify  # noqa: F401
