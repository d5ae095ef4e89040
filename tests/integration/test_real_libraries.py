"""The lightning_diag suite on real third-party Lightning libraries (issue 23, item 5).

pytorch-forecasting (N-BEATS, DeepAR, TFT: ``lightning.pytorch``, the user builds the Trainer as in its tutorials) and
pytorch-tabular (a CategoryEmbedding model on scikit-learn tables: ``TabularModel.fit(callbacks=...)``, which builds a
``pytorch_lightning.Trainer``), at their quickstart architecture settings on their own generated / bundled data, with
the whole suite at defaults (``benchmarks.diagnosis.run.suite``). Fewer steps than the tutorials, so the module runs in
a few minutes on two CPU cores.

* healthy runs: not blocked (no ``SanityCheckError``/``NonFiniteError``), no warning/error finding in ``diagnosis.json``;
* injected faults (learning rate x100-1000, NaN/Inf in a feature, NaN in the target, unscaled targets x1e4): found at
  warning/error severity, and ``diagnosis.json``'s ``primary`` finding has the expected code;
* both namespaces: the report lands in the first logger's version directory under ``pytorch_lightning.Trainer`` too,
  the callbacks are accepted where ``pytorch_lightning`` checks callback types, and a run whose callbacks were
  deep-copied still yields its findings.

Run: ``python -m pytest -m integration tests/integration`` (needs ``pip install -e ".[integration]"``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pytorch_forecasting")
pytest.importorskip("pytorch_tabular")

from tests.integration import libs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

#: what a learning rate 100-1000x too high is named by (the corpus' lr_too_high scenarios accept the same codes)
LR_CODES = ("divergence", "loss_spike", "exploding_gradients", "non_finite_loss", "non_finite_gradients")
#: NaN/Inf in a batch tensor (DESIGN.md: `non_finite_input`, also for the target, which is part of the batch)
NAN_CODES = ("non_finite_input",)
#: a regression target 1e4x off unit scale: there is no target-scale code; `input_scale` names the batch tensor,
#: `loss_at_init` the initial loss far from what the task implies
SCALE_CODES = ("input_scale", "loss_at_init")


# -- the runs (each fitted once per session, on first use) --------------------------------------------------------
def _forecasting(kind: str, *, data: dict | None = None, nan: tuple | None = None, **fit: Any) -> Callable:
    def run(root: str) -> libs.Outcome:
        training, validation = libs.forecasting_data(kind, **(data or {}))
        if nan is not None:
            libs.inject(training, *nan)
        return libs.fit_forecasting(root, kind, training, validation, **fit)

    return run


def _tabular(task: str, *, scale: float = 1.0, nan_column: str | None = None, **fit: Any) -> Callable:
    def run(root: str) -> libs.Outcome:
        train, valid, config = libs.tabular_table(task, target_scale=scale)
        if nan_column is not None:
            train = train.copy()
            train.loc[train.sample(frac=0.05, random_state=0).index, nan_column] = np.nan
        return libs.fit_tabular(root, task, train, valid, config, **fit)

    return run


HEALTHY: dict[str, Callable] = {
    "nbeats": _forecasting("nbeats"),
    "deepar": _forecasting("deepar"),
    "tft": _forecasting("tft"),
    # the same AR data at a level of thousands: the library's target normaliser scales the model's input
    # (encoder_cont); the raw target and its scale ride along in the batch by design
    "nbeats_large_level": _forecasting("nbeats", data={"target_scale": 1e3}),
    "tabular_classification": _tabular("classification"),
    "tabular_regression": _tabular("regression"),
}

FAULTS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    # learning rate x1000 (1e-3 -> 1.0) / x100 (1e-2 -> 1.0)
    "nbeats_lr_x1000": (_forecasting("nbeats", learning_rate=1.0, max_epochs=3), LR_CODES),
    "deepar_lr_x100": (_forecasting("deepar", learning_rate=1.0, max_epochs=3), LR_CODES),
    "tabular_lr_x1000": (_tabular("classification", learning_rate=1.0), LR_CODES),
    # NaN/Inf in a feature
    "tft_nan_feature": (_forecasting("tft", nan=("season", float("nan")), max_epochs=3), NAN_CODES),
    "tft_inf_feature": (_forecasting("tft", nan=("season", float("inf")), max_epochs=3), NAN_CODES),
    "tabular_nan_feature": (_tabular("classification", nan_column="mean texture"), NAN_CODES),
    # NaN in the target
    "nbeats_nan_target": (_forecasting("nbeats", nan=("target",), max_epochs=3), NAN_CODES),
    # one NaN target value that the first batch does not hold: DeepAR's forward raises on the batch that has it
    "deepar_nan_target_one_row": (
        _forecasting("deepar", nan=("target", float("nan"), 0.0, 0), max_epochs=3),
        NAN_CODES,
    ),
    "tabular_nan_target": (_tabular("regression", nan_column="target"), NAN_CODES),
    # unscaled targets x1e4 (forecasting: the library's target normaliser replaced by the identity)
    "deepar_unscaled_target_x1e4": (
        _forecasting("deepar", data={"target_scale": 1e4, "scaled": False}, max_epochs=3),
        SCALE_CODES,
    ),
    "tabular_unscaled_target_x1e4": (_tabular("regression", scale=1e4), SCALE_CODES),
}

_CACHE: dict[str, libs.Outcome] = {}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: these models are small, and on a shared 2-core machine two OpenMP threads per process
    make a run 5-15x slower (N-BEATS: 73 s with 2 threads next to another busy process, 5 s with 1)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def outcome_of(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], libs.Outcome]:
    def get(name: str) -> libs.Outcome:
        if name not in _CACHE:
            run = HEALTHY[name] if name in HEALTHY else FAULTS[name][0]
            _CACHE[name] = run(str(tmp_path_factory.mktemp(name)))
        return _CACHE[name]

    return get


# -- healthy runs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(HEALTHY))
def test_healthy_run_is_not_blocked(outcome_of, name):
    outcome = outcome_of(name)
    assert outcome.status == "finished", outcome.describe()


@pytest.mark.parametrize("name", list(HEALTHY))
def test_healthy_run_has_no_warning_or_error(outcome_of, name):
    outcome = outcome_of(name)
    assert outcome.report is not None, f"no diagnosis.json written\n{outcome.describe()}"
    assert outcome.loud == [], outcome.describe()
    assert outcome.primary_code is None, outcome.describe()


@pytest.mark.parametrize("name", list(HEALTHY))
def test_report_lands_in_the_logger_version_directory(outcome_of, name):
    """DESIGN.md 3: diagnosis.json goes to the first logger's version directory, under ``lightning.pytorch`` and
    ``pytorch_lightning`` Trainers alike (pytorch-tabular's Trainer is a ``pytorch_lightning`` one)."""
    outcome = outcome_of(name)
    assert outcome.report_path is not None, outcome.describe()
    assert outcome.expected_dir is not None
    assert os.path.dirname(outcome.report_path) == os.path.abspath(outcome.expected_dir), (
        f"diagnosis.json at {outcome.report_path}, the logger's version directory is {outcome.expected_dir}"
    )


# -- injected faults ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FAULTS))
def test_fault_is_found(outcome_of, name):
    outcome, expected = outcome_of(name), FAULTS[name][1]
    assert outcome.report is not None, f"no diagnosis.json written\n{outcome.describe()}"
    assert set(outcome.codes()) & set(expected), f"expected one of {expected}\n{outcome.describe()}"


@pytest.mark.parametrize("name", list(FAULTS))
def test_fault_is_the_primary_finding(outcome_of, name):
    outcome, expected = outcome_of(name), FAULTS[name][1]
    assert outcome.primary_code in expected, f"expected primary in {expected}\n{outcome.describe()}"


# -- both namespaces ------------------------------------------------------------------------------------------------
def _tiny_module(namespace: str) -> Any:
    import importlib

    import torch

    pl = importlib.import_module(namespace)

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            x = x.clone()
            if self.global_step == 3:
                x[0, 0] = float("nan")  # one bad sample after the first batch: NaNGuard reports it
            return torch.nn.functional.mse_loss(self.net(x), y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    return Tiny()


def _tiny_loader() -> Any:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=g)
    return DataLoader(TensorDataset(x, x[:, :1] * 2), batch_size=16)


def test_pytorch_lightning_trainer_accepts_a_single_callback():
    """``pytorch_lightning.Trainer(callbacks=cb)`` wraps ``cb`` in a list only if it is a ``pytorch_lightning``
    ``Callback`` (callback_connector.on_trainer_init); otherwise the object itself becomes ``trainer.callbacks``."""
    import pytorch_lightning

    import lightning_diag as ld

    trainer = pytorch_lightning.Trainer(
        callbacks=ld.GradNormMonitor(), logger=False, enable_progress_bar=False
    )
    assert any(isinstance(c, ld.GradNormMonitor) for c in trainer.callbacks)


def test_callbacks_are_pytorch_lightning_callbacks():
    """What ``pytorch_lightning``'s own type checks (LightningCLI's ``trainer.callbacks`` parser, the callback
    connector, ``configure_callbacks`` overrides) require."""
    import pytorch_lightning

    import lightning_diag as ld

    for callback in libs.suite("val_loss"):
        assert isinstance(callback, pytorch_lightning.Callback), type(callback).__name__
    assert isinstance(ld.WarmupCosine(), pytorch_lightning.Callback)


def test_pytorch_lightning_cli_resolves_the_callbacks(tmp_path):
    pytest.importorskip("jsonargparse")
    import pytorch_lightning
    from pytorch_lightning.cli import LightningCLI

    import lightning_diag  # noqa: F401  (short names resolve once imported)

    module = _tiny_module("pytorch_lightning")
    loader = _tiny_loader()
    type(module).train_dataloader = lambda self: loader
    cli = LightningCLI(
        type(module),
        args=[
            "fit",
            "--trainer.max_epochs=1",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks+=lightning_diag.GradNormMonitor",
        ],
        save_config_callback=None,
    )
    assert any(type(c).__name__ == "GradNormMonitor" for c in cli.trainer.callbacks)
    assert isinstance(cli.trainer, pytorch_lightning.Trainer)


@pytest.mark.parametrize("namespace", ["lightning.pytorch", "pytorch_lightning"])
def test_report_in_the_version_directory_of_each_namespace(tmp_path, namespace):
    import importlib

    pl = importlib.import_module(namespace)
    loggers = importlib.import_module(f"{namespace}.loggers")
    callbacks = libs.suite("val_loss")
    logger = loggers.CSVLogger(str(tmp_path), name="run")

    def fit() -> Any:
        trainer = pl.Trainer(
            max_epochs=2,
            callbacks=callbacks,
            logger=logger,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.fit(_tiny_module(namespace), _tiny_loader(), _tiny_loader())
        return trainer

    outcome = libs._run(str(tmp_path), fit, callbacks, lambda: logger.log_dir)
    assert outcome.status == "finished", outcome.describe()
    assert outcome.report_path is not None, outcome.describe()
    assert os.path.dirname(outcome.report_path) == os.path.abspath(logger.log_dir), outcome.report_path
    assert "non_finite_loss" in outcome.codes() or "non_finite_input" in outcome.codes(), outcome.describe()


@pytest.mark.parametrize("namespace", ["lightning.pytorch", "pytorch_lightning"])
def test_deep_copied_callbacks_still_yield_their_findings(tmp_path, namespace):
    """A library that deep-copies the callbacks it is given: the Trainer runs the copies. The user's objects, or
    ``lightning_diag.load_report`` on the run's directory, must still give the findings (issue 23, item 6)."""
    import importlib

    import lightning_diag as ld

    pl = importlib.import_module(namespace)
    loggers = importlib.import_module(f"{namespace}.loggers")
    mine = libs.suite("val_loss")
    logger = loggers.CSVLogger(str(tmp_path), name="run")

    def fit() -> Any:
        trainer = pl.Trainer(
            max_epochs=2,
            callbacks=copy.deepcopy(mine),
            logger=logger,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.fit(_tiny_module(namespace), _tiny_loader(), _tiny_loader())
        return trainer

    outcome = libs._run(str(tmp_path), fit, mine, lambda: logger.log_dir)
    ran = [f for c in outcome.callbacks if isinstance(c, ld.callbacks.DiagCallback) for f in c.findings]
    assert ran, f"the copies recorded nothing\n{outcome.describe()}"
    users = [f for c in mine for f in c.findings]
    loaded = ld.load_report(logger.log_dir) if hasattr(ld, "load_report") else None
    assert users or loaded, (
        f"the run recorded {len(ran)} finding(s) in the Trainer's copies; the user's callback objects hold "
        f"{len(users)} and lightning_diag has no load_report"
    )
