"""The artifact report: `report.json` (what was compiled, and what every choice cost and bought) and
`report.html`, the same data as a self-contained page with plots.

The compiler gathers the data (`build_report`): model summary before and after the passes, target and
versions, one row per layer joining the node statistics with the sparsify pass's pattern and the cost
model's kernel choice and measured times, the pruning summary from the pass log, the verification result
and, when calibration data was given, a fidelity-vs-ratio sweep (`ratio_sweep`: each prune/sparsify pass re-run
at fractions of its requested ratio and compared with the dense model on the calibration samples).
`render_html` turns that dict into one HTML file: inline CSS, matplotlib SVG inlined (fixed hash salt, no
date: the same report gives the same bytes), no external resources, so it opens offline.
"""

from __future__ import annotations

import html
import io
import json
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import SparseccError
from .ir import Model
from .stats import model_summary, node_stats

REPORT_HTML = "report.html"
SWEEP_FRACTIONS = (0.5, 0.75, 1.0, 1.25)  # of the requested ratio; the last point shows what more costs
SWEEP_MAX_RATIO = 0.95
SWEEP_MAX_SAMPLES = 256
SWEPT = {"prune": "ratio", "sparsify": "sparsity"}  # pass -> the option a sweep varies
SUMMARY_KEYS = ("params", "nonzero_params", "flops", "nodes", "size_bytes")


# ------------------------------------------------------------------------------------------ data
def _size(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: summary[k] for k in SUMMARY_KEYS}


