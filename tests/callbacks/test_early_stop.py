"""EarlyStop with real Trainers: Lightning's EarlyStopping behaviours, plus restoration, warm-up, baseline, resume."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from lightning_diag import EarlyStop, collect_findings
from tests.helpers import Scripted, loader, trainer


class Snapshots(Callback):
    """The model's weights at the end of every epoch (what EarlyStop compares, after validation)."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.by_epoch[trainer.current_epoch] = copy.deepcopy(pl_module.state_dict())


def weights_equal(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in module.state_dict().items())


def run(values: list[float], max_epochs: int = 20, callbacks: list[Any] | None = None, **trainer_kwargs: Any):
    model = Scripted(values)
    t = trainer(max_epochs=max_epochs, callbacks=callbacks or [], **trainer_kwargs)
    t.fit(model, loader(n=32), loader(n=8))
    return t, model


@pytest.mark.parametrize(
    ("values", "patience", "stop_epoch"),
    [
        ([6, 5, 5, 5, 5, 5], 3, 4),
        ([6, 5, 4, 4, 3, 3], 1, 3),
        ([6, 5, 6, 5, 5, 5], 3, 4),
    ],
)
def test_patience_matches_lightning(values, patience, stop_epoch) -> None:
    ours, _ = run(values, callbacks=[EarlyStop("val_loss", patience=patience)])
    theirs, _ = run(values, callbacks=[EarlyStopping("val_loss", patience=patience)])
    assert ours.current_epoch - 1 == stop_epoch == theirs.current_epoch - 1
    assert ours.early_stopping_callback.stopped_epoch == stop_epoch  # Lightning sees it as its early stopper


@pytest.mark.parametrize(
    ("values", "kwargs", "reason", "stop_epoch"),
    [
        ([5, 4, 3, 2, 1], {"stopping_threshold": 2.5}, "stopping_threshold", 3),
        ([5, 6, 12, 4, 3], {"divergence_threshold": 10.0}, "divergence_threshold", 2),
        ([5, 4, math.nan, 3, 2], {}, "non_finite", 2),
    ],
)
def test_thresholds_and_non_finite_stop_with_a_finding(values, kwargs, reason, stop_epoch) -> None:
    cb = EarlyStop("val_loss", patience=10, **kwargs)
    t, _ = run(values, callbacks=[cb])
    assert cb.stopped_epoch == stop_epoch
    findings = {f.code: f for f in collect_findings(t)}
    assert set(findings) == (
        {"early_stopped", "non_finite_metric"} if reason == "non_finite" else {"early_stopped"}
    )
    finding = findings["early_stopped"]
    assert finding.evidence["reason"] == reason
    assert finding.severity == ("info" if reason == "stopping_threshold" else "warning")
    assert finding.advice


def test_missing_monitor_lists_available_keys() -> None:
    with pytest.raises(
        RuntimeError, match=r"monitoring `val_los`.*Did you mean `val_loss`\?.*Available keys: .*`val_loss`"
    ):
        run([1.0], callbacks=[EarlyStop("val_los")])
    t, _ = run([1.0, 1.0, 1.0], max_epochs=3, callbacks=[EarlyStop("val_los", strict=False, patience=1)])
    assert t.current_epoch == 3  # skipped, never stopped


def test_max_mode_and_min_delta() -> None:
    cb = EarlyStop("val_loss", mode="max", patience=2, min_delta=0.5)
    run([1.0, 1.4, 1.6, 1.7, 1.8, 3.0], callbacks=[cb])
    assert cb.stopped_epoch == 4 and cb.best_score.item() == pytest.approx(1.6)
    assert cb.min_delta == 0.5  # the argument is never mutated


