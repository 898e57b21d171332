"""Top-1 accuracy of the trained zoo models after structured pruning, without fine-tuning.

For every criterion x ratio: prune with `PrunePass` (calibration data for `activation`, and for `obspa` both
with calibration data and data-free; attention mode `auto`, the default), run the pruned ONNX model in ONNX
Runtime on the held-out digits test set, and write a markdown table (and JSON) of top-1 accuracy, drop vs. the
dense model and parameters kept. The ratio is the fraction of channels of every prunable group (uniform rows)
or of the prunable groups' parameters (`global` rows).

    python benchmarks/prune_accuracy.py [--models digits_cnn ...] [--ratios 0.1 0.3 0.5 0.7] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sparsecc.ir import Model, fix_input_shapes, load_model
from sparsecc.models import zoo
from sparsecc.passes.prune import PrunePass

# (label, criterion, uses calibration data, global ranking: None = as given on the command line)
SETTINGS = (
    ("l1", "l1", False, None),
    ("l2", "l2", False, None),
    ("bn", "bn", False, None),
    ("activation", "activation", True, None),
    ("obspa (data-free)", "obspa", False, None),
    ("obspa (calib)", "obspa", True, None),
    ("obspa global (data-free)", "obspa", False, True),
    ("obspa global (calib)", "obspa", True, True),
)


def evaluate(model: Model, x: np.ndarray, y: np.ndarray) -> float:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    name = model.inputs[0].name
    batch = model.inputs[0].shape[0]
    logits = []
    for start in range(0, len(x) - batch + 1, batch):
        logits.append(sess.run(None, {name: x[start : start + batch]})[0])
    n = len(logits) * batch
    return zoo.accuracy(np.concatenate(logits), y[:n])


def run(models: list[str], ratios: list[float], batch: int, global_ranking: bool) -> list[dict]:
    rows = []
    for name in models:
        model = fix_input_shapes(load_model(zoo.model_path(name)), batch=batch)
        x, y = zoo.test_data(name)
        calib = zoo.calib_data(name)
        base = evaluate(model, x, y)
        rows.append({"model": name, "setting": "dense", "ratio": 0.0, "top1": base, "params": 1.0})
        for label, criterion, uses_calib, glob in SETTINGS:
            for ratio in ratios:
                use_global = global_ranking if glob is None else glob
                p = PrunePass(ratio, criterion, calib if uses_calib else None, global_ranking=use_global)
                start = time.perf_counter()
                pruned = p(model, None)
                seconds = time.perf_counter() - start
                acc = evaluate(pruned, x, y)
                s = p.summary
                rows.append(
                    {
                        "model": name,
                        "setting": label,
                        "ratio": ratio,
                        "top1": acc,
                        "drop": base - acc,
                        "channels_removed": 1 - s["channels_after"] / max(1, s["channels_before"]),
                        "params": s["params_after"] / s["params_before"],
                        "attention": s["attention"],
                        "seconds": round(seconds, 2),
                    }
                )
                print(
                    f"{name:20s} {label:26s} {ratio:.1f} top1 {acc * 100:5.1f} (dense {base * 100:5.1f})",
                    flush=True,
                )
    return rows


def to_markdown(rows: list[dict], ratios: list[float]) -> str:
    lines = []
    for name in dict.fromkeys(r["model"] for r in rows):
        dense = next(r for r in rows if r["model"] == name and r["setting"] == "dense")
        modes = sorted({r["attention"] for r in rows if r["model"] == name and "attention" in r})
        attention = f", attention `{'/'.join(modes)}`" if modes != ["heads"] else ""
        lines.append(f"\n### {name} (dense top-1 {dense['top1'] * 100:.1f}%{attention})\n")
        lines.append("| criterion | " + " | ".join(f"{int(r * 100)}%" for r in ratios) + " |")
        lines.append("|---" * (len(ratios) + 1) + "|")
        for label, *_ in SETTINGS:
            cells = []
            for ratio in ratios:
                r = next(
                    x for x in rows if x["model"] == name and x["setting"] == label and x["ratio"] == ratio
                )
                cells.append(f"{r['top1'] * 100:.1f} ({r['params'] * 100:.0f}% params)")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(zoo.TRAINED))
    ap.add_argument("--ratios", nargs="*", type=float, default=[0.1, 0.3, 0.5, 0.7])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--global-ranking", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    rows = run(args.models, args.ratios, args.batch, args.global_ranking)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prune_accuracy.json").write_text(json.dumps(rows, indent=1))
    table = "# Pruning accuracy on the digits zoo (no fine-tuning, top-1 %, params kept)\n" + to_markdown(
        rows, args.ratios
    )
    (args.out / "prune_accuracy.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
