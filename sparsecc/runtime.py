"""Run a compiled artifact: `sparsecc.load(path) -> Runner`.

The loader checks the manifest and every file's sha256 before anything is loaded, then hands the library to
the executor named in `manifest.runtime.kind`. The native executor (`tvm-vm`) needs only TVM's runtime;
executors for emulated or foreign targets (qemu, node) register themselves from `sparsecc.codegen`.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .artifact import Manifest, read_manifest
from .errors import BadInput, Unsupported
from .ir import TensorSpec

# TVM's thread pool pins the calling (Python) thread to one core unless told not to, which silently slows
# everything else the user's process does afterwards (ONNX Runtime included). Users may still opt in.
os.environ.setdefault("TVM_BIND_THREADS", "0")


def load_above(per_core: float) -> bool:
    """Whether the 1-minute load average exceeds `per_core` runnable threads per core this process may use."""
    try:
        return os.getloadavg()[0] > per_core * len(os.sched_getaffinity(0))
    except (OSError, AttributeError):
        return False


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields), fields[3] + fields[4]  # all, idle + iowait


def others_busy(window_s: float = 0.05, share: float = 0.4) -> bool:
    """Whether other processes keep more than `share` of the machine's CPU time busy right now (sampled over
    `window_s` while this process sleeps); the load average where /proc/stat is missing."""
    try:
        total0, idle0 = _cpu_times()
        time.sleep(window_s)
        total1, idle1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return load_above(0.75)
    return total1 > total0 and 1.0 - (idle1 - idle0) / (total1 - total0) > share


@functools.cache
def choose_pool_spinning() -> None:
    """Between kernels TVM's idle pool workers spin (sched_yield) before they block. On an idle machine that
    halves the time of small models at 2 threads (ShuffleNet 4.0 -> 2.0 ms); when other processes keep the
    cores busy, a spinning worker has given its CPU away when the next kernel arrives and starts a time slice
    late, every kernel (the same model: 6 -> 65 ms), while a blocked worker is woken ahead of other processes.
    TVM reads the setting once per process, when its pool first runs, so it is chosen once, when the first
    artifact is loaded (before the pool runs, unless this process ran kernels already); an explicit
    TVM_THREAD_POOL_SPIN_COUNT wins."""
    if "TVM_THREAD_POOL_SPIN_COUNT" not in os.environ and others_busy():
        os.environ["TVM_THREAD_POOL_SPIN_COUNT"] = "0"


class Executor(Protocol):
    def __call__(self, args: list[np.ndarray]) -> list[np.ndarray]: ...


_EXECUTORS: dict[str, Callable[[Manifest], Executor]] = {}


def register_executor(kind: str) -> Callable:
    def deco(factory: Callable[[Manifest], Executor]) -> Callable[[Manifest], Executor]:
        _EXECUTORS[kind] = factory
        return factory

    return deco


def _to_numpy(value: Any) -> list[np.ndarray]:
    """Outputs as numpy arrays sharing the VM's fresh output buffers (no copy: a call allocates new ones)."""
    if hasattr(value, "__dlpack__"):
        return [np.from_dlpack(value)]
    if hasattr(value, "numpy"):
        return [value.numpy()]
    out: list[np.ndarray] = []
    for v in value:  # a tuple of outputs
        out.extend(_to_numpy(v))
    return out


@register_executor("tvm-vm")
class TvmVmExecutor:
    """Relax VM over a natively loadable shared library.

    Input tensors are allocated once per thread and refilled each call: `tvm.runtime.tensor(array)`
    costs ~100 us per input here, longer than whole small models take to run."""

    def __init__(self, manifest: Manifest):
        import tvm
        from tvm import relax

        choose_pool_spinning()
        threads = manifest.runtime.get("threads")
        if threads:
            # The pool's size is fixed from TVM_NUM_THREADS when it first starts (it defaulted to one worker
            # here); config_threadpool alone cannot grow it afterwards.
            os.environ.setdefault("TVM_NUM_THREADS", str(int(threads)))
            tvm.get_global_func("runtime.config_threadpool")(1, int(threads))
        lib = tvm.runtime.load_module(str(manifest.file(manifest.runtime["library"])))
        self._tvm = tvm
        self._vm = relax.VirtualMachine(lib, tvm.cpu())
        self._main = self._vm["main"]
        self._specs = [(s.shape, s.dtype) for s in manifest.inputs]
        self._local = threading.local()

    def _inputs(self) -> tuple[list[Any], list[np.ndarray]]:
        """This thread's input tensors, and numpy views of them."""
        buffers = getattr(self._local, "inputs", None)
        if buffers is None:
            tensors = [self._tvm.runtime.empty(shape, dtype) for shape, dtype in self._specs]
            buffers = self._local.inputs = (tensors, [np.from_dlpack(t) for t in tensors])
        return buffers

    def __call__(self, args: list[np.ndarray]) -> list[np.ndarray]:
        tensors, views = self._inputs()
        for view, a in zip(views, args):
            np.copyto(view, a, casting="no")
        outputs = _to_numpy(self._main(*tensors))
        # An output may be a view of an input (a model that reshapes its input): copy it, since the input
        # buffers are refilled on the next call.
        return [o.copy() if any(np.may_share_memory(o, v) for v in views) else o for o in outputs]


class Runner:
    """A loaded artifact. `run(feeds)` returns outputs in the model's output order."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        kind = manifest.runtime.get("kind")
        if kind not in _EXECUTORS:
            _load_plugin_executors()
        if kind not in _EXECUTORS:
            raise Unsupported(f"{manifest.path}: runtime '{kind}' is not available here")
        self._execute = _EXECUTORS[kind](manifest)

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.manifest.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.manifest.outputs

    def _arguments(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        names = [s.name for s in self.inputs]
        missing = [n for n in names if n not in feeds]
        extra = [n for n in feeds if n not in names]
        if missing or extra:
            raise BadInput(f"inputs do not match the model: missing {missing}, unexpected {extra}; expected {names}")
        args = []
        for spec in self.inputs:
            a = np.asarray(feeds[spec.name])
            if tuple(a.shape) != spec.shape:
                raise BadInput(f"input '{spec.name}' has shape {list(a.shape)}, the artifact expects {list(spec.shape)}")
            if a.dtype != np.dtype(spec.dtype):
                if not np.can_cast(a.dtype, spec.dtype, casting="same_kind"):
                    raise BadInput(f"input '{spec.name}' has dtype {a.dtype}, the artifact expects {spec.dtype}")
                a = a.astype(spec.dtype)
            args.append(a)
        return args

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._execute(self._arguments(feeds))


def _load_plugin_executors() -> None:
    from .pipeline import load_plugins

    load_plugins()


def load(path: str | Path) -> Runner:
    """Load an artifact directory, refusing it if any file does not match the manifest."""
    return Runner(read_manifest(path, check_files=True))
