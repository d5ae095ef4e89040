"""SilentBugDetector: the training bugs that raise nothing and produce no NaN, checked at sampled steps.

Its core partner is :mod:`lightning_diag.core.silent` (the rules in ``checks``, ``probes``, the words in ``verdicts``).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_diag import _distributed, _lightning, _logging
from lightning_diag._validation import (
    Unused,
    check_bool,
    check_fraction,
    check_int,
    check_range,
    check_unused,
)
from lightning_diag.callbacks._base import DiagCallback
from lightning_diag.callbacks._context import step_context
from lightning_diag.callbacks._deferred import DeferredQueue, pack, unpack
from lightning_diag.core.batches import batch_size, tensors
from lightning_diag.core.silent import checks, probes, verdicts

__all__ = ["SilentBugDetector"]


def _replicated(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Whether every rank holds the whole model (one process, or DDP): not FSDP, DeepSpeed or tensor parallelism,
    whose ranks hold shards, so their checksums differ and their parameter hooks do not see whole gradients.
    """
    if int(getattr(trainer, "world_size", 1)) > 1 and not _lightning.is_a(
        trainer.strategy, "strategies.DDPStrategy"
    ):
        return False
    return not checks.holds_dtensors(pl_module.parameters())


def _accumulate(trainer: pl.Trainer) -> int:
    return int(trainer.accumulate_grad_batches or 1)


def _held(trainer: pl.Trainer) -> list[torch.Tensor]:
    """The parameters the optimizers hold."""
    return [p for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]]


#: Settings that have no effect (``_validation.check_unused``).
_UNUSED = (
    Unused(
        ("noise_scale_ratio", "noise_scale_min_checks", "noise_scale_decay"),
        lambda a: not a["log_noise_scale"],
        "`log_noise_scale=False`",
        "set it to True",
    ),
    Unused(
        ("replica_tolerance",), lambda a: not a["check_replicas"], "`check_replicas=False`", "set it to True"
    ),
)


