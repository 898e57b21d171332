"""The `wasm-node` executor: runs a wasm artifact in node, so `sparsecc run` and verification work as for cpu.

Each call writes the inputs as raw tensors into a temporary directory, runs `driver.mjs` (which imports the
artifact's own `model.mjs`, exactly what an application would do) and reads the outputs back.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from sparsecc.artifact import Manifest
from sparsecc.errors import SparseccError, one_line
from sparsecc.runtime import register_executor

from . import toolchain

DRIVER = Path(__file__).parent / "driver.mjs"
TIMEOUT_S = 600


@register_executor("wasm-node")
class NodeExecutor:
    def __init__(self, manifest: Manifest):
        self.node = toolchain.tools(("node",))["node"]
        self.root = manifest.path
        self.outputs = manifest.outputs

    def __call__(self, args: list[np.ndarray]) -> list[np.ndarray]:
        with tempfile.TemporaryDirectory(prefix="sparsecc-node-") as tmp:
            io = Path(tmp)
            for i, a in enumerate(args):
                (io / f"input{i}.bin").write_bytes(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes())
            proc = subprocess.run([self.node, str(DRIVER), str(self.root), str(io)], capture_output=True,
                                  text=True, timeout=TIMEOUT_S)
            if proc.returncode != 0:
                errors = re.findall(r"^\w*Error: .*$", proc.stderr, re.MULTILINE)  # not the stack or source
                error = errors[-1] if errors else (proc.stderr.strip() or f"exit {proc.returncode}")
                raise SparseccError(f"{self.root}: node failed to run the model: {one_line(error)[:400]}")
            return [np.fromfile(io / f"output{i}.bin", dtype=np.dtype(s.dtype).newbyteorder("<")).reshape(s.shape)
                    .astype(s.dtype) for i, s in enumerate(self.outputs)]
