"""The target table: what each `--target` name means for TVM, the exporter and the runtime.

Per-target code is this table of differences; the lowering and build steps are shared.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tvm

from sparsecc.errors import BadInput, Unsupported, one_line


@dataclass(frozen=True)
class TargetSpec:
    name: str
    tvm_target: dict[str, Any]
    runtime_kind: str = "tvm-vm"
    library: str = "model.so"
    info: dict[str, Any] = field(default_factory=dict)
    # Writes the compiled executable into the artifact directory and returns the files written;
    # None: `export_library` with the host's compiler.
    export: Callable[[tvm.runtime.Executable, Path], tuple[str, ...]] | None = None
    native: bool = True  # this host runs the code, so the sparse cost model may time candidates on it

    def target(self) -> tvm.target.Target:
        return tvm.target.Target(self.tvm_target)


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (recorded in the manifest; `native` is unreliable in 0.27)."""
    return str(tvm.target.codegen.llvm_get_system_cpu())


def refuse_options(target: str, options: dict[str, Any], names: tuple[str, ...]) -> None:
    """One clear error for a target option this target does not take (e.g. `--arch` for cpu)."""
    for name in names:
        if options.get(name):
            raise Unsupported(f"--{name} is not supported for target '{target}'")


def cpu_target(threads: int | None = None, mcpu: str | None = None,
               mattr: tuple[str, ...] = ()) -> TargetSpec:
    if platform.machine() not in ("x86_64", "AMD64"):
        raise Unsupported(f"target 'cpu' means host x86-64; this host is {platform.machine()}")
    cpu = mcpu or host_cpu()
    tgt: dict[str, Any] = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": cpu}
    if mattr:
        tgt["mattr"] = list(mattr)
    try:
        tvm.target.Target(tgt)
    except (ValueError, TypeError, tvm.error.InternalError) as e:
        raise BadInput(f"--mcpu/--mattr: not valid for x86-64 ({' '.join(str(e).split())[:200]})") from None
    if threads:
        tgt["num-cores"] = int(threads)
    return TargetSpec("cpu", tgt, info={"host_cpu": cpu})


# Raw LLVM target dicts for other architectures: first part of the mtriple -> spec (registered by their module).
RAW_LLVM_TARGETS: dict[str, Callable[[dict[str, Any]], TargetSpec]] = {}


def raw_target(text: str) -> TargetSpec:
    try:
        tgt = json.loads(text)
        arch = str(tgt.get("mtriple", "")).split("-")[0] if isinstance(tgt, dict) else ""
        if arch in RAW_LLVM_TARGETS and tgt.get("kind") == "llvm":
            return RAW_LLVM_TARGETS[arch](tgt)  # checks the dict itself, with its own messages
        tvm.target.Target(tgt)
    except (json.JSONDecodeError, ValueError, TypeError, tvm.error.InternalError) as e:
        raise BadInput(f"--target: not a valid TVM target JSON ({' '.join(str(e).split())[:200]})") from None
    if tgt.get("kind") != "llvm" or "x86_64" not in str(tgt.get("mtriple", "x86_64")):
        raise Unsupported(f"--target: raw target kind '{tgt.get('kind')}' for this host is not supported yet")
    return TargetSpec("raw", tgt)


# ------------------------------------------------------------------ external tools (`sparsecc setup`)

def run_setup_command(target: str, cmd: list[str]) -> None:
    """Run one setup step quietly; a failure is one line naming the step and its last output line."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise Unsupported(f"{target} setup: `{' '.join(cmd)}` failed: {one_line(proc.stderr or proc.stdout)[-300:]}")


def apt_install(target: str, packages: list[str]) -> None:
    """Install Debian packages a target needs (setup runs as root on Debian; elsewhere, say what to install)."""
    if not shutil.which("apt-get"):
        raise Unsupported(f"{target} setup: install {' '.join(packages)} (no apt-get on this system)")
    run_setup_command(target, ["apt-get", "update", "-qq"])
    run_setup_command(target, ["apt-get", "install", "-y", "-qq", *packages])
