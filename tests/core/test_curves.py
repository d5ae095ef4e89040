"""Curve rules on synthetic learning curves: each failure found, none on healthy curves (also with noise)."""

from __future__ import annotations

import math
import random

import pytest

from lightning_diag.core.curves import CurvePoint, CurveRules, comparable, diagnose, noise


def curve(train: list[float], val: list[float | None] | None = None) -> list[CurvePoint]:
    val = val if val is not None else [None] * len(train)
    return [CurvePoint(float(i + 1), t, v) for i, (t, v) in enumerate(zip(train, val, strict=True))]


def noisy(values: list[float], scale: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [v * (1 + rng.uniform(-scale, scale)) for v in values]


def codes(points: list[CurvePoint], **kwargs) -> list[tuple[str, str]]:
    return [(d.code, d.severity) for d in diagnose(points, **kwargs)]


def every_prefix(points: list[CurvePoint], **kwargs) -> set[tuple[str, str]]:
    """What the live callback would have reported over the whole run (the rules run after each evaluation)."""
    return {c for n in range(1, len(points) + 1) for c in codes(points[:n], **kwargs)}


HEALTHY_TRAIN = [2.3 * math.exp(-0.35 * i) + 0.02 for i in range(15)]
HEALTHY_VAL = [2.3 * math.exp(-0.3 * i) + 0.08 for i in range(15)]


@pytest.mark.parametrize("seed", [None, 0, 1, 2, 3])
def test_healthy_curves_raise_nothing(seed: int | None) -> None:
    train, val = HEALTHY_TRAIN, HEALTHY_VAL
    if seed is not None:
        train, val = noisy(train, 0.03, seed), noisy(val, 0.03, seed + 100)
    assert every_prefix(curve(train, val)) == set()


def test_overfitting_rising_validation_loss() -> None:
    train = [1.0 * 0.8**i for i in range(12)]
    val = [1.0, 0.8, 0.65, 0.55, 0.5, 0.52, 0.56, 0.6, 0.66, 0.72, 0.8, 0.9]
    (detection,) = diagnose(curve(train, val))
    assert (detection.code, detection.severity) == ("overfitting", "warning")
    assert detection.evidence["best_x"] == 5 and detection.evidence["onset_x"] == 6
    assert detection.evidence["gap"] > detection.evidence["gap_at_best"]
    assert "since epoch 5" in detection.message and "(epoch 4)" in detection.message  # 0-based, as Lightning


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_overfitting_with_noise(seed: int) -> None:
    train = noisy([1.0 * 0.8**i for i in range(14)], 0.02, seed)
    val = noisy([1.0, 0.8, 0.65, 0.55, 0.5, 0.52, 0.56, 0.6, 0.66, 0.72, 0.8, 0.9, 1.0, 1.1], 0.02, seed + 7)
    assert ("overfitting", "warning") in every_prefix(curve(train, val))


def test_widening_gap_with_a_flat_validation_loss_is_an_early_info() -> None:
    train = [1.0, 0.8, 0.6, 0.45, 0.35, 0.27, 0.2, 0.15]
    val = [1.0, 0.85, 0.7, 0.6, 0.6, 0.6, 0.6, 0.6]
    assert codes(curve(train, val)) == [("overfitting", "info")]


def test_validation_noise_is_not_overfitting() -> None:
    train = [1.0 * 0.85**i for i in range(12)]
    val = [1.0, 0.8, 0.7, 0.62, 0.6, 0.605, 0.598, 0.603, 0.6, 0.604, 0.599, 0.602]  # flat within noise
    found = every_prefix(curve(train, val))
    assert ("overfitting", "warning") not in found


@pytest.mark.parametrize(
    ("train_at_end", "expected"), [(20.82, "info"), (17.0, "warning")], ids=["barely-fell", "fell-18%"]
)
def test_a_validation_rise_while_training_barely_moves_is_not_overfitting(
    train_at_end: float, expected: str
) -> None:
    # A VAE at a constant SGD rate (generator g037): the validation loss rose 11% over three epochs while the
    # training loss fell 2.5%; the full run made a new best three epochs later. Overfitting needs a model that goes
    # on fitting its training data (FIT_GAIN): the same rise with the training loss down 18% is overfitting.
    train = [34.0, 28.0, 26.0, 24.5, 23.4, 22.5, 21.36, 21.3, 21.1, train_at_end]
    val = [31.61, 27.27, 26.11, 24.22, 23.88, 23.3, 22.09, 22.33, 23.88, 24.59]
    found = dict(codes(curve(train, val)) + codes(curve(train, val), stopped=True))
    assert found.get("overfitting") == expected


def test_divergence_rising_training_loss() -> None:
    train = [1.0, 0.7, 0.5, 0.45, 0.6, 0.9, 1.5, 3.0]
    (detection,) = diagnose(curve(train))
    assert detection.code == "divergence" and detection.severity == "error"
    assert detection.evidence["best_x"] == 4 and detection.evidence["ratio"] == pytest.approx(
        3.0 / 0.45, rel=1e-3
    )


def test_divergence_non_finite() -> None:
    (detection,) = diagnose(curve([1.0, 0.8, math.nan]))
    assert detection.code == "divergence" and "non-finite" in detection.message


def test_oscillation_is_evidence() -> None:
    train = [1.0, 0.5, 0.9, 0.4, 1.0, 0.5, 0.8, 1.2, 1.6]
    (detection,) = diagnose(curve(train))
    assert detection.code == "divergence" and detection.evidence["oscillation"] > 0.1


def test_underfitting_flat_high_and_close() -> None:
    train = [0.80, 0.72, 0.70, 0.694, 0.693, 0.6935, 0.6931, 0.6934]
    val = [0.80, 0.72, 0.70, 0.695, 0.694, 0.6936, 0.6932, 0.6935]
    (detection,) = diagnose(curve(train, val))
    assert detection.code == "underfitting" and detection.evidence["reference"] == "initial"
    # against an explicit baseline (ln 2 for a balanced binary task) it is just as high
    (with_baseline,) = diagnose(curve(train, val), baseline=math.log(2))
    assert with_baseline.code == "underfitting" and with_baseline.evidence["reference_loss"] == math.log(2)


def test_slow_steady_decrease_is_a_plateau_pointing_at_the_learning_rate() -> None:
    train = [0.700 - 0.001 * i for i in range(10)]
    val = [0.701 - 0.001 * i for i in range(10)]
    (detection,) = diagnose(curve(train, val))
    assert detection.code == "loss_plateau" and "still falling" in detection.message
    assert "too low" in detection.advice[0]


def test_a_converged_loss_is_no_plateau() -> None:
    train = [2.0, 0.5, 0.1, 0.05, 0.049, 0.049, 0.0489, 0.049]
    assert codes(curve(train, train)) == []


def test_noise_and_rules_validation() -> None:
    assert noise([1.0]) == 0.0 and noise([1.0, 3.0, 2.0]) == 1.5
    with pytest.raises(ValueError, match="`patience` must be an int >= 2, got 1"):
        CurveRules(patience=1)
    with pytest.raises(ValueError, match="`divergence_ratio` must be > 1"):
        CurveRules(divergence_ratio=1.0)
    with pytest.raises(ValueError, match="`close_ratio` must be >= 0"):
        CurveRules(close_ratio=-0.1)


def test_mid_epoch_evaluations_are_named_by_epoch_and_progress() -> None:
    train = [1.0 * 0.8**i for i in range(10)]
    val = [1.0, 0.8, 0.65, 0.55, 0.5, 0.56, 0.62, 0.7, 0.8, 0.9]
    points = [CurvePoint(0.5 * (i + 1), t, v) for i, (t, v) in enumerate(zip(train, val, strict=True))]
    (detection,) = diagnose(points)
    assert "since epoch 2:" in detection.message and "(epoch 2, 50% through)" in detection.message
    assert detection.evidence["best_epoch"] == 2 and detection.evidence["onset_epoch"] == 2


def test_losses_on_different_scales_are_judged_each_on_their_own() -> None:
    # a training loss on a normalised target (~0.05) against a validation loss in raw units (~17): no gap means
    # anything; overfitting is the validation loss rising from its best while the training loss falls
    train = [0.09, 0.07, 0.06, 0.05, 0.045, 0.04, 0.035]
    val = [16.9, 16.5, 16.8, 17.5, 18.6, 19.9, 21.0]
    points = [CurvePoint(float(i + 1), t, v) for i, (t, v) in enumerate(zip(train, val, strict=True))]
    assert not comparable(points)
    (found,) = diagnose(points)
    assert found.code == "overfitting" and found.severity == "warning"
    assert "gap" not in found.evidence and found.evidence["scales"] == "different"
    assert "different scales, so no gap" in found.message
    same = [CurvePoint(p.x, p.train * 300, p.val) for p in points]  # the same curves on one scale
    assert comparable(same)


def test_a_flat_validation_loss_on_another_scale_is_no_plateau_of_the_training_loss() -> None:
    # training on a normalised target falls far; validation, in raw units, stays flat: not "nothing learned"
    train = [1.0, 0.6, 0.4, 0.3, 0.25, 0.22]
    val = [40.0, 40.1, 39.9, 40.2, 40.0, 40.1]
    points = [CurvePoint(float(i + 1), t, v) for i, (t, v) in enumerate(zip(train, val, strict=True))]
    assert [v.code for v in diagnose(points) if v.severity == "warning"] == []
