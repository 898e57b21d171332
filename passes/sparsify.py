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

Options on top of SparseGPT (calibrated runs only):
- `correct` (default on): each layer reconstructs the dense model's output - the dense weights on the dense
  inputs, plus the drift of the residual stream its output joins (MatMul -> Add bias -> Add) - from the inputs
  the sparsified model gives it, and its bias is shifted so the mean output matches the dense one.
- `refit` (default on): after SparseGPT picks the mask, the kept weights are refitted by least squares (the
  mask held fixed, conjugate gradients over all rows at once).
- `token_mask`: a 2-D [batch, positions] calibration input (e.g. `attention_mask`) whose zeros mark positions
  left out of the statistics (padding that the model ignores anyway).
- `allocation`: "uniform" (default) or "sensitivity": per-layer sparsities from each layer's measured effect on
  the model outputs, the overall pruned count exactly the target's (unstructured and block patterns).

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

from .sparsity_patterns import BlockPattern, NMPattern, Pattern, Unstructured, parse_pattern, prune_lowest

METADATA_KEY = "sparsecc.sparsity"
SCOPES = ("per-layer", "global")
ALLOCATIONS = ("uniform", "sensitivity")
SENSITIVITY_BATCHES = 4  # calibration batches the per-layer sensitivity runs use
SENSITIVITY_SPREAD = 0.25  # how far a layer's sparsity may move from the target, either way


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


@dataclass
class OutputLink:
    """Where a weight's product goes: the bias added to it (an initializer of N values) and the other operand of
    the Add that then joins it to the residual stream, when the graph has them."""

    bias: str | None = None
    residual: str | None = None


def output_links(model: Model, views: list[WeightView]) -> dict[str, OutputLink]:
    """For each MatMul/Gemm view: its bias (Gemm's C or an Add with an initializer) and residual operand."""
    graph = model.proto.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    by_name = {(n.name or f"{n.op_type}_{i}"): n for i, n in enumerate(graph.node)}

    def sole_add(tensor: str) -> tuple[onnx.NodeProto, str] | None:
        users = consumers.get(tensor, [])
        if len(users) != 1 or users[0].op_type != "Add" or len(users[0].input) != 2:
            return None
        return users[0], next((i for i in users[0].input if i != tensor), tensor)

    links = {}
    for v in views:
        if v.layout == "conv":
            continue
        node, link, out = by_name[v.node], OutputLink(), by_name[v.node].output[0]
        n_out = v.shape[0] if v.layout == "gemm_t" else v.shape[1]
        if v.op == "Gemm" and len(node.input) > 2 and node.input[2] in inits:
            link.bias = node.input[2]
        elif (add := sole_add(out)) and add[1] in inits:
            link.bias, out = add[1], add[0].output[0]
        if link.bias is not None and int(np.prod(inits[link.bias].dims)) != n_out:
            link.bias = None
        if (add := sole_add(out)) and add[1] not in inits and add[1] != out:
            link.residual = add[1]
        links[v.node] = link
    return links


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

    def __init__(self, model: Model, calib: dict[str, np.ndarray], token_mask: str | None = None):
        specs = {s.name: s for s in model.inputs}
        calib = check_calibration(calib, model.inputs, model.source)
        if token_mask is not None and (token_mask not in calib or np.asarray(calib[token_mask]).ndim != 2):
            raise BadInput(f"token_mask '{token_mask}': expected a 2-D [batch, positions] model input, "
                           f"one of {sorted(calib)}")
        total = min(int(np.asarray(calib[n]).shape[0]) for n in specs)
        first = specs[next(iter(specs))].shape[0]
        step = first if isinstance(first, int) and first > 0 else total
        self.batches = [{n: a[i:i + step] for n, a in calib.items()} for i in range(0, total - step + 1, step)]
        if not self.batches:
            raise BadInput(f"calibration data has {total} samples, fewer than the model's batch {step}")
        self.model = model
        self.masks = [b[token_mask] != 0 for b in self.batches] if token_mask is not None else None

    def keep_positions(self, view: WeightView, acts: list[np.ndarray]) -> list[np.ndarray]:
        """The activations without the positions the token mask zeroes ([B, S, ..] -> [kept, ..]), for
        MatMul/Gemm inputs whose leading dims are the mask's; others unchanged."""
        if self.masks is None or view.layout == "conv":
            return acts
        return [x[m] if x.ndim >= 3 and x.shape[:2] == m.shape else x for x, m in zip(acts, self.masks)]

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


