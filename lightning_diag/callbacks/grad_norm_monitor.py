"""GradNormMonitor: gradient norms (total, per layer), parameter norms, update ratios, AMP accounting."""

from __future__ import annotations

import math
import statistics
from typing import Any, Literal

import torch

from lightning_diag import _logging
from lightning_diag._validation import check_choice, check_int, check_positive
from lightning_diag.callbacks._base import DiagCallback
from lightning_diag.callbacks._shared import amp_scaler, params_with_grads, scale_tensor, step_grad_stats
from lightning_diag.core.grad_stats import GroupIndex, group_index, group_name, grouped_norms, tensor_norms

__all__ = ["GradNormMonitor"]

_EXPLODING_ADVICE = [
    "Clip gradients (GradClip(max_norm=1.0), or an adaptive mode such as mode='zscore').",
    "Lower the learning rate, or add/extend a warmup (WarmupCosine).",
    "Check the initialisation and add normalisation (LayerNorm/BatchNorm) or residual connections in deep stacks.",
    "Under fp16, prefer bf16 or make sure the loss is scaled (16-mixed uses a GradScaler).",
]
_VANISHING_ADVICE = [
    "Prefer non-saturating activations (ReLU/GELU/SiLU) over sigmoid/tanh in deep stacks.",
    "Use an initialisation matched to the activation (Kaiming for ReLU, Xavier for tanh).",
    "Add residual connections and normalisation layers so gradients reach the early layers.",
    "Check for frozen or detached paths (a `.detach()`, `torch.no_grad()`, an unused branch).",
]


