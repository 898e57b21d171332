"""WebAssembly target (`--target wasm`): the whole model as one self-contained `model.wasm` (wasm SIMD) plus an
ES-module loader `model.mjs`, for node and browsers.

TVM compiles the kernels; a generated static executor (`plan`, `emit`) calls them in a fixed order over one
planned arena, so no Relax VM or TVM runtime is needed at run time. Dense matmuls read pre-packed weights
(`pack`); sparse kernels are picked per layer by timing them in node when tuning (`tune`), with the winners
kept in the target's tuning database. `toolchain` checks and installs clang, wasm-ld, wasi-libc and node;
`node` registers the executor that runs artifacts for `sparsecc run` and verification.
"""

from __future__ import annotations

from typing import Any

from sparsecc.pipeline import register_target, register_toolchain

from ..targets import refuse_options
from . import node, toolchain  # noqa: F401  (node registers the `wasm-node` executor)
from .backend import WasmBackend


@register_target("wasm", "wasm32", "webassembly")
def wasm_backend(options: dict[str, Any]) -> WasmBackend:
    refuse_options("wasm", options, ("arch", "dtype", "mcpu", "mattr"))
    return WasmBackend(options)


@register_toolchain("wasm")
def wasm_toolchain(install: bool) -> dict[str, Any]:
    return toolchain.setup(install)


__all__ = ["WasmBackend", "wasm_backend", "wasm_toolchain"]
