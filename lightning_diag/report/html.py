"""``diagnosis.html``: a run's story on one self-contained page (inline SVG and CSS, no script, no network).

:func:`render` turns a report (the ``diagnosis.json`` document) and the series the callbacks collected
(``report_series()``, or :func:`lightning_diag.report.posthoc.diagnose_run`'s) into HTML; :func:`write_html` writes it
next to ``diagnosis.json``. What the page shows, top to bottom:

* the run's status and counts, then the primary finding (the report's ``primary`` when it names one; otherwise
  the findings in severity order) and every finding with its evidence, advice and the findings it was caused by;
* the learning curves (``#learning-curves``) with the best validation value (the one EarlyStop restored when it
  restored one), the overfitting onset, the stop, and the run's events (skipped steps, rollbacks, spikes) marked;
* the learning-rate schedule (``#lr-schedule``) with skipped steps and NaNGuard's LR back-offs marked;
* the per-layer gradient-norm heatmap (``#grad-norms``);
* the data-wait vs compute split of a training step (``#data-wait``, SpeedMonitor);
* the memory curve (``#memory``, MemoryMonitor): what survives a step and the peak, the capacity, the projected
  exhaustion step and the out-of-memory error.

Epochs are counted as Lightning's progress bar counts them (0 is the first epoch); a point of the learning curve
at ``e`` is the evaluation at the end of epoch ``e``. Nothing here imports torch or matplotlib.
"""

from __future__ import annotations

import html
import itertools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_diag.findings import caused_by, display_order, where_seen
from lightning_diag.report.marks import best_point, event_markers, lr_backoffs, stopped_x, where_x

__all__ = ["HTML_FILENAME", "render", "write_html"]

HTML_FILENAME = "diagnosis.html"

_EVENT_COLOURS = {"skip": "#b45309", "rollback": "#7c3aed", "spike": "#dc2626", "raise": "#111827"}
_VIRIDIS = ("#440154", "#3b528b", "#21918c", "#5ec962", "#fde725")

_W, _H = 640, 300  # chart size in SVG units (scaled to the column width)
_PAD_L, _PAD_R, _PAD_T, _PAD_B = 62, 16, 28, 44


def write_html(
    report: Mapping[str, Any], series: Mapping[str, Any], directory: str | os.PathLike[str]
) -> str:
    """Write ``diagnosis.html`` into ``directory`` (created if needed); return its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(os.fspath(directory), HTML_FILENAME)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(render(report, series))
    os.replace(tmp, path)
    return path


# -- page ---------------------------------------------------------------------------------------------------
def render(report: Mapping[str, Any], series: Mapping[str, Any]) -> str:
    """The whole page as one string."""
    summary = report["summary"]
    counts = summary["counts"]
    ordered = display_order(report)
    charts = [
        _learning_curves_chart(series, report),
        _lr_chart(series, report),
        _grad_norm_heatmap(series.get("grad_norms") or {}),
        _data_wait_chart(series.get("speed") or {}, report),
        _memory_chart(series.get("memory") or {}),
    ]
    charts_html = "\n".join(c for c in charts if c)
    healthy = bool(summary.get("healthy"))
    status = (
        f"Run {_e(summary['status'])} at step {summary['global_step']} (epoch {summary['epoch']}): "
        f"{counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info."
    )
    findings_html = (
        "\n".join(_finding_card(report, f, i) for i, f in enumerate(ordered))
        if ordered
        else '<p class="none">No findings: nothing looked wrong.</p>'
    )
    error = (
        f'<p class="stopped">Stopped by: <code>{_e(summary["error"])}</code></p>'
        if "error" in summary
        else ""
    )
    logs = f'<p class="meta">Logs: <code>{_e(summary["logs"])}</code></p>' if summary.get("logs") else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lightning_diag diagnosis: {_e(summary["status"])}, {counts["error"]} error(s), {counts["warning"]} warning(s)</title>
<style>{_CSS}</style>
</head>
<body>
<header class="{"healthy" if healthy else "unhealthy"}">
<h1>lightning_diag diagnosis</h1>
<p id="status">{status}</p>
{error}{logs}
</header>
<main>
<section id="findings">
<h2>Findings</h2>
{findings_html}
</section>
<section id="charts">
<h2>The run</h2>
{charts_html or '<p class="none">No series were recorded (add OverfitDetector, WarmupCosine, GradNormMonitor or SpeedMonitor).</p>'}
</section>
</main>
<footer>Epochs are counted as Lightning's progress bar counts them (the first is epoch 0). Written by lightning_diag; the same data is in diagnosis.json.</footer>
</body>
</html>
"""