class GradNormMonitor(DiagCallback):
    """Watch gradient norms every optimizer step and log them per layer at the logging interval.

    In ``on_before_optimizer_step`` (gradients accumulated, all-reduced under DDP, unscaled under 16-bit AMP, and
    not yet clipped) it reads the shared per-step gradient statistics (one foreach pass, shared with GradClip
    and the other lightning_diag callbacks) and updates device-side running statistics: no host
    synchronisation on steps that do not log. At logging steps (``Trainer(log_every_n_steps)``) it logs the
    per-group norms and checks for exploding and vanishing gradients (one host transfer).

    Args:
        group_by: ``"module"`` (norms per module path cut at ``depth``), ``"parameter"`` (per tensor) or
            ``"total"`` (only the total).
        depth: module depth for ``group_by="module"`` (``1``: ``encoder``; ``2``: ``encoder.layers``).
        norm_type: p of the p-norm (``2.0``; ``inf`` for the max norm).
        log_param_norms: log parameter norms per group at the logging interval.
        log_update_ratio: log ``|update| / |weight|`` per group at the logging interval (copies the weights
            of the logging step once; healthy values are around ``1e-3``).
        log_histogram: log the per-tensor gradient norms as a histogram (quantile scalars for loggers
            without histograms).
        log_amp: under a GradScaler, log the loss scale and the number of steps it skipped.
        exploding_threshold: a total norm above this is exploding (``None``: only the spike rule applies).
        spike_ratio: a finite total norm above ``spike_ratio`` times its running mean is a spike.
        spike_warmup_steps: finite steps observed before spikes are looked for.
        ema_decay: decay of the running mean of the total norm (spikes and skipped steps are kept out of it).
        vanishing_threshold: a group norm below this is vanishing.
        vanishing_ratio: a group norm below ``vanishing_ratio`` times the median group norm is vanishing.
        vanishing_window: consecutive logging checks a group must be vanishing before it is reported.
        amp_min_scale: a loss scale below this means the scale collapsed.
        amp_max_consecutive_skips: this many consecutive steps skipped by the GradScaler is a persistent overflow.

    Logged metrics:
        ==================================  ========================================================
        key                                 value
        ==================================  ========================================================
        ``diag/grad_norm/total``            total gradient norm (unscaled, pre-clip)
        ``diag/grad_norm/<group>``          gradient norm per group
        ``diag/param_norm/total``           total parameter norm (and ``diag/param_norm/<group>``)
        ``diag/update_ratio/<group>``       ``|ΔW| / |W|`` of the logging step, per group
        ``diag/grad_norm/hist``             histogram (or ``/q<pct>`` quantiles) of per-tensor norms
        ``diag/amp/scale``                  GradScaler loss scale (16-mixed only)
        ``diag/amp/skipped_steps``          steps the GradScaler skipped so far (16-mixed only)
        ==================================  ========================================================

    Findings:
        ``exploding_gradients`` (warning): total norm above ``exploding_threshold`` or a spike over its running
        mean, with the worst step, norm, ratio and the largest groups. ``vanishing_gradients`` (warning):
        groups whose norm stays below the absolute or relative bound for ``vanishing_window`` checks.
        ``non_finite_gradients`` (error): NaN/Inf gradients outside GradScaler overflow handling.
        ``amp_overflow`` (warning): the loss scale collapsed or overflows persisted.

    Raises:
        ValueError: at construction for an unknown ``group_by``, ``depth < 0``, or a non-positive threshold,
            ratio or window.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_diag import GradNormMonitor
        >>> trainer = pl.Trainer(log_every_n_steps=10, callbacks=[GradNormMonitor(depth=2, exploding_threshold=1e3)])

    Note:
        Steps skipped by the GradScaler (inf/NaN after unscaling) are counted, never treated as failures, and kept
        out of every running statistic. With a fused optimizer under 16-bit AMP the gradients are still scaled in
        this hook; the statistics divide by the scale. Under DDP gradients are identical on every rank; under
        FSDP2 (DTensor) the norms are global (one all-reduce).
    """

    def __init__(
        self,
        group_by: Literal["total", "module", "parameter"] = "module",
        depth: int = 1,
        norm_type: float = 2.0,
        log_param_norms: bool = True,
        log_update_ratio: bool = True,
        log_histogram: bool = False,
        log_amp: bool = True,
        exploding_threshold: float | None = None,
        spike_ratio: float = 10.0,
        spike_warmup_steps: int = 20,
        ema_decay: float = 0.98,
        vanishing_threshold: float = 1e-8,
        vanishing_ratio: float = 1e-4,
        vanishing_window: int = 3,
        amp_min_scale: float = 1.0,
        amp_max_consecutive_skips: int = 10,
    ) -> None:
        super().__init__()
        check_choice("group_by", group_by, ("total", "module", "parameter"))
        check_int("depth", depth, minimum=0)
        check_positive("norm_type", norm_type, allow_inf=True)
        if exploding_threshold is not None:
            check_positive("exploding_threshold", exploding_threshold)
        check_positive("spike_ratio", spike_ratio)
        if spike_ratio <= 1:
            raise ValueError(f"`spike_ratio` must be > 1, got {spike_ratio!r}.")
        check_int("spike_warmup_steps", spike_warmup_steps, minimum=0)
        check_positive("ema_decay", ema_decay)
        if ema_decay >= 1:
            raise ValueError(f"`ema_decay` must be in (0, 1), got {ema_decay!r}.")
        check_positive("vanishing_threshold", vanishing_threshold, strict=False)
        check_positive("vanishing_ratio", vanishing_ratio, strict=False)
        check_int("vanishing_window", vanishing_window, minimum=1)
        check_positive("amp_min_scale", amp_min_scale)
        check_int("amp_max_consecutive_skips", amp_max_consecutive_skips, minimum=1)
        self.group_by = group_by
        self.depth = depth
        self.norm_type = float(norm_type)
        self.log_param_norms = log_param_norms
        self.log_update_ratio = log_update_ratio
        self.log_histogram = log_histogram
        self.log_amp = log_amp
        self.exploding_threshold = exploding_threshold
        self.spike_ratio = float(spike_ratio)
        self.spike_warmup_steps = spike_warmup_steps
        self.ema_decay = float(ema_decay)
        self.vanishing_threshold = float(vanishing_threshold)
        self.vanishing_ratio = float(vanishing_ratio)
        self.vanishing_window = vanishing_window
        self.amp_min_scale = float(amp_min_scale)
        self.amp_max_consecutive_skips = amp_max_consecutive_skips
        self._reset_state()

    def _reset_state(self) -> None:
        self._dev: dict[
            str, torch.Tensor
        ] = {}  # device-side running state, created lazily on the grads' device
        self._groups: GroupIndex | None = None
        self._vanishing_streak: dict[str, int] = {}
        # (parameters, their copy before the step, per-group parameter norms, groups, global step) of a logging step
        self._snapshot: (
            tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, GroupIndex, int] | None
        ) = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(group_by=self.group_by, depth=self.depth, norm_type=self.norm_type)

    # -- per step ---------------------------------------------------------------------------------------------
    def _state(self, device: torch.device, n: int) -> dict[str, torch.Tensor]:
        dev = self._dev
        if "worst_norms" not in dev or dev["ema"].device != device or dev["worst_norms"].numel() != n:
            old = {k: v.to(device) for k, v in dev.items() if v.ndim == 0}
            zero = torch.zeros((), device=device)
            dev.clear()
            dev.update({
                "ema": zero.clone(), "ema_count": zero.clone(), "flags": zero.clone(), "worst": zero.clone(),
                "worst_ratio": zero.clone(), "worst_step": zero - 1, "nonfinite": zero.clone(),
                "skipped": zero.clone(), "run": zero.clone(), "max_run": zero.clone(),
            })  # fmt: skip
            dev.update(old)
            dev["worst_norms"] = torch.zeros(n, device=device)
        return dev

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        stats = step_grad_stats(trainer, pl_module, optimizer, self.norm_type)
        if stats.norms.numel() == 0:
            return
        total = stats.total_norm
        dev = self._state(total.device, stats.norms.numel())
        scaler = amp_scaler(trainer)
        finite = ~stats.nonfinite
        warmed = dev["ema_count"] >= self.spike_warmup_steps
        ratio = total / dev["ema"].clamp(min=1e-12)
        spike = finite & warmed & (ratio > self.spike_ratio)
        flagged = spike
        if self.exploding_threshold is not None:
            flagged = flagged | (finite & (total > self.exploding_threshold))
        worse = flagged & (total > dev["worst"])
        dev["flags"] += flagged
        dev["worst"] = torch.where(worse, total, dev["worst"])
        dev["worst_ratio"] = torch.where(worse, ratio, dev["worst_ratio"])
        dev["worst_step"] = torch.where(worse, torch.full_like(total, trainer.global_step), dev["worst_step"])
        dev["worst_norms"] = torch.where(worse, stats.norms, dev["worst_norms"])
        calm = finite & ~spike
        first = dev["ema_count"] == 0
        blended = torch.where(first, total, self.ema_decay * dev["ema"] + (1 - self.ema_decay) * total)
        dev["ema"] = torch.where(calm, blended, dev["ema"])
        dev["ema_count"] += calm
        if scaler is None:
            dev["nonfinite"] += stats.nonfinite
        else:
            dev["skipped"] += stats.nonfinite
            dev["run"] = torch.where(stats.nonfinite, dev["run"] + 1, torch.zeros_like(dev["run"]))
            dev["max_run"] = torch.maximum(dev["max_run"], dev["run"])
        if _logging.should_log_step(trainer):
            self._log_and_check(trainer, pl_module, optimizer, stats, scaler)

    def _log_and_check(self, trainer: Any, pl_module: Any, optimizer: Any, stats: Any, scaler: Any) -> None:
        device = stats.norms.device
        if self._groups is None or self._groups.names != self._group_names(stats.names):
            self._groups = group_index(stats.names, self.group_by, self.depth, device)
        groups = self._groups
        dev = self._dev
        pieces = {"total": stats.total_norm.view(1)}
        if self.group_by != "total":
            pieces["groups"] = stats.grouped(groups)
        params = [p.detach() for p in params_with_grads(trainer, pl_module, optimizer)[1]]
        if self.log_param_norms or self.log_update_ratio:
            pnorms = tensor_norms(params, self.norm_type)
            pieces["param_groups"] = grouped_norms(pnorms, groups, self.norm_type)
            pieces["param_total"] = torch.linalg.vector_norm(pnorms, self.norm_type).view(1)
            if self.log_update_ratio:
                before = list(torch._foreach_mul(params, 1.0))
                self._snapshot = (params, before, pieces["param_groups"], groups, trainer.global_step)
        scale = (
            scale_tensor(scaler).to(device).view(1) if scaler is not None else torch.zeros(1, device=device)
        )
        counters = torch.stack([
            dev["flags"], dev["worst"], dev["worst_ratio"], dev["worst_step"], dev["ema"], dev["nonfinite"],
            dev["skipped"], dev["max_run"], stats.nonfinite.float(),
        ]).to(device).view(-1)  # fmt: skip
        layout = [(k, v.numel()) for k, v in pieces.items()]
        flat = torch.cat(
            [*(v.float().to(device) for v in pieces.values()), scale, counters, dev["worst_norms"]]
        )
        values = flat.tolist()  # the one host transfer of the logging step
        out: dict[str, list[float]] = {}
        i = 0
        for key, size in layout:
            out[key], i = values[i : i + size], i + size
        scale_value = values[i]
        flags, worst, worst_ratio, worst_step, ema, nonfinite, skipped, max_run, skipped_now = values[
            i + 1 : i + 10
        ]
        worst_norms = values[i + 10 :]

        metrics: dict[str, float] = {"diag/grad_norm/total": out["total"][0]}
        for name, value in zip(groups.names, out.get("groups", []), strict=False):
            metrics[f"diag/grad_norm/{name}"] = value
        if self.log_param_norms and "param_total" in out:
            metrics["diag/param_norm/total"] = out["param_total"][0]
            if self.group_by != "total":
                for name, value in zip(groups.names, out["param_groups"], strict=True):
                    metrics[f"diag/param_norm/{name}"] = value
        if scaler is not None and self.log_amp:
            metrics["diag/amp/scale"] = scale_value
            metrics["diag/amp/skipped_steps"] = skipped
        _logging.log_step(pl_module, metrics)
        if self.log_histogram:
            _logging.log_histogram(trainer, "diag/grad_norm/hist", stats.norms, step=trainer.global_step)

        if flags > 0:
            self._report_exploding(
                trainer, flags, worst, worst_ratio, int(worst_step), ema, worst_norms, stats.names
            )
            dev["flags"].zero_()
            dev["worst"].zero_()
        if nonfinite > 0:
            self.record(
                trainer,
                "non_finite_gradients",
                "error",
                f"{int(nonfinite)} step(s) had NaN/Inf gradients (total norm not finite), without a GradScaler to "
                "skip them: the parameters took non-finite updates.",
                evidence={"steps": int(nonfinite)},
                advice=[
                    "Add NaNGuard to skip such steps and locate the layer that produced the first non-finite value."
                ],
            )
            dev["nonfinite"].zero_()
        if scaler is not None:
            self._check_amp(trainer, scale_value, skipped, int(max_run))
        if self.group_by != "total" and not skipped_now:
            self._check_vanishing(trainer, groups.names, out["groups"])

    def _group_names(self, names: tuple[str, ...]) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for n in names:
            seen.setdefault(group_name(n, self.group_by, self.depth), None)
        return tuple(seen)

    def _report_exploding(
        self,
        trainer: Any,
        flags: float,
        worst: float,
        ratio: float,
        step: int,
        ema: float,
        worst_norms: list[float],
        names: tuple[str, ...],
    ) -> None:
        top = sorted(zip(worst_norms, names, strict=True), reverse=True)[:3]
        layers = ", ".join(f"{n} ({v:.3g})" for v, n in top)
        over = self.exploding_threshold is not None and worst > self.exploding_threshold
        why = (
            f"above `exploding_threshold`={self.exploding_threshold:g}"
            if over
            else f"{ratio:.1f}x its running mean {ema:.3g}"
        )
        self.record(
            trainer,
            "exploding_gradients",
            "warning",
            f"Gradient norm reached {worst:.4g} at step {step} ({why}); {int(flags)} flagged step(s) in this "
            f"interval. Largest tensors: {layers}.",
            evidence={
                "worst_norm": worst,
                "worst_step": step,
                "ratio_to_mean": ratio,
                "running_mean": ema,
                "flagged_steps": int(flags),
                "largest_tensors": layers,
            },
            advice=_EXPLODING_ADVICE,
        )

    def _check_amp(self, trainer: Any, scale: float, skipped: float, max_run: int) -> None:
        collapsed = scale < self.amp_min_scale
        persistent = max_run >= self.amp_max_consecutive_skips
        if not (collapsed or persistent):
            return
        what = (
            f"the loss scale collapsed to {scale:g}"
            if collapsed
            else f"{max_run} consecutive steps overflowed"
        )
        self.record(
            trainer,
            "amp_overflow",
            "warning",
            f"GradScaler: {what}; {int(skipped)} step(s) skipped so far. Occasional skips are normal, this is not.",
            evidence={"scale": scale, "skipped_steps": int(skipped), "max_consecutive_skips": max_run},
            advice=[
                "Gradients overflow fp16 even at a small scale: the model produces values beyond fp16's range.",
                "Switch to bf16-mixed (same speed on recent GPUs, no overflow), or lower the learning rate.",
                "Add NaNGuard to see whether the values are truly non-finite (a bug) rather than large.",
            ],
        )

    def _check_vanishing(self, trainer: Any, names: tuple[str, ...], norms: list[float]) -> None:
        median = statistics.median(norms) if norms else 0.0
        vanishing = []
        for name, norm in zip(names, norms, strict=True):
            below = norm < self.vanishing_threshold or (
                len(norms) > 1 and norm < self.vanishing_ratio * median
            )
            streak = self._vanishing_streak.get(name, 0) + 1 if below and math.isfinite(norm) else 0
            self._vanishing_streak[name] = streak
            if streak >= self.vanishing_window:
                vanishing.append((name, norm))
        if not vanishing:
            return
        listed = ", ".join(f"{n} ({v:.3g})" for n, v in vanishing[:8])
        self.record(
            trainer,
            "vanishing_gradients",
            "warning",
            f"{len(vanishing)} of {len(names)} layer group(s) have ~0 gradients for {self.vanishing_window} "
            f"logging checks (median group norm {median:.3g}): {listed}.",
            evidence={
                "layers": ", ".join(n for n, _ in vanishing),
                "smallest_norm": min(v for _, v in vanishing),
                "median_group_norm": median,
                "threshold": self.vanishing_threshold,
                "ratio": self.vanishing_ratio,
            },
            advice=_VANISHING_ADVICE,
        )

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._snapshot is None:
            return
        params, before, param_groups, groups, step = self._snapshot
        if trainer.global_step != step + 1:
            return  # the optimizer has not stepped yet (accumulation)
        self._snapshot = None
        updates = tensor_norms(torch._foreach_sub(params, before), self.norm_type)
        ratios = grouped_norms(updates, groups, self.norm_type) / param_groups.clamp(min=1e-12)
        _logging.log_step(
            pl_module,
            {
                f"diag/update_ratio/{name}": value
                for name, value in zip(groups.names, ratios.tolist(), strict=True)
            },
        )

    # -- state ----------------------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._reset_state()

    def state_dict(self) -> dict[str, Any]:
        keep = ("ema", "ema_count", "skipped")
        return {
            **{k: self._dev[k].detach().cpu() for k in keep if k in self._dev},
            "vanishing_streak": dict(self._vanishing_streak),
            "findings": self._findings_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("ema", "ema_count", "skipped"):
            if key in state_dict:
                self._dev[key] = torch.as_tensor(state_dict[key]).clone()
        self._vanishing_streak = {str(k): int(v) for k, v in state_dict.get("vanishing_streak", {}).items()}
        self._load_findings_state(state_dict)
