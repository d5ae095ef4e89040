"""Learning-rate schedules as pure functions of the step.

No optimizer, no state: ``warmup_cosine(step, ...)`` returns the learning rate for ``step`` (0-based), so a
resumed run reproduces the uninterrupted sequence exactly and tests need nothing but numbers.
"""

from __future__ import annotations

import math

__all__ = ["cycle_lengths", "warmup_cosine"]


def cycle_lengths(decay_steps: float, num_cycles: int, cycle_mul: float) -> list[float]:
    """Lengths of the cosine cycles that together span ``decay_steps``.

    Cycle ``i`` is ``cycle_mul**i`` times as long as the first, as in SGDR (Loshchilov & Hutter, 2017).
    """
    weights = [cycle_mul**i for i in range(num_cycles)]
    first = decay_steps / sum(weights)
    return [first * w for w in weights]


def warmup_cosine(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start_lr: float = 0.0,
    min_lr: float = 0.0,
    num_cycles: int = 1,
    cycle_mul: float = 1.0,
    cycle_decay: float = 1.0,
) -> float:
    """Learning rate at ``step`` of a linear warmup followed by (possibly restarted) cosine decay.

    The warmup is a prefix: for ``step < warmup_steps`` the rate goes linearly from ``warmup_start_lr`` (at step 0)
    towards ``base_lr`` (reached at step ``warmup_steps``). The remaining ``total_steps - warmup_steps`` steps are
    split into ``num_cycles`` cosine cycles, cycle ``i`` being ``cycle_mul**i`` times as long as the first and
    starting from ``base_lr * cycle_decay**i`` (never below ``min_lr``); each cycle decays to ``min_lr``.
    From ``total_steps`` on the rate stays at ``min_lr``.

    With ``warmup_start_lr=0, min_lr=0, num_cycles=1`` this is HuggingFace's
    ``get_cosine_schedule_with_warmup``; in general it is timm's ``CosineLRScheduler`` with ``warmup_prefix=True``,
    ``cycle_limit=num_cycles`` and ``t_initial`` the first cycle's length, except that a decayed peak is not
    allowed under ``min_lr`` (timm's rate would then dip below its own floor).

    Args:
        step: the 0-based optimizer step (or epoch) to evaluate.
        base_lr: the peak rate, reached at the end of warmup.
        total_steps: length of the whole schedule, warmup included.
        warmup_steps: length of the linear warmup; must be ``< total_steps``.
        warmup_start_lr: the rate at step 0 of the warmup.
        min_lr: the floor every cosine cycle decays to.
        num_cycles: number of cosine cycles (warm restarts) after warmup.
        cycle_mul: each cycle is this many times as long as the previous one.
        cycle_decay: each cycle's peak is this many times the previous one's.

    Returns:
        The learning rate as a Python float.

    Raises:
        ValueError: for a negative step, ``total_steps < 1``, ``warmup_steps`` outside ``[0, total_steps)``,
            ``num_cycles < 1`` or a non-positive ``cycle_mul``/``cycle_decay``.

    Example:
        >>> round(warmup_cosine(0, base_lr=1.0, total_steps=10, warmup_steps=2, warmup_start_lr=0.1), 3)
        0.1
        >>> warmup_cosine(2, base_lr=1.0, total_steps=10, warmup_steps=2)
        1.0
        >>> warmup_cosine(10, base_lr=1.0, total_steps=10, warmup_steps=2, min_lr=0.01)
        0.01
    """
    if step < 0:
        raise ValueError(f"`step` must be >= 0, got {step!r}.")
    if total_steps < 1:
        raise ValueError(f"`total_steps` must be >= 1, got {total_steps!r}.")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"`warmup_steps` must be in [0, total_steps={total_steps}), got {warmup_steps!r}: "
            "the warmup must leave at least one step for the cosine decay."
        )
    if num_cycles < 1:
        raise ValueError(f"`num_cycles` must be >= 1, got {num_cycles!r}.")
    if cycle_mul <= 0:
        raise ValueError(f"`cycle_mul` must be > 0, got {cycle_mul!r}.")
    if cycle_decay <= 0:
        raise ValueError(f"`cycle_decay` must be > 0, got {cycle_decay!r}.")

    if step < warmup_steps:
        return warmup_start_lr + (base_lr - warmup_start_lr) * step / warmup_steps
    if step >= total_steps:
        return min_lr

    t = float(step - warmup_steps)
    start = 0.0
    for i, length in enumerate(cycle_lengths(total_steps - warmup_steps, num_cycles, cycle_mul)):
        if t < start + length or i == num_cycles - 1:
            peak = max(base_lr * cycle_decay**i, min_lr)
            progress = min((t - start) / length, 1.0)
            return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))
        start += length
    return min_lr  # pragma: no cover - the loop always returns on its last cycle
