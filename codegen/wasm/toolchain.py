"""The external tools of the wasm target: clang-14 and wasm-ld-14 to build, wasi-libc for libm, node to run.

`tools(need)` finds them (raising `Unsupported` that says how to get them); `setup(install)` is the
`sparsecc setup wasm` entry point, installing the Debian packages when asked. All are plain system packages:
nothing is downloaded at compile or run time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from sparsecc.errors import Unsupported

from ..targets import apt_install

MIN_NODE = 18
WASI_LIBC = Path("/usr/lib/wasm32-wasi/libc.a")
# tool -> (program, Debian package that provides it)
TOOLS: dict[str, tuple[str, str]] = {
    "clang": ("clang-14", "clang-14"),
    "wasm-ld": ("wasm-ld-14", "lld-14"),
    "libc": (str(WASI_LIBC), "wasi-libc"),
    "node": ("node", "nodejs"),
}
BUILD_TOOLS = ("clang", "wasm-ld", "libc")


def _find(tool: str) -> str | None:
    program = TOOLS[tool][0]
    if tool == "libc":
        return program if Path(program).is_file() else None
    path = shutil.which(program)
    if tool == "node" and path and node_version(path) < MIN_NODE:
        return None
    return path


def node_version(path: str) -> int:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    match = re.match(r"v(\d+)", out.strip())
    return int(match.group(1)) if match else 0


def tools(need: tuple[str, ...] = tuple(TOOLS)) -> dict[str, str]:
    """Paths of the tools in `need`, or `Unsupported` naming the missing ones."""
    found = {t: _find(t) for t in need}
    missing = [t for t, p in found.items() if p is None]
    if missing:
        names = ", ".join(TOOLS[t][0] + (f" >= {MIN_NODE}" if t == "node" else "") for t in missing)
        raise Unsupported(f"wasm toolchain missing: {names}: run `sparsecc setup wasm`")
    return {t: str(p) for t, p in found.items()}


def setup(install: bool) -> dict[str, Any]:
    """Check the wasm tools; with `install`, apt-get the missing ones first (idempotent)."""
    missing = [t for t in TOOLS if _find(t) is None]
    if missing and install:
        apt_install("wasm", sorted({TOOLS[t][1] for t in missing}))
    return {"status": "ready", "tools": tools()}


__all__ = ["BUILD_TOOLS", "MIN_NODE", "setup", "tools"]
