"""A robust spike detector over a scalar series (a loss, a gradient norm), checkpointable.

Rule, for each new value ``x`` once ``warmup`` finite values have been seen::

    spike  <=>  x > mean + threshold * std   and   x > min_ratio * mean   (the ratio test only when mean > 0)

A spike must be practically large as well as statistically unusual: gradient norms and losses are heavy-tailed,
so a few standard deviations alone flag ordinary training (``min_ratio`` is the "practically large" part).
From the second finite value on (also during the warm-up), a value above ``extreme_ratio * mean`` is a spike
whatever the variance (a norm 1,000x its first values at step 1 is not something to wait 20 steps for).

A value that comes with a ``batch_size`` below ``partial_batch`` times the largest batch seen so far (the short
last batch of an epoch, ``drop_last=False``) is neither judged nor let into the statistics: the mean gradient of
3 samples is expected to be several times larger than that of 32.

``mean`` and ``std`` are exponential moving statistics with ``alpha = 2 / (window + 1)`` (the EMA whose centre
of mass is that of a ``window``-long moving average). The first ``warmup`` values seed them with exact running
mean and variance (Welford). Non-finite values and spikes never enter the statistics, so one bad step does not
raise the bar for the next one.

The detector works on host floats: NaNGuard reads the step's loss and gradient norm in the same single transfer
that carries its decision flags (after one all-reduce, so every rank feeds the same values and keeps the same
state), and a few float operations cost far less than the ~25 tiny device kernels the same rule needs on tensors.

Example:
    >>> detector = SpikeDetector(window=20, threshold=4.0, warmup=5)
    >>> [detector.update(v) for v in [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 9.0, 1.0]]
    [False, False, False, False, False, False, True, False]
    >>> sized = SpikeDetector(window=20, threshold=4.0, warmup=5)
    >>> [sized.update(v, batch_size=32) for v in [1.0, 1.1, 0.9, 1.0, 1.05, 0.95]]
    [False, False, False, False, False, False]
    >>> sized.update(9.0, batch_size=3), sized.update(9.0, batch_size=32)  # a short last batch is skipped
    (False, True)
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["DEFAULT_EXTREME_RATIO", "DEFAULT_PARTIAL_BATCH", "DEFAULT_SPIKE_RATIO", "SpikeDetector"]

#: The default ``min_ratio`` of every spike rule (GradNormMonitor and NaNGuard ``spike_ratio``): calibrated on
#: the diagnosis corpus (``benchmarks/diagnosis``), where no healthy run has a full-batch 6-sigma step above 3x
#: its running mean and the failing ones are 10x to 1e10x.
DEFAULT_SPIKE_RATIO = 5.0
#: A value this many times the running mean is a spike from the second value on, whatever the variance.
DEFAULT_EXTREME_RATIO = 100.0
#: Batches smaller than this share of the largest batch seen are not judged (the short last batch of an epoch).
DEFAULT_PARTIAL_BATCH = 0.5


class SpikeDetector:
    """Flag values far above the recent statistics of a series (see the module docstring for the rule).

    Args:
        window: the length of history the EMA statistics stand for (``alpha = 2 / (window + 1)``).
        threshold: how many standard deviations above the mean a value must be to count as a spike.
        min_ratio: a spike must also exceed ``min_ratio * mean`` (guards against tiny-variance series, where a
            few-percent bump is many standard deviations); ``1.0`` turns the guard off.
        warmup: finite values observed before the standard-deviation rule applies.
        extreme_ratio: a value above this times the mean is a spike from the second value on (``inf``: never).
        partial_batch: values of batches below this share of the largest batch seen are skipped (``0``: never).
    """

    def __init__(
        self,
        window: int = 100,
        threshold: float = 6.0,
        min_ratio: float = DEFAULT_SPIKE_RATIO,
        warmup: int = 20,
        extreme_ratio: float = DEFAULT_EXTREME_RATIO,
        partial_batch: float = DEFAULT_PARTIAL_BATCH,
    ) -> None:
        self.window = window
        self.threshold = threshold
        self.min_ratio = min_ratio
        self.warmup = warmup
        self.extreme_ratio = extreme_ratio
        self.partial_batch = partial_batch
        self.alpha = 2.0 / (window + 1.0)
        self.count = 0
        self.mean = 0.0
        self.var = 0.0
        self.max_batch = 0

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    def update(self, value: float, batch_size: int | None = None) -> bool:
        """Test ``value`` against the statistics so far, then let it in if it is finite and no spike.

        ``batch_size`` (the samples behind the value, optional): a batch below ``partial_batch`` times the largest
        seen so far is skipped (returns ``False``, statistics unchanged).
        """
        x = float(value)
        if not math.isfinite(x):
            return False
        if batch_size is not None:
            if batch_size < self.partial_batch * self.max_batch:
                return False
            self.max_batch = max(self.max_batch, int(batch_size))
        extreme = self.count >= 1 and self.mean > 0 and x > self.extreme_ratio * self.mean
        spike = extreme or (
            self.count >= self.warmup
            and x > self.mean + self.threshold * self.std
            and (self.mean <= 0 or x > self.min_ratio * self.mean)
        )
        if spike:
            return True
        delta = x - self.mean
        if self.count < self.warmup:  # Welford while seeding
            n = self.count + 1
            mean = self.mean + delta / n
            self.var = (self.var * (n - 1) + delta * (x - mean)) / n
            self.mean = mean
        else:  # EMA afterwards
            self.mean += self.alpha * delta
            self.var = (1 - self.alpha) * (self.var + self.alpha * delta * delta)
        self.count += 1
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "var": self.var, "max_batch": self.max_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state.get("count", self.count))
        self.mean = float(state.get("mean", self.mean))
        self.var = float(state.get("var", self.var))
        self.max_batch = int(state.get("max_batch", self.max_batch))
