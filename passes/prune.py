"""Structured pruning pass: remove whole channel groups so the model stays a smaller dense ONNX model.

Pipeline position: after shape fixing/simplification, before sparsification and codegen. `grouping` finds the
coupled channel groups, `importance` scores every channel of every prunable group with a criterion plug-in,
`select_channels` picks which to drop (uniform or global ranking, per-layer cap, round-to-K, at least one
kept), optional OBS reconstruction (`obspa`) updates the consumer layers, and `remove_channels` slices weights,
biases, norm params, and rewrites Reshape/Expand/Resize shapes, Split/Slice bounds and Conv group counts.
The result is checked (`onnx.checker` full check, same output shapes) before it leaves the pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from sparsecc.errors import BadInput, Unsupported
from sparsecc.ir import Model, validate
from sparsecc.pipeline import register_pass
from sparsecc.verify import check_calibration

from .grouping import (
    ATTENTION_MODES,
    ChannelGroup,
    GroupAnalysis,
    axis_ids,
    prepare_graph,
    trace_groups,
    varying_axes,
)
from .importance import CRITERIA, score_groups


# -------------------------------------------------------------------------------------- counting
def count_params(graph: gs.Graph) -> int:
    return int(sum(t.values.size for t in graph.tensors().values() if isinstance(t, gs.Constant)))


def count_flops(graph: gs.Graph) -> int:
    from .grouping import _node_flops

    return int(sum(_node_flops(n) for n in graph.nodes))


# ------------------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class Selection:
    """Options of channel selection (validated by the pass)."""

    ratio: float
    global_ranking: bool = False
    max_layer_ratio: float = 0.9
    round_to: int = 1


def _n_keep(n: int, n_prune: int, opts: Selection) -> int:
    cap = min(n - 1, int(np.floor(opts.max_layer_ratio * n)))
    keep = n - max(0, min(n_prune, cap))
    if opts.round_to > 1 and n > opts.round_to:
        keep = min(n, int(np.ceil(keep / opts.round_to)) * opts.round_to)
    return keep


def select_channels(
    groups: list[ChannelGroup], scores: dict[int, np.ndarray], opts: Selection, comparable: bool = False
) -> set[int]:
    """Roots of the channels to remove. Uniform: `ratio` of each group. Global: the channels with the lowest
    score per parameter they control, until `ratio` of the prunable groups' parameters is gone (a head weighs
    as much as its slices of Q, K, V and the output projection), each group within its per-layer cap. Scores
    are compared as they are when the criterion says they are (`comparable`: obspa's relative output error),
    else after dividing by their group's mean."""
    prunable = [g for g in groups if g.prunable and len(g.channels) > 1]
    n_prune: dict[int, int] = {}
    if opts.global_ranking:
        pool = []
        for g in prunable:
            s = np.asarray(scores[g.id], dtype=np.float64)
            norm = s if comparable else s / (np.mean(s) + 1e-12)
            cost = max(1.0, g.params / len(g.channels))
            pool += [(float(v) / cost, cost, g.id) for v in np.sort(norm)]
        pool.sort()
        budget = opts.ratio * sum(g.params for g in prunable)
        caps = {g.id: len(g.channels) - _n_keep(len(g.channels), len(g.channels), opts) for g in prunable}
        removed = 0.0
        for _, cost, gid in pool:
            if removed + cost / 2 > budget:
                break
            if n_prune.get(gid, 0) < caps[gid]:
                n_prune[gid] = n_prune.get(gid, 0) + 1
                removed += cost
    else:
        n_prune = {g.id: int(np.floor(opts.ratio * len(g.channels) + 1e-9)) for g in prunable}
    pruned: set[int] = set()
    for g in prunable:
        keep = _n_keep(len(g.channels), n_prune.get(g.id, 0), opts)
        order = np.argsort(scores[g.id], kind="stable")  # lowest first
        pruned.update(int(g.channels[i]) for i in order[: len(g.channels) - keep])
    return pruned


def repair_selection(analysis: GroupAnalysis, pruned: set[int], scores: dict[int, np.ndarray]) -> set[int]:
    """Every channel axis of every tensor keeps at least one channel (split windows, concat parts)."""
    best = {}
    for g in analysis.groups:
        if g.id in scores:
            for root, s in zip(g.channels, scores[g.id]):
                best[int(root)] = float(s)
    pruned = set(pruned)
    axes = [axis_ids(lab, a) for lab in analysis.labels.values() for a in varying_axes(lab)]
    axes += [ids for per_axis in analysis.const_axes.values() for ids in per_axis.values()]
    for raw in axes:
        roots = analysis.find(raw)
        if len(roots) and (roots >= 0).all() and all(int(r) in pruned for r in roots):
            keep = max({int(r) for r in roots}, key=lambda r: best.get(r, 0.0))
            pruned.discard(keep)
    return pruned


# ------------------------------------------------------------------------------- physical removal
def _keep_mask(analysis: GroupAnalysis, raw: np.ndarray, pruned: np.ndarray) -> np.ndarray:
    roots = analysis.find(raw)
    return ~np.isin(roots, pruned) | (roots < 0)


def _new_shape(analysis: GroupAnalysis, t: gs.Variable, pruned: np.ndarray) -> list[int] | None:
    lab = analysis.labels.get(t.name)
    if t.shape is None:
        return None
    shape = list(t.shape)
    if lab is not None:
        for a in varying_axes(lab):
            shape[a] = int(_keep_mask(analysis, axis_ids(lab, a), pruned).sum())
    return shape


def _set_const(node: gs.Node, index: int, values: np.ndarray) -> None:
    node.inputs[index] = gs.Constant(f"{node.name}_pruned_{index}", np.asarray(values, dtype=np.int64))


def _fix_rnn(node: gs.Node, hidden: int) -> None:
    """New hidden size; all-zero initial states are rebuilt at it (they may be shared between layers)."""
    node.attrs["hidden_size"] = hidden
    for i in (5, 6):
        t = node.inputs[i] if len(node.inputs) > i else None
        if isinstance(t, gs.Constant) and not np.asarray(t.values).any():
            shape = (*t.values.shape[:-1], hidden)
            node.inputs[i] = gs.Constant(f"{node.name}_state_{i}", np.zeros(shape, t.values.dtype))


def _fix_nodes(analysis: GroupAnalysis, pruned: np.ndarray, opset: int) -> None:
    """Attributes and shape constants that must follow the removed channels (before weights are sliced)."""
    for fx in analysis.fixups:
        node = fx.node
        if fx.kind == "conv_group":
            w = node.inputs[1].values
            per_group = w.shape[0] // int(node.attrs.get("group", 1))
            kept = int(_keep_mask(analysis, analysis.const_axes[node.inputs[1].name][0], pruned).sum())
            node.attrs["group"] = kept // per_group
        elif fx.kind == "rnn":
            _fix_rnn(node, int(_keep_mask(analysis, fx.lab, pruned).sum()))
        elif fx.kind in ("reshape", "expand", "resize"):
            new = _new_shape(analysis, node.outputs[0], pruned)
            index = 1 if fx.kind != "resize" else 3
            if fx.kind == "resize" and (len(node.inputs) <= 3 or not node.inputs[3].name):
                continue  # scales only: channel axis scale is 1
            old = np.asarray(node.inputs[index].values).astype(np.int64)
            if fx.kind == "reshape":
                values = [-1 if o == -1 else d for o, d in zip(old, new)]
            else:
                off = len(new) - len(old)
                values = [o if o == 1 else new[i + off] for i, o in enumerate(old)]
            _set_const(node, index, values)
        elif fx.kind == "split":
            mask = _keep_mask(analysis, fx.lab, pruned)
            sizes, start = [], 0
            for t in node.outputs:
                n = t.shape[fx.axis]
                sizes.append(int(mask[start : start + n].sum()))
                start += n
            node.attrs.pop("num_outputs", None)
            if opset >= 13:
                if len(node.inputs) < 2:
                    node.inputs.append(gs.Constant(f"{node.name}_split", np.asarray(sizes, np.int64)))
                else:
                    _set_const(node, 1, sizes)
            else:
                node.attrs["split"] = sizes
        elif fx.kind == "slice":
            mask = _keep_mask(analysis, fx.lab, pruned)
            starts, ends = (np.asarray(node.inputs[i].values).astype(np.int64).copy() for i in (1, 2))
            axes = (
                np.asarray(node.inputs[3].values).ravel()
                if len(node.inputs) > 3 and node.inputs[3].name
                else np.arange(len(starts))
            )
            rank = len(node.inputs[0].shape)
            for i, a in enumerate(axes):
                if int(a) % rank == fx.axis:
                    s, e, _ = slice(int(starts[i]), int(ends[i])).indices(len(mask))
                    starts[i] = int(mask[:s].sum())
                    ends[i] = starts[i] + int(mask[s:e].sum())
            _set_const(node, 1, starts)
            _set_const(node, 2, ends)


def remove_channels(model: Model, analysis: GroupAnalysis, pruned: set[int]) -> Model:
    """Physically remove the channels whose union-find roots are in `pruned`; returns a checked Model."""
    graph = analysis.graph
    pruned_arr = np.array(sorted(pruned), dtype=np.int64)
    _fix_nodes(analysis, pruned_arr, model.opset)
    tensors = graph.tensors()
    for name, per_axis in analysis.const_axes.items():
        t = tensors.get(name)
        if not isinstance(t, gs.Constant):
            continue
        values = np.asarray(t.values)
        for axis, raw in per_axis.items():
            values = np.compress(_keep_mask(analysis, raw, pruned_arr), values, axis=axis)
        t.values = np.ascontiguousarray(values)
    outputs = {t.name for t in graph.outputs}
    for t in tensors.values():
        if isinstance(t, gs.Variable) and t.name in analysis.labels and t.name not in outputs:
            t.shape = _new_shape(analysis, t, pruned_arr)
    out = model.with_graph(graph)
    validate(out.proto, model.source)
    before = [(o.name, o.shape) for o in model.outputs]
    after = [(o.name, o.shape) for o in out.outputs]
    if before != after:
        raise Unsupported(f"{model.source}: pruning changed the output shapes {before} -> {after}")
    return out


# ------------------------------------------------------------------------------------------ pass
@register_pass("prune")
class PrunePass:
    """Remove a ratio of the channels of every prunable group, ranked by a criterion."""

    name = "prune"

    def __init__(
        self,
        ratio: float,
        criterion: str = "l1",
        calib: dict[str, np.ndarray] | None = None,
        round_to: int = 1,
        global_ranking: bool = False,
        ignore: tuple[str, ...] = (),
        max_layer_ratio: float = 0.9,
        seed: int = 0,
        attention: str = "auto",
    ):
        try:
            ratio = float(ratio)
        except (TypeError, ValueError):
            raise BadInput(f"prune: ratio must be a number, got {ratio!r}") from None
        if not 0.0 <= ratio < 1.0:
            raise BadInput(f"prune: ratio must be in [0, 1), got {ratio}")
        if criterion not in CRITERIA:
            raise BadInput(f"prune: unknown criterion '{criterion}'; known: {', '.join(sorted(CRITERIA))}")
        if int(round_to) < 1:
            raise BadInput(f"prune: round_to must be >= 1, got {round_to}")
        if not 0.0 < float(max_layer_ratio) < 1.0:
            raise BadInput(f"prune: max_layer_ratio must be in (0, 1), got {max_layer_ratio}")
        self.selection = Selection(ratio, bool(global_ranking), float(max_layer_ratio), int(round_to))
        self.criterion, self.calib, self.seed = criterion, calib, int(seed)
        if attention not in ATTENTION_MODES:
            raise BadInput(f"prune: attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
        self.ignore, self.attention = tuple(ignore or ()), attention
        self.summary: dict = {}

    def _check_calib(self, model: Model) -> dict[str, np.ndarray] | None:
        return None if self.calib is None else check_calibration(self.calib, model.inputs, model.source)

    def __call__(self, model: Model, ctx=None) -> Model:
        calib = self._check_calib(model)
        graph = prepare_graph(model)
        params_before, flops_before = count_params(graph), count_flops(graph)
        analysis = trace_groups(model, graph, self.ignore, self.attention)
        prunable = [g for g in analysis.groups if g.prunable and len(g.channels) > 1]
        pruned: set[int] = set()
        scores: dict[int, np.ndarray] = {}
        if self.selection.ratio > 0 and prunable:
            scorer = score_groups(self.criterion, model, analysis, calib, self.seed)
            scores = scorer.scores
            if self.selection.global_ranking:
                scores = getattr(scorer, "global_scores", scores)
            comparable = bool(getattr(scorer, "comparable", False))
            pruned = select_channels(analysis.groups, scores, self.selection, comparable)
            pruned = repair_selection(analysis, pruned, scores)
            if pruned and hasattr(scorer, "reconstruct"):
                scorer.reconstruct(pruned)
        out = remove_channels(model, analysis, pruned) if pruned else model
        after = prepare_graph(out) if pruned else graph
        channels_before = sum(len(g.channels) for g in prunable)
        self.summary = {
            "pass": "prune",
            "criterion": self.criterion,
            "ratio": self.selection.ratio,
            "global": self.selection.global_ranking,
            "attention": analysis.attention,
            "groups": len(analysis.groups),
            "groups_prunable": len(prunable),
            "groups_pruned": sum(1 for g in prunable if any(int(r) in pruned for r in g.channels)),
            "channels_before": channels_before,
            "channels_after": channels_before - len(pruned),
            "params_before": params_before,
            "params_after": count_params(after),
            "flops_before": flops_before,
            "flops_after": count_flops(after),
        }
        if ctx is not None:
            ctx.log.append(dict(self.summary))
        return out
