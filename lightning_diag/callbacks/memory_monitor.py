"""MemoryMonitor: memory that grows, the step that will run out, and why an out-of-memory error happened."""

from __future__ import annotations

import statistics
from collections import deque
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lightning_diag import _logging
from lightning_diag._validation import check_int, check_positive
from lightning_diag.callbacks import _memory_readings
from lightning_diag.callbacks._base import DiagCallback
from lightning_diag.core.batches import tensors
from lightning_diag.core.memory import (
    MIB,
    Growth,
    Holder,
    MemoryTrend,
    as_per_step,
    as_sawtooth,
    describe_batch,
    find_holders,
    fragmentation_verdict,
    growth_verdict,
    is_oom,
    oom_verdict,
    pick_holder,
    pressure_verdict,
)

__all__ = ["MemoryMonitor"]

_Reader = _memory_readings.CudaReader | _memory_readings.ProcessReader
#: Batch sizes kept for "the median batch so far" (per loop: training, validation).
_SIZES = 1024
#: Logging points kept for the report's memory curve (older ones are thinned).
_SERIES = 512


class MemoryMonitor(DiagCallback):
    """Log the memory a run uses, find memory that grows (and what holds it), forecast the step that runs out, and
    explain an out-of-memory error.

    On CUDA it reads the caching allocator's counters (``torch.cuda.memory_stats``, host-side: no synchronisation)
    and resets the peak statistics at every logging step, so each logged peak is that interval's own. On CPU it
    reads the process RSS (``/proc/self/statm``, a few microseconds). Nothing is read on a quiet step: the hooks of
    a step that does not log only note the phase and the batch's size (tensor metadata).

    **What survives a step** (the baseline) is read in ``on_train_batch_start`` of the logging steps, minus the new
    batch's own bytes: after the previous step's optimizer update and clean-up, before this step's forward (the
    previous step's gradients are still there: Lightning zeroes them inside the next step). It is also read at the
    start and end of every training epoch and validation run; these boundaries separate what training steps keep
    from what validation keeps and from what an epoch end gives back (:mod:`lightning_diag.core.memory` has the
    rules and their thresholds).

    Args:
        ignore_first_steps: steps left out of the growth rule at the start of the fit (optimizer state, caches and
            workers appear there). The first validation run's own allocations are always left out.
        min_points: measurement points (logging steps and loop boundaries after warm-up) the growth rule needs;
            at least 8.
        min_growth_mib: growth worth reporting, in MiB: over the measured window (per step), in one epoch
            (saw-tooth), or over the validation runs after the first.
        capacity_mib: the memory the run may use, in MiB; ``None``: the device's memory times
            ``torch.cuda.get_per_process_memory_fraction`` on CUDA, the physical memory (or the cgroup's limit when
            lower) on CPU. The projected exhaustion step and the pressure are judged against it.

    Logged metrics (every ``log_every_n_steps``, in MiB, written straight to the loggers by global rank 0: they are
    not in ``trainer.callback_metrics``):
        =====================================  ==========================================================
        key                                    value
        =====================================  ==========================================================
        ``diag/memory/baseline_mib``           what survives a step (read at the step's start, less the batch)
        ``diag/memory/allocated_mib``          CUDA: allocated now; CPU: ``diag/memory/rss_mib``, the RSS
        ``diag/memory/peak_mib``               the peak since the last logging step (CPU: the largest RSS read)
        ``diag/memory/reserved_mib``           CUDA: reserved by the caching allocator now
        ``diag/memory/reserved_peak_mib``      CUDA: reserved, peak since the last logging step
        ``diag/memory/capacity_mib``           the capacity the findings are judged against
        ``diag/memory/alloc_retries``          CUDA: allocations that failed and were retried after a cache flush
        ``diag/memory/ooms``                   CUDA: out-of-memory errors the allocator raised (caught or not)
        ``diag/memory/children_rss_mib``       the RSS of child processes (DataLoader workers), when there are any
        =====================================  ==========================================================

    Findings:
        ``memory_growth`` (warning): the baseline keeps rising after warm-up (Theil-Sen slope over pairs of
        points, most of them rising, ``min_growth_mib`` or more), with the pattern (``per_step``, ``per_epoch``
        saw-tooth, ``at_validation``), bytes per step/epoch/validation, the projected exhaustion step, and the
        attribute that holds it ("`self.hist` holds 1,200 tensors with autograd history"): the LightningModule's
        attributes, its submodules' (torchmetrics states) and ``trainer.callback_metrics`` are walked only once
        growth is found. Growth seen only in the first epoch (a cache filling once) is reported when it is
        certain: its holder keeps tensors with autograd history, or it would run out within the run.
        ``memory_pressure`` (info from 92 % of the capacity at peak, warning from 97 %). ``memory_fragmentation``
        (CUDA; warning when allocation retries rose, info when reserved exceeds allocated by 30 % of the capacity
        at peak). ``out_of_memory`` (error) when fit dies of an OOM: the phase (forward, backward, optimizer step,
        validation, between steps), the batch's shapes and size against the median batch so far, the memory, and
        advice ordered by the evidence; the report links it to the growth or fragmentation found before
        (``caused_by``). ``declined`` (info) on a device without memory counters (MPS, XLA).

    Raises:
        ValueError: (``ArgumentError``) at construction for a negative ``ignore_first_steps``, ``min_points`` below
            8, or a ``min_growth_mib``/``capacity_mib`` that is not a positive number.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_diag import MemoryMonitor
        >>> trainer = pl.Trainer(callbacks=[MemoryMonitor(min_growth_mib=256)])

    Note:
        CUDA's peak statistics are process-wide: after a logging step, ``torch.cuda.max_memory_allocated()``
        means "since the last logging step" (the run's peak is ``max`` of ``diag/memory/peak_mib``). CPU RSS keeps
        memory the C allocator has not returned, so it moves in steps of a few MiB and rarely goes down; the
        default ``min_growth_mib`` is far above that noise (``benchmarks/diagnosis`` calibrates it). Mixed
        precision and gradient accumulation change nothing here (with accumulation the baseline is read at the
        first micro-batch of a logging step). Under DDP each rank watches its own memory with no collective; the
        report holds rank 0's findings. A resumed run starts its measurements afresh (another process: its
        memory is not comparable); its findings and batch sizes come back from the checkpoint.
    """

    def __init__(
        self,
        ignore_first_steps: int = 10,
        min_points: int = 8,
        min_growth_mib: float = 64.0,
        capacity_mib: float | None = None,
    ) -> None:
        super().__init__()
        check_int("ignore_first_steps", ignore_first_steps, minimum=0)
        check_int("min_points", min_points, minimum=8)
        check_positive("min_growth_mib", min_growth_mib)
        if capacity_mib is not None:
            check_positive("capacity_mib", capacity_mib)
        self.ignore_first_steps = ignore_first_steps
        self.min_points = min_points
        self.min_growth_mib = min_growth_mib
        self.capacity_mib = capacity_mib
        self._reset_state()

    def _reset_state(self) -> None:
        self._reader: _Reader | None = None
        self._trend = MemoryTrend()
        self._phase = "between steps"
        self._batch: Any = None
        self._sizes: deque[int] = deque(maxlen=_SIZES)
        self._val_sizes: deque[int] = deque(maxlen=_SIZES)
        self._last_logged = -1
        self._series: list[tuple[int, float, float]] = []  # (step, baseline MiB, peak MiB)
        self._peak = 0.0
        self._retries: int | None = None
        self._retries_step = 0
        self._fragmented = False
        self._growth: Growth | None = None
        self._reported = False
        self._holder = ""
        self._snapshot: tuple[int, dict[str, Holder]] | None = None
        self._pending: tuple[Growth, Holder, Holder | None] | None = None
        self._walked = -float("inf")  # the baseline at the last walk
        self._total_steps: float | None = None
        self._oom: tuple[int, float] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            ignore_first_steps=self.ignore_first_steps,
            min_points=self.min_points,
            min_growth_mib=self.min_growth_mib,
            capacity_mib=self.capacity_mib,
        )

    # -- set-up ---------------------------------------------------------------------------------------------
    def _capacity(self) -> float | None:
        return None if self.capacity_mib is None else float(self.capacity_mib) * MIB

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reader = _memory_readings.reader_for(pl_module.device, self._capacity())
        if self._reader is None:
            self.decline(
                trainer,
                f"MemoryMonitor has no memory counters for the `{pl_module.device.type}` device (it reads CUDA's "
                "caching allocator, or the process RSS on Linux): it logs and checks nothing in this run.",
                "device",
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            self._total_steps = float(trainer.estimated_stepping_batches)
        except Exception:  # an iterable without length, a bound Lightning cannot estimate: no run length
            self._total_steps = None

    # -- the phase and the batch (every step: metadata only) -----------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._phase, self._batch = "forward", batch
        self._sizes.append(sum(int(t.numel()) for t in tensors(batch)))
        if self._reader is None or trainer.global_step == self._last_logged:
            return
        if _logging.should_log_step(trainer):
            self._last_logged = trainer.global_step
            self._logging_step(trainer, pl_module, batch, self._reader)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        self._phase = "backward"

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self._phase = "optimizer step"

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._phase, self._batch = "between steps", None

    @override
    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._phase, self._batch = "validation", batch
        if not trainer.sanity_checking:
            self._val_sizes.append(sum(int(t.numel()) for t in tensors(batch)))

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
        self._batch = None

    # -- the loop's boundaries (once per epoch / validation run) ------------------------------------------
    def _boundary(self, trainer: pl.Trainer, kind: Any) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if self._reader is not None and fitting:
            self._trend.add(kind, trainer.global_step, trainer.current_epoch, self._reader.current())

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._boundary(trainer, "epoch_start")
        self._settle_pending(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._boundary(trainer, "epoch_end")  # before the LightningModule's own hook (which may clear lists)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._phase = "validation"
        self._boundary(trainer, "val_start")

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._boundary(trainer, "val_end")
        self._phase, self._batch = "between steps", None

    # -- logging steps --------------------------------------------------------------------------------------
    def _logging_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, reader: _Reader
    ) -> None:
        reading = reader.interval()
        own = describe_batch(batch, limit=0, device_type=pl_module.device.type).nbytes
        baseline = max(reading.current - own, 0.0)
        step = trainer.global_step
        self._trend.add("step", step, trainer.current_epoch, baseline)
        self._peak = reading.peak
        cuda = reader.device == "cuda"
        metrics: dict[str, float] = {
            "diag/memory/baseline_mib": baseline / MIB,
            ("diag/memory/allocated_mib" if cuda else "diag/memory/rss_mib"): reading.current / MIB,
            "diag/memory/peak_mib": reading.peak / MIB,
            "diag/memory/capacity_mib": reader.capacity / MIB,
        }
        if cuda:
            metrics["diag/memory/reserved_mib"] = (reading.reserved or 0.0) / MIB
            metrics["diag/memory/reserved_peak_mib"] = (reading.reserved_peak or 0.0) / MIB
            metrics["diag/memory/alloc_retries"] = float(reading.retries or 0)
            metrics["diag/memory/ooms"] = float(reading.ooms or 0)
        children = _memory_readings.children_rss()
        if children is not None:
            metrics["diag/memory/children_rss_mib"] = children / MIB
        # Straight to the loggers: Lightning's `self.log` costs about a millisecond per key on a logging step.
        _logging.log_direct(trainer, metrics, step=step)
        self._series.append((step, baseline / MIB, reading.peak / MIB))
        if len(self._series) > _SERIES:
            self._series = self._series[: _SERIES // 2 : 2] + self._series[_SERIES // 2 :]
        self._judge(trainer, pl_module, reading, reader)

    def _judge(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        reading: _memory_readings.Reading,
        reader: _Reader,
    ) -> None:
        pressure = pressure_verdict(reading.peak, reader.capacity, device=reader.device)
        if pressure is not None:
            self.record(trainer, pressure, key=pressure.severity)
        if reading.retries is not None:
            previous = self._retries if self._retries is not None else reading.retries
            fragmentation = fragmentation_verdict(
                new_retries=reading.retries - previous,
                retries=reading.retries,
                since_step=self._retries_step,
                reserved_peak=reading.reserved_peak or 0.0,
                allocated_peak=reading.peak,
                capacity=reader.capacity,
                expandable=reader.expandable(),
            )
            if fragmentation is not None:
                self._fragmented = True
                self.record(trainer, fragmentation, key=fragmentation.severity)
            self._retries, self._retries_step = reading.retries, trainer.global_step
        self._check_growth(trainer, pl_module)

    # -- growth and its holder (the walk runs only once growth is found) ----------------------------------
    def _check_growth(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, run_died: bool = False
    ) -> Growth | None:
        if self._reported or self._reader is None:
            return self._growth
        if self._pending is not None and run_died:
            return self._report(trainer, *self._pending)
        min_growth = float(self.min_growth_mib) * MIB
        growth = self._trend.judge(
            min_growth=min_growth,
            capacity=self._reader.capacity,
            peak=max(self._peak, self._trend.points[-1].value if self._trend.points else 0.0),
            total_steps=self._total_steps,
            min_points=self.min_points,
            ignore_first_steps=self.ignore_first_steps,
            run_died=run_died,
        )
        if growth is None:
            return None
        step = int(trainer.global_step)
        if growth.size < min_growth:  # a candidate: remember what the module holds now, to compare later
            if self._snapshot is None:
                self._snapshot = (step, self._walk(trainer, pl_module))
                self._walked = growth.baseline
            return None
        if not growth.confirmed and growth.baseline - self._walked < 0.25 * min_growth:
            return None  # walked when the baseline was about as high: nothing new to find until it grows
        self._walked = growth.baseline
        found = self._walk(trainer, pl_module)
        before = self._snapshot[1] if self._snapshot is not None else None
        picked = pick_holder(found, before, min_bytes=0.25 * growth.size)
        holder, gained = picked if picked is not None else (None, None)
        if growth.pattern == "at_validation" and holder is not None and holder.with_history:
            growth = as_per_step(growth)  # validation makes no autograd history: training steps keep it
        if not growth.confirmed and holder is not None and holder.with_history:
            growth.confirmed_by = "holder_with_history"
            if self._epochs_ahead(trainer):
                # Whether the holder is emptied at the epoch's end (a saw-tooth: on CPU the RSS does not show the
                # release, the C allocator keeps the memory) is seen at the next epoch's start.
                self._pending = (growth, holder, gained)
                return None
        if not growth.confirmed:
            if self._snapshot is None:
                self._snapshot = (step, found)
            return None
        return self._report(trainer, growth, holder, gained)

    def _report(
        self, trainer: pl.Trainer, growth: Growth, holder: Holder | None, gained: Holder | None
    ) -> Growth:
        self._reported, self._growth, self._pending = True, growth, None
        self._holder = holder.name if holder is not None else ""
        since = self._snapshot[0] if self._snapshot is not None and gained is not None else None
        device = self._reader.device if self._reader is not None else "cpu"
        verdict = growth_verdict(growth, holder, gained, since_step=since, device=device)
        self.record(trainer, verdict, step=growth.last_step)
        return growth

    def _epochs_ahead(self, trainer: pl.Trainer) -> bool:
        last = trainer.max_epochs
        return last is None or last < 0 or trainer.current_epoch + 1 < last

    def _settle_pending(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """At the first epoch start after a growth confirmed by its holder: emptied by the epoch end -> saw-tooth."""
        if self._pending is None:
            return
        growth, holder, gained = self._pending
        now = self._walk(trainer, pl_module).get(holder.name)
        if now is None or now.with_history <= holder.with_history // 2:
            release = self._trend.releases[-1] if self._trend.releases else None
            steps = release.steps if release is not None else growth.last_step
            growth = as_sawtooth(growth, steps_per_epoch=steps, epoch_start=int(trainer.global_step))
        self._report(trainer, growth, holder, gained)

    def _walk(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Holder]:
        roots = {"self": pl_module, "trainer.callback_metrics": dict(trainer.callback_metrics)}
        return find_holders(roots, skip=[*pl_module.parameters(), *pl_module.buffers()])

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batch = None
        if self._pending is not None:
            self._report(trainer, *self._pending)
        elif self._last_logged != trainer.global_step:
            self._check_growth(trainer, pl_module)

    # -- out of memory -------------------------------------------------------------------------------------
    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if is_oom(exception):
            self._record_oom(trainer, pl_module, exception)
        super().on_exception(trainer, pl_module, exception)

    def _record_oom(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        reader = self._reader or _memory_readings.reader_for(pl_module.device, self._capacity())
        batch = describe_batch(self._batch) if self._batch is not None else None
        sizes = list(self._val_sizes if self._phase == "validation" else self._sizes)
        if batch is not None and sizes:
            sizes = sizes[:-1]  # the median of the batches before this one
        growth = self._check_growth(trainer, pl_module, run_died=True)
        reading = reader.interval() if reader is not None else None
        verdict = oom_verdict(
            phase=self._phase,
            error=f"{type(exception).__name__}: {exception}",
            batch=batch,
            median_numel=float(statistics.median(sizes)) if sizes else 0.0,
            device=reader.device if reader is not None else pl_module.device.type,
            current=reading.current if reading is not None else 0.0,
            peak=max(reading.peak, self._peak) if reading is not None else 0.0,
            capacity=reader.capacity if reader is not None else 0.0,
            reserved=reading.reserved if reading is not None else None,
            retries=reading.retries if reading is not None else None,
            growth=growth,
            holder=self._holder,
            fragmented=self._fragmented,
            expandable=reader.expandable() if reader is not None else False,
        )
        self.record(trainer, verdict)
        if reading is not None:
            self._oom = (int(trainer.global_step), reading.current / MIB)

    # -- report ---------------------------------------------------------------------------------------------
    def report_series(self) -> dict[str, Any]:
        """The memory curve (baseline and peak per logging step), the capacity, the projected exhaustion and the
        OOM, for the HTML report.
        """
        if not self._series and self._oom is None:
            return {}
        memory: dict[str, Any] = {
            "device": self._reader.device if self._reader is not None else "",
            "steps": [s for s, _, _ in self._series],
            "baseline_mib": [b for _, b, _ in self._series],
            "peak_mib": [p for _, _, p in self._series],
            "capacity_mib": self._reader.capacity / MIB if self._reader is not None else None,
            "exhaustion_step": None,
            "pattern": None,
            "oom": list(self._oom) if self._oom is not None else None,
        }
        growth = self._growth
        if growth is not None:
            memory["pattern"] = growth.pattern
            if growth.exhaustion_step is not None:
                memory["exhaustion_step"] = growth.exhaustion_step
                memory["projection"] = [
                    [growth.last_step, growth.peak / MIB],
                    [growth.exhaustion_step, growth.capacity / MIB],
                ]
        return {"memory": memory}

    # -- state ----------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "findings": self._findings_state(),
            "batch_sizes": list(self._sizes),
            "val_batch_sizes": list(self._val_sizes),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_findings_state(state_dict)
        self._sizes = deque((int(n) for n in state_dict.get("batch_sizes", [])), maxlen=_SIZES)
        self._val_sizes = deque((int(n) for n in state_dict.get("val_batch_sizes", [])), maxlen=_SIZES)
        self._reported = any(f.code == "memory_growth" for f in self.findings)
