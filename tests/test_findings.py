from __future__ import annotations

import json
import math

import pytest

from lightning_diag.findings import (
    CODES,
    Finding,
    FindingLog,
    build_report,
    format_summary,
    write_report,
)


def make(code="loss_spike", step=3, severity="warning", **kw) -> Finding:
    return Finding(
        code=code, severity=severity, message=f"{code} at {step}", step=step, epoch=0, source="T", **kw
    )


#: The stable codes of DESIGN.md section 3: codes are added (here too), never renamed or removed.
DESIGN_CODES = {
    "non_finite_loss",
    "non_finite_gradients",
    "non_finite_parameters",
    "non_finite_input",
    "exploding_gradients",
    "vanishing_gradients",
    "loss_spike",
    "amp_overflow",
    "overfitting",
    "underfitting",
    "loss_plateau",
    "divergence",
    "missing_gradients",
    "batch_dependence",
    "loss_at_init",
    "cannot_overfit_batch",
    "dataloader_bound",
    "early_stopped",
    "dataloader_config",
    "host_sync",
    "input_scale",
    "label_distribution",
    # silent bugs (SilentBugDetector)
    "optimizer_no_op",
    "stale_gradients",
    "wrong_mode",
    "replica_divergence",
    "repeated_data",
    "grad_noise_scale",
    "internal_error",
    "non_finite_metric",
    "missing_metric",
    "declined",
    # hangs and slow ranks (HangWatchdog)
    "training_hang",
    "uneven_batches",
    "straggler",
    "step_time_outlier",
    # memory (MemoryMonitor)
    "memory_growth",
    "memory_pressure",
    "memory_fragmentation",
    "out_of_memory",
    # activation health (ActivationMonitor, SanityCheck)
    "dead_units",
    "saturated_activations",
    "activation_scale",
}


def test_codes_table_is_the_design_contract() -> None:
    assert set(CODES) == DESIGN_CODES
    assert all(isinstance(text, str) and text for text in CODES.values())


def test_finding_validates_code_and_severity() -> None:
    with pytest.raises(ValueError, match=r"`code` must be one of the codes.*got 'nope'"):
        make(code="nope")
    with pytest.raises(ValueError, match=r"`severity` must be one of .*got 'fatal'"):
        make(severity="fatal")


def test_evidence_becomes_plain_and_json_safe() -> None:
    import torch

    f = make(evidence={"norm": torch.tensor(2.5), "flag": True, "bad": math.inf, "layer": "net.0"})
    assert f.evidence == {"norm": 2.5, "flag": 1, "bad": math.inf, "layer": "net.0"}
    data = json.loads(json.dumps(f.to_dict()))
    assert data["evidence"]["bad"] == "inf" and data["first_step"] == 3 and data["last_step"] == 3


def test_repeats_fold_into_one_finding_with_count_and_span() -> None:
    log = FindingLog()
    for step in (3, 7, 12):
        log.record(make(step=step))
    log.record(make(step=5), key="other-layer")
    kept = log.as_list()
    assert len(kept) == 2
    assert (kept[0].count, kept[0].step, kept[0].last_step, kept[0].message) == (3, 3, 12, "loss_spike at 3")
    assert kept[1].count == 1


def test_finding_log_state_round_trip() -> None:
    log = FindingLog()
    log.record(make(step=1), key="a")
    log.record(make(step=2), key="a")
    restored = FindingLog()
    restored.load_state_dict(json.loads(json.dumps(log.state_dict())))
    restored.record(make(step=9), key="a")
    assert len(restored) == 1 and restored.as_list()[0].count == 3 and restored.as_list()[0].last_step == 9


def test_report_and_summary(tmp_path) -> None:
    findings = [
        make(step=9, severity="info", code="early_stopped"),
        make(step=2, severity="error", code="non_finite_loss"),
    ]
    report = build_report(findings, status="finished", global_step=10, epoch=1)
    assert report["version"] == 2
    assert [f["id"] for f in report["findings"]] == ["non_finite_loss@2", "early_stopped@9"]
    assert report["primary"] == "non_finite_loss@2"
    assert report["findings"][1]["caused_by"] == "non_finite_loss@2"  # the stop follows from the NaN loss
    assert [f["code"] for f in report["findings"]] == ["non_finite_loss", "early_stopped"]  # time order
    assert report["summary"]["counts"] == {"info": 1, "warning": 0, "error": 1}
    assert report["summary"]["healthy"] is False
    path = write_report(report, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "diagnosis.json").read_text()) == report
    text = format_summary(report, path)
    assert "1 error(s), 0 warning(s), 1 info" in text and "[ERROR  ] non_finite_loss" in text and path in text
    assert "\x1b[" not in text  # plain text, readable in a log file


def test_healthy_report_says_so() -> None:
    report = build_report([], status="finished", global_step=5, epoch=0)
    assert report["summary"]["healthy"] is True
    assert "No findings" in format_summary(report)
    failed = build_report([], status="failed", global_step=5, epoch=0, error="ValueError: x")
    assert failed["summary"]["healthy"] is False and "stopped by: ValueError: x" in format_summary(failed)
