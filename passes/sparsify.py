"""The `sparsify` pass: zero weights of MatMul/Gemm/Conv in a pattern the sparse kernels can exploit.

Runs at the ONNX level after `simplify` (and after structured pruning, if any). Zeros stay in the dense ONNX
initializers, so the result is an ordinary model that ONNX Runtime runs and verifies; the codegen later finds
the zeros by itself (`codegen/sparse`), whoever made them. Each weight is seen as [N outputs, K reduction]
(see `sparsity_patterns`), scored by magnitude - or, given calibration inputs, by the OBS saliency
w^2 / [H^-1]_kk^2 with H = X^T X of the layer's inputs, in which case the weights that stay are updated
SparseGPT-style to compensate for the removed ones (no fine-tuning needed). With calibration data the layers
are processed in graph order (`sequential=True`, the default): the weights that multiply the same activation
(Q/K/V) form one stage, and each stage's H comes from running the model with the earlier stages already
sparsified in ONNX Runtime (only the subgraph up to that activation), as SparseGPT does; `sequential=False`
takes every H from the dense model in one run. `damp` is the Hessian dampening, a fraction of its mean diagonal.

Annotation: the pass writes `metadata_props["sparsecc.sparsity"]`, a JSON object
`{"pattern": ..., "target": S, "scope": ..., "compensated": bool, "layers": {node name: {"weight": name,
"op": ..., "shape": [N, K], "sparsity": achieved}}}`; a later sparsify run replaces it. The same summary goes
to `ctx.log`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from sparsecc.errors import BadInput
from sparsecc.ir import Model
from sparsecc.pipeline import PassContext, register_pass
from sparsecc.verify import check_calibration, load_npz

from .sparsity_patterns import BlockPattern, NMPattern, Pattern, Unstructured, parse_pattern

METADATA_KEY = "sparsecc.sparsity"
SCOPES = ("per-layer", "global")


@dataclass
class WeightView:
    """One prunable weight: the node using it and how its initializer maps to [N, K]."""

    node: str
    op: str
    weight: str  # initializer name
    shape: tuple[int, ...]  # the initializer's shape
    layout: str  # "matmul" ([K, N]), "gemm_t" ([N, K]), "gemm" ([K, N]), "conv" ([O, I, kh, kw])
    data_input: str  # the node's activation input (for calibration)
    attrs: dict

    def to_2d(self, w: np.ndarray) -> np.ndarray:
        if self.layout in ("matmul", "gemm"):
            return w.T
        if self.layout == "conv":
            return w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
        return w

    def from_2d(self, w2: np.ndarray) -> np.ndarray:
        if self.layout in ("matmul", "gemm"):
            return np.ascontiguousarray(w2.T)
        if self.layout == "conv":
            o, i, kh, kw = self.shape
            return np.ascontiguousarray(w2.reshape(o, kh, kw, i).transpose(0, 3, 1, 2))
        return np.ascontiguousarray(w2)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def find_weights(model: Model, ignore=(), min_params: int = 1024) -> list[WeightView]:
    """The MatMul/Gemm/Conv weights that are initializers, used by exactly one prunable node each."""
    inits = {t.name: t for t in model.proto.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.proto.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    views = []
    for i, node in enumerate(model.proto.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2:
            continue
        wname = node.input[1]
        if wname not in inits or name in ignore or wname in ignore or uses.get(wname, 0) != 1:
            continue
        t = inits[wname]
        shape = tuple(int(d) for d in t.dims)
        if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            continue
        if int(np.prod(shape)) < min_params:
            continue
        attrs = _attrs(node)
        if node.op_type == "MatMul" and len(shape) == 2:
            layout = "matmul"
        elif node.op_type == "Gemm" and len(shape) == 2:
            layout = "gemm_t" if attrs.get("transB", 0) else "gemm"
        elif node.op_type == "Conv" and len(shape) == 4:
            layout = "conv"
        else:
            continue
        views.append(WeightView(name, node.op_type, wname, shape, layout, node.input[0], attrs))
    return views


# ------------------------------------------------------------------------------------------ calibration

def _subgraph(proto: onnx.ModelProto, outputs: list[str], weights: dict[str, np.ndarray]) -> bytes:
    """The part of the model that computes `outputs` (as graph outputs), with `weights` replacing their
    initializers: the probe each calibration run feeds to ONNX Runtime."""
    graph = proto.graph
    needed, nodes = set(outputs), []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            nodes.append(node)
            needed.update(node.input)
            for a in node.attribute:  # subgraphs (If/Loop/Scan) read outer names too
                for sub in list(a.g.node if a.HasField("g") else []) + [n for g in a.graphs for n in g.node]:
                    needed.update(sub.input)
    inits = [numpy_helper.from_array(weights[t.name], t.name) if t.name in weights else t
             for t in graph.initializer if t.name in needed]
    types = {v.name: v for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    outs = []
    for name in outputs:
        vi = types.get(name)
        elem = vi.type.tensor_type.elem_type if vi is not None and vi.type.HasField("tensor_type") else onnx.TensorProto.FLOAT
        outs.append(onnx.helper.make_tensor_value_info(name, elem, None))
    init_names = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init_names or i.name in needed]
    sub = onnx.helper.make_graph(nodes[::-1], graph.name, inputs, outs, inits)
    sub.value_info.extend(graph.value_info)
    probe = onnx.helper.make_model(sub, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    probe.functions.extend(proto.functions)
    return probe.SerializeToString()


class Calibration:
    """Calibration samples cut into model-sized batches, and the activations they produce at chosen tensors of
    a model whose weights may already have been changed (so a layer sees what the layers before it now emit)."""

    def __init__(self, model: Model, calib: dict[str, np.ndarray]):
        specs = {s.name: s for s in model.inputs}
        calib = check_calibration(calib, model.inputs, model.source)
        total = min(int(np.asarray(calib[n]).shape[0]) for n in specs)
        first = specs[next(iter(specs))].shape[0]
        step = first if isinstance(first, int) and first > 0 else total
        self.batches = [{n: a[i:i + step] for n, a in calib.items()} for i in range(0, total - step + 1, step)]
        if not self.batches:
            raise BadInput(f"calibration data has {total} samples, fewer than the model's batch {step}")
        self.model = model

    def activations(self, names: list[str], weights: dict[str, np.ndarray] | None = None) -> dict[str, list]:
        """Each tensor in `names` per batch (float64), computed by ONNX Runtime with `weights` substituted."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(_subgraph(self.model.proto, names, weights or {}), opts,
                                    providers=["CPUExecutionProvider"])
        out: dict[str, list] = {n: [] for n in names}
        used = {i.name for i in sess.get_inputs()}
        for feeds in self.batches:
            for n, r in zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in used})):
                out[n].append(np.asarray(r, dtype=np.float64))
        return out


