"""The probes SilentBugDetector sets at a check step: tensor hooks and optimizer hooks that watch one step.

Pure torch (no Lightning): each probe touches only tensors, their hooks and an optimizer, keeps what it sees on the
device, and is closed (its hooks removed) by its owner. :class:`SquareProbe` adds up the squared norms of each
micro-batch's incoming gradient (the noise scale), :class:`StaleProbe` watches whether gradients are cleared
between two steps of one optimizer, :class:`NoOpProbe` compares sampled parameters before and after a step.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from typing import Any

import torch

from lightning_diag.core.grad_stats import local_tensor
from lightning_diag.core.silent.checks import NoiseSample, NoiseScale, flat_sample, noise_row, noise_sample

__all__ = [
    "PROBE_TENSORS",
    "STALE_TENSORS",
    "NoOpProbe",
    "NoiseMeter",
    "SquareProbe",
    "StaleProbe",
    "StaleWatch",
    "per_group",
    "spread",
]

#: Gradient tensors watched per check by the stale-gradient probe.
STALE_TENSORS = 8
#: Parameter tensors sampled per check by the no-op probe (spread over the optimizer's param groups).
PROBE_TENSORS = 8


def per_group(optimizer: torch.optim.Optimizer, with_grad: list[torch.Tensor]) -> list[torch.Tensor]:
    """Up to ``PROBE_TENSORS`` of the parameters that have a gradient, spread over every param group (so a group
    frozen with ``lr=0`` on purpose never stands for the whole optimizer).
    """
    has_grad = {id(p) for p in with_grad}
    groups = [[p for p in g["params"] if id(p) in has_grad] for g in optimizer.param_groups]
    groups = [g for g in groups if g]
    share = max(1, PROBE_TENSORS // max(len(groups), 1))
    return [p for g in groups for p in spread(g, share)]


def spread(items: list[Any], most: int) -> list[Any]:
    """At most ``most`` of ``items``, evenly spread (first and last included).

    Example:
        >>> spread(list(range(10)), 4), spread(list(range(10)), 1), spread([1, 2], 4)
        ([0, 3, 6, 9], [9], [1, 2])
    """
    if len(items) <= most:
        return items
    if most == 1:
        return [items[-1]]
    step = (len(items) - 1) / (most - 1)
    return [items[round(i * step)] for i in range(most)]


class SquareProbe:
    """Tensor hooks that add up ``|g|^2`` of each parameter's *incoming* gradient, per backward call.

    The hook of a leaf tensor sees the gradient of one backward before it is accumulated into ``.grad`` and before
    DDP averages it across ranks: exactly the micro-batch, per-rank gradient the noise scale needs.
    """

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.micro: list[list[torch.Tensor]] = []
        self.handles = [p.register_hook(self._hook) for p in params]

    def open(self) -> None:
        self.micro.append([])

    def _hook(self, grad: torch.Tensor) -> None:
        if not self.micro:
            self.open()
        g = grad.detach()
        if g.is_sparse:
            g = g.coalesce().values()
        self.micro[-1].append(g.float().pow(2).sum())

    def close(self) -> list[torch.Tensor]:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        return [torch.stack(m).sum() for m in self.micro if m]


class NoiseMeter:
    """The gradient noise scale of a run: a :class:`SquareProbe` set at a check step, this rank's
    :func:`~lightning_diag.core.silent.checks.noise_row` at that step's optimizer step, and the running
    :class:`~lightning_diag.core.silent.checks.NoiseScale` of the rows gathered from every rank.
    """

    def __init__(self, decay: float) -> None:
        self.estimate = NoiseScale(decay)
        self.probe: SquareProbe | None = None
        self.micro_batch: int | None = None

    @property
    def measuring(self) -> bool:
        return self.probe is not None

    def start(self, params: list[torch.Tensor], micro_batch: int) -> None:
        """Measure the next optimizer step over ``params``, of micro-batches of ``micro_batch`` samples (``0``: no
        batch size to be found, no measurement).
        """
        self.micro_batch = micro_batch or None
        if self.micro_batch:
            self.probe = SquareProbe(params)

    def open(self) -> None:
        """A backward call begins (one micro-batch)."""
        if self.probe is not None:
            self.probe.open()

    def row(
        self,
        accumulate: int,
        total_norm: torch.Tensor | None,
        loss_scale: torch.Tensor | None,
        device: torch.device,
    ) -> torch.Tensor:
        """This rank's row of the step (the probe is closed): see :func:`noise_row`."""
        micro = self.probe.close() if self.probe is not None else []
        self.probe = None
        return noise_row(micro, accumulate, total_norm, loss_scale, device)

    def add(self, rows: torch.Tensor, accumulate: int) -> NoiseSample | None:
        """Count the gathered rows of one step; the measurement when the running ``B_simple`` is finite and positive
        (then it is worth logging), else ``None``.
        """
        sample = noise_sample(rows, self.micro_batch or 0, accumulate)
        return sample if self.estimate.add(sample) is not None else None

    def close(self) -> None:
        """Drop the probe of a check in progress (the running estimate stays)."""
        if self.probe is not None:
            self.probe.close()
        self.probe = None
        self.micro_batch = None


