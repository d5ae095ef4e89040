"""StopTracker rules, table-driven (cases modelled on Lightning's and Keras' EarlyStopping tests)."""

from __future__ import annotations

import math

import pytest

from lightning_diag.core.stopping import StopTracker


def first_stop(values, **kwargs):
    tracker = StopTracker(**kwargs)
    for index, value in enumerate(values):
        decision = tracker.update(value)
        if decision.stop:
            return index, decision.reason
    return None, "none"


@pytest.mark.parametrize(
    ("values", "patience", "expected"),
    [
        ([6, 5, 5, 5, 5, 5], 3, 4),
        ([6, 5, 4, 4, 3, 3], 1, 3),
        ([6, 5, 6, 5, 5, 5], 3, 4),
        ([6, 5, 4, 3, 2, 1], 3, None),
        ([6, 7, 8, 9, 10, 11], 0, 1),
        ([1, 2, 3], 5, None),
    ],
    ids=["plateau", "patience-1", "bounce", "improving", "patience-0", "short-run"],
)
def test_patience(values, patience, expected) -> None:
    assert first_stop(values, patience=patience)[0] == expected


def test_min_delta_is_a_margin_in_both_modes() -> None:
    # 4.6 and 3.9 do not beat the best by more than 0.5 (Lightning's exp6 sequence).
    tracker = StopTracker(mode="min", min_delta=0.5, patience=10)
    improved = [tracker.update(v).improved for v in (5, 4.6, 4.2, 3.9, 3.0)]
    assert improved == [True, False, True, False, True]
    tracker = StopTracker(mode="max", min_delta=0.5, patience=10)
    improved = [tracker.update(v).improved for v in (1, 1.4, 1.6, 1.9, 2.2)]
    assert improved == [True, False, True, False, True]
    assert tracker.min_delta == 0.5  # never sign-flipped


@pytest.mark.parametrize(
    ("values", "mode", "kwargs", "expected"),
    [
        ([5, 4, 3, 2], "min", {"stopping_threshold": 3.0}, (3, "stopping_threshold")),
        ([5, 4, 3, 2], "min", {"stopping_threshold": 3.5}, (2, "stopping_threshold")),
        ([1, 2, 3, 4], "max", {"stopping_threshold": 3.0}, (3, "stopping_threshold")),
        ([5, 6, 10, 11], "min", {"divergence_threshold": 10.0}, (3, "divergence_threshold")),
        ([5, 4, 1, 0], "max", {"divergence_threshold": 1.0}, (3, "divergence_threshold")),
        ([5, 4, math.nan, 3], "min", {}, (2, "non_finite")),
        ([5, 4, math.inf, 3], "min", {}, (2, "non_finite")),
        ([5, 4, math.nan, 3, 2], "min", {"check_finite": False}, (None, "none")),
    ],
    ids=["thr-strict", "thr-min", "thr-max", "div-min", "div-max", "nan", "inf", "nan-unchecked"],
)
def test_thresholds_and_non_finite(values, mode, kwargs, expected) -> None:
    assert first_stop(values, mode=mode, patience=10, **kwargs) == expected


def test_thresholds_do_not_update_best() -> None:
    tracker = StopTracker(mode="min", stopping_threshold=1.0)
    tracker.update(2.0)
    decision = tracker.update(0.5)
    assert decision.stop and tracker.best == 2.0
    assert decision.new_best and tracker.best_seen == 0.5  # but the weights worth keeping are these


def test_new_best_ignores_min_delta_and_non_finite() -> None:
    tracker = StopTracker(mode="min", min_delta=0.5, patience=10, check_finite=False)
    flags = [(d.improved, d.new_best) for d in map(tracker.update, (5.0, 4.8, math.nan, 4.9, 4.4))]
    assert flags == [(True, True), (False, True), (False, False), (False, False), (True, True)]
    assert tracker.best_seen == 4.4


def test_baseline_resets_patience_only_when_beaten() -> None:
    # Improves every time but never beats the baseline 1.0: stops after `patience` checks.
    assert first_stop([3.0, 2.5, 2.0, 1.5], patience=2, baseline=1.0) == (1, "patience")
    # Beating the baseline resets the counter.
    assert first_stop([3.0, 0.9, 0.8, 0.7, 0.6], patience=2, baseline=1.0) == (None, "none")


def test_state_round_trip_decides_the_same() -> None:
    values = [5, 4.9, 4.95, 4.8, 4.85, 4.9, 4.99, 5.1]
    straight = StopTracker(patience=3, min_delta=0.05)
    decisions = [straight.update(v) for v in values]
    first = StopTracker(patience=3, min_delta=0.05)
    for v in values[:4]:
        first.update(v)
    resumed = StopTracker(patience=3, min_delta=0.05)
    resumed.load_state_dict(first.state_dict())
    assert [resumed.update(v) for v in values[4:]] == decisions[4:]
    partial = StopTracker()
    partial.load_state_dict({})  # tolerates missing keys
    assert partial.best == math.inf and partial.wait_count == 0


def test_bad_mode() -> None:
    with pytest.raises(ValueError, match=r"`mode` must be 'min' or 'max', got 'avg'"):
        StopTracker(mode="avg")  # type: ignore[arg-type]


def test_the_patience_message_names_the_reference_and_the_best_value_seen() -> None:
    # The main example's case: 0.0445 at epoch 12 is the reference; 0.0441381 at epoch 16 beats it by less than
    # min_delta, so the patience goes on counting from epoch 12 and the restored best is epoch 16's.
    tracker = StopTracker(min_delta=0.001, patience=5, name="val_loss")
    values = {11: 0.050, 12: 0.0445, 13: 0.0446, 14: 0.0447, 15: 0.0450, 16: 0.0441381, 17: 0.0443}
    decisions = [tracker.update(v, at=epoch) for epoch, v in values.items()]
    assert [d.stop for d in decisions] == [False] * 6 + [True]
    message = decisions[-1].message
    assert "did not beat 0.0445 at epoch 12 by more than 0.001 for 5 evaluation(s)" in message
    assert "(patience 5, counted from that value)" in message
    assert "the best value seen, 0.0441381 at epoch 16, beat it by less than `min_delta`" in message
    assert (tracker.best_at, tracker.best_seen_at) == (12, 16)
    restored = StopTracker(min_delta=0.001, patience=5)
    restored.load_state_dict(tracker.state_dict())
    assert (restored.best_at, restored.best_seen_at) == (12, 16)


def test_the_patience_message_without_a_closer_best_names_one_value() -> None:
    tracker = StopTracker(patience=2, name="loss")
    for epoch, value in enumerate([1.0, 0.5, 0.6, 0.7]):
        decision = tracker.update(value, at=epoch)
    assert decision.stop and decision.message == (
        "`loss` did not beat 0.5 at epoch 1 by more than 0.0 for 2 evaluation(s) (patience 2, counted from that "
        "value)."
    )