def layer_rows(model: Model, log: list[dict[str, Any]], codegen: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per node: op, shape, params, FLOPs, weight sparsity, the pattern it was sparsified with, and
    the kernel the cost model chose with the measured dense and sparse times (when it timed the layer)."""
    patterns = {}
    for entry in log:
        if entry.get("pass") == "sparsify":
            patterns.update({name: entry.get("pattern") for name in entry.get("layers", {})})
    decisions = {d["layer"]: d for d in codegen.get("sparse_layers", [])}
    rows = []
    for n in node_stats(model):
        row = n.to_json()
        d = decisions.get(n.name, {})
        row.update({
            "pattern": patterns.get(n.name),
            "kernel": (d.get("kernel") if d.get("chosen") == "sparse" else "dense") if d else None,
            "chosen": d.get("chosen"),
            "dense_us": d.get("dense_us"),
            "sparse_us": d.get("sparse_us"),
            "reason": d.get("reason"),
        })
        rows.append(row)
    return rows


def pruning_summary(log: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The prune pass's own summary (criterion, ratio, groups found / prunable / pruned, channels, params)."""
    entries = [e for e in log if e.get("pass") == "prune"]
    return dict(entries[-1]) if entries else None


def verification_summary(v: dict[str, Any]) -> dict[str, Any]:
    keys = ("status", "reason", "reference", "inputs", "tolerance", "max_rel_error", "max_abs_error")
    return {k: v[k] for k in keys if k in v}


def build_report(model: Model, source: Model, log: list[dict[str, Any]], codegen: dict[str, Any],
                 target: dict[str, Any], verification: dict[str, Any], versions: dict[str, str],
                 sweep: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The report of one artifact. `source` is the model as loaded (before any pass), `model` what was compiled."""
    summary = model_summary(model)
    report = {
        "model": summary,
        "before": _size(model_summary(source)),
        "after": _size(summary),
        "target": target,
        "versions": versions,
        "passes": log,
        "layers": layer_rows(model, log, codegen),
        "pruning": pruning_summary(log),
        "verification": verification_summary(verification),
        "codegen": codegen,
    }
    if sweep:
        report["accuracy_sweep"] = sweep
    return report


# ------------------------------------------------------------------------------------ ratio sweep
def _eval_batches(calib: dict[str, np.ndarray], model: Model) -> list[dict[str, np.ndarray]]:
    """Calibration samples cut into feeds of the model's static batch."""
    batch = model.inputs[0].shape[0] if model.inputs and model.inputs[0].shape else 1
    n = min(len(next(iter(calib.values()))), SWEEP_MAX_SAMPLES)
    return [{k: v[i:i + batch] for k, v in calib.items()} for i in range(0, n - batch + 1, batch)]


def _outputs(model: Model, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    """The first output of `model` under ONNX Runtime for every batch, concatenated (one session for all)."""
    import onnxruntime as ort

    from .errors import BadInput, one_line

    try:
        sess = ort.InferenceSession(model.serialize(), providers=["CPUExecutionProvider"])
        return np.concatenate([sess.run(None, feeds)[0] for feeds in batches])
    except Exception as e:  # ORT raises its own Fail / InvalidArgument types
        raise BadInput(f"{model.source}: ONNX Runtime cannot run the model: {one_line(e)[:300]}") from None


def fidelity(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """How close a transformed model's output stays to the dense model's on the same samples: mean cosine
    similarity per sample, relative max error, and top-1 agreement for [N, classes] outputs."""
    a, b = ref.astype(np.float64), out.astype(np.float64)
    flat_a, flat_b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    norms = np.linalg.norm(flat_a, axis=1) * np.linalg.norm(flat_b, axis=1)
    cosine = np.sum(flat_a * flat_b, axis=1) / np.where(norms > 0, norms, 1.0)
    result = {"cosine": round(float(np.mean(cosine)), 4),
              "rel_error": round(float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-30)), 4)}
    if a.ndim == 2 and a.shape[1] > 1:
        result["top1_agreement"] = round(float(np.mean(np.argmax(a, 1) == np.argmax(b, 1))), 4)
    return result


def _point(ratio: float, requested: bool, model: Model, ref: np.ndarray,
           batches: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    stats = model_summary(model)
    return {"ratio": ratio, "requested": requested, **fidelity(ref, _outputs(model, batches)),
            "params": stats["params"], "nonzero_params": stats["nonzero_params"], "flops": stats["flops"]}


def _sweepable(name: str, options: dict[str, Any]) -> str | None:
    key = SWEPT.get(name)
    if not key or not options.get(key):
        return None
    if name == "sparsify" and re.fullmatch(r"\d+:\d+", str(options.get("pattern", ""))):
        return None  # N:M fixes the sparsity
    return key


def ratio_sweep(model: Model, passes: list[tuple[str, dict[str, Any]]], calib: dict[str, np.ndarray] | None,
                make_pass: Callable[..., Any], compiled: Model | None = None) -> list[dict[str, Any]]:
    """One curve per prune/sparsify pass: that pass re-run at fractions of its requested ratio (the passes
    before it as requested, the ones after it left out), each result compared with `model` (the dense model)
    on the calibration samples. `compiled`, the result of all passes, is reused for the last pass's requested
    point. Empty without calibration data or when no pass has a ratio to vary (e.g. a fixed N:M pattern)."""
    batches = _eval_batches(calib, model) if calib is not None else []
    if not batches:
        return []
    ref = _outputs(model, batches)
    samples = len(ref)
    curves, prefix = [], model
    for index, (name, options) in enumerate(passes):
        key = _sweepable(name, options)
        if key:
            requested = float(options[key])
            points = [_point(0.0, False, prefix, ref, batches)]
            for fraction in SWEEP_FRACTIONS:
                value = round(min(SWEEP_MAX_RATIO, requested * fraction), 4)
                if value <= points[-1]["ratio"]:
                    continue
                last = index == len(passes) - 1 and fraction == 1.0 and compiled is not None
                try:
                    m = compiled if last else make_pass(name, **{**options, key: value})(prefix, None)
                except SparseccError:
                    if fraction == 1.0:
                        raise
                    continue  # a ratio the pass refuses for this model is just not on the curve
                points.append(_point(value, fraction == 1.0, m, ref, batches))
            curves.append({"pass": name, "option": key, "samples": samples,
                           "reference": "dense model (ONNX Runtime) on the calibration samples", "points": points})
        if index < len(passes) - 1:
            prefix = make_pass(name, **options)(prefix, None)
    return curves


# ------------------------------------------------------------------------------------------ plots
def _svg(fig: Any, salt: str) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": f"sparsecc-{salt}", "svg.fonttype": "path"}):
        fig.savefig(buf, format="svg", bbox_inches="tight",
                    metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML declaration and DOCTYPE: the SVG is inlined in HTML


def _figure(n_rows: int) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # no pyplot: the user's global backend is left alone

    fig = Figure(figsize=(7.5, max(1.6, 0.28 * n_rows + 0.9)))
    return fig, fig.subplots()


def sparsity_plot(rows: list[dict[str, Any]]) -> str | None:
    """Horizontal bars: fraction of zero weights per weighted layer."""
    rows = [r for r in rows if r.get("sparsity") is not None]
    if not rows:
        return None
    fig, ax = _figure(len(rows))
    names = [r["name"] for r in rows][::-1]
    values = [r["sparsity"] * 100 for r in rows][::-1]
    ax.barh(names, values, color="#4c72b0")
    ax.set_xlim(0, 100)
    ax.set_xlabel("zero weights (%)")
    ax.set_title("Weight sparsity per layer", loc="left", fontsize=10)
    ax.tick_params(labelsize=8)
    return _svg(fig, "sparsity")


def latency_plot(rows: list[dict[str, Any]]) -> str | None:
    """Paired bars per timed layer: dense time vs the best sparse kernel's time (the chosen one is solid)."""
    rows = [r for r in rows if r.get("dense_us") is not None]
    if not rows:
        return None
    fig, ax = _figure(2 * len(rows))
    y = np.arange(len(rows))[::-1]
    dense = [r["dense_us"] for r in rows]
    sparse = [r["sparse_us"] or 0.0 for r in rows]
    ax.barh(y + 0.2, dense, height=0.4, color="#8c8c8c", label="dense")
    colors = ["#dd8452" if r.get("chosen") == "sparse" else "#f3d2bb" for r in rows]
    ax.barh(y - 0.2, sparse, height=0.4, color=colors, label="sparse kernel (solid: chosen)")
    ax.set_yticks(y, [r["name"] for r in rows])
    ax.set_xlabel("measured time per call (µs)")
    ax.set_title("Layer latency: dense vs sparse kernel", loc="left", fontsize=10)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=8, loc="lower right")
    return _svg(fig, "latency")


def sweep_plot(curve: dict[str, Any]) -> str:
    """Fidelity to the dense model (top-1 agreement, cosine) against the swept ratio; the requested point marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 3.0))
    ax = fig.subplots()
    xs = [p["ratio"] for p in curve["points"]]
    for metric, style in (("top1_agreement", "o-"), ("cosine", "s--")):
        if all(metric in p for p in curve["points"]):
            ax.plot(xs, [p[metric] for p in curve["points"]], style, label=metric.replace("_", " "))
    chosen = [p["ratio"] for p in curve["points"] if p["requested"]]
    for x in chosen:
        ax.axvline(x, color="#555555", linewidth=1.2, linestyle=":", label="requested")
    ax.set_xlabel(f"{curve['pass']} {curve['option']}")
    ax.set_ylabel("vs dense model")
    ax.set_title(f"Fidelity vs {curve['option']} ({curve['samples']} calibration samples)", loc="left", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _svg(fig, f"sweep-{curve['pass']}")


# ------------------------------------------------------------------------------------------- HTML
CSS = """
body { font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2rem auto; max-width: 72rem;
       padding: 0 1rem; color: #222; }
h1 { font-size: 1.5rem; margin-bottom: 0.2rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 13px; }
th, td { border-bottom: 1px solid #e2e2e2; padding: 0.25rem 0.6rem; text-align: right; white-space: nowrap; }
th { background: #f5f5f5; } td:first-child, th:first-child { text-align: left; }
td.text, th.text { text-align: left; }
.passed { color: #1a7f37; font-weight: 600; } .failed { color: #cf222e; font-weight: 600; }
.skipped { color: #9a6700; font-weight: 600; }
figure { margin: 1rem 0; } figure svg { max-width: 100%; height: auto; }
.scroll { overflow-x: auto; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(header: list[str], rows: list[list[Any]], css_id: str, text_cols: tuple[int, ...] = ()) -> str:
    head = "".join(f"<th{' class=text' if i in text_cols else ''}>{_e(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{' class=text' if i in text_cols else ''}>{_e(c)}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<div class="scroll"><table id="{css_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _num(x: Any, fmt: str = ",") -> str:
    return "–" if x is None else format(x, fmt)


def _summary_html(r: dict[str, Any]) -> str:
    b, a = r["before"], r["after"]
    rows = [[label, _num(b[k]), _num(a[k]), f"{a[k] / b[k]:.3f}" if b[k] else "–"]
            for label, k in (("parameters", "params"), ("nonzero parameters", "nonzero_params"),
                             ("FLOPs", "flops"), ("nodes", "nodes"), ("ONNX size (bytes)", "size_bytes"))]
    return _table(["", "before passes", "compiled", "ratio"], rows, "summary")


def _verification_html(v: dict[str, Any]) -> str:
    status = v.get("status", "none")
    if status != "passed" and status != "failed":
        reason = f" ({v['reason']})" if v.get("reason") else ""
        return f'<p>Verification: <span class="skipped">{_e(status)}</span>{_e(reason)}</p>'
    return (f'<p>Verification vs {_e(v.get("reference"))} on {_e(v.get("inputs"))}: <span class="{status}">{status}'
            f'</span> — max relative error {v["max_rel_error"]:.3e}, max absolute error {v["max_abs_error"]:.3e} '
            f'(tolerance {v["tolerance"]:g})</p>')


def _layers_html(rows: list[dict[str, Any]]) -> str:
    header = ["layer", "op", "output shape", "params", "MFLOPs", "sparsity", "pattern", "kernel", "dense µs",
              "sparse µs", "chosen"]
    body = [[r["name"], r["op"], "×".join(map(str, r["output_shape"])), f"{r['params']:,}",
             f"{r['flops'] / 1e6:.3f}", "–" if r["sparsity"] is None else f"{r['sparsity']:.1%}",
             r["pattern"] or "–", r["kernel"] or "–", _num(r["dense_us"], ".2f"), _num(r["sparse_us"], ".2f"),
             r["chosen"] or "–"] for r in rows]
    return _table(header, body, "layers", text_cols=(0, 1, 6, 7, 10))


def _pruning_html(p: dict[str, Any] | None) -> str:
    if not p:
        return "<p>No structured pruning.</p>"
    keys = ("criterion", "ratio", "global", "groups", "groups_prunable", "groups_pruned", "channels_before",
            "channels_after", "params_before", "params_after", "flops_before", "flops_after")
    rows = [[k.replace("_", " "), f"{p[k]:,}" if isinstance(p[k], int) and not isinstance(p[k], bool) else p[k]]
            for k in keys if k in p]
    return _table(["", "value"], rows, "pruning")


def _figure_html(svg: str | None, caption: str) -> str:
    return f'<figure class="plot">{svg}<figcaption>{_e(caption)}</figcaption></figure>' if svg else ""


def render_html(report: dict[str, Any], title: str = "sparsecc report") -> str:
    """The report as one self-contained HTML page (inline CSS and SVG, no scripts, no external resources)."""
    rows = report["layers"]
    target = report["target"]
    tvm_target = json.dumps(target.get("tvm", ""), sort_keys=True)
    versions = ", ".join(f"{k} {v}" for k, v in sorted(report.get("versions", {}).items()))
    sections = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">target <b>{_e(target.get("name"))}</b> ({_e(tvm_target)}) · {_e(versions)}</p>',
        _verification_html(report.get("verification", {})),
        "<h2>Model</h2>", _summary_html(report),
        "<h2>Layers</h2>", _layers_html(rows),
        _figure_html(sparsity_plot(rows), "Fraction of exact zeros in each layer's weight."),
        _figure_html(latency_plot(rows), "Per-call time of each layer the cost model measured, "
                                         "compiled alone: dense op vs the fastest sparse kernel."),
        "<h2>Pruning</h2>", _pruning_html(report.get("pruning")),
    ]
    for curve in report.get("accuracy_sweep", []):
        sections += [f"<h2>Fidelity vs {_e(curve['option'])}</h2>",
                     _figure_html(sweep_plot(curve), f"The passes re-run at each {curve['option']}, compared with "
                                                     f"the {curve['reference']}; dotted line: requested.")]
    sections.append("<h2>Passes</h2>" + _table(
        ["pass", "summary"], [[e.get("pass", "?"), ", ".join(f"{k}={v}" for k, v in sorted(e.items())
                                                           if k not in ("pass", "layers"))[:200]]
                              for e in report.get("passes", [])], "passes", text_cols=(1,)))
    body = "\n".join(s for s in sections if s)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")