class StaleProbe:
    """What happened to a few gradients between an optimizer step and the next step of the same optimizer.

    After step ``t`` it keeps a sample of each watched ``.grad`` (and a weak reference to the tensor). A hook on the
    parameter notes, at every later backward, whether ``.grad`` had been cleared (``None`` or zero) before the new
    gradient was added. At the next step a gradient is stale when backward reached it and never found it cleared,
    or when it is the very same tensor with the same values (re-applied untouched).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, step: int, params: list[torch.Tensor], size: int
    ) -> None:
        self.optimizer = optimizer
        self.step = step
        self.params = params
        self.base = [flat_sample(local_tensor(p.grad), size).clone() for p in params]  # type: ignore[arg-type]
        self.grads = [weakref.ref(p.grad) for p in params]
        self.touched = [False] * len(params)
        self.cleared_host = [False] * len(params)
        self.cleared = [torch.zeros((), dtype=torch.bool, device=b.device) for b in self.base]
        self.size = size
        self.handles = [p.register_hook(self._make_hook(i)) for i, p in enumerate(params)]

    def _make_hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(_grad: torch.Tensor) -> None:
            self.touched[i] = True
            current = self.params[i].grad
            if current is None:
                self.cleared_host[i] = True
            elif not self.cleared_host[i]:
                sample = flat_sample(local_tensor(current), self.size)
                self.cleared[i] = self.cleared[i] | (sample == 0).all()

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def verdict(self) -> torch.Tensor:
        """``[stale, judged]`` as a device tensor (no host read): how many watched gradients are stale, out of
        those that have a gradient at this step. A gradient whose sample was all zero after step ``t`` (weights of an
        input that is always 0, a dead unit) says nothing about clearing: backward finds it zero either way, so it is
        not judged.
        """
        self.close()
        device = self.cleared[0].device
        no = torch.zeros((), dtype=torch.bool, device=device)
        stale: list[torch.Tensor] = []
        judged: list[torch.Tensor] = []
        for i, p in enumerate(self.params):
            grad = p.grad
            if grad is None:
                continue  # no gradient to apply: nothing to judge
            informative = self.base[i].any()
            if self.cleared_host[i]:
                stale.append(no)  # cleared since the last step, then filled again: healthy
            elif self.touched[i]:
                stale.append(~self.cleared[i] & informative)
            elif self.grads[i]() is grad:
                # backward never reached it (or its hooks do not run, FSDP2): stale only if re-applied untouched
                sample = flat_sample(local_tensor(grad), self.size)
                stale.append((sample == self.base[i]).all() & informative)
            else:
                stale.append(no)
            judged.append(~no if self.cleared_host[i] else informative)
        if not stale:
            return torch.zeros(2, device=device)
        return torch.stack([torch.stack(stale).sum().float(), torch.stack(judged).sum().float()])


class StaleWatch:
    """The life of the stale-gradient probe: armed at a check step, started by that step's optimizer step (a
    post-hook), handed over at the next step of the same optimizer.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.probe: StaleProbe | None = None
        self.start: Any = None  # the optimizer post-hook that starts the probe

    def arm(self, optimizer: torch.optim.Optimizer, step: int, params: list[torch.Tensor]) -> None:
        """Watch up to ``STALE_TENSORS`` of ``params`` from the end of ``optimizer``'s step ``step``."""
        if self.probe is not None:
            self.probe.close()
        self.disarm()  # the hook of an earlier check that never ran (a skipped step) must not pile up
        start = functools.partial(self._start, step, spread(list(params), STALE_TENSORS))
        self.start = optimizer.register_step_post_hook(start)

    def _start(
        self, step: int, watched: list[torch.Tensor], optimizer: torch.optim.Optimizer, *_: Any
    ) -> None:
        if self.probe is not None and self.probe.step == step:
            return  # once per check (the hook is removed by `disarm`)
        live = [p for p in watched if p.grad is not None and p.requires_grad]  # (hooks need both)
        if live:  # gradients dropped before the step (a cancelled step): nothing to watch
            self.probe = StaleProbe(optimizer, step, live, self.size)

    def due(self, optimizer: torch.optim.Optimizer, step: int) -> StaleProbe | None:
        """The probe to judge now, at a later step of the optimizer it watches (then it is no longer held)."""
        probe = self.probe
        if probe is None or probe.optimizer is not optimizer or step <= probe.step:
            return None
        self.probe = None
        return probe

    def disarm(self) -> None:
        """Remove the starting post-hook (a step skipped by the GradScaler never runs it)."""
        if self.start is not None:
            self.start.remove()
            self.start = None

    def close(self) -> None:
        """Forget the probe and the starting hook (a checkpoint, the end of fit)."""
        if self.probe is not None:
            self.probe.close()
            self.probe = None
        self.disarm()


