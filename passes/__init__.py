"""ONNX-level passes; importing this package registers them with the pipeline."""

from . import simplify  # noqa: F401