def _finding_card(report: Mapping[str, Any], f: Mapping[str, Any], index: int) -> str:
    primary = report.get("primary")
    is_primary = primary is not None and f.get("id") == primary
    anchor = _anchor(f, index)
    evidence = f.get("evidence") or {}
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt_value(v))}</td></tr>" for k, v in evidence.items())
    advice = "".join(f"<li>{_e(a)}</li>" for a in f.get("advice") or [])
    causes = caused_by(report, f)
    cause_html = (
        '<p class="caused-by">Caused by: '
        + ", ".join(
            f'<a href="#{_anchor(c, -1)}" class="cause" data-code="{_e(c["code"])}">{_e(c["code"])}</a>'
            for c in causes
        )
        + "</p>"
        if causes
        else ""
    )
    label = '<span class="primary-label">primary finding</span>' if is_primary else ""
    return f"""<article class="finding {_e(f["severity"])}{" primary" if is_primary else ""}" id="{anchor}" data-code="{_e(f["code"])}" data-severity="{_e(f["severity"])}">
<h3><span class="badge {_e(f["severity"])}">{_e(f["severity"].upper())}</span> <code>{_e(f["code"])}</code> {label}</h3>
<p class="where">{_e(where_seen(f))} &middot; {_e(f.get("source", ""))}</p>
<p class="message">{_e(f["message"])}</p>
{cause_html}
{f'<h4>What to try</h4><ul class="advice">{advice}</ul>' if advice else ""}
{f'<details class="evidence"><summary>Evidence</summary><table>{rows}</table></details>' if rows else ""}
</article>"""


def _anchor(f: Mapping[str, Any], index: int) -> str:
    ident = f.get("id")
    if ident is not None:
        return "finding-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in str(ident))
    return f"finding-{index}"


# -- events -------------------------------------------------------------------------------------------------


# -- charts -------------------------------------------------------------------------------------------------
def _learning_curves_chart(series: Mapping[str, Any], report: Mapping[str, Any]) -> str:
    curve = series.get("curve") or []
    if not curve:
        return ""
    unit = str(series.get("unit", "epoch"))
    shift = 1.0 if unit == "epoch" else 0.0  # x counts epochs completed; the axis shows the epoch index
    xs = [float(p[0]) - shift for p in curve]
    train = [_num(p[1]) for p in curve]
    val = [_num(p[2]) for p in curve]
    findings = report.get("findings", [])
    best = best_point(series)
    onset = next(
        (
            f["evidence"].get("onset_x")
            for f in findings
            if f.get("code") == "overfitting" and f.get("severity") == "warning"
        ),
        None,
    )
    stop = stopped_x(series)
    steps = [int(s) for s in series.get("curve_steps") or []]
    events = [
        (kind, _step_to_x(first, steps, xs, unit), _step_to_x(last, steps, xs, unit), count, code)
        for kind, first, last, count, code in event_markers(findings)
    ]
    values = [v for v in train + val if v is not None]
    chart = _Chart(
        "learning-curves",
        "Learning curves",
        xs + [e[1] for e in events] + [e[2] for e in events],
        values,
        xlabel="epoch (a point at e: the evaluation at the end of epoch e)" if unit == "epoch" else "step",
        ylabel="loss",
    )
    chart.line(xs, train, "train", "train loss")
    if any(v is not None for v in val):
        chart.line(xs, val, "val", "validation loss")
    if best is not None:
        bx, bv, restored = best
        label = f"best val {bv:.6g} ({where_x(bx, unit, series)}{', restored' if restored else ''})"
        chart.point(bx - shift, bv, "best", label)
    if onset is not None:
        chart.vline(
            float(onset) - shift, "onset", f"overfitting onset ({where_x(float(onset), unit, series)})"
        )
    if stop is not None:
        chart.vline(stop - shift, "stop", f"stopped ({where_x(stop, unit, series)})")
    chart.events(events)
    return chart.svg()


