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
from lightning_diag.callbacks import _compat
from lightning_diag.callbacks._base import DiagCallback
from lightning_diag.callbacks._context import run_context, step_context
from lightning_diag.callbacks._deferred import Deferred, DeferredQueue
from lightning_diag.core.batches import batch_size
from lightning_diag.core.grad_rules import (
    NormHistory,
    VanishingRule,
    amp_verdict,
    exploding_verdict,
    non_finite_gradients_verdict,
)
from lightning_diag.core.grad_stats import (
    GroupIndex,
    copy_tensors,
    group_index,
    group_name,
    grouped_norms,
    subtract_tensors,
    tensor_norms,
)
from lightning_diag.core.spikes import DEFAULT_SPIKE_RATIO

__all__ = ["GradNormMonitor"]

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
            order, are the early layers (:func:`~lightning_diag.core.grad_rules.vanishing_layers`).
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
        One event, one finding: when NaNGuard checks spikes in the same run (``check_spikes=True``, its default),
        it owns spikes of the total norm (it sees the loss at the same step and can act on them) and this callback
        only logs the norms; ``exploding_threshold`` stays this callback's rule. Steps skipped by the GradScaler (inf/NaN after unscaling) are counted, never treated as failures, and kept
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
        self._history = NormHistory(
            self.spike_window,
            self.spike_threshold,
            self.spike_ratio,
            self.spike_warmup_steps,
            self.exploding_threshold,
        )
        self._vanishing = VanishingRule(self.vanishing_ratio, self.vanishing_threshold, self.patience)
        self._first_param_norm: float | None = None  # the parameters' total norm before the first step
        # the same on the device, read with the first logging step's transfer
        self._initial_norm: torch.Tensor | None = None
        self._param_ratio: float | None = None  # their norm at the last logging step over that first one
        # The steps not replayed yet: their total norm (read at the next logging step), their per-tensor norms
        # kept on the device (read only for the worst step of a flagged interval) and their batch size.
        self._queue = DeferredQueue()
        self._samples = 0  # samples of the micro-batches of the optimizer step in progress
        self._leaves: GroupIndex | None = None
        self._leaf_names: tuple[str, ...] = ()
        self._groups: GroupIndex | None = None
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
        full = self._queue.add(
            trainer.global_step,
            stats.total_norm,
            info={"samples": self._samples},
            kept={"norms": stats.norms},
        )
        self._samples = 0
        self._names = stats.names
        if self._first_param_norm is None and self._initial_norm is None and self.log_param_norms:
            # the weights before the first update, kept on the device (no sync): a decay that holds them near 0
            # has shrunk them long before the first logging step
            pnorms = tensor_norms([p.detach() for p in step.params], self.norm_type)
            self._initial_norm = torch.linalg.vector_norm(pnorms, self.norm_type).view(1)
        if _logging.should_log_step(trainer):
            self._log_and_check(trainer, pl_module, step.params, stats)
        elif full:
            self._replay(trainer, self._queue.take(trainer)[0])

    def _replay(self, trainer: pl.Trainer, entries: list[Deferred]) -> None:
        """Run the running statistics over the pending steps, in order, and record what they show."""
        context = run_context(trainer)
        found = self._history.replay(
            [e.step for e in entries],
            [e.host[0] for e in entries],
            [int(e.info.get("samples", 0)) for e in entries],
            scaled=_lightning.amp_scaler(trainer) is not None,
            check_spikes=not context.grad_spikes_owned,  # NaNGuard judges those spikes: one event, one finding
        )
        if found.flagged:
            norms = next(e.kept["norms"] for e in entries if e.step == found.worst_step).tolist()
            verdict = exploding_verdict(found, self.exploding_threshold, norms, self._names)
            self.record(trainer, verdict)
        if found.non_finite:
            self.record(trainer, non_finite_gradients_verdict(found.non_finite, context.nonfinite_handled))

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
        if self._initial_norm is not None:
            pieces["param_initial"], self._initial_norm = self._initial_norm.to(device), None
        entries, out = self._queue.take(trainer, extra=pieces)  # one transfer
        self._replay(trainer, entries)
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
            metrics["diag/amp/skipped_steps"] = float(self._history.skipped)
        _logging.log_step(pl_module, metrics)
        self._remember_norms(
            trainer.global_step, groups.names if self.group_by != "total" else ("total",), out
        )
        if self.log_histogram:
            _logging.log_histogram(trainer, "diag/grad_norm/hist", stats.norms, step=trainer.global_step)
        if scaler is not None:
            history = self._history
            amp = amp_verdict(
                out["scale"][0],
                history.skipped,
                history.max_run,
                self.amp_min_scale,
                self.amp_max_consecutive_skips,
            )
            if amp is not None:
                self.record(trainer, amp)
            history.max_run = 0
        ratio = self._weights_ratio(out)
        if math.isfinite(out["total"][0]):
            self._check_vanishing(trainer, self._leaf_index(stats.names, device).names, out["leaves"], ratio)

    def _weights_ratio(self, out: dict[str, list[float]]) -> float | None:
        """The parameters' total norm now over its value before the first update (``None`` when not measured)."""
        ratio = None
        if "param_initial" in out and math.isfinite(out["param_initial"][0]):
            self._first_param_norm = out["param_initial"][0]
        if "param_total" in out and math.isfinite(out["param_total"][0]):
            if self._first_param_norm is None:
                self._first_param_norm = out["param_total"][0]
            ratio = out["param_total"][0] / self._first_param_norm if self._first_param_norm > 0 else None
        self._param_ratio = ratio if ratio is not None else self._param_ratio
        return ratio

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

    def _leaf_index(self, names: tuple[str, ...], device: torch.device) -> GroupIndex:
        """Tensors grouped by leaf module (the gradient rules judge per layer whatever the logging grouping)."""
        if self._leaves is None or self._leaf_names != names or self._leaves.index.device != device:
            self._leaves = group_index(names, "module", max(len(n.split(".")) for n in names), device)
            self._leaf_names = names
        return self._leaves

    def _check_vanishing(
        self,
        trainer: pl.Trainer,
        names: tuple[str, ...],
        norms: list[float],
        param_ratio: float | None = None,
    ) -> None:
        verdict = self._vanishing.check(names, norms, param_ratio)
        if verdict is not None:
            self.record(trainer, verdict)

    def _check_vanishing_at_end(self, trainer: pl.Trainer) -> None:
        """Judge the steps after the last logging step (all of a run shorter than the logging interval)."""
        entries = self._queue.entries
        if not entries or not self._names:
            return
        leaves = self._leaf_index(self._names, entries[-1].kept["norms"].device)
        count = len(entries)
        picks = sorted({round(i * (count - 1) / max(self.patience - 1, 1)) for i in range(self.patience)})
        rows = [
            entries[i].kept["norms"] for i in picks if entries[i].kept["norms"].numel() == len(self._names)
        ]
        if not rows:
            return
        values = torch.stack([grouped_norms(r.float(), leaves, self.norm_type) for r in rows]).tolist()
        for row in values:  # (the parameters' norm ratio as of the last logging step)
            self._check_vanishing(trainer, leaves.names, row, self._param_ratio)

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
        if self._queue:  # steps after the last logging step still get their say
            self._check_vanishing_at_end(trainer)
            self._replay(trainer, self._queue.take(trainer)[0])

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            **self._history.state_dict(),
            "vanishing_streak": dict(self._vanishing.streak),
            "first_param_norm": self._first_param_norm,
            "findings": self._findings_state(),
        }
        if self._queue:  # steps not replayed yet: saved raw, so a resumed run replays them alike
            state["queue"] = self._queue.state_dict()
            state["pending_names"] = list(self._names)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._history.load_state_dict(state_dict)
        self._vanishing.streak = {str(k): int(v) for k, v in state_dict.get("vanishing_streak", {}).items()}
        if state_dict.get("first_param_norm") is not None:
            self._first_param_norm = float(state_dict["first_param_norm"])
        self._queue.load_state_dict(state_dict.get("queue") or _compat.grad_norm_queue_0_1(state_dict))
        if self._queue:
            self._names = tuple(state_dict.get("pending_names", ()))
        self._load_findings_state(state_dict)
