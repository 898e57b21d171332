"""The wasm backend: ONNX -> Relax -> sparse rewrite -> lowered kernels -> static executor -> model.wasm.

Shares the CPU front half with `LLVMBackend` (import, sparse rewrite, layout, legalization, our schedules,
tuning records); instead of Relax VM codegen, `lower_static` stops at planned, destination-passing PrimFunc
calls, `plan_static` turns `main` into a fixed call sequence over one arena, TVM compiles the kernels to a
wasm32 (+simd128) object and `link_wasm` links them with the generated entry. `model.mjs` is the loader
(`load()` / `run()`), with the I/O table of the plan written into it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

from sparsecc.errors import Unsupported, one_line
from sparsecc.ir import Model, TensorSpec
from sparsecc.pipeline import BuildResult, PassContext

from ..frontend import to_relax
from ..lowering import lower_static
from ..sparse import layer_names, rewrite_sparse
from ..targets import TargetSpec
from . import toolchain
from .emit import PARAMS_SECTION, link_wasm
from .im2col import fast_im2col
from .pack import pack_dense_weights
from .plan import StaticPlan, Tensor, plan_static
from .tune import NodeTuner

HERE = Path(__file__).parent
LOADER = "model.mjs"
LIBRARY = "model.wasm"
RUNTIME_KIND = "wasm-node"
WASM_TARGET = {"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm", "mattr": ["+simd128"],
               "vector-width": 128}  # simd128 (said explicitly: LLVM warns on every query otherwise)


def wasm_target() -> TargetSpec:
    return TargetSpec("wasm", WASM_TARGET, runtime_kind=RUNTIME_KIND, library=LIBRARY,
                      info={"simd": "simd128", "threads": 1})


def _stock_lowering(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """TVM's own passes without our schedules (slow but correct), when ours cannot build a model."""
    with target:
        return tvm.transform.Sequential(
            cpu_generic.library_dispatch_passes(target) + cpu_generic.legalize_passes(target)
            + cpu_generic.dataflow_lower_passes(target)
            + [relax.transform.StaticPlanBlockMemory(), relax.transform.LowerAllocTensor()])(mod)


def _compile_kernels(plan: StaticPlan, target: tvm.target.Target, path: Path) -> None:
    ex = tvm.compile(tvm.IRModule(dict(plan.kernels)), target=target)
    ex.mod.write_to_file(str(path))


def _io_table(specs: list[TensorSpec] | None, tensors: list[Tensor], what: str) -> list[dict[str, Any]]:
    """Name, shape, dtype and arena offset of each input/output; names from the ONNX specs when given."""
    if specs is None:
        specs = [TensorSpec(f"{what[:-1]}{i}", t.shape, t.dtype) for i, t in enumerate(tensors)]
    if len(specs) != len(tensors):
        raise Unsupported(f"wasm: the compiled model has {len(tensors)} {what}, the ONNX model {len(specs)}")
    table = []
    for spec, t in zip(specs, tensors):
        if tuple(spec.shape) != t.shape or str(spec.dtype) != t.dtype:
            raise Unsupported(f"wasm: {what[:-1]} '{spec.name}' is {t.dtype}{list(t.shape)} in the compiled model, "
                              f"{spec.dtype}{list(spec.shape)} in ONNX")
        table.append({"name": spec.name, "shape": list(t.shape), "dtype": t.dtype, "offset": t.offset})
    return table


def loader_source(plan: StaticPlan, inputs: list[TensorSpec] | None = None,
                  outputs: list[TensorSpec] | None = None) -> str:
    """`model.mjs` for `plan`: the loader template with the plan's I/O table written into it."""
    spec = {
        "inputs": _io_table(inputs, [plan.tensors[i] for i in plan.inputs], "inputs"),
        "outputs": _io_table(outputs, [plan.tensors[i] for i in plan.outputs], "outputs"),
        "paramsOffset": plan.params_offset,
        "paramsSection": PARAMS_SECTION,
    }
    template = (HERE / LOADER).read_text()
    return template.replace("/*SPARSECC_MODEL*/ {}", json.dumps(spec, sort_keys=True))


