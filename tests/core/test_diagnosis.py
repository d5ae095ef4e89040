"""The diagnosis rule table: one primary finding, causes linked, advice consistent with the evidence (no Trainer)."""

from __future__ import annotations

from typing import Any

import pytest

from lightning_diag.core import diagnosis
from lightning_diag.core.diagnosis import RULES, consistent_advice, diagnose, finding_ids
from lightning_diag.findings import CODES, Finding, build_report


def f(
    code: str, step: int, severity: str = "warning", advice: list[str] | None = None, **evidence: Any
) -> dict:
    return Finding(code, severity, f"{code} seen", step, 0, evidence=evidence, advice=advice or []).to_dict()  # type: ignore[arg-type]


def test_ids_are_code_at_step_and_unique() -> None:
    found = [f("vanishing_gradients", 3), f("vanishing_gradients", 3), f("loss_plateau", 9)]
    assert finding_ids(found) == ["vanishing_gradients@3", "vanishing_gradients@3#2", "loss_plateau@9"]


def test_every_rule_names_known_codes() -> None:
    for rule in RULES:
        assert rule.order in ("after", "near", "any") and rule.why
        assert set(rule.cause) <= set(CODES) and set(rule.effect) <= set(CODES), rule.name
    assert set(diagnosis.PRIORITY) <= set(CODES)


def test_exploding_norm_before_collapse_is_lr_too_high() -> None:
    found = [
        f("exploding_gradients", 2, ratio=40.0),
        f("vanishing_gradients", 6, smallest_norm=0.0),
        f("underfitting", 120, advice=["Train longer or with a higher learning rate; check the schedule."]),
    ]
    result = diagnose(found)
    assert result.primary == "exploding_gradients@2"
    assert result.caused_by["vanishing_gradients@6"] == "exploding_gradients@2"
    assert result.rules["vanishing_gradients@6"] == "lr_too_high"
    # the plateau is explained too (directly by the explosion: the first matching rule wins)
    assert result.caused_by["underfitting@120"] in ("exploding_gradients@2", "vanishing_gradients@6")
    assert not any("higher learning rate" in a for a in result.advice["underfitting@120"])


def test_a_loss_spike_next_to_a_norm_spike_is_the_same_event() -> None:
    result = diagnose([f("loss_spike", 23), f("exploding_gradients", 24), f("divergence", 24, "error")])
    assert result.caused_by["loss_spike@23"] == "exploding_gradients@24"
    assert result.primary == "exploding_gradients@24"
    assert "loss_spike@90" not in diagnose([f("exploding_gradients", 24), f("loss_spike", 90)]).caused_by


def test_collapse_before_the_explosion_is_not_caused_by_it() -> None:
    result = diagnose([f("vanishing_gradients", 1), f("exploding_gradients", 50)])
    assert "vanishing_gradients@1" not in result.caused_by


def test_non_finite_loss_after_fp16_overflow_is_the_overflow() -> None:
    found = [
        f("amp_overflow", 10),
        f("non_finite_loss", 12, severity="error"),
        f("non_finite_parameters", 13),
    ]
    result = diagnose(found)
    assert result.primary == "amp_overflow@10"
    assert result.caused_by["non_finite_loss@12"] == "amp_overflow@10"
    # the parameters follow from the loss (the first rule that explains them is the overflow one)
    assert result.caused_by["non_finite_parameters@13"] == "amp_overflow@10"


def test_early_stop_after_overfitting_is_the_overfitting() -> None:
    found = [f("overfitting", 40), f("early_stopped", 55, severity="warning")]
    result = diagnose(found)
    assert result.primary == "overfitting@40"
    assert result.caused_by == {"early_stopped@55": "overfitting@40"}


def test_nan_input_explains_the_nan_loss_and_gradients() -> None:
    found = [f("non_finite_input", 5), f("non_finite_loss", 5, "error"), f("non_finite_gradients", 5)]
    result = diagnose(found)
    assert result.primary == "non_finite_input@5"
    assert set(result.caused_by.values()) == {"non_finite_input@5"}


def test_primary_explains_the_most_then_priority_then_time() -> None:
    # two unrelated problems: a slow loader (one finding) and a NaN chain (three findings)
    found = [
        f("dataloader_bound", 1),
        f("non_finite_loss", 8),
        f("non_finite_gradients", 8),
        f("early_stopped", 9),
    ]
    assert diagnose(found).primary == "non_finite_loss@8"
    # equal weight: correctness before speed, whatever comes first
    assert diagnose([f("dataloader_bound", 1), f("missing_gradients", 4)]).primary == "missing_gradients@4"


