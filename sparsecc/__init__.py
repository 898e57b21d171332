"""sparsecc: ONNX in; pruned, sparsified, tuned, verified TVM artifacts out.

Python API (stable): `sparsecc.compile(model, target="cpu", output=None, **options) -> Artifact` and
`sparsecc.load(path) -> Runner` (`Runner.run(feeds) -> list[np.ndarray]`, `Runner.inputs`, `Runner.outputs`).
"""

__version__ = "0.1.0"

from .compiler import Artifact, compile  # noqa: E402
from .errors import BadInput, SparseccError, Unsupported, VerifyFailed  # noqa: E402
from .runtime import Runner, load  # noqa: E402

__all__ = ["Artifact", "BadInput", "Runner", "SparseccError", "Unsupported", "VerifyFailed", "compile", "load"]
