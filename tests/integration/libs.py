"""Helpers of the integration module: real third-party Lightning libraries trained with the lightning_diag suite.

Each builder follows the library's own quickstart/tutorial (architecture and optimiser settings), on the
library's own generated data (``pytorch_forecasting.data.examples.generate_ar_data``) or a scikit-learn bundled
table, with fewer steps so that the module stays within a few minutes on two CPU cores.

A run is fitted the way the library documents it:

* pytorch-forecasting: the user builds the ``lightning.pytorch.Trainer`` (as in its tutorials) and passes the
  suite in ``callbacks``; the logger is a ``lightning.pytorch`` ``CSVLogger`` in the run's directory.
* pytorch-tabular: ``TabularModel.fit(callbacks=...)``; the library builds a ``pytorch_lightning.Trainer``
  (the standalone package) with its own default logger (TensorBoard under ``lightning_logs/``).

The suite is ``benchmarks.diagnosis.run.suite(monitor)`` (SanityCheck, GradNormMonitor, NaNGuard, SpeedMonitor,
SilentBugDetector, OverfitDetector + EarlyStop on the library's validation loss key), all at their defaults.

Everything a test asserts on is read from the ``diagnosis.json`` the run writes (:class:`Outcome`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import torch
from lightning.pytorch import callbacks as _lightning_callbacks

import lightning_diag as ld
from benchmarks.diagnosis.run import suite

__all__ = [
    "LOUD",
    "Outcome",
    "deepar",
    "fit_forecasting",
    "fit_tabular",
    "forecasting_data",
    "inject",
    "nbeats",
    "tabular_table",
    "tft",
]

LOUD = ("warning", "error")

#: the validation loss keys the libraries log (what OverfitDetector/EarlyStop watch)
FORECASTING_MONITOR = "val_loss"
TABULAR_MONITOR = "valid_loss"


# -- the outcome of one run ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Outcome:
    """What one run produced: how it ended and the report it wrote."""

    status: str  # finished / blocked (SanityCheckError) / stopped (NonFiniteError) / crashed (anything else)
    error: str | None
    seconds: float
    report: dict[str, Any] | None  # diagnosis.json
    report_path: str | None  # where diagnosis.json was found
    expected_dir: str | None  # the first logger's version directory (where the report should be)
    callbacks: list[Any]  # the callback objects the Trainer ran
    loss_history: list[float]  # per epoch: the mean loss training_step returned
    warnings: list[str]
    val_history: list[dict[str, float]] = dataclasses.field(default_factory=list)  # per evaluation

    @property
    def findings(self) -> list[dict[str, Any]]:
        return list(self.report["findings"]) if self.report else []

    @property
    def loud(self) -> list[dict[str, Any]]:
        """Warning/error findings."""
        return [f for f in self.findings if f["severity"] in LOUD]

    @property
    def primary(self) -> dict[str, Any] | None:
        if not self.report or self.report.get("primary") is None:
            return None
        return next((f for f in self.findings if f["id"] == self.report["primary"]), None)

    @property
    def primary_code(self) -> str | None:
        p = self.primary
        return None if p is None else str(p["code"])

    def codes(self, severities: tuple[str, ...] = LOUD) -> list[str]:
        return sorted({f["code"] for f in self.findings if f["severity"] in severities})

    def describe(self) -> str:
        """Every finding, one line each (the assertion messages)."""
        head = f"status={self.status}" + (f" ({self.error})" if self.error else "")
        head += f", primary={self.primary_code}, report={self.report_path}, {self.seconds:.1f}s"
        lines = [head]
        for f in self.findings:
            where = f" caused_by={f['caused_by']}" if f.get("caused_by") else ""
            lines.append(f"  {f['severity']:7} {f['id']}{where}: {f['message'][:260]}")
        return "\n".join(lines)


class _Tracer:
    """Records, per epoch, the mean loss ``training_step`` returned, and the validation metrics: the run's own
    curve, to judge a finding against (is the loss still falling?)."""

    def __init__(self) -> None:
        self.train: list[float] = []
        self.val: list[dict[str, float]] = []
        self._sum, self._n = 0.0, 0

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._sum += float(loss.detach().float())
            self._n += 1

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._n:
            self.train.append(self._sum / self._n)
        self._sum, self._n = 0.0, 0

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            metrics = trainer.callback_metrics.items()
            self.val.append({k: float(v) for k, v in metrics if "val" in k and v.numel() == 1})


class LossTracer(_Tracer, _lightning_callbacks.Callback):
    """:class:`_Tracer` for ``lightning.pytorch`` Trainers."""


try:
    import pytorch_lightning as _standalone

    class StandaloneLossTracer(_Tracer, _standalone.Callback):
        """:class:`_Tracer` for ``pytorch_lightning`` Trainers."""

except ImportError:  # pragma: no cover
    StandaloneLossTracer = None  # type: ignore[assignment, misc]


def loss_tracer(namespace: str = "lightning.pytorch") -> Any:
    """A plain Callback of ``namespace`` recording the run's curve (module-level classes: picklable)."""
    return LossTracer() if namespace == "lightning.pytorch" else StandaloneLossTracer()


