"""Channel importance criteria for structured pruning, one small plug-in class per criterion.

Sits between `grouping` (which channels go together) and `prune` (which ones go). Every criterion scores each
channel of each prunable `ChannelGroup` (lower = pruned first): `l1` / `l2` (magnitude of every weight slice
the channel owns, producers and consumers), `bn` (|gamma| of the group's BatchNorms), `activation` (mean |x| of
the consumer inputs on calibration data, run through ONNX Runtime), and `obspa` (Optimal-Brain-Surgeon error
of removing the channel from each consumer layer, from the consumer inputs' Gram matrix - calibration data if
given, else synthetic inputs (`synthetic_inputs`: for a classifier without BatchNorm, prior samples it
classifies confidently) - followed by a sequential least-squares reconstruction of the consumer weights
and biases so that accuracy holds without fine-tuning). Channels no weight reads but an activation product
contracts (attention head dims of Q and K) are charged the error they leave in the centred logits Q.K^T. With
calibration data, a layer that adds into a residual stream is charged relative to that stream, which is
what the following LayerNorm normalizes.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort

from sparsecc.errors import BadInput
from sparsecc.ir import Model

from .grouping import ChannelGroup, GroupAnalysis, axis_ids, varying_axes

WEIGHT_ROLES = ("out_channels", "in_channels", "out_features", "in_features", "embedding")
CONSUMER_ROLES = ("in_channels", "in_features")
MAX_SAMPLES = 256  # calibration samples used for statistics
MAX_ROWS = 8192  # rows of a consumer's input matrix kept for OBS (conv patches are subsampled)
MAX_FEATURES = 6144  # consumers with wider inputs are scored by magnitude instead of OBS
DAMP = 0.01  # ridge strength (x mean diagonal of the Gram matrix) with calibration data
DAMP_DATA_FREE = (
    0.03  # synthetic inputs are only a rough picture of the data: stay a bit closer to the weights
)
POOL_FACTOR = 16  # data-free: candidate inputs drawn per input kept
CONTRACTION_ELEMENTS = 1 << 17  # entries of an activation product S kept to score its channels


# ------------------------------------------------------------------------------------ helpers
def _scatter(group: ChannelGroup, roots: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Sum per-position values into the group's channels."""
    channels = np.asarray(group.channels)
    out = np.zeros(len(channels))
    idx = np.clip(np.searchsorted(channels, roots), 0, len(channels) - 1)
    ok = (roots >= 0) & (channels[idx] == roots)
    np.add.at(out, idx[ok], np.asarray(values, dtype=np.float64)[ok])
    return out


def _consts(analysis: GroupAnalysis) -> dict[str, gs.Constant]:
    return {n: t for n, t in analysis.graph.tensors().items() if isinstance(t, gs.Constant)}


def _per_position(values: np.ndarray, axis: int, p: int) -> np.ndarray:
    other = tuple(a for a in range(values.ndim) if a != axis)
    return (np.abs(values.astype(np.float64)) ** p).sum(axis=other) if other else np.abs(values) ** p


def model_feeds(
    model: Model, calib: dict[str, np.ndarray] | None, seed: int, n: int = 64, select: bool = True
) -> list[dict]:
    """Batches for ONNX Runtime: calibration data cut to the model's static batch, else synthetic inputs."""
    specs = model.inputs
    batch = max(1, specs[0].shape[0]) if specs and specs[0].shape else 1
    if calib is None:
        calib = synthetic_inputs(model, seed, n, select)
    total = min(next(iter(calib.values())).shape[0], MAX_SAMPLES)
    feeds = []
    for start in range(0, total - batch + 1, batch):
        feeds.append({k: v[start : start + batch] for k, v in calib.items()})
    if not feeds:
        raise BadInput(f"{model.source}: calibration data has fewer samples than the batch size {batch}")
    return feeds


