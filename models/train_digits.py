"""Train the zoo's digits models with PyTorch and ship them as ONNX next to this file, with their data.

Run `python models/train_digits.py` (needs the `zoo` extra: torch==2.13.0 and scikit-learn; about a minute
on two cores). It splits scikit-learn's bundled 8x8 digits 70/30 (stratified, fixed seed), trains an MLP, a
ResNet-style CNN and a small transformer with fixed seeds, exports each with the TorchScript exporter at
opset 17 (the dynamo exporter would need onnxscript), checks every file's accuracy through onnxruntime
against its floor, writes `digits_data.npz`, and prints the README table rows with sha256 sums. The CNN is
exported twice: with BatchNormalization kept as nodes, and with BN folded into the convolutions.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from sparsecc import models

SEED = 0
OPSET = 17
MAX_IR_VERSION = 10  # onnxruntime-web reads IR <= 13; the builders use 10 too
CALIB_SAMPLES = 128


# --- models -----------------------------------------------------------------------------------------


def digits_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def conv_bn(
    c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True
) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class DigitsCNN(nn.Module):
    """The same block sequence as `build_resnet_cnn`: basic block, strided stage, depthwise, Concat."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        w, w2 = width, 2 * width
        self.stem = conv_bn(1, w, 3)
        self.block = nn.Sequential(conv_bn(w, w, 3), conv_bn(w, w, 3, relu=False))
        self.stage = nn.Sequential(conv_bn(w, w2, 3, stride=2), conv_bn(w2, w2, 3, relu=False))
        self.project = conv_bn(w, w2, 1, stride=2, relu=False)
        self.separable = nn.Sequential(conv_bn(w2, w2, 3, groups=w2), conv_bn(w2, w2, 1))
        self.branch_1x1, self.branch_3x3 = conv_bn(w2, w, 1), conv_bn(w2, w, 3)
        self.head = nn.Linear(w2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.block(x) + x)
        x = torch.relu(self.stage(x) + self.project(x))
        x = self.separable(x)
        x = torch.cat([self.branch_1x1(x), self.branch_3x3(x)], dim=1)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Attention(nn.Module):
    """Multi-head self-attention spelled out so the export shows MatMul/Reshape/Transpose/Softmax."""

    def __init__(self, seq: int, d_model: int, heads: int) -> None:
        super().__init__()
        self.seq, self.d_model, self.heads = seq, d_model, heads
        self.q, self.k, self.v, self.out = (nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # -1 for the batch and constants elsewhere export as one constant Reshape shape, no Shape ops.
        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(-1, self.seq, self.heads, self.d_model // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.d_model // self.heads), dim=-1)
        return self.out((probs @ v).transpose(1, 2).reshape(-1, self.seq, self.d_model))


class EncoderLayer(nn.Module):
    def __init__(self, seq: int, d_model: int, heads: int, ff: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attention = Attention(seq, d_model, heads)
        self.ffn = nn.Sequential(nn.Linear(d_model, ff), nn.GELU(), nn.Linear(ff, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class DigitsTransformer(nn.Module):
    """Eight image rows as eight tokens: linear embedding + learned positions, pre-norm encoder, mean pool."""

    def __init__(
        self,
        seq: int = 8,
        features: int = 8,
        d_model: int = 64,
        heads: int = 4,
        ff: int = 128,
        layers: int = 2,
        classes: int = 10,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(features, d_model)
        self.position = nn.Parameter(torch.randn(seq, d_model) * 0.02)
        self.layers = nn.Sequential(*(EncoderLayer(seq, d_model, heads, ff) for _ in range(layers)))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.embed(x) + self.position)
        return self.head(self.norm(x).mean(dim=1))


# --- recipes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """How one trained model is made: its network, training schedule and the accuracy it must reach."""

    make: Callable[[], nn.Module]
    epochs: int
    lr: float
    min_accuracy: float


RECIPES: dict[str, Recipe] = {
    "digits_mlp": Recipe(digits_mlp, epochs=60, lr=1e-3, min_accuracy=0.95),
    "digits_cnn": Recipe(DigitsCNN, epochs=30, lr=2e-3, min_accuracy=0.95),
    "digits_transformer": Recipe(DigitsTransformer, epochs=80, lr=1e-3, min_accuracy=0.90),
}
# The folded CNN is the trained digits_cnn exported again with BN folded: (source, fold BN?) per file.
EXPORTS: dict[str, tuple[str, bool]] = {
    "digits_mlp": ("digits_mlp", True),
    "digits_cnn": ("digits_cnn", False),
    "digits_cnn_folded": ("digits_cnn", True),
    "digits_transformer": ("digits_transformer", True),
}


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flat [N, 64] float32 pixels in [0, 1] and int64 labels: x_train, x_test, y_train, y_test."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.3, random_state=SEED, stratify=y)


def in_layout(x: np.ndarray, layout: str) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(-1, *models.zoo.LAYOUT_SHAPES[layout]))


def train(recipe: Recipe, layout: str, x: np.ndarray, y: np.ndarray) -> nn.Module:
    torch.manual_seed(SEED)
    model = recipe.make()
    xs, ys = torch.from_numpy(in_layout(x, layout)), torch.from_numpy(y)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=1e-4)
    batches = math.ceil(len(xs) / 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.lr, total_steps=recipe.epochs * batches)
    shuffle = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(recipe.epochs):
        for idx in torch.randperm(len(xs), generator=shuffle).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xs[idx]), ys[idx]).backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def export(model: nn.Module, sample: np.ndarray, fold_bn: bool) -> onnx.ModelProto:
    """TorchScript export in eval mode; constant folding is what folds BN into Conv, so it follows fold_bn."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The legacy exporter announces its own deprecation on every call; it is the one needing no extras.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(
            model,
            (torch.from_numpy(sample),),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=[models.zoo.INPUT_NAME],
            output_names=["logits"],
            dynamic_axes={models.zoo.INPUT_NAME: {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=fold_bn,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    materialize_identities(proto)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def materialize_identities(proto: onnx.ModelProto) -> None:
    """Replace each Identity of an initializer by a copy of that initializer, in place.

    The exporter deduplicates equal initializers behind Identity nodes; BN betas on both sides of a
    residual Add get equal gradients and so stay equal. Passes expect a layer's parameters to be its own.
    """
    weights = {init.name: init for init in proto.graph.initializer}
    for node in [n for n in proto.graph.node if n.op_type == "Identity" and n.input[0] in weights]:
        copy = onnx.TensorProto()
        copy.CopyFrom(weights[node.input[0]])
        copy.name = node.output[0]
        proto.graph.initializer.append(copy)
        proto.graph.node.remove(node)


def onnx_accuracy(proto: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return models.zoo.accuracy(session.run(None, {models.zoo.INPUT_NAME: x})[0], y)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez_compressed, but with fixed zip timestamps so the file's sha256 is reproducible."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for key, array in arrays.items():
            payload = io.BytesIO()
            np.lib.format.write_array(payload, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, payload.getvalue())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    x_train, x_test, y_train, y_test = load_split()
    calib = x_train[:CALIB_SAMPLES]
    trained = {
        name: train(recipe, models.zoo.LAYOUT_OF[name], x_train, y_train) for name, recipe in RECIPES.items()
    }

    rows = []
    for name, (source, fold_bn) in EXPORTS.items():
        recipe, layout = RECIPES[source], models.zoo.LAYOUT_OF[name]
        x = in_layout(x_test, layout)
        proto = export(trained[source], x[:2], fold_bn)
        acc = onnx_accuracy(proto, x, y_test)
        if acc < recipe.min_accuracy:
            raise SystemExit(f"{name}: test accuracy {acc:.4f} is below its floor {recipe.min_accuracy}")
        path = models.zoo.model_path(name)
        onnx.save(proto, path)
        ops = Counter(node.op_type for node in proto.graph.node)
        print(f"{name}: accuracy {acc:.4f}, {path.stat().st_size} bytes, ops {dict(sorted(ops.items()))}")
        rows.append(
            f"| `{path.name}` | {acc:.2%} | [N, {', '.join(map(str, models.zoo.LAYOUT_SHAPES[layout]))}]"
            f" | `{sha256(path)}` |"
        )

    arrays = {"y_test": y_test, "calib_y": y_train[:CALIB_SAMPLES]}
    for layout in sorted(set(models.zoo.LAYOUT_OF.values())):
        arrays[f"{layout}_x"] = in_layout(x_test, layout)
        arrays[f"calib_{layout}_x"] = in_layout(calib, layout)
    save_npz(models.zoo.DATA_FILE, arrays)
    rows.append(f"| `{models.zoo.DATA_FILE.name}` | | | `{sha256(models.zoo.DATA_FILE)}` |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
