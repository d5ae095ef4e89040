"""What one optimizer step's numbers say, for NaNGuard: non-finite values and spikes, as :class:`StepFlags`.

A step reaches the judge as four numbers, already summed over the ranks that hold them: ``[input sum, parameter
norm, loss, gradient norm]`` (a sum of tensors is non-finite exactly when one of its elements is). The judge turns
them into flags and feeds the loss and the gradient norm to two robust spike detectors
(:class:`~lightning_diag.core.spikes.SpikeDetector`, the one spike rule of the suite); non-finite values and
spikes never enter their statistics. The same numbers on every rank give the same flags and the same detector
state on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lightning_diag.core.batches import batch_size, floating
from lightning_diag.core.guard.policy import StepFlags
from lightning_diag.core.nan_trace import first_non_finite
from lightning_diag.core.spikes import SpikeDetector

__all__ = ["ROW", "StepJudge", "StepWindow"]

#: The layout of a step's row of numbers.
ROW = ("input_sum", "params_norm", "loss", "grad_norm")


class StepWindow:
    """The micro-batches of the optimizer step in progress and their device-side sums (no host sync)."""

    def __init__(self) -> None:
        self.clear()

    _zero: torch.Tensor | None = None

    def clear(self) -> None:
        self.batches: list[tuple[Any, int]] = []
        self.input_sum: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None

    def add_batch(self, batch: Any, batch_idx: int, *, check_inputs: bool) -> None:
        """A micro-batch: kept (for a replay), and the sum of each float tensor added to the input sum."""
        self.batches.append((batch, batch_idx))
        if not check_inputs:
            return
        with torch.no_grad():
            for tensor in floating(batch):
                # The sum of a tensor is non-finite exactly when an element is (float32 accumulation cannot
                # overflow on real data): one cheap reduction per tensor, read with the step's decision.
                total = tensor.sum(dtype=torch.float32)
                self.input_sum = (
                    total if self.input_sum is None else self.input_sum + total.to(self.input_sum.device)
                )

    def add_loss(self, loss: torch.Tensor, inv_scale: torch.Tensor | None = None) -> None:
        """A micro-batch's loss (``inv_scale``: undo a GradScaler's scale), summed over the step: Lightning already
        divided each by ``accumulate_grad_batches``, so the sum is the step's loss, non-finite if any part was.
        """
        value = loss.detach().float().sum()
        if inv_scale is not None:
            value = value * inv_scale.to(value.device)
        self.loss = value if self.loss is None else self.loss + value

    def row(
        self, params_norm: torch.Tensor | None, grad_norm: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor:
        """``[input sum, parameter norm, loss, gradient norm]`` (the layout of :data:`ROW`), a device vector; a part
        not measured this step (``None``) is 0.
        """
        if self._zero is None or self._zero.device != device:
            self._zero = torch.zeros((), device=device)
        zero = self._zero
        parts = (self.input_sum, params_norm, self.loss, grad_norm)
        return torch.stack([zero if t is None else t.float().to(device) for t in parts])

    @property
    def samples(self) -> int | None:
        """The samples of the step (all its micro-batches), ``None`` when unknown."""
        return sum(batch_size(b) for b, _ in self.batches) or None

    @property
    def batch_idx(self) -> str:
        """The batch indices of the step's micro-batches, ``"3,4"``."""
        return ",".join(str(i) for _, i in self.batches)

    def info(self, epoch: int, names: Sequence[str]) -> dict[str, Any]:
        """What a deferred step keeps for its judgement at a later logging step (plain values: it travels in
        checkpoints): ``epoch``, ``has_loss``, ``samples``, the gradient tensors' ``names``, ``batch_idx``.
        """
        return {
            "epoch": int(epoch),
            "has_loss": self.loss is not None,
            "samples": self.samples,
            "names": list(names),
            "batch_idx": self.batch_idx,
        }

    def first_non_finite(self) -> tuple[str, str] | None:
        """``(tensor, kind)`` of the first NaN/Inf in the step's batches (a host read of each), else ``None``."""
        for batch, _ in self.batches:
            bad = first_non_finite(batch)
            if bad is not None:
                return bad
        return None


class StepJudge:
    """Flags and spike detection for NaNGuard (state: the two detectors)."""

    def __init__(
        self, window: int, threshold: float, ratio: float, warmup: int, *, check_spikes: bool
    ) -> None:
        self.settings = (window, threshold, ratio, warmup)
        self.check_spikes = check_spikes
        self.reset()

    def reset(self) -> None:
        self.loss_spikes = SpikeDetector(*self.settings)
        self.grad_spikes = SpikeDetector(*self.settings)

    def judge(
        self,
        row: Sequence[float],
        *,
        ranks: int,
        scaled: bool,
        has_loss: bool,
        has_grads: bool = True,
        samples: int | None = None,
    ) -> tuple[StepFlags, dict[str, float]]:
        """The step's flags and its loss and gradient norm (per rank).

        ``ranks``: how many ranks the loss and norm are summed over; ``scaled``: a GradScaler handles overflowing
        gradients (it skips the step and lowers the scale: not a failure); ``samples``: the step's batch size (a
        short last batch of an epoch is noisier and is not judged for spikes).

        Example:
            >>> judge = StepJudge(100, 6.0, 5.0, 20, check_spikes=True)
            >>> flags, values = judge.judge([1.0, 2.0, float("nan"), 3.0], ranks=1, scaled=False, has_loss=True)
            >>> flags.loss, flags.grads, values["grad_norm"]
            (True, False, 3.0)
        """
        input_sum, params_norm, loss, grad_norm = row
        loss, grad_norm = loss / ranks, grad_norm / ranks
        loss_spike = grad_spike = False
        if self.check_spikes:
            if has_loss:
                loss_spike = self.loss_spikes.update(loss, samples)
            if has_grads:
                grad_spike = self.grad_spikes.update(grad_norm, samples)
        flags = StepFlags(
            input=not math.isfinite(input_sum),
            loss=not math.isfinite(loss),
            grads=not math.isfinite(grad_norm) and not scaled,
            params=not math.isfinite(params_norm),
            loss_spike=loss_spike,
            grad_spike=grad_spike,
        )
        return flags, {"loss": loss, "grad_norm": grad_norm}

    def state_dict(self) -> dict[str, Any]:
        return {"loss_spikes": self.loss_spikes.state_dict(), "grad_spikes": self.grad_spikes.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "loss_spikes" in state:
            self.loss_spikes.load_state_dict(state["loss_spikes"])
        if "grad_spikes" in state:
            self.grad_spikes.load_state_dict(state["grad_spikes"])
