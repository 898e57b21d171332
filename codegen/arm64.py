"""The aarch64 (ARM64 Linux) target: cross-compiled artifacts, run on a board or here under qemu.

`--target arm64` (alias `aarch64`) builds with the shared LLVM backend for `aarch64-linux-gnu` (default CPU
`cortex-a72`, generic 128-bit NEON; `--mcpu`/`--mattr` name others, raw LLVM target dicts with an aarch64
triple land here too). What differs from the host CPU target is this module: the sparse cost model decides
from its analytic model (timing on this machine would measure the wrong CPU), the library is linked with
Debian's `aarch64-linux-gnu-g++`, and the artifact also holds `runner`, a small C++ program
(`arm64_runner.cc`) that runs the Relax VM with nothing but TVM's runtime libraries. The `aarch64` executor
runs that program, under `qemu-aarch64-static` user-mode emulation on any other host, with the aarch64 TVM
runtime that `sparsecc setup arm64` fetches from PyPI into `~/.cache/sparsecc/aarch64-runtime`.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm.target.codegen import llvm_get_cpu_archlist, llvm_get_cpu_features

from sparsecc.artifact import Manifest
from sparsecc.errors import BadInput, SparseccError, Unsupported, one_line
from sparsecc.pipeline import register_target, register_toolchain
from sparsecc.runtime import register_executor

from .build import LLVMBackend
from .targets import RAW_LLVM_TARGETS, TargetSpec, apt_install, run_setup_command

TRIPLE = "aarch64-linux-gnu"
DEFAULT_MCPU = "cortex-a72"
CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64-static"
SYSROOT = Path("/usr/aarch64-linux-gnu")  # the cross toolchain's libc and libstdc++, for qemu's loader
APT_PACKAGES = ("g++-aarch64-linux-gnu", "qemu-user-static")
RUNNER = "runner"
RUNNER_SOURCE = Path(__file__).with_name("arm64_runner.cc")
# What the runner needs from the aarch64 wheels (wheel file -> paths kept); the versions are the host's.
RUNTIME_FILES = {"apache-tvm": ("tvm/lib/libtvm_runtime.so",),
                 "apache-tvm-ffi": ("tvm_ffi/lib/libtvm_ffi.so", "tvm_ffi/include/")}


def runtime_dir() -> Path:
    """`~/.cache/sparsecc/aarch64-runtime/<tvm version>` (or under `$XDG_CACHE_HOME`)."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "sparsecc" / "aarch64-runtime" / f"tvm-{_version('apache-tvm')}-ffi-{_version('apache-tvm-ffi')}"


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


# ------------------------------------------------------------------------------------------- toolchain

def _emulated() -> bool:
    return platform.machine() not in ("aarch64", "arm64")


def _tools() -> dict[str, str | None]:
    tools: dict[str, str | None] = {CXX: shutil.which(CXX)}
    if _emulated():
        tools[QEMU] = shutil.which(QEMU)
    lib = runtime_dir() / "lib"
    tools["aarch64 TVM runtime"] = str(lib) if (lib / "libtvm_runtime.so").is_file() else None
    return tools


def _install() -> None:
    missing = [p for p, tool in zip(APT_PACKAGES, (CXX, QEMU)) if not shutil.which(tool)]
    if missing:
        apt_install("arm64", missing)
    if not (runtime_dir() / "lib" / "libtvm_runtime.so").is_file():
        _fetch_runtime(runtime_dir())


def _fetch_runtime(dest: Path) -> None:
    """The aarch64 wheels of the installed TVM and tvm-ffi versions, unpacked to what the runner needs."""
    with tempfile.TemporaryDirectory() as tmp:
        py = f"{sys.version_info.major}.{sys.version_info.minor}"
        run_setup_command("arm64", [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                "--platform", "manylinux_2_28_aarch64", "--python-version", py, "-d", tmp,
                *(f"{dist}=={_version(dist)}" for dist in RUNTIME_FILES)])
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=_mkdir(dest.parent)))
        for wheel in Path(tmp).glob("*.whl"):
            dist = "apache-tvm-ffi" if wheel.name.startswith("apache_tvm_ffi") else "apache-tvm"
            with zipfile.ZipFile(wheel) as zf:
                for name in zf.namelist():
                    if name.startswith(RUNTIME_FILES[dist]) and not name.endswith("/"):
                        rel = Path(name).name if name.endswith(".so") else Path(name).relative_to("tvm_ffi")
                        out = staging / ("lib" if name.endswith(".so") else "") / rel
                        _mkdir(out.parent)
                        out.write_bytes(zf.read(name))
        shutil.rmtree(dest, ignore_errors=True)
        staging.replace(dest)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@register_toolchain("arm64")
def arm64_toolchain(install: bool) -> dict[str, Any]:
    """Cross compiler, qemu (off aarch64 hosts) and the aarch64 TVM runtime; builds the runner once."""
    if install:
        _install()
    tools = require_toolchain()
    tools[RUNNER] = str(runner_binary())
    return {"status": "ready", "tools": tools}


def require_toolchain(build: bool = True) -> dict[str, str | None]:
    """The tools to build (or, `build=False`, only to run) arm64 artifacts here, or one line naming the
    missing ones."""
    tools = {name: path for name, path in _tools().items() if build or name != CXX}
    missing = [name for name, path in tools.items() if not path]
    if missing:
        raise Unsupported(f"arm64 toolchain missing: {', '.join(missing)}: run `sparsecc setup arm64`")
    return tools