@dataclass
class LayerStats:
    """What calibration tells about one layer input: H = 2/n sum x x^T over the rows x the (sparsified) model
    feeds the layer, the cross term C = 2/n sum x_ref x^T with the rows x_ref the dense model feeds it, and the
    mean rows of both."""

    h: np.ndarray
    cross: np.ndarray
    rows: int
    mean_act: np.ndarray
    mean_ref: np.ndarray
    act_rows: list[np.ndarray]

    @staticmethod
    def collect(view: WeightView, acts: list[np.ndarray], refs: list[np.ndarray]) -> LayerStats | None:
        k = _reduction_size(view)
        h, cross, n = np.zeros((k, k)), np.zeros((k, k)), 0
        sum_a, sum_r, kept = np.zeros(k), np.zeros(k), []
        for x, xr in zip(acts, refs):
            rows = _rows(view, x)
            if rows is None or rows.shape[1] != k:
                return None
            ref = rows if xr is x else _rows(view, xr)
            h += rows.T @ rows
            cross += ref.T @ rows
            sum_a, sum_r, n = sum_a + rows.sum(0), sum_r + ref.sum(0), n + rows.shape[0]
            kept.append(rows)
        n = max(n, 1)
        return LayerStats(2.0 * h / n, 2.0 * cross / n, n, sum_a / n, sum_r / n, kept)

    def target(self, w2: np.ndarray, drift: list[np.ndarray] | None, damp: float) -> np.ndarray:
        """The weights [N, K] the layer should have before pruning: argmin_W ||W_d X_ref + R - W X||^2 +
        lam ||W - W_d||^2 with lam the Hessian dampening and R the drift (dense - sparsified) of the residual
        stream the layer's output joins, i.e. W (H + lam) = W_d (C + lam) + 2/n R^T X. The layer then also
        corrects the error the layers before it left in its input and in the residual stream."""
        lam = damp * float(np.mean(np.diag(self.h)))
        if not lam > 0:
            return w2
        rhs = w2 @ self.cross + lam * w2
        if drift is not None and sum(d.shape[0] for d in drift) == self.rows and drift[0].shape[1] == w2.shape[0]:
            rhs += 2.0 / self.rows * sum(d.T @ x for d, x in zip(drift, self.act_rows))
        return np.linalg.solve(self.h + lam * np.eye(len(self.h)), rhs.T).T

    def bias_shift(self, dense: np.ndarray, sparse: np.ndarray, drift: list[np.ndarray] | None) -> np.ndarray:
        """What to add to the bias so the layer's mean output (plus the residual drift) matches the dense one."""
        shift = self.mean_ref @ dense.T - self.mean_act @ sparse.T
        if drift is not None and drift[0].shape[1] == dense.shape[0]:
            shift += sum(d.sum(0) for d in drift) / max(sum(d.shape[0] for d in drift), 1)
        return shift


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
    pruned = 0
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        w1 = w[:, i1:i2].copy()
        hinv1 = hinv[i1:i2, i1:i2]
        scores = w1 ** 2 / (np.diag(hinv1)[None, :] ** 2)
        if isinstance(pattern, Unstructured):  # per-block counts that add up to round(sparsity * N * K)
            goal = int(round(sparsity * w.shape[0] * i2))
            keep, pruned = prune_lowest(scores, goal - pruned), goal
        else:
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


