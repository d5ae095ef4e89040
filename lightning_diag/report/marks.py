"""The marks a finished run's views put on its curves: events (skips, rollbacks, spikes, a stop), the best point,
where training stopped, NaNGuard's LR back-offs, and how a curve position reads (``epoch 16``, ``step 120``).

Shared by the HTML page (:mod:`lightning_diag.report.html`) and the matplotlib figures
(:mod:`lightning_diag.report.plots`), so both say the same thing about the same run. Nothing here imports torch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["best_point", "event_markers", "lr_backoffs", "stopped_x", "where_x"]

#: finding code -> the kind of event it marks on the curves (skips and rollbacks come from the action taken).
_SPIKE_CODES = ("loss_spike", "exploding_gradients")


def event_markers(findings: Sequence[Mapping[str, Any]]) -> list[tuple[str, int, int, int, str]]:
    """``(kind, first_step, last_step, count, code)`` for the findings that mark an event of the run: steps
    skipped or rolled back (NaNGuard's action), spikes, a run stopped by an error.
    """
    events = []
    for f in findings:
        action = str((f.get("evidence") or {}).get("action", ""))
        code = str(f.get("code", ""))
        if action in ("skip", "rollback", "raise"):
            kind = action
        elif code in _SPIKE_CODES:
            kind = "spike"
        else:
            continue
        first = int(f.get("step", 0))
        last = int(f.get("last_step") or first)
        events.append((kind, first, last, int(f.get("count", 1)), code))
    return events


def best_point(series: Mapping[str, Any]) -> tuple[float, float, bool] | None:
    """``(x, value, restored)`` of the best validation point: EarlyStop's best (the weights it restored) when it
    has one, else the lowest validation loss of the curve. ``x`` in curve units (epochs completed).
    """
    early = series.get("early_stop") or {}
    same_key = early.get("monitor") is None or early.get("monitor") == series.get(
        "val_key", early.get("monitor")
    )
    if same_key and early.get("mode", "min") == "min" and early.get("best_value") is not None:
        return float(early["best_x"]), float(early["best_value"]), bool(early.get("restored"))
    finite = [
        (float(p[0]), float(p[2]))
        for p in series.get("curve") or []
        if p[2] is not None and math.isfinite(float(p[2]))
    ]
    if not finite:
        return None
    x, v = min(finite, key=lambda p: p[1])
    return x, v, False


def stopped_x(series: Mapping[str, Any]) -> float | None:
    """Where training was stopped early (OverfitDetector or EarlyStop), in curve units; ``None``: not stopped."""
    stop = series.get("stopped_at")
    early = series.get("early_stop") or {}
    stop = stop if stop is not None else early.get("stopped_x")
    return None if stop is None else float(stop)


def where_x(x: float, unit: str, series: Mapping[str, Any] | None = None) -> str:
    """``epoch 16`` (the epoch index, as Lightning's progress bar shows it) for a curve ``x``; ``step 120``. An
    evaluation inside an epoch (``val_check_interval < 1``) also names its global step: ``epoch 0, step 600``.
    """
    if unit == "epoch" and series is not None and abs(x - round(x)) > 1e-9:
        xs = [float(p[0]) for p in series.get("curve") or []]
        steps = list(series.get("curve_steps") or [])
        for px, step in zip(xs, steps, strict=False):
            if abs(px - x) < 1e-9:
                return f"epoch {max(math.ceil(round(x, 6)) - 1, 0)}, step {step}"
    if unit != "epoch":
        return f"step {x:g}"
    return f"epoch {max(math.ceil(round(x, 6)) - 1, 0)}"


def lr_backoffs(
    points: Sequence[Sequence[float]], guard: Mapping[str, Any]
) -> list[tuple[float, float, float]]:
    """``(step, lr before, lr after)`` where the schedule fell by NaNGuard's ``lr_backoff`` factor (or more),
    when NaNGuard rolled back with a back-off: at most one per rollback.
    """
    rollbacks, factor = int(guard.get("rollbacks", 0)), float(guard.get("lr_backoff", 1.0))
    if rollbacks <= 0 or not 0 < factor < 1:
        return []
    cut = (1 + factor) / 2  # half-way between no change and the back-off: a cosine step never falls this fast
    drops = [
        (float(b[0]), float(a[1]), float(b[1]))
        for a, b in itertools.pairwise(points)
        if a[1] and b[1] is not None and float(a[1]) > 0 and float(b[1]) / float(a[1]) <= cut
    ]
    return drops[:rollbacks]