def runner_binary() -> Path:
    """The cross-built runner, cached next to the runtime by a hash of its source."""
    source = RUNNER_SOURCE.read_bytes()
    path = runtime_dir() / f"runner-{hashlib.sha256(source).hexdigest()[:12]}"
    if path.is_file():
        return path
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    rt = runtime_dir()
    cmd = [CXX, "-std=c++17", "-O2", "-s", f"-I{rt / 'include'}", str(RUNNER_SOURCE), "-o", str(tmp),
           f"-L{rt / 'lib'}", "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-Wl,-rpath,$ORIGIN"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise Unsupported(f"arm64: building the runner failed: {one_line(proc.stderr)[:400]}")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------- target

def arm64_spec(tgt: dict[str, Any]) -> TargetSpec:
    """The target-table entry for an aarch64 LLVM target dict (checked, with the toolchain present)."""
    cpu = str(tgt.get("mcpu", "generic"))
    if cpu not in llvm_get_cpu_archlist(tvm.target.Target({"kind": "llvm", "mtriple": TRIPLE})):
        raise BadInput(f"--mcpu {cpu}: not an aarch64 CPU LLVM knows (e.g. cortex-a72, cortex-a76, neoverse-n1)")
    try:
        with _stderr_silenced():  # LLVM warns about unknown features on stderr; we refuse them in one line
            features = llvm_get_cpu_features(tvm.target.Target(tgt))
    except (ValueError, TypeError, tvm.error.InternalError) as e:
        raise BadInput(f"arm64 target: {one_line(e)[:200]}") from None
    unknown = [a for a in tgt.get("mattr", []) if a.startswith("+") and a[1:] not in features]
    if unknown:
        raise BadInput(f"--mattr {','.join(unknown)}: not an aarch64 feature LLVM knows (e.g. +neon, +dotprod)")
    require_toolchain()
    return TargetSpec("arm64", tgt, runtime_kind="aarch64", export=export, native=False,
                      info={"triple": TRIPLE, "emulated_here": _emulated()})


@contextmanager
def _stderr_silenced() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def arm64_target(mcpu: str | None = None, mattr: tuple[str, ...] = (), threads: int | None = None) -> TargetSpec:
    tgt: dict[str, Any] = {"kind": "llvm", "mtriple": TRIPLE, "mcpu": mcpu or DEFAULT_MCPU,
                           "mattr": list(dict.fromkeys(("+neon", *mattr)))}
    if threads:
        tgt["num-cores"] = int(threads)
    return arm64_spec(tgt)


RAW_LLVM_TARGETS["aarch64"] = arm64_spec


@register_target("arm64", "aarch64")
def arm64_backend(options: dict[str, Any]) -> LLVMBackend:
    for name in ("arch", "dtype"):
        if options.get(name):
            raise Unsupported(f"--{name} is not supported for target 'arm64'")
    if int(options.get("tune") or 0) > 0:
        raise Unsupported("--tune for arm64 measures on the board: tune over RPC "
                          "(sparsecc.codegen.rpc), then compile with --tune-db")
    spec = arm64_target(options.get("mcpu"), tuple(options.get("mattr") or ()), options.get("threads"))
    return LLVMBackend(spec, options)


def export(ex: tvm.runtime.Executable, out_dir: Path) -> tuple[str, ...]:
    """model.so linked by the cross compiler, plus the runner."""
    ex.export_library(str(out_dir / "model.so"), fcompile=tvm.support.cc.cross_compiler(CXX))
    shutil.copy2(runner_binary(), out_dir / RUNNER)
    return ("model.so", RUNNER)


# -------------------------------------------------------------------------------------------- executor

def runner_command(runner: Path, library: Path) -> list[str]:
    """How to start the runner here: directly on aarch64, else under qemu with the cross sysroot."""
    prefix = [] if not _emulated() else [shutil.which(QEMU) or QEMU, "-L", str(SYSROOT)]
    return [*prefix, str(runner), str(library)]


def runner_env(threads: int | None = None) -> dict[str, str]:
    env = {**os.environ, "LD_LIBRARY_PATH": str(runtime_dir() / "lib"), "TVM_BIND_THREADS": "0"}
    if threads:
        env["TVM_NUM_THREADS"] = str(int(threads))
    return env


@register_executor("aarch64")
class Aarch64Executor:
    """Runs the artifact's runner on .npy files in a temporary directory."""

    def __init__(self, manifest: Manifest):
        require_toolchain(build=False)
        self.manifest = manifest
        self.command = runner_command(manifest.file(RUNNER), manifest.file(manifest.runtime["library"]))
        self.env = runner_env(manifest.runtime.get("threads"))

    def __call__(self, args: list[np.ndarray]) -> list[np.ndarray]:
        with tempfile.TemporaryDirectory(prefix="sparsecc-arm64-") as tmp:
            inputs = []
            for i, a in enumerate(args):
                inputs.append(os.path.join(tmp, f"in{i}.npy"))
                np.save(inputs[-1], np.ascontiguousarray(a))
            proc = subprocess.run([*self.command, "--out", tmp, *inputs], capture_output=True, text=True,
                                  env=self.env)
            if proc.returncode:
                detail = one_line(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
                raise SparseccError(f"{self.manifest.path}: the aarch64 runner failed: {detail[:300]}")
            count = len(self.manifest.outputs)
            return [np.load(os.path.join(tmp, f"out{i}.npy")) for i in range(count)]
