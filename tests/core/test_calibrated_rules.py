"""The rules calibrated on the diagnosis corpus, Trainer-free: each one fires on the failure it models and stays
quiet on the healthy run that looks like it."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from lightning_diag.core.curves import CurvePoint, diagnose
from lightning_diag.core.grad_rules import vanishing_layers
from lightning_diag.core.grad_stats import leaf_module
from lightning_diag.core.sanity import LossCall, check_labels, check_probabilities_as_logits


def _probs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(32, 10, generator=g)
    return torch.softmax(logits, dim=1), torch.randint(0, 10, (32,), generator=g)


def test_softmax_before_cross_entropy_is_flagged_and_nll_of_log_probs_is_not() -> None:
    p, y = _probs()
    found = check_probabilities_as_logits(p, y, float(F.cross_entropy(p, y)))
    assert [v.code for v in found] == ["loss_at_init"] and found[0].evidence["floor"] < 1.47
    assert (
        check_probabilities_as_logits(p, y, float(F.nll_loss(p.log(), y))) == []
    )  # the right use of probabilities
    logits = torch.randn(32, 10)
    assert check_probabilities_as_logits(logits, y, float(F.cross_entropy(logits, y))) == []
    uniform = torch.full((32, 10), 0.1)  # both readings equal ln(10): nothing to tell them apart
    assert check_probabilities_as_logits(uniform, y, float(F.cross_entropy(uniform, y))) == []


def test_label_checks_need_enough_labels() -> None:
    def call(target: torch.Tensor) -> LossCall:
        logits = torch.randn(len(target), 3)
        return LossCall("cross_entropy", logits, target, F.cross_entropy(logits, target))

    assert (
        check_labels(call(torch.zeros(8, dtype=torch.long))) == []
    )  # 8 labels all one class: chance, 1 in 128
    found = check_labels(call(torch.zeros(32, dtype=torch.long)))
    assert [v.code for v in found] == ["label_distribution"] and found[0].severity == "info"
    assert found[0].evidence["pending"] == 1  # a warning at the end of fit only if a consequence followed


def test_vanishing_is_early_layers_against_late_layers_not_all_small_together() -> None:
    names = [f"net.{i}" for i in range(14)]
    deep_sigmoid = [1e-12 * 4**i for i in range(14)]
    flagged, late = vanishing_layers(names, deep_sigmoid, 1e-4, 1e-8)
    assert flagged and all(int(n.split(".")[1]) < 7 for n, _ in flagged) and late == deep_sigmoid[-1]
    converged = [3e-4, 5e-4, 4e-4, 6e-4]  # a converged MLP: everything small, in proportion
    assert vanishing_layers(names[:4], converged, 1e-4, 1e-8)[0] == []
    assert vanishing_layers(names[:4], [1e-12] * 4, 1e-4, 1e-8)[0] == []  # all ~0 together is not judged here
    assert leaf_module("net.3.weight") == "net.3"


def _curve(train: list[float], val: list[float | None]) -> list[CurvePoint]:
    return [CurvePoint(float(i + 1), t, v) for i, (t, v) in enumerate(zip(train, val, strict=True))]


def test_divergence_against_the_first_step() -> None:
    points = _curve([24.3, 18.7, 21.2], [24.0, 18.4, 20.0])  # an LSTM at lr=20: high but not rising
    assert diagnose(points) == []
    found = diagnose(points, initial=4.09)
    assert [v.code for v in found] == ["divergence"] and found[0].evidence["ratio"] > 5
    assert diagnose(_curve([1.2, 0.8, 0.6], [1.1, 0.8, 0.7]), initial=2.3) == []


def test_a_validation_loss_that_never_moved_is_a_plateau() -> None:
    dropout_097 = _curve([3.17, 2.97, 2.79, 2.78, 2.75], [2.302, 2.301, 2.302, 2.303, 2.302])
    found = diagnose(dropout_097, initial=2.31)  # validation never left ln(10), the loss of the first steps
    assert [(v.code, v.severity) for v in found] == [("loss_plateau", "warning")]
    # a validation loss flat far below where training started (label noise: the floor reached in epoch 0)
    floor = _curve([1.9, 1.62, 1.55, 1.52, 1.5], [1.41, 1.40, 1.41, 1.40, 1.41])
    (found,) = diagnose(floor, initial=2.31)
    assert (found.code, found.severity, found.evidence["floor_possible"]) == ("loss_plateau", "info", 1)
    converged = _curve([0.30, 0.02, 0.01, 0.01, 0.01], [0.011, 0.011, 0.0109, 0.011, 0.011])
    assert diagnose(converged) == []  # flat, but low: nothing left to learn


def test_a_stop_while_the_gap_widens_is_overfitting() -> None:
    points = _curve([2.0, 1.2, 0.9, 0.6, 0.4, 0.3], [2.0, 1.6, 1.5, 1.56, 1.58, 1.59])
    assert [(v.code, v.severity) for v in diagnose(points)] == [("overfitting", "info")]
    assert [(v.code, v.severity) for v in diagnose(points, stopped=True)] == [("overfitting", "warning")]


def test_validation_and_training_moving_together_is_not_overfitting() -> None:
    # strong L2: both curves sit at ln(4) and wander by noise; validation ends 4% above its best
    points = _curve([1.394, 1.390, 1.388, 1.386], [1.329, 1.35, 1.37, 1.387])
    assert all(v.code != "overfitting" or v.severity == "info" for v in diagnose(points))
    # a tiny data set that stops 3.6% above its best validation loss: ordinary early stopping
    tiny = _curve(
        [0.645, 0.557, 0.474, 0.408, 0.353, 0.318, 0.299, 0.279, 0.270],
        [0.631, 0.548, 0.488, 0.448, 0.425, 0.4124, 0.4151, 0.4206, 0.4271],
    )
    assert all(v.severity == "info" for v in diagnose(tiny, stopped=True))


def test_overfitting_cut_short_by_early_stopping_is_still_overfitting() -> None:
    # a big model on a tiny subset: best validation at epoch 5, then a stop 1% above it while training hits ~0
    train = [1.2, 0.6, 0.3, 0.12, 0.06, 0.03, 0.01, 0.004, 0.002]
    val = [0.9, 0.6, 0.48, 0.43, 0.408, 0.406, 0.409, 0.41, 0.41]
    points = _curve(train, val)
    assert [v.severity for v in diagnose(points) if v.code == "overfitting"] != [
        "warning"
    ]  # running: no rise yet
    (found,) = diagnose(points, stopped=True)
    assert (found.code, found.severity) == (
        "overfitting",
        "warning",
    ) and "cut short by early stopping" in found.message
    healthy = _curve([1.2, 0.8, 0.6, 0.5, 0.46, 0.45, 0.44], [1.1, 0.8, 0.62, 0.52, 0.5, 0.5, 0.5])
    assert [
        v for v in diagnose(healthy, stopped=True) if v.severity == "warning"
    ] == []  # stopped near the floor


def test_a_plateau_at_chance_level_is_no_floor() -> None:
    """Heavy dropout inflates the first training steps' loss (2.9), so a validation loss stuck at ln(10) looks 20%
    below the start; knowing a uniform guess's loss (SanityCheck's ln(C)) says it learned nothing."""
    stuck = _curve([3.0, 2.9, 2.8, 2.79, 2.78], [2.295, 2.295, 2.295, 2.295, 2.295])
    (found,) = diagnose(stuck, initial=2.95)
    assert (found.severity, found.evidence.get("floor_possible")) == ("info", 1)
    (found,) = diagnose(stuck, initial=2.95, chance=math.log(10))
    assert found.severity == "warning" and "floor_possible" not in found.evidence
    assert abs(found.evidence["chance_loss"] - math.log(10)) < 1e-6
    # a floor well below chance stays a possible floor
    floor = _curve([1.9, 1.62, 1.55, 1.52, 1.5], [1.41, 1.40, 1.41, 1.40, 1.41])
    (found,) = diagnose(floor, initial=2.31, chance=math.log(10))
    assert found.evidence["floor_possible"] == 1 and "chance_loss" not in found.evidence


def test_a_validation_loss_that_fell_far_since_its_first_evaluation_is_progress() -> None:
    """Generator g043 (N-BEATS, SGD 0.1 on batches of 8, dropout, cosine): the loss rose in its first steps (0.73,
    1.28, ...) to 1.58 over epoch 0, then fell to 0.91 with validation alongside. Against the first steps' ~1.1 that
    is 17% progress (underfitting, warning); the validation loss fell 43% from its first evaluation: held-out
    evidence of learning, so a possible floor (info). A validation loss that never moved (dropout 0.97 at ln(10))
    stays a warning."""
    train = [1.58, 1.29, 1.06, 1.01, 0.95, 0.93, 0.915, 0.912, 0.911, 0.9105, 0.9103]
    val = [1.62, 1.38, 1.16, 1.05, 0.97, 0.94, 0.92, 0.918, 0.917, 0.9172, 0.9171]
    found = [v for v in diagnose(_curve(train, val), initial=1.1) if v.code == "underfitting"]
    assert [(v.severity, v.evidence["floor_possible"], v.evidence["progress_from"]) for v in found] == [
        ("info", 1, "validation")
    ]
    assert found[0].evidence["progress"] > 0.4
    # validation down only 8% from its first value (and training 3% below the first steps): still a warning
    stalled = [1.2, 1.12, 1.1, 1.1, 1.1, 1.1, 1.1]
    found = [
        v
        for v in diagnose(_curve(stalled, [v + 0.01 for v in stalled]), initial=1.13)
        if v.severity == "warning"
    ]
    assert [v.code for v in found] == ["underfitting"] and "floor_possible" not in found[0].evidence
    assert found[0].evidence["progress"] < 0.1