def stages(views: list[WeightView]) -> list[list[WeightView]]:
    """The weights grouped by the activation they multiply (Q/K/V share one), in graph order: every weight
    that can change a stage's input belongs to an earlier stage, since the graph is topologically sorted."""
    groups: dict[str, list[WeightView]] = {}
    for v in views:
        groups.setdefault(v.data_input, []).append(v)
    return list(groups.values())


def _im2col(x: np.ndarray, view: WeightView) -> np.ndarray:
    """Rows of patches [.., kh*kw*I] (input channels innermost) for a Conv input x [B, I, H, W]."""
    o, i, kh, kw = view.shape
    a = view.attrs
    sh, sw = (a.get("strides") or [1, 1])[:2]
    dh, dw = (a.get("dilations") or [1, 1])[:2]
    pads = a.get("pads") or [0, 0, 0, 0]
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise BadInput(f"node '{view.node}' (Conv): auto_pad is not supported for calibration")
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    b, c, h, w = x.shape
    oh = (h - dh * (kh - 1) - 1) // sh + 1
    ow = (w - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((b, oh, ow, kh, kw, c), x.dtype)
    for y in range(kh):
        for z in range(kw):
            patch = x[:, :, y * dh: y * dh + sh * (oh - 1) + 1: sh, z * dw: z * dw + sw * (ow - 1) + 1: sw]
            cols[:, :, :, y, z, :] = patch.transpose(0, 2, 3, 1)
    return cols.reshape(-1, kh * kw * c)


def _rows(view: WeightView, x: np.ndarray) -> np.ndarray | None:
    """The rows [n, K] the layer multiplies with its weight, for one batch of its input; None if not computable."""
    if view.layout == "conv":
        return _im2col(x, view) if view.attrs.get("group", 1) == 1 else None
    if view.op == "Gemm" and view.attrs.get("transA", 0):
        return x.reshape(x.shape[0], -1).T
    return x.reshape(-1, x.shape[-1])


def _reduction_size(view: WeightView) -> int:
    if view.layout == "conv":
        return int(np.prod(view.shape[1:]))
    return view.shape[1] if view.layout == "gemm_t" else view.shape[0]


def _hessian(view: WeightView, chunks: list[np.ndarray]) -> np.ndarray | None:
    """H = 2/n sum x x^T over the rows the layer multiplies with its weight; None if not computable."""
    k = _reduction_size(view)
    h, n = np.zeros((k, k)), 0
    for x in chunks:
        rows = _rows(view, x)
        if rows is None or rows.shape[1] != k:
            return None
        h += rows.T @ rows
        n += rows.shape[0]
    return 2.0 * h / max(n, 1)


def sparsegpt(w2: np.ndarray, h: np.ndarray, pattern: Pattern, sparsity: float, damp: float = 0.01,
              blocksize: int = 128) -> np.ndarray:
    """SparseGPT (Frantar & Alistarh 2023) on W[N, K]: prune in column chunks by OBS saliency and update the
    remaining weights with the inverse Hessian so the layer output changes as little as possible."""
    w = w2.astype(np.float64).copy()
    k = w.shape[1]
    h = h.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper Cholesky factor of H^-1
    except np.linalg.LinAlgError:
        h += 0.1 * np.mean(np.diag(h)) * np.eye(k)
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    step = blocksize
    if isinstance(pattern, BlockPattern):
        step = max(pattern.cols, blocksize // pattern.cols * pattern.cols)
    elif isinstance(pattern, NMPattern):
        step = max(pattern.m, blocksize // pattern.m * pattern.m)
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        w1 = w[:, i1:i2].copy()
        hinv1 = hinv[i1:i2, i1:i2]
        scores = w1 ** 2 / (np.diag(hinv1)[None, :] ** 2)
        keep = pattern.mask(scores, sparsity)
        err1 = np.zeros_like(w1)
        for i in range(i2 - i1):
            col = w1[:, i]
            d = hinv1[i, i]
            q = np.where(keep[:, i], col, 0.0)
            e = (col - q) / d
            w1[:, i:] -= np.outer(e, hinv1[i, i:])
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w


# ----------------------------------------------------------------------------------------------- pass

class SparsifyPass:
    name = "sparsify"

    def __init__(self, sparsity: float, pattern: str = "unstructured", calib: dict[str, np.ndarray] | str | None = None,
                 scope: str = "per-layer", ignore=(), min_params: int = 1024, sequential: bool = True,
                 damp: float = 0.01):
        self.pattern = parse_pattern(pattern)
        try:
            sparsity = float(sparsity)
        except (TypeError, ValueError):
            raise BadInput(f"--sparsity '{sparsity}': expected a number in [0, 1)") from None
        if not 0.0 <= sparsity < 1.0:
            raise BadInput(f"--sparsity {sparsity:g}: must be in [0, 1)")
        fixed = self.pattern.fixed_sparsity
        if fixed is not None and sparsity not in (0.0,) and abs(sparsity - fixed) > 1e-6:
            raise BadInput(f"--pattern {self.pattern.name} fixes the sparsity at {fixed:g}; got --sparsity {sparsity:g}")
        self.sparsity = fixed if fixed is not None else sparsity
        if scope not in SCOPES:
            raise BadInput(f"--scope '{scope}': expected one of {', '.join(SCOPES)}")
        self.scope = scope
        if isinstance(calib, (str, Path)):
            calib = load_npz(str(calib))
        self.calib = calib
        self.ignore = tuple(ignore or ())
        self.min_params = int(min_params)
        self.sequential = bool(sequential)
        self.damp = float(damp)
        if not self.damp > 0.0:
            raise BadInput(f"damp {damp}: must be > 0 (a fraction of the mean Hessian diagonal)")

    def __repr__(self) -> str:
        return f"SparsifyPass({self.sparsity:g}, {self.pattern.name}, scope={self.scope})"

    def _layer_sparsities(self, weights: dict[str, np.ndarray], views: list[WeightView]) -> dict[str, float]:
        """Per-layer target sparsity: the same everywhere, or from one global threshold over group scores."""
        if self.scope == "per-layer" or isinstance(self.pattern, NMPattern) or not views:
            return {v.node: self.sparsity for v in views}
        groups = {v.node: self.pattern.group_scores(np.abs(v.to_2d(weights[v.weight])) ** 2) for v in views}
        flat = np.concatenate([g.ravel() for g in groups.values()])
        count = int(round(self.sparsity * flat.size))
        if count == 0:
            return {v.node: 0.0 for v in views}
        threshold = np.partition(flat, count - 1)[count - 1]
        return {n: float(np.count_nonzero(g <= threshold)) / g.size for n, g in groups.items()}

    def _sparsify(self, view: WeightView, w: np.ndarray, sparsity: float, h: np.ndarray | None) -> np.ndarray:
        w2 = view.to_2d(w).astype(np.float64)
        if h is not None:
            pruned = sparsegpt(w2, h, self.pattern, sparsity, self.damp)
        else:
            pruned = w2 * self.pattern.mask(np.abs(w2) ** 2, sparsity)
        return view.from_2d(pruned).astype(w.dtype)

    def _calibrated(self, model: Model, views: list[WeightView], weights: dict[str, np.ndarray],
                    targets: dict[str, float]) -> tuple[dict[str, np.ndarray], dict[str, bool]]:
        """SparseGPT with each stage's Hessian taken from the inputs the already sparsified stages produce
        (sequential), or every Hessian from the dense model in one run (one-shot)."""
        calib = Calibration(model, self.calib)
        new, compensated = {}, {}
        order = stages(views) if self.sequential else [views]
        dense = None if self.sequential else calib.activations(sorted({v.data_input for v in views}))
        for stage in order:
            name = stage[0].data_input
            acts = dense if dense is not None else calib.activations([name], new)
            hessians: dict[str, np.ndarray | None] = {}
            for v in stage:
                key = repr((v.data_input, v.layout, v.shape[1:] if v.layout == "conv" else None,
                            sorted(v.attrs.items())))
                if key not in hessians:  # weights sharing an input (Q/K/V) share its Hessian
                    hessians[key] = _hessian(v, acts[v.data_input])
                new[v.weight] = self._sparsify(v, weights[v.weight], targets[v.node], hessians[key])
                compensated[v.node] = hessians[key] is not None
        return new, compensated

    def __call__(self, model: Model, ctx: PassContext | None = None) -> Model:
        views = find_weights(model, self.ignore, self.min_params)
        weights = {t.name: numpy_helper.to_array(t) for t in model.proto.graph.initializer
                   if t.name in {v.weight for v in views}}
        targets = self._layer_sparsities(weights, views)
        calibrated = self.calib is not None and bool(views)
        if calibrated:
            new, compensated = self._calibrated(model, views, weights, targets)
        else:
            new = {v.weight: self._sparsify(v, weights[v.weight], targets[v.node], None) for v in views}
            compensated = {v.node: False for v in views}
        layers = {}
        for v in views:
            out = new[v.weight]
            layers[v.node] = {"weight": v.weight, "op": v.op, "shape": list(v.to_2d(out).shape),
                              "sparsity": round(1.0 - np.count_nonzero(out) / out.size, 4),
                              "compensated": compensated[v.node]}
        proto = onnx.ModelProto()
        proto.CopyFrom(model.proto)
        for t in proto.graph.initializer:
            if t.name in new:
                t.CopyFrom(numpy_helper.from_array(new[t.name], t.name))
        total = sum(int(np.prod(v.shape)) for v in views)
        zeros = sum(int(new[v.weight].size - np.count_nonzero(new[v.weight])) for v in views)
        summary = {"pattern": self.pattern.name, "target": self.sparsity, "scope": self.scope,
                   "compensated": calibrated,
                   "sequential": calibrated and self.sequential, "overall_sparsity": round(zeros / total, 4) if total else 0.0,
                   "layers": layers}
        _annotate(proto, summary)
        if ctx is not None:
            ctx.log.append({"pass": self.name, **summary})
        return Model(proto, model.source)


def _annotate(proto: onnx.ModelProto, summary: dict) -> None:
    for i, prop in enumerate(proto.metadata_props):
        if prop.key == METADATA_KEY:
            del proto.metadata_props[i]
            break
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(summary, sort_keys=True))


def read_annotation(model: Model | onnx.ModelProto) -> dict | None:
    """The summary a sparsify pass left in the model, or None."""
    proto = model.proto if isinstance(model, Model) else model
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    return None


@register_pass("sparsify")
def make_sparsify(sparsity: float, pattern: str = "unstructured", calib: dict[str, np.ndarray] | None = None,
                  scope: str = "per-layer", ignore=(), min_params: int = 1024, sequential: bool = True,
                  damp: float = 0.01) -> SparsifyPass:
    return SparsifyPass(sparsity, pattern, calib, scope, ignore, min_params, sequential, damp)


__all__ = ["METADATA_KEY", "SparsifyPass", "find_weights", "make_sparsify", "read_annotation", "sparsegpt",
           "Unstructured", "BlockPattern", "NMPattern"]
