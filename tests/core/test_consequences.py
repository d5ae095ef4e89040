"""The severity policy without a Trainer: a symptom is a warning only with a measured consequence (issue 23)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from lightning_diag.core.consequences import POLICY, gate, kind
from lightning_diag.findings import CODES


def finding(code: str, severity: str, step: int, **evidence: Any) -> dict[str, Any]:
    return {"code": code, "severity": severity, "step": step, "last_step": step, "evidence": dict(evidence)}


STEADY = [(s, 2.0 * 0.98**s) for s in range(120)]  # a loss that keeps falling
WORSE = [(s, 1.0 if s < 50 else 3.0) for s in range(120)]  # worse after step 50, for good


def test_every_code_has_a_kind() -> None:
    assert set(CODES) - {"declined", "internal_error"} <= set(POLICY)
    assert {POLICY[c] for c in POLICY} == {"certain", "measured", "symptom"}


def test_a_symptom_with_a_healthy_loss_is_info_and_says_so() -> None:
    spike = finding("exploding_gradients", "warning", 50)
    assert gate([spike], STEADY) == [(0, "info")]
    assert spike["evidence"]["harm"].startswith("none measured")


def test_a_symptom_after_which_the_loss_got_worse_stays_a_warning() -> None:
    spike = finding("exploding_gradients", "warning", 50)
    assert gate([spike], WORSE) == []
    assert spike["severity"] == "warning" and "rose from a median of 1" in spike["evidence"]["harm"]


def test_a_symptom_that_explains_a_measured_finding_is_a_warning() -> None:
    spike = finding("exploding_gradients", "warning", 20)
    plateau = finding("loss_plateau", "warning", 90)
    assert gate([spike, plateau], STEADY) == []
    assert spike["evidence"]["harm"] == "led to loss_plateau at step 90"


def test_a_pending_symptom_becomes_a_warning_only_with_a_consequence() -> None:
    quiet = finding("input_scale", "info", 0, pending=1)
    gate([quiet], STEADY)
    assert quiet["severity"] == "info" and "pending" not in quiet["evidence"]
    died = finding("input_scale", "info", 0, pending=1)
    gate([died], STEADY[:10], died_at=5, error="LinAlgError")
    assert died["severity"] == "warning" and "LinAlgError" in died["evidence"]["harm"]


def test_a_run_that_ends_above_chance_or_learns_nothing_is_the_consequence() -> None:
    init = finding("loss_at_init", "info", 0, pending=1, expected=math.log(4))
    gate([init], [(s, 1.6) for s in range(60)])  # stalled, and above ln(4) = 1.386
    assert init["severity"] == "warning"


@pytest.mark.parametrize(
    ("evidence", "expected"),
    [({}, "symptom"), ({"certain": 1}, "certain"), ({"action": "raise"}, "certain")],
)
def test_facts_keep_their_severity(evidence: dict[str, Any], expected: str) -> None:
    f = finding("loss_spike", "warning", 50, **evidence)
    assert kind(f) == expected
    gate([f], STEADY)
    assert f["severity"] == ("info" if expected == "symptom" else "warning")


def test_exactly_zero_gradients_are_a_fact() -> None:
    assert kind(finding("vanishing_gradients", "warning", 10, smallest_norm=0)) == "certain"
    assert kind(finding("vanishing_gradients", "warning", 10, smallest_norm=1e-9)) == "symptom"


def test_a_possible_floor_is_a_warning_only_with_a_loud_cause() -> None:
    alone = finding("loss_plateau", "info", 90, floor_possible=1)
    gate([alone], STEADY)
    assert alone["severity"] == "info"
    floor = finding("loss_plateau", "info", 90, floor_possible=1)
    cause = finding("exploding_gradients", "warning", 20)
    gate([cause, floor], WORSE)
    assert floor["severity"] == "warning" and floor["evidence"]["cause"] == "exploding_gradients at step 20"


@pytest.mark.parametrize(
    ("after", "expected"),
    [(0.6, "info"), (0.95, "warning")],
    ids=["the-loss-fell-again", "still-on-the-plateau"],
)
def test_a_plateau_the_run_left_is_info(after: float, expected: str) -> None:
    # A plateau warned at step 100 of a run whose loss later fell well below its level (a cosine schedule that
    # went on learning) harmed nothing lasting; one the run never left stays a warning.
    losses = [(s, 1.0 if s <= 120 else after) for s in range(200)]
    plateau = {
        "code": "underfitting",
        "severity": "warning",
        "step": 80,
        "last_step": 100,
        "evidence": {"train_loss": 1.0},
    }
    cause = {
        "code": "vanishing_gradients",
        "severity": "warning",
        "step": 50,
        "last_step": 50,
        "evidence": {},
    }
    gate([cause, plateau], losses)
    assert plateau["severity"] == expected
    assert plateau["evidence"].get("harm", "").startswith("none lasting") is (expected == "info")
    # the plateau was the symptom's only consequence: a plateau that ended leaves the symptom without one
    assert cause["severity"] == ("info" if expected == "info" else "warning")
