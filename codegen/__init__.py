"""TVM code generation: one backend per target family, registered with the pipeline by target name."""

from __future__ import annotations

from typing import Any

from sparsecc.pipeline import register_target

from . import arm64, cuda, wasm  # noqa: F401 - each registers its target, toolchain and executor
from .build import LLVMBackend
from .targets import cpu_target, raw_target, refuse_options


@register_target("cpu", "x86", "x86_64", "llvm", "host")
def cpu_backend(options: dict[str, Any]) -> LLVMBackend:
    refuse_options("cpu", options, ("arch", "dtype"))
    return LLVMBackend(cpu_target(options.get("threads"), options.get("mcpu"), tuple(options.get("mattr") or ())),
                       options)


@register_target("raw")
def raw_backend(options: dict[str, Any]) -> Any:
    """A TVM target given as JSON: CUDA kinds go to the cuda backend, LLVM ones to `LLVMBackend`."""
    if (cuda_dict := cuda.parse_raw(options["tvm_target"])) is not None:
        return cuda.cuda_backend(options, raw=cuda_dict)
    return LLVMBackend(raw_target(options["tvm_target"]), options)