def _step_to_x(step: int, steps: Sequence[int], xs: Sequence[float], unit: str) -> float:
    """A global step on the curve's axis (linear between evaluations; the axis is steps when unit is step)."""
    if unit != "epoch":
        return float(step)
    if not steps or len(steps) != len(xs):
        return xs[0] if xs else 0.0
    anchors = [(0, -1.0), *zip(steps, xs, strict=True)]
    for (s0, x0), (s1, x1) in itertools.pairwise(anchors):
        if step <= s1:
            return x0 + (x1 - x0) * ((step - s0) / (s1 - s0) if s1 > s0 else 1.0)
    (sa, xa), (sb, xb) = anchors[-2], anchors[-1]
    rate = (xb - xa) / (sb - sa) if sb > sa else 0.0
    return xb + rate * (step - sb)


def _lr_chart(series: Mapping[str, Any], report: Mapping[str, Any]) -> str:
    points = series.get("lr") or []
    if not points:
        return ""
    xs = [float(p[0]) for p in points]
    ys = [_num(p[1]) for p in points]
    events = [
        (kind, float(first), float(last), count, code)
        for kind, first, last, count, code in event_markers(report.get("findings", []))
        if kind in ("rollback", "skip")
    ]
    chart = _Chart(
        "lr-schedule",
        "Learning-rate schedule (param group 0)",
        xs + [e[1] for e in events],
        [v for v in ys if v is not None],
        xlabel="optimizer step",
        ylabel="learning rate",
        log_y=False,
    )
    chart.line(xs, ys, "lr", "learning rate")
    backoffs = lr_backoffs(points, series.get("nan_guard") or {})
    for step, before, after in backoffs:
        chart.vline(
            step,
            "backoff",
            f"LR back-off at step {step:g}: {before:.3g} -> {after:.3g} (NaNGuard rollback)",
            legend=f"LR back-off after a NaNGuard rollback ({len(backoffs)})",
        )
    chart.events(events)
    return chart.svg()


