"""ActivationMonitor: dead and saturated units, per layer, nearly free between checks."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_diag import _distributed, _lightning, _logging
from lightning_diag._validation import check_bool, check_fraction, check_int
from lightning_diag.callbacks._base import DiagCallback
from lightning_diag.callbacks._context import step_context
from lightning_diag.callbacks._deferred import pack, unpack
from lightning_diag.core import activations as act
from lightning_diag.core.grad_stats import local_tensor

__all__ = ["ActivationMonitor"]


class ActivationMonitor(DiagCallback):
    """Find dead units (ReLU that never fire, dormant GELU/SiLU) and saturated tanh/sigmoid layers as training runs.

    Two parts, so that a step that does not check costs (nearly) nothing:

    * **Every optimizer step** (``on_before_optimizer_step``, from the gradients of the shared step context): per
      output unit (row) of every trainable ``Linear``/``ConvNd`` weight, whether its gradient row and bias entry
      were exactly zero, AND-accumulated on the device (a concatenation, an absolute value, a row sum and an add
      per group of weights with the same row length; no host synchronisation). A ReLU unit that is off for every
      sample of a batch gets an exactly-zero row, so a unit whose row stays zero over a whole check interval never
      fired on any of those batches.
    * **At check steps** (every ``check_every_n_steps``, by default the logging interval): forward hooks on the
      weight layers and activation modules are attached for that step's batch (``on_train_batch_start``) and removed
      after it (``on_train_batch_end``); they reduce on the device the ReLU-family on-rate per unit, the GELU/SiLU
      dormant score, the share of tanh/sigmoid pre-activations in the saturated range and the RMS per layer. After
      the optimizer step, everything comes to the host in **one** packed read (one all-reduce before it under DDP);
      the rules of :mod:`lightning_diag.core.activations` judge it.

    An activation module is attributed to the ``Linear``/``ConvNd`` that produced its input (also through a
    BatchNorm or Dropout in between); functional activations (``torch.relu`` in ``forward``) are not seen by the
    hooks, but their dead units still are, through the gradient rows.

    Args:
        check_every_n_steps: optimizer steps between checks (``None``: the Trainer's ``log_every_n_steps``).
        layer_share: the share of a layer's units that must be dead (or of its pre-activations saturated) for the
            layer to count at a check (SageMaker Debugger's ``threshold_layer``).
        patience: consecutive checks the condition must hold before it is reported.
        check_dead_units: accumulate the gradient rows and look for dead/dormant units.
        check_saturation: look for saturated tanh/sigmoid pre-activations.

    Logged metrics (at check steps):
        ==========================================  ====================================================
        key                                         value
        ==========================================  ====================================================
        ``diag/activations/<layer>/dead_frac``      share of the layer's units dead since the last check
        ``diag/activations/<layer>/saturated_frac`` share of its pre-activations in the saturated range
        ``diag/activations/<layer>/rms``            RMS of the values entering its activation (its output
                                                    when no activation module follows it)
        ==========================================  ====================================================

        ``<layer>`` is the qualified name of the ``Linear``/``ConvNd`` (or of an activation module no weight layer
        feeds directly). The values go straight to the loggers at the check step (global rank 0), not through
        ``LightningModule.log``, so they are not in ``trainer.callback_metrics``.

    Findings:
        ``dead_units`` and ``saturated_activations``, naming the layer, its activation and the share, with advice
        that follows the evidence (a negative bias, the learning rate, the activation, the initialisation, the input
        scale), once the condition held ``patience`` consecutive checks. They are symptoms: recorded as **info**
        pending a consequence, and the end-of-fit gate (:mod:`lightning_diag.core.consequences`) makes them
        **warnings** when the training shows one (a plateau or underfitting they explain, gradients that vanished to
        exactly 0 behind a dead layer, a loss that got worse after them or never moved). ``declined`` (info) under
        ``torch.compile``: dynamo skips hooks added after compilation, so only the gradient-row part runs.

    Raises:
        ValueError: (``ArgumentError``) at construction for a non-positive ``check_every_n_steps`` or ``patience``,
            a ``layer_share`` outside ``(0, 1]``, or a non-bool flag.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_diag import ActivationMonitor
        >>> trainer = pl.Trainer(log_every_n_steps=50, callbacks=[ActivationMonitor(patience=3)])

    Note:
        Gradient accumulation: the rows are judged on the accumulated gradients of each optimizer step, the hooks
        see the first micro-batch of a check step. AMP: statistics are reduced in float32 and a GradScaler's scaled
        or overflowing gradients are never exactly zero by accident (an inf row counts as alive). DDP: gradients
        are already averaged, so a unit is dead only if it is dead on every rank; the hooks' sums are added over
        ranks with one all-reduce at a check (when every rank hooked the same layers). Sharded or non-dense
        gradients (FSDP2 DTensors, sparse) skip the gradient rows; ReLU units then count as dead when their on-rate
        on the check batch is below 1%.
    """

    def __init__(
        self,
        check_every_n_steps: int | None = None,
        layer_share: float = 0.5,
        patience: int = 3,
        check_dead_units: bool = True,
        check_saturation: bool = True,
    ) -> None:
        super().__init__()
        if check_every_n_steps is not None:
            check_int("check_every_n_steps", check_every_n_steps, minimum=1)
        check_fraction("layer_share", layer_share, low_open=True)
        check_int("patience", patience, minimum=1)
        check_bool("check_dead_units", check_dead_units)
        check_bool("check_saturation", check_saturation)
        self.check_every_n_steps = check_every_n_steps
        self.layer_share = float(layer_share)
        self.patience = patience
        self.check_dead_units = check_dead_units
        self.check_saturation = check_saturation
        self._reset_state()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            check_every_n_steps=self.check_every_n_steps, layer_share=self.layer_share, patience=self.patience
        )

    def _reset_state(self) -> None:
        self._rules = act.ActivationRules(self.layer_share, self.patience)
        self._probe: act.ActivationProbe | None = None
        self._hooks_off = False  # declined (torch.compile)
        self._rows: dict[int, tuple[list[torch.Tensor], act.DeadRows]] = {}  # id(optimizer) -> (params, rows)
        self._rows_state: dict[str, Any] = {}  # loaded from a checkpoint, applied when the rows are built
        self._check_step: int | None = None  # the step whose batch is (or was) hooked
        self._layers: dict[str, Any] = {}  # name -> module, for the facts of the messages

    # -- setup ------------------------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after configure_model (layers built or sharded there are in place), before the first batch
        self._rules.interval = self._interval(trainer)
        self._layers = dict(pl_module.named_modules())
        self._probe = act.ActivationProbe(pl_module)
        if _lightning.compiled(pl_module):
            self._hooks_off = True
            self.decline(
                trainer,
                "ActivationMonitor does not attach its forward hooks under torch.compile: dynamo skips hooks added "
                "after compilation (no recompile, no statistics). Dead units are still found from the gradient "
                "rows; on-rates, saturation and per-layer RMS are not measured.",
                "torch_compile",
            )

    def _interval(self, trainer: pl.Trainer) -> int:
        return int(self.check_every_n_steps or max(int(getattr(trainer, "log_every_n_steps", 50) or 1), 1))

    def _is_check(self, trainer: pl.Trainer) -> bool:
        if self.check_every_n_steps is None:
            return _logging.should_log_step(trainer)
        return (trainer.global_step + 1) % self.check_every_n_steps == 0

    # -- per step ---------------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._probe is None or self._check_step == trainer.global_step or not self._is_check(trainer):
            return
        self._check_step = trainer.global_step
        if not self._hooks_off:
            self._probe.attach()

    @override
    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.check_dead_units:
            return
        step = step_context(trainer, pl_module, optimizer)
        if step.device is None or not step.grads:
            return  # sharded, sparse, complex or mixed-device gradients: the on-rate stands in at checks
        cached = self._rows.get(id(optimizer))
        if cached is None or cached[0] is not step.params:
            layers = act.layer_map(step.params, pl_module)
            if not layers:
                return
            rows = act.DeadRows(step.grads, layers)
            if cached is None and self._rows_state:
                rows.load_state_dict(self._rows_state)
            self._rows[id(optimizer)] = (step.params, rows)
            cached = self._rows[id(optimizer)]
        cached[1].update(step.grads)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._probe is not None and self._probe.attached:
            self._probe.detach()  # the hooks saw this batch's forward (the first micro-batch of the step)
        if self._check_step is not None and trainer.global_step > self._check_step:
            step, self._check_step = self._check_step, None
            self._check(trainer, step)

    # -- checks -----------------------------------------------------------------------------------------------
    def _check(self, trainer: pl.Trainer, step: int) -> None:
        """Judge the interval that ends at ``step``: one collective (DDP) and one host read."""
        assert self._probe is not None
        raw = self._reduce(trainer, self._probe.raw() if self._probe.calls else {})
        dead = self._dead_masks()
        summary = self._probe.summary(raw, dead)
        biases = {  # for the advice; a sharded (FSDP2) bias is left out rather than gathered
            name: bias.detach().float().mean()
            for name in summary
            if isinstance(bias := getattr(self._layers.get(name), "bias", None), torch.Tensor)
            and local_tensor(bias) is bias
        }
        parts: dict[str, torch.Tensor] = {}
        if summary:
            parts["summary"] = torch.stack(list(summary.values()))
        if biases:
            parts["bias"] = torch.stack(list(biases.values()))
        device = next(iter(parts.values())).device if parts else None
        vector, layout = pack(parts, device)
        read = unpack(vector.tolist(), layout)  # the one host read of the check
        bias_means = dict(zip(biases, read.get("bias", []), strict=True))
        readings = self._readings(summary, read.get("summary", []), bias_means, dead)
        self._log(trainer, step, readings)
        for key, verdict, first, epoch in self._rules.update(step, readings, epoch=trainer.current_epoch):
            self.record(trainer, verdict, key=key, step=first, epoch=epoch)
        for _, rows in self._rows.values():
            rows.reset()
        self._probe.calls, self._probe.layers = [], {}

    def _reduce(self, trainer: pl.Trainer, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The hooks' sums added over ranks (one all-reduce), when every rank has the same layout."""
        if not raw or not _distributed.is_distributed(trainer):
            return raw
        vector, layout = pack(raw)
        layouts = _distributed.gather_objects(trainer, layout)
        if any(other != layout for other in layouts):
            return raw  # data-dependent control flow: each rank judges its own batch
        summed = _distributed.reduce(trainer, vector, "sum")
        return {k: v.reshape(raw[k].shape) for k, v in unpack(summed, layout).items()}

    def _dead_masks(self) -> dict[str, torch.Tensor]:
        masks: dict[str, torch.Tensor] = {}
        for _, rows in self._rows.values():
            if rows.steps:
                masks.update({name: rows.dead(name) for name in rows.names})
        return masks

    def _readings(
        self,
        summary: Mapping[str, torch.Tensor],
        values: list[list[float]] | list[float],
        bias_means: Mapping[str, float],
        dead: Mapping[str, torch.Tensor],
    ) -> list[act.LayerReading]:
        assert self._probe is not None
        rows = _rows_of(values, len(act.SUMMARY_FIELDS))
        readings = []
        for name, row in zip(summary, rows, strict=True):
            unit = self._probe.layers.get(name)
            module = self._layers.get(name)
            kind = unit.kind if unit is not None else None
            source = "dormant" if kind == "smooth" else ("gradients" if name in dead else "on_rate")
            units = int(dead[name].numel()) if name in dead else (unit.units if unit is not None else 0)
            reading = act.LayerReading.from_summary(
                name,
                row,
                activation=unit.activation if unit is not None else None,
                kind=kind,
                units=units,
                description=act.describe(module) if module is not None else "",
                dead_source=source,
                bias_mean=bias_means.get(name, math.nan),
                rows=name in dead,
            )
            if not self.check_dead_units:
                reading.dead_frac = math.nan
            if not self.check_saturation:
                reading.saturated_frac = math.nan
            readings.append(reading)
        order = {name: i for i, name in enumerate(self._layers)}  # registration order, ~ the forward order
        return sorted(readings, key=lambda r: order.get(r.name, len(order)))

    def _log(self, trainer: pl.Trainer, step: int, readings: list[act.LayerReading]) -> None:
        """Straight to the loggers at the check step (``LightningModule.log`` costs ~2 ms a key; per-layer
        series are not meant to be monitored by ModelCheckpoint/EarlyStop).
        """
        metrics: dict[str, float] = {}
        for r in readings:
            for field in ("dead_frac", "saturated_frac", "rms"):
                value = getattr(r, field)
                if math.isfinite(value):
                    metrics[f"diag/activations/{r.name}/{field}"] = value
        _logging.log_direct(trainer, metrics, step=step)

    # -- end of fit -------------------------------------------------------------------------------------------
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._probe is not None:
            self._probe.detach()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._probe is not None:
            self._probe.detach()
        super().on_exception(trainer, pl_module, exception)

    # -- state ------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        rows: dict[str, Any] = {"quiet_rows": {}, "quiet_bias": {}, "steps": 0}
        for _, dead in self._rows.values():
            state = dead.state_dict()
            rows["quiet_rows"].update(state["quiet_rows"])
            rows["quiet_bias"].update(state["quiet_bias"])
            rows["steps"] = max(rows["steps"], state["steps"])
        if not self._rows and self._rows_state:
            rows = self._rows_state
        return {
            "rules": self._rules.state_dict(),
            "rows": rows,
            "findings": self._findings_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "rules" in state_dict:
            self._rules.load_state_dict(state_dict["rules"])
        self._rows_state = dict(state_dict.get("rows", {}))
        for _, rows in self._rows.values():
            rows.load_state_dict(self._rows_state)
        self._load_findings_state(state_dict)


def _rows_of(values: Any, width: int) -> list[list[float]]:
    flat = list(values)
    return [flat[i : i + width] for i in range(0, len(flat), width)]