def test_no_latched_stop_during_min_epochs() -> None:
    # Lightning issue 19966: a stop signalled during min_epochs stays latched and fires the moment min_epochs is
    # met, even if the metric improved in between. EarlyStop re-decides at every check instead.
    values = [5, 6, 7, 1, 0.9, 0.8, 0.7, 0.8, 0.9, 1.0]
    ours, _ = run(values, min_epochs=4, callbacks=[EarlyStop("val_loss", patience=2)])
    theirs, _ = run(values, min_epochs=4, callbacks=[EarlyStopping("val_loss", patience=2)])
    assert theirs.current_epoch == 4  # stopped right at min_epochs despite improving at epochs 3 and 4
    assert ours.early_stopping_callback.stopped_epoch == 8  # best 0.7 at epoch 6, two worse checks after it


def test_start_from_epoch_ignores_warm_up() -> None:
    values = [1.0, 5.0, 6.0, 4.0, 3.0, 3.5, 3.6, 3.7]
    plain = EarlyStop("val_loss", patience=2)
    run(values, callbacks=[plain])
    assert plain.stopped_epoch == 2
    warm = EarlyStop("val_loss", patience=2, start_from_epoch=3)
    run(values, callbacks=[warm])
    assert warm.stopped_epoch == 6 and warm.best_epoch == 4


def test_baseline_must_be_beaten() -> None:
    cb = EarlyStop("val_loss", patience=3, baseline=1.0)
    run([3.0, 2.0, 1.5, 1.2, 0.9, 0.8], callbacks=[cb])
    assert cb.stopped_epoch == 2


@pytest.mark.parametrize("ending", ["patience", "max_epochs", "other_callback"])
def test_restores_best_weights_however_training_ends(ending) -> None:
    class StopAt3(Callback):
        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch == 3:
                trainer.should_stop = True

    values = {
        "patience": [5, 3, 4, 4, 4, 4],
        "max_epochs": [5, 3, 4, 4, 4, 4],
        "other_callback": [5, 3, 4, 4, 4],
    }[ending]
    snaps = Snapshots()
    patience = 2 if ending == "patience" else 10
    extra = [StopAt3()] if ending == "other_callback" else []
    cb = EarlyStop("val_loss", patience=patience)
    t, model = run(values, max_epochs=5, callbacks=[snaps, cb, *extra])
    assert cb.best_epoch == 1 and cb.restored_epoch == 1
    assert weights_equal(model, snaps.by_epoch[1])
    assert not weights_equal(model, snaps.by_epoch[t.current_epoch - 1])
    if ending == "patience":
        assert collect_findings(t)[0].evidence["restored_epoch"] == 1


def test_restore_can_be_switched_off() -> None:
    snaps = Snapshots()
    t, model = run(
        [5, 3, 4, 4, 4], callbacks=[snaps, EarlyStop("val_loss", patience=2, restore_best_weights=False)]
    )
    assert weights_equal(model, snaps.by_epoch[t.current_epoch - 1])


def test_restores_from_the_best_model_checkpoint(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", mode="min", save_top_k=1)
    cb = EarlyStop("val_loss", patience=2)
    _t, model = run([5, 3, 4, 4, 4], callbacks=[cb, ckpt], enable_checkpointing=True)
    assert "epoch=1" in ckpt.best_model_path
    assert (
        cb.state_dict()["best_weights"] is None
    )  # no in-memory copy when a checkpoint holds the best weights
    best = torch.load(ckpt.best_model_path, weights_only=True)["state_dict"]
    assert weights_equal(model, best) and cb.restored_epoch == 1


def test_memory_and_checkpoint_sources_restore_the_same_epoch(tmp_path) -> None:
    # With min_delta, 3.95 at epoch 2 is not an "improvement" for patience but is the best value seen:
    # both sources restore epoch 2 (ModelCheckpoint keeps the best seen value too).
    values = [5, 4, 3.95, 4.1, 4.2, 4.3]
    memory = EarlyStop("val_loss", patience=3, min_delta=0.1, restore_from="memory")
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=1)
    from_ckpt = EarlyStop("val_loss", patience=3, min_delta=0.1, restore_from="checkpoint")
    run(values, callbacks=[memory])
    run(values, callbacks=[from_ckpt, ckpt], enable_checkpointing=True)
    assert memory.restored_epoch == from_ckpt.restored_epoch == 2 and "epoch=2" in ckpt.best_model_path
    assert memory.stopped_epoch == 4  # patience counted from epoch 1 (4.0), the last margin improvement