class SilentBugDetector(DiagCallback):
    """Catch the training bugs that crash nothing: the loss just ends up worse and nobody knows why.

    At check steps it samples a few numbers and checks six invariants of healthy runs. By default the check steps
    are step 0 and Lightning's logging steps (``Trainer(log_every_n_steps)``), where the other callbacks read
    their values anyway; ``check_every_n_steps`` samples every n steps instead. Other steps cost a few integer
    comparisons and no host sync: what a check must see on the step after it (whether gradients were cleared,
    whether the next batch is the same) is judged on the device there and read at the next check. A check makes
    a few small host reads and, under DDP, gathers one vector across ranks (every rank calls it, at the same
    steps).

    1. ``optimizer_no_op``: the step changed none of the sampled parameter elements that had a non-zero gradient
       (LR 0 in every group, updates below the weights' precision), or, at the first step, parameters receive
       gradients that no optimizer holds (the optimizer was built over a copy of the model or another module, or
       layers were replaced after ``configure_optimizers``). A step cancelled on purpose (GradScaler overflow,
       NaNGuard skip) is not judged.
    2. ``stale_gradients``: a gradient was never cleared between two steps of its optimizer (manual optimization
       without ``zero_grad``, an overridden ``optimizer_zero_grad``): each step re-applies the previous gradients.
       Gradient accumulation (``accumulate_grad_batches``) and zeroing before or after the step are healthy.
    3. ``wrong_mode``: a sub-tree with dropout/BatchNorm that a ``.eval()`` reached is still trained (an
       optimizer holds parameters of it that require grad); in validation, a sub-tree switched with ``.train()``,
       or BatchNorm running statistics that grew during validation. Frozen sub-modules and teachers in eval mode,
       BatchNorm layers put in eval one by one and Monte-Carlo dropout are not flagged.
    4. ``replica_divergence`` (DDP): a checksum (norm and sum) of every parameter and float buffer, compared across
       ranks; names the first diverging tensor. BatchNorm running statistics are left out: each rank's forward
       updates them with its own batch between DDP's buffer broadcasts, so they differ in healthy runs. Skipped
       under FSDP, FSDP2, DeepSpeed and tensor parallelism (sharded parameters are not replicas).
    5. ``repeated_data``: a fingerprint of a few values of every batch tensor, compared between the check step's
       batch and the next one (same epoch), and across ranks (DDP, FSDP2 data parallelism; not across the ranks of
       a tensor-parallel mesh, which share their batch on purpose).
    6. ``grad_noise_scale``: the simple gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` of McCandlish et al.
       (2018), from what the step computes anyway: the squared norms of the per-micro-batch, per-rank gradients
       (read by tensor hooks before accumulation and before DDP's averaging) against the norm of their mean (the
       step's gradient). Needs more than one micro-batch per step: ``accumulate_grad_batches > 1`` or DDP. An
       ``info`` finding when the global batch is ``noise_scale_ratio`` times below or above it.

    Args:
        check_every_n_steps: optimizer steps between two checks (``>= 1``; step 0 is always checked), or
            ``None``: check at step 0 and at Lightning's logging steps.
        patience: consecutive checks a condition must hold before it is reported (``>= 1``); replica divergence
            and validation-mode problems are reported at the first check that sees them.
        check_optimizer: run check 1.
        check_stale_gradients: run check 2.
        check_mode: run check 3.
        check_replicas: run check 4 (DDP only).
        check_repeated_data: run check 5.
        log_noise_scale: measure and log the gradient noise scale (check 6).
        replica_tolerance: relative difference of a checksum across ranks that counts as divergence, in
            ``(0, 1)``; DDP replicas are bitwise identical, so the default is tight.
        noise_scale_ratio: the global batch this many times below or above ``B_simple`` is reported (``> 1``).
        noise_scale_min_checks: measurements averaged before the noise scale is judged (``>= 1``).
        noise_scale_decay: decay of the running averages of ``tr(Sigma)`` and ``|G|^2`` across checks, in
            ``[0, 1)``.
        sample_size: elements sampled per tensor by the parameter, gradient and batch fingerprints (``>= 1``).

    Logged metrics:
        ============================  ====================================================================
        key                           value
        ============================  ====================================================================
        ``diag/grad_noise/scale``     running ``B_simple`` in samples, written to the loggers at check steps
        ============================  ====================================================================

        Check steps are rarely Lightning's ``log_every_n_steps`` flushes, so the value goes straight to the
        loggers (global rank 0) rather than through ``self.log``; it is not in ``trainer.callback_metrics``.

    Findings:
        ``optimizer_no_op`` (error: nothing trains; warning: some parameters with gradients are held by no
        optimizer), ``stale_gradients`` (error), ``wrong_mode`` (warning), ``replica_divergence`` (error for
        parameters; warning for float buffers other than norm-layer running statistics), ``repeated_data``
        (error across steps, warning across ranks), ``grad_noise_scale`` (info).

    Raises:
        ValueError: at construction for an interval, patience, sample size or minimum below 1, a tolerance outside
            ``(0, 1)``, a decay outside ``[0, 1)`` or a ratio ``<= 1``.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_diag import SilentBugDetector
        >>> trainer = pl.Trainer(callbacks=[SilentBugDetector(check_every_n_steps=50)])

    Note:
        Checks look at samples, so they are exact about what they see and silent about the rest: a bug that
        toggles within one step, or a batch repeated only across epochs, is not seen. The stale-gradient probe
        relies on hooks of the parameters, which FSDP2's sharded parameters do not run; it still catches a
        gradient re-applied untouched there. The noise scale assumes equal micro-batches and Lightning's division
        of the loss by ``accumulate_grad_batches`` (automatic optimization only); under a GradScaler the incoming
        gradients are divided by the scale.
    """

    def __init__(
        self,
        check_every_n_steps: int | None = None,
        patience: int = 2,
        check_optimizer: bool = True,
        check_stale_gradients: bool = True,
        check_mode: bool = True,
        check_replicas: bool = True,
        check_repeated_data: bool = True,
        log_noise_scale: bool = True,
        replica_tolerance: float = 1e-6,
        noise_scale_ratio: float = 10.0,
        noise_scale_min_checks: int = 5,
        noise_scale_decay: float = 0.9,
        sample_size: int = 64,
    ) -> None:
        super().__init__()
        if check_every_n_steps is not None:
            check_int("check_every_n_steps", check_every_n_steps, minimum=1)
        check_int("patience", patience, minimum=1)
        check_fraction("replica_tolerance", replica_tolerance, low_open=True, high_open=True)
        check_range("noise_scale_ratio", noise_scale_ratio, 1.0, low_open=True)
        check_int("noise_scale_min_checks", noise_scale_min_checks, minimum=1)
        check_fraction("noise_scale_decay", noise_scale_decay, high_open=True)
        check_int("sample_size", sample_size, minimum=1)
        for name, flag in (
            ("check_optimizer", check_optimizer),
            ("check_stale_gradients", check_stale_gradients),
            ("check_mode", check_mode),
            ("check_replicas", check_replicas),
            ("check_repeated_data", check_repeated_data),
            ("log_noise_scale", log_noise_scale),
        ):
            check_bool(name, flag)
        check_unused(SilentBugDetector.__init__, locals(), _UNUSED)
        self.check_every_n_steps = check_every_n_steps
        self.patience = patience
        self.check_optimizer = check_optimizer
        self.check_stale_gradients = check_stale_gradients
        self.check_mode = check_mode
        self.check_replicas = check_replicas
        self.check_repeated_data = check_repeated_data
        self.log_noise_scale = log_noise_scale
        self.replica_tolerance = float(replica_tolerance)
        self.noise_scale_ratio = float(noise_scale_ratio)
        self.noise_scale_min_checks = noise_scale_min_checks
        self.noise_scale_decay = float(noise_scale_decay)
        self.sample_size = sample_size
        self._reset_state()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(check_every_n_steps=self.check_every_n_steps, patience=self.patience)

    def _reset_state(self) -> None:
        self._streaks = {
            k: checks.Streak(self.patience) for k in ("no_op", "stale", "mode", "repeat", "ranks")
        }
        self._noise = probes.NoiseMeter(self.noise_scale_decay)
        self._held_checked = False
        self._drop_probes()

    def _drop_probes(self) -> None:
        for probe in (getattr(self, n, None) for n in ("_stale", "_noop")):
            if probe is not None:
                probe.close()
        self._noise.close()
        self._cycle_step = -1  # the check step in progress
        self._opt_checked = -1  # the check step whose first optimizer step was examined
        self._stale = probes.StaleWatch(self.sample_size)
        self._noop: probes.NoOpProbe | None = None
        self._fp: torch.Tensor | None = None  # this check's batch fingerprint
        # (fingerprint, batch_idx, epoch) of the check's batch, to compare with the batch that follows it
        self._fp_next: tuple[torch.Tensor, int, int] | None = None
        self._bn_before: torch.Tensor | None = None
        # the next batch / next step judged on the device (info["kind"] "repeat"/"stale"), read at the next check
        self._queue = DeferredQueue()

    def noise_scale(self) -> float:
        """The current running estimate of ``B_simple`` (NaN until measured)."""
        return self._noise.estimate.scale

    # -- training batches -------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # A quiet step: two integer comparisons. The work of a check runs under no_grad in the helpers.
        step = trainer.global_step
        if self._fp_next is not None:
            with torch.no_grad():
                self._compare_next_batch(trainer, batch, batch_idx)
        every = int(getattr(trainer, "log_every_n_steps", 50) or 1)
        if step == self._cycle_step or not checks.is_check_step(step, self.check_every_n_steps, every):
            return
        self._cycle_step = step
        with torch.no_grad():
            self._take_deferred(trainer)
            self._start_check(trainer, pl_module, batch, batch_idx)

    def _compare_next_batch(self, trainer: pl.Trainer, batch: Any, batch_idx: int) -> None:
        """The batch after a check's batch: compared on the device, read at the next check (no sync here)."""
        if self._fp_next is None:
            return
        previous, previous_idx, epoch = self._fp_next
        self._fp_next = None
        if batch_idx == previous_idx + 1 and epoch == trainer.current_epoch:
            current = checks.fingerprint(tensors(batch, limit=16), self.sample_size).to(previous.device)
            info = {"kind": "repeat", "batch_idx": batch_idx, "epoch": int(epoch)}
            self._queue.add(trainer.global_step, checks.same_batch(previous, current).float(), info=info)

    def _take_deferred(self, trainer: pl.Trainer) -> None:
        """Judge what the steps after the last check left on the device: one host read, at a check step."""
        entries, _ = self._queue.take(trainer)
        for entry in entries:
            info = entry.info
            if info["kind"] == "repeat" and self._streaks["repeat"].update(entry.host[0] > 0):
                verdict = verdicts.repeated_steps(int(info["batch_idx"]), int(info["epoch"]), self.patience)
                self.record(trainer, verdict, key="steps")
            elif info["kind"] == "stale":
                count, judged = int(entry.host[0]), int(entry.host[1])
                if self._streaks["stale"].update(checks.all_stale(count, judged)):
                    step, next_step = int(info["step"]), int(info["next_step"])
                    self.record(trainer, verdicts.stale_gradients(step, next_step, count, self.patience))

    def _start_check(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.check_repeated_data:
            found = tensors(batch, limit=16)
            self._fp = checks.fingerprint(found, self.sample_size) if found else None
            if self._fp is not None:
                self._fp_next = (self._fp, batch_idx, int(trainer.current_epoch))
        if self.check_mode:
            held = {id(p) for p in _held(trainer)}
            problems = checks.mode_problems(pl_module, True, lambda p: p.requires_grad and id(p) in held)
            if self._streaks["mode"].update(bool(problems)):
                self.record(trainer, verdicts.train_mode(problems, self.patience), key="train")
        if self.log_noise_scale and not self._noise.measuring and self._noise_measurable(trainer, pl_module):
            self._noise.start([p for p in _held(trainer) if p.requires_grad], batch_size(batch))

    def _noise_measurable(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        if not pl_module.automatic_optimization or len(trainer.optimizers) != 1:
            return False
        if _accumulate(trainer) * int(trainer.world_size) < 2:
            return False
        return _replicated(trainer, pl_module)

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        self._noise.open()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        stale = self._stale.due(optimizer, step)
        if stale is not None:
            with torch.no_grad():  # judged on the device now, read at the next check
                info = {"kind": "stale", "step": stale.step, "next_step": step}
                self._queue.add(step, stale.verdict(), info=info)
        if not self._held_checked and self.check_optimizer:
            self._held_checked = True
            self._check_held(trainer, pl_module)
        if step != self._cycle_step or step == self._opt_checked:
            return
        self._opt_checked = step
        with torch.no_grad():
            self._probe_step(trainer, pl_module, optimizer, step)

    def _check_held(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        grads = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad and p.grad is not None]
        unheld, trained = checks.unheld_names(grads, {id(p) for p in _held(trainer)})
        if unheld:
            verdict = verdicts.unheld_parameters(unheld, trained, len(trainer.optimizers))
            self.record(trainer, verdict, key="unheld")

    def _probe_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, step: int
    ) -> None:
        context = step_context(trainer, pl_module, optimizer)
        # (the shared list was built by the first asker: a skip since then may have dropped some gradients)
        params = [p for p in context.params if p.grad is not None]
        self._gather_and_judge(trainer, pl_module, optimizer)
        if not callable(getattr(optimizer, "register_step_post_hook", None)) or not params:
            return  # not a torch optimizer (its step cannot be observed), or nothing to watch
        if self.check_optimizer:
            if self._noop is not None:
                self._noop.close()
            finite = torch.isfinite(context.grad_stats().total_norm)
            self._noop = probes.NoOpProbe(optimizer, params, self.sample_size, finite)
        if self.check_stale_gradients:
            self._stale.arm(optimizer, step, params)

    def _gather_and_judge(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """One vector per rank (checksums, batch fingerprint, noise terms), gathered once, judged on every rank."""
        distributed = _distributed.is_distributed(trainer)
        parts: dict[str, torch.Tensor] = {}
        names: list[str] = []
        parameters = 0
        if distributed and self.check_replicas and _replicated(trainer, pl_module):
            names, parameters, values = checks.replica_checksums(pl_module)
            if values is not None:
                parts["replicas"] = values
        if distributed and self.check_repeated_data and not checks.model_parallel(pl_module):
            parts["data"] = self._fp if self._fp is not None else checks.fingerprint([], self.sample_size)
        if self._noise.measuring:
            stats = step_context(trainer, pl_module, optimizer).grad_stats()
            norm = stats.total_norm if stats.norms.numel() else None
            scaler = _lightning.amp_scaler(trainer)
            scale = _lightning.loss_scale(scaler) if scaler is not None else None
            parts["noise"] = self._noise.row(_accumulate(trainer), norm, scale, pl_module.device)
        if not parts:
            return
        vector, layout = pack(parts, pl_module.device)
        table = unpack(_distributed.gather(trainer, vector).cpu(), layout)  # the one host read of this check
        if "replicas" in table:
            self._judge_replicas(trainer, table["replicas"], names, parameters)
        if "data" in table and self._streaks["ranks"].update(checks.same_on_every_rank(table["data"])):
            verdict = verdicts.repeated_ranks(table["data"].shape[0], trainer.global_step, self.patience)
            self.record(trainer, verdict, key="ranks")
        if "noise" in table:
            self._judge_noise(trainer, table["noise"])

    def _judge_replicas(
        self, trainer: pl.Trainer, table: torch.Tensor, names: list[str], parameters: int
    ) -> None:
        params, buffers = checks.diverging_tensors(table, parameters, self.replica_tolerance)
        step = trainer.global_step
        if params:
            norms = table[:, 2 * params[0]].tolist()
            verdict = verdicts.parameter_divergence(names[params[0]], len(params), norms, step)
            self.record(trainer, verdict, key="parameters")
        if buffers:
            verdict = verdicts.buffer_divergence(names[buffers[0]], len(buffers), table.shape[0], step)
            self.record(trainer, verdict, key="buffers")

    def _judge_noise(self, trainer: pl.Trainer, rows: torch.Tensor) -> None:
        sample = self._noise.add(rows, _accumulate(trainer))
        if sample is None:
            return  # nothing measured, or no positive estimate yet
        scale, checked = self._noise.estimate.scale, self._noise.estimate.count
        # straight to the loggers: a check step is rarely one of Lightning's `log_every_n_steps` flushes
        _logging.log_direct(trainer, {"diag/grad_noise/scale": scale}, step=trainer.global_step)
        ratio = checks.batch_over_noise_scale(sample.global_batch, scale, self.noise_scale_ratio)
        if checked >= self.noise_scale_min_checks and ratio is not None:
            batches = (sample.global_batch, sample.micro_batch, sample.micro_batches)
            verdict = verdicts.grad_noise_scale(scale, ratio, *batches, checked)
            self.record(trainer, verdict, key="below" if ratio < 1 else "above")

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if int(trainer.global_step) <= self._cycle_step:
            return  # accumulating: the optimizer has not stepped yet
        self._stale.disarm()  # a step skipped by the GradScaler never ran its post-hooks
        probe = self._noop
        if probe is None:
            return
        self._noop = None
        probe.close()
        read = probe.read()
        if read is None:
            return  # the step was skipped or cancelled: not judged
        active, moved = read
        seen = checks.no_op_seen(active, moved)  # None: no sampled element had a gradient to apply
        if seen is not None and self._streaks["no_op"].update(seen):
            verdict = verdicts.no_op_step(
                self._cycle_step, active, len(probe.params), probe.lrs, self.patience
            )
            self.record(trainer, verdict, key="no_op")

    # -- validation -----------------------------------------------------------------------------------------
    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.check_mode:
            counts = checks.bn_batches_tracked(pl_module.modules())
            self._bn_before = counts.clone() if counts is not None else None

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self.check_mode or batch_idx != 0 or dataloader_idx != 0:
            return
        problems = checks.mode_problems(pl_module, training=False)
        if problems:
            self.record(trainer, verdicts.validation_mode(problems), key="validation")

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        before, self._bn_before = self._bn_before, None
        grown = checks.bn_updates(before, pl_module.modules())
        if grown > 0:
            self.record(trainer, verdicts.validation_bn_updates(grown), key="bn_validation")

    # -- end and state --------------------------------------------------------------------------------------
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            self._take_deferred(trainer)  # the last check's follow-ups get their say
        self._drop_probes()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._drop_probes()
        super().on_exception(trainer, pl_module, exception)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # A check still waiting for the next step (stale gradients, the next batch) cannot travel in a checkpoint:
        # drop it here, so a run resumed from this checkpoint and the run that went on decide alike. Results
        # already judged on the device travel in `state_dict`.
        self._stale.close()
        self._fp_next = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "streaks": {k: s.count for k, s in self._streaks.items()},
            "noise": self._noise.estimate.state_dict(),
            "held_checked": self._held_checked,
            # results judged on the device, not read yet (read here: saving a checkpoint is not a quiet step)
            "queue": self._queue.state_dict(),
            "findings": self._findings_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, count in state_dict.get("streaks", {}).items():
            if key in self._streaks:
                self._streaks[key].count = int(count)
        self._noise.estimate.load_state_dict(state_dict.get("noise", {}))
        self._held_checked = bool(state_dict.get("held_checked", self._held_checked))
        self._queue.load_state_dict(state_dict.get("queue", []))
        for entry in state_dict.get("deferred", []):  # 0.1.0's format: {"kind", "values", **where}, no step
            where = {k: int(v) for k, v in entry.items() if k not in ("kind", "values")}
            values = torch.tensor([float(v) for v in entry["values"]])
            self._queue.add(-1, values, info={"kind": str(entry["kind"]), **where})
        self._load_findings_state(state_dict)