def _find_reports(root: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "**", "diagnosis.json"), recursive=True))


@contextlib.contextmanager
def _user_environment() -> Iterator[list[str]]:
    """As a user runs: no strict mode (our internal errors are contained), warnings recorded, not raised."""
    saved = os.environ.pop("LIGHTNING_DIAG_STRICT", None)
    names = (
        "lightning.pytorch",
        "lightning.fabric",
        "pytorch_lightning",
        "lightning_fabric",
        "pytorch_tabular",
    )
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    caught: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            yield caught
        caught.extend(
            f"{r.category.__name__}: {str(r.message)[:200]}"
            for r in records
            if issubclass(r.category, ld.LightningDiagWarning)
        )
    finally:
        if saved is not None:
            os.environ["LIGHTNING_DIAG_STRICT"] = saved
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def _run(
    root: str, fit: Callable[[], Any], callbacks: list[Any], expected_dir: Callable[[], str | None]
) -> Outcome:
    """Fit inside ``root`` (the working directory too: a ``pytorch_lightning`` run writes relative paths)."""
    os.makedirs(root, exist_ok=True)
    before = os.getcwd()
    os.chdir(root)
    start = time.perf_counter()
    status, error = "finished", None
    trainer = None
    try:
        with _user_environment() as caught:
            sink = io.StringIO()
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                try:
                    trainer = fit()
                except ld.SanityCheckError as exc:
                    status, error = "blocked", f"SanityCheckError: {str(exc)[:300]}"
                except ld.NonFiniteError as exc:
                    status, error = "stopped", f"NonFiniteError: {str(exc)[:300]}"
                except Exception as exc:
                    status, error = "crashed", f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        os.chdir(before)
    seconds = time.perf_counter() - start
    paths = _find_reports(root)
    report = None
    if paths:
        # the newest report (a run writes one; a second one would be a bug worth seeing in report_path)
        path = max(paths, key=os.path.getmtime)
        with open(path, encoding="utf-8") as handle:
            report = json.load(handle)
    else:
        path = None
    try:
        where = expected_dir()
    except Exception:
        where = None
    ran = list(trainer.callbacks) if trainer is not None and hasattr(trainer, "callbacks") else callbacks
    return Outcome(
        status=status,
        error=error,
        seconds=seconds,
        report=report,
        report_path=path,
        expected_dir=where,
        callbacks=ran,
        loss_history=[],
        warnings=caught,
    )


# -- pytorch-forecasting ------------------------------------------------------------------------------------------
MAX_ENCODER_LENGTH = 60  # the N-BEATS / DeepAR tutorials (ar.ipynb, deepar.ipynb)
MAX_PREDICTION_LENGTH = 20