def test_threshold_stop_keeps_the_final_weights() -> None:
    snaps = Snapshots()
    cb = EarlyStop("val_loss", stopping_threshold=1.0)
    _t, model = run([5, 4, 0.5, 0.4], callbacks=[snaps, cb])
    assert cb.stopped_epoch == 2 and cb.best_epoch == 2 and cb.restored_epoch is None
    assert weights_equal(model, snaps.by_epoch[2])


def test_checkpoint_source_needs_a_matching_model_checkpoint() -> None:
    with pytest.raises(ValueError, match=r"needs a `ModelCheckpoint\(monitor='val_loss', mode='min'\)`"):
        run([1.0], callbacks=[EarlyStop("val_loss", restore_from="checkpoint")])


def test_resumed_run_stops_at_the_same_epoch_with_the_same_weights(tmp_path) -> None:
    values = [5, 4, 3.5, 3.6, 3.2, 3.3, 3.4, 3.5, 3.6]
    straight_cb = EarlyStop("val_loss", patience=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    _, straight_model = run(values, callbacks=[straight_cb, ckpt], enable_checkpointing=True)
    path = str(tmp_path / "epoch=5.ckpt")
    assert torch.load(path, weights_only=True)  # weights_only-safe state, best weights included

    resumed_cb = EarlyStop("val_loss", patience=3)
    model = Scripted(values)
    model.validation_runs = 6  # the scripted metric continues where the checkpoint left off
    t = trainer(max_epochs=20, callbacks=[resumed_cb])
    t.fit(model, loader(n=32), loader(n=8), ckpt_path=path)
    assert resumed_cb.stopped_epoch == straight_cb.stopped_epoch == 7
    assert resumed_cb.best_epoch == straight_cb.best_epoch == 4
    assert weights_equal(model, straight_model.state_dict())
    assert [f.code for f in collect_findings(t)] == ["early_stopped"]


def test_state_key_and_settings_survive_load() -> None:
    cb = EarlyStop("val_loss", patience=100)
    assert cb.state_key == "EarlyStop{'monitor': 'val_loss', 'mode': 'min'}"
    assert EarlyStop("val_loss", mode="max").state_key != cb.state_key
    cb.load_state_dict({"best": 1.0, "wait_count": 2, "patience": 7})
    assert (
        cb.patience == 100 and cb.wait_count == 2 and cb.best_score.item() == 1.0
    )  # Lightning overwrote patience


def test_report_written_when_fit_ends(tmp_path) -> None:
    _t, _ = run([5, 5, 5, 5], default_root_dir=str(tmp_path), callbacks=[EarlyStop("val_loss", patience=1)])
    report = json.loads(Path(os.path.join(tmp_path, "diagnosis.json")).read_text())
    assert (
        report["summary"]["codes"] == ["early_stopped"]
        and report["findings"][0]["evidence"]["best_epoch"] == 0
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_delta": -0.1}, r"`min_delta` must be >= 0, got -0\.1"),
        ({"patience": -1}, r"`patience` must be >= 0, got -1"),
        ({"mode": "avg"}, r"`mode` must be one of 'min', 'max', got 'avg'"),
        (
            {"restore_from": "disk"},
            r"`restore_from` must be one of 'auto', 'memory', 'checkpoint', got 'disk'",
        ),
        ({"start_from_epoch": -2}, r"`start_from_epoch` must be >= 0, got -2"),
        ({"baseline": math.nan}, r"`baseline` must be a finite number, got nan"),
        ({"monitor": ""}, r"`monitor` must be a non-empty metric key"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        EarlyStop(**{"monitor": "val_loss", **kwargs})