def _lower(mod: tvm.IRModule, target: tvm.target.Target, work: Path, report: dict[str, Any],
           tune_db: str | None) -> StaticPlan:
    try:
        plan = plan_static(lower_static(mod, target, tune_db=tune_db))
        _compile_kernels(plan, target, work / "kernels.o")
        return plan
    except Unsupported:
        raise
    except Exception as e:  # noqa: BLE001 - TVM errors: retry with TVM's stock lowering, and say so
        report.update({"schedules": "tvm-default", "fallback_reason": one_line(e)[:300]})
    plan = plan_static(_stock_lowering(mod, target))
    _compile_kernels(plan, target, work / "kernels.o")
    return plan


def emit_artifact(mod: tvm.IRModule, target: tvm.target.Target, out_dir: Path, report: dict[str, Any],
                  inputs: list[TensorSpec] | None = None, outputs: list[TensorSpec] | None = None,
                  tune_db: str | None = None, ctx: PassContext | None = None) -> StaticPlan:
    """Lower a Relax module (after any rewrites) and write `model.wasm` + `model.mjs` into `out_dir`."""
    tools = toolchain.tools(toolchain.BUILD_TOOLS)
    ctx = ctx or PassContext(quiet=True)
    with tempfile.TemporaryDirectory(prefix="sparsecc-wasm-") as tmp:
        work = Path(tmp)
        with ctx.stage("build kernels (wasm32+simd128)", kind="codegen"):
            plan = _lower(fast_im2col(mod), target, work, report, tune_db)
        with ctx.stage("link model.wasm", kind="codegen"):
            link_wasm(plan, work / "kernels.o", work, out_dir / LIBRARY, tools)
    (out_dir / LOADER).write_text(loader_source(plan, inputs, outputs))
    report.update({"kernel_calls": len(plan.calls), "kernels": len(plan.kernels),
                   "arena_bytes": plan.arena_bytes, "params_bytes": len(plan.params)})
    return plan


class WasmBackend:
    def __init__(self, options: dict[str, Any]):
        self.spec = wasm_target()
        self.options = options

    def build(self, model: Model, out_dir: Path, ctx: PassContext) -> BuildResult:
        toolchain.tools(toolchain.BUILD_TOOLS)  # fail before the slow steps
        target = self.spec.target()
        report: dict[str, Any] = {"schedules": "sparsecc", "executor": "static"}
        with ctx.stage("import (Relax)", kind="codegen"):
            mod = to_relax(model)
        tuner = NodeTuner(target, int(self.options.get("tune") or 0), self.options.get("tune_db"))
        stage = "sparse rewrite (kernels timed in node)" if tuner.trials else "sparse rewrite (cost model)"
        with ctx.stage(stage, kind="codegen"):
            mod, decisions = rewrite_sparse(mod, target, {"layer_names": layer_names(model.proto),
                                                          "decide": tuner, "threads": 1})
            mod = pack_dense_weights(mod, target)
        if decisions:
            report["sparse_layers"] = decisions
        if tuner.trials:
            report["tuning"] = {"candidates_per_layer": tuner.trials, "layers_timed": tuner.timed_layers}
        try:
            emit_artifact(mod, target, out_dir, report, model.inputs, model.outputs,
                          self.options.get("tune_db"), ctx)
        except Unsupported as e:
            raise Unsupported(f"{model.source}: {e}") from None
        cannot_run = None
        try:
            toolchain.tools(("node",))
        except Unsupported as e:
            cannot_run = str(e)
        return BuildResult(
            files=(LIBRARY, LOADER),
            runtime={"kind": RUNTIME_KIND, "library": LIBRARY, "module": LOADER},
            target={"name": self.spec.name, "tvm": self.spec.tvm_target, **self.spec.info},
            report=report,
            cannot_run=cannot_run,
        )


__all__ = ["LIBRARY", "LOADER", "RUNTIME_KIND", "WasmBackend", "emit_artifact", "loader_source", "wasm_target"]
