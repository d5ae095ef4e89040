"""What NaNGuard reads from a step: its four numbers on the device, the one all-reduce and host read of the
synchronous path, and, on detection only, where the non-finite value began.

:func:`step_row` gathers ``[input sum, parameter norm, loss, gradient norm]`` without a sync; :func:`read_row`
makes the step's one collective and one host read. When they show a non-finite value, :func:`localise` has each
rank replay the step's batches with hooks on every module (:func:`~lightning_diag.core.nan_trace.locate`), picks
the first informative answer of all ranks (one gather), and tells finite values whose float32 norm overflowed from
real NaN/Inf by their max norm (:func:`confirm_params` for the parameters, the gradients' peaks for the gradients).
The rules and the words are core's (:mod:`lightning_diag.core.guard`, :mod:`lightning_diag.core.nan_trace`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_diag import _distributed, _lightning
from lightning_diag.callbacks._context import StepContext, run_context
from lightning_diag.core.grad_stats import max_abs, tensor_norms, total_from_norms
from lightning_diag.core.guard import Origin, StepFlags, StepWindow
from lightning_diag.core.nan_trace import choose_origin, locate

__all__ = ["confirm_params", "localise", "read_row", "step_row"]


def step_row(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    optimizer: Any,
    step: StepContext,
    window: StepWindow,
    *,
    check_params: bool,
) -> torch.Tensor:
    """``[input sum, parameter norm, loss, gradient norm]`` of the step, a device vector (no sync); the parameter
    norm only when ``check_params`` (else 0).
    """
    stats = step.grad_stats()  # shared, pre-clip
    params_norm = None
    if check_params:
        # The L2 norm is non-finite when a parameter is (and ~8x cheaper than the max norm on CPU); the rare
        # finite parameters whose norm overflows float32 are told apart on detection (confirm_params).
        found = run_context(trainer).param_set(pl_module, optimizer)
        params_norm = total_from_norms(tensor_norms([p.detach() for p in found.params]))
    grad_norm = stats.total_norm if stats.norms.numel() else None
    return window.row(params_norm, grad_norm, stats.total_norm.device)


def read_row(trainer: pl.Trainer, values: torch.Tensor, *, rank_local: bool) -> tuple[list[float], int]:
    """One all-reduce (sum: a non-finite value anywhere stays non-finite) and one host read; returns the values
    and the number of ranks they are summed over. The all-reduce is left out when nothing in the values can
    differ between ranks (not ``rank_local``: no input check, no spike detection, no GradScaler; under DDP the
    reduced gradients already carry a NaN from any rank, and a rank's NaN loss makes them NaN).
    """
    if not _distributed.is_distributed(trainer) or not rank_local:
        return values.tolist(), 1
    return _distributed.reduce(trainer, values, "sum").tolist(), int(trainer.world_size)


def confirm_params(trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> bool:
    """Whether a parameter is really non-finite (its L2 norm alone can overflow): the max norm, on detection."""
    found = run_context(trainer).param_set(pl_module, optimizer)
    peaks = max_abs(found.params)
    peak = peaks.max() if peaks.numel() else torch.zeros(())
    return not math.isfinite(float(_distributed.reduce(trainer, peak.reshape(1), "max")[0]))


def localise(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    optimizer: Any,
    step: StepContext,
    window: StepWindow,
    flags: StepFlags,
    *,
    trace: bool,
    replay: bool,
) -> tuple[StepFlags, Origin]:
    """Where the first non-finite value of the step appeared, and the flags that answer corrects: a non-finite
    optimizer update means non-finite parameters; finite gradients whose norm overflowed float32 are exploding,
    not NaN. ``trace``: look (replay or not, and gather); ``replay``: the step can be replayed.
    """
    origin = (
        _locate(trainer, pl_module, optimizer, step, window, flags, replay)
        if trace
        else Origin(replayed=replay)
    )
    if origin.trace is not None and origin.trace.phase == "optimizer":
        flags = dataclasses.replace(flags, params=True)
    if origin.trace is None and flags.grads and not (flags.loss or flags.input or flags.params):
        flags, origin = _norm_overflow(trainer, step, flags, origin)
    return flags, origin


def _locate(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    optimizer: Any,
    step: StepContext,
    window: StepWindow,
    flags: StepFlags,
    replayed: bool,
) -> Origin:
    """This rank's answer, then the first informative one of all ranks."""
    found = run_context(trainer).param_set(pl_module, optimizer)
    replay = functools.partial(_lightning.replay_training_step, trainer, pl_module) if replayed else None
    mine = locate(
        pl_module,
        found.names,
        found.params,
        window.batches,
        (lambda batch, i: functools.partial(replay, batch, i)) if replay is not None else None,
        (step.names, step.grads),
        input_bad=flags.input,
        loss_bad=flags.loss,
        grad_bad=flags.grads,
    )
    trace, reproduced, rank = choose_origin(_distributed.gather_objects(trainer, mine))
    return Origin(trace, reproduced, rank, replayed)


def _norm_overflow(
    trainer: pl.Trainer, step: StepContext, flags: StepFlags, origin: Origin
) -> tuple[StepFlags, Origin]:
    """Finite gradients whose norm overflows float32 are exploding, not NaN: flag them so."""
    if not step.grads:
        return flags, origin
    peaks = _distributed.reduce(trainer, max_abs(step.grads), "max").tolist()
    if not all(math.isfinite(v) for v in peaks):
        return flags, origin  # really non-finite somewhere: the usual path
    worst = max(range(len(peaks)), key=peaks.__getitem__)
    return StepFlags(norm_overflow=True), dataclasses.replace(
        origin, overflow=(peaks[worst], step.names[worst])
    )