def _grad_norm_heatmap(norms: Mapping[str, Sequence[Sequence[float]]]) -> str:
    if not norms:
        return ""
    names = list(norms)
    steps = sorted({int(s) for values in norms.values() for s, _ in values})
    column = {s: i for i, s in enumerate(steps)}
    grid: list[list[float | None]] = [[None] * len(steps) for _ in names]
    for row, name in enumerate(names):
        for step, value in norms[name]:
            if value is not None and value > 0 and math.isfinite(value):
                grid[row][column[int(step)]] = math.log10(value)
    finite = [v for row in grid for v in row if v is not None]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    label_w = min(220, 8 + 7 * max(len(n) for n in names))
    top, bottom, right = _PAD_T, 40, 70
    row_h = max(10.0, min(26.0, 320 / len(names)))
    height = top + row_h * len(names) + bottom
    cell_w = (_W - label_w - right) / max(len(steps), 1)
    parts = [
        f'<svg id="grad-norms" class="plot heatmap" viewBox="0 0 {_W} {height:.0f}" role="img" '
        f'aria-label="Gradient norm per layer">',
        f'<text class="title" x="{_W / 2}" y="16">Gradient norm per layer (log10)</text>',
    ]
    for r, name in enumerate(names):
        y = top + r * row_h
        parts.append(
            f'<text class="ylabel-row" x="{label_w - 6}" y="{y + row_h / 2 + 4:.1f}">{_e(name)}</text>'
        )
        for c, cell in enumerate(grid[r]):
            x = label_w + c * cell_w
            fill = "#e5e7eb" if cell is None else _viridis((cell - lo) / (hi - lo))
            shown = "not finite / 0" if cell is None else f"{10**cell:.3g}"
            parts.append(
                f'<rect class="cell" x="{x:.2f}" y="{y:.2f}" width="{cell_w + 0.3:.2f}" height="{row_h:.2f}" '
                f'fill="{fill}"><title>{_e(name)} at step {steps[c]}: {shown}</title></rect>'
            )
    for i in sorted({round(k * (len(steps) - 1) / 5) for k in range(6)}) if steps else []:
        x = label_w + (i + 0.5) * cell_w
        parts.append(
            f'<text class="tick" x="{x:.1f}" y="{top + row_h * len(names) + 14:.1f}">{steps[i]}</text>'
        )
    parts.append(
        f'<text class="axis-label" x="{(label_w + _W - right) / 2:.0f}" y="{height - 6:.0f}">optimizer step</text>'
    )
    # colour scale
    scale_x, scale_h = _W - right + 14, row_h * len(names)
    for k in range(20):
        parts.append(
            f'<rect x="{scale_x}" y="{top + scale_h * (1 - (k + 1) / 20):.2f}" width="12" height="{scale_h / 20 + 0.3:.2f}" '
            f'fill="{_viridis((k + 0.5) / 20)}"/>'
        )
    parts.append(f'<text class="tick left" x="{scale_x + 16}" y="{top + 8}">{hi:.1f}</text>')
    parts.append(f'<text class="tick left" x="{scale_x + 16}" y="{top + scale_h}">{lo:.1f}</text>')
    parts.append("</svg>")
    return _figure(
        "grad-norms",
        "".join(parts),
        "A dark row is a layer whose gradients vanish; a bright column a step whose gradients spiked.",
    )


def _data_wait_chart(speed: Mapping[str, Any], report: Mapping[str, Any]) -> str:
    wait, compute = speed.get("data_wait_ms"), speed.get("compute_ms")
    if wait is None or compute is None:
        bound = next((f for f in report.get("findings", []) if f.get("code") == "dataloader_bound"), None)
        evidence = (bound or {}).get("evidence") or {}
        wait, compute = evidence.get("data_wait_ms"), evidence.get("compute_ms")
    if wait is None or compute is None:
        return ""
    wait, compute = float(wait), float(compute)
    total = wait + compute
    if not total > 0:
        return ""
    share = wait / total
    left, width, y, h = 20, _W - 40, 40, 36
    ww = width * share
    steps = speed.get("steps")
    over = f" over the last {steps} steps" if steps else ""
    svg = (
        f'<svg id="data-wait" class="plot" viewBox="0 0 {_W} 120" role="img" aria-label="Data wait vs compute">'
        f'<text class="title" x="{_W / 2}" y="16">Where a training step\'s time goes{over}</text>'
        f'<rect class="wait" x="{left}" y="{y}" width="{ww:.1f}" height="{h}"><title>waiting for data: {wait:.3g} ms per step</title></rect>'
        f'<rect class="compute" x="{left + ww:.1f}" y="{y}" width="{width - ww:.1f}" height="{h}"><title>computing: {compute:.3g} ms per step</title></rect>'
        f'<text class="legend" x="{left}" y="{y + h + 22}">waiting for data {share:.0%} ({wait:.3g} ms/step)</text>'
        f'<text class="legend end" x="{left + width}" y="{y + h + 22}">computing {1 - share:.0%} ({compute:.3g} ms/step)</text>'
        "</svg>"
    )
    return _figure(
        "data-wait", svg, "A step that waits for data more than it computes is input-bound (SpeedMonitor)."
    )