def test_info_only_runs_have_no_primary() -> None:
    found = [f("early_stopped", 9, "info"), f("overfitting", 5, "info")]
    result = diagnose(found)
    assert result.primary is None
    assert result.caused_by == {"early_stopped@9": "overfitting@5"}  # links are made whatever the severity


def test_a_loud_finding_explained_by_an_info_one_is_still_primary() -> None:
    found = [f("overfitting", 5, "info"), f("early_stopped", 9, "warning")]
    result = diagnose(found)
    assert result.caused_by == {"early_stopped@9": "overfitting@5"}
    assert result.primary == "early_stopped@9"


def test_links_never_form_a_cycle() -> None:
    # loss_plateau and underfitting both explain early_stopped; vanishing explains both: no finding is its own cause
    found = [f("vanishing_gradients", 3), f("loss_plateau", 9), f("underfitting", 9), f("early_stopped", 12)]
    result = diagnose(found)
    for start in result.caused_by:
        seen, node = set(), start
        while node in result.caused_by:
            assert node not in seen
            seen.add(node)
            node = result.caused_by[node]
    assert result.primary == "vanishing_gradients@3"


@pytest.mark.parametrize(
    "evidence",
    [
        f("exploding_gradients", 0),
        f("loss_spike", 3),
        f("divergence", 30, "error"),
        f("non_finite_loss", 7, "error"),
        f("amp_overflow", 2),
        f("vanishing_gradients", 4, smallest_norm=0.0),  # gradients exactly 0: dead, not slow
    ],
    ids=lambda d: d["code"],
)
def test_advice_never_says_raise_the_lr_against_the_evidence(evidence: dict) -> None:
    raising = [
        "Train longer or with a higher learning rate; check the schedule did not decay the rate too early.",
        "The loss keeps falling slowly at every evaluation: the learning rate is probably too low; raise it 3-10x.",
        "Try a higher learning rate, or a schedule with warm restarts (WarmupCosine(num_cycles=...)).",
        "Increase the learning rate.",
    ]
    kept = "Increase capacity (width, depth) or use a better-suited architecture or features."
    found = [evidence, f("loss_plateau", 90, advice=[*raising, kept])]
    fixed = consistent_advice(found)["loss_plateau@90"]
    assert kept in fixed
    assert not any(line in fixed for line in raising)
    assert any("Do not raise the learning rate" in line and evidence["code"] in line for line in fixed)
    assert len(fixed) == 2  # the repeated pointer is folded into one line


def test_advice_is_untouched_without_evidence_of_a_high_lr() -> None:
    small = f("vanishing_gradients", 4, smallest_norm=1e-9)  # small, not zero: raising the lr may be right
    plateau = f("loss_plateau", 90, advice=["Try a higher learning rate."])
    assert consistent_advice([small, plateau]) == {}
    # an info-only spike is not evidence enough
    assert consistent_advice([f("loss_spike", 3, "info"), plateau]) == {}


def test_build_report_carries_the_diagnosis() -> None:
    findings = [
        Finding("exploding_gradients", "warning", "norm 4e5", 0, 0),
        Finding("vanishing_gradients", "warning", "norm 0", 4, 0, evidence={"smallest_norm": 0.0}),
        Finding(
            "underfitting", "warning", "flat", 90, 2, advice=["Train longer or with a higher learning rate."]
        ),
        Finding("early_stopped", "info", "stopped", 95, 2),
    ]
    report = build_report(findings, status="finished", global_step=95, epoch=2)
    assert report["version"] == 2
    assert report["primary"] == "exploding_gradients@0"
    entries = {e["id"]: e for e in report["findings"]}
    assert entries["exploding_gradients@0"]["caused_by"] is None
    assert entries["vanishing_gradients@4"]["caused_by"] == "exploding_gradients@0"
    assert entries["early_stopped@95"]["caused_by"] is not None
    assert all("higher learning rate" not in a for a in entries["underfitting@90"]["advice"])
    # findings read back from the report ignore the new keys
    assert Finding.from_dict(entries["underfitting@90"]).code == "underfitting"
    assert build_report([], status="finished", global_step=0, epoch=0)["primary"] is None
