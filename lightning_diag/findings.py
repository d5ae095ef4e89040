"""Findings: what a diagnostic callback concludes, and the end-of-run report built from them.

A :class:`Finding` is a structured conclusion (code, severity, evidence, advice). Callbacks record them through
:class:`FindingLog`, which folds a repeated condition into one finding with a count and first/last step.
At the end of ``fit`` (or when it dies of an exception) global rank 0 writes ``diagnosis.json`` and prints
one summary (see :func:`build_report` and :func:`format_summary`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lightning_diag.core.verdict import SEVERITIES, Severity

__all__ = [
    "CODES",
    "REPORT_FILENAME",
    "REPORT_VERSION",
    "Evidence",
    "Finding",
    "FindingLog",
    "Report",
    "Severity",
    "build_report",
    "format_summary",
    "load_report",
    "write_report",
]


def __getattr__(name: str) -> Any:
    # The old import path of LightningDiagWarning (now in lightning_diag.errors, which imports Lightning: this
    # module stays importable without it, for the `lightning-diag` command's start-up).
    if name == "LightningDiagWarning":
        from lightning_diag.errors import LightningDiagWarning

        return LightningDiagWarning
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


Evidence = dict[str, float | int | str]
REPORT_FILENAME = "diagnosis.json"
REPORT_VERSION = 2

#: The stable finding codes (DESIGN.md section 3). New codes are added here; none is ever renamed.
CODES: dict[str, str] = {
    "non_finite_loss": "loss is NaN/Inf",
    "non_finite_gradients": "a gradient is NaN/Inf (outside normal AMP overflow handling)",
    "non_finite_parameters": "a parameter became NaN/Inf",
    "non_finite_input": "a batch tensor contains NaN/Inf",
    "exploding_gradients": "gradient norm too large or spiking",
    "vanishing_gradients": "gradient norm of some layers ~0 (relative or absolute)",
    "loss_spike": "loss far above its recent statistics",
    "amp_overflow": "GradScaler keeps overflowing / scale collapsed",
    "overfitting": "validation gets worse while training improves / gap widening",
    "underfitting": "both losses high and close, not improving enough",
    "loss_plateau": "training loss stopped decreasing",
    "divergence": "training loss rising / exploding",
    "missing_gradients": "trainable parameters that receive no gradient",
    "batch_dependence": "outputs of one sample depend on other samples of the batch",
    "loss_at_init": "initial loss far from what the task implies",
    "cannot_overfit_batch": "the model cannot fit a single batch",
    "dataloader_bound": "the step spends a large share of time waiting for data",
    "early_stopped": "training was stopped early (with reason and best score)",
    "host_sync": "the training step makes the host wait for the device (synchronising calls)",
    "dataloader_config": "a DataLoader setting that slows training on this device (e.g. pin_memory off on CUDA)",
    "input_scale": "float inputs far from unit scale (unnormalised)",
    "label_distribution": "integer labels of a batch that are all one class or heavily imbalanced",
    "optimizer_no_op": "an optimizer step changed no parameter, or trainable parameters get gradients no optimizer holds",
    "stale_gradients": "gradients are not zeroed between optimizer steps: each step re-applies the previous ones",
    "wrong_mode": "dropout/BatchNorm in eval mode while training, or in train mode (stats updated) during validation",
    "replica_divergence": "parameters or buffers differ across data-parallel ranks that should hold the same replica",
    "repeated_data": "the same batch at consecutive steps, or the same batch on every rank (no distributed sampler)",
    "grad_noise_scale": "the batch size is far from the gradient noise scale (McCandlish et al. 2018)",
    "internal_error": "a lightning_diag hook failed; that callback disabled itself and the run went on",
    "non_finite_metric": "a monitored or validation metric is NaN/Inf",
    "missing_metric": "a monitored metric was never logged (strict=False)",
    "declined": "a callback could not do (part of) its work with this setup and stayed out of the way",
    "training_hang": "a training phase made no progress for longer than its budget (stacks dumped, rank behind named)",
    "uneven_batches": "ranks have different numbers of training batches per epoch (DDP would hang at the end)",
    "straggler": "one rank is consistently slower before the gradient all-reduce; the others wait for it",
    "step_time_outlier": "steps far above the median step time, with what coincided (GC, data, validation, saves)",
    "memory_growth": "the memory that survives a training step keeps growing (per step, per epoch, at validation)",
    "memory_pressure": "a step's memory peak is close to the capacity of the device (or of the host)",
    "memory_fragmentation": "the CUDA caching allocator retries allocations, or reserves far more than it allocates",
    "out_of_memory": "fit died of an out-of-memory error: the phase, the batch and the memory at that point",
    "dead_units": "a large share of a layer's units never fire (dead ReLU) or are dormant (GELU/SiLU)",
    "saturated_activations": "most of a layer's tanh/sigmoid pre-activations sit in the saturated range",
    "activation_scale": "activations shrink or grow geometrically with depth at initialisation",
}


def _plain(value: Any) -> float | int | str:
    """Evidence values as JSON-safe plain types (tensors and numpy scalars become numbers)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value
    if hasattr(value, "item"):
        return _plain(value.item())
    return str(value)


