"""The model zoo: synthetic builders of export-shaped ONNX graphs and small trained models with their data.

Builders (`BUILDERS`) make random-weight models of any size for tests of passes and codegen; the trained
digits models (`TRAINED`) come with test and calibration data, so accuracy before and after a pipeline
can be compared. Nothing here imports torch: training lives in `train_digits.py`, run by hand.
"""

from .builders import BUILDERS, build_mlp, build_resnet_cnn, build_transformer
from .zoo import TRAINED, accuracy, calib_data, model_path, test_data

__all__ = [
    "BUILDERS",
    "TRAINED",
    "accuracy",
    "build_mlp",
    "build_resnet_cnn",
    "build_transformer",
    "calib_data",
    "model_path",
    "test_data",
]
