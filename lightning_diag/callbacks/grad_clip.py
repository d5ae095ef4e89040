"""GradClip: AMP-aware gradient clipping (fixed and adaptive), reporting what it did."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_diag import _lightning, _logging
from lightning_diag._validation import (
    ArgumentError,
    ConfigurationError,
    Unused,
    check_choice,
    check_int,
    check_positive,
    check_range,
    check_unused,
    renamed,
)
from lightning_diag.callbacks._base import DiagCallback
from lightning_diag.callbacks._context import step_context
from lightning_diag.core.clipping import (
    AutoClip,
    ZScoreClip,
    agc_,
    apply_coefficient_,
    clip_coefficient,
    clip_value_,
)
from lightning_diag.core.grad_stats import max_abs, tensor_norms, total_from_norms

__all__ = ["GradClip"]

Algorithm = Literal["norm", "value", "agc", "autoclip", "zscore"]


#: The arguments each algorithm reads (any other one set away from its default is refused).
_USES: dict[str, set[str]] = {
    "norm": {"max_norm", "norm_type"},
    "value": {"clip_value"},
    "agc": {"agc_factor", "agc_eps", "agc_exclude"},
    "autoclip": {"max_norm", "norm_type", "percentile", "history_size"},
    "zscore": {"max_norm", "norm_type", "zscore_threshold", "zscore_window", "zscore_warmup_steps"},
}


def _ignores(name: str) -> Callable[[Mapping[str, Any]], bool]:
    return lambda given: name not in _USES[given["algorithm"]]


def _algorithm(given: Mapping[str, Any]) -> str:
    return f"`algorithm={given['algorithm']!r}`"


#: One row per argument: it has no effect under the algorithms that do not read it (``check_unused``).
_UNUSED = tuple(
    Unused(
        (name,),
        _ignores(name),
        _algorithm,
        f"choose an algorithm that uses it ({', '.join(a for a, u in _USES.items() if name in u)})",
    )
    for name in sorted(set().union(*_USES.values()))
)


class GradClip(DiagCallback):
    """Clip the *unscaled* gradients in ``on_before_optimizer_step``, with fixed or adaptive thresholds.

    Under 16-bit AMP Lightning unscales the gradients before this hook, so thresholds mean what they say. The
    total norm comes from the statistics shared with GradNormMonitor (computed once, before any clipping). A
    clip is a multiply by ``min(1, threshold / norm)`` on device: no host synchronisation. Steps whose norm is
    NaN/Inf are left alone (the GradScaler skips them; NaNGuard handles them otherwise) and never enter the
    adaptive statistics.

    Args:
        algorithm: ``"norm"`` (total norm capped at ``max_norm``), ``"value"`` (elements clamped to
            ``±clip_value``), ``"agc"`` (unit-wise adaptive clipping), ``"autoclip"`` (threshold = a percentile of
            the norm history) or ``"zscore"`` (threshold = EMA mean + ``zscore_threshold`` EMA std). Named like
            Lightning's ``gradient_clip_algorithm``.
        max_norm: the threshold of ``"norm"`` (required there); an upper cap for ``"autoclip"``/``"zscore"``.
        norm_type: p of the p-norm for the norm-based modes.
        clip_value: the bound of ``"value"``.
        agc_factor: AGC's λ: unit gradient norms are kept under ``λ * max(|W_unit|, agc_eps)`` (0.01 suits large
            batches; small batches want larger values).
        agc_eps: AGC's floor on the weight norm (so zero-initialised parameters can still move).
        agc_exclude: parameter-name prefixes AGC leaves alone (``None``: the model's last layer, i.e. the module
            owning the last registered parameter, as recommended for the classifier head; ``[]``: nothing).
        percentile: ``"autoclip"``'s percentile, in ``(0, 100]``.
        history_size: ``"autoclip"``'s bounded history of finite norms.
        zscore_threshold: ``"zscore"``'s threshold in standard deviations.
        zscore_window: ``"zscore"``'s EMA span in optimizer steps (``alpha = 2 / (zscore_window + 1)``, the same
            EMA as NaNGuard's and GradNormMonitor's spike statistics).
        zscore_warmup_steps: ``"zscore"``: finite norms observed (unclipped) before clipping starts.
        spike_threshold: deprecated name of ``zscore_threshold`` (until the next release).
        spike_window: deprecated name of ``zscore_window`` (until the next release).
        spike_warmup_steps: deprecated name of ``zscore_warmup_steps`` (until the next release).

    Logged metrics (at the logging interval):
        ==========================  ==============================================================
        key                         value
        ==========================  ==============================================================
        ``diag/clip/pre_norm``      total gradient norm before clipping (unscaled)
        ``diag/clip/post_norm``     total gradient norm after clipping
        ``diag/clip/coef``          ``post_norm / pre_norm`` (1 = untouched)
        ``diag/clip/rate``          share of optimizer steps clipped since the previous log
        ``diag/clip/threshold``     the threshold in force (norm-based modes)
        ==========================  ==============================================================

    Findings:
        None: clipping is an action; GradNormMonitor reports the gradients themselves.

    Raises:
        ValueError: (``ArgumentError``, also a ``MisconfigurationException``) at construction for an unknown
            algorithm, a non-positive threshold, ``norm_type < 1``, a percentile outside ``(0, 100]``,
            ``algorithm="norm"`` without ``max_norm``, or an argument the chosen algorithm does not read (e.g.
            ``agc_exclude`` outside ``"agc"``); at ``setup`` when ``Trainer(gradient_clip_val=...)`` is also set
            (the gradients would be clipped twice).

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_diag import GradClip
        >>> trainer = pl.Trainer(callbacks=[GradClip(algorithm="zscore", zscore_threshold=2.5, max_norm=5.0)])

    Note:
        Fused optimizers (``AdamW(fused=True)``) under a GradScaler unscale inside ``step()``, so their gradients
        are still scaled in this hook. GradClip handles them: norms are divided by the scale and the (linear)
        clip applies to the scaled values, so the optimizer's own unscaling and inf check still work. Under DDP
        the gradients are identical on every rank, so every rank computes the same coefficient; under FSDP2 the
        total norm is global. Gradient accumulation: one clip per optimizer step, on the accumulated gradients.
    """

    renamed_arguments: ClassVar[dict[str, str]] = {
        "spike_threshold": "zscore_threshold",
        "spike_window": "zscore_window",
        "spike_warmup_steps": "zscore_warmup_steps",
    }

    def __init__(
        self,
        algorithm: Algorithm = "norm",
        max_norm: float | None = None,
        norm_type: float = 2.0,
        clip_value: float = 1.0,
        agc_factor: float = 0.01,
        agc_eps: float = 1e-3,
        agc_exclude: list[str] | None = None,
        percentile: float = 10.0,
        history_size: int = 1000,
        zscore_threshold: float = 2.5,
        zscore_window: int = 66,
        zscore_warmup_steps: int = 25,
        spike_threshold: float | None = None,
        spike_window: int | None = None,
        spike_warmup_steps: int | None = None,
    ) -> None:
        super().__init__()
        zscore_threshold = renamed(GradClip.__init__, locals(), "spike_threshold", "zscore_threshold")
        zscore_window = renamed(GradClip.__init__, locals(), "spike_window", "zscore_window")
        zscore_warmup_steps = renamed(
            GradClip.__init__, locals(), "spike_warmup_steps", "zscore_warmup_steps"
        )
        check_choice("algorithm", algorithm, ("norm", "value", "agc", "autoclip", "zscore"))
        if max_norm is not None:
            check_positive("max_norm", max_norm)
        elif algorithm == "norm":
            raise ArgumentError(
                "`max_norm` must be set for algorithm='norm', got None. For example GradClip(max_norm=1.0)."
            )
        check_range("norm_type", norm_type, 1.0, allow_inf=True)
        check_positive("clip_value", clip_value)
        check_positive("agc_factor", agc_factor)
        check_positive("agc_eps", agc_eps)
        if agc_exclude is not None and (
            not isinstance(agc_exclude, (list, tuple)) or not all(isinstance(p, str) for p in agc_exclude)
        ):
            raise ArgumentError(
                f"`agc_exclude` must be a list of parameter-name prefixes, got {agc_exclude!r}."
            )
        check_range("percentile", percentile, 0.0, 100.0, low_open=True)
        check_int("history_size", history_size, minimum=1)
        check_positive("zscore_threshold", zscore_threshold)
        check_int("zscore_window", zscore_window, minimum=1)
        check_int("zscore_warmup_steps", zscore_warmup_steps, minimum=0)
        check_unused(GradClip.__init__, locals(), _UNUSED)
        self.algorithm = algorithm
        self.max_norm = max_norm
        self.norm_type = float(norm_type)
        self.clip_value = float(clip_value)
        self.agc_factor = float(agc_factor)
        self.agc_eps = float(agc_eps)
        self.agc_exclude = agc_exclude
        self.percentile = float(percentile)
        self.history_size = history_size
        self.zscore_threshold = float(zscore_threshold)
        self.zscore_window = zscore_window
        self.zscore_warmup_steps = zscore_warmup_steps
        self._adaptive: AutoClip | ZScoreClip | None = None
        self._reset_state()

    def _reset_state(self) -> None:
        if self.algorithm == "autoclip":
            self._adaptive = AutoClip(self.percentile, self.history_size)
        elif self.algorithm == "zscore":
            decay = 1.0 - 2.0 / (self.zscore_window + 1.0)
            self._adaptive = ZScoreClip(self.zscore_threshold, decay, self.zscore_warmup_steps)
        # Per step since the last log: the clip coefficient (norm-based modes) or a "clipped" flag (others).
        # Kept as device tensors and reduced at the logging step, so a quiet step adds no kernel for the rate.
        self._since_log: list[torch.Tensor] = []
        self._threshold_tensor: torch.Tensor | None = None  # max_norm as a device tensor (mode="norm")
        self._excluded: tuple[str, ...] = ()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            algorithm=self.algorithm, max_norm=self.max_norm, norm_type=self.norm_type
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        _lightning.check_strategy(trainer, "GradClip")
        if trainer.gradient_clip_val:
            raise ConfigurationError(
                f"GradClip and `Trainer(gradient_clip_val={trainer.gradient_clip_val})` would both clip the gradients. "
                "Remove `gradient_clip_val` from the Trainer (GradClip(algorithm='norm', max_norm=...) does the same, "
                "AMP-aware and logged), or remove GradClip."
            )
        if self.algorithm == "agc":
            if self.agc_exclude is not None:
                self._excluded = tuple(self.agc_exclude)
            else:
                names = [n for n, _ in pl_module.named_parameters()]
                head = (
                    names[-1].rsplit(".", 1)[0] + "."
                    if names and "." in names[-1]
                    else (names[-1] if names else "")
                )
                self._excluded = (head,) if head else ()

    # -- per step ---------------------------------------------------------------------------------------------
    def _fixed_threshold(self, like: torch.Tensor) -> torch.Tensor:
        if self._threshold_tensor is None or self._threshold_tensor.device != like.device:
            self._threshold_tensor = torch.tensor(float(self.max_norm or math.inf), device=like.device)
        return self._threshold_tensor

    @override
    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = step_context(trainer, pl_module, optimizer)
        if not step.grads or step.skipped:
            return  # nothing to clip, or a guard withheld this update
        stats = step.grad_stats(self.norm_type)  # pre-clip, shared
        names, params, grads = step.names, step.params, step.grads
        pre = stats.total_norm
        threshold: torch.Tensor | None = None
        if self.algorithm in ("norm", "autoclip", "zscore"):
            if self.algorithm == "norm":
                threshold = self._fixed_threshold(pre)
            else:
                assert self._adaptive is not None
                threshold = self._adaptive.update(pre)
                if self.max_norm is not None:
                    threshold = threshold.clamp(max=self.max_norm)
            coef = clip_coefficient(pre, threshold)
            apply_coefficient_(grads, coef, step.device)
            clipped = coef
        elif self.algorithm == "value":
            bound: float | torch.Tensor = self.clip_value
            if stats.inv_scale is not None:
                # The gradients are still loss-scaled, and an overflowed step must stay non-finite so that the
                # optimizer's own inf check skips it (the GradScaler then lowers the scale): no clamp there.
                bound = torch.where(
                    torch.isfinite(pre), self.clip_value / stats.inv_scale, torch.full_like(pre, math.inf)
                )
            peak = max_abs(grads).max()
            if stats.inv_scale is not None:
                peak = peak * stats.inv_scale
            clipped = ~(torch.isfinite(peak) & (peak > self.clip_value))  # as a coefficient: 0 when clipped
            clip_value_(grads, bound)
        else:
            keep = [i for i, n in enumerate(names) if not n.startswith(self._excluded)]
            clipped = ~agc_(
                [params[i] for i in keep],
                [grads[i] for i in keep],
                self.agc_factor,
                self.agc_eps,
                stats.inv_scale,
            )
        self._since_log.append(clipped)
        if _logging.should_log_step(trainer):
            self._log(pl_module, stats, grads, threshold, pre)

    def _log(
        self,
        pl_module: pl.LightningModule,
        stats: Any,
        grads: list[torch.Tensor],
        threshold: Any,
        pre: torch.Tensor,
    ) -> None:
        if threshold is not None:
            post = torch.where(torch.isfinite(pre), torch.minimum(pre, threshold.to(pre.device)), pre)
        else:
            norms = tensor_norms(grads, self.norm_type)
            if stats.inv_scale is not None:
                norms = norms * stats.inv_scale
            post = total_from_norms(norms, self.norm_type)
        steps = len(self._since_log)
        clipped_steps = (torch.stack([c.float().to(pre.device) for c in self._since_log]) < 1).sum()
        parts = [pre.float().view(1), post.float().view(1).to(pre.device), clipped_steps.float().view(1)]
        if threshold is not None:
            parts.append(threshold.float().view(1).to(pre.device))
        values = torch.cat(parts).tolist()
        pre_v, post_v, clipped_v = values[:3]
        metrics = {
            "diag/clip/pre_norm": pre_v,
            "diag/clip/post_norm": post_v,
            "diag/clip/coef": post_v / pre_v if pre_v > 0 and math.isfinite(pre_v) else 1.0,
            "diag/clip/rate": clipped_v / max(steps, 1),
        }
        if threshold is not None and math.isfinite(values[3]):
            metrics["diag/clip/threshold"] = values[3]
        _logging.log_step(pl_module, metrics)
        self._since_log = []

    # -- state ----------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"findings": self._findings_state()}
        if self._adaptive is not None:
            state["adaptive"] = self._adaptive.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._adaptive is not None and "adaptive" in state_dict:
            self._adaptive.load_state_dict(state_dict["adaptive"])
        self._load_findings_state(state_dict)