@dataclasses.dataclass
class Finding:
    """One diagnosis: what was seen, how bad it is, the numbers behind it and what to try.

    Args:
        code: a stable code from :data:`CODES`.
        severity: ``"info"``, ``"warning"`` or ``"error"``.
        message: one readable sentence with the numbers that matter.
        step: the global step at which the condition was first seen.
        epoch: the epoch at which the condition was first seen.
        evidence: the numbers and names that triggered it (plain types only).
        advice: likely causes and actions, most likely first.
        source: the class name of the callback that recorded it.
        count: how many times the condition was seen (repeats are folded into one finding).
        last_step: the global step of the latest occurrence.
    """

    code: str
    severity: Severity
    message: str
    step: int
    epoch: int
    evidence: Evidence = dataclasses.field(default_factory=dict)
    advice: list[str] = dataclasses.field(default_factory=list)
    source: str = ""
    count: int = 1
    last_step: int | None = None

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(
                f"`code` must be one of the codes in lightning_diag.findings.CODES, got {self.code!r}."
            )
        if self.severity not in SEVERITIES:
            raise ValueError(f"`severity` must be one of {SEVERITIES}, got {self.severity!r}.")
        self.evidence = {str(k): _plain(v) for k, v in self.evidence.items()}
        self.advice = [str(a) for a in self.advice]
        if self.last_step is None:
            self.last_step = self.step

    @property
    def first_step(self) -> int:
        """The global step of the first occurrence (same as :attr:`step`)."""
        return self.step

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (what ``diagnosis.json`` holds for this finding)."""
        data = dataclasses.asdict(self)
        data["first_step"] = self.step
        data["evidence"] = {
            k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in self.evidence.items()
        }
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class FindingLog:
    """The findings of one callback, with repeats of the same condition folded together.

    A condition is identified by ``(code, key)``; ``key`` defaults to the code alone, so a callback that can
    report the same code for different subjects (two layers, two metrics) passes the subject as ``key``.
    A repeat keeps the first message and evidence and raises ``count`` and ``last_step``; a repeat of a higher
    severity replaces the severity, message, evidence and advice (the condition got worse).
    """

    def __init__(self) -> None:
        self._items: dict[tuple[str, str], Finding] = {}

    def record(self, finding: Finding, key: str = "") -> Finding:
        """Add ``finding`` or fold it into the existing finding for the same condition; return the kept one."""
        ident = (finding.code, key)
        kept = self._items.get(ident)
        if kept is None:
            self._items[ident] = finding
            return finding
        kept.count += finding.count
        kept.last_step = max(kept.last_step or kept.step, finding.last_step or finding.step)
        if SEVERITIES.index(finding.severity) > SEVERITIES.index(kept.severity):
            # a repeat that is worse (the run was stopped for it this time) speaks for the condition
            kept.severity, kept.message = finding.severity, finding.message
            kept.evidence, kept.advice = finding.evidence, finding.advice
        return kept

    def __iter__(self) -> Any:
        return iter(self.as_list())

    def __len__(self) -> int:
        return len(self._items)

    def as_list(self) -> list[Finding]:
        """The findings in the order they were first recorded."""
        return list(self._items.values())

    def clear(self) -> None:
        self._items.clear()

    def state_dict(self) -> list[dict[str, Any]]:
        """Plain-types state (``weights_only``-safe) so findings survive a resume."""
        return [{"key": key, **finding.to_dict()} for (_, key), finding in self._items.items()]

    def load_state_dict(self, state: Iterable[Mapping[str, Any]]) -> None:
        self._items = {}
        for entry in state:
            finding = Finding.from_dict(entry)
            self._items[(finding.code, str(entry.get("key", "")))] = finding


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    """Time order (first step), errors before warnings before infos at the same step."""
    rank = {s: i for i, s in enumerate(reversed(SEVERITIES))}
    return sorted(findings, key=lambda f: (f.step, rank[f.severity]))


def build_report(
    findings: Sequence[Finding], *, status: str, global_step: int, epoch: int, error: str | None = None
) -> dict[str, Any]:
    """The ``diagnosis.json`` document (version 2).

    ``{"version": 2, "primary": id | None, "findings": [...], "summary": {...}}``: each finding carries an ``id``
    (``"<code>@<step>"``) and ``caused_by`` (the id of the finding that explains it, or ``None``); ``primary`` is
    the id of the one finding that names the run's problem (``None`` without warning/error findings). The
    links, the choice of the primary finding and the advice that would contradict the evidence (never "raise the
    learning rate" once the norm exploded) come from the rule table of :mod:`lightning_diag.core.diagnosis`.
    """
    from lightning_diag.core.diagnosis import diagnose, finding_ids

    ordered = sort_findings(findings)
    by_severity = {s: sum(1 for f in ordered if f.severity == s) for s in SEVERITIES}
    if status == "failed" and error is not None and by_severity["error"] == 0:
        by_severity["error"] = 1  # the exception that stopped the run is an error, even without a finding
    summary: dict[str, Any] = {
        "status": status,
        "global_step": int(global_step),
        "epoch": int(epoch),
        "healthy": by_severity["warning"] == 0 and by_severity["error"] == 0 and status == "finished",
        "counts": by_severity,
        "codes": sorted({f.code for f in ordered}),
    }
    disabled = [f"{f.source} ({f.evidence.get('hook', '?')})" for f in ordered if f.code == "internal_error"]
    if disabled:
        summary["disabled"] = disabled
    if error is not None:
        summary["error"] = error
    entries = [f.to_dict() for f in ordered]
    ids = finding_ids(entries)
    diagnosis = diagnose(entries, ids)
    for fid, entry in zip(ids, entries, strict=True):
        entry["id"] = fid
        entry["caused_by"] = diagnosis.caused_by.get(fid)
        if fid in diagnosis.advice:
            entry["advice"] = diagnosis.advice[fid]
    return {"version": REPORT_VERSION, "primary": diagnosis.primary, "findings": entries, "summary": summary}


def display_order(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The report's findings in reading order: the ``primary`` finding first when the report names one, then by
    severity (errors, warnings, infos), each in time order.
    """
    findings = list(report.get("findings", []))
    rank: dict[str, int] = {s: i for i, s in enumerate(reversed(SEVERITIES))}
    ordered = sorted(
        findings, key=lambda f: (rank.get(str(f.get("severity")), len(rank)), int(f.get("step", 0)))
    )
    primary = report.get("primary")
    if primary is not None:
        first = [f for f in ordered if f.get("id") == primary]
        ordered = first + [f for f in ordered if f.get("id") != primary]
    return ordered


def caused_by(report: Mapping[str, Any], finding: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The findings ``finding`` is linked to as its causes (``caused_by`` ids of a version-2 report)."""
    linked = finding.get("caused_by")
    ids = (
        [linked] if isinstance(linked, str) else [str(i) for i in linked or []]
    )  # one id (version 2) or a list
    by_id = {str(f.get("id")): f for f in report.get("findings", []) if f.get("id") is not None}
    return [by_id[i] for i in ids if i in by_id]


def where_seen(finding: Mapping[str, Any]) -> str:
    """``epoch 3, step 120-180, 4x``: where a finding was seen, epochs counted as Lightning's progress bar does."""
    seen = f"epoch {finding.get('epoch', 0)}, step {finding.get('step', 0)}"
    if int(finding.get("count", 1)) > 1:
        seen += f"-{finding.get('last_step')}, {finding['count']}x"
    return seen


def format_summary(report: Mapping[str, Any], path: str | None = None, *, verbose: bool = False) -> str:
    """A plain-text summary of a report (fits a log file; no colour codes): one line per finding.

    The primary finding (when the report names one) comes first, then the others by severity; ``verbose`` adds
    each finding's advice under it.
    """
    summary = report["summary"]
    counts = summary["counts"]
    lines = [
        f"lightning_diag: run {summary['status']} at step {summary['global_step']} (epoch {summary['epoch']}): "
        f"{counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info."
    ]
    if "error" in summary:
        lines.append(f"  stopped by: {summary['error']}")
    if summary.get("disabled"):
        lines.append(
            "  Disabled after an internal error (the run went on without them): "
            + ", ".join(summary["disabled"])
        )
    findings = display_order(report)
    if not findings:
        if summary["status"] == "finished":
            lines.append("  No findings: nothing looked wrong.")
        else:
            lines.append(f"  No findings before the run {summary['status']}.")
    primary = report.get("primary")
    advice_count = 0
    for f in findings:
        mark = "=>" if primary is not None and f.get("id") == primary else "  "
        line = (
            f"{mark}[{f['severity'].upper():7}] {f['code']} ({where_seen(f)}, {f['source']}): {f['message']}"
        )
        causes = caused_by(report, f)
        if causes:
            line += " (caused by " + ", ".join(f"{c['code']} [{c['id']}]" for c in causes) + ")"
        lines.append(line)
        advice = f.get("advice", [])
        advice_count += len(advice)
        if verbose:
            lines.extend(f"            - {a}" for a in advice)
    if advice_count and not verbose:
        lines.append(
            f"  Advice: `lightning-diag report {path or '<run dir>'} --verbose`, or the HTML report."
        )
    if report.get("plots"):
        lines.append(f"  Plots: {', '.join(report['plots'])} (next to the report)")
    if path:
        lines.append(f"  Full report: {path}")
        if report.get("html"):
            lines.append(f"  Open in a browser: {os.path.join(os.path.dirname(path), report['html'])}")
    return "\n".join(lines)


#: The path of the last ``diagnosis.json`` this process wrote (:func:`load_report` with no argument reads it).
_LAST_WRITTEN: list[str] = []


def write_report(report: Mapping[str, Any], directory: str | os.PathLike[str]) -> str:
    """Write ``diagnosis.json`` into ``directory`` (created if needed); return its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(os.fspath(directory), REPORT_FILENAME)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, sort_keys=False)
        handle.write("\n")
    os.replace(tmp, path)
    _LAST_WRITTEN[:] = [os.path.abspath(path)]
    return path


@dataclasses.dataclass
class Report:
    """A run's ``diagnosis.json`` read back: its findings as :class:`Finding` objects, the primary one first.

    Attributes:
        path: the file it was read from.
        status: how the run ended (``finished``, ``failed``, ``interrupted``, ``hung``).
        primary: the finding that names the run's problem (``None`` for a healthy run).
        findings: every finding in time order.
        summary: the report's summary block (counts, codes, the error that stopped the run).
        document: the whole JSON document (``caused_by`` links, ids).
    """

    path: str
    status: str
    primary: Finding | None
    findings: list[Finding]
    summary: dict[str, Any]
    document: dict[str, Any]

    @property
    def healthy(self) -> bool:
        """No warning or error finding, and the run finished."""
        return bool(self.summary.get("healthy", False))

    def loud(self) -> list[Finding]:
        """The warning and error findings."""
        return [f for f in self.findings if f.severity in ("warning", "error")]


def load_report(path: str | os.PathLike[str] | None = None) -> Report:
    """A run's report as :class:`Finding` objects, from ``diagnosis.json`` or a directory below which one was
    written (the newest), or, with no argument, the last report this process wrote.

    The way to a run's findings when the callback objects you hold are not the ones that ran: libraries that
    deep-copy the callbacks they are given (or build the Trainer themselves) leave yours empty.

    Example:
        >>> import tempfile
        >>> run_dir = tempfile.mkdtemp()
        >>> findings = [Finding("loss_spike", "warning", "a spike", step=3, epoch=0, source="NaNGuard")]
        >>> _ = write_report(build_report(findings, status="finished", global_step=9, epoch=1), run_dir)
        >>> report = load_report()  # the last report written here, or load_report(run_dir)
        >>> report.primary.code, report.status, [f.step for f in report.findings]
        ('loss_spike', 'finished', [3])
    """
    if path is None:
        if not _LAST_WRITTEN:
            raise FileNotFoundError("No diagnosis.json was written by this process yet: pass its path.")
        file = _LAST_WRITTEN[0]
    else:
        file = os.fspath(path)
        if os.path.isdir(file):
            found = [
                os.path.join(root, REPORT_FILENAME)
                for root, _, files in os.walk(file)
                if REPORT_FILENAME in files
            ]
            if not found:
                raise FileNotFoundError(f"No {REPORT_FILENAME} below {file}.")
            file = max(found, key=os.path.getmtime)
    with open(file, encoding="utf-8") as handle:
        document = json.load(handle)
    findings = [Finding.from_dict(entry) for entry in document.get("findings", [])]
    ids = [entry.get("id") for entry in document.get("findings", [])]
    primary_id = document.get("primary")
    primary = next((f for f, fid in zip(findings, ids, strict=True) if fid == primary_id), None)
    summary = dict(document.get("summary", {}))
    return Report(file, str(summary.get("status", "")), primary, findings, summary, document)