class NoOpProbe:
    """Samples of the parameters and gradients of one optimizer just before its step, compared right after it
    (up to ``PROBE_TENSORS`` of the parameters that have a gradient, :func:`per_group`).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, with_grad: list[torch.Tensor], size: int, finite: torch.Tensor
    ) -> None:
        params = per_group(optimizer, with_grad)
        self.params = params
        self.size = size
        self.before = self._sample(params)
        grads = self._sample([p.grad for p in params])  # type: ignore[misc]
        # only finite steps are judged: a step with a NaN/Inf gradient anywhere may be withheld on purpose
        # (GradScaler, a guard's device-side found_inf), which leaves the weights as they were
        self.live = (grads != 0) & torch.isfinite(grads) & finite.to(grads.device)
        self.result: tuple[torch.Tensor, torch.Tensor] | None = None
        self.cancelled = False
        self.lrs = [float(g.get("lr", math.nan)) for g in optimizer.param_groups]
        self.handle = optimizer.register_step_post_hook(self._after_step)

    def _sample(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([flat_sample(local_tensor(t), self.size).float() for t in tensors])  # a copy

    def _after_step(self, _optimizer: Any, _args: Any, _kwargs: Any) -> None:
        # (removed later, in on_train_batch_end: torch iterates over the hooks while calling this one)
        if self.result is not None or self.cancelled:
            return
        if all(p.grad is None for p in self.params):
            self.cancelled = True  # the step was cancelled (gradients dropped before it): nothing to judge
            return
        with torch.no_grad():
            moved = (self._sample([p.detach() for p in self.params]) != self.before) & self.live
            self.result = (self.live.sum(), moved.sum())

    def read(self) -> tuple[int, int] | None:
        """``(active, moved)`` of a step that ran (one host read): sampled elements that had a gradient to apply,
        and those of them that changed; ``None`` when the step was skipped or cancelled.
        """
        if self.cancelled or self.result is None:
            return None
        active, moved = (int(v) for v in torch.stack(self.result).tolist())
        return active, moved

    def close(self) -> None:
        self.handle.remove()
