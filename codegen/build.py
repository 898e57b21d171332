"""Build one artifact library: Relax import, lowering with our schedules, export.

`LLVMBackend` serves every target whose code TVM emits through LLVM and runs under the Relax VM; the target
table (`targets.py`) says how each one is named, exported and run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tvm

from sparsecc.errors import Unsupported, one_line
from sparsecc.ir import Model
from sparsecc.pipeline import BuildResult, PassContext

from .frontend import to_relax
from .lowering import compile_module
from .sparse import layer_names, rewrite_sparse
from .targets import TargetSpec


class LLVMBackend:
    def __init__(self, spec: TargetSpec, options: dict[str, Any]):
        self.spec = spec
        self.options = options

    def build(self, model: Model, out_dir: Path, ctx: PassContext) -> BuildResult:
        with ctx.stage("import (Relax)", kind="codegen"):
            mod = to_relax(model)
        target = self.spec.target()
        report: dict[str, Any] = {"schedules": "sparsecc"}
        with ctx.stage("sparse rewrite (cost model)", kind="codegen"):
            # Off the host, timing candidates here would measure the wrong machine: decide analytically.
            measure = {} if self.spec.native else {"measure": False}
            mod, decisions = rewrite_sparse(mod, target, {"layer_names": layer_names(model.proto),
                                                          "threads": self.options.get("threads"), **measure,
                                                          "cache_dir": self.options.get("tune_db"),
                                                          **(self.options.get("sparse_options") or {})})
        if decisions:
            report["sparse_layers"] = decisions
        with ctx.stage(f"build ({self.spec.name})", kind="codegen"):
            try:
                ex = compile_module(mod, target, tune=int(self.options.get("tune") or 0),
                                    tune_db=self.options.get("tune_db"),
                                    exec_mode="compiled" if self.spec.native else "bytecode")
            except Exception as e:  # TVM raises TVMError / InternalError with multi-line messages
                # Our layout and schedule rules must never turn a model TVM can build into a refusal:
                # fall back to TVM's stock pipeline (slow but correct) and say so in the report.
                report = {"schedules": "tvm-default", "fallback_reason": one_line(e)[:300]}
                try:
                    ex = tvm.compile(mod, target=target)
                except Exception as e2:
                    raise Unsupported(
                        f"{model.source}: TVM failed to build for {self.spec.name}: {one_line(e2)[:400]}") from None
        with ctx.stage("export library", kind="codegen"):
            if self.spec.export:
                files = self.spec.export(ex, out_dir)
            else:
                ex.export_library(str(out_dir / self.spec.library))
                files = (self.spec.library,)
        runtime = {"kind": self.spec.runtime_kind, "library": self.spec.library}
        if self.options.get("threads"):
            runtime["threads"] = int(self.options["threads"])
        return BuildResult(
            files=files,
            runtime=runtime,
            target={"name": self.spec.name, "tvm": self.spec.tvm_target, **self.spec.info},
            report=report,
        )