def refit(w2: np.ndarray, target: np.ndarray, h: np.ndarray, damp: float = 0.01, iters: int = 30) -> np.ndarray:
    """The least-squares weights on the support of `w2` (its mask held fixed): minimise
    tr((W - T) (H + lam) (W - T)^T) over W with W's zeros kept, lam the dampening, by Jacobi-preconditioned
    conjugate gradients on all rows at once, started from `w2`. SparseGPT only moves weights to the right of
    each pruned column; this spreads the compensation over every kept weight."""
    a = h + damp * float(np.mean(np.diag(h))) * np.eye(len(h))
    keep = w2 != 0
    w = w2.astype(np.float64).copy()
    diag = np.maximum(np.diag(a), 1e-300)[None, :]
    r = ((target - w) @ a) * keep
    z = r / diag
    p, rz = z.copy(), (r * z).sum(1)
    for _ in range(iters):
        ap = (p @ a) * keep
        pap = (p * ap).sum(1)
        alpha = np.divide(rz, pap, out=np.zeros_like(rz), where=pap > 0)
        w += alpha[:, None] * p
        r -= alpha[:, None] * ap
        z = r / diag
        rz_new = (r * z).sum(1)
        p = z + np.divide(rz_new, rz, out=np.zeros_like(rz), where=rz > 0)[:, None] * p
        rz = rz_new
    return np.where(keep, w, 0.0)


# ------------------------------------------------------------------------------------------ allocation