def forecasting_data(
    kind: str,
    *,
    target_scale: float = 1.0,
    scaled: bool = True,
    n_series: int = 100,
    seed: int = 42,
) -> tuple[Any, Any]:
    """``generate_ar_data`` (the tutorials' data: 100 series of 400 steps, seasonality 10) as training and
    validation ``TimeSeriesDataSet`` s for ``kind`` in ``nbeats`` / ``deepar`` / ``tft``.

    ``target_scale`` multiplies the target; ``scaled=False`` replaces the library's automatic target normaliser
    by the identity (the model then sees and predicts the raw target: the "unscaled targets" fault).
    """
    from pytorch_forecasting import TimeSeriesDataSet
    from pytorch_forecasting.data import NaNLabelEncoder, TorchNormalizer
    from pytorch_forecasting.data.examples import generate_ar_data

    data = generate_ar_data(seasonality=10.0, timesteps=400, n_series=n_series, seed=seed)
    data["static"] = 2
    data["date"] = pd.Timestamp("2020-01-01") + pd.to_timedelta(data.time_idx, "D")
    data["value"] = data["value"] * target_scale
    cutoff = data["time_idx"].max() - MAX_PREDICTION_LENGTH
    common: dict[str, Any] = {
        "time_idx": "time_idx",
        "target": "value",
        "group_ids": ["series"],
        "max_encoder_length": MAX_ENCODER_LENGTH,
        "max_prediction_length": MAX_PREDICTION_LENGTH,
    }
    if not scaled:
        common["target_normalizer"] = TorchNormalizer(method="identity", center=False)
    if kind == "nbeats":  # ar.ipynb
        spec = {
            "categorical_encoders": {"series": NaNLabelEncoder().fit(data.series)},
            "time_varying_unknown_reals": ["value"],
        }
    elif kind == "deepar":  # deepar.ipynb
        data = data.astype({"series": str})
        spec = {
            "categorical_encoders": {"series": NaNLabelEncoder().fit(data.series)},
            "static_categoricals": ["series"],
            "time_varying_unknown_reals": ["value"],
        }
    elif kind == "tft":
        # the README/stallion recipe, on the AR data (a known time feature, the series as static)
        data = data.astype({"series": str})
        data["season"] = np.sin(2 * np.pi * data["time_idx"] / 40.0)
        spec = {
            "static_categoricals": ["series"],
            "time_varying_known_reals": ["time_idx", "season"],
            "time_varying_unknown_reals": ["value"],
            "add_relative_time_idx": True,
            "add_target_scales": True,
            "add_encoder_length": True,
            "min_encoder_length": MAX_ENCODER_LENGTH // 2,
        }
    else:
        raise ValueError(kind)
    training = TimeSeriesDataSet(data[lambda x: x.time_idx <= cutoff], **common, **spec)
    validation = TimeSeriesDataSet.from_dataset(training, data, min_prediction_idx=cutoff + 1)
    return training, validation


def inject(dataset: Any, where: str, value: float = float("nan"), share: float = 0.05, seed: int = 0) -> str:
    """Put ``value`` into a share of the rows of a built ``TimeSeriesDataSet``'s tensors, after the library's own
    finiteness check (the data frame is refused with NaN: a corrupt record that reaches the tensors is what is
    modelled). ``where``: ``target`` (the target column, also the model's encoder input) or a real column name.
    Returns a description of what was changed.
    """
    g = torch.Generator().manual_seed(seed)
    data = dataset.data
    rows = torch.randperm(len(data["reals"]), generator=g)[: max(1, int(share * len(data["reals"])))]
    if where == "target":
        targets = data["target"] if isinstance(data["target"], list) else [data["target"]]
        for t in targets:
            t[rows] = value
        position = dataset.reals.index(dataset.target) if dataset.target in dataset.reals else None
        if position is not None:
            data["reals"][rows, position] = value
        return f"{value} in {len(rows)} target rows"
    position = dataset.reals.index(where)
    data["reals"][rows, position] = value
    return f"{value} in {len(rows)} rows of `{where}`"


def _forecasting_loaders(training: Any, validation: Any, kind: str, batch_size: int = 128) -> tuple[Any, Any]:
    train_kwargs: dict[str, Any] = {"train": True, "batch_size": batch_size, "num_workers": 0}
    if kind == "deepar":
        train_kwargs["batch_sampler"] = "synchronized"  # deepar.ipynb
    return (
        training.to_dataloader(**train_kwargs),
        validation.to_dataloader(train=False, batch_size=batch_size, num_workers=0),
    )


