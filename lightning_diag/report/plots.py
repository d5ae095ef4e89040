"""End-of-run plots: learning curves, the learning-rate schedule, and per-layer gradient norms as a heatmap.

:func:`build_figures` turns the series the callbacks collected (``report_series()``) and the findings into
matplotlib figures; :func:`save_figures` writes them as PNG next to ``diagnosis.json``. Without matplotlib (the
``plots`` extra) both return nothing and the report stays text-only. Figures are built with
``matplotlib.figure.Figure`` (no pyplot, no global state, no display needed).

* ``learning_curves``: training and validation loss per evaluation, against the epoch index as Lightning's
  progress bar counts it (a point at ``e`` is the evaluation at the end of epoch ``e``); the best validation point
  (the one EarlyStop restored, when it restored one), the overfitting onset and the point where training stopped
  (EarlyStop or OverfitDetector) are marked and labelled with the same epochs and values as the text report.
* ``lr_schedule``: the rate of param group 0 at the logging steps (WarmupCosine).
* ``grad_norms``: log10 of each layer's gradient norm over the logging steps (GradNormMonitor): a vanishing layer
  is a dark row, an exploding step a bright column.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["available", "build_figures", "save_figures"]


def available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def build_figures(series: Mapping[str, Any], findings: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """``{name: Figure}`` for whatever the series hold (empty without matplotlib or without data)."""
    if not available():
        return {}
    figures: dict[str, Any] = {}
    curve = series.get("curve")
    if curve:
        figures["learning_curves"] = _learning_curves(curve, series, findings)
    if series.get("lr"):
        figures["lr_schedule"] = _lr_schedule(series["lr"])
    norms = series.get("grad_norms")
    if norms:
        figures["grad_norms"] = _grad_norm_heatmap(norms)
    return figures


def save_figures(figures: Mapping[str, Any], directory: str | os.PathLike[str]) -> list[str]:
    """Write each figure as ``<name>.png`` into ``directory``; return the file names."""
    if not figures:
        return []
    os.makedirs(directory, exist_ok=True)
    names = []
    for name, figure in figures.items():
        filename = f"{name}.png"
        figure.savefig(os.path.join(os.fspath(directory), filename), dpi=110, bbox_inches="tight")
        names.append(filename)
    return names


def _figure(width: float = 7.0, height: float = 4.0) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) if v is not None and math.isfinite(float(v)) else math.nan for v in values]


def _learning_curves(
    curve: Sequence[Sequence[Any]], series: Mapping[str, Any], findings: Sequence[Mapping[str, Any]]
) -> Any:
    from lightning_diag.report.marks import best_point, stopped_x, where_x

    fig = _figure()
    ax = fig.add_subplot()
    unit = str(series.get("unit", "epoch"))
    shift = 1.0 if unit == "epoch" else 0.0  # x counts epochs completed; the axis shows the epoch index
    xs = [float(p[0]) - shift for p in curve]
    train = _finite([p[1] for p in curve])
    val = _finite([p[2] for p in curve])
    ax.plot(xs, train, marker=".", label="train loss")
    if any(not math.isnan(v) for v in val):
        ax.plot(xs, val, marker=".", label="validation loss")
    best = best_point(series)
    if best is not None:
        best_x, best_v, restored = best
        ax.scatter(
            [best_x - shift],
            [best_v],
            s=80,
            facecolors="none",
            edgecolors="green",
            zorder=3,
            label=f"best val {best_v:.6g} ({where_x(best_x, unit, series)}{', restored' if restored else ''})",
        )
    onset = next(
        (
            f["evidence"].get("onset_x")
            for f in findings
            if f.get("code") == "overfitting" and f.get("severity") == "warning"
        ),
        None,
    )
    if onset is not None:
        ax.axvline(
            float(onset) - shift,
            color="orange",
            linestyle="--",
            label=f"overfitting onset ({where_x(float(onset), unit, series)})",
        )
    stop = stopped_x(series)
    if stop is not None:
        ax.axvline(stop - shift, color="red", linestyle=":", label=f"stopped ({where_x(stop, unit, series)})")
    positive = [v for v in train + val if not math.isnan(v)]
    if positive and min(positive) > 0 and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
    ax.set_xlabel(
        "epoch (as the progress bar counts; a point at e is the end of epoch e)"
        if unit == "epoch"
        else "step"
    )
    ax.set_ylabel("loss")
    ax.set_title("Learning curves")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return fig


def _lr_schedule(points: Sequence[Sequence[float]]) -> Any:
    fig = _figure(7.0, 3.0)
    ax = fig.add_subplot()
    ax.plot([p[0] for p in points], [p[1] for p in points])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate (group 0)")
    ax.set_title("Learning-rate schedule")
    ax.grid(alpha=0.3)
    return fig


def _grad_norm_heatmap(norms: Mapping[str, Sequence[Sequence[float]]]) -> Any:
    import numpy as np

    names = list(norms)
    steps = sorted({int(s) for series in norms.values() for s, _ in series})
    column = {s: i for i, s in enumerate(steps)}
    grid = np.full((len(names), len(steps)), np.nan)
    for row, name in enumerate(names):
        for step, value in norms[name]:
            if value > 0 and math.isfinite(value):
                grid[row, column[int(step)]] = math.log10(value)
    fig = _figure(7.0, max(2.5, 0.35 * len(names) + 1.5))
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(names)), names, fontsize="small")
    ticks: list[int] = sorted({int(i) for i in np.linspace(0, len(steps) - 1, num=min(len(steps), 8))})
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
    ax.set_xlabel("optimizer step")
    ax.set_title("Gradient norm per layer (log10)")
    fig.colorbar(image, ax=ax, label="log10 |grad|")
    return fig
