"""The CUDA target: `--target cuda [--arch sm_80|sm_86|sm_89|sm_90] [--dtype float16]`, TVM tags such as
`nvidia/nvidia-h100`, and raw `{"kind": "cuda", ...}` targets; 2:4 sparse tensor-core and BSR kernels per layer.

`build.py` is the backend and the `tvm-vm-cuda` executor, `plan.py` the per-layer kernel choice and Relax
rewrite, `kernels.py` the TIR kernels, `device_code.py` the ahead-of-time fatbin.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from sparsecc.pipeline import register_target, register_toolchain

from ..targets import refuse_options
from .build import TAGS, CUDABackend, cuda_spec, parse_raw
from .device_code import nvcc_path


@register_target("cuda", "gpu", "nvidia")
def cuda_backend(options: dict[str, Any], tag: str | None = None, raw: dict[str, Any] | None = None) -> CUDABackend:
    refuse_options("cuda", options, ("mcpu", "mattr"))
    return CUDABackend(cuda_spec(options, tag=tag, raw=raw), options)


for _tag in TAGS:
    register_target(_tag)(partial(cuda_backend, tag=_tag))


@register_toolchain("cuda")
def cuda_toolchain(install: bool) -> dict[str, Any]:
    """nvcc compiles the kernels ahead of time (installing the CUDA toolkit is left to the user)."""
    return {"status": "ready", "tools": {"nvcc": nvcc_path()}}


__all__ = ["CUDABackend", "cuda_backend", "cuda_spec", "parse_raw"]