def _memory_chart(memory: Mapping[str, Any]) -> str:
    """MemoryMonitor's curve: what survives a step and the peak per logging step, the capacity, the projected
    exhaustion (a dashed line to the step where the peak reaches the capacity) and the out-of-memory error.
    """
    steps = [float(s) for s in memory.get("steps") or []]
    oom = memory.get("oom")
    if not steps and not oom:
        return ""
    baseline = [_num(v) for v in memory.get("baseline_mib") or []]
    peak = [_num(v) for v in memory.get("peak_mib") or []]
    capacity = _num(memory.get("capacity_mib"))
    projection = memory.get("projection") or []
    last = steps[-1] if steps else 0.0
    # the projection is drawn up to 4x the run's length; further out it is named, not drawn
    shown = [p for p in projection if float(p[0]) <= max(4 * last, 1.0)] if len(projection) == 2 else []
    xs = steps + [float(p[0]) for p in shown] + ([float(oom[0])] if oom else [])
    ys = [v for v in baseline + peak if v is not None] + [float(p[1]) for p in shown]
    if oom:
        ys.append(float(oom[1]))
    if capacity is not None and (shown or max(ys or [0.0]) > 0.5 * capacity):
        ys.append(capacity)
    what = "GPU memory" if memory.get("device") == "cuda" else "process memory (RSS)"
    chart = _Chart("memory", f"Memory ({what})", xs, ys, xlabel="optimizer step", ylabel="MiB", log_y=False)
    if steps:
        chart.line(steps, baseline, "baseline", "what survives a step")
        chart.line(steps, peak, "peak", "peak since the previous point")
    if capacity is not None and capacity in ys:
        chart.line([chart.x0, chart.x1], [capacity, capacity], "capacity", f"capacity ({capacity:,.0f} MiB)")
    exhaustion = memory.get("exhaustion_step")
    if len(shown) == 2:
        (x0, y0), (x1, y1) = shown
        chart.line([float(x0), float(x1)], [float(y0), float(y1)], "projection", "projected growth")
        chart.point(float(x1), float(y1), "exhaustion", f"projected exhaustion at step {int(x1)}")
    elif exhaustion is not None:
        chart.legend.append(
            ("exhaustion", f"projected exhaustion at step {int(exhaustion)} (beyond the chart)", "circle")
        )
    if oom:
        chart.vline(float(oom[0]), "oom", f"out of memory at step {int(oom[0])}")
    return chart.svg()


