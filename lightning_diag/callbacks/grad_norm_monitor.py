"""GradNormMonitor: gradient norms (total, per layer), parameter norms, update ratios, AMP accounting."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_diag import _lightning, _logging
from lightning_diag._validation import (
    Unused,
    check_bool,
    check_choice,
    check_int,
    check_order,
    check_positive,
    check_range,
    check_unused,
    renamed,
)
from lightning_diag.callbacks._base import DiagCallback
from lightning_diag.callbacks._context import run_context, step_context
from lightning_diag.core.batches import batch_size
from lightning_diag.core.grad_stats import (
    GroupIndex,
    copy_tensors,
    group_index,
    group_name,
    grouped_norms,
    subtract_tensors,
    tensor_norms,
    vanishing_layers,
)
from lightning_diag.core.spikes import DEFAULT_SPIKE_RATIO, SpikeDetector
from lightning_diag.core.verdict import Verdict

__all__ = ["GradNormMonitor"]

_EXPLODING_ADVICE = [
    "Clip gradients (GradClip(max_norm=1.0), or an adaptive algorithm such as algorithm='zscore').",
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


#: Settings the chosen grouping never reads (``_validation.check_unused``).
_UNUSED = (
    Unused(
        ("depth",),
        lambda a: a["group_by"] != "module",
        lambda a: f"`group_by={a['group_by']!r}`",
        "set `group_by='module'`",
    ),
)

#: Points kept per series for the end-of-run plots (older points are thinned, never dropped wholesale).
MAX_HISTORY = 2000


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
        spike_threshold: a spike of the total norm is this many standard deviations above its running mean...
        spike_ratio: ...and also above ``spike_ratio`` times that mean (the rule of
            :class:`~lightning_diag.core.spikes.SpikeDetector`, shared with NaNGuard).
        spike_window: EMA span of the running statistics, in optimizer steps (spikes and skipped steps are kept
            out of them).
        spike_warmup_steps: finite steps observed before the standard-deviation rule applies (a norm 100x its
            running mean is a spike from the second step on; the short last batch of an epoch is not judged).
        vanishing_threshold: when every late layer's norm is at or below this, nothing is called vanishing (all
            layers small together: a converged model).
        vanishing_ratio: an early layer whose norm is below ``vanishing_ratio`` times the largest late-layer norm
            is vanishing. Judged per leaf module (the module that owns the parameters) whatever ``group_by`` and
            ``depth`` are (they only shape what is logged); the first half of the leaf modules, in registration
            order, are the early layers (:func:`~lightning_diag.core.grad_stats.vanishing_layers`).
        patience: consecutive checks the vanishing rule must hold before it is reported. Checked at the logging
            steps and, for the steps after the last one (a run shorter than the logging interval), at the end of
            fit on up to ``patience`` of those steps spread from the first to the last.
        amp_min_scale: a loss scale below this means the scale collapsed.
        amp_max_consecutive_skips: this many consecutive steps skipped by the GradScaler is a persistent overflow.
        vanishing_window: deprecated name of ``patience`` (until the next release).

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
        early leaf modules whose norm stays below ``vanishing_ratio`` times the late layers' for ``patience``
        checks (evidence ``smallest_norm`` 0.0: gradients that collapsed to exactly 0).
        ``non_finite_gradients`` (error): NaN/Inf gradients outside GradScaler overflow handling.
        ``amp_overflow`` (warning): the loss scale collapsed or overflows persisted.

    Raises:
        ValueError: (``ArgumentError``, also a ``MisconfigurationException``) at construction for an unknown
            ``group_by``, ``depth < 1`` (or a ``depth`` without ``group_by="module"``), ``norm_type < 1``, a
            non-positive threshold or window, ``vanishing_ratio`` outside ``[0, 1)``, ``exploding_threshold`` not
            above ``vanishing_threshold``, or a non-bool flag.

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

    renamed_arguments: ClassVar[dict[str, str]] = {"vanishing_window": "patience"}

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
        spike_threshold: float = 6.0,
        spike_ratio: float = DEFAULT_SPIKE_RATIO,
        spike_window: int = 100,
        spike_warmup_steps: int = 20,
        vanishing_threshold: float = 1e-8,
        vanishing_ratio: float = 1e-4,
        patience: int = 3,
        amp_min_scale: float = 1.0,
        amp_max_consecutive_skips: int = 10,
        vanishing_window: int | None = None,
    ) -> None:
        super().__init__()
        patience = renamed(GradNormMonitor.__init__, locals(), "vanishing_window", "patience")
        check_choice("group_by", group_by, ("total", "module", "parameter"))
        check_int("depth", depth, minimum=1)
        check_unused(GradNormMonitor.__init__, locals(), _UNUSED)
        check_range("norm_type", norm_type, 1.0, allow_inf=True)
        for name, flag in (
            ("log_param_norms", log_param_norms),
            ("log_update_ratio", log_update_ratio),
            ("log_histogram", log_histogram),
            ("log_amp", log_amp),
        ):
            check_bool(name, flag)
        if exploding_threshold is not None:
            check_positive("exploding_threshold", exploding_threshold)
        check_positive("spike_threshold", spike_threshold)
        check_range("spike_ratio", spike_ratio, 1.0, low_open=True)
        check_int("spike_window", spike_window, minimum=1)
        check_int("spike_warmup_steps", spike_warmup_steps, minimum=0)
        check_positive("vanishing_threshold", vanishing_threshold, strict=False)
        check_range("vanishing_ratio", vanishing_ratio, 0.0, 1.0, high_open=True)
        check_order("vanishing_threshold", vanishing_threshold, "exploding_threshold", exploding_threshold)
        check_int("patience", patience, minimum=1)
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
        self.spike_threshold = float(spike_threshold)
        self.spike_ratio = float(spike_ratio)
        self.spike_window = spike_window
        self.spike_warmup_steps = spike_warmup_steps
        self.vanishing_threshold = float(vanishing_threshold)
        self.vanishing_ratio = float(vanishing_ratio)
        self.patience = patience
        self.amp_min_scale = float(amp_min_scale)
        self.amp_max_consecutive_skips = amp_max_consecutive_skips
        self._reset_state()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            _lightning.check_strategy(trainer, "GradNormMonitor")

    def _reset_state(self) -> None:
        # Running statistics, replayed on the host from the pending steps at each logging step.
        self._spikes = SpikeDetector(
            self.spike_window, self.spike_threshold, self.spike_ratio, self.spike_warmup_steps
        )
        self._skipped = 0  # steps the GradScaler skipped
        self._skip_run = 0  # current run of consecutive skipped steps
        self._max_run = 0  # longest run of skipped steps since the last AMP check
        # (global step, total norm, per-tensor norms) of the steps not replayed yet
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._pending_samples: list[int] = []  # samples behind each pending step (0: unknown)
        self._samples = 0  # samples of the micro-batches of the optimizer step in progress
        self._leaves: GroupIndex | None = None
        self._leaf_names: tuple[str, ...] = ()
        self._groups: GroupIndex | None = None
        self._vanishing_streak: dict[str, int] = {}
        # Per-group norms at the logging steps, for the end-of-run heatmap (bounded: see _remember_norms)
        self.norm_history: dict[str, list[tuple[int, float]]] = {}
        # (parameters, their copy before the step, per-group parameter norms, groups, global step) of a logging step
        self._snapshot: (
            tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, GroupIndex, int] | None
        ) = None
        self._names: tuple[str, ...] = ()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(group_by=self.group_by, depth=self.depth, norm_type=self.norm_type)

    # -- per step ---------------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._samples += batch_size(batch)  # host-side shape: no sync

    @override
    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = step_context(trainer, pl_module, optimizer)
        stats = step.grad_stats(self.norm_type)
        if stats.norms.numel() == 0:
            return
        # A quiet step costs no kernel and no sync: keep references to the norms computed for everyone anyway.
        self._pending.append((trainer.global_step, stats.total_norm, stats.norms))
        self._pending_samples.append(self._samples)
        self._samples = 0
        self._names = stats.names
        if _logging.should_log_step(trainer):
            self._log_and_check(trainer, pl_module, step.params, stats)
        elif len(self._pending) >= self.max_pending_steps:
            self._replay(trainer, self._fetch_pending())

    #: Pending steps kept before the statistics are replayed even without logging (bounds memory and latency).
    max_pending_steps = 256

    def _fetch_pending(self, extra: torch.Tensor | None = None) -> list[float]:
        """The pending total norms (then ``extra``) in one host transfer."""
        parts = [torch.stack([total for _, total, _ in self._pending]).float()] if self._pending else []
        if extra is not None:
            parts.append(extra)
        return torch.cat(parts).tolist() if parts else []

    def _replay(self, trainer: pl.Trainer, totals: list[float]) -> None:
        """Run the running statistics over the pending steps, in order, and record what they show."""
        pending, self._pending = self._pending, []
        samples, self._pending_samples = self._pending_samples, []
        samples += [0] * (len(pending) - len(samples))
        scaled = _lightning.amp_scaler(trainer) is not None
        flagged, worst, worst_ratio, worst_at, nonfinite, max_run = 0, 0.0, 0.0, -1, 0, 0
        worst_mean = 0.0
        for (step, _, _), total, size in zip(pending, totals, samples, strict=False):
            if not math.isfinite(total):
                if scaled:  # the GradScaler skips this step: count it, keep it out of the statistics
                    self._skipped += 1
                    self._skip_run += 1
                    max_run = max(max_run, self._skip_run)
                else:
                    nonfinite += 1
                continue
            self._skip_run = 0
            mean = self._spikes.mean
            spike = self._spikes.update(
                total, size or None
            )  # spikes (and short last batches) stay out of them
            over = self.exploding_threshold is not None and total > self.exploding_threshold
            if spike or over:
                flagged += 1
                if total > worst:
                    worst, worst_ratio, worst_at, worst_mean = total, total / max(mean, 1e-12), step, mean
        if flagged:
            norms = next(n for s, _, n in pending if s == worst_at).tolist()
            self._report_exploding(
                trainer, flagged, worst, worst_ratio, worst_at, worst_mean, norms, self._names
            )
        if nonfinite:
            guarded = run_context(trainer).nonfinite_handled
            what = (
                f"{nonfinite} step(s) had a non-finite gradient norm (NaN/Inf gradients, or finite ones too large for "
                "float32) without a GradScaler to skip them"
            )
            self.record(
                trainer,
                Verdict(
                    "non_finite_gradients",
                    "warning" if guarded else "error",
                    what
                    + (
                        ": NaNGuard decided what to do with them (see its findings)."
                        if guarded
                        else ": the parameters took those updates."
                    ),
                    evidence={"steps": nonfinite},
                    advice=[
                        "See NaNGuard's finding for where the first non-finite value appeared."
                        if guarded
                        else "Add NaNGuard to skip such steps and locate the layer that produced the first non-finite value."
                    ],
                ),
            )
        self._max_run = max(self._max_run, max_run)

    def _log_and_check(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step_params: list[torch.Tensor], stats: Any
    ) -> None:
        device = stats.norms.device
        if self._groups is None or self._groups.names != self._group_names(stats.names):
            self._groups = group_index(stats.names, self.group_by, self.depth, device)
        groups = self._groups
        scaler = _lightning.amp_scaler(trainer)
        pieces = {"total": stats.total_norm.view(1)}
        if self.group_by != "total":
            pieces["groups"] = stats.grouped(groups)
        pieces["leaves"] = stats.grouped(self._leaf_index(stats.names, device))
        params = [p.detach() for p in step_params]
        if self.log_param_norms or self.log_update_ratio:
            pnorms = tensor_norms(params, self.norm_type)
            pieces["param_groups"] = grouped_norms(pnorms, groups, self.norm_type)
            pieces["param_total"] = torch.linalg.vector_norm(pnorms, self.norm_type).view(1)
            if self.log_update_ratio:
                before = copy_tensors(params)
                self._snapshot = (params, before, pieces["param_groups"], groups, trainer.global_step)
        if scaler is not None:
            pieces["scale"] = _lightning.loss_scale(scaler).to(device).view(1)
        layout = [(k, v.numel()) for k, v in pieces.items()]
        n_pending = len(self._pending)
        values = self._fetch_pending(
            torch.cat([v.float().to(device) for v in pieces.values()])
        )  # one transfer
        self._replay(trainer, values[:n_pending])
        out: dict[str, list[float]] = {}
        i = n_pending
        for key, size in layout:
            out[key], i = values[i : i + size], i + size

        metrics: dict[str, float] = {"diag/grad_norm/total": out["total"][0]}
        for name, value in zip(groups.names, out.get("groups", []), strict=False):
            metrics[f"diag/grad_norm/{name}"] = value
        if self.log_param_norms and "param_total" in out:
            metrics["diag/param_norm/total"] = out["param_total"][0]
            if self.group_by != "total":
                for name, value in zip(groups.names, out["param_groups"], strict=True):
                    metrics[f"diag/param_norm/{name}"] = value
        if scaler is not None and self.log_amp:
            metrics["diag/amp/scale"] = out["scale"][0]
            metrics["diag/amp/skipped_steps"] = float(self._skipped)
        _logging.log_step(pl_module, metrics)
        self._remember_norms(
            trainer.global_step, groups.names if self.group_by != "total" else ("total",), out
        )
        if self.log_histogram:
            _logging.log_histogram(trainer, "diag/grad_norm/hist", stats.norms, step=trainer.global_step)
        if scaler is not None:
            self._check_amp(trainer, out["scale"][0], self._skipped, self._max_run)
            self._max_run = 0
        if math.isfinite(out["total"][0]):
            self._check_vanishing(trainer, self._leaf_index(stats.names, device).names, out["leaves"])

    def _remember_norms(self, step: int, names: tuple[str, ...], out: dict[str, list[float]]) -> None:
        values = out.get("groups", out["total"]) if self.group_by != "total" else out["total"]
        for name, value in zip(names, values, strict=False):
            series = self.norm_history.setdefault(name, [])
            series.append((int(step), float(value)))
            if len(series) > 2 * MAX_HISTORY:
                del series[::2]  # keep the whole run at half the resolution

    def report_series(self) -> dict[str, Any]:
        """Per-group gradient norms over time (logging steps), for the end-of-run plots."""
        return {"grad_norms": {k: list(v) for k, v in self.norm_history.items()}} if self.norm_history else {}

    def _group_names(self, names: tuple[str, ...]) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for n in names:
            seen.setdefault(group_name(n, self.group_by, self.depth), None)
        return tuple(seen)

    def _report_exploding(
        self,
        trainer: pl.Trainer,
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
            Verdict(
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
            ),
        )

    def _check_amp(self, trainer: pl.Trainer, scale: float, skipped: float, max_run: int) -> None:
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
            Verdict(
                "amp_overflow",
                "warning",
                f"GradScaler: {what}; {int(skipped)} step(s) skipped so far. Occasional skips are normal, this is not.",
                evidence={"scale": scale, "skipped_steps": int(skipped), "max_consecutive_skips": max_run},
                advice=[
                    "Gradients overflow fp16 even at a small scale: the model produces values beyond fp16's range.",
                    "Switch to bf16-mixed (same speed on recent GPUs, no overflow), or lower the learning rate.",
                    "Add NaNGuard to see whether the values are truly non-finite (a bug) rather than large.",
                ],
            ),
        )

    def _leaf_index(self, names: tuple[str, ...], device: torch.device) -> GroupIndex:
        """Tensors grouped by leaf module (the gradient rules judge per layer whatever the logging grouping)."""
        if self._leaves is None or self._leaf_names != names or self._leaves.index.device != device:
            self._leaves = group_index(names, "module", max(len(n.split(".")) for n in names), device)
            self._leaf_names = names
        return self._leaves

    def _check_vanishing(self, trainer: pl.Trainer, names: tuple[str, ...], norms: list[float]) -> None:
        vanishing, late_max = vanishing_layers(names, norms, self.vanishing_ratio, self.vanishing_threshold)
        flagged = {n for n, _ in vanishing}
        for name in names:
            self._vanishing_streak[name] = self._vanishing_streak.get(name, 0) + 1 if name in flagged else 0
        lasting = [(n, v) for n, v in vanishing if self._vanishing_streak[n] >= self.patience]
        if not lasting:
            return
        listed = ", ".join(f"{n} ({v:.3g})" for n, v in lasting[:8])
        smallest = min(v for _, v in lasting)
        zero = " (exactly 0: no gradient reaches them at all)" if smallest == 0 else ""
        self.record(
            trainer,
            Verdict(
                "vanishing_gradients",
                "warning",
                f"{len(lasting)} of {len(names)} layers get (almost) no gradient: below {self.vanishing_ratio:g}x the "
                f"largest late-layer norm ({late_max:.3g}) at {self.patience} checks in a row{zero}: {listed}.",
                evidence={
                    "layers": ", ".join(n for n, _ in lasting),
                    "smallest_norm": smallest,
                    "late_max_norm": late_max,
                    "ratio": self.vanishing_ratio,
                    "threshold": self.vanishing_threshold,
                    "leaf_modules": len(names),
                },
                advice=_VANISHING_ADVICE,
            ),
        )

    def _check_vanishing_at_end(self, trainer: pl.Trainer) -> None:
        """Judge the steps after the last logging step (all of a run shorter than the logging interval)."""
        if not self._pending or not self._names:
            return
        device = self._pending[-1][2].device
        leaves = self._leaf_index(self._names, device)
        count = len(self._pending)
        picks = sorted({round(i * (count - 1) / max(self.patience - 1, 1)) for i in range(self.patience)})
        rows = [self._pending[i][2] for i in picks if self._pending[i][2].numel() == len(self._names)]
        if not rows:
            return
        values = torch.stack([grouped_norms(r.float(), leaves, self.norm_type) for r in rows]).tolist()
        for row in values:
            self._check_vanishing(trainer, leaves.names, row)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._snapshot is None:
            return
        params, before, param_groups, groups, step = self._snapshot
        if trainer.global_step != step + 1:
            return  # the optimizer has not stepped yet (accumulation)
        self._snapshot = None
        updates = tensor_norms(subtract_tensors(params, before), self.norm_type)
        ratios = grouped_norms(updates, groups, self.norm_type) / param_groups.clamp(min=1e-12)
        _logging.log_step(
            pl_module,
            {
                f"diag/update_ratio/{name}": value
                for name, value in zip(groups.names, ratios.tolist(), strict=True)
            },
        )

    # -- state ----------------------------------------------------------------------------------------------
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending:  # steps after the last logging step still get their say
            self._check_vanishing_at_end(trainer)
            self._replay(trainer, self._fetch_pending())

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "spikes": self._spikes.state_dict(),
            "skipped": self._skipped,
            "skip_run": self._skip_run,
            "vanishing_streak": dict(self._vanishing_streak),
            "findings": self._findings_state(),
        }
        if self._pending:  # steps not replayed yet: saved raw, so a resumed run replays them alike
            state["pending_steps"] = [step for step, _, _ in self._pending]
            state["pending_totals"] = torch.stack([t for _, t, _ in self._pending]).detach().cpu()
            state["pending_norms"] = torch.stack([n for _, _, n in self._pending]).detach().cpu()
            state["pending_names"] = list(self._names)
            state["pending_samples"] = list(self._pending_samples)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "spikes" in state_dict:
            self._spikes.load_state_dict(state_dict["spikes"])
        self._skipped = int(state_dict.get("skipped", self._skipped))
        self._skip_run = int(state_dict.get("skip_run", self._skip_run))
        self._vanishing_streak = {str(k): int(v) for k, v in state_dict.get("vanishing_streak", {}).items()}
        if "pending_steps" in state_dict:
            totals, norms = state_dict["pending_totals"], state_dict["pending_norms"]
            self._pending = [(int(s), totals[i], norms[i]) for i, s in enumerate(state_dict["pending_steps"])]
            self._names = tuple(state_dict.get("pending_names", ()))
            self._pending_samples = [int(v) for v in state_dict.get("pending_samples", [])]
        self._load_findings_state(state_dict)
