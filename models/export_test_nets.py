"""Export small, architecturally faithful OCR and text-detection networks to ONNX for the pruning tests.

Runs under a torch environment (torch is not a dependency of sparsecc):
`python models/export_test_nets.py [OUT_DIR]` writes into tests/data/ by default.

- `crnn_ocr.onnx`: a CRNN recognizer as PaddleOCR / EasyOCR ship them: Conv+BN+ReLU backbone with max pooling
  (32x100 input down to height 2), the (B, C, H, W) -> (W, B, C*H) permute/reshape, a 2-layer bidirectional
  LSTM and a Linear to the classes (CTC logits). Exported with its BatchNormalization nodes (BN not folded).
- `dbnet_det.onnx`: a DBNet text detector: a residual backbone with strided convs, an FPN top-down path
  (nearest x2 upsampling + Add, then every level upsampled to 1/4 and concatenated), and the DB heads
  (Conv-BN-ReLU, two ConvTranspose x2 upsamplings, Sigmoid) for probability and threshold maps.
  Exported with `training=EVAL`, so the TorchScript exporter folds every Conv->BN (the BN after a
  ConvTranspose stays).

Weights are random (seeded): the files serve validity / parameter-count checks, not accuracy. Both have a
dynamic batch axis, opset 17 and IR version 10, like real exports.
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import torch
from torch import nn

OPSET = 17
IR_VERSION = 10


def conv_bn_relu(c_in: int, c_out: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class CRNN(nn.Module):
    """Conv backbone -> (W, B, C*H) sequence -> BiLSTM x2 -> Linear (CTC classes)."""

    def __init__(self, n_classes: int = 37, hidden: int = 48):
        super().__init__()
        self.backbone = nn.Sequential(
            conv_bn_relu(1, 16),
            nn.MaxPool2d(2, 2),  # 32x100 -> 16x50
            conv_bn_relu(16, 32),
            nn.MaxPool2d(2, 2),  # 8x25
            conv_bn_relu(32, 48),
            conv_bn_relu(48, 48),
            nn.MaxPool2d((2, 1), (2, 1)),  # 4x25
            conv_bn_relu(48, 64),
            nn.MaxPool2d((2, 1), (2, 1)),  # 2x25
        )
        self.rnn = nn.LSTM(64 * 2, hidden, num_layers=2, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)  # (B, C, H, W)
        b, c, h, w = f.shape
        seq = f.permute(3, 0, 1, 2).reshape(w, b, c * h)  # (W, B, C*H)
        y, _ = self.rnn(seq)
        return self.fc(y)  # (W, B, classes)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn_relu(c_in, c_out, 3, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.down = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(self.conv1(x)) + self.down(x))


class DBHead(nn.Module):
    """Conv-BN-ReLU, ConvTranspose x2 -BN-ReLU, ConvTranspose x2 to one map, Sigmoid."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(c, c // 4),
            nn.ConvTranspose2d(c // 4, c // 4, 2, 2),
            nn.BatchNorm2d(c // 4),
            nn.ReLU(),
            nn.ConvTranspose2d(c // 4, 1, 2, 2),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class DBNet(nn.Module):
    """ResNet-ish backbone (1/4 .. 1/32) -> FPN (nearest x2 + Add, concat at 1/4) -> DB heads."""

    def __init__(self, widths: tuple[int, ...] = (16, 24, 32, 48), inner: int = 32):
        super().__init__()
        self.stem = nn.Sequential(conv_bn_relu(3, 16, 3, 2), nn.MaxPool2d(3, 2, 1))  # 1/4
        stages, c = [], 16
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(c, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)))
            c = w
        self.stages = nn.ModuleList(stages)
        self.lateral = nn.ModuleList(nn.Conv2d(w, inner, 1, bias=False) for w in widths)
        self.smooth = nn.ModuleList(nn.Conv2d(inner, inner // 4, 3, 1, 1, bias=False) for _ in widths)
        self.binarize = DBHead(inner)
        self.thresh = DBHead(inner)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = []
        y = self.stem(x)
        for stage in self.stages:
            y = stage(y)
            feats.append(y)
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 1, 0, -1):  # top-down
            lat[i - 1] = lat[i - 1] + nn.functional.interpolate(lat[i], scale_factor=2, mode="nearest")
        outs = []
        for i, (conv, f) in enumerate(zip(self.smooth, lat)):
            o = conv(f)
            outs.append(nn.functional.interpolate(o, scale_factor=2**i, mode="nearest") if i else o)
        fuse = torch.cat(outs[::-1], dim=1)
        return self.binarize(fuse), self.thresh(fuse)


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN statistics, so folding (or dropping) BN changes the numbers."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=gen) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=gen) * 0.1
            m.running_mean = torch.randn(m.num_features, generator=gen) * 0.1
            m.running_var = torch.rand(m.num_features, generator=gen) + 0.5


def export(model: nn.Module, x: torch.Tensor, path: Path, outputs: list[str], fold_bn: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    _randomize_bn(model, gen)
    model.eval()
    axes = {"input": {0: "batch"}} | {o: {0: "batch"} for o in outputs}
    if outputs == ["logits"]:  # CRNN output is (W, B, classes): batch is axis 1
        axes["logits"] = {1: "batch"}
    torch.onnx.export(
        model,
        (x,),
        str(path),
        input_names=["input"],
        output_names=outputs,
        dynamic_axes=axes,
        opset_version=OPSET,
        dynamo=False,
        do_constant_folding=True,
        training=torch.onnx.TrainingMode.EVAL if fold_bn else torch.onnx.TrainingMode.PRESERVE,
    )
    proto = onnx.load(str(path))
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    print(f"{path}: {path.stat().st_size / 1024:.0f} KiB")


def main(out_dir: Path) -> None:
    torch.manual_seed(0)
    out_dir.mkdir(parents=True, exist_ok=True)
    export(CRNN(), torch.randn(1, 1, 32, 100), out_dir / "crnn_ocr.onnx", ["logits"], fold_bn=False)
    export(DBNet(), torch.randn(1, 3, 64, 64), out_dir / "dbnet_det.onnx", ["prob", "thresh"], fold_bn=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "tests" / "data")
