"""sparsecc: ONNX in; pruned, sparsified, tuned, verified TVM artifacts out."""

__version__ = "0.1.0"
