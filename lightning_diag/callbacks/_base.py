"""What every lightning_diag callback shares: its findings and the end-of-run report."""

from __future__ import annotations

import os
import warnings
from typing import Any, ClassVar

import lightning.pytorch as pl
from typing_extensions import override

from lightning_diag import _lightning, _logging
from lightning_diag._containment import Contained
from lightning_diag.callbacks._context import run_context
from lightning_diag.core.consequences import gate
from lightning_diag.core.verdict import Verdict
from lightning_diag.errors import LightningDiagWarning
from lightning_diag.findings import (
    Finding,
    FindingLog,
    build_report,
    format_summary,
    sort_findings,
    write_report,
)
from lightning_diag.report import html as html_report
from lightning_diag.report import plots

__all__ = ["DiagCallback", "collect_findings", "run_report"]


class DiagCallback(Contained, *_lightning.callback_bases()):  # type: ignore[misc]
    """Base of the lightning_diag callbacks: records :class:`~lightning_diag.Finding` s and writes the report.

    Subclasses call :meth:`record` for each conclusion. The last lightning_diag callback in
    ``trainer.callbacks`` writes ``diagnosis.json`` and ``diagnosis.html`` (global rank 0) and prints the summary,
    one line per finding (``LIGHTNING_DIAG_VERBOSE=1`` adds the advice), through the progress bar at the end of
    ``fit`` and when ``fit`` dies of an exception. Subclasses put their per-fit state in ``_reset_state`` (called at
    ``setup("fit")``); those that override ``setup``, ``on_fit_end`` or ``on_exception`` must call ``super()``.

    Every hook of every subclass is contained (:mod:`lightning_diag._containment`): an unexpected exception in
    one becomes an ``internal_error`` finding, the callback disables itself for the rest of the fit and the run
    goes on (``LIGHTNING_DIAG_STRICT=1`` raises instead). Exceptions raised on purpose derive from
    :class:`~lightning_diag._containment.Deliberate` (or Lightning's ``MisconfigurationException``) and pass.
    """

    #: old argument name -> its new name, for the names kept (with a deprecation warning) for one release
    renamed_arguments: ClassVar[dict[str, str]] = {}

    def __init__(self) -> None:
        super().__init__()
        self._finding_log = FindingLog()

    @property
    def findings(self) -> list[Finding]:
        """The findings this callback recorded during the current (or last) fit."""
        return self._finding_log.as_list()

    def record(
        self,
        trainer: pl.Trainer,
        verdict: Verdict,
        *,
        key: str = "",
        step: int | None = None,
        epoch: int | None = None,
    ) -> Finding:
        """Record ``verdict`` at the trainer's current step; a repeat of ``(code, key)`` only raises its count.

        The one way a callback records what it concluded: core rules return :class:`~lightning_diag.core.verdict.Verdict`
        objects, and a callback's own conclusions are built as one. ``step``/``epoch``: when the condition was seen,
        for a check made later than the step it judges (deferred to a logging step).
        """
        finding = Finding(
            code=verdict.code,
            severity=verdict.severity,
            message=verdict.message,
            step=int(trainer.global_step if step is None else step),
            epoch=int(trainer.current_epoch if epoch is None else epoch),
            evidence=dict(verdict.evidence),
            advice=list(verdict.advice),
            source=type(self).__name__,
        )
        return self._finding_log.record(finding, key=key)

    def decline(self, trainer: pl.Trainer, message: str, reason: str) -> Finding:
        """Say that this callback stays out of the way (of all or part of its work) for a setup it cannot handle:
        an info finding ``declined`` (evidence ``reason``) and, once per reason, a LightningDiagWarning.
        """
        seen = any(f.code == "declined" and f.evidence.get("reason") == reason for f in self.findings)
        if not seen and trainer.is_global_zero:
            warnings.warn(message, LightningDiagWarning, stacklevel=3)
        return self.record(trainer, Verdict("declined", "info", message, {"reason": reason}, []), key=reason)

    # -- state ----------------------------------------------------------------------------------------------
    def _findings_state(self) -> list[dict[str, Any]]:
        return self._finding_log.state_dict()

    def _load_findings_state(self, state: dict[str, Any]) -> None:
        if "findings" in state:
            self._finding_log.load_state_dict(state["findings"])

    # -- hooks ----------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            # A new fit starts clean; a resumed one gets its state back from load_state_dict (called later).
            self._finding_log.clear()
            self._reset_state()
            run_context(trainer).losses.clear()  # this fit's losses only (the gate's measure of consequences)

    def _reset_state(self) -> None:
        """Forget what the previous fit left behind (called at ``setup("fit")``, before any state is loaded)."""

    def report_series(self) -> dict[str, Any]:
        """Series this callback contributes to the end-of-run plots (``{}``: none)."""
        return {}

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish_run(trainer, "finished")

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        status = "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed"
        self._finish_run(trainer, status, error=f"{type(exception).__name__}: {exception}")

    def _finish_run(self, trainer: pl.Trainer, status: str, error: str | None = None) -> None:
        reporters = [cb for cb in _lightning.trainer_callbacks(trainer) if isinstance(cb, DiagCallback)]
        if not reporters or reporters[-1] is not self:
            return
        # A warning needs a consequence or a certainty: symptoms nothing followed from become info (every rank,
        # so every rank's findings agree).
        died = status == "failed" and error is not None
        gate(
            [vars(f) for cb in reporters for f in cb.findings],
            run_context(trainer).losses,
            died_at=int(trainer.global_step) if died else None,
            error=(error or "").split(":")[0],
        )
        if not trainer.is_global_zero:
            return
        report = run_report(trainer, status, error=error)
        directory = _logging.log_dir(trainer)
        series: dict[str, Any] = {}
        for callback in reporters:
            series.update(callback.report_series())
        figures = plots.build_figures(series, report["findings"])
        report["plots"] = plots.save_figures(figures, directory)
        report["html"] = html_report.HTML_FILENAME
        path = write_report(report, directory)
        try:
            html_path: str | None = html_report.write_html(report, series, directory)
        except (
            Exception
        ) as error:  # the page is a view of diagnosis.json: never let it break the end of a run
            html_path = None
            warnings.warn(
                f"lightning_diag could not write {html_report.HTML_FILENAME} ({type(error).__name__}: {error}); "
                f"{path} has the whole report.",
                LightningDiagWarning,
                stacklevel=2,
            )
        verbose = os.environ.get("LIGHTNING_DIAG_VERBOSE", "").lower() in ("1", "true", "yes")
        text = format_summary(report, path, verbose=verbose)
        _logging.console(trainer, text)
        _logging.log_text(
            trainer, "diag/diagnosis", format_summary(report, path, verbose=True), step=trainer.global_step
        )
        if html_path is not None:
            _logging.log_html(trainer, "diag/diagnosis_html", html_path, step=trainer.global_step)
        for name, figure in figures.items():
            _logging.log_figure(trainer, f"diag/{name}", figure, step=trainer.global_step)