def nbeats(training: Any, learning_rate: float = 1e-3) -> Any:
    """ar.ipynb: ``NBeats.from_dataset(training, learning_rate=1e-3, weight_decay=1e-2, widths=[32, 512],
    backcast_loss_ratio=1.0)`` (the tutorial's architecture)."""
    from pytorch_forecasting import NBeats

    return NBeats.from_dataset(
        training,
        learning_rate=learning_rate,
        log_interval=10,
        log_val_interval=1,
        weight_decay=1e-2,
        widths=[32, 512],
        backcast_loss_ratio=1.0,
    )


def deepar(training: Any, learning_rate: float = 1e-2) -> Any:
    """deepar.ipynb: ``hidden_size=30, rnn_layers=2, optimizer="Adam", MultivariateNormalDistributionLoss(rank=30)``."""
    from pytorch_forecasting import DeepAR
    from pytorch_forecasting.metrics import MultivariateNormalDistributionLoss

    return DeepAR.from_dataset(
        training,
        learning_rate=learning_rate,
        log_interval=10,
        log_val_interval=1,
        hidden_size=30,
        rnn_layers=2,
        optimizer="Adam",
        loss=MultivariateNormalDistributionLoss(rank=30),
    )


def tft(training: Any, learning_rate: float = 0.03) -> Any:
    """The README quickstart: ``learning_rate=0.03, hidden_size=16, attention_head_size=1, dropout=0.1,
    hidden_continuous_size=8, QuantileLoss(), reduce_on_plateau_patience=4``."""
    from pytorch_forecasting import TemporalFusionTransformer
    from pytorch_forecasting.metrics import QuantileLoss

    return TemporalFusionTransformer.from_dataset(
        training,
        learning_rate=learning_rate,
        hidden_size=16,
        attention_head_size=1,
        dropout=0.1,
        hidden_continuous_size=8,
        loss=QuantileLoss(),
        log_interval=10,
        reduce_on_plateau_patience=4,
    )


BUILDERS = {"nbeats": nbeats, "deepar": deepar, "tft": tft}


