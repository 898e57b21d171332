"""Default schedules for CPU targets, applied to the TIR functions that Relax legalization produces.

Without this step TVM 0.27 leaves Conv and MatMul as naive loops. The entry point `schedule_passes(target)`
returns the module passes inserted between legalization and lowering.
"""

from __future__ import annotations

import tvm
from tvm.s_tir import dlight


def schedule_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    return [dlight.ApplyDefaultSchedule(dlight.cpu.GEMV(), dlight.cpu.Reduction())]
