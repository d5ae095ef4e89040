"""The gradient-norm rules of GradNormMonitor and the words of their findings: exploding, vanishing, AMP overflow.

* :class:`NormHistory` replays the total norms of the steps since the last logging step, in order, through the
  spike rule (:class:`~lightning_diag.core.spikes.SpikeDetector`, the one spike rule of the suite) and an optional
  absolute threshold, and counts what the GradScaler skipped; non-finite steps never enter the statistics.
* :class:`VanishingRule` judges per leaf module at the logging steps: an early layer whose norm stays below
  ``ratio`` times the largest late-layer norm for ``patience`` checks in a row.
* :func:`amp_verdict` says when a GradScaler's overflows stopped being normal.

Nothing here touches a model or a Trainer; the callback gathers the norms and records what these return.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from lightning_diag.core.spikes import SpikeDetector
from lightning_diag.core.verdict import Verdict

__all__ = [
    "EXPLODING_ADVICE",
    "SHRUNK_RATIO",
    "VANISHING_ADVICE",
    "NormHistory",
    "Replay",
    "VanishingRule",
    "amp_verdict",
    "exploding_verdict",
    "non_finite_gradients_verdict",
    "vanishing_layers",
]

EXPLODING_ADVICE = [
    "Clip gradients (GradClip(max_norm=1.0), or an adaptive algorithm such as algorithm='zscore').",
    "Lower the learning rate, or add/extend a warmup (WarmupCosine).",
    "Check the initialisation and add normalisation (LayerNorm/BatchNorm) or residual connections in deep stacks.",
    "Under fp16, prefer bf16 or make sure the loss is scaled (16-mixed uses a GradScaler).",
]
#: Parameters whose total norm fell below this share of its first value have collapsed (see VanishingRule).
SHRUNK_RATIO = 0.25

VANISHING_ADVICE = [
    "Prefer non-saturating activations (ReLU/GELU/SiLU) over sigmoid/tanh in deep stacks.",
    "Use an initialisation matched to the activation (Kaiming for ReLU, Xavier for tanh).",
    "Add residual connections and normalisation layers so gradients reach the early layers.",
    "Check for frozen or detached paths (a `.detach()`, `torch.no_grad()`, an unused branch).",
]


@dataclasses.dataclass
class Replay:
    """What the steps since the last replay showed."""

    #: steps above the spike rule or the absolute threshold, and the worst of them
    flagged: int = 0
    worst: float = 0.0
    worst_ratio: float = 0.0
    worst_step: int = -1
    worst_mean: float = 0.0
    #: steps with a non-finite total norm and no GradScaler to skip them
    non_finite: int = 0


class NormHistory:
    """The running statistics of the total gradient norm, replayed on the host from the pending steps.

    Args:
        spike_window, spike_threshold, spike_ratio, spike_warmup_steps: the spike rule's settings.
        exploding_threshold: a total norm above this is exploding (``None``: only the spike rule applies).
    """

    def __init__(
        self,
        spike_window: int,
        spike_threshold: float,
        spike_ratio: float,
        spike_warmup_steps: int,
        exploding_threshold: float | None,
    ) -> None:
        self.settings = (spike_window, spike_threshold, spike_ratio, spike_warmup_steps)
        self.exploding_threshold = exploding_threshold
        self.reset()

    def reset(self) -> None:
        self.spikes = SpikeDetector(*self.settings)
        self.skipped = 0  # steps the GradScaler skipped
        self.skip_run = 0  # current run of consecutive skipped steps
        self.max_run = 0  # longest run of skipped steps since the last AMP check

    def replay(
        self,
        steps: Sequence[int],
        totals: Sequence[float],
        samples: Sequence[int],
        *,
        scaled: bool,
        check_spikes: bool = True,
    ) -> Replay:
        """Run the statistics over the steps, in order; ``samples``: each step's batch size (0: unknown; a short
        last batch of an epoch is not judged for spikes); ``scaled``: a GradScaler skips non-finite steps;
        ``check_spikes``: apply the spike rule (off when another callback owns spikes of the total norm).
        """
        found = Replay()
        for step, total, size in zip(steps, totals, samples, strict=True):
            if not math.isfinite(total):
                if scaled:  # the GradScaler skips this step: count it, keep it out of the statistics
                    self.skipped += 1
                    self.skip_run += 1
                    self.max_run = max(self.max_run, self.skip_run)
                else:
                    found.non_finite += 1
                continue
            self.skip_run = 0
            mean = self.spikes.mean
            spike = check_spikes and self.spikes.update(
                total, size or None
            )  # spikes stay out of the statistics
            over = self.exploding_threshold is not None and total > self.exploding_threshold
            if spike or over:
                found.flagged += 1
                if total > found.worst:
                    found.worst, found.worst_ratio = total, total / max(mean, 1e-12)
                    found.worst_step, found.worst_mean = step, mean
        return found

    def state_dict(self) -> dict[str, Any]:
        return {"spikes": self.spikes.state_dict(), "skipped": self.skipped, "skip_run": self.skip_run}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "spikes" in state:
            self.spikes.load_state_dict(state["spikes"])
        self.skipped = int(state.get("skipped", self.skipped))
        self.skip_run = int(state.get("skip_run", self.skip_run))


def exploding_verdict(
    found: Replay, threshold: float | None, worst_norms: Sequence[float], names: Sequence[str]
) -> Verdict:
    """The worst flagged step of a replay, with the largest tensors of that step."""
    top = sorted(zip(worst_norms, names, strict=True), reverse=True)[:3]
    layers = ", ".join(f"{n} ({v:.3g})" for v, n in top)
    over = threshold is not None and found.worst > threshold
    why = (
        f"above `exploding_threshold`={threshold:g}"
        if over
        else f"{found.worst_ratio:.1f}x its running mean {found.worst_mean:.3g}"
    )
    return Verdict(
        "exploding_gradients",
        "warning",
        f"Gradient norm reached {found.worst:.4g} at step {found.worst_step} ({why}); {found.flagged} flagged step(s) "
        f"in this interval. Largest tensors: {layers}.",
        {
            "worst_norm": found.worst,
            "worst_step": found.worst_step,
            "ratio_to_mean": found.worst_ratio,
            "running_mean": found.worst_mean,
            "flagged_steps": found.flagged,
            "largest_tensors": layers,
        },
        list(EXPLODING_ADVICE),
    )


def non_finite_gradients_verdict(steps: int, guarded: bool) -> Verdict:
    """Steps with a non-finite gradient norm and no GradScaler; ``guarded``: a guard decided what to do with them."""
    what = (
        f"{steps} step(s) had a non-finite gradient norm (NaN/Inf gradients, or finite ones too large for "
        "float32) without a GradScaler to skip them"
    )
    return Verdict(
        "non_finite_gradients",
        "warning" if guarded else "error",
        what
        + (
            ": NaNGuard decided what to do with them (see its findings)."
            if guarded
            else ": the parameters took those updates."
        ),
        {"steps": steps},
        [
            "See NaNGuard's finding for where the first non-finite value appeared."
            if guarded
            else "Add NaNGuard to skip such steps and locate the layer that produced the first non-finite value."
        ],
    )


def amp_verdict(
    scale: float, skipped: int, max_run: int, min_scale: float, max_consecutive_skips: int
) -> Verdict | None:
    """A collapsed loss scale or a persistent run of overflows (occasional skips are normal)."""
    collapsed = scale < min_scale
    if not (collapsed or max_run >= max_consecutive_skips):
        return None
    what = (
        f"the loss scale collapsed to {scale:g}" if collapsed else f"{max_run} consecutive steps overflowed"
    )
    return Verdict(
        "amp_overflow",
        "warning",
        f"GradScaler: {what}; {int(skipped)} step(s) skipped so far. Occasional skips are normal, this is not.",
        {"scale": scale, "skipped_steps": int(skipped), "max_consecutive_skips": max_run},
        [
            "Gradients overflow fp16 even at a small scale: the model produces values beyond fp16's range.",
            "Switch to bf16-mixed (same speed on recent GPUs, no overflow), or lower the learning rate.",
            "Add NaNGuard to see whether the values are truly non-finite (a bug) rather than large.",
        ],
    )


def vanishing_layers(
    names: Sequence[str], norms: Sequence[float], ratio: float, floor: float
) -> tuple[list[tuple[str, float]], float]:
    """Early layers whose gradient is ~0 next to the late layers': the vanishing-gradient rule, per leaf module.

    ``names``/``norms`` are the leaf modules in registration order (a proxy for depth) and their gradient norms.
    The first half are the early layers, the rest the late ones. An early layer is vanishing when its norm is below
    ``ratio`` times the largest late-layer norm; a layer anywhere whose gradient is exactly 0 is too (it is in the
    graph, a ``0 * x`` or a dead path, but learns nothing). When every late layer is itself at or below ``floor`` nothing is
    vanishing: all layers small together is a converged (or dead) model, not gradients that fail to reach the
    early layers. Returns the vanishing ``(name, norm)`` and the largest late-layer norm.

    Example:
        >>> vanishing_layers(["l0", "l1", "l2", "l3"], [1e-9, 0.2, 0.3, 0.5], 1e-4, 1e-8)
        ([('l0', 1e-09)], 0.5)
        >>> vanishing_layers(["l0", "l1", "l2", "l3"], [1e-9, 1e-9, 1e-9, 1e-9], 1e-4, 1e-8)[0]  # converged
        []
        >>> vanishing_layers(["l0", "l1", "dead"], [0.2, 0.3, 0.0], 1e-4, 1e-8)[0]  # a late branch times 0
        [('dead', 0.0)]
    """
    finite = [(n, v) for n, v in zip(names, norms, strict=True) if math.isfinite(v)]
    if len(finite) < 2 or len(finite) != len(names):
        return [], 0.0
    half = len(finite) // 2
    late_max = max(v for _, v in finite[half:])
    if late_max <= floor:
        return [], late_max
    return [
        (n, v) for i, (n, v) in enumerate(finite) if (i < half and v < ratio * late_max) or v == 0.0
    ], late_max


class VanishingRule:
    """Early leaf modules whose gradient norm stays far below the late layers' for ``patience`` checks in a row."""

    def __init__(self, ratio: float, threshold: float, patience: int) -> None:
        self.ratio = ratio
        self.threshold = threshold
        self.patience = patience
        self.streak: dict[str, int] = {}

    def check(
        self, names: Sequence[str], norms: Sequence[float], param_ratio: float | None = None
    ) -> Verdict | None:
        """One check of the per-leaf-module norms (in registration order); a verdict once a layer's streak lasts.

        ``param_ratio``: the parameters' total norm now over its value at the first check; below
        :data:`SHRUNK_RATIO` the weights themselves collapsed (a weight decay far too strong), and the vanishing
        gradients are its consequence, not a cause.
        """
        vanishing, late_max = vanishing_layers(list(names), list(norms), self.ratio, self.threshold)
        flagged = {n for n, _ in vanishing}
        for name in names:
            self.streak[name] = self.streak.get(name, 0) + 1 if name in flagged else 0
        lasting = [(n, v) for n, v in vanishing if self.streak[n] >= self.patience]
        if not lasting:
            return None
        listed = ", ".join(f"{n} ({v:.3g})" for n, v in lasting[:8])
        smallest = min(v for _, v in lasting)
        zero = " (exactly 0: no gradient reaches them at all)" if smallest == 0 else ""
        shrunk = param_ratio is not None and param_ratio < SHRUNK_RATIO
        extra: dict[str, Any] = {"param_norm_ratio": round(param_ratio, 6)} if param_ratio is not None else {}
        advice = list(VANISHING_ADVICE)
        if shrunk:
            extra["weights_shrunk"] = 1
            advice = [
                f"The parameters shrank to {param_ratio:.1%} of their norm at the start: a weight decay (or L2 "
                "term) far too strong holds them near 0, and the gradients through them vanish with them. Lower "
                "`weight_decay` (AdamW's decoupled decay at 0.01-0.1; with Adam/SGD an L2 term of 1e-4-1e-2).",
                *advice,
            ]
        return Verdict(
            "vanishing_gradients",
            "warning",
            f"{len(lasting)} of {len(names)} layers get (almost) no gradient: below {self.ratio:g}x the "
            f"largest late-layer norm ({late_max:.3g}) at {self.patience} checks in a row{zero}: {listed}.",
            {
                "layers": ", ".join(n for n, _ in lasting),
                "smallest_norm": smallest,
                "late_max_norm": late_max,
                "ratio": self.ratio,
                "threshold": self.threshold,
                "leaf_modules": len(names),
                **extra,
            },
            advice,
        )
