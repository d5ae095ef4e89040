"""SpeedMonitor on real Trainers: a slow loader is caught with numbers, the fixed one and a fast one are clean."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from lightning_diag import SpeedMonitor, collect_findings
from tests.helpers import Regression, find, regression_data, trainer
from tests.readers import csv_scalars

COMPUTE_S = 0.010  # each training step "computes" for 10 ms (a sleep: no CPU contention with loader workers)


class SlowData(Dataset):
    """`__getitem__` sleeps: 8 samples x 2 ms = 16 ms per batch, more than the 10 ms step."""

    def __init__(self, n: int = 256, delay_s: float = 0.002) -> None:
        self.data = regression_data(n)
        self.delay_s = delay_s

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        time.sleep(self.delay_s)
        return self.data[i]


class Busy(Regression):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        time.sleep(COMPUTE_S)
        return super().training_step(batch, batch_idx)


def fit(loader: DataLoader, tmp_path, ignore_first_steps: int = 3) -> Any:
    t = trainer(
        max_epochs=1,
        logger=CSVLogger(str(tmp_path)),
        log_every_n_steps=10,
        callbacks=[SpeedMonitor(window=20, ignore_first_steps=ignore_first_steps)],
    )
    t.fit(Busy(), loader)
    return t


def test_slow_loader_is_dataloader_bound_with_numbers(tmp_path) -> None:
    # 8 samples x 5 ms = 40 ms of waiting per batch against a 10 ms step: starved (a warning from 60%)
    t = fit(DataLoader(SlowData(delay_s=0.005), batch_size=8, num_workers=0), tmp_path)
    finding = find(collect_findings(t), "dataloader_bound")
    assert finding is not None and finding.severity == "warning", finding
    ev = finding.evidence
    assert ev["num_workers"] == 0 and ev["batch_size"] == 8 and ev["pin_memory"] == 0
    assert 30 < ev["data_wait_ms"] < 120 and 8 < ev["compute_ms"] < 40 and ev["data_share"] > 0.6
    assert any("num_workers" in a for a in finding.advice)
    series = csv_scalars(os.path.join(t.logger.log_dir, "metrics.csv"))
    assert [s for s, _ in series["diag/throughput/data_share"]] == [
        19,
        29,
    ]  # the logging steps with a full window
    assert all(v > 0.4 for _, v in series["diag/throughput/data_share"])
    samples = dict(series["diag/throughput/samples_per_sec"])
    steps = dict(series["diag/throughput/steps_per_sec"])
    assert all(samples[s] == pytest.approx(8 * steps[s]) for s in steps)


def test_enough_workers_fix_it(tmp_path) -> None:
    loader = DataLoader(SlowData(), batch_size=8, num_workers=4, persistent_workers=True, prefetch_factor=4)
    # A longer warm-up: starting 4 worker processes on a loaded 2-core machine can stall the first steps.
    t = fit(loader, tmp_path, ignore_first_steps=10)
    assert find(collect_findings(t), "dataloader_bound") is None
    series = csv_scalars(os.path.join(t.logger.log_dir, "metrics.csv"))
    assert all(v < 0.3 for _, v in series["diag/throughput/data_share"])


def test_fast_in_memory_data_is_clean(tmp_path) -> None:
    t = fit(DataLoader(regression_data(256), batch_size=8), tmp_path)
    assert collect_findings(t) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 1}, r"`window` must be >= 2, got 1"),
        ({"ignore_first_steps": -1}, r"`ignore_first_steps` must be >= 0, got -1"),
        ({"data_share": 1.0}, r"`data_share` must be in \(0, 1\), got 1\.0"),
        ({"data_share": 0}, r"`data_share` must be in \(0, 1\), got 0"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        SpeedMonitor(**kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_time_host_syncs_and_pin_memory(tmp_path) -> None:
    class Syncing(Regression):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            print(loss.item())  # a host sync every step
            return loss

    t = trainer(
        accelerator="cuda",
        max_epochs=1,
        logger=CSVLogger(str(tmp_path)),
        log_every_n_steps=10,
        callbacks=[SpeedMonitor(window=10, ignore_first_steps=2)],
    )
    t.fit(Syncing(), DataLoader(regression_data(512), batch_size=8, pin_memory=False))
    codes = {f.code for f in collect_findings(t)}
    assert {"host_sync", "dataloader_config"} <= codes
    sync = find(collect_findings(t), "host_sync")
    assert "test_speed_monitor.py" in sync.evidence["call_sites"]
    series = csv_scalars(os.path.join(t.logger.log_dir, "metrics.csv"))
    assert series["diag/throughput/device_ms"] and all(v > 0 for _, v in series["diag/throughput/device_ms"])


def test_a_large_share_of_a_tiny_step_is_not_worth_fixing() -> None:
    # 1 ms per sample would be a clear case; 0.2 ms x 8 samples against a ~1 ms step is a large share of nothing
    monitor = SpeedMonitor(window=10, ignore_first_steps=2)
    t = trainer(max_epochs=1, log_every_n_steps=5, callbacks=[monitor])
    t.fit(Regression(), DataLoader(SlowData(n=128, delay_s=0.0002), batch_size=8))
    assert find(collect_findings(t), "dataloader_bound") is None


def test_a_run_shorter_than_the_logging_interval_is_judged_at_the_end() -> None:
    monitor = SpeedMonitor(ignore_first_steps=3)
    t = trainer(max_steps=8, callbacks=[monitor])  # log_every_n_steps=50: no logging step at all
    t.fit(Regression(), DataLoader(SlowData(n=256, delay_s=0.004), batch_size=8))
    finding = find(collect_findings(t), "dataloader_bound")
    assert finding is not None and finding.step == 8
    assert finding.evidence["expected_speedup"] > 2 and "faster" in finding.message


class Stalls(Dataset):
    """Fast, except that one batch in seven stalls for 120 ms (a busy machine descheduling the process)."""

    def __init__(self, n: int = 256) -> None:
        self.data = regression_data(n)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        if i % 56 == 0:
            time.sleep(0.12)
        return self.data[i]


def test_occasional_stalls_are_not_a_bound_loader(tmp_path) -> None:
    t = fit(DataLoader(Stalls(), batch_size=8), tmp_path)
    assert find(collect_findings(t), "dataloader_bound") is None
    series = csv_scalars(os.path.join(t.logger.log_dir, "metrics.csv"))
    assert max(v for _, v in series["diag/throughput/data_wait_ms"]) > 2  # the mean sees the stalls
