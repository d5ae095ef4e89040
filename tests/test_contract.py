"""One contract for every Callback exported by lightning_diag (driven by a registry of default arguments).

Each exported callback must: build from the registry (a missing entry fails), pickle, have a distinct
``state_key`` per setting, fit with ``logger=False``, round-trip its state through a real checkpoint
(``weights_only``) and decide the same afterwards, and parse from LightningCLI YAML by short class name.
"""

from __future__ import annotations

import copy
import inspect
import math
import pickle
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

import lightning_diag
from tests.helpers import Regression, loader, trainer

#: Settings per exported callback: the first is the plain default use, each other one differs in its state_key.
REGISTRY: dict[str, list[dict[str, Any]]] = {
    "ActivationMonitor": [{}, {"check_every_n_steps": 2, "layer_share": 0.25, "patience": 1}],
    "EarlyStop": [
        {"monitor": "val_loss", "patience": 2},
        {"monitor": "val_loss", "mode": "max", "patience": 1},
    ],
    "GradClip": [
        {"max_norm": 1.0},
        {"algorithm": "zscore", "zscore_warmup_steps": 3},
        {"algorithm": "autoclip", "percentile": 50.0},
    ],
    "GradNormMonitor": [{}, {"group_by": "parameter", "exploding_threshold": 0.5}],
    "HangWatchdog": [{}, {"action": "raise", "min_timeout_s": 30.0, "step_timeout_s": 60.0}],
    "MemoryMonitor": [{}, {"min_growth_mib": 16.0, "capacity_mib": 4096.0, "ignore_first_steps": 2}],
    "NaNGuard": [{}, {"action": "rollback", "spike_action": "skip", "snapshot_every_n_steps": 3}],
    "OverfitDetector": [{}, {"action": "stop", "patience": 2, "chance_loss": 1.0}],
    "SanityCheck": [{}, {"fail_on": "never", "num_batches": 2, "overfit_batch_steps": 5}],
    "SilentBugDetector": [{}, {"check_every_n_steps": 2, "patience": 1, "check_replicas": False}],
    "SpeedMonitor": [{"window": 4, "ignore_first_steps": 1}, {"window": 8, "data_share": 0.5}],
    "WarmupCosine": [{"warmup_steps": 2}, {"warmup_ratio": 0.1, "num_cycles": 2, "min_lr_ratio": 0.1}],
}
#: Exported base classes that are not meant to be used on their own.
BASES = {"DiagCallback"}

EXPORTED = sorted(
    name
    for name in lightning_diag.__all__
    if inspect.isclass(getattr(lightning_diag, name)) and issubclass(getattr(lightning_diag, name), Callback)
)
CASES = [(name, i) for name in EXPORTED if name not in BASES for i in range(len(REGISTRY.get(name, [{}])))]


def build(name: str, index: int = 0) -> Callback:
    return getattr(lightning_diag, name)(**REGISTRY[name][index])


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b) or torch.allclose(a, b, equal_nan=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=False))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def test_registry_covers_every_exported_callback() -> None:
    assert EXPORTED, "lightning_diag exports no Callback"
    missing = [n for n in EXPORTED if n not in BASES and n not in REGISTRY]
    assert not missing, f"add default arguments for {missing} to REGISTRY in tests/test_contract.py"
    # one sorted list, in ruff's isort-style order (RUF022): SCREAMING_CASE constants, then the other names
    order = sorted(lightning_diag.__all__, key=lambda n: (not (n.isupper() and len(n) > 1), n))
    assert lightning_diag.__all__ == order


@pytest.mark.parametrize(("name", "index"), CASES)
def test_builds_and_pickles(name: str, index: int) -> None:
    callback = build(name, index)
    clone = pickle.loads(pickle.dumps(callback))
    assert type(clone) is type(callback) and clone.state_key == callback.state_key
    assert copy.deepcopy(callback).state_key == callback.state_key


@pytest.mark.parametrize("name", [n for n in EXPORTED if n not in BASES])
def test_state_key_differs_per_setting(name: str, tmp_path) -> None:
    keys = {build(name, i).state_key for i in range(len(REGISTRY[name]))}
    assert len(keys) == len(REGISTRY[name])
    # every setting in one Trainer: each keeps its own entry in the checkpoint
    callbacks = [build(name, i) for i in range(len(REGISTRY[name]))]
    t = trainer(max_epochs=1, callbacks=callbacks)
    t.fit(Regression(), loader(n=32), loader(n=16))
    path = str(tmp_path / "both.ckpt")
    t.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["callbacks"]
    assert keys <= set(saved)


@pytest.mark.parametrize(("name", "index"), CASES)
def test_fits_without_a_logger(name: str, index: int) -> None:
    t = trainer(max_epochs=2, logger=False, callbacks=[build(name, index)])
    t.fit(Regression(), loader(n=32), loader(n=16))
    assert t.state.finished


@pytest.mark.parametrize(("name", "index"), CASES)
def test_state_round_trip_decides_the_same(name: str, index: int, tmp_path) -> None:
    straight = build(name, index)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    trainer(max_epochs=4, enable_checkpointing=True, callbacks=[straight, ckpt]).fit(
        Regression(), loader(n=32), loader(n=16)
    )
    path = tmp_path / "epoch=0.ckpt"
    state = torch.load(path, weights_only=True)["callbacks"][straight.state_key]  # weights_only-safe

    loaded = build(name, index)
    loaded.load_state_dict(copy.deepcopy(state))
    assert same(loaded.state_dict(), state)
    build(name, index).load_state_dict({})  # tolerates missing keys

    resumed = build(name, index)
    trainer(max_epochs=4, callbacks=[resumed]).fit(
        Regression(), loader(n=32), loader(n=16), ckpt_path=str(path)
    )
    assert same(resumed.state_dict(), straight.state_dict())


@pytest.mark.parametrize(("name", "index"), CASES)
def test_parses_from_lightning_cli_yaml(name: str, index: int, tmp_path) -> None:
    config = {
        "trainer": {
            "logger": False,
            "max_epochs": 1,
            "callbacks": [{"class_path": name, "init_args": REGISTRY[name][index]}],
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(Regression, run=False, args=["--config", str(path)])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, getattr(lightning_diag, name))]
    for key, value in REGISTRY[name][index].items():
        assert getattr(callback, key) == value


@pytest.mark.parametrize(
    ("name", "init_args"),
    [
        ("WarmupCosine", {"interval": "batch"}),
        ("EarlyStop", {"monitor": "val_loss", "mode": "avg"}),
        ("NaNGuard", {"action": "ignore"}),
    ],
)
def test_cli_rejects_a_bad_choice_at_parse_time(
    name: str, init_args: dict[str, Any], tmp_path, capsys
) -> None:
    config = {"trainer": {"logger": False, "callbacks": [{"class_path": name, "init_args": init_args}]}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        LightningCLI(Regression, run=False, args=["--config", str(path)])
    assert "trainer.callbacks" in capsys.readouterr().err