def _input_prior(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A broad prior over inputs, one family per sample: sparse binary, sparse uniform in [0, 1], and
    standard normal, with a per-sample density - no assumption on the data beyond 'pixels or features'."""
    n = shape[0]
    bshape = (n,) + (1,) * (len(shape) - 1)
    density = rng.uniform(0.05, 0.6, bshape)
    on = rng.uniform(0, 1, shape) < density
    family = rng.integers(0, 3, bshape)
    binary = on.astype(np.float64)
    sparse_uniform = on * rng.uniform(0, 1, shape)
    return np.where(family == 0, binary, np.where(family == 1, sparse_uniform, rng.standard_normal(shape)))


def synthetic_inputs(model: Model, seed: int, n: int = 64, select: bool = True) -> dict[str, np.ndarray]:
    """Data-free calibration inputs (seeded). A classifier (one float input, [N, classes] output) is shown a
    pool of `POOL_FACTOR * n` samples from `_input_prior`, and the `n` it classifies most confidently,
    balanced over the predicted classes, are kept: the network itself picks the inputs that look like its
    data, so layers without BatchNorm statistics still see activations close to the real ones (a
    gradient-free DeepInversion). Other models, and `select=False`, get standard normal inputs."""
    specs = model.inputs
    rng = np.random.default_rng(seed)
    out = model.outputs[0] if model.outputs else None
    classifier = (
        len(specs) == 1
        and np.issubdtype(np.dtype(specs[0].dtype), np.floating)
        and out is not None
        and out.shape is not None
        and len(out.shape) == 2
        and isinstance(out.shape[1], int)
        and out.shape[1] > 1
    )
    if not (classifier and select):
        return {s.name: rng.standard_normal((n,) + tuple(s.shape[1:])).astype(s.dtype) for s in specs}
    spec = specs[0]
    pool = _input_prior((POOL_FACTOR * n,) + tuple(spec.shape[1:]), rng).astype(spec.dtype)
    batch = max(1, spec.shape[0]) if spec.shape else 1
    logits = _run_plain(model, spec.name, pool, batch)
    pool = pool[: len(logits)]
    z = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    conf, cls = prob.max(axis=1), prob.argmax(axis=1)
    ranked = [
        list(np.nonzero(cls == c)[0][np.argsort(-conf[cls == c], kind="stable")]) for c in np.unique(cls)
    ]
    chosen: list[int] = []
    while len(chosen) < min(n, len(pool)):
        for r in ranked:
            if r and len(chosen) < n:
                chosen.append(int(r.pop(0)))
    return {spec.name: pool[np.array(chosen)]}


def _run_plain(model: Model, name: str, x: np.ndarray, batch: int) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    chunks = [sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x) - batch + 1, batch)]
    return np.concatenate(chunks).reshape(len(chunks) * batch, -1).astype(np.float64)


def run_with_outputs(graph: gs.Graph, opset_model: Model, names: list[str], feeds: list[dict]) -> dict:
    """Run `graph` with extra tensors exposed as outputs; returns name -> samples concatenated on axis 0."""
    g = graph.copy()
    tensors = g.tensors()
    extra = [tensors[n] for n in names if n in tensors and tensors[n] not in g.outputs]
    for t in extra:
        t.dtype = t.dtype or np.float32
    g.outputs = list(g.outputs) + extra
    proto = gs.export_onnx(g)
    proto.ir_version = opset_model.proto.ir_version
    del proto.opset_import[:]
    proto.opset_import.extend(opset_model.proto.opset_import)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    want = [n for n in names if n in tensors]
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in want}
    for feed in feeds:
        for n, v in zip(want, sess.run(want, feed)):
            chunks[n].append(v)
    return {n: np.concatenate(v, axis=0) for n, v in chunks.items()}


def _consumers(analysis: GroupAnalysis) -> list[tuple[gs.Node, ChannelGroup]]:
    """(node, group) for every layer that reads a prunable group's channels through a constant weight."""
    nodes = {n.name: n for n in analysis.graph.nodes}
    out, seen = [], set()
    for g in analysis.groups:
        if not g.prunable:
            continue
        for m in g.members:
            if m.const and m.role in CONSUMER_ROLES and (m.node, g.id) not in seen:
                seen.add((m.node, g.id))
                out.append((nodes[m.node], g))
    return out


# ------------------------------------------------------------------------------------ criteria
class Magnitude:
    """Group L-p norm: every weight slice a channel owns (producer rows and consumer columns)."""

    def __init__(self, model, analysis, calib, seed, p: int = 1):
        consts = _consts(analysis)
        self.scores = {}
        for g in analysis.groups:
            if not g.prunable:
                continue
            s = np.zeros(len(g.channels))
            for m in g.members:
                if m.const and m.role in WEIGHT_ROLES and m.tensor in consts:
                    w = np.asarray(consts[m.tensor].values)
                    s += _scatter(g, m.ids, _per_position(w, m.axis, p))
            self.scores[g.id] = s


class L1(Magnitude):
    def __init__(self, model, analysis, calib, seed):
        super().__init__(model, analysis, calib, seed, p=1)


class L2(Magnitude):
    def __init__(self, model, analysis, calib, seed):
        super().__init__(model, analysis, calib, seed, p=2)


class BNScale:
    """|gamma| of the group's BatchNormalizations (network slimming); L2 for groups without one."""

    def __init__(self, model, analysis, calib, seed):
        fallback = L2(model, analysis, calib, seed).scores
        nodes = {n.name: n for n in analysis.graph.nodes}
        consts = _consts(analysis)
        self.scores = {}
        for g in analysis.groups:
            if not g.prunable:
                continue
            s = np.zeros(len(g.channels))
            for m in g.members:
                node = nodes.get(m.node)
                if (
                    m.op == "BatchNormalization"
                    and m.const
                    and node is not None
                    and node.inputs[1].name == m.tensor
                ):
                    s += _scatter(g, m.ids, np.abs(np.asarray(consts[m.tensor].values)))
            self.scores[g.id] = s if s.any() else fallback[g.id]


# consumer op -> axis of its weight (input 1) that reads the input positions
INPUT_AXIS = {"Conv": 1, "ConvTranspose": 0, "MatMul": 0, "RNN": 2, "GRU": 2, "LSTM": 2}
# consumers OBS treats as a linear map on features (the others are scored by magnitude)
OBS_OPS = ("Conv", "Gemm", "MatMul")


def _column_norms(node: gs.Node, n: int) -> np.ndarray:
    """L2 norm of the consumer weight slice that reads each input position (Wanda-style weighting)."""
    w = np.asarray(node.inputs[1].values, dtype=np.float64)
    axis = (1 if node.attrs.get("transB", 0) else 0) if node.op == "Gemm" else INPUT_AXIS.get(node.op, 0)
    norms = np.sqrt(_per_position(w, axis, 2))
    return norms if len(norms) == n else np.ones(n)


class Activation:
    """Mean |activation| of each channel at the input of the layers consuming the group (calibration data),
    weighted by the norm of the consumer weights reading it: a channel matters if it is large *and* used."""

    def __init__(self, model, analysis, calib, seed):
        if calib is None:
            raise BadInput(f"{model.source}: criterion 'activation' needs calibration data (--calib)")
        consumers = _consumers(analysis)
        names = sorted({n.inputs[0].name for n, _ in consumers})
        acts = run_with_outputs(analysis.graph, model, names, model_feeds(model, calib, seed))
        fallback = L2(model, analysis, calib, seed).scores
        self.scores = {}
        for g in analysis.groups:
            if not g.prunable:
                continue
            s = np.zeros(len(g.channels))
            for node, cg in consumers:
                lab = analysis.labels.get(node.inputs[0].name)
                if cg.id != g.id or lab is None or node.inputs[0].name not in acts:
                    continue
                axis = varying_axes(lab)[0]
                x = acts[node.inputs[0].name]
                mean_abs = _per_position(x, axis, 1) / (x.size / x.shape[axis])
                s += _scatter(
                    g, analysis.find(axis_ids(lab, axis)), mean_abs * _column_norms(node, len(mean_abs))
                )
            self.scores[g.id] = s if s.any() else fallback[g.id]


# --------------------------------------------------------------------------------------- OBSPA
class _Layer:
    """A consumer as a linear map on a feature matrix: y = W z + b (conv via im2col)."""

    def __init__(self, node: gs.Node, analysis: GroupAnalysis):
        self.node = node
        w = np.asarray(node.inputs[1].values, dtype=np.float64)
        self.ok = True
        if node.op == "Conv":
            self.W = w.reshape(w.shape[0], -1)
            k = int(np.prod(w.shape[2:]))
            self.axis, self.pos = 1, np.repeat(np.arange(w.shape[1]), k)
            self.ok = w.ndim == 4 and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET")
            self.ok &= int(node.attrs.get("group", 1)) == 1
        elif node.op == "Gemm":
            self.W = w if node.attrs.get("transB", 0) else w.T
            self.axis, self.pos = 1, np.arange(self.W.shape[1])
            self.ok = node.attrs.get("alpha", 1.0) == 1.0 and node.attrs.get("beta", 1.0) == 1.0
        else:  # MatMul x @ W
            self.W = w.T
            self.axis, self.pos = len(node.inputs[0].shape) - 1, np.arange(self.W.shape[1])
        raw = analysis.const_axes[node.inputs[1].name][
            1 if node.op == "Conv" or (node.op == "Gemm" and node.attrs.get("transB", 0)) else 0
        ]
        self.roots = analysis.find(raw)[self.pos]  # root per feature
        self.ok &= self.W.shape[1] <= MAX_FEATURES

    def features(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Rows of the layer's feature matrix for input samples x."""
        if self.node.op == "Conv":
            z = _im2col(x, self.node)
        else:
            z = x.reshape(-1, self.W.shape[1]).astype(np.float64)
        if len(z) > MAX_ROWS:
            z = z[rng.choice(len(z), MAX_ROWS, replace=False)]
        return z

    def bias(self) -> np.ndarray:
        return _bias_of(self.node, self.W.shape[0])


def _im2col(x: np.ndarray, node: gs.Node) -> np.ndarray:
    w = node.inputs[1].values
    kh, kw = w.shape[2:]
    sh, sw = node.attrs.get("strides", [1, 1])
    dh, dw = node.attrs.get("dilations", [1, 1])
    t, left, b, r = node.attrs.get("pads", [0, 0, 0, 0])
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (t, b), (left, r)))
    ho = (xp.shape[2] - (dh * (kh - 1) + 1)) // sh + 1
    wo = (xp.shape[3] - (dw * (kw - 1) + 1)) // sw + 1
    cols = [
        xp[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]
    patches = np.stack(cols, axis=2)  # N, C, kh*kw, Ho, Wo
    return patches.transpose(0, 3, 4, 1, 2).reshape(-1, x.shape[1] * kh * kw)


def _bias_of(node: gs.Node, n: int) -> np.ndarray:
    if node.op in ("Conv", "Gemm") and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
        return np.broadcast_to(np.asarray(node.inputs[2].values, np.float64).ravel(), (n,)).copy()
    return np.zeros(n)


def _augment(z: np.ndarray) -> np.ndarray:
    return np.concatenate([z, np.ones((len(z), 1))], axis=1)


def _damped(h: np.ndarray) -> np.ndarray:
    d = DAMP * float(np.mean(np.diag(h))) + 1e-8
    return h + d * np.eye(len(h))


class OBSPA:
    """OBS group scores from the consumer inputs' Gram matrix, then sequential weight reconstruction."""

    comparable = True  # relative output errors of the consumer layers: ranked across groups as they are

    def __init__(self, model, analysis, calib, seed):
        self.model, self.analysis, self.seed = model, analysis, seed
        # data-free with BatchNorms: Gaussian inputs, every BatchNorm re-standardizing its batch so that the
        # activations match the BN statistics (mean beta, std gamma) whatever the input distribution; without
        # BatchNorm: inputs the network itself classifies confidently (`synthetic_inputs`)
        has_bn = any(n.op == "BatchNormalization" for n in analysis.graph.nodes)
        self.feeds = model_feeds(model, calib, seed, select=not has_bn)
        self.rng = np.random.default_rng(seed)
        self.damp = DAMP if calib is not None else DAMP_DATA_FREE
        self.stats_graph = (
            analysis.graph if calib is not None else bn_matched_graph(analysis.graph, model.opset)
        )
        fallback = L2(model, analysis, calib, seed).scores
        shared = _shared_constants(analysis.graph)
        layers = {}
        for node, _ in _consumers(analysis):
            if node.op in OBS_OPS and node.name not in layers and node.inputs[1].name not in shared:
                layer = _Layer(node, analysis)
                if layer.ok:
                    layers[node.name] = layer
        self.layers = layers
        names = sorted({layer.node.inputs[0].name for layer in layers.values()})
        # LayerNorm-aware (with calibration data): a layer adding into a residual stream that a LayerNorm reads
        # is charged its error relative to the stream (centred per row, as the LayerNorm sees it), not to its
        # own output - a small branch on a large stream may change more. Synthetic inputs picture the stream too
        # roughly for that (measured: it ranks worse data-free)
        residual = {name: _residual_sum(layer.node) for name, layer in layers.items()}
        extra = sorted({r for r in residual.values() if r})
        self.inputs = run_with_outputs(self.stats_graph, model, names + extra, self.feeds)
        self.scores = {}
        by_group: dict[int, np.ndarray] = {
            g.id: np.zeros(len(g.channels)) for g in analysis.groups if g.prunable
        }
        by_group_greedy = {gid: np.zeros_like(v) for gid, v in by_group.items()}
        seen = {g.id: False for g in analysis.groups if g.prunable}
        for layer in layers.values():
            z = _augment(layer.features(self.inputs[layer.node.inputs[0].name], self.rng))
            h = z.T @ z / len(z)
            wa = np.concatenate([layer.W, layer.bias()[:, None]], axis=1)
            energy = float(np.einsum("ij,jk,ik->", wa, h, wa)) + 1e-12
            if calib is not None and residual[layer.node.name] in self.inputs:
                energy = _row_energy(self.inputs[residual[layer.node.name]], len(wa))
            alone, greedy = greedy_obs_errors(layer.W, np.linalg.inv(_damped(h)), layer.roots, energy)
            for g in analysis.groups:
                if g.id in by_group and alone:
                    roots = np.array(list(alone), dtype=np.int64)
                    add = _scatter(g, roots, np.array(list(alone.values())))
                    if np.any(add):
                        by_group[g.id] += add
                        by_group_greedy[g.id] += _scatter(g, roots, np.array([greedy[int(r)] for r in roots]))
                        seen[g.id] = True
        # channels no weight reads, only an activation product contracts (attention Q.K^T head dims): scored
        # by the relative error of the attention logits, in greedy order too
        pending = [g for g in analysis.groups if g.id in by_group and not seen[g.id]]
        products = [
            (a, b, roots, [g for g in pending if np.isin(roots, g.channels).any()])
            for a, b, roots in _contractions(analysis)
        ]
        products = [p for p in products if p[3]]
        acts = run_with_outputs(
            self.stats_graph, model, sorted({n for p in products for n in p[:2]}), self.feeds
        )
        for a_name, b_name, roots, groups in products:
            alone, greedy = contraction_errors(acts[a_name], acts[b_name], roots, self.rng)
            keys = np.array(list(alone), dtype=np.int64)
            for g in groups:
                by_group[g.id] += _scatter(g, keys, np.array([alone[int(r)] for r in keys]))
                by_group_greedy[g.id] += _scatter(g, keys, np.array([greedy[int(r)] for r in keys]))
                seen[g.id] = True
        # global ranking compares greedy (compensated, cumulative) costs across layers; uniform ranking
        # orders each group by the error of removing a channel alone
        self.global_scores = {}
        for gid, s in by_group.items():
            self.scores[gid] = s if seen[gid] else fallback[gid]
            self.global_scores[gid] = by_group_greedy[gid] if seen[gid] else fallback[gid]

    def reconstruct(self, pruned: set[int]) -> None:
        """Consumer by consumer in graph order: least-squares fit of the kept inputs (as the pruned model sees
        them) to the original outputs; writes new weights and biases into the analysis graph."""
        pruned_arr = np.array(sorted(pruned), dtype=np.int64)
        order = [n.name for n in self.analysis.graph.nodes if n.name in self.layers]
        masked = self._masked_graph(pruned_arr)
        for name in order:
            layer = self.layers[name]
            drop = np.isin(layer.roots, pruned_arr)
            if not drop.any():
                continue
            xname = layer.node.inputs[0].name
            x_new = run_with_outputs(masked, self.model, [xname], self.feeds)[xname]
            rng = np.random.default_rng(self.seed)
            z = layer.features(self.inputs[xname], rng)
            rng = np.random.default_rng(self.seed)
            zn = layer.features(x_new, rng)  # same rows: same seed, same shapes
            keep = np.nonzero(~drop)[0]
            zk = _augment(zn[:, keep])
            target = z @ layer.W.T + layer.bias()
            # ridge towards the current weights: trusts the data as much as its amount and realism allow
            hk = zk.T @ zk / len(zk)
            lam = self.damp * float(np.mean(np.diag(hk))) + 1e-8
            prior = np.concatenate([layer.W[:, keep], layer.bias()[:, None]], axis=1).T
            rhs = zk.T @ target / len(zk) + lam * prior
            sol = np.linalg.solve(hk + lam * np.eye(len(hk)), rhs)  # (k+1, out)
            w_new = np.zeros_like(layer.W)
            w_new[:, keep] = sol[:-1].T
            bias = sol[-1] - (0 if layer.node.op in ("Conv", "Gemm") else layer.bias())
            _write_layer(self.analysis.graph, layer.node, w_new, bias)
            _register_bias(self.analysis, layer.node)
            _write_layer(masked, _find_node(masked, name), w_new, bias)

    def _masked_graph(self, pruned_arr: np.ndarray) -> gs.Graph:
        """A copy of the graph computing what the pruned model computes: pruned inputs of every consumer read
        zero weights, and every weight, bias and norm parameter of a pruned channel is zero (channels only
        an activation product reads, such as attention head dims, are gone too)."""
        g = self.stats_graph.copy()
        for node in g.nodes:
            if node.name in self.layers:
                layer = self.layers[node.name]
                w = np.where(np.isin(layer.roots, pruned_arr)[None, :], 0.0, layer.W)
                _write_layer(g, node, w, np.zeros(0) if node.op == "MatMul" else layer.bias())
        for name, t in g.tensors().items():
            for axis, raw in self.analysis.const_axes.get(name, {}).items():
                if isinstance(t, gs.Constant):
                    gone = np.isin(self.analysis.find(raw), pruned_arr)
                    if gone.any():
                        shape = [1] * t.values.ndim
                        shape[axis] = -1
                        t.values = np.where(gone.reshape(shape), 0, t.values).astype(t.values.dtype)
        return g


def _residual_sum(node: gs.Node) -> str | None:
    """The residual stream a layer's output is added into (through its own `+ bias`), if a LayerNorm reads
    that stream."""
    t = node.outputs[0]
    for _ in range(2):
        if len(t.outputs) != 1 or t.outputs[0].op != "Add":
            return None
        add = t.outputs[0]
        other = [x for x in add.inputs if x is not t]
        if len(other) == 1 and not isinstance(other[0], gs.Constant):
            stream = add.outputs[0]
            return stream.name if any(c.op == "LayerNormalization" for c in stream.outputs) else None
        t = add.outputs[0]
    return None


def _row_energy(x: np.ndarray, width: int) -> float:
    """Mean squared norm of the rows of a [.., width] tensor, centred per row (what a LayerNorm sees)."""
    rows = x.reshape(-1, width).astype(np.float64)
    return float(((rows - rows.mean(axis=1, keepdims=True)) ** 2).sum(axis=1).mean()) + 1e-12


def _contractions(analysis: GroupAnalysis) -> list[tuple[str, str, np.ndarray]]:
    """(A, B, root per contracted position) of every activation @ activation MatMul that contracts over
    channels (attention scores Q.K^T when head dims are the channels)."""
    out = []
    for node in analysis.graph.nodes:
        if node.op != "MatMul" or any(isinstance(t, gs.Constant) for t in node.inputs):
            continue
        lab = analysis.labels.get(node.inputs[0].name)
        if lab is not None and varying_axes(lab) == [lab.ndim - 1]:
            roots = analysis.find(axis_ids(lab, lab.ndim - 1))
            out.append((node.inputs[0].name, node.inputs[1].name, roots))
    return out


def contraction_errors(
    a: np.ndarray, b: np.ndarray, roots: np.ndarray, rng: np.random.Generator
) -> tuple[dict[int, float], dict[int, float]]:
    """Removal cost of each channel contracted by S = A @ B, relative to the energy of S: alone, and in
    greedy order (cheapest next channel given those already gone, running maximum), as `greedy_obs_errors`
    does for weights. S is centred along its last axis first: a Softmax over it ignores a shift per row."""
    lead = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    k = a.shape[-1]
    a2 = np.broadcast_to(a, lead + a.shape[-2:]).reshape(-1, a.shape[-2], k).astype(np.float64)
    b2 = np.broadcast_to(b, lead + b.shape[-2:]).reshape(-1, k, b.shape[-1]).astype(np.float64)
    rows = max(1, min(a2.shape[0], CONTRACTION_ELEMENTS // max(1, a2.shape[1] * b2.shape[2])))
    pick = np.sort(rng.choice(a2.shape[0], rows, replace=False))
    a2, b2 = a2[pick], b2[pick]
    units = [(int(r), np.nonzero(roots == r)[0]) for r in np.unique(roots[roots >= 0])]
    parts = []
    for _, idx in units:  # each unit's share of S, centred per row
        s = a2[..., idx] @ b2[:, idx, :]
        parts.append((s - s.mean(axis=-1, keepdims=True)).ravel())
    c = np.stack(parts)
    full = a2 @ b2
    energy = float(((full - full.mean(axis=-1, keepdims=True)) ** 2).sum()) + 1e-12
    gram = c @ c.T
    alone = {r: float(gram[i, i]) / energy for i, (r, _) in enumerate(units)}
    greedy: dict[int, float] = {}
    left = list(range(len(units)))
    cross = np.zeros(len(units))  # <E, C_u> with E the sum of the removed parts
    err, last = 0.0, 0.0
    chunk = max(1, len(units) // 64)
    while left:
        cost = err + 2 * cross[left] + np.diag(gram)[left]
        for i in np.argsort(cost, kind="stable")[:chunk]:
            u = left[i]
            err += 2 * cross[u] + gram[u, u]
            cross += gram[u]
            last = max(last, err)
            greedy[units[u][0]] = last / energy
        left = [u for u in left if units[u][0] not in greedy]
    return alone, greedy


def greedy_obs_errors(
    w: np.ndarray, hinv: np.ndarray, roots: np.ndarray, energy: float
) -> tuple[dict[int, float], dict[int, float]]:
    """Removal cost of each input channel of a layer y = W z, taken in greedy OBS order with compensation:
    repeatedly remove the cheapest channels (a chunk of ~1/64 of them per step), update the remaining weights
    and the inverse Gram matrix as Optimal Brain Surgeon does, and charge each channel the output error
    (relative to `energy`) of its step - non-decreasing, so a channel's score says how costly the layer
    gets once it and every cheaper one are gone, which is what ranking across layers needs. Also returns
    each channel's error when removed alone (the first step's costs), which ranks channels within a layer."""
    w, hinv = w.astype(np.float64).copy(), hinv.copy()
    units = [(int(r), np.nonzero(roots == r)[0]) for r in np.unique(roots[roots >= 0])]
    single = all(len(idx) == 1 for _, idx in units)
    chunk = max(1, len(units) // 64)
    errs: dict[int, float] = {}
    alone: dict[int, float] = {}
    last = 0.0
    while units:
        if single:
            cols = np.array([idx[0] for _, idx in units])
            cost = (w[:, cols] ** 2).sum(axis=0) / np.maximum(np.diag(hinv)[cols], 1e-12)
        else:
            cost = np.array([_block_error(w, hinv, idx) for _, idx in units])
        if not alone:
            alone = {r: float(c) / energy for (r, _), c in zip(units, cost)}
        order = np.argsort(cost, kind="stable")[:chunk]
        for i in order:
            last = max(last, float(cost[i]))
            errs[units[i][0]] = last / energy
        idx = np.concatenate([units[i][1] for i in order])
        hqq = np.linalg.pinv(hinv[np.ix_(idx, idx)])
        w -= w[:, idx] @ hqq @ hinv[idx, : w.shape[1]]
        hinv -= hinv[:, idx] @ hqq @ hinv[idx, :]
        w[:, idx] = 0.0
        drop = set(order.tolist())
        units = [u for i, u in enumerate(units) if i not in drop]
    return alone, errs


def _block_error(w: np.ndarray, hinv: np.ndarray, idx: np.ndarray) -> float:
    ws = w[:, idx]
    return float(np.sum(ws.T * np.linalg.lstsq(hinv[np.ix_(idx, idx)], ws.T, rcond=None)[0]))


def _register_bias(analysis: GroupAnalysis, node: gs.Node) -> None:
    """A bias created by reconstruction follows the layer's output channels when they are pruned."""
    w = node.inputs[1]
    out_axis = {"Conv": 0, "Gemm": 0 if node.attrs.get("transB", 0) else 1}.get(node.op, 1)
    ids = analysis.const_axes.get(w.name, {}).get(out_axis)
    if node.op == "MatMul":
        add = node.outputs[0].outputs[0] if node.outputs[0].outputs else None
        if add is None or add.name != f"{node.name}_bias_add":
            return
        add.outputs[0].shape, node.outputs[0].shape = None, None
        bias = add.inputs[1]
    elif len(node.inputs) > 2:
        bias = node.inputs[2]
    else:
        return
    if ids is not None and bias.name not in analysis.const_axes:
        analysis.const_axes[bias.name] = {bias.values.ndim - 1: ids}


def bn_matched_graph(graph: gs.Graph, opset: int) -> gs.Graph:
    """A copy where each BatchNormalization normalizes with its batch statistics (data-free calibration)."""
    g = graph.copy()
    for node in list(g.nodes):
        if node.op == "BatchNormalization" and all(isinstance(t, gs.Constant) for t in node.inputs[1:3]):
            _batch_stat_bn(g, node, opset)
    g.cleanup().toposort()
    return g


def _batch_stat_bn(g: gs.Graph, node: gs.Node, opset: int) -> None:
    x, y, n = node.inputs[0], node.outputs[0], node.name
    rank = len(x.shape) if x.shape is not None else 4
    axes = [0] + list(range(2, rank))
    shape = (-1,) + (1,) * (rank - 2)
    gamma = np.asarray(node.inputs[1].values).reshape(shape).copy()
    beta = np.asarray(node.inputs[2].values).reshape(shape).copy()
    eps = np.asarray(node.attrs.get("epsilon", 1e-5), dtype=gamma.dtype)

    def add(kind, inputs, tag, **attrs):
        out = gs.Variable(f"{n}_{tag}", dtype=x.dtype)
        g.nodes.append(gs.Node(kind, attrs=attrs, inputs=inputs, outputs=[out]))
        return out

    def mean(t, tag):
        if opset >= 18:
            return add("ReduceMean", [t, gs.Constant(f"{n}_{tag}_axes", np.array(axes))], tag)
        return add("ReduceMean", [t], tag, axes=axes)

    centered = add("Sub", [x, mean(x, "mean")], "centered")
    var = mean(add("Mul", [centered, centered], "sq"), "var")
    std = add("Sqrt", [add("Add", [var, gs.Constant(f"{n}_eps", eps)], "vareps")], "std")
    scaled = add("Mul", [add("Div", [centered, std], "xhat"), gs.Constant(f"{n}_gamma", gamma)], "scaled")
    node.outputs = []
    g.nodes.append(gs.Node("Add", inputs=[scaled, gs.Constant(f"{n}_beta", beta)], outputs=[y]))


def _find_node(graph: gs.Graph, name: str) -> gs.Node:
    return next(n for n in graph.nodes if n.name == name)


def _shared_constants(graph: gs.Graph) -> set[str]:
    uses: dict[str, int] = {}
    for node in graph.nodes:
        for t in node.inputs:
            if isinstance(t, gs.Constant):
                uses[t.name] = uses.get(t.name, 0) + 1
    return {n for n, c in uses.items() if c > 1}


def _write_layer(graph: gs.Graph, node: gs.Node, w: np.ndarray, b: np.ndarray) -> None:
    """Store a (out, features) matrix and bias into a Conv/Gemm node, or a MatMul plus a bias delta (added
    to its `+ b` constant, or as a new Add)."""
    wt = node.inputs[1]
    dtype = wt.values.dtype
    if node.op == "Conv":
        wt.values = np.ascontiguousarray(w.reshape(wt.values.shape).astype(dtype))
    elif node.op == "Gemm":
        wt.values = np.ascontiguousarray((w if node.attrs.get("transB", 0) else w.T).astype(dtype))
    else:
        wt.values = np.ascontiguousarray(w.T.astype(dtype))
    b = b.astype(dtype)
    if node.op in ("Conv", "Gemm"):
        if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
            old = node.inputs[2]
            old.values = np.broadcast_to(b, old.values.shape).copy() if old.values.size == b.size else b
        elif len(node.inputs) <= 2:
            node.inputs.append(gs.Constant(f"{node.name}_bias", b))
        return
    if not np.any(b):
        return
    out = node.outputs[0]
    users = out.outputs
    if len(users) == 1 and users[0].op == "Add" and out not in graph.outputs:
        other = [t for t in users[0].inputs if t is not out]
        if len(other) == 1 and isinstance(other[0], gs.Constant) and other[0].values.shape[-1:] == b.shape:
            other[0].values = (other[0].values + b).astype(dtype)
            return
    pre = gs.Variable(f"{out.name}_nobias", dtype=out.dtype, shape=out.shape)
    node.outputs = [pre]
    graph.nodes.append(
        gs.Node(
            "Add", f"{node.name}_bias_add", inputs=[pre, gs.Constant(f"{node.name}_bias", b)], outputs=[out]
        )
    )


CRITERIA = {"l1": L1, "l2": L2, "bn": BNScale, "activation": Activation, "obspa": OBSPA}


def score_groups(criterion: str, model: Model, analysis: GroupAnalysis, calib, seed: int):
    """Instantiate a criterion: `.scores` maps group id -> per-channel scores (lower = pruned first)."""
    return CRITERIA[criterion](model, analysis, calib, seed)
