"""The few exception types users see, each mapped to a documented exit code.

Every stage raises one of these with the file, node and op it is about; the CLI turns it into one line on
stderr and the exit code below. Anything else escaping a stage is an internal error (exit 1).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_UNSUPPORTED = 3
EXIT_VERIFY_FAILED = 4


class SparseccError(Exception):
    """Base of all user-facing errors."""

    exit_code = EXIT_INTERNAL


class BadInput(SparseccError):
    """Unreadable or invalid model, bad option, unsafe path, bad calibration data (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class Unsupported(SparseccError):
    """A valid model using an op, opset, dtype or target we cannot compile (exit 3)."""

    exit_code = EXIT_UNSUPPORTED


class VerifyFailed(SparseccError):
    """The compiled artifact disagrees with ONNX Runtime beyond tolerance (exit 4)."""

    exit_code = EXIT_VERIFY_FAILED


def one_line(message: str) -> str:
    """Collapse a (possibly multi-line) message to a single line for stderr."""
    return " ".join(str(message).split())