def fit_forecasting(
    root: str,
    kind: str,
    training: Any,
    validation: Any,
    *,
    learning_rate: float | None = None,
    max_epochs: int = 6,
    limit_train_batches: int = 10,
    limit_val_batches: int = 4,
    seed: int = 0,
    callbacks: list[Any] | None = None,
) -> Outcome:
    """The tutorials' ``lightning.pytorch.Trainer`` (``gradient_clip_val=0.1``, ``limit_train_batches``) with the
    suite, fewer epochs/batches."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    pl.seed_everything(seed, verbose=False)
    model = BUILDERS[kind](training) if learning_rate is None else BUILDERS[kind](training, learning_rate)
    train_dl, val_dl = _forecasting_loaders(training, validation, kind)
    callbacks = suite(FORECASTING_MONITOR) if callbacks is None else callbacks
    tracer = loss_tracer("lightning.pytorch")
    callbacks = [*callbacks, tracer]
    logger = CSVLogger(os.path.join(root, "logs"), name=kind)

    def fit() -> Any:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=max_epochs,
            gradient_clip_val=0.1,
            limit_train_batches=limit_train_batches,
            limit_val_batches=limit_val_batches,
            callbacks=callbacks,
            logger=logger,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            log_every_n_steps=10,
        )
        holder["trainer"] = trainer
        trainer.fit(model, train_dataloaders=train_dl, val_dataloaders=val_dl)
        return trainer

    holder: dict[str, Any] = {}
    outcome = _run(root, fit, callbacks, lambda: logger.log_dir)
    if "trainer" in holder:
        outcome.callbacks = list(holder["trainer"].callbacks)
    outcome.loss_history = tracer.train
    outcome.val_history = tracer.val
    return outcome


# -- pytorch-tabular ----------------------------------------------------------------------------------------------
def tabular_table(
    task: str, seed: int = 0, *, target_scale: float = 1.0
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """A scikit-learn bundled table with one categorical column (quantile bins of a feature), split 80/20.

    ``task="classification"``: ``load_breast_cancer`` (569 x 30, 2 classes). ``task="regression"``:
    ``load_diabetes`` (442 x 10) with the target standardised (as a user would, or ``target_transform``), times
    ``target_scale`` (the "unscaled targets" fault multiplies it by 1e4).
    Returns the two frames and the ``DataConfig`` arguments.
    """
    from sklearn.datasets import load_breast_cancer, load_diabetes

    if task == "classification":
        bunch = load_breast_cancer(as_frame=True)
        frame = bunch.frame.copy()
        source = "mean radius"
    else:
        bunch = load_diabetes(as_frame=True, scaled=False)
        frame = bunch.frame.copy()
        frame["target"] = (frame["target"] - frame["target"].mean()) / frame["target"].std() * target_scale
        source = "bmi"
    frame.columns = [str(c) for c in frame.columns]
    frame["bin"] = pd.qcut(frame[source], 4, labels=False).astype(str)
    continuous = [str(c) for c in bunch.feature_names]
    order = np.random.default_rng(seed).permutation(len(frame))
    cut = int(0.8 * len(frame))
    train, valid = (
        frame.iloc[order[:cut]].reset_index(drop=True),
        frame.iloc[order[cut:]].reset_index(drop=True),
    )
    config = {"target": ["target"], "continuous_cols": continuous, "categorical_cols": ["bin"]}
    return train, valid, config


def fit_tabular(
    root: str,
    task: str,
    train: pd.DataFrame,
    valid: pd.DataFrame,
    data_config: dict,
    *,
    learning_rate: float = 1e-3,
    max_epochs: int = 8,
    batch_size: int = 64,
    auto_lr_find: bool = False,
    seed: int = 0,
    callbacks: list[Any] | None = None,
) -> Outcome:
    """The pytorch-tabular quickstart: ``CategoryEmbeddingModelConfig(task, layers="1024-512-512",
    activation="LeakyReLU", learning_rate=1e-3)`` with ``OptimizerConfig()`` defaults and a ``TrainerConfig``;
    the suite passed as ``TabularModel.fit(callbacks=...)``."""
    from pytorch_tabular import TabularModel
    from pytorch_tabular.config import DataConfig, OptimizerConfig, TrainerConfig
    from pytorch_tabular.models import CategoryEmbeddingModelConfig

    callbacks = suite(TABULAR_MONITOR) if callbacks is None else callbacks
    tracer = loss_tracer("pytorch_lightning")
    callbacks = [*callbacks, tracer]
    holder: dict[str, Any] = {}

    def fit() -> Any:
        import lightning.pytorch as pl

        pl.seed_everything(seed, verbose=False)  # TabularModel draws random numbers before fit's own seeding
        model = TabularModel(
            data_config=DataConfig(**data_config),
            model_config=CategoryEmbeddingModelConfig(
                task=task, layers="1024-512-512", activation="LeakyReLU", learning_rate=learning_rate
            ),
            optimizer_config=OptimizerConfig(),
            trainer_config=TrainerConfig(
                batch_size=batch_size,
                max_epochs=max_epochs,
                auto_lr_find=auto_lr_find,
                accelerator="cpu",
                checkpoints=None,
                early_stopping=None,  # EarlyStop of the suite watches valid_loss
                progress_bar="none",
                load_best=False,
                seed=seed,
            ),
            verbose=False,
        )
        holder["model"] = model
        model.fit(train=train, validation=valid, callbacks=callbacks, seed=seed)
        return model.trainer

    def expected_dir() -> str | None:
        model = holder.get("model")
        trainer = getattr(model, "trainer", None)
        if trainer is None or not trainer.loggers:
            return None
        return str(trainer.loggers[0].log_dir)

    outcome = _run(root, fit, callbacks, expected_dir)
    model = holder.get("model")
    if model is not None and getattr(model, "trainer", None) is not None:
        outcome.callbacks = list(model.trainer.callbacks)
    outcome.loss_history = tracer.train
    outcome.val_history = tracer.val
    return outcome
