"""What the lightning_diag callbacks share during one fit, in one typed place.

Callbacks never import each other. What they share travels here instead:

* :class:`StepContext`: the optimizer step in progress: the ``(name, parameter, gradient)`` lists and the
  gradient statistics per norm type. Whichever callback asks first in ``on_before_optimizer_step`` pays for the
  one foreach pass; the others read the same :class:`~lightning_diag.core.grad_stats.GradStats`. Because the
  first asker computes them before it acts, the statistics are always *pre-clip*, whatever the order of the
  callbacks list (DESIGN.md section 2). A step whose update was withheld says so in ``skipped``.
* :class:`RunContext`: what outlives one step: parameter names per optimizer (rebuilt when its param groups
  change), whether a guard acts on non-finite steps (so reports can say who handled them), and the requests a
  guard makes of whoever owns the learning-rate schedule (steps to hold, an LR back-off factor), consumed by the
  schedule owner with :meth:`RunContext.take_schedule_requests`.

One :class:`RunContext` per Trainer, found with :func:`run_context`; it lives as long as the Trainer does.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, cast

import torch

from lightning_diag import _lightning
from lightning_diag.core.grad_stats import GradStats, compute_grad_stats, plain_layout

__all__ = ["ParamSet", "RunContext", "StepContext", "run_context", "step_context"]


@dataclasses.dataclass
class ParamSet:
    """The parameters one optimizer updates, named as in the LightningModule; built once per param-group change."""

    names: tuple[str, ...]
    params: list[torch.Tensor]
    #: every gradient seen so far was dense real float32 on one device (decided on the first step's gradients)
    plain: bool | None = None

    def matches(self, params: list[torch.Tensor]) -> bool:
        return (
            len(params) == len(self.params) and params[0] is self.params[0] and params[-1] is self.params[-1]
        )


@dataclasses.dataclass
class StepContext:
    """The optimizer step in progress, as every gradient callback sees it."""

    step: int
    optimizer_id: int
    names: tuple[str, ...]
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    inv_scale: (
        torch.Tensor | None
    )  # set when a fused optimizer will unscale inside step(): grads are still scaled
    #: the gradients are dense real float32 on one device (the fast paths apply), with that device
    device: torch.device | None = None
    stats: dict[float, GradStats] = dataclasses.field(default_factory=dict)
    #: set by a guard that withheld this step's update (gradients set to ``None``)
    skipped: bool = False

    def grad_stats(self, norm_type: float = 2.0) -> GradStats:
        """The gradient statistics of this step for ``norm_type`` (computed on the first request, then shared)."""
        key = float(norm_type)
        stats = self.stats.get(key)
        if stats is None:
            stats = compute_grad_stats(
                self.names, self.grads, key, self.inv_scale, plain=self.device is not None
            )
            self.stats[key] = stats
        return stats


#: Training losses kept per run for the severity gate.
MAX_LOSSES = 20000


@dataclasses.dataclass
class RunContext:
    """What the callbacks of one Trainer share across steps."""

    #: ``id(optimizer)`` -> the parameters it updates
    param_sets: dict[int, ParamSet] = dataclasses.field(default_factory=dict)
    step: StepContext | None = None
    #: a guard in the run acts on non-finite steps (skips, rolls back or raises): others only report them
    nonfinite_handled: bool = False
    #: a guard in the run judges spikes of the total gradient norm: it owns `exploding_gradients` spikes (one
    #: event, one finding), the monitors only log the norms
    grad_spikes_owned: bool = False
    #: optimizer steps the LR schedule must not count (skipped or rolled back), not yet taken by its owner
    held_steps: int = 0
    #: a factor the learning rates were backed off by, not yet taken by the schedule's owner
    lr_scale: float = 1.0
    #: ``(step, training loss)`` as read on the host by whichever callback reads it anyway (NaNGuard): what the
    #: end-of-run severity gate measures a symptom's consequence on (bounded: thinned past MAX_LOSSES)
    losses: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    #: the loss of a uniform guess (``ln(C)``) when SanityCheck saw a C-class cross-entropy: a plateau there is no
    #: task's floor
    chance_loss: float | None = None

    def record_loss(self, step: int, value: float) -> None:
        """A step's training loss, read on the host already (never read for this)."""
        if self.losses and step <= self.losses[-1][0]:
            return  # a step judged twice (a replayed window) is kept once
        self.losses.append((int(step), float(value)))
        if len(self.losses) > MAX_LOSSES:
            del self.losses[: len(self.losses) // 2 : 2]  # thin the older half, keep the recent steps whole

    def param_set(self, pl_module: Any, optimizer: Any) -> ParamSet:
        """The parameters ``optimizer`` updates, named as in ``pl_module`` (rebuilt when its param groups change)."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        cached = self.param_sets.get(id(optimizer))
        if cached is None or not params or not cached.matches(params):
            names = {id(p): n for n, p in pl_module.named_parameters()}
            cached = ParamSet(tuple(names.get(id(p), f"param{i}") for i, p in enumerate(params)), params)
            self.param_sets[id(optimizer)] = cached
        return cached

    def named_params(self, pl_module: Any, optimizer: Any) -> list[tuple[str, torch.Tensor]]:
        """``(name, parameter)`` for every parameter the optimizer updates, named as in ``pl_module``."""
        found = self.param_set(pl_module, optimizer)
        return list(zip(found.names, found.params, strict=True))

    def hold_schedule(self, steps: int) -> None:
        """Ask the schedule's owner not to count ``steps`` optimizer steps that did not update the model."""
        self.held_steps += int(steps)

    def scale_lr(self, factor: float) -> None:
        """Tell the schedule's owner that every rate from now on is multiplied by ``factor``."""
        self.lr_scale *= float(factor)

    def take_schedule_requests(self) -> tuple[int, float]:
        """``(held_steps, lr_scale)`` requested since the last call; the requests are then cleared."""
        requests = (self.held_steps, self.lr_scale)
        self.held_steps, self.lr_scale = 0, 1.0
        return requests


_RUNS: weakref.WeakKeyDictionary[Any, RunContext] = weakref.WeakKeyDictionary()


def run_context(trainer: Any) -> RunContext:
    """The :class:`RunContext` of ``trainer`` (created on first use)."""
    context = _RUNS.get(trainer)
    if context is None:
        context = _RUNS[trainer] = RunContext()
    return context


def step_context(trainer: Any, pl_module: Any, optimizer: Any) -> StepContext:
    """The :class:`StepContext` of the optimizer step in progress (built on the first request of the step).

    A quiet step costs one list of gradients (``[p.grad for p in params]``); names are the parameter set's, and
    the layout check behind the fast paths runs once per parameter set.
    """
    run = run_context(trainer)
    current = run.step
    step = trainer.global_step
    if current is not None and current.step == step and current.optimizer_id == id(optimizer):
        return current
    found = run.param_set(pl_module, optimizer)
    names, params = found.names, found.params
    maybe = [p.grad for p in params]
    if any(g is None for g in maybe):  # frozen or unused this step: keep the parameters that have a gradient
        kept = [i for i, g in enumerate(maybe) if g is not None]
        names, params = tuple(names[i] for i in kept), [params[i] for i in kept]
        grads = [g for g in maybe if g is not None]
        plain = plain_layout(grads)
    else:
        grads = cast("list[torch.Tensor]", maybe)
        if found.plain is None:
            found.plain = plain_layout(grads)
        plain = found.plain
    inv_scale = None
    scaler = _lightning.amp_scaler(trainer)
    if scaler is not None and _lightning.fused_unscale(optimizer):
        # Fused optimizers unscale inside step(): the gradients we see are still multiplied by the scale.
        inv_scale = _lightning.loss_scale(scaler).reciprocal()
    run.step = StepContext(
        step=int(step),
        optimizer_id=id(optimizer),
        names=names,
        params=params,
        grads=grads,
        inv_scale=inv_scale,
        device=grads[0].device if plain and grads else None,
    )
    return run.step
