"""The only code in lightning_diag that touches loggers.

Two routes, chosen by the hook the caller is in (DESIGN.md section 5):

* :func:`log_step` / :func:`log_epoch` go through ``LightningModule.log_dict``: every configured logger gets the
  values, ``log_every_n_steps`` is respected, and the values land in ``trainer.callback_metrics`` so
  ``ModelCheckpoint``/``EarlyStop`` can monitor a ``diag/...`` key. Legal in step hooks
  (``on_before_optimizer_step``, ``on_train_batch_*``) and epoch hooks respectively.
* :func:`log_direct`, :func:`log_histogram`, :func:`log_figure` and :func:`log_text` write straight to
  ``trainer.loggers`` on global rank 0, from any hook, at an explicit step. Histograms and figures go to the
  loggers that support them (TensorBoard, W&B); elsewhere a histogram degrades to quantile scalars and a
  figure or text is skipped.

No logger configured: every function is a no-op apart from ``callback_metrics``.

:func:`console` is how lightning_diag prints: through the progress bar (``tqdm.write`` clears the bar, prints the
line and redraws the bar), never onto it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

import torch

from lightning_diag._lightning import is_a

__all__ = [
    "HISTOGRAM_QUANTILES",
    "console",
    "log_dir",
    "log_direct",
    "log_epoch",
    "log_figure",
    "log_histogram",
    "log_html",
    "log_step",
    "log_text",
    "should_log_step",
]

Scalar = torch.Tensor | float | int

#: Quantiles logged instead of a histogram for loggers without histogram support.
HISTOGRAM_QUANTILES: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


def should_log_step(trainer: Any, *, step_done: bool = False) -> bool:
    """Whether the optimizer step in progress is one Lightning will flush to the loggers.

    It mirrors Lightning's ``log_every_n_steps`` rule so callbacks compute costly per-layer values only when they
    will be written. Call it before the optimizer step (``on_train_batch_start``, ``on_before_optimizer_step``:
    ``global_step`` is the index of the step being taken), or with ``step_done=True`` in ``on_train_batch_end``,
    where ``global_step`` already counts the step just taken.
    """
    every = max(int(getattr(trainer, "log_every_n_steps", 50) or 1), 1)
    index = trainer.global_step - 1 if step_done else trainer.global_step
    return (index + 1) % every == 0 or bool(trainer.should_stop)


def log_step(pl_module: Any, metrics: Mapping[str, Scalar], *, prog_bar: bool = False) -> None:
    """Log per-step values from a step hook (values may stay on device; Lightning syncs at flush time)."""
    if metrics:
        pl_module.log_dict(dict(metrics), on_step=True, on_epoch=False, prog_bar=prog_bar, batch_size=1)


def log_epoch(pl_module: Any, metrics: Mapping[str, Scalar], *, prog_bar: bool = False) -> None:
    """Log per-epoch values from an epoch hook (``on_train_epoch_end``, ``on_validation_epoch_end``)."""
    if metrics:
        pl_module.log_dict(dict(metrics), on_step=False, on_epoch=True, prog_bar=prog_bar, batch_size=1)


def _to_float(value: Scalar) -> float:
    return float(value.detach().float().cpu().item()) if isinstance(value, torch.Tensor) else float(value)


def log_direct(trainer: Any, metrics: Mapping[str, Scalar], step: int) -> None:
    """Write scalars to every logger at ``step``, immediately, from any hook (global rank 0 only)."""
    if not metrics or not trainer.is_global_zero or not trainer.loggers:
        return
    values = {name: _to_float(value) for name, value in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)


def log_histogram(trainer: Any, name: str, values: torch.Tensor, step: int) -> None:
    """A histogram where the logger supports one (TensorBoard, W&B); quantile scalars ``name/q<pct>`` elsewhere."""
    if not trainer.is_global_zero or not trainer.loggers:
        return
    flat = values.detach().float().flatten().cpu()
    quantiles: dict[str, float] | None = None
    for logger in trainer.loggers:
        if is_a(logger, "loggers.TensorBoardLogger"):
            logger.experiment.add_histogram(name, flat, global_step=step)
        elif is_a(logger, "loggers.WandbLogger"):
            import wandb

            counts, edges = torch.histogram(flat, bins=64)
            histogram = wandb.Histogram(np_histogram=(counts.numpy(), edges.numpy()))
            logger.experiment.log({name: histogram, "trainer/global_step": step})
        else:
            if quantiles is None:
                qs = (
                    torch.quantile(flat, torch.tensor(HISTOGRAM_QUANTILES))
                    if flat.numel()
                    else torch.zeros(0)
                )
                quantiles = {
                    f"{name}/q{round(q * 100)}": float(v)
                    for q, v in zip(HISTOGRAM_QUANTILES, qs.tolist(), strict=False)
                }
            if quantiles:
                logger.log_metrics(quantiles, step=step)


def log_figure(trainer: Any, name: str, figure: Any, step: int) -> bool:
    """A matplotlib figure to TensorBoard / W&B / MLflow; returns whether any logger took it."""
    if not trainer.is_global_zero:
        return False
    taken = False
    for logger in trainer.loggers:
        if is_a(logger, "loggers.TensorBoardLogger"):
            logger.experiment.add_figure(name, figure, global_step=step, close=False)
            taken = True
        elif is_a(logger, "loggers.WandbLogger"):
            import wandb

            logger.experiment.log({name: wandb.Image(figure), "trainer/global_step": step})
            taken = True
        elif is_a(logger, "loggers.MLFlowLogger"):
            logger.experiment.log_figure(logger.run_id, figure, f"{name}.png")
            taken = True
    return taken


def log_text(trainer: Any, name: str, text: str, step: int) -> bool:
    """A block of text to TensorBoard / W&B / MLflow; returns whether any logger took it."""
    if not trainer.is_global_zero:
        return False
    taken = False
    for logger in trainer.loggers:
        if is_a(logger, "loggers.TensorBoardLogger"):
            # TensorBoard renders text as markdown: indent it so it shows verbatim.
            logger.experiment.add_text(name, "    " + text.replace("\n", "\n    "), global_step=step)
            taken = True
        elif is_a(logger, "loggers.WandbLogger"):
            import wandb

            logger.experiment.log({name: wandb.Html("<pre>" + text + "</pre>"), "trainer/global_step": step})
            taken = True
        elif is_a(logger, "loggers.MLFlowLogger"):
            logger.experiment.log_text(logger.run_id, text, f"{name}.txt")
            taken = True
    return taken


def log_dir(trainer: Any) -> str:
    """Where run artefacts go: the first logger's directory, else ``default_root_dir``.

    Same rule as ``Trainer.log_dir`` but without its broadcast, so it is safe on rank 0 alone and inside
    ``on_exception`` (where another rank may already be gone); the loggers of both namespaces
    (``lightning.pytorch`` and ``pytorch_lightning``) are recognised.
    """
    if trainer.loggers:
        logger = trainer.loggers[0]
        if is_a(logger, "loggers.TensorBoardLogger") or is_a(logger, "loggers.CSVLogger"):
            return str(logger.log_dir)
        save_dir = getattr(logger, "save_dir", None)
        if save_dir:
            return os.fspath(save_dir)
    return os.fspath(trainer.default_root_dir)


def log_html(trainer: Any, name: str, path: str, step: int) -> bool:
    """An HTML file (``diagnosis.html``) to W&B (an HTML panel) and MLflow (an artifact); returns whether any logger
    took it. TensorBoard shows no HTML: the file sits in its log directory, next to the event files.
    """
    if not trainer.is_global_zero:
        return False
    taken = False
    for logger in trainer.loggers:
        if is_a(logger, "loggers.WandbLogger"):
            import wandb

            with open(path, encoding="utf-8") as handle:
                page = wandb.Html(handle.read(), inject=False)
            logger.experiment.log({name: page, "trainer/global_step": step})
            taken = True
        elif is_a(logger, "loggers.MLFlowLogger"):
            logger.experiment.log_artifact(logger.run_id, path)
            taken = True
    return taken


def console(trainer: Any, text: str) -> None:
    """Print ``text`` on global rank 0 the way Lightning's progress bar allows: above the bar, never onto it."""
    if not trainer.is_global_zero:
        return
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is not None and is_a(bar, "callbacks.TQDMProgressBar") and bar.is_enabled:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stdout)  # what the bar's own `print` does, also once the bars are closed
        sys.stdout.flush()
    elif bar is not None and bar.is_enabled:
        bar.print(text)
    else:
        print(text, flush=True)
