"""Renamed arguments keep their old names for one release: they work, warn once, and parse from LightningCLI YAML.

Every old name a callback lists in ``renamed_arguments`` is exercised with a value that differs from the new
argument's default, so a mapping that dropped the value would fail.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

import lightning_diag
from lightning_diag import _validation
from lightning_diag.callbacks import DiagCallback
from tests.helpers import Regression

#: (class, old name, a non-default value, other arguments the value needs)
CASES: list[tuple[str, str, Any, dict[str, Any]]] = [
    ("NaNGuard", "detect_spikes", False, {}),
    ("NaNGuard", "localize", False, {}),
    ("GradNormMonitor", "vanishing_window", 5, {}),
    ("GradClip", "spike_threshold", 3.0, {"algorithm": "zscore"}),
    ("GradClip", "spike_window", 50, {"algorithm": "zscore"}),
    ("GradClip", "spike_warmup_steps", 3, {"algorithm": "zscore"}),
    ("OverfitDetector", "window", 4, {}),
]
IDS = [f"{cls}.{old}" for cls, old, _, _ in CASES]


def test_every_renamed_argument_is_covered() -> None:
    listed = {
        (name, old)
        for name in lightning_diag.__all__
        if isinstance(cls := getattr(lightning_diag, name), type) and issubclass(cls, DiagCallback)
        for old in cls.renamed_arguments
    }
    assert listed == {(cls, old) for cls, old, _, _ in CASES}


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch) -> None:
    monkeypatch.setattr(_validation, "_RENAMES_WARNED", set())


@pytest.mark.parametrize(("name", "old", "value", "others"), CASES, ids=IDS)
def test_the_old_name_sets_the_new_argument_and_warns_once(name, old, value, others) -> None:
    cls = getattr(lightning_diag, name)
    new = cls.renamed_arguments[old]
    with pytest.warns(lightning_diag.LightningDiagDeprecationWarning, match=f"`{old}`.*use `{new}`"):
        callback = cls(**others, **{old: value})
    assert getattr(callback, new) == value
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls(**others, **{old: value})  # once per process: the second use is silent


@pytest.mark.parametrize(("name", "old", "value", "others"), CASES, ids=IDS)
def test_old_and_new_name_together_are_refused(name, old, value, others) -> None:
    cls = getattr(lightning_diag, name)
    new = cls.renamed_arguments[old]
    with pytest.raises(lightning_diag.ArgumentError, match=f"`{old}` is the old name of `{new}`"):
        cls(**others, **{old: value, new: value})


@pytest.mark.parametrize(("name", "old", "value", "others"), CASES, ids=IDS)
def test_lightning_cli_yaml_with_the_old_name_still_parses(name, old, value, others, tmp_path) -> None:
    config = {"trainer": {"callbacks": [{"class_path": name, "init_args": {**others, old: value}}]}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.warns(lightning_diag.LightningDiagDeprecationWarning):
        cli = LightningCLI(Regression, run=False, args=["--config", str(path)])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, getattr(lightning_diag, name))]
    assert getattr(callback, callback.renamed_arguments[old]) == value