class _Chart:
    """A small line chart in SVG: lines, a marked point, vertical lines and event markers, with a legend."""

    def __init__(
        self,
        ident: str,
        title: str,
        xs: Sequence[float],
        ys: Sequence[float],
        *,
        xlabel: str,
        ylabel: str,
        log_y: bool | None = None,
    ) -> None:
        self.ident, self.title, self.xlabel, self.ylabel = ident, title, xlabel, ylabel
        finite_x = [x for x in xs if math.isfinite(x)] or [0.0, 1.0]
        self.x0, self.x1 = min(finite_x), max(finite_x)
        if self.x1 <= self.x0:
            self.x0, self.x1 = self.x0 - 0.5, self.x1 + 0.5
        finite_y = [y for y in ys if math.isfinite(y)] or [0.0, 1.0]
        positive = all(y > 0 for y in finite_y)
        self.log = (
            positive and max(finite_y) / min(finite_y) > 20 if log_y is None else bool(log_y and positive)
        )
        lo, hi = min(finite_y), max(finite_y)
        if self.log:
            lo, hi = math.log10(lo), math.log10(hi)
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        margin = (hi - lo) * 0.05
        self.y0, self.y1 = lo - margin, hi + margin
        self.body: list[str] = []
        self.legend: list[tuple[str, str, str]] = []  # (css class, label, shape)

    def px(self, x: float) -> float:
        return _PAD_L + (x - self.x0) / (self.x1 - self.x0) * (_W - _PAD_L - _PAD_R)

    def py(self, y: float) -> float:
        v = math.log10(y) if self.log else y
        return _H - _PAD_B - (v - self.y0) / (self.y1 - self.y0) * (_H - _PAD_T - _PAD_B)

    def line(self, xs: Sequence[float], ys: Sequence[float | None], css: str, label: str) -> None:
        runs: list[list[str]] = [[]]
        for x, y in zip(xs, ys, strict=True):
            if y is None or (self.log and y <= 0):
                runs.append([])
                continue
            runs[-1].append(f"{self.px(x):.1f},{self.py(y):.1f}")
        for run in runs:
            if run:
                self.body.append(
                    f'<polyline class="series {css}" points="{" ".join(run)}"><title>{_e(label)}</title></polyline>'
                )
                if len(run) <= 60:
                    self.body.extend(
                        f'<circle class="dot {css}" cx="{p.split(",")[0]}" cy="{p.split(",")[1]}" r="2.2"/>'
                        for p in run
                    )
        self.legend.append((css, label, "line"))

    def point(self, x: float, y: float, css: str, label: str) -> None:
        self.body.append(
            f'<circle class="marker {css}" cx="{self.px(x):.1f}" cy="{self.py(y):.1f}" r="7"><title>{_e(label)}</title></circle>'
        )
        self.legend.append((css, label, "circle"))

    def vline(self, x: float, css: str, label: str, legend: str | None = None) -> None:
        px = self.px(x)
        self.body.append(
            f'<line class="marker {css}" x1="{px:.1f}" x2="{px:.1f}" y1="{_PAD_T}" y2="{_H - _PAD_B}"><title>{_e(label)}</title></line>'
        )
        if not any(c == css for c, _, _ in self.legend):
            self.legend.append((css, legend or label, "vline"))

    def events(self, events: Sequence[tuple[str, float, float, int, str]]) -> None:
        seen: dict[str, int] = {}
        base = _H - _PAD_B
        for kind, first, last, count, code in events:
            colour = _EVENT_COLOURS.get(kind, "#374151")
            x0, x1 = self.px(first), self.px(last)
            title = f"{kind}: {code}, {count}x" + (
                f", first at {first:g}, last at {last:g}" if count > 1 else f" at {first:g}"
            )
            self.body.append(
                f'<g class="event" data-kind="{_e(kind)}" data-code="{_e(code)}"><title>{_e(title)}</title>'
            )
            if x1 - x0 > 2:
                self.body.append(
                    f'<rect x="{x0:.1f}" y="{base - 5}" width="{x1 - x0:.1f}" height="5" fill="{colour}" opacity="0.35"/>'
                )
            for x in {x0, x1}:
                self.body.append(
                    f'<path d="M{x:.1f},{base - 12} l-5,-9 h10 z" fill="{colour}"/>'
                    f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{_PAD_T}" y2="{base}" stroke="{colour}" stroke-width="1" stroke-dasharray="2,3" opacity="0.6"/>'
                )
            self.body.append("</g>")
            seen[kind] = seen.get(kind, 0) + count
        for kind, count in seen.items():
            label = {
                "skip": "skipped steps",
                "rollback": "rollbacks (LR back-off)",
                "spike": "spikes",
                "raise": "stopped by an error",
            }[kind]
            self.legend.append(
                (f"event-{kind}", f"{label} ({count})", "event:" + _EVENT_COLOURS.get(kind, "#374151"))
            )

    def svg(self) -> str:
        left, right, top, bottom = _PAD_L, _W - _PAD_R, _PAD_T, _H - _PAD_B
        parts = [
            f'<svg id="{self.ident}" class="plot" viewBox="0 0 {_W} {_H}" role="img" aria-label="{_e(self.title)}">',
            f'<text class="title" x="{_W / 2}" y="16">{_e(self.title)}</text>',
            f'<rect class="frame" x="{left}" y="{top}" width="{right - left}" height="{bottom - top}"/>',
        ]
        for tick in _ticks(self.x0, self.x1):
            x = self.px(tick)
            parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{bottom}"/>')
            parts.append(f'<text class="tick" x="{x:.1f}" y="{bottom + 14}">{tick:g}</text>')
        for tick in _log_ticks(self.y0, self.y1) if self.log else _ticks(self.y0, self.y1):
            value = 10**tick if self.log else tick
            y = _H - _PAD_B - (tick - self.y0) / (self.y1 - self.y0) * (_H - _PAD_T - _PAD_B)
            parts.append(f'<line class="grid" x1="{left}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}"/>')
            parts.append(f'<text class="tick left-axis" x="{left - 4}" y="{y + 4:.1f}">{value:.3g}</text>')
        parts.append(
            f'<text class="axis-label" x="{(left + right) / 2}" y="{_H - 8}">{_e(self.xlabel)}</text>'
        )
        ylab = self.ylabel + (" (log scale)" if self.log else "")
        parts.append(
            f'<text class="axis-label" transform="translate(14 {(top + bottom) / 2}) rotate(-90)">{_e(ylab)}</text>'
        )
        parts.extend(self.body)
        parts.append("</svg>")
        legend = "".join(
            f'<li class="legend-item {css}">{_swatch(css, shape)}{_e(label)}</li>'
            for css, label, shape in self.legend
        )
        return _figure(self.ident, "".join(parts), "", legend)