def _error_curve(scores: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Relative error |W - W_s|^2_D / |W|^2_D of keeping the highest `scores` (|w|^2 ||x||^2 per group) at
    each sparsity in `grid`: the cumulative sum of the sorted scores."""
    flat = np.sort(scores.ravel())
    cum = np.concatenate([[0.0], np.cumsum(flat)])
    return cum[np.round(grid * flat.size).astype(int)] / max(cum[-1], 1e-300)


def allocate(sizes: np.ndarray, costs: np.ndarray, grid: np.ndarray, target: float) -> np.ndarray:
    """Pruned counts per layer, sum exactly round(target * sum(sizes)), minimising sum_l costs[l, s_l] over
    sparsities from `grid` (costs increasing in s): a Lagrange multiplier found by bisection picks each layer's
    grid point, then the last few counts go to the layers whose cost rises least."""
    goal = int(round(target * sizes.sum()))

    def pick(mu: float) -> np.ndarray:
        return grid[np.argmin(costs - mu * sizes[:, None] * grid[None, :], axis=1)]

    lo, hi = 0.0, 1.0
    while (pick(hi) * sizes).sum() < goal and hi < 1e30:
        hi *= 4.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if (pick(mid) * sizes).sum() < goal else (lo, mid)
    counts = np.round(pick(hi) * sizes).astype(int)
    slope = np.array([np.interp(c / n, grid, np.gradient(cost, grid)) / n for c, n, cost in zip(counts, sizes, costs)])
    for i in np.argsort(slope if counts.sum() < goal else -slope):  # the remainder, a few weights at most
        diff = goal - counts.sum()
        if diff == 0:
            break
        counts[i] = int(np.clip(counts[i] + diff, 0, sizes[i]))
    return counts


# ----------------------------------------------------------------------------------------------- pass

class SparsifyPass:
    name = "sparsify"

    def __init__(self, sparsity: float, pattern: str = "unstructured", calib: dict[str, np.ndarray] | str | None = None,
                 scope: str = "per-layer", ignore=(), min_params: int = 1024, sequential: bool = True,
                 damp: float = 0.01, correct: bool = True, token_mask: str | None = None,
                 allocation: str = "uniform", refit: bool = True):
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
        self.correct = bool(correct)
        self.refit = bool(refit)
        self.token_mask = token_mask
        if allocation not in ALLOCATIONS:
            raise BadInput(f"allocation '{allocation}': expected one of {', '.join(ALLOCATIONS)}")
        if allocation != "uniform" and (calib is None or scope != "per-layer" or fixed is not None):
            raise BadInput(f"allocation '{allocation}' needs calibration data, scope 'per-layer' and a pattern "
                           "whose sparsity can vary (not N:M)")
        self.allocation = allocation
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

    def _sensitivity_sparsities(self, model: Model, views: list[WeightView],
                                weights: dict[str, np.ndarray]) -> dict[str, float]:
        """Per-layer sparsity from measured sensitivity: the relative change d_l(s) of the model outputs on
        calibration when layer l alone is pruned (mask by |w| ||x||, no update), measured at the target and at
        SENSITIVITY_SPREAD above it, and carried to other sparsities through that mask's error e_l(s) as
        d_l(target) (e_l(s) / e_l(target))^g_l with g_l fitted to the two points; the allocation minimises
        sum_l d_l(s_l) over s_l within SENSITIVITY_SPREAD of the target, the overall pruned count exactly the
        target's."""
        calib = Calibration(model, self.calib, self.token_mask)
        calib.batches = calib.batches[:SENSITIVITY_BATCHES]
        if calib.masks is not None:
            calib.masks = calib.masks[:SENSITIVITY_BATCHES]
        outputs = [o.name for o in model.proto.graph.output]
        ref = calib.activations(outputs)
        acts = calib.activations(sorted({v.data_input for v in views}))
        grid = np.unique(np.clip(self.sparsity + np.linspace(-SENSITIVITY_SPREAD, SENSITIVITY_SPREAD, 51), 0.0, 0.99))
        top = float(grid[-1])
        total = max(sum(float(np.sum(b ** 2)) for o in outputs for b in ref[o]), 1e-300)

        def change(v: WeightView, w2: np.ndarray, scores: np.ndarray, sparsity: float) -> float:
            pruned = w2 * self.pattern.expand(prune_lowest(scores, int(round(sparsity * scores.size))), w2.shape)
            out = calib.activations(outputs, {v.weight: v.from_2d(pruned).astype(weights[v.weight].dtype)})
            return sum(float(np.sum((a - b) ** 2)) for o in outputs for a, b in zip(out[o], ref[o])) / total

        costs = []
        for v in views:
            rows = [_rows(v, x) for x in calib.keep_positions(v, acts[v.data_input])]
            w2 = v.to_2d(weights[v.weight]).astype(np.float64)
            if any(r is None or r.shape[1] != w2.shape[1] for r in rows):
                costs.append(grid / max(self.sparsity, 1e-9))  # no statistics: cost proportional to sparsity
                continue
            scores = self.pattern.group_scores(w2 ** 2 * sum((r ** 2).sum(0) for r in rows)[None, :])
            curve = np.maximum(_error_curve(scores, grid), 1e-300)
            e0, e1 = float(np.interp(self.sparsity, grid, curve)), float(curve[-1])
            d0, d1 = change(v, w2, scores, self.sparsity), change(v, w2, scores, top)
            # cost = d0 (e / e0)^g through both measured points: how fast the outputs degrade past the target
            g = np.log(max(d1, 1e-300) / max(d0, 1e-300)) / np.log(e1 / e0) if d0 > 0 and e1 > e0 else 1.0
            costs.append(d0 * (curve / e0) ** max(float(g), 0.5))
        sizes = np.array([int(np.prod(v.shape)) for v in views])
        counts = allocate(sizes, np.array(costs), grid, self.sparsity)
        return {v.node: float(c / n) for v, c, n in zip(views, counts, sizes)}

    def _sparsify(self, view: WeightView, w: np.ndarray, sparsity: float, h: np.ndarray | None,
                  target: np.ndarray | None = None) -> np.ndarray:
        w2 = view.to_2d(w).astype(np.float64) if target is None else target
        if h is not None:
            pruned = sparsegpt(w2, h, self.pattern, sparsity, self.damp)
            if self.refit:
                pruned = refit(pruned, w2, h, self.damp)
        else:
            pruned = w2 * self.pattern.mask(np.abs(w2) ** 2, sparsity)
        return view.from_2d(pruned).astype(w.dtype)

    def _calibrated(self, model: Model, views: list[WeightView], weights: dict[str, np.ndarray],
                    targets: dict[str, float]) -> tuple[dict[str, np.ndarray], dict[str, bool]]:
        """SparseGPT with each stage's Hessian taken from the inputs the already sparsified stages produce
        (sequential), or every Hessian from the dense model in one run (one-shot). With `correct`, each layer
        reconstructs the dense model's output (see `LayerStats.target`) and its bias is shifted to match the
        dense output's mean; the returned weights then include the changed biases."""
        calib = Calibration(model, self.calib, self.token_mask)
        links = output_links(model, views) if self.correct else {}
        names = {lk.bias for lk in links.values()}
        biases = {t.name: numpy_helper.to_array(t) for t in model.proto.graph.initializer if t.name in names}
        new, compensated = {}, {}
        order = stages(views) if self.sequential else [views]
        dense = None if self.sequential else calib.activations(sorted({v.data_input for v in views}))
        for stage in order:
            name = stage[0].data_input
            residuals = sorted({links[v.node].residual for v in stage if v.node in links and links[v.node].residual})
            acts = dense if dense is not None else calib.activations([name] + residuals, new)
            refs = acts if dense is not None or not self.correct else calib.activations([name] + residuals)
            stats: dict[str, LayerStats | None] = {}
            for v in stage:
                key = repr((v.data_input, v.layout, v.shape[1:] if v.layout == "conv" else None,
                            sorted(v.attrs.items())))
                if key not in stats:  # weights sharing an input (Q/K/V) share its statistics
                    act = calib.keep_positions(v, acts[v.data_input])
                    ref = act if refs is acts else calib.keep_positions(v, refs[v.data_input])
                    stats[key] = LayerStats.collect(v, act, ref)
                st, link = stats[key], links.get(v.node)
                drift = None
                if link is not None and link.residual and refs is not acts:
                    drift = [(d - a).reshape(-1, d.shape[-1]) for d, a in
                             zip(calib.keep_positions(v, refs[link.residual]), calib.keep_positions(v, acts[link.residual]))]
                w2 = v.to_2d(weights[v.weight]).astype(np.float64)
                target = st.target(w2, drift, self.damp) if st is not None and link is not None and refs is not acts else None
                new[v.weight] = self._sparsify(v, weights[v.weight], targets[v.node],
                                               None if st is None else st.h, target)
                compensated[v.node] = st is not None
                if st is not None and link is not None and link.bias is not None:
                    bias = new.get(link.bias, biases[link.bias])
                    shift = st.bias_shift(w2, v.to_2d(new[v.weight]).astype(np.float64), drift)
                    new[link.bias] = (bias + shift.reshape(bias.shape)).astype(bias.dtype)
        return new, compensated

    def __call__(self, model: Model, ctx: PassContext | None = None) -> Model:
        views = find_weights(model, self.ignore, self.min_params)
        weights = {t.name: numpy_helper.to_array(t) for t in model.proto.graph.initializer
                   if t.name in {v.weight for v in views}}
        if self.allocation == "sensitivity" and views:
            targets = self._sensitivity_sparsities(model, views, weights)
        else:
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
                  damp: float = 0.01, correct: bool = True, token_mask: str | None = None,
                  allocation: str = "uniform", refit: bool = True) -> SparsifyPass:
    return SparsifyPass(sparsity, pattern, calib, scope, ignore, min_params, sequential, damp, correct, token_mask,
                        allocation, refit)


__all__ = ["METADATA_KEY", "SparsifyPass", "allocate", "find_weights", "make_sparsify", "output_links",
           "read_annotation", "refit", "sparsegpt",
           "Unstructured", "BlockPattern", "NMPattern"]
