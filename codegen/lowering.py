"""The Relax -> executable pipeline shared by all LLVM targets: TVM's CPU pipeline plus our schedules.

Mirrors `tvm.relax.backend.cpu_generic.get_default_pipeline`, with the CPU schedule passes inserted after
legalization and fusion, where every operator has become a TIR PrimFunc.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

from . import concat_split, conv_pack, cpu_schedule, group_conv, layout, storage, tuning, winograd


def relax_pipeline(target: tvm.target.Target, tune: int = 0, tune_db: str | None = None) -> tvm.transform.Pass:
    """`tune` MetaSchedule trials (0: only reuse records already in `tune_db`, or the default database)."""
    @tvm.transform.module_pass(opt_level=0, name="sparsecc_cpu_pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(lowering_passes(target, tune, tune_db) + finalize_passes(target))(mod)

    return _pipeline


def lowering_passes(target: tvm.target.Target, tune: int = 0, tune_db: str | None = None) -> list[tvm.transform.Pass]:
    """Everything before VM finalization: afterwards every operator is a scheduled PrimFunc called in
    destination-passing style."""
    return (
        layout.layout_passes(target)
        + [concat_split.split_concat_convs(), winograd.rewrite_winograd(target),
           group_conv.rewrite_grouped_convs(target), conv_pack.pack_conv_weights(target)]
        + cpu_generic.library_dispatch_passes(target)
        + cpu_generic.legalize_passes(target)
        + tuning.tuning_passes(target, tune, tune_db)
        + cpu_schedule.schedule_passes(target)
        + cpu_generic.dataflow_lower_passes(target)
    )


def lower_static(mod: tvm.IRModule, target: tvm.target.Target, tune: int = 0,
                 tune_db: str | None = None) -> tvm.IRModule:
    """The pipeline without Relax VM codegen, for executors that run a static-shape `main` themselves (wasm):
    intermediate storage planned (`StaticPlanBlockMemory`) and every allocation explicit (`LowerAllocTensor`)."""
    with target:
        return tvm.transform.Sequential(lowering_passes(target, tune, tune_db) + [
            relax.transform.StaticPlanBlockMemory(), relax.transform.LowerAllocTensor()])(mod)


def finalize_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """TVM's CPU finalization, with each planned tensor centred in its storage block (`storage`)."""
    passes = list(cpu_generic.finalize_passes(target))
    plan = next(i for i, p in enumerate(passes) if p.info.name == "StaticPlanBlockMemory")
    return passes[:plan + 1] + [storage.center_tensors()] + passes[plan + 1:]


def compile_module(mod: tvm.IRModule, target: tvm.target.Target, tune: int = 0,
                   tune_db: str | None = None, exec_mode: str = "bytecode") -> tvm.runtime.Executable:
    """`exec_mode="compiled"` turns the Relax VM's instruction stream into native code as well (TIR compiled
    by LLVM): no interpreter dispatch between kernels, which is most of the per-call cost of small models."""
    return relax.build(mod, target, relax_pipeline=relax_pipeline(target, tune, tune_db), exec_mode=exec_mode)


__all__ = ["compile_module", "finalize_passes", "lower_static", "lowering_passes", "relax_pipeline", "relax"]