def _figure(ident: str, svg: str, caption: str, legend: str = "") -> str:
    legend_html = f'<ul class="legend">{legend}</ul>' if legend else ""
    caption_html = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure class="chart" data-plot="{ident}">{svg}{legend_html}{caption_html}</figure>'


def _swatch(css: str, shape: str) -> str:
    if shape.startswith("event:"):
        colour = shape.split(":", 1)[1]
        return f'<svg class="swatch" viewBox="0 0 14 14"><path d="M2,2 h10 l-5,9 z" fill="{colour}"/></svg>'
    if shape == "circle":
        return f'<svg class="swatch" viewBox="0 0 14 14"><circle class="marker {css} key" cx="7" cy="7" r="5"/></svg>'
    if shape == "vline":
        return f'<svg class="swatch" viewBox="0 0 14 14"><line class="marker {css} key" x1="7" x2="7" y1="0" y2="14"/></svg>'
    return f'<svg class="swatch" viewBox="0 0 14 14"><line class="series {css} key" x1="0" x2="14" y1="7" y2="7"/></svg>'


def _ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    span = hi - lo
    if not span > 0 or not math.isfinite(span):
        return [lo]
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step) * step
    out: list[float] = []
    value = first
    while value <= hi + 1e-12 * abs(hi) and len(out) < 20:
        out.append(round(value, 12))
        value += step
    return out


def _log_ticks(lo: float, hi: float) -> list[float]:
    """log10 positions of round values (1, 2, 5 x 10^k; decades only when there are enough of them)."""
    decades = [float(k) for k in range(math.floor(lo), math.ceil(hi) + 1) if lo <= k <= hi]
    if len(decades) >= 3:
        every = max(1, math.ceil(len(decades) / 8))
        return decades[::every]
    values = [m * 10.0**k for k in range(math.floor(lo) - 1, math.ceil(hi) + 1) for m in (1, 2, 5)]
    return [math.log10(v) for v in values if lo <= math.log10(v) <= hi]


