"""MemoryMonitor on real CPU Trainers (the RSS path): each way of keeping memory found with its pattern and its
holder, healthy look-alikes quiet, an OOM explained by its phase and its batch, and the logs read back.

Every fit runs at the default settings (``min_growth_mib=64``); leaks are 1-3 MiB per step so they pass it in a few
dozen steps. Each test starts from a trimmed heap (:func:`fresh_heap`): RSS does not grow into memory the C
allocator kept from an earlier test.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from benchmarks.diagnosis.kit import fresh_heap
from lightning_diag import ArgumentError, MemoryMonitor
from lightning_diag.callbacks import _memory_readings
from tests.callbacks.memory_helpers import BATCH, WIDTH, Leaky, Tokens, loaders, pad
from tests.helpers import find, trainer


@pytest.fixture(autouse=True)
def _fresh_heap() -> None:
    fresh_heap()


def fit(model: Leaky, train: Any, val: Any, epochs: int = 4, **kwargs: Any) -> tuple[Any, MemoryMonitor]:
    monitor = MemoryMonitor()
    callbacks = [monitor, *kwargs.pop("callbacks", [])]
    options = {"max_epochs": epochs, "log_every_n_steps": 4, "num_sanity_val_steps": 0, **kwargs}
    t = trainer(callbacks=callbacks, **options)
    t.fit(model, train, val)
    return t, monitor


def test_a_per_step_leak_is_found_with_its_holder_and_logged(tmp_path) -> None:
    logger = CSVLogger(tmp_path, name="run")
    _, monitor = fit(Leaky("step"), *loaders(), logger=logger, default_root_dir=str(tmp_path))
    growth = find(monitor.findings, "memory_growth")
    assert growth is not None and growth.severity == "warning", monitor.findings
    ev = growth.evidence
    assert ev["pattern"] == "per_step" and ev["holder"] == "self.hist" and ev["holder_with_history"] > 20
    assert 0.7 <= ev["mib_per_step"] <= 1.6  # 32 x 8192 float32 logits per step = 1 MiB (and their graph)
    assert ev["projected_exhaustion_step"] > growth.step
    assert "`self.hist` holds" in growth.message and "autograd history" in growth.message
    with open(Path(logger.log_dir) / "metrics.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    keys = {k for row in rows for k, v in row.items() if v}
    assert {"diag/memory/baseline_mib", "diag/memory/rss_mib", "diag/memory/peak_mib"} <= keys
    baseline = [float(r["diag/memory/baseline_mib"]) for r in rows if r.get("diag/memory/baseline_mib")]
    assert baseline[-1] - baseline[2] > 50  # the logged curve shows the growth too
    report = json.loads((Path(logger.log_dir) / "diagnosis.json").read_text())
    assert report["primary"] == f"memory_growth@{growth.step}"
    page = (Path(logger.log_dir) / "diagnosis.html").read_text()
    assert 'id="memory"' in page


def test_outputs_kept_for_the_epoch_end_are_a_saw_tooth() -> None:
    # 3 MiB of logits (with their graphs) kept per step until the epoch ends (48 steps): 144 MiB at each epoch end.
    # The RSS does not go down (the C allocator keeps what the list held for the next epoch): the pattern comes
    # from the holder, emptied at the epoch end.
    _, monitor = fit(Leaky("epoch", width=3 * WIDTH), *loaders(steps=48, width=3 * WIDTH), epochs=2)
    growth = find(monitor.findings, "memory_growth")
    assert growth is not None, monitor.findings
    assert growth.evidence["pattern"] == "per_epoch" and growth.evidence["holder"] == "self.outputs"
    assert growth.evidence["mib_per_epoch"] >= 64 and "saw-tooth" in growth.message


def test_a_metric_never_reset_grows_at_each_validation() -> None:
    train, val = loaders(val=768)  # 768 x 8192 float32 predictions = 24 MiB per validation run
    _, monitor = fit(Leaky("validation"), train, val, epochs=5)
    growth = find(monitor.findings, "memory_growth")
    assert growth is not None, monitor.findings
    assert (
        growth.evidence["pattern"] == "at_validation" and growth.evidence["holder"] == "self.val_preds.value"
    )
    # 24 MiB of predictions per run, as much again for the concatenation `compute()` caches, and the RSS's own
    # rounding (freed blocks too small for the next, larger concatenation)
    assert 16 <= growth.evidence["mib_per_validation"] <= 96
    assert "reset()" in growth.advice[0]


def healthy_cache() -> tuple[Leaky, DataLoader, DataLoader, dict[str, Any]]:
    # 24 batches x 4 MiB of detached logits cached in epoch 0: 96 MiB of growth that stops
    return Leaky("cache", width=4 * WIDTH), *loaders(width=4 * WIDTH), {}


def healthy_variable_lengths() -> tuple[Leaky, DataLoader, DataLoader, dict[str, Any]]:
    train = DataLoader(Tokens(24 * BATCH, 8, 256), batch_size=BATCH, shuffle=True, collate_fn=pad)
    val = DataLoader(Tokens(256, 8, 256, seed=1), batch_size=64, collate_fn=pad)
    return Leaky(noise=True), train, val, {}


def healthy_workers_checkpoints_validation(
    tmp_path: Path,
) -> tuple[Leaky, DataLoader, DataLoader, dict[str, Any]]:
    # non-persistent workers restart every epoch; a checkpoint every epoch; validation batches 16x training's
    train, val = loaders(val=1024, val_batch=512, num_workers=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)
    return Leaky(width=4 * WIDTH), train, val, {"callbacks": [ckpt], "enable_checkpointing": True}


@pytest.mark.parametrize("build", ["cache", "variable_lengths", "workers_checkpoints_validation"])
def test_healthy_look_alikes_stay_quiet(build, tmp_path) -> None:
    if build == "cache":
        model, train, val, kwargs = healthy_cache()
    elif build == "variable_lengths":
        model, train, val, kwargs = healthy_variable_lengths()
    else:
        model, train, val, kwargs = healthy_workers_checkpoints_validation(tmp_path)
    _, monitor = fit(model, train, val, epochs=4, **kwargs)
    assert not [f for f in monitor.findings if f.severity != "info"], monitor.findings


def test_an_oom_at_one_long_batch_names_the_phase_and_the_ratio(tmp_path) -> None:
    dataset = Tokens(24 * BATCH, 16, 48, long_at=400, long=384)  # one sample 12x longer than the median
    train = DataLoader(dataset, batch_size=BATCH, collate_fn=pad)
    val = DataLoader(Tokens(64, 16, 48), batch_size=BATCH, collate_fn=pad)
    t = trainer(
        max_epochs=2, num_sanity_val_steps=0, default_root_dir=str(tmp_path), callbacks=[MemoryMonitor()]
    )
    with pytest.raises(torch.OutOfMemoryError):
        t.fit(Leaky(oom_above=64), train, val)
    (monitor,) = [c for c in t.callbacks if isinstance(c, MemoryMonitor)]
    oom = find(monitor.findings, "out_of_memory")
    assert oom is not None and oom.severity == "error" and oom.step == 400 // BATCH
    ev = oom.evidence
    assert ev["phase"] == "forward" and "the forward pass" in oom.message
    assert 6 <= ev["batch_ratio"] <= 12 and ev["batch_shapes"].startswith("batch[0]: 32x384x16")
    assert oom.advice[0].startswith(f"This batch is {ev['batch_ratio']:.1f}x the median one")
    report = json.loads((tmp_path / "diagnosis.json").read_text())
    assert report["summary"]["status"] == "failed" and report["primary"] == f"out_of_memory@{oom.step}"
    assert 'class="marker oom"' in (tmp_path / "diagnosis.html").read_text()


@pytest.mark.parametrize("phase", ["backward", "optimizer step", "validation"])
def test_the_oom_phase_is_the_one_it_died_in(phase) -> None:
    step = 4 if phase == "validation" else 3  # validation runs after 4 steps
    t = trainer(max_epochs=1, num_sanity_val_steps=0, val_check_interval=4, callbacks=[MemoryMonitor()])
    with pytest.raises(torch.OutOfMemoryError):
        t.fit(Leaky(oom=(phase, step)), *loaders(steps=8, val=64))
    (monitor,) = [c for c in t.callbacks if isinstance(c, MemoryMonitor)]
    oom = find(monitor.findings, "out_of_memory")
    assert oom is not None and oom.evidence["phase"] == phase
    if phase == "validation":  # compared with the validation batches before it (none: the first run)
        assert "first batch of its kind" in oom.message


def test_an_oom_after_a_leak_is_caused_by_it(tmp_path) -> None:
    t = trainer(
        max_epochs=4,
        log_every_n_steps=4,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        callbacks=[MemoryMonitor()],
    )
    # 3 MiB kept per step; dies at step 40 of the first epoch, before the growth was reported (its holder was
    # found, but whether the epoch end gives the memory back was still to be seen)
    with pytest.raises(torch.OutOfMemoryError):
        t.fit(Leaky("step", width=3 * WIDTH, oom=("forward", 40)), *loaders(steps=48, width=3 * WIDTH))
    report = json.loads((tmp_path / "diagnosis.json").read_text())
    by_code = {f["code"]: f for f in report["findings"]}
    assert {"memory_growth", "out_of_memory"} <= set(by_code), report["findings"]
    assert by_code["out_of_memory"]["caused_by"] == by_code["memory_growth"]["id"]
    assert report["primary"] == by_code["memory_growth"]["id"]
    assert any("self.hist" in a for a in by_code["out_of_memory"]["advice"])


def test_a_device_without_counters_is_declined(monkeypatch) -> None:
    monkeypatch.setattr(_memory_readings, "reader_for", lambda device, capacity=None: None)
    monitor = MemoryMonitor()
    t = trainer(max_epochs=1, callbacks=[monitor])
    with pytest.warns(UserWarning, match="no memory counters"):
        t.fit(Leaky(), *loaders(steps=4, val=32))
    assert [f.code for f in monitor.findings] == ["declined"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_points": 4}, "`min_points` must be >= 8"),
        ({"min_growth_mib": 0}, "`min_growth_mib` must be > 0"),
        ({"capacity_mib": -1.0}, "`capacity_mib` must be > 0"),
        ({"ignore_first_steps": -3}, "`ignore_first_steps` must be >= 0"),
    ],
)
def test_arguments_are_checked(kwargs, match) -> None:
    with pytest.raises(ArgumentError, match=match):
        MemoryMonitor(**kwargs)


# -- a CUDA device (not run on the CPU machines) -----------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_leak_fragmentation_and_a_real_oom_without_a_sync(tmp_path) -> None:
    """On a GPU, under ``set_sync_debug_mode("error")`` on quiet steps: a per-step leak found with its holder and a
    projected exhaustion close to the real one (a capacity set with ``set_per_process_memory_fraction``);
    fragmentation reported without ``expandable_segments`` and not with it (a subprocess each); a real OOM by
    growing the batch, explained by its phase and batch ratio."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "memory_cuda.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    results = {}
    for case in ("leak", "fragmentation", "fragmentation_expandable", "oom"):
        out = tmp_path / f"{case}.json"
        case_env = dict(env)
        if case == "fragmentation_expandable":
            case_env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        subprocess.run([sys.executable, str(script), case, str(out)], env=case_env, check=True, timeout=600)
        results[case] = json.loads(out.read_text())
    leak = results["leak"]
    assert leak["growth"]["pattern"] == "per_step" and leak["growth"]["holder"] == "self.hist"
    assert leak["real_oom_step"] is not None
    assert (
        abs(leak["growth"]["projected_exhaustion_step"] - leak["real_oom_step"])
        <= 0.1 * leak["real_oom_step"]
    )
    assert "memory_fragmentation" in results["fragmentation"]["codes"]
    assert "memory_fragmentation" not in results["fragmentation_expandable"]["codes"]
    oom = results["oom"]["out_of_memory"]
    assert oom["phase"] in ("forward", "backward") and oom["batch_ratio"] > 1.5
