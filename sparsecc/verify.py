"""Verification against ONNX Runtime: inputs, reference outputs, and the error metric with its tolerance.

The relative error of an output is max|ours - ref| / max|ref| (absolute error when the reference is all
zeros); integer and boolean outputs must match exactly. Inputs are seeded random data unless given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .errors import BadInput, VerifyFailed, one_line
from .ir import Model, TensorSpec

DEFAULT_TOLERANCE = 1e-4
ort.set_default_logger_severity(3)  # errors reach users as our one-line messages, not ORT's log


def random_inputs(specs: list[TensorSpec], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for s in specs:
        dt = np.dtype(s.dtype)
        if dt.kind == "f":
            feeds[s.name] = rng.standard_normal(s.shape).astype(dt)
        elif dt.kind == "b":
            feeds[s.name] = rng.integers(0, 2, s.shape).astype(bool)
        else:  # integer inputs are usually indices: keep them small and valid
            feeds[s.name] = rng.integers(0, 2, s.shape).astype(dt)
    return feeds


def load_npz(path: str, specs: list[TensorSpec] | None = None) -> dict[str, np.ndarray]:
    """Read an input .npz (keys = input names), checking names and shapes against `specs` when given."""
    try:
        with np.load(path, allow_pickle=False) as data:
            feeds = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: not a readable .npz file ({one_line(e)})") from None
    if specs is not None:
        names = [s.name for s in specs]
        if set(feeds) != set(names):
            raise BadInput(f"{path}: keys {sorted(feeds)} do not match the model inputs {names}")
        for s in specs:
            if tuple(feeds[s.name].shape) != s.shape:
                raise BadInput(f"{path}: '{s.name}' has shape {list(feeds[s.name].shape)}, expected {list(s.shape)}")
    return feeds


def check_calibration(feeds: dict[str, np.ndarray], specs: list[TensorSpec], source: str) -> dict[str, np.ndarray]:
    """Validate calibration samples (keys = input names, shapes = input shapes but the leading sample dim) and
    cast them to the inputs' dtypes. Every pass that takes calibration data checks it here."""
    names = [s.name for s in specs]
    if set(feeds) != set(names):
        missing = sorted(set(names) - set(feeds))
        raise BadInput(f"{source}: calibration names {sorted(feeds)} do not match the model inputs {names}"
                       + (f" (lacks input(s) {missing})" if missing else ""))
    result, counts = {}, set()
    for s in specs:
        a = np.asarray(feeds[s.name])
        if a.ndim != len(s.shape) or tuple(a.shape[1:]) != tuple(s.shape[1:]) or len(a) == 0:
            raise BadInput(f"{source}: calibration input '{s.name}' has sample shape {list(a.shape[1:])} "
                           f"({len(a) if a.ndim else 0} samples), expected [N, {', '.join(map(str, s.shape[1:]))}]")
        if np.dtype(s.dtype).kind == "f" and a.dtype.kind != "f":
            raise BadInput(f"{source}: calibration input '{s.name}' has dtype {a.dtype}, expected {s.dtype}")
        result[s.name] = a.astype(s.dtype)
        counts.add(len(a))
    if len(counts) > 1:
        raise BadInput(f"{source}: calibration inputs have different sample counts {sorted(counts)}")
    return result


def load_calibration(path: str, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """Read calibration samples from an .npz and check them against the model's inputs."""
    return check_calibration(load_npz(path), specs, path)


def run_onnxruntime(model: Model, feeds: dict[str, np.ndarray], threads: int | None = None) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    try:
        sess = ort.InferenceSession(model.serialize(), opts, providers=["CPUExecutionProvider"])
        return sess.run(None, feeds)
    except Exception as e:  # ORT raises its own Fail / InvalidArgument types
        raise BadInput(f"{model.source}: ONNX Runtime cannot run the model: {one_line(e)[:300]}") from None


@dataclass(frozen=True)
class OutputError:
    name: str
    max_abs: float
    rel: float

    def to_json(self) -> dict:
        return {"name": self.name, "max_abs_error": self.max_abs, "rel_error": self.rel}


def compare(names: list[str], ours: list[np.ndarray], ref: list[np.ndarray]) -> list[OutputError]:
    errors = []
    for name, a, b in zip(names, ours, ref):
        if a.shape != b.shape:
            errors.append(OutputError(name, float("inf"), float("inf")))
            continue
        if b.dtype.kind in "biu":
            bad = float(np.count_nonzero(a != b))
            errors.append(OutputError(name, bad, bad))
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        max_abs = float(np.max(np.abs(a64 - b64))) if a.size else 0.0
        scale = float(np.max(np.abs(b64))) if b.size else 0.0
        if not np.isfinite(max_abs):
            max_abs = float("inf")
        errors.append(OutputError(name, max_abs, max_abs / scale if scale > 0 else max_abs))
    return errors


def verify_against_ort(model: Model, run, feeds: dict[str, np.ndarray], tolerance: float, origin: str) -> dict:
    """Run `run(feeds)` (an artifact) and ONNX Runtime on `model`; the verification record of the manifest."""
    ref = run_onnxruntime(model, feeds)
    errors = compare([s.name for s in model.outputs], run(feeds), ref)
    worst = max(errors, key=lambda e: e.rel)
    return {
        "status": "passed" if worst.rel <= tolerance else "failed",
        "reference": f"onnxruntime {ort.__version__}",
        "inputs": origin,
        "tolerance": tolerance,
        "max_rel_error": worst.rel,
        "max_abs_error": max(e.max_abs for e in errors),
        "outputs": [e.to_json() for e in errors],
    }


def require_passed(result: dict, source: str) -> None:
    """Raise VerifyFailed naming the output that diverged most, if the verification failed."""
    if result["status"] != "failed":
        return
    worst = max(result["outputs"], key=lambda e: e["rel_error"])
    raise VerifyFailed(
        f"{source}: output '{worst['name']}' differs from ONNX Runtime: relative error {worst['rel_error']:.3g} "
        f"> tolerance {result['tolerance']:g} (max abs {worst['max_abs_error']:.3g})"
    )