def _viridis(t: float) -> str:
    t = min(max(t, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    frac = t - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    rgb = [round(int(a[k : k + 2], 16) * (1 - frac) + int(b[k : k + 2], 16) * frac) for k in (1, 3, 5)]
    return "#" + "".join(f"{c:02x}" for c in rgb)


def _num(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


_CSS = """
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#111827;background:#f9fafb}
header{padding:14px 24px;border-bottom:4px solid #dc2626;background:#fff}
header.healthy{border-bottom-color:#16a34a}
h1{margin:0;font-size:22px}
#status{margin:4px 0 0;font-size:16px}
.meta,.stopped{margin:4px 0 0;color:#4b5563}
main{display:grid;grid-template-columns:minmax(360px,1fr) minmax(480px,1.25fr);gap:20px;padding:16px 24px;max-width:1500px}
@media (max-width:1000px){main{grid-template-columns:1fr}}
h2{font-size:18px;margin:4px 0 10px}
.finding{background:#fff;border:1px solid #e5e7eb;border-left:6px solid #9ca3af;border-radius:6px;padding:10px 14px;margin:0 0 12px}
.finding.error{border-left-color:#dc2626}.finding.warning{border-left-color:#d97706}.finding.info{border-left-color:#2563eb}
.finding.primary{box-shadow:0 0 0 2px #111827}
.finding h3{margin:0;font-size:16px}
.primary-label{font-size:12px;background:#111827;color:#fff;border-radius:4px;padding:1px 6px;margin-left:6px}
.badge{font-size:12px;border-radius:4px;padding:1px 6px;color:#fff;background:#6b7280}
.badge.error{background:#dc2626}.badge.warning{background:#d97706}.badge.info{background:#2563eb}
.where{margin:2px 0;color:#6b7280;font-size:13px}
.message{margin:6px 0}
.finding h4{margin:8px 0 2px;font-size:14px}
.advice{margin:0;padding-left:20px}
.evidence table{border-collapse:collapse;font-size:13px;margin-top:4px}
.evidence th{text-align:left;font-weight:600;padding:1px 10px 1px 0;color:#374151}
.evidence td{font-family:ui-monospace,monospace;word-break:break-all}
.caused-by{margin:4px 0;font-size:14px}
.none{color:#4b5563}
.chart{background:#fff;border:1px solid #e5e7eb;border-radius:6px;margin:0 0 14px;padding:8px}
.chart svg.plot{width:100%;height:auto;display:block}
figcaption{font-size:13px;color:#4b5563;margin-top:4px}
.legend{list-style:none;margin:4px 0 0;padding:0;display:flex;flex-wrap:wrap;gap:4px 14px;font-size:13px}
.swatch{width:14px;height:14px;vertical-align:-2px;margin-right:4px}
svg text{font-size:11px;fill:#374151}
svg text.title{font-size:14px;font-weight:600;text-anchor:middle;fill:#111827}
svg text.tick{text-anchor:middle}svg text.tick.left-axis{text-anchor:end}svg text.tick.left{text-anchor:start}
svg text.axis-label{font-size:12px;text-anchor:middle}
svg text.ylabel-row{text-anchor:end;font-family:ui-monospace,monospace}
svg text.legend{font-size:13px}svg text.legend.end{text-anchor:end}
.frame{fill:none;stroke:#9ca3af}
.grid{stroke:#e5e7eb}
.series{fill:none;stroke-width:2}
.series.train{stroke:#2563eb}.series.val{stroke:#ea580c}.series.lr{stroke:#059669}
.dot{stroke:none}.dot.train{fill:#2563eb}.dot.val{fill:#ea580c}.dot.lr{fill:#059669}
.marker.best{fill:none;stroke:#16a34a;stroke-width:3}
.marker.onset{stroke:#d97706;stroke-width:2;stroke-dasharray:6,4}
.marker.stop{stroke:#dc2626;stroke-width:2;stroke-dasharray:2,3}
.marker.backoff{stroke:#7c3aed;stroke-width:2;stroke-dasharray:5,3}
rect.wait{fill:#d97706}rect.compute{fill:#2563eb}
.series.baseline{stroke:#2563eb}.series.peak{stroke:#9333ea;stroke-width:1.5}.dot.baseline{fill:#2563eb}.dot.peak{fill:#9333ea}
.series.capacity{stroke:#111827;stroke-dasharray:8,4}.series.projection{stroke:#dc2626;stroke-dasharray:5,4}
.dot.capacity,.dot.projection{display:none}
.marker.exhaustion{fill:none;stroke:#dc2626;stroke-width:3}.marker.oom{stroke:#dc2626;stroke-width:3}
footer{padding:8px 24px 20px;color:#6b7280;font-size:13px}
code{font-family:ui-monospace,SFMono-Regular,Menlo,monospace}
"""
