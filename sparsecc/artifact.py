"""The deployable bundle: layout, manifest, atomic write, and integrity checks on load.

An artifact is a directory: `manifest.json` (schema version, tool versions, target, I/O specs, sha256 of every
file, verification result, timings), the compiled library, the exact `model.onnx` that was compiled and a
deterministic `report.json`. It is built in a temporary sibling directory and renamed into place only when
complete, so an interrupted or failed compile never leaves a partial artifact behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BadInput
from .ir import TensorSpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
REPORT_FILE = "report.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so cleanup runs for both Ctrl-C and kill."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_output(output: Path, force: bool) -> None:
    """Refuse to replace an existing output unless forced, and never replace a non-directory."""
    if output.exists() and not force:
        raise BadInput(f"{output}: already exists (use --force to replace it)")
    if output.exists() and not output.is_dir():
        raise BadInput(f"{output}: exists and is not a directory")


@contextmanager
def atomic_directory(output: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `output`; on success it replaces `output`, on any failure it is removed."""
    output = Path(output)
    check_output(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the artifact should be like any other directory
    try:
        with _sigterm_as_interrupt():
            yield tmp
            if output.exists():
                old = output.with_name(f".{output.name}.old-{os.getpid()}")
                os.rename(output, old)
                os.rename(tmp, output)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass
class Manifest:
    """The parsed manifest of an artifact directory."""

    path: Path
    data: dict[str, Any]

    @property
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec.from_json(d) for d in self.data["inputs"]]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec.from_json(d) for d in self.data["outputs"]]

    @property
    def target(self) -> dict[str, Any]:
        return self.data["target"]

    @property
    def runtime(self) -> dict[str, Any]:
        return self.data["runtime"]

    @property
    def verification(self) -> dict[str, Any]:
        return self.data.get("verification", {})

    def file(self, name: str) -> Path:
        return self.path / name


def read_manifest(path: str | Path, check_files: bool = True) -> Manifest:
    """Read an artifact's manifest; with `check_files`, refuse any file whose sha256 does not match."""
    root = Path(path)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise BadInput(f"{root}: not an artifact directory")
    if not mpath.is_file():
        raise BadInput(f"{root}: not an artifact (no {MANIFEST})")
    try:
        data = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{mpath}: unreadable manifest ({e})") from None
    required = ("schema", "files", "inputs", "outputs", "target", "runtime")
    if not isinstance(data, dict) or any(k not in data for k in required):
        raise BadInput(f"{mpath}: malformed manifest (needs {', '.join(required)})")
    if data["schema"] != SCHEMA_VERSION:
        raise BadInput(f"{mpath}: manifest schema {data['schema']} is not supported (expected {SCHEMA_VERSION})")
    if check_files:
        for name, digest in sorted(data["files"].items()):
            f = root / name
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise BadInput(f"{mpath}: file entry '{name}' leaves the artifact")
            if not f.is_file():
                raise BadInput(f"{root}: file '{name}' listed in the manifest is missing")
            if sha256_file(f) != digest:
                raise BadInput(f"{root}: file '{name}' does not match its sha256 in the manifest (modified?)")
    return Manifest(root, data)
