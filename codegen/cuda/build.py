"""The CUDA backend: Relax import -> half precision (optional) -> sparse kernels per layer -> dlight -> fatbin.

`CUDABackend.build` imports the model (`codegen.frontend.to_relax`), converts it to fp16/bf16 when asked
(weights and activations; the artifact's inputs and outputs stay float32, cast at the boundary), replaces
sparse layers by the kernels chosen in `plan.py`, schedules everything else with TVM's dlight GPU rules and
compiles the kernels ahead of time with nvcc (`device_code.py`). The artifact runs on `tvm.cuda(0)` through
the Relax VM (executor `tvm-vm-cuda`); where this machine has no suitable GPU, verification is skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.backend.cuda import pipeline as cuda_pipeline
from tvm.s_tir import dlight as dl

from sparsecc.errors import BadInput, Unsupported, one_line
from sparsecc.ir import Model
from sparsecc.pipeline import BuildResult, PassContext
from sparsecc.runtime import _to_numpy, register_executor

from ..frontend import to_relax
from .device_code import ahead_of_time, device_modules
from .plan import rewrite_gpu_sparse, rounded_layer_names

ARCHES = ("sm_80", "sm_86", "sm_89", "sm_90")
# Each --arch builds on the attributes (shared memory, threads, L2) of a TVM tag of that generation:
# dlight's GPU rules read them (a bare {"kind": "cuda", "arch": ...} lacks some of them).
ARCH_TAGS = {"sm_80": "nvidia/nvidia-a100", "sm_86": "nvidia/geforce-rtx-3090",
             "sm_89": "nvidia/geforce-rtx-4090", "sm_90": "nvidia/nvidia-h100"}
TAGS = ("nvidia/nvidia-a100", "nvidia/nvidia-h100", "nvidia/nvidia-a10g", "nvidia/geforce-rtx-3090",
        "nvidia/geforce-rtx-4090")  # accepted as --target names
DTYPES = ("float32", "float16", "bfloat16")
# Max relative error vs ONNX Runtime expected from the compute precision (2:4 layers use fp16 operands).
TOLERANCES = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2, "tensor-cores": 1e-2}
DLIGHT_RULES = (dl.gpu.Matmul, dl.gpu.GEMV, dl.gpu.Reduction, dl.gpu.GeneralReduction, dl.gpu.Fallback)
LIBRARY = "model.so"


@dataclass(frozen=True)
class CudaSpec:
    name: str
    tvm_target: dict[str, Any]
    dtype: str = "float32"
    info: dict[str, Any] = field(default_factory=dict)

    def target(self) -> tvm.target.Target:
        return tvm.target.Target(self.tvm_target)

    @property
    def arch(self) -> str:
        return str(self.target().arch)


def _tag_dict(tag: str) -> dict[str, Any]:
    d = dict(tvm.target.Target(tag).export())
    d.pop("tag", None)
    return {k: (v if isinstance(v, (str, int, float)) else [str(x) for x in v]) for k, v in d.items() if k in (
        "kind", "arch", "keys", "max_num_threads", "max_threads_per_block", "thread_warp_size",
        "max_shared_memory_per_block", "registers_per_block", "l2_cache_size_bytes")}


def cuda_spec(options: dict[str, Any], tag: str | None = None, raw: dict[str, Any] | None = None) -> CudaSpec:
    """The target for `--target cuda [--arch]`, a TVM tag, or a raw {"kind": "cuda", ...} dict."""
    dtype = options.get("dtype") or "float32"
    if dtype not in DTYPES:
        raise BadInput(f"--dtype {dtype}: the cuda target takes {', '.join(DTYPES)}")
    arch = options.get("arch")
    if arch is not None and arch not in ARCHES:
        raise BadInput(f"--arch {arch}: the cuda target takes {', '.join(ARCHES)}")
    if raw is not None:
        if arch:
            raise BadInput("--arch: give the arch inside the JSON target instead")
        tgt = {"kind": "cuda", **raw}
        tgt.setdefault("arch", "sm_80")
        name = "cuda"
    elif tag is not None:
        tgt = _tag_dict(tag)
        if arch:
            tgt["arch"] = arch
        name = tag
    else:
        tgt = {**_tag_dict(ARCH_TAGS[arch or "sm_80"]), "arch": arch or "sm_80"}
        name = "cuda"
    try:
        tvm.target.Target(tgt)
    except (ValueError, TypeError, tvm.error.InternalError) as e:
        raise BadInput(f"--target: not a valid CUDA target ({one_line(e)[:200]})") from None
    return CudaSpec(name, tgt, dtype)


def relax_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's CUDA pipeline with our dlight rule table (the sparse kernels arrive already scheduled)."""
    @tvm.transform.module_pass(opt_level=0, name="sparsecc_cuda_pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                cuda_pipeline.library_dispatch_passes(target)
                + [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                   relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR(),
                   dl.ApplyDefaultSchedule(*(rule() for rule in DLIGHT_RULES))]
                + cuda_pipeline.dataflow_lower_passes(target)
                + cuda_pipeline.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


def to_half(mod: tvm.IRModule, dtype: str) -> tvm.IRModule:
    """fp16 compute with float32 inputs/outputs (TVM's mixed-precision pass, accumulating in fp16)."""
    if dtype == "float32":
        return mod
    if dtype == "bfloat16":
        raise Unsupported("--dtype bfloat16 is not supported by the cuda target yet; use --dtype float16")
    mod = relax.transform.ToMixedPrecision(out_dtype=dtype)(mod)
    return relax.transform.FoldConstant()(mod)


def gpu_problem(arch: str) -> str | None:
    """Why this machine cannot run code built for `arch`, or None."""
    try:
        dev = tvm.cuda(0)
        present = dev.exist
    except Exception:  # noqa: BLE001 - no CUDA runtime at all
        present = False
    if not present:
        return "no CUDA GPU on this machine"
    have = int(str(dev.compute_version).replace(".", ""))
    need = int("".join(ch for ch in arch if ch.isdigit()))
    if have < need or (arch.endswith("a") and have != need):
        return f"the GPU here is sm_{have}, the artifact is built for {arch}"
    return None


class CUDABackend:
    def __init__(self, spec: CudaSpec, options: dict[str, Any]):
        self.spec = spec
        self.options = options

    def build(self, model: Model, out_dir: Path, ctx: PassContext) -> BuildResult:
        target = self.spec.target()
        op_dtype = "bfloat16" if self.spec.dtype == "bfloat16" else "float16"
        with ctx.stage("import (Relax)", kind="codegen"):
            mod = to_half(to_relax(model), self.spec.dtype)
        with ctx.stage("sparse rewrite (GPU kernels)", kind="codegen"):
            mod, layers = rewrite_gpu_sparse(mod, rounded_layer_names(model.proto, self.spec.dtype), op_dtype)
        with ctx.stage(f"build ({self.spec.name}, {self.spec.arch})", kind="codegen"):
            try:
                with target, ahead_of_time(self.spec.arch):
                    ex = tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target))
            except Unsupported:
                raise
            except Exception as e:  # TVM raises TVMError / InternalError with multi-line messages
                raise Unsupported(f"{model.source}: TVM failed to build for {self.spec.name}: {one_line(e)[:400]}"
                                  ) from None
        with ctx.stage("export library", kind="codegen"):
            ex.export_library(str(out_dir / LIBRARY))
        kernels = sorted({rec["kernel"] for rec in layers})
        precision = self.spec.dtype if self.spec.dtype != "float32" or "2:4" not in kernels else "tensor-cores"
        device = [m.kind for m in device_modules(ex.mod)]
        report = {"schedules": "dlight", "arch": self.spec.arch, "dtype": self.spec.dtype,
                  "device_modules": device, "layers": layers,
                  "kernels": {k: sum(r["kernel"] == k for r in layers) for k in ("dense", "bsr", "2:4")}}
        runtime = {"kind": "tvm-vm-cuda", "library": LIBRARY, "device": "cuda:0", "arch": self.spec.arch,
                   "dtype": self.spec.dtype, "tolerance": TOLERANCES[precision],
                   "layers": [{"layer": r["layer"], "kernel": r["kernel"], "shape": r["shape"]} for r in layers]}
        return BuildResult(
            files=(LIBRARY,),
            runtime=runtime,
            target={"name": self.spec.name, "tvm": self.spec.tvm_target, "arch": self.spec.arch,
                    "dtype": self.spec.dtype},
            report=report,
            cannot_run=gpu_problem(self.spec.arch),
        )


def parse_raw(text: str) -> dict[str, Any] | None:
    """The dict of a raw JSON target whose kind is cuda, else None."""
    try:
        tgt = json.loads(text)
    except json.JSONDecodeError:
        return None
    return tgt if isinstance(tgt, dict) and tgt.get("kind") == "cuda" else None


@register_executor("tvm-vm-cuda")
class CudaVmExecutor:
    """Relax VM on the first CUDA GPU; the library carries its device code (no compiler needed here)."""

    def __init__(self, manifest: Any):
        problem = gpu_problem(manifest.runtime.get("arch", "sm_80"))
        if problem:
            raise Unsupported(f"{manifest.path}: cannot run a CUDA artifact: {problem}")
        lib = tvm.runtime.load_module(str(manifest.file(manifest.runtime["library"])))
        self._dev = tvm.cuda(0)
        self._vm = relax.VirtualMachine(lib, self._dev)
        self._main = self._vm["main"]

    def __call__(self, args: list[np.ndarray]) -> list[np.ndarray]:
        tensors = [tvm.runtime.tensor(np.ascontiguousarray(a), self._dev) for a in args]
        return _to_numpy(self._main(*tensors))
