"""The shipped, trained zoo models and their data: where the files are and how to feed them.

The models under this folder were trained on scikit-learn's 8x8 digits by `train_digits.py`; this module
only reads what it wrote. `digits_data.npz` holds the held-out test set and a small calibration set
(training samples, for passes that need activations) once per input layout, pixels scaled to [0, 1]: the
MLP takes [N, 64], the CNNs [N, 1, 8, 8] and the transformer [N, 8, 8] (eight rows as eight tokens).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

from sparsecc.errors import BadInput

HERE = Path(__file__).parent
DATA_FILE = HERE / "digits_data.npz"
INPUT_NAME = "input"

# Per-sample input shape of each layout; the npz stores `<layout>_x` and `calib_<layout>_x` in it.
LAYOUT_SHAPES: dict[str, tuple[int, ...]] = {"mlp": (64,), "cnn": (1, 8, 8), "transformer": (8, 8)}
LAYOUT_OF: dict[str, str] = {
    "digits_mlp": "mlp",
    "digits_cnn": "cnn",
    "digits_cnn_folded": "cnn",
    "digits_transformer": "transformer",
}
TRAINED: tuple[str, ...] = tuple(LAYOUT_OF)


def _layout(name: str) -> str:
    if name not in LAYOUT_OF:
        raise BadInput(f"unknown zoo model '{name}'; trained models are: {', '.join(TRAINED)}")
    return LAYOUT_OF[name]


@cache
def _arrays() -> dict[str, np.ndarray]:
    with np.load(DATA_FILE) as data:
        return {key: data[key] for key in data.files}


def model_path(name: str) -> Path:
    """The ONNX file of a trained zoo model."""
    _layout(name)
    return HERE / f"{name}.onnx"


def test_data(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Held-out inputs in `name`'s layout (float32) and their labels (int64)."""
    arrays = _arrays()
    # Copies, so that a caller editing its inputs in place cannot change what the next caller gets.
    return arrays[f"{_layout(name)}_x"].copy(), arrays["y_test"].copy()


test_data.__test__ = False  # its name would make pytest collect it wherever a test module imports it


def calib_data(name: str) -> dict[str, np.ndarray]:
    """A feed dict of ~128 training samples for calibration, keyed by the model's ONNX input name."""
    return {INPUT_NAME: _arrays()[f"calib_{_layout(name)}_x"].copy()}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of [N, classes] logits against [N] integer labels."""
    return float(np.mean(np.argmax(logits, axis=-1) == labels))
