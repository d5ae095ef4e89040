"""SpeedMonitor: where a training step's time goes (waiting for data vs computing), and what to change."""

from __future__ import annotations

import math
import os
import time
import warnings
from collections import deque
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_diag import _lightning, _logging
from lightning_diag._validation import (
    Unused,
    check_bool,
    check_fraction,
    check_int,
    check_positive,
    check_unused,
)
from lightning_diag.callbacks._base import DiagCallback
from lightning_diag.core.batches import batch_size
from lightning_diag.core.throughput import (
    LoaderFacts,
    dataloader_bound,
    host_sync_verdict,
    pin_memory_verdict,
)

__all__ = ["SpeedMonitor"]


#: Settings that have no effect (``_validation.check_unused``).
_UNUSED = (
    Unused(
        ("sync_check_steps",),
        lambda a: not a["check_host_syncs"],
        "`check_host_syncs=False`",
        "set `check_host_syncs=True`",
    ),
)


class SpeedMonitor(DiagCallback):
    """Split every training step's wall time into waiting for the batch and computing on it, and say why it is slow.

    Waiting is the time from one ``on_train_batch_end`` to the next ``on_train_batch_start`` (the data loader's
    ``next()`` and Lightning's transfer of the batch); computing is from ``on_train_batch_start`` to
    ``on_train_batch_end``. Both are host clocks read in Python: no synchronisation is added. The first batch of
    each epoch is left out (worker start-up). On a CUDA device the device time of the logging steps is also
    measured with CUDA events, read one logging interval later (by then they have completed: no wait).

    Args:
        window: the steps averaged for the logged values and the findings.
        ignore_first_steps: steps ignored at the start of the fit (compilation, caches, worker start-up).
        data_share: waiting for data above this share of the step time is ``dataloader_bound``...
        min_wait_ms: ...when the wait is also at least this many milliseconds per step: a share of a step that
            takes a few milliseconds in all (a tiny in-memory data set) is not worth fixing, and it moves with the
            machine's load.
        check_host_syncs: on CUDA, watch ``sync_check_steps`` steps after warm-up with
            ``torch.cuda.set_sync_debug_mode("warn")`` and report synchronising calls (``host_sync``).
        sync_check_steps: how many steps that check covers.

    Logged metrics (at the logging interval, averages over the window):
        ====================================  ===================================================
        key                                   value
        ====================================  ===================================================
        ``diag/throughput/data_wait_ms``      waiting for the batch, per step
        ``diag/throughput/compute_ms``        computing on the batch, per step
        ``diag/throughput/data_share``        waiting / (waiting + computing)
        ``diag/throughput/steps_per_sec``     training batches per second
        ``diag/throughput/samples_per_sec``   samples per second (leading dimension of the batch)
        ``diag/throughput/device_ms``         CUDA device time of a logging step (CUDA only)
        ====================================  ===================================================

    Findings:
        ``dataloader_bound``: waiting for data takes more than ``data_share`` of the step time and at least
        ``min_wait_ms`` per step (medians over the window, judged at the logging steps and at the end of fit), with
        the expected speed-up, the share, the milliseconds per step, the seconds the whole run would save, the
        DataLoader's ``num_workers``/``pin_memory``/``persistent_workers``/batch size, and advice that follows from
        them. A warning when the step is starved (60% of its time or more waiting) or the whole run would save a
        minute or more; info otherwise (a short run that loses a few seconds). ``dataloader_config`` (warning):
        ``pin_memory=False`` while training on a CUDA device. ``host_sync`` (warning, CUDA only): synchronising
        calls inside the step, with their call sites.

    Raises:
        ValueError: (``ArgumentError``, also a ``MisconfigurationException``) at construction for a window below
            2, a negative warm-up, a share outside ``(0, 1)``, a non-bool ``check_host_syncs`` or
            ``sync_check_steps`` with ``check_host_syncs=False``.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_diag import SpeedMonitor
        >>> trainer = pl.Trainer(callbacks=[SpeedMonitor(window=50, data_share=0.2)])

    Note:
        With gradient accumulation every micro-batch is a step here (each one waits for its own batch). Under
        DDP each rank measures itself; findings are recorded from rank 0's view (the report is written there).
    """

    def __init__(
        self,
        window: int = 20,
        ignore_first_steps: int = 5,
        data_share: float = 0.3,
        min_wait_ms: float = 10.0,
        check_host_syncs: bool = True,
        sync_check_steps: int = 3,
    ) -> None:
        super().__init__()
        check_int("window", window, minimum=2)
        check_int("ignore_first_steps", ignore_first_steps, minimum=0)
        check_fraction("data_share", data_share, low_open=True, high_open=True)
        check_positive("min_wait_ms", min_wait_ms, strict=False)
        check_int("sync_check_steps", sync_check_steps, minimum=1)
        check_bool("check_host_syncs", check_host_syncs)
        check_unused(SpeedMonitor.__init__, locals(), _UNUSED)
        self.window = window
        self.ignore_first_steps = ignore_first_steps
        self.data_share = float(data_share)
        self.min_wait_ms = float(min_wait_ms)
        self.check_host_syncs = check_host_syncs
        self.sync_check_steps = sync_check_steps
        self._reset_state()

    def _reset_state(self) -> None:
        self._waits: deque[float] = deque(maxlen=self.window)
        self._computes: deque[float] = deque(maxlen=self.window)
        self._samples: deque[int] = deque(maxlen=self.window)
        self._last_end: float | None = None
        self._start = 0.0
        self._wait: float | None = None
        self._batches = 0
        self._last_logged = -1
        self._events: tuple[Any, Any] | None = (
            None  # CUDA events of the last logging step, read at the next one
        )
        self._device_ms: float | None = None
        self._sync_watch: Any = None
        self._sync_records: list[Any] = []
        self._sync_seen: list[str] = []
        self._sync_steps_done = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(window=self.window, data_share=self.data_share)

    # -- per step ---------------------------------------------------------------------------------------------
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_end = None  # the first batch of an epoch waits for worker start-up: not representative

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        self._wait = None if self._last_end is None else now - self._last_end
        self._start = now
        cuda = pl_module.device.type == "cuda"
        if cuda and _logging.should_log_step(trainer):
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._events = (start, None)
        if cuda and self.check_host_syncs and self._watching_syncs():
            self._begin_sync_watch()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._sync_watch is not None:
            self._end_sync_watch(trainer)
        if self._events is not None and self._events[1] is None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events = (self._events[0], end)
        self._batches += 1
        if self._wait is not None and self._batches > self.ignore_first_steps:
            self._waits.append(self._wait)
            self._computes.append(now - self._start)
            self._samples.append(batch_size(batch))
        if _logging.should_log_step(trainer, step_done=True) and trainer.global_step != self._last_logged:
            self._last_logged = trainer.global_step
            self._log_and_check(trainer, pl_module)
        self._last_end = time.perf_counter()  # our own work above is not counted as waiting for data

    def _log_and_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(self._waits) < max(2, self.window // 2):
            return
        wait = sum(self._waits) / len(self._waits)
        compute = sum(self._computes) / len(self._computes)
        step = wait + compute
        share = wait / step if step > 0 else 0.0
        metrics = {
            "diag/throughput/data_wait_ms": wait * 1e3,
            "diag/throughput/compute_ms": compute * 1e3,
            "diag/throughput/data_share": share,
            "diag/throughput/steps_per_sec": 1.0 / step if step > 0 else 0.0,
            "diag/throughput/samples_per_sec": (sum(self._samples) / len(self._samples)) / step
            if step > 0
            else 0.0,
        }
        self._read_device_time()
        if self._device_ms is not None:
            metrics["diag/throughput/device_ms"] = self._device_ms
        _logging.log_step(pl_module, metrics)
        loader = _lightning.train_loader(trainer)
        self._judge_bound(trainer, pl_module, loader)
        if loader is not None and pl_module.device.type == "cuda" and not loader.pin_memory:
            self.record(trainer, pin_memory_verdict(loader.num_workers))

    def _judge_bound(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: DataLoader | None
    ) -> None:
        facts = None
        if loader is not None:
            on_cuda = pl_module.device.type == "cuda"
            facts = LoaderFacts(
                loader.num_workers,
                loader.pin_memory,
                loader.persistent_workers,
                loader.batch_size,
                on_cuda,
                os.cpu_count() or 1,
            )
        verdict = dataloader_bound(
            self._waits,
            self._computes,
            data_share=self.data_share,
            min_wait_ms=self.min_wait_ms,
            steps_so_far=int(trainer.global_step),
            loader=facts,
            steps_total=_total_steps(trainer),
        )
        if verdict is not None:
            self.record(trainer, verdict)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A run shorter than the logging interval (or the steps after the last logging step) is judged at the end.
        if self._last_logged != trainer.global_step and len(self._waits) >= 2:
            self._judge_bound(trainer, pl_module, _lightning.train_loader(trainer))

    # -- CUDA only --------------------------------------------------------------------------------------------
    def _read_device_time(self) -> None:
        if self._events is None or self._events[1] is None:
            return
        start, end = self._events
        if end.query():  # completed long ago by now, normally: reading it does not wait
            self._device_ms = float(start.elapsed_time(end))
            self._events = None

    def _watching_syncs(self) -> bool:
        return self._batches >= self.ignore_first_steps and self._sync_steps_done < self.sync_check_steps

    def _begin_sync_watch(self) -> None:
        self._sync_watch = warnings.catch_warnings(record=True)
        self._sync_records = self._sync_watch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def _end_sync_watch(self, trainer: pl.Trainer) -> None:
        torch.cuda.set_sync_debug_mode(0)
        records = list(self._sync_records or [])
        self._sync_watch.__exit__(None, None, None)
        self._sync_watch = None
        self._sync_steps_done += 1
        self._sync_seen.extend(
            f"{os.path.basename(r.filename)}:{r.lineno}"
            for r in records
            if "synchroniz" in str(r.message).lower()
        )
        if self._sync_steps_done == self.sync_check_steps and self._sync_seen:
            self.record(
                trainer, host_sync_verdict(self._sync_seen, len(self._sync_seen), self.sync_check_steps)
            )

    # -- report ---------------------------------------------------------------------------------------------
    def report_series(self) -> dict[str, Any]:
        """The data-wait vs compute split over the last ``window`` steps, for the HTML report."""
        if not self._waits:
            return {}
        return {
            "speed": {
                "data_wait_ms": sum(self._waits) / len(self._waits) * 1e3,
                "compute_ms": sum(self._computes) / len(self._computes) * 1e3,
                "steps": len(self._waits),
            }
        }

    # -- state ----------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"findings": self._findings_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_findings_state(state_dict)


def _total_steps(trainer: pl.Trainer) -> int | None:
    """The optimizer steps the whole fit will take, when Lightning can tell (``None`` for an endless loader)."""
    total = trainer.estimated_stepping_batches
    return int(total) if isinstance(total, (int, float)) and math.isfinite(total) else None
