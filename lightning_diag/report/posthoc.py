"""Post-hoc diagnosis of a finished run from its logs: TensorBoard event files or Lightning's ``metrics.csv``.

Any run works, also one that used no lightning_diag callback: :func:`find_runs` locates the logs under a
directory, :func:`read_series` reads every scalar, :func:`curve_from_series` lines up the training and
validation losses into one point per evaluation (the training value is the mean of the training-loss events
since the previous evaluation; ``x`` counts epochs done when an ``epoch`` series exists, steps otherwise) and
:func:`diagnose_run` applies the same rules as :class:`~lightning_diag.OverfitDetector`.
"""

from __future__ import annotations

import csv
import glob
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from lightning_diag.core.curves import CurvePoint, CurveRules, diagnose
from lightning_diag.findings import Finding, FindingLog

__all__ = [
    "TRAIN_KEYS",
    "VAL_KEYS",
    "curve_from_series",
    "diagnose_run",
    "find_runs",
    "read_series",
    "resolve_key",
]

Series = dict[str, list[tuple[int, float]]]

#: Keys tried, in order, when no key is given (epoch-level training values first).
TRAIN_KEYS = ("train_loss_epoch", "train/loss_epoch", "train_loss", "train/loss", "loss_epoch", "loss")
VAL_KEYS = ("val_loss", "val/loss", "valid_loss", "validation_loss", "val_loss_epoch")


def find_runs(path: str) -> list[tuple[str, str]]:
    """``(kind, location)`` of every run under ``path``, newest first: ``("csv", metrics.csv path)`` or
    ``("tensorboard", directory holding event files)``.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a directory.")
    runs: list[tuple[float, str, str]] = []
    for found in glob.glob(os.path.join(path, "**", "metrics.csv"), recursive=True):
        runs.append((os.path.getmtime(found), "csv", found))
    event_dirs = {
        os.path.dirname(f)
        for f in glob.glob(os.path.join(path, "**", "events.out.tfevents.*"), recursive=True)
    }
    for directory in event_dirs:
        newest = max(os.path.getmtime(f) for f in glob.glob(os.path.join(directory, "events.out.tfevents.*")))
        runs.append((newest, "tensorboard", directory))
    return [(kind, where) for _, kind, where in sorted(runs, reverse=True)]


def read_series(kind: str, location: str) -> Series:
    """Every scalar of a run as ``{key: [(step, value), ...]}`` (``epoch`` included)."""
    if kind == "csv":
        return _read_csv(location)
    return _read_tensorboard(location)


def _read_csv(path: str) -> Series:
    out: Series = defaultdict(list)
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            step_text = row.get("step") or ""
            if not step_text:
                continue
            step = int(float(step_text))
            for key, value in row.items():
                if key != "step" and value not in ("", None):
                    try:
                        out[key].append((step, float(value)))
                    except ValueError:
                        continue
    return dict(out)


def _read_tensorboard(directory: str) -> Series:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as error:  # pragma: no cover - tensorboard is in the dev and tensorboard extras
        raise RuntimeError(
            "Reading TensorBoard event files needs the `tensorboard` package: pip install 'lightning-diag[tensorboard]'."
        ) from error
    accumulator = EventAccumulator(directory, size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]
    }


def resolve_key(series: Series, given: str | None, candidates: Sequence[str], what: str) -> str:
    """``given`` if logged, else the first candidate that is; a ``KeyError`` listing the keys otherwise."""
    if given is not None:
        if given in series:
            return given
        raise KeyError(f"the {what} key {given!r} is not in the logs; logged keys: {sorted(series)}")
    for key in candidates:
        if key in series:
            return key
    flag = "--train-monitor" if what.startswith("train") else "--monitor"
    raise KeyError(
        f"no {what} key found (tried {list(candidates)}); logged keys: {sorted(series)}. Name it with {flag}."
    )


def curve_from_series(
    series: Series, train_key: str, val_key: str
) -> tuple[list[CurvePoint], list[int], str]:
    """One point per validation event; returns the points, their steps and the unit of ``x``."""
    val_events = sorted(series[val_key])
    train_events = sorted(series[train_key])
    epochs = dict(series.get("epoch", []))
    unit = "epoch" if epochs else "step"
    points: list[CurvePoint] = []
    steps: list[int] = []
    previous = -1
    last_train: float | None = None
    for step, val in val_events:
        window = [v for s, v in train_events if previous < s <= step]
        previous = step
        if window:
            last_train = sum(window) / len(window)
        if last_train is None:
            continue
        x = float(epochs[step] + 1) if unit == "epoch" and step in epochs else float(step)
        if points and x <= points[-1].x:  # several evaluations within an epoch: spread them out in order
            x = points[-1].x + 1e-3
        points.append(CurvePoint(x, last_train, val if math.isfinite(val) else math.nan))
        steps.append(step)
    return points, steps, unit


def diagnose_run(
    series: Series,
    train_key: str | None = None,
    val_key: str | None = None,
    baseline: float | None = None,
    rules: CurveRules | None = None,
) -> tuple[list[Finding], dict[str, Any]]:
    """Findings for a logged run (each reported at the evaluation where it held last) and the plot series."""
    train = resolve_key(series, train_key, TRAIN_KEYS, "train loss")
    val = resolve_key(series, val_key, VAL_KEYS, "val loss")
    points, steps, unit = curve_from_series(series, train, val)
    log = FindingLog()
    for n in range(1, len(points) + 1):  # as the live callback would have seen it, evaluation by evaluation
        for verdict in diagnose(points[:n], rules, baseline, unit=unit):
            finding = Finding(
                code=verdict.code,
                severity=verdict.severity,
                message=verdict.message,
                step=steps[n - 1],
                epoch=int(points[n - 1].x) - 1 if unit == "epoch" else 0,
                evidence={**verdict.evidence, "train_key": train, "val_key": val},
                advice=verdict.advice,
                source="lightning-diag report",
            )
            log.record(finding, key=verdict.severity)
    plot_series: dict[str, Any] = {
        "curve": [(p.x, p.train, p.val) for p in points],
        "curve_steps": steps,
        "unit": unit,
        "val_key": val,
    }
    lr_key = next((k for k in series if k.startswith(("diag/lr/group0", "lr-", "lr/"))), None)
    if lr_key:
        plot_series["lr"] = sorted(series[lr_key])
    norms = {
        k.removeprefix("diag/grad_norm/"): sorted(v)
        for k, v in series.items()
        if k.startswith("diag/grad_norm/")
    }
    norms.pop("total", None)
    if norms:
        plot_series["grad_norms"] = norms
    return log.as_list(), plot_series
