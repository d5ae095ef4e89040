"""Contained internal errors (lightning_diag._containment) with real Trainers.

An unexpected exception inside a lightning_diag hook becomes an ``internal_error`` finding, the callback disables
itself for the rest of the fit, the run goes on and ``diagnosis.json`` is still written; deliberate exceptions
and ``LIGHTNING_DIAG_STRICT=1`` raise as before.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from lightning.fabric.utilities.exceptions import MisconfigurationException

from lightning_diag import LightningDiagWarning, collect_findings
from lightning_diag._containment import (
    HOOKS,
    STRICT_ENV,
    Deliberate,
    contain_hooks,
    is_deliberate,
    is_disabled,
)
from lightning_diag._validation import ArgumentError, ConfigurationError
from lightning_diag.callbacks import DiagCallback
from tests.helpers import Regression, loader, trainer


class Flaky(DiagCallback):
    """Counts its calls and raises ``error`` in ``on_before_optimizer_step`` at step ``fail_at``."""

    def __init__(self, fail_at: int = 2, error: BaseException | None = None, hook: str = "step") -> None:
        super().__init__()
        self.fail_at = fail_at
        self.error = error if error is not None else KeyError("a bug")
        self.hook = hook
        self.calls: list[int] = []
        self.batch_ends = 0

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.calls.append(trainer.global_step)
        if self.hook == "step" and trainer.global_step == self.fail_at:
            raise self.error

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        self.batch_ends += 1

    def state_dict(self) -> dict[str, Any]:
        if self.hook == "state_dict":
            raise self.error
        return {"calls": list(self.calls), "findings": self._findings_state()}


class Quiet(DiagCallback):
    """A healthy lightning_diag callback next to the flaky one."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.steps += 1


@pytest.fixture
def lenient(monkeypatch):
    monkeypatch.setenv(STRICT_ENV, "0")


def _report(tmp_path) -> dict[str, Any]:
    with open(os.path.join(tmp_path, "diagnosis.json"), encoding="utf-8") as handle:
        return json.load(handle)


def test_an_internal_error_is_contained_and_reported(tmp_path, lenient, capsys) -> None:
    flaky, quiet = Flaky(fail_at=2), Quiet()
    t = trainer(max_steps=6, callbacks=[flaky, quiet], default_root_dir=str(tmp_path))
    with pytest.warns(
        LightningDiagWarning, match=r"Flaky disabled itself .* `on_before_optimizer_step` at step 2"
    ):
        t.fit(Regression(), loader())
    assert t.global_step == 6  # the user's run went on to the end
    assert flaky.calls == [0, 1, 2] and flaky.batch_ends == 2  # disabled from the failing hook on
    assert quiet.steps == 6 and is_disabled(flaky) and not is_disabled(quiet)
    (finding,) = [f for f in collect_findings(t) if f.code == "internal_error"]
    assert finding.source == "Flaky" and finding.severity == "warning" and finding.step == 2
    assert finding.evidence["callback"] == "Flaky"
    assert finding.evidence["hook"] == "on_before_optimizer_step"
    assert finding.evidence["exception"] == "KeyError: 'a bug'"
    assert "raise self.error" in str(finding.evidence["traceback"])
    report = _report(tmp_path)
    assert report["summary"]["disabled"] == ["Flaky (on_before_optimizer_step)"]
    assert report["summary"]["status"] == "finished" and report["summary"]["healthy"] is False
    out = capsys.readouterr().out
    assert "Disabled after an internal error (the run went on without them): Flaky" in out


def test_the_disabled_reporter_still_writes_the_report(tmp_path, lenient) -> None:
    quiet, flaky = Quiet(), Flaky(fail_at=1)  # the flaky one is last: it is the one that writes the report
    t = trainer(max_steps=3, callbacks=[quiet, flaky], default_root_dir=str(tmp_path))
    with pytest.warns(LightningDiagWarning):
        t.fit(Regression(), loader())
    assert [f["code"] for f in _report(tmp_path)["findings"]] == ["internal_error"]


def test_strict_mode_raises_the_bug(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(STRICT_ENV, "1")
    t = trainer(max_steps=4, callbacks=[Flaky(fail_at=1)], default_root_dir=str(tmp_path))
    with pytest.raises(KeyError, match="a bug"):
        t.fit(Regression(), loader())
    assert _report(tmp_path)["summary"]["status"] == "failed"  # on_exception still reports


def test_the_test_suite_runs_strict() -> None:
    assert os.environ.get(STRICT_ENV) == "1"


class Stop(Deliberate, RuntimeError):
    pass


@pytest.mark.parametrize(
    "error",
    [
        Stop("deliberate stop"),
        MisconfigurationException("bad trainer"),
        ArgumentError("`x` must be 1, got 2."),
        ConfigurationError("refused at setup"),
        KeyboardInterrupt(),
    ],
    ids=["deliberate", "misconfiguration", "argument", "configuration", "keyboard-interrupt"],
)
def test_deliberate_exceptions_pass_through(error, tmp_path, lenient) -> None:
    assert is_deliberate(error)
    t = trainer(max_steps=4, callbacks=[Flaky(fail_at=1, error=error)], default_root_dir=str(tmp_path))
    expected = (
        SystemExit if isinstance(error, KeyboardInterrupt) else type(error)
    )  # Lightning 2.6 exits on ^C
    with pytest.raises(expected):
        t.fit(Regression(), loader())
    assert not any(f.code == "internal_error" for f in collect_findings(t))


def test_a_new_fit_enables_the_callback_again(tmp_path, lenient) -> None:
    flaky = Flaky(fail_at=1)
    with pytest.warns(LightningDiagWarning):
        trainer(max_steps=3, callbacks=[flaky], default_root_dir=str(tmp_path)).fit(Regression(), loader())
    flaky.fail_at = -1
    flaky.calls.clear()
    trainer(max_steps=3, callbacks=[flaky], default_root_dir=str(tmp_path)).fit(Regression(), loader())
    assert flaky.calls == [0, 1, 2] and not is_disabled(flaky) and flaky.findings == []


def test_a_failing_state_dict_does_not_lose_the_checkpoint(tmp_path, lenient) -> None:
    flaky = Flaky(hook="state_dict", error=TypeError("not serialisable"))
    t = trainer(max_steps=2, callbacks=[flaky], default_root_dir=str(tmp_path))
    t.fit(Regression(), loader())
    path = str(tmp_path / "last.ckpt")
    with pytest.warns(LightningDiagWarning, match="`state_dict`"):
        t.save_checkpoint(path)
    assert os.path.exists(path) and is_disabled(flaky)


def test_contain_hooks_wraps_each_override_once() -> None:
    class Plain(DiagCallback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            raise ValueError("x")

    contain_hooks(Plain)
    wrapped = Plain.on_train_start
    contain_hooks(Plain)
    assert Plain.on_train_start is wrapped and wrapped.__lightning_diag_contained__
    assert "on_before_optimizer_step" in HOOKS and "state_dict" in HOOKS and "setup" in HOOKS