def _last_epoch(trainer: Any) -> int:
    """The index of the last epoch that ran, as Lightning's progress bar shows it (``current_epoch`` already
    counts a finished epoch as done: after 18 epochs it is 18, the bar showed ``Epoch 17``).
    """
    started = _lightning.epochs_started(trainer)
    return int(trainer.current_epoch) if started is None else max(started - 1, 0)


def run_report(trainer: pl.Trainer, status: str, error: str | None = None) -> dict[str, Any]:
    """The ``diagnosis.json`` document of ``trainer``'s run so far (every lightning_diag callback's findings).

    What :meth:`DiagCallback._finish_run` writes at the end of a fit, and what HangWatchdog writes from its watchdog
    thread while the run is stuck (``status="hung"``): reads findings and counters only, no collective, no logger.
    """
    return build_report(
        collect_findings(trainer),
        status=status,
        global_step=trainer.global_step,
        epoch=_last_epoch(trainer),
        error=error,
    )


def collect_findings(trainer: pl.Trainer) -> list[Finding]:
    """All findings recorded by the lightning_diag callbacks of ``trainer``, in time order."""
    found: list[Finding] = []
    for callback in _lightning.trainer_callbacks(trainer):
        if isinstance(callback, DiagCallback):
            found.extend(callback.findings)
    return sort_findings(found)
