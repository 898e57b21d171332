"""Ahead-of-time device code: the exported library carries a fatbin (SASS + PTX for the target's arch).

TVM's CUDA codegen hands the kernels' CUDA source to the runtime factory `ffi.Module.create.cuda`, which
compiles it through the `tvm_callback_cuda_compile` hook and keeps the binary; `export_library` then
serializes that binary into the library, and TVM's runtime loads it on a GPU machine with the driver alone
(no nvcc, no Python hook). The factory lives in `libtvm_runtime_cuda`, which links the CUDA driver: on a build
machine without one, that library is loaded against a stub driver whose every entry point reports "no
device" (only module creation and serialization run here, and they do not call the driver). Without the
factory, the codegen would fall back to embedding the CUDA *source*, compiled at load time by the hook.

During a build the hook compiles with nvcc for the target's arch only (`-gencode arch=compute_XX,
code=[sm_XX,compute_XX]`, uncompressed, so the PTX stays readable in the library).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import tvm
import tvm_ffi

from sparsecc.errors import Unsupported

STUB_DIR = Path.home() / ".cache" / "sparsecc" / "cuda-stub"
# The driver entry points libtvm_runtime_cuda imports; the stub answers CUDA_ERROR_NO_DEVICE (100).
STUB_SOURCE = """
#define NO_DEVICE(name) int name() { return 100; }
NO_DEVICE(cuDeviceGetName) NO_DEVICE(cuFuncSetAttribute) NO_DEVICE(cuLaunchKernelEx)
NO_DEVICE(cuModuleGetFunction) NO_DEVICE(cuModuleLoadData) NO_DEVICE(cuModuleUnload)
NO_DEVICE(cuTensorMapEncodeTiled)
int cuGetErrorName(int e, const char **s) { *s = "CUDA_ERROR_NO_DEVICE"; return 0; }
int cuGetErrorString(int e, const char **s) { *s = "no CUDA driver on this machine"; return 0; }
"""
NVCC_OPTIONS = ["--no-compress"]


def nvcc_path() -> str:
    path = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if path is None:
        raise Unsupported("target 'cuda' needs the CUDA toolkit's nvcc; missing: install the CUDA toolkit "
                          "(https://developer.nvidia.com/cuda-downloads) and put nvcc on PATH")
    return path


def _driver_loaded() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
        return True
    except OSError:
        return False


def _load_stub_driver() -> None:
    lib = STUB_DIR / "libcuda.so.1"
    if not lib.exists():
        STUB_DIR.mkdir(parents=True, exist_ok=True)
        src = STUB_DIR / "stub.c"
        src.write_text(STUB_SOURCE)
        tmp = STUB_DIR / f"libcuda.so.1.{id(src)}"
        cc = shutil.which("cc") or shutil.which("gcc") or "cc"
        subprocess.run([cc, "-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1", "-o", str(tmp), str(src)],
                       check=True, capture_output=True)
        tmp.replace(lib)
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)


def ensure_cuda_module_factory() -> None:
    """Make `ffi.Module.create.cuda` available (loading libtvm_runtime_cuda, against a stub driver if need be)."""
    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None:
        return
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    if not _driver_loaded():
        _load_stub_driver()
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(package="tvm", target_name="tvm_runtime_cuda",
                                                        extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")
    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        raise Unsupported("this TVM build has no CUDA runtime module (libtvm_runtime_cuda)")


def compile_fatbin(code: str, arch: str) -> bytes:
    """CUDA source -> fatbin with SASS and PTX for `arch` (e.g. sm_80, sm_90a)."""
    from tvm.support import nvcc

    nvcc_path()
    suffix = arch.removeprefix("sm_")
    gencode = ["-gencode", f"arch=compute_{suffix},code=[sm_{suffix},compute_{suffix}]"]
    return bytes(nvcc.compile_cuda(code, target_format="fatbin", arch=gencode, options=NVCC_OPTIONS,
                                   compiler="nvcc"))


@contextmanager
def ahead_of_time(arch: str) -> Iterator[None]:
    """While active, CUDA kernels built by `tvm.compile` are compiled by nvcc into the module's binary."""
    ensure_cuda_module_factory()
    previous = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)

    def compile_for_arch(code: str, *_target) -> bytes:
        return compile_fatbin(code, arch)

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_for_arch, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", previous, override=True)


def device_modules(mod: tvm.runtime.Module) -> list[tvm.runtime.Module]:
    """The CUDA modules imported (transitively) by a compiled or loaded library."""
    found = [mod] if mod.kind == "cuda" else []
    for sub in mod.imports:
        found.extend(device_modules(sub))
    return found
