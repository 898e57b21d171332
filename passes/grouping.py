"""Channel grouping: which channels of an ONNX graph must be pruned together.

First stage of structured pruning (`grouping` -> `importance` -> `prune`). Every channel space opened by a
producer (Conv/ConvTranspose out channels, Gemm/MatMul with a constant weight, an embedding Gather) gets fresh
integer ids. Ids flow through the graph as *label arrays*: for each tensor an int array of the tensor's rank,
size 1 on axes that carry no channel and full size on the (single) channel axis, -1 where no channel lives.
One rule per op type (`RULES`, a table, not an if-chain) maps input labels to output labels, attaches labels to
the constant weights the op reads, and unions ids that must go together (residual Add, depthwise Conv,
attention heads). A union-find over ids gives the *channels* (classes of ids removed as one); the connected
components of the bipartite networkx graph producer <-> channel give the `ChannelGroup`s that are ranked and
pruned together. Anything the table cannot follow blocks its ids, with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from sparsecc.errors import BadInput
from sparsecc.ir import Model
from sparsecc.pipeline import register_analysis

MAX_LABEL_ELEMENTS = 1 << 24  # a reshape whose label tensor would exceed this blocks instead


# ----------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Member:
    """One tensor axis whose positions are labelled by channel ids (`ids[i]` = channel root or -1)."""

    node: str
    op: str
    tensor: str
    axis: int
    role: str
    ids: np.ndarray = field(repr=False, compare=False)
    const: bool = False

    def to_json(self) -> dict:
        return {"node": self.node, "op": self.op, "tensor": self.tensor, "axis": self.axis, "role": self.role}


@dataclass
class ChannelGroup:
    """Channels that are scored and pruned together, with every tensor axis they touch."""

    id: int
    channels: list[int]  # union-find roots; one entry per prunable channel (a head counts as one)
    members: list[Member]
    sources: list[str]  # producer nodes that open the channel spaces
    prunable: bool
    reason: str = ""
    params: int = 0
    flops: int = 0

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "channels": len(self.channels),
            "sources": self.sources,
            "members": [m.to_json() for m in self.members],
            "params": int(self.params),
            "flops": int(self.flops),
            "prunable": self.prunable,
            "reason": self.reason,
        }


@dataclass
class Fixup:
    """A node whose attributes / shape constants must follow the pruned channels."""

    node: gs.Node
    kind: str  # "conv_group" | "reshape" | "expand" | "resize" | "split" | "slice" | "rnn"
    axis: int = -1
    lab: np.ndarray | None = None


@dataclass
class GroupAnalysis:
    """Result of tracing a graph: groups plus everything the pruner needs to edit it."""

    graph: gs.Graph
    groups: list[ChannelGroup]
    find: object  # callable: ids array -> roots array
    labels: dict[str, np.ndarray]  # variable name -> label array (raw ids)
    const_axes: dict[str, dict[int, np.ndarray]]  # constant name -> axis -> raw ids
    fixups: list[Fixup]
    attention: str = "heads"  # the attention mode traced ("auto" resolved)


# -------------------------------------------------------------------------------------- union-find
class _UnionFind:
    def __init__(self) -> None:
        self.parent = np.zeros(0, dtype=np.int64)
        self.blocked: dict[int, str] = {}

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        ids = np.arange(start, start + n, dtype=np.int64)
        self.parent = np.concatenate([self.parent, ids])
        return ids

    def find(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        out = ids.copy()
        mask = out >= 0
        p = out[mask]
        while True:
            q = self.parent[p]
            if np.array_equal(q, p):
                break
            p = q
        out[mask] = p
        return out

    def union(self, a: int, b: int) -> None:
        ra, rb = int(self.find(np.array([a]))[0]), int(self.find(np.array([b]))[0])
        if ra == rb:
            return
        if ra > rb:
            ra, rb = rb, ra
        self.parent[rb] = ra
        if rb in self.blocked:
            reason = self.blocked.pop(rb)
            self.blocked.setdefault(ra, reason)

    def block(self, ids: np.ndarray, reason: str) -> None:
        for r in np.unique(self.find(np.asarray(ids).ravel())):
            if r >= 0:
                self.blocked.setdefault(int(r), reason)


# ----------------------------------------------------------------------------------------- tracer
def _shape(t: gs.Tensor) -> tuple[int, ...] | None:
    if isinstance(t, gs.Constant):
        return tuple(t.values.shape)
    if t.shape is None or any(not isinstance(d, int) or d < 0 for d in t.shape):
        return None
    return tuple(int(d) for d in t.shape)


def varying_axes(lab: np.ndarray | None) -> list[int]:
    return [] if lab is None else [a for a, n in enumerate(lab.shape) if n > 1]


def axis_ids(lab: np.ndarray, axis: int) -> np.ndarray:
    """The 1-D labels along `axis` of a label array that varies on that axis only."""
    index = tuple(slice(None) if a == axis else 0 for a in range(lab.ndim))
    return lab[index]


def _const_values(t: gs.Tensor) -> np.ndarray | None:
    return np.asarray(t.values) if isinstance(t, gs.Constant) else None


class _Tracer:
    def __init__(self, graph: gs.Graph, source: str):
        self.graph, self.source = graph, source
        self.uf = _UnionFind()
        self.labels: dict[str, np.ndarray] = {}
        self.const_uses: dict[str, list[tuple[str, int, np.ndarray | None]]] = {}
        self.members: list[tuple[str, str, str, int, str, bool]] = []  # node, op, tensor, axis, role, const
        self.sources: list[tuple[str, np.ndarray]] = []
        self.fixups: list[Fixup] = []
        self.opset = 13
        self.attention = "heads"  # or "head_dims": what a head split [.., H*D] -> [.., H, D] prunes

    # -- helpers used by rules
    def lab(self, t: gs.Tensor) -> np.ndarray | None:
        return self.labels.get(t.name)

    def fresh(self, node: gs.Node, n: int) -> np.ndarray:
        ids = self.uf.new(n)
        self.sources.append((node.name, ids))
        return ids

    def block(self, lab: np.ndarray | None, reason: str) -> None:
        if lab is not None:
            self.uf.block(lab[lab >= 0], reason)

    def set_out(self, node: gs.Node, t: gs.Tensor, lab: np.ndarray | None, role: str = "activation") -> None:
        if lab is None:
            return
        lab = self.normalize(lab, node)
        if lab is None or not (lab >= 0).any():
            return
        self.labels[t.name] = lab
        for a in varying_axes(lab):
            self.members.append((node.name, node.op, t.name, a, role, False))

    def use_const(self, node: gs.Node, t: gs.Tensor, axis: int, ids: np.ndarray | None, role: str) -> None:
        """Record that `node` reads constant `t` with channel ids along `axis` (None: this use prunes nothing)."""
        self.const_uses.setdefault(t.name, []).append((node.name, axis, ids))
        if ids is not None:
            self.members.append((node.name, node.op, t.name, axis, role, True))

    def union(self, a: np.ndarray, b: np.ndarray, reason: str) -> np.ndarray:
        """Elementwise union of two broadcastable label arrays; -1 against an id blocks it."""
        a, b = np.broadcast_arrays(a, b)
        both = (a >= 0) & (b >= 0)
        for x, y in zip(a[both].ravel(), b[both].ravel()):
            self.uf.union(int(x), int(y))
        one = (a >= 0) != (b >= 0)
        self.block(np.where(a >= 0, a, b)[one], reason)
        return np.where(a >= 0, a, b)

    def normalize(self, lab: np.ndarray, node: gs.Node) -> np.ndarray | None:
        """Compress axes the labels do not vary on; if several axes vary, the inner ones join the outer
        (attention: (H*D) -> (H, D) prunes whole heads)."""
        roots = self.uf.find(lab)
        roots = roots[
            tuple(slice(0, 1) if _constant_along(roots, a) else slice(None) for a in range(lab.ndim))
        ]
        vary = varying_axes(roots)
        if len(vary) > 1:
            outer = vary[0]
            moved = np.moveaxis(roots, outer, 0).reshape(roots.shape[outer], -1)
            for row in moved:
                row = np.unique(row)
                valid = row[row >= 0]
                for x in valid[1:]:
                    self.uf.union(int(valid[0]), int(x))
                if len(valid) and len(valid) < len(row):
                    self.uf.block(row, f"{node.op} '{node.name}' mixes channels with fixed positions")
            roots = self.uf.find(roots)
            vary = [outer]
        index = tuple(slice(None) if a in vary else slice(0, 1) for a in range(lab.ndim))
        return roots[index] if vary else None

    def join_heads(self, lab: np.ndarray, head_axis: int) -> None:
        """Head-dim pruning: position d of every head is one channel (uniform head dims, H kept)."""
        moved = np.moveaxis(self.uf.find(lab), head_axis, -1).reshape(-1, lab.shape[head_axis])
        for row in np.unique(moved, axis=0):
            valid = row[row >= 0]
            for x in valid[1:]:
                self.uf.union(int(valid[0]), int(x))
            if len(valid) and len(valid) < len(row):
                self.uf.block(valid, "attention heads mix prunable and fixed head dims")


def _constant_along(arr: np.ndarray, axis: int) -> bool:
    first = np.take(arr, [0], axis=axis)
    return bool((arr == first).all())


def _full_lab(lab: np.ndarray | None, rank: int) -> np.ndarray:
    if lab is None:
        return np.full((1,) * rank, -1, dtype=np.int64)
    if lab.ndim < rank:
        lab = lab.reshape((1,) * (rank - lab.ndim) + lab.shape)
    return lab


# ------------------------------------------------------------------------------------------ rules
def _block_all(tr: _Tracer, node: gs.Node, why: str | None = None) -> None:
    reason = why or f"op {node.op} (node '{node.name}') is not in the channel rule table"
    for t in node.inputs:
        tr.block(tr.lab(t), reason)


def _passthrough(tr: _Tracer, node: gs.Node, fixed_axes: tuple[int, ...] = ()) -> np.ndarray | None:
    """Same indices in as out; channels may not live on `fixed_axes` (negative = from the end)."""
    lab = tr.lab(node.inputs[0])
    if lab is None:
        return None
    rank = lab.ndim
    fixed = {a % rank for a in fixed_axes}
    if fixed & set(varying_axes(lab)):
        tr.block(lab, f"{node.op} '{node.name}' mixes values across the channel axis")
        return None
    tr.set_out(node, node.outputs[0], lab)
    return lab


def _rule_unary(tr, node):
    _passthrough(tr, node)


def _rule_softmax(tr, node):
    lab = tr.lab(node.inputs[0])
    default = -1 if tr.opset >= 13 else 1
    axis = node.attrs.get("axis", default)
    if lab is not None and tr.opset < 13:
        _passthrough(tr, node, tuple(range(axis % lab.ndim, lab.ndim)))
    else:
        _passthrough(tr, node, (axis,))


def _rule_pool(tr, node):
    lab = tr.lab(node.inputs[0])
    if lab is not None:
        _passthrough(tr, node, tuple(range(2, lab.ndim)))


def _rule_lrn(tr, node):
    _passthrough(tr, node, (1,))


def _rule_norm(tr, node):
    """BatchNormalization / InstanceNormalization: per-channel params follow axis 1."""
    x = tr.lab(node.inputs[0])
    lab = _passthrough(tr, node, tuple(range(2, x.ndim))) if x is not None else None
    ids = None if lab is None or 1 not in varying_axes(lab) else axis_ids(lab, 1)
    for t in node.inputs[1:]:
        if isinstance(t, gs.Constant):
            tr.use_const(node, t, 0, ids, "norm_param")
        elif ids is not None:
            tr.block(lab, f"{node.op} '{node.name}' has non-constant parameters")


def _rule_layernorm(tr, node):
    lab = tr.lab(node.inputs[0])
    if lab is None:
        return
    axis = node.attrs.get("axis", -1) % lab.ndim
    out = _passthrough(tr, node, tuple(range(axis, lab.ndim)))
    if out is not None:  # channels live outside the normalized axes: scale/bias do not see them
        for t in node.inputs[1:]:
            if isinstance(t, gs.Constant):
                tr.use_const(node, t, 0, None, "norm_param")


def _rule_groupnorm(tr, node):
    _passthrough(tr, node, (1,))


def _rule_pad(tr, node):
    lab = tr.lab(node.inputs[0])
    if lab is None:
        return
    pads = node.attrs.get("pads")
    if pads is None and len(node.inputs) > 1:
        pads = _const_values(node.inputs[1])
    axes = _const_values(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
    if pads is None:
        return _block_all(tr, node, f"Pad '{node.name}' has non-constant pads")
    pads = np.asarray(pads).ravel()
    axes = list(range(lab.ndim)) if axes is None else [int(a) % lab.ndim for a in axes]
    n = len(axes)
    touched = tuple(ax for i, ax in enumerate(axes) if pads[i] != 0 or pads[i + n] != 0)
    _passthrough(tr, node, touched)


def _rule_resize(tr, node):
    lab = tr.lab(node.inputs[0])
    if lab is None:
        return
    out_shape = _shape(node.outputs[0])
    in_shape = _shape(node.inputs[0])
    scales = _resize_scales(node)
    if out_shape is not None and in_shape is not None:
        changed = tuple(a for a in range(len(in_shape)) if in_shape[a] != out_shape[a])
    elif scales is not None and len(scales) == lab.ndim:  # dynamic shapes: the scales say what is resized
        changed = tuple(int(a) for a in np.nonzero(scales != 1)[0])
    else:
        return _block_all(tr, node, f"{node.op} '{node.name}' has unknown shapes")
    if _passthrough(tr, node, changed) is not None:
        tr.fixups.append(Fixup(node, "resize"))


def _resize_scales(node: gs.Node) -> np.ndarray | None:
    """The constant scales of a Resize (input 2) or Upsample (input 1), None when given by sizes or computed."""
    index = 1 if node.op == "Upsample" else 2
    t = node.inputs[index] if len(node.inputs) > index else None
    values = _const_values(t) if t is not None and t.name else None
    return None if values is None or values.size == 0 else values.ravel()


def _rule_elementwise(tr, node):
    """Add/Sub/Mul/Div/...: broadcast, union the channels of all labelled operands (residuals merge)."""
    out_shape = _shape(node.outputs[0])
    labs = [tr.lab(t) for t in node.inputs]
    if all(lab is None for lab in labs):
        for t in node.inputs:
            if isinstance(t, gs.Constant):
                tr.use_const(node, t, 0, None, "operand")
        return
    if out_shape is None:
        return _block_all(tr, node, f"{node.op} '{node.name}' has an unknown output shape")
    rank = len(out_shape)
    merged = None
    reason = f"{node.op} '{node.name}' merges channels with an unprunable tensor"
    for lab in labs:
        if lab is not None:
            lab = _full_lab(lab, rank)
            merged = lab if merged is None else tr.union(merged, lab, reason)
    vary = varying_axes(merged)
    for t, lab in zip(node.inputs, labs):
        if lab is not None or not t.name:
            continue
        shape = _shape(t)
        if shape is None:
            tr.block(merged, reason)
            continue
        shape = (1,) * (rank - len(shape)) + shape
        for a in vary:
            if shape[a] == 1:
                continue
            if isinstance(t, gs.Constant):
                tr.use_const(node, t, a - (rank - t.values.ndim), axis_ids(merged, a), "operand")
            else:
                tr.block(merged, reason)
        if isinstance(t, gs.Constant) and not any(shape[a] > 1 for a in vary):
            tr.use_const(node, t, 0, None, "operand")
    tr.set_out(node, node.outputs[0], merged)


def _rule_conv(tr, node):
    x, w = node.inputs[0], node.inputs[1]
    if not isinstance(w, gs.Constant):
        return _block_all(tr, node, f"Conv '{node.name}' has a non-constant weight")
    lab = tr.lab(x)
    if lab is not None and set(varying_axes(lab)) - {1}:
        tr.block(lab, f"Conv '{node.name}' input has channels on a spatial axis")
        lab = None
    cin_ids = axis_ids(lab, 1) if lab is not None and 1 in varying_axes(lab) else None
    g = int(node.attrs.get("group", 1))
    cout = w.values.shape[0]
    if g == 1:
        tr.use_const(node, w, 1, cin_ids, "in_channels")
        out = tr.fresh(node, cout)
    elif cin_ids is None:  # grouped conv fed by fixed channels: its outputs are fixed too
        tr.use_const(node, w, 1, None, "in_channels")
        tr.use_const(node, w, 0, None, "out_channels")
        for t in node.inputs[2:]:
            if isinstance(t, gs.Constant):
                tr.use_const(node, t, 0, None, "bias")
        return
    else:  # grouped / depthwise: whole groups move together, outputs follow their input group
        per_in = len(cin_ids) // g
        blocks = cin_ids.reshape(g, per_in)
        for row in blocks:
            for x_id in row[1:]:
                tr.uf.union(int(row[0]), int(x_id))
        out = np.repeat(blocks[:, 0], cout // g)
        tr.use_const(node, w, 1, None, "in_channels")
        tr.fixups.append(Fixup(node, "conv_group"))
    tr.use_const(node, w, 0, out, "out_channels")
    for t in node.inputs[2:]:
        if isinstance(t, gs.Constant):
            tr.use_const(node, t, 0, out, "bias")
    tr.set_out(node, node.outputs[0], out.reshape((1, -1) + (1,) * (w.values.ndim - 2)), "out_channels")


def _rule_conv_transpose(tr, node):
    x, w = node.inputs[0], node.inputs[1]
    if not isinstance(w, gs.Constant):
        return _block_all(tr, node, f"ConvTranspose '{node.name}' has a non-constant weight")
    lab = tr.lab(x)
    g = int(node.attrs.get("group", 1))
    if g != 1:
        tr.block(lab, f"ConvTranspose '{node.name}' is grouped (group={g})")
        for t in node.inputs[1:]:
            if isinstance(t, gs.Constant):
                tr.use_const(node, t, 0, None, "weight")
        return
    if lab is not None and set(varying_axes(lab)) - {1}:
        tr.block(lab, f"ConvTranspose '{node.name}' input has channels on a spatial axis")
        lab = None
    cin_ids = axis_ids(lab, 1) if lab is not None and 1 in varying_axes(lab) else None
    tr.use_const(node, w, 0, cin_ids, "in_channels")
    out = tr.fresh(node, w.values.shape[1])
    tr.use_const(node, w, 1, out, "out_channels")
    for t in node.inputs[2:]:
        if isinstance(t, gs.Constant):
            tr.use_const(node, t, 0, out, "bias")
    tr.set_out(node, node.outputs[0], out.reshape((1, -1) + (1,) * (w.values.ndim - 2)), "out_channels")


RNN_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}  # stacked gate blocks in W, R (rows) and B (twice, W then R)


def _rule_rnn(tr, node):
    """RNN/GRU/LSTM: input channels are columns of W; hidden units open a channel space (unit h of every
    direction together) that owns rows h of each gate block in W/R/B/P, column h of R and the last axis of
    Y, Y_h, Y_c. Zero initial states are rewritten at pruning; other non-constant states block."""
    gates = RNN_GATES[node.op]
    x, w, r = node.inputs[0], node.inputs[1], node.inputs[2]
    if not isinstance(w, gs.Constant) or not isinstance(r, gs.Constant):
        return _block_all(tr, node, f"{node.op} '{node.name}' has non-constant weights")
    lab = tr.lab(x)
    if lab is not None and set(varying_axes(lab)) - {lab.ndim - 1}:
        tr.block(lab, f"{node.op} '{node.name}' input has channels off the feature axis")
        lab = None
    tr.use_const(node, w, 2, axis_ids(lab, lab.ndim - 1) if lab is not None else None, "in_features")
    hidden = tr.fresh(node, int(node.attrs["hidden_size"]))
    tr.use_const(node, w, 1, np.tile(hidden, gates), "out_features")
    tr.use_const(node, r, 1, np.tile(hidden, gates), "out_features")
    tr.use_const(node, r, 2, hidden, "recurrent")
    per_input = {3: 2 * gates, 7: 3}  # B: W and R biases; P: LSTM peepholes
    for i, t in enumerate(node.inputs[3:], start=3):
        if not t.name or i == 4:  # absent, or sequence_lens
            continue
        if i in per_input and isinstance(t, gs.Constant):
            tr.use_const(node, t, 1, np.tile(hidden, per_input[i]), "bias")
        elif i in (5, 6) and isinstance(t, gs.Constant) and not np.asarray(t.values).any():
            tr.use_const(node, t, 2, None, "state")  # zeros: rebuilt at the new size
        elif i in (5, 6) and isinstance(t, gs.Constant):
            tr.use_const(node, t, 2, hidden, "state")
        else:
            tr.block(hidden, f"{node.op} '{node.name}' has a non-constant input '{t.name}'")
    for t in node.outputs:
        so = _shape(t)
        if so is not None and t.name:
            tr.set_out(node, t, hidden.reshape((1,) * (len(so) - 1) + (-1,)), "out_features")
    tr.fixups.append(Fixup(node, "rnn", lab=hidden))


def _rule_gemm(tr, node):
    a, b = node.inputs[0], node.inputs[1]
    if not isinstance(b, gs.Constant) or node.attrs.get("transA", 0):
        return _block_all(tr, node, f"Gemm '{node.name}' needs a constant B and transA=0")
    trans_b = int(node.attrs.get("transB", 0))
    lab = tr.lab(a)
    if lab is not None and 0 in varying_axes(lab):
        tr.block(lab, f"Gemm '{node.name}' has channels on its batch axis")
        lab = None
    k_ids = axis_ids(lab, 1) if lab is not None else None
    tr.use_const(node, b, 1 if trans_b else 0, k_ids, "in_features")
    out = tr.fresh(node, b.values.shape[0 if trans_b else 1])
    tr.use_const(node, b, 0 if trans_b else 1, out, "out_features")
    if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
        c = node.inputs[2]
        if c.values.ndim >= 1 and c.values.shape[-1] == len(out):
            tr.use_const(node, c, c.values.ndim - 1, out, "bias")
        else:
            tr.use_const(node, c, 0, None, "bias")
    elif len(node.inputs) > 2 and node.inputs[2].name:
        tr.block(out, f"Gemm '{node.name}' has a non-constant C")
    tr.set_out(node, node.outputs[0], out.reshape(1, -1), "out_features")


def _rule_matmul(tr, node):
    a, b = node.inputs
    la, lb = tr.lab(a), tr.lab(b)
    sa, sb, so = _shape(a), _shape(b), _shape(node.outputs[0])
    if sa is None or sb is None or so is None or len(sa) < 2 or len(sb) < 2:
        return _block_all(tr, node, f"MatMul '{node.name}' has unknown or 1-D shapes")
    if isinstance(b, gs.Constant) and b.values.ndim == 2:  # x @ W: a linear layer
        if la is not None and set(varying_axes(la)) - {la.ndim - 1}:
            tr.block(la, f"MatMul '{node.name}' input has channels on a row axis")
            la = None
        tr.use_const(node, b, 0, axis_ids(la, la.ndim - 1) if la is not None else None, "in_features")
        out = tr.fresh(node, sb[1])
        tr.use_const(node, b, 1, out, "out_features")
        tr.set_out(node, node.outputs[0], out.reshape((1,) * (len(so) - 1) + (-1,)), "out_features")
        return
    if isinstance(a, gs.Constant) or isinstance(b, gs.Constant):
        return _block_all(tr, node, f"MatMul '{node.name}' with a constant left operand is not followed")
    _rule_matmul_activations(tr, node, len(so), la, lb)


def _rule_matmul_activations(tr, node, rank, la, lb):
    """activation @ activation (attention): batch channels union, contracted channels must match."""
    fa, fb = _full_lab(la, rank), _full_lab(lb, rank)
    va, vb = set(varying_axes(fa)), set(varying_axes(fb))
    m, k, n = rank - 2, rank - 1, rank - 1
    reason = f"MatMul '{node.name}' mixes channels it cannot follow"

    def fail():
        tr.block(fa, reason)
        tr.block(fb, reason)

    if k in va or m in vb:  # contraction over channels: Q.K^T over head dims
        if va != {k} or vb != {m}:
            return fail()
        tr.union(axis_ids(fa, k), axis_ids(fb, m), reason)
        return
    batch_a, batch_b = va - {m}, vb - {n}
    if (batch_a or batch_b) and (m in va or n in vb):
        return fail()
    if m in va and n in vb:
        return fail()
    if m in va:
        return tr.set_out(node, node.outputs[0], fa)
    if n in vb:
        return tr.set_out(node, node.outputs[0], fb)
    # channels on batch axes (heads): both sides must carry the same ones, or broadcast a size-1 axis
    sa, sb = _shape(node.inputs[0]), _shape(node.inputs[1])
    sa, sb = (1,) * (rank - len(sa)) + sa, (1,) * (rank - len(sb)) + sb
    for lab, other, so in ((la, fb, sb), (lb, fa, sa)):
        if lab is None and any(so[ax] > 1 for ax in varying_axes(other)):
            return fail()
    merged = tr.union(fa, fb, reason) if la is not None and lb is not None else (fa if la is not None else fb)
    tr.set_out(node, node.outputs[0], merged)


def _rule_reshape(tr, node):
    """Reshape/Flatten/Squeeze/Unsqueeze: move the labels through the element order."""
    lab = tr.lab(node.inputs[0])
    if lab is None:
        return
    si, so = _shape(node.inputs[0]), _shape(node.outputs[0])
    if si is None or so is None or int(np.prod(si)) > MAX_LABEL_ELEMENTS:
        return _block_all(tr, node, f"{node.op} '{node.name}' has unresolved shapes")
    if node.op == "Reshape" and not isinstance(node.inputs[1], gs.Constant):
        return _block_all(tr, node, f"Reshape '{node.name}' has a shape computed at run time")
    out = np.broadcast_to(lab, si).reshape(so)
    if tr.attention == "head_dims" and _is_head_split(node, lab, si, so):
        tr.join_heads(out, len(so) - 2)
    tr.set_out(node, node.outputs[0], out)
    if node.op == "Reshape" and tr.lab(node.outputs[0]) is not None:
        tr.fixups.append(Fixup(node, "reshape"))


def _is_head_split(node: gs.Node, lab: np.ndarray, si: tuple, so: tuple) -> bool:
    """[.., H*D] -> [.., H, D] feeding Transposes only: the multi-head split of an attention layer."""
    return _head_count(node, si, so) > 1 and varying_axes(lab) == [lab.ndim - 1]


def _head_count(node: gs.Node, si: tuple | None, so: tuple | None) -> int:
    """H if `node` is a multi-head split [.., H*D] -> [.., H, D] feeding Transposes only, else 0."""
    if node.op != "Reshape" or si is None or so is None or len(so) != len(si) + 1:
        return 0
    if tuple(so[:-2]) != tuple(si[:-1]) or so[-2] <= 1 or not node.outputs[0].outputs:
        return 0
    return int(so[-2]) if all(c.op == "Transpose" for c in node.outputs[0].outputs) else 0


def _rule_transpose(tr, node):
    lab = tr.lab(node.inputs[0])
    if lab is None:
        return
    perm = node.attrs.get("perm", list(range(lab.ndim))[::-1])
    tr.set_out(node, node.outputs[0], np.transpose(lab, perm))


def _rule_expand(tr, node):
    lab = tr.lab(node.inputs[0])
    so = _shape(node.outputs[0])
    if lab is None:
        return
    if so is None or not isinstance(node.inputs[1], gs.Constant):
        return _block_all(tr, node, f"Expand '{node.name}' has a shape computed at run time")
    tr.set_out(node, node.outputs[0], _full_lab(lab, len(so)))
    tr.fixups.append(Fixup(node, "expand"))


def _rule_concat(tr, node):
    so = _shape(node.outputs[0])
    labs = [tr.lab(t) for t in node.inputs]
    if all(lab is None for lab in labs):
        return
    if so is None:
        return _block_all(tr, node, f"Concat '{node.name}' has an unknown output shape")
    rank, axis = len(so), node.attrs["axis"] % len(so)
    vary = set().union(*(varying_axes(lab) for lab in labs if lab is not None))
    if vary == {axis}:  # channels concatenated: offsets
        parts = []
        for t, lab in zip(node.inputs, labs):
            n = _shape(t)[axis]
            if lab is None:
                parts.append(np.full(n, -1, dtype=np.int64))
            else:
                parts.append(axis_ids(lab, axis))
            if isinstance(t, gs.Constant):
                tr.use_const(node, t, axis, None, "concat_operand")
        out = np.concatenate(parts).reshape((1,) * axis + (-1,) + (1,) * (rank - axis - 1))
        tr.set_out(node, node.outputs[0], out, "concat")
    elif axis not in vary:  # concatenated along another axis: channels must agree (like Add)
        _rule_elementwise(tr, node)
    else:
        _block_all(tr, node, f"Concat '{node.name}' mixes channel axes")


def _rule_split(tr, node):
    lab = tr.lab(node.inputs[0])
    if lab is None:
        return
    axis = node.attrs.get("axis", 0) % lab.ndim
    if axis not in varying_axes(lab):
        for t in node.outputs:
            tr.set_out(node, t, lab)
        return
    ids = axis_ids(lab, axis)
    sizes = [(_shape(t) or (None,) * lab.ndim)[axis] for t in node.outputs]
    if any(s is None for s in sizes) or sum(sizes) != len(ids):
        return _block_all(tr, node, f"Split '{node.name}' has unknown sizes")
    start = 0
    for t, n in zip(node.outputs, sizes):
        window = ids[start : start + n]
        tr.set_out(node, t, window.reshape((1,) * axis + (-1,) + (1,) * (lab.ndim - axis - 1)), "split")
        start += n
    tr.fixups.append(Fixup(node, "split", axis, ids))


def _rule_slice(tr, node):
    lab = tr.lab(node.inputs[0])
    if lab is None:
        return
    si = _shape(node.inputs[0])
    consts = [_const_values(t) if t.name else None for t in node.inputs[1:]]
    if (
        si is None
        or any(c is None for c in consts[:2])
        or any(t.name and c is None for t, c in zip(node.inputs[3:], consts[2:]))
    ):
        return _block_all(tr, node, f"Slice '{node.name}' has non-constant bounds")
    starts, ends = consts[0].ravel(), consts[1].ravel()
    axes = consts[2].ravel() if len(consts) > 2 and consts[2] is not None else np.arange(len(starts))
    steps = consts[3].ravel() if len(consts) > 3 and consts[3] is not None else np.ones(len(starts), np.int64)
    out = lab
    vary = varying_axes(lab)
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = int(a) % lab.ndim
        if a not in vary:
            continue
        if st != 1:
            return _block_all(tr, node, f"Slice '{node.name}' strides over channels")
        sl = slice(*slice(int(s), int(e)).indices(si[a])[:2])
        index = tuple(sl if b == a else slice(None) for b in range(lab.ndim))
        out = out[index]
        tr.fixups.append(Fixup(node, "slice", a, axis_ids(lab, a)))
    tr.set_out(node, node.outputs[0], out)


def _rule_gather(tr, node):
    data, idx = node.inputs
    axis = int(node.attrs.get("axis", 0))
    so = _shape(node.outputs[0])
    if isinstance(data, gs.Constant) and data.values.ndim == 2 and axis == 0 and tr.lab(idx) is None:
        out = tr.fresh(node, data.values.shape[1])  # embedding table: its columns are a channel space
        tr.use_const(node, data, 1, out, "embedding")
        if so is not None:
            tr.set_out(node, node.outputs[0], out.reshape((1,) * (len(so) - 1) + (-1,)), "embedding")
        return
    lab = tr.lab(data)
    if lab is None:
        tr.block(tr.lab(idx), f"Gather '{node.name}' indexes with channels")
        return
    axis %= lab.ndim
    if axis in varying_axes(lab) or not isinstance(idx, gs.Constant):
        return _block_all(tr, node, f"Gather '{node.name}' selects channels")
    out = lab.reshape(lab.shape[:axis] + (1,) * idx.values.ndim + lab.shape[axis + 1 :])
    tr.set_out(node, node.outputs[0], out)


def _rule_reduce(tr, node):
    lab = tr.lab(node.inputs[0])
    if lab is None:
        return
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
        axes = _const_values(node.inputs[1])
        if axes is None:
            return _block_all(tr, node, f"{node.op} '{node.name}' has non-constant axes")
    axes = list(range(lab.ndim)) if axes is None or len(np.ravel(axes)) == 0 else list(np.ravel(axes))
    axes = sorted(int(a) % lab.ndim for a in axes)
    if set(axes) & set(varying_axes(lab)):
        return _block_all(tr, node, f"{node.op} '{node.name}' reduces over channels")
    out = (
        lab
        if node.attrs.get("keepdims", 1)
        else lab.reshape([n for a, n in enumerate(lab.shape) if a not in axes])
    )
    tr.set_out(node, node.outputs[0], out)


def _rule_shape(tr, node):  # reads only the shape; folded away on static graphs
    return


def _rule_tile(tr, node):
    lab = tr.lab(node.inputs[0])
    reps = _const_values(node.inputs[1])
    if lab is None:
        return
    if reps is None or any(reps[a] != 1 for a in varying_axes(lab)):
        return _block_all(tr, node, f"Tile '{node.name}' repeats channels")
    tr.set_out(node, node.outputs[0], lab)


UNARY = (
    "Relu LeakyRelu PRelu Elu Selu Celu Sigmoid HardSigmoid HardSwish Swish Mish Gelu Tanh Softplus Softsign "
    "Clip Erf Exp Log Sqrt Reciprocal Abs Neg Floor Ceil Round Sign Sin Cos Not IsNaN IsInf ThresholdedRelu "
    "Identity Dropout Cast CastLike Shrink"
).split()
ELEMENTWISE = "Add Sub Mul Div Pow Sum Max Min Mean Where Equal Greater Less And Or Xor Mod BitShift".split()

# op type -> rule(tracer, node). Ops missing here block any channel that reaches them.
RULES = {
    **{op: _rule_unary for op in UNARY},
    **{op: _rule_elementwise for op in ELEMENTWISE},
    "PRelu": _rule_elementwise,
    "Softmax": _rule_softmax,
    "LogSoftmax": _rule_softmax,
    "Hardmax": _rule_softmax,
    **{
        op: _rule_pool
        for op in "MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool".split()
    },
    "LRN": _rule_lrn,
    "BatchNormalization": _rule_norm,
    "InstanceNormalization": _rule_norm,
    "LayerNormalization": _rule_layernorm,
    "GroupNormalization": _rule_groupnorm,
    "Pad": _rule_pad,
    "Resize": _rule_resize,
    "Upsample": _rule_resize,
    "Conv": _rule_conv,
    "ConvTranspose": _rule_conv_transpose,
    "Gemm": _rule_gemm,
    **{op: _rule_rnn for op in RNN_GATES},
    "MatMul": _rule_matmul,
    **{op: _rule_reshape for op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze")},
    "Transpose": _rule_transpose,
    "Expand": _rule_expand,
    "Concat": _rule_concat,
    "Split": _rule_split,
    "Slice": _rule_slice,
    "Gather": _rule_gather,
    **{
        op: _rule_reduce
        for op in "ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2".split()
    },
    "Shape": _rule_shape,
    "Size": _rule_shape,
    "Tile": _rule_tile,
}


# --------------------------------------------------------------------------------------- analysis
def prepare_graph(model: Model) -> gs.Graph:
    """The graph with constants (and static shape computations) folded, so reshapes have constant shapes."""
    graph = model.graph()
    try:
        graph.fold_constants(size_threshold=1 << 26, error_ok=True).cleanup().toposort()
    except Exception:  # folding is an optimisation; tracing still works (blocking more) without it
        graph = model.graph()
        graph.cleanup().toposort()
    return _infer_unresolved_shapes(graph)


def _infer_unresolved_shapes(graph: gs.Graph) -> gs.Graph:
    """Re-run shape inference where folding left symbolic dims (e.g. an Expand whose shape became constant)."""
    ends = {id(t) for t in list(graph.inputs) + list(graph.outputs)}
    open_ = [
        t
        for t in graph.tensors().values()
        if isinstance(t, gs.Variable) and id(t) not in ends and t.shape is not None and _shape(t) is None
    ]
    if not open_:
        return graph
    for t in open_:
        t.shape = None
    try:
        proto = onnx.shape_inference.infer_shapes(gs.export_onnx(graph), data_prop=True)
    except Exception:  # inference is an optimisation, as folding is
        return graph
    return gs.import_onnx(proto)


ATTENTION_MODES = ("auto", "heads", "head_dims")
AUTO_MIN_HEADS = 8  # "auto": attention with fewer heads loses head dims, whole heads are too coarse a unit


def resolve_attention(attention: str, graph: gs.Graph) -> str:
    """The attention mode to trace with: `auto` is `head_dims` when some attention layer has fewer than
    AUTO_MIN_HEADS heads (4 heads: a whole head is 25% of the layer), else `heads`."""
    if attention != "auto":
        return attention
    counts = [_head_count(n, _shape(n.inputs[0]), _shape(n.outputs[0])) for n in graph.nodes]
    counts = [c for c in counts if c]
    return "head_dims" if counts and min(counts) < AUTO_MIN_HEADS else "heads"


def trace_groups(
    model: Model, graph: gs.Graph | None = None, ignore: tuple[str, ...] = (), attention: str = "heads"
) -> GroupAnalysis:
    """Trace channel spaces through the graph and return the channel groups. `attention` says what the
    channels of a multi-head split are: whole heads, or head dims (position d of every head, Q/K and V/out
    as separate groups), or `auto` (see `resolve_attention`)."""
    if attention not in ATTENTION_MODES:
        raise BadInput(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
    graph = graph if graph is not None else prepare_graph(model)
    attention = resolve_attention(attention, graph)
    if any(isinstance(v, gs.Constant) for v in graph.inputs):
        raise BadInput(f"{model.source}: graph inputs must not be constants")
    tr = _Tracer(graph, model.source)
    tr.opset, tr.attention = model.opset, attention
    names = {n.name for n in graph.nodes}
    unknown = [n for n in ignore if n not in names]
    if unknown:
        raise BadInput(f"{model.source}: --ignore names unknown node(s) {unknown}")
    for node in graph.nodes:
        rule = RULES.get(node.op) if (node.domain or "") in ("", "ai.onnx") else None
        n_before = len(tr.sources)
        if rule is None:
            _block_all(tr, node)
            for t in node.inputs:
                if isinstance(t, gs.Constant):
                    tr.use_const(node, t, 0, None, "weight")
        else:
            rule(tr, node)
            for t in node.inputs:  # constants the rule did not claim are uses that prune nothing
                if isinstance(t, gs.Constant) and not any(
                    u[0] == node.name for u in tr.const_uses.get(t.name, [])
                ):
                    tr.use_const(node, t, 0, None, "operand")
        if node.name in ignore:
            for _, ids in tr.sources[n_before:]:
                tr.uf.block(ids, f"node '{node.name}' is ignored")
    for t in graph.outputs:
        tr.block(tr.lab(t), f"channels reach graph output '{t.name}'")
    const_axes = _resolve_const_uses(tr, graph)
    groups = _build_groups(tr, graph, const_axes)
    return GroupAnalysis(graph, groups, tr.uf.find, tr.labels, const_axes, tr.fixups, attention)


def _resolve_const_uses(tr: _Tracer, graph: gs.Graph) -> dict[str, dict[int, np.ndarray]]:
    """A weight read by several nodes is pruned only where every use agrees."""
    out: dict[str, dict[int, np.ndarray]] = {}
    for name, uses in tr.const_uses.items():
        n_nodes = len({u[0] for u in uses})
        by_axis: dict[int, list[np.ndarray | None]] = {}
        for _, axis, ids in uses:
            if ids is not None:
                by_axis.setdefault(axis, []).append(ids)
        for axis, lst in by_axis.items():
            merged = lst[0]
            for other in lst[1:]:
                merged = tr.union(merged, other, f"weight '{name}' is shared by uses whose channels differ")
            n_with = len({u[0] for u in uses if u[1] == axis and u[2] is not None})
            if n_with < n_nodes:
                tr.uf.block(merged[merged >= 0], f"weight '{name}' is shared with an unprunable use")
            out.setdefault(name, {})[axis] = merged
    return out


def _node_flops(node: gs.Node) -> int:
    """Multiply-accumulates x2 of the weight-bearing ops (the ones pruning shrinks)."""
    if node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.inputs) < 2:
        return 0
    w = node.inputs[1]
    so = _shape(node.outputs[0])
    if not isinstance(w, gs.Constant) or so is None:
        return 0
    if node.op == "Conv":
        return 2 * int(np.prod(so)) * int(np.prod(w.values.shape[1:]))
    if node.op == "ConvTranspose":
        si = _shape(node.inputs[0]) or (0,)
        return 2 * int(np.prod(si)) * int(np.prod(w.values.shape[1:]))
    k = w.values.shape[1] if node.op == "Gemm" and node.attrs.get("transB", 0) else w.values.shape[0]
    return 2 * int(np.prod(so)) * int(k)


def _build_groups(tr: _Tracer, graph: gs.Graph, const_axes: dict) -> list[ChannelGroup]:
    g = nx.Graph()
    for node_name, ids in tr.sources:
        g.add_node(("src", node_name))
        for r in np.unique(tr.uf.find(ids)):
            g.add_edge(("src", node_name), ("ch", int(r)))
    consts = {t.name: t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    flops = {}
    for node in graph.nodes:
        f = _node_flops(node)
        if f:
            flops[node.inputs[1].name] = flops.get(node.inputs[1].name, 0) + f
    members_by_root: dict[int, list[Member]] = {}
    seen = set()
    for node_name, op, tensor, axis, role, is_const in tr.members:
        if (node_name, tensor, axis) in seen:
            continue
        seen.add((node_name, tensor, axis))
        raw = const_axes.get(tensor, {}).get(axis) if is_const else None
        if not is_const:
            lab = tr.labels.get(tensor)
            if lab is None or axis not in varying_axes(lab):
                continue
            raw = axis_ids(lab, axis)
        if raw is None:
            continue
        m = Member(node_name, op, tensor, axis, role, tr.uf.find(raw), is_const)
        for r in np.unique(m.ids[m.ids >= 0]):
            members_by_root.setdefault(int(r), []).append(m)
    groups = []
    for comp in nx.connected_components(g):
        roots = sorted(r for kind, r in comp if kind == "ch")
        srcs = sorted(str(n) for kind, n in comp if kind == "src")
        if not roots:
            continue
        members, mseen = [], set()
        for r in roots:
            for m in members_by_root.get(r, []):
                if id(m) not in mseen:
                    mseen.add(id(m))
                    members.append(m)
        reasons = [tr.uf.blocked[r] for r in roots if r in tr.uf.blocked]
        if len(roots) == 1 and not reasons:  # its label was never traced: nothing to choose from
            reasons = ["a single channel (every tensor keeps at least one)"]
        params = flop = 0
        rootset = np.array(roots)
        kept_frac: dict[str, float] = {}
        for m in members:  # a weight touched on several axes by one group is counted once
            if m.const and m.tensor in consts:
                frac = np.isin(m.ids, rootset).sum() / max(1, consts[m.tensor].values.shape[m.axis])
                kept_frac[m.tensor] = kept_frac.get(m.tensor, 1.0) * (1.0 - frac)
        for name, kept in kept_frac.items():
            params += int(round(consts[name].values.size * (1.0 - kept)))
            flop += int(round(flops.get(name, 0) * (1.0 - kept)))
        groups.append(
            ChannelGroup(0, roots, members, srcs, not reasons, reasons[0] if reasons else "", params, flop)
        )
    groups.sort(key=lambda grp: (min(grp.sources) if grp.sources else "", grp.channels[0]))
    for i, grp in enumerate(groups):
        grp.id = i
    return groups


@register_analysis("groups")
def analyze_groups(model: Model, **options) -> list[dict]:
    """Channel groups of a model as JSON: members, channels, params/FLOPs controlled, prunable or why not."""
    ignore = tuple(options.get("ignore", ()) or ())
    attention = options.get("attention") or "auto"  # the groups `prune` uses by default
    return [grp.to_json() for grp in trace_groups(model, ignore=ignore, attention=attention).groups]
