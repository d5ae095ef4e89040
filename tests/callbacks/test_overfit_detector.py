"""OverfitDetector on real Trainers, on tasks where the truth is known."""

from __future__ import annotations

import os

import pytest
from lightning.pytorch.loggers import CSVLogger

from lightning_diag import EarlyStop, LightningDiagWarning, OverfitDetector
from tests.callbacks.curve_helpers import SCENARIOS, Net, loaders
from tests.helpers import trainer
from tests.readers import csv_scalars

CURVE_CODES = {"overfitting", "underfitting", "loss_plateau", "divergence"}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_each_scenario_gives_exactly_its_codes(name: str) -> None:
    kwargs, _, _, epochs, expected = SCENARIOS[name]
    detector = OverfitDetector()
    t = trainer(max_epochs=epochs, callbacks=[detector], num_sanity_val_steps=0)
    t.fit(Net(**kwargs), *loaders(name))
    found = {f.code for f in detector.findings if f.code in CURVE_CODES}
    assert found == expected, [f.message for f in detector.findings]
    assert len(detector.points) == epochs and [p.x for p in detector.points] == list(range(1, epochs + 1))


def test_overfitting_evidence_and_stop_with_best_weights_restored() -> None:
    kwargs, _, _, epochs, _ = SCENARIOS["overfitting"]
    detector = OverfitDetector(action="stop")
    early = EarlyStop(monitor="val_loss", patience=1000, restore_best_weights=True)  # never stops on its own
    t = trainer(max_epochs=epochs, callbacks=[detector, early], num_sanity_val_steps=0)
    t.fit(Net(**kwargs), *loaders("overfitting"))
    warning = next(f for f in detector.findings if f.code == "overfitting" and f.severity == "warning")
    best_epoch = warning.evidence["best_x"]
    assert warning.evidence["onset_x"] == best_epoch + 1
    assert warning.evidence["gap"] > warning.evidence["gap_at_best"]
    stopped = next(f for f in detector.findings if f.code == "early_stopped")
    assert stopped.evidence["reason"] == "overfitting"
    assert t.current_epoch < epochs - 1  # stopped early
    assert detector.stopped_at == len(detector.points)
    # EarlyStop put back the best epoch's weights (Lightning epochs are 0-based, the curve counts epochs done)
    assert early.best_epoch == int(best_epoch) - 1


def test_validation_several_times_per_epoch() -> None:
    detector = OverfitDetector()
    t = trainer(max_epochs=3, val_check_interval=0.5, callbacks=[detector], num_sanity_val_steps=0)
    t.fit(Net(), *loaders("healthy"))
    assert [p.x for p in detector.points] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert all(p.val is not None for p in detector.points)
    assert detector.points[-1].train < detector.points[0].train


def test_logged_train_monitor_is_used_at_epoch_end() -> None:
    detector = OverfitDetector(train_monitor="train_loss")
    t = trainer(max_epochs=3, callbacks=[detector], num_sanity_val_steps=0)
    t.fit(Net(), *loaders("healthy"))
    logged = float(t.callback_metrics["train_loss_epoch"])
    assert detector.points[-1].train == pytest.approx(logged, rel=1e-6)


def test_missing_key_lists_what_is_logged() -> None:
    t = trainer(max_epochs=1, callbacks=[OverfitDetector(monitor="valid/loss")], num_sanity_val_steps=0)
    with pytest.raises(
        RuntimeError, match=r"`monitor='valid/loss'` is not among the logged metrics \[.*'val_loss'"
    ):
        t.fit(Net(), *loaders("healthy"))


def test_missing_key_not_strict_warns_once_and_keeps_the_training_curve() -> None:
    detector = OverfitDetector(monitor="nope", strict=False)
    t = trainer(max_epochs=3, callbacks=[detector], num_sanity_val_steps=0)
    with pytest.warns(LightningDiagWarning, match="nope"):
        t.fit(Net(), *loaders("healthy"))
    assert len(detector.points) == 3 and all(p.val is None for p in detector.points)


def test_gap_is_logged(tmp_path) -> None:
    detector = OverfitDetector()
    t = trainer(
        max_epochs=3, callbacks=[detector], num_sanity_val_steps=0, logger=CSVLogger(tmp_path, name="r")
    )
    t.fit(Net(), *loaders("healthy"))
    series = csv_scalars(os.path.join(t.logger.log_dir, "metrics.csv"))
    gaps = dict(series["diag/overfit/gap"])
    assert len(gaps) == 3
    for point, step in zip(detector.points, detector.steps, strict=True):
        assert gaps[step] == pytest.approx(point.val - point.train, rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"action": "halt"}, "`action` must be one of"),
        ({"patience": 1}, "`patience` must be >= 2, got 1"),
        ({"divergence_ratio": 0.9}, "`divergence_ratio` must be > 1"),
        ({"plateau_threshold": -0.1}, "`plateau_threshold` must be in \\[0, 1\\)"),
        ({"chance_loss": float("nan")}, "`chance_loss` must be a finite number"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        OverfitDetector(**kwargs)


def test_skipped_non_finite_steps_stay_out_of_the_training_mean() -> None:
    from lightning_diag import NaNGuard
    from tests.callbacks.curve_helpers import circles

    data = circles(1024, 0)
    data.tensors[0][300, 0] = float("nan")  # one bad sample: its step is skipped by NaNGuard
    detector = OverfitDetector()
    guard = NaNGuard(action="skip", check_spikes=False)
    from torch.utils.data import DataLoader

    t = trainer(max_epochs=3, callbacks=[guard, detector], num_sanity_val_steps=0)
    t.fit(Net(), DataLoader(data, batch_size=64), loaders("healthy")[1])
    assert guard.skipped_steps == 3
    assert all(p.train == p.train for p in detector.points)  # no NaN in the curve
    assert not [f for f in detector.findings if f.code == "divergence"]
