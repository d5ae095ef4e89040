"""HangWatchdog on real Trainers: hangs dumped and reported while stuck (also under a GIL-holding C call and in
2-process DDP, naming the rank behind), healthy slow phases within their budgets stay quiet, uneven batches are
refused before they hang, stragglers are named with their cause, and nothing is left behind after a fit.

Every test is bounded: in-process fits by pytest-timeout and sleeps of a few seconds, subprocesses by timeouts.
Budgets are shortened (``min_timeout_s=1``), and each hang test prints its detection time against its budget.
"""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import torch
from lightning.pytorch.plugins import TorchCheckpointIO
from torch.utils.data import DataLoader, Dataset

from lightning_diag import HangWatchdog, LightningDiagWarning, TrainingHangError, collect_findings
from lightning_diag.callbacks import _hang_watch
from tests.helpers import Regression, find, loader, regression_data, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AT = 6  # the step at which the run blocks


def report(name: str, finding: Any) -> None:
    """Print the detection time against the budget (read by the PR notes; `pytest -s`)."""
    ev = finding.evidence
    print(
        f"\nDETECTION {name}: {ev['waited_s']:.2f} s waited, budget {ev['budget_s']:.2f} s, by {ev['detected_by']}"
    )


class Sleepy(Regression):
    """`training_step` blocks for ``seconds`` at step ``AT`` (in Python: the GIL is released)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.report_seen: dict[str, Any] | None = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == AT:
            time.sleep(self.seconds)
            path = os.path.join(self.trainer.default_root_dir, "diagnosis.json")
            if os.path.exists(path):  # written by the watchdog thread while this step was stuck
                with open(path) as handle:
                    self.report_seen = json.load(handle)
        return super().training_step(batch, batch_idx)


def test_sleeping_training_step_is_dumped_and_reported_while_stuck(tmp_path) -> None:
    model = Sleepy(3.0)
    t = trainer(max_epochs=1, default_root_dir=str(tmp_path), callbacks=[HangWatchdog(min_timeout_s=1.0)])
    t.fit(model, loader(n=128))
    # the report written during the hang: status hung, the hang as primary error
    seen = model.report_seen
    assert seen is not None and seen["summary"]["status"] == "hung"
    (entry,) = seen["findings"]
    assert (
        entry["code"] == "training_hang" and entry["severity"] == "error" and seen["primary"] == entry["id"]
    )
    # at the end: the same finding, now a warning that says the run resumed
    finding = find(collect_findings(t), "training_hang")
    ev = finding.evidence
    assert finding.severity == "warning" and finding.step == AT
    assert ev["phase"] == "training step" and ev["detected_by"] == "watchdog thread"
    assert "time.sleep(self.seconds)" in ev["main_frame"] and "test_hang_watchdog.py" in ev["main_frame"]
    assert 1.0 <= ev["waited_s"] < 1.6 and ev["budget_s"] == 1.0 and 2.9 < ev["resumed_after_s"] < 3.6
    dump = (tmp_path / "hang_rank0.txt").read_text()
    assert "the training thread" in dump and "in training_step" in dump and "time.sleep(self.seconds)" in dump
    assert "lightning_diag-HangWatchdog" in dump  # every thread, the watchdog's own too
    assert not (tmp_path / "heartbeat_rank0.json").exists()
    report("training step sleeps", finding)


def test_gil_holding_c_call_still_dumps_while_stuck(tmp_path) -> None:
    """The process is stuck in libc's sleep with the GIL held: no Python thread runs, the dump appears anyway."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = os.path.join(ROOT, "tests", "scripts", "hang_gil.py")
    proc = subprocess.Popen(
        [sys.executable, script, str(tmp_path), "120"],
        env=env,
        cwd=str(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    dump = tmp_path / "root" / "hang_rank0.txt"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and "in training_step" not in (
            dump.read_text() if dump.exists() else ""
        ):
            assert proc.poll() is None, "the run ended instead of blocking"
            time.sleep(0.1)
        text = dump.read_text()
        assert proc.poll() is None  # still stuck in the C call
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert text.startswith("Timeout (")  # written by faulthandler's C thread
    assert 'hang_gil.py", line' in text and "in training_step" in text
    assert not (
        tmp_path / "root" / "diagnosis.json"
    ).exists()  # the Python thread never ran: no report (documented)
    detected = dump.stat().st_mtime - float((tmp_path / "stuck_at").read_text())
    print(f"\nDETECTION GIL-holding C call (subprocess): dump {detected:.2f} s after the call, budget 1.00 s")
    assert 1.0 <= detected < 3.0


def test_gil_holding_call_that_returns_is_reported_from_the_timer_dump(tmp_path) -> None:
    import ctypes

    class Blocks(Regression):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if self.global_step == AT:
                ctypes.PyDLL(None).sleep(3)  # GIL held for 3 s
            return super().training_step(batch, batch_idx)

    t = trainer(max_epochs=1, default_root_dir=str(tmp_path), callbacks=[HangWatchdog(min_timeout_s=1.0)])
    t.fit(Blocks(), loader(n=128))
    finding = find(collect_findings(t), "training_hang")
    ev = finding.evidence
    assert ev["detected_by"] == "faulthandler timer" and ev["interpreter_blocked_s"] > 2.0
    assert ev["phase"] == "training step" and "ctypes.PyDLL(None).sleep(3)" in ev["main_frame"]
    assert finding.severity == "warning" and "could not run" in finding.message
    text = (tmp_path / "hang_rank0.txt").read_text()
    assert text.startswith("Timeout (") and "faulthandler's timer wrote the dump above" in text
    report("GIL-holding C call (in process, returns after 3 s)", finding)


class SlowItem(Dataset):
    """Sample ``slow`` blocks for ``seconds`` in ``__getitem__``."""

    def __init__(self, slow: int, seconds: float) -> None:
        self.data = regression_data(128)
        self.slow, self.seconds = slow, seconds

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        if i == self.slow:
            time.sleep(self.seconds)
        return self.data[i]


@pytest.mark.parametrize("workers", [0, 1])
def test_blocking_getitem_is_waiting_for_data(workers: int, tmp_path) -> None:
    data = DataLoader(SlowItem(8 * 10, 3.0), batch_size=8, num_workers=workers)
    t = trainer(max_epochs=1, default_root_dir=str(tmp_path), callbacks=[HangWatchdog(min_timeout_s=1.0)])
    t.fit(Regression(), data)
    finding = find(collect_findings(t), "training_hang")
    ev = finding.evidence
    assert ev["phase"] == "waiting for data" and finding.step == 10
    if workers == 0:  # the training thread itself is in __getitem__
        assert "time.sleep(self.seconds)" in ev["main_frame"]
    else:  # it waits on the worker's queue (a select() under the DataLoader); the worker process is named
        assert "torch/utils/data/dataloader.py" in (tmp_path / "hang_rank0.txt").read_text()
        assert ev["worker_pids"] and all(int(pid) > 0 for pid in str(ev["worker_pids"]).split(", "))
        assert "py-spy dump" in " ".join(finding.advice)
    report(f"__getitem__ blocks, num_workers={workers}", finding)


SLOW_S = 1.6  # each slow phase takes 1.6x the training steps' 1 s budget


class SlowSave(TorchCheckpointIO):
    """A checkpoint write on a slow filesystem."""

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        time.sleep(SLOW_S)
        super().save_checkpoint(*args, **kwargs)


class SlowStartAndValidation(Regression):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == 0:
            time.sleep(SLOW_S)  # compilation, warm-up
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        time.sleep(SLOW_S if batch_idx == 1 else 0.0)
        super().validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        time.sleep(SLOW_S)  # a metric over the whole validation set

    def on_train_epoch_end(self) -> None:
        time.sleep(SLOW_S)  # epoch-end bookkeeping


def test_slow_first_step_validation_and_checkpoint_within_their_budgets_are_quiet(tmp_path) -> None:
    """Each slow phase is 1.6x the training steps' 1 s budget, but within its own: the first step's, the sanity
    check's and the first save's (first_step_timeout_s), then the learned ones (5 x 1.6 s), and the epoch ends'
    (never learned: first_step_timeout_s)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    watchdog = HangWatchdog(min_timeout_s=1.0, first_step_timeout_s=8.0)
    t = trainer(
        max_epochs=2,
        default_root_dir=str(tmp_path),
        enable_checkpointing=True,
        plugins=[SlowSave()],
        callbacks=[watchdog, ModelCheckpoint(dirpath=str(tmp_path), save_top_k=-1)],
    )
    t.fit(SlowStartAndValidation(), loader(n=64), loader(n=16))
    assert find(collect_findings(t), "training_hang") is None
    budgets = watchdog._budgets
    assert (
        budgets.budget("step") == 1.0 and budgets.budget("val") >= 7.5 and budgets.budget("checkpoint") >= 7.5
    )
    assert budgets.budget("val_end") == budgets.budget("epoch_end") == 8.0
    assert not list(tmp_path.glob("hang_rank*.txt"))


def test_action_raise_raises_in_the_training_thread_after_a_second_budget(tmp_path) -> None:
    t = trainer(
        max_epochs=1,
        default_root_dir=str(tmp_path),
        callbacks=[HangWatchdog(action="raise", min_timeout_s=1.0)],
    )
    start = time.monotonic()
    with pytest.raises(TrainingHangError, match=r"no progress for 2\.\d s in `training step` at step 6"):
        t.fit(Sleepy(30.0), loader(n=128))
    assert time.monotonic() - start < 10  # not the 30 s sleep
    finding = find(collect_findings(t), "training_hang")
    assert finding.severity == "error"
    with open(tmp_path / "diagnosis.json") as handle:
        final = json.load(handle)
    assert final["summary"]["status"] == "failed" and "TrainingHangError" in final["summary"]["error"]
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL  # the handler is gone again


def test_a_faulthandler_timer_armed_by_other_code_is_left_alone(tmp_path) -> None:
    theirs = tmp_path / "theirs.txt"
    with open(theirs, "w") as handle:
        faulthandler.dump_traceback_later(4.0, file=handle)  # e.g. pytest's faulthandler_timeout
        try:
            t = trainer(
                max_epochs=1, default_root_dir=str(tmp_path), callbacks=[HangWatchdog(min_timeout_s=1.0)]
            )
            with pytest.warns(LightningDiagWarning, match="faulthandler timer armed by other code"):
                t.fit(Regression(), loader(n=64))
            (declined,) = [f for f in collect_findings(t) if f.code == "declined"]
            assert declined.evidence["reason"] == "faulthandler_timer"
            deadline = time.monotonic() + 8
            while "Timeout" not in theirs.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert "Timeout (0:00:04)!" in theirs.read_text()  # their timer still fired: not displaced
        finally:
            faulthandler.cancel_dump_traceback_later()


def test_a_timer_armed_during_the_fit_makes_the_watchdog_step_aside(tmp_path) -> None:
    theirs = tmp_path / "theirs.txt"

    class ArmsItsOwn(Regression):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if self.global_step == 3:
                faulthandler.dump_traceback_later(60.0, file=self.handle)
            return super().training_step(batch, batch_idx)

    model = ArmsItsOwn()
    with open(theirs, "w") as model.handle:
        try:
            t = trainer(
                max_epochs=1, default_root_dir=str(tmp_path), callbacks=[HangWatchdog(min_timeout_s=1.0)]
            )
            with pytest.warns(LightningDiagWarning, match="faulthandler timer armed by other code"):
                t.fit(model, loader(n=64))
            assert _hang_watch._LEASE.foreign  # theirs is still armed: our teardown did not cancel it
        finally:
            faulthandler.cancel_dump_traceback_later()
    assert not _hang_watch._LEASE.foreign


def test_two_watchdogs_share_the_timer_and_nothing_is_left_after_fit(tmp_path) -> None:
    callbacks = [HangWatchdog(min_timeout_s=1.0), HangWatchdog(min_timeout_s=2.0)]
    before = list(gc.callbacks)
    t = trainer(max_epochs=1, default_root_dir=str(tmp_path), callbacks=callbacks)
    held = []
    t.fit(Watched(held), loader(n=64))
    assert held == [(True, False)]  # the first holds the process's one timer, the second runs without it
    assert not callbacks[0].findings and not callbacks[1].findings
    assert _hang_watch._LEASE.owner is None and gc.callbacks == before
    assert not any(n.startswith("lightning_diag") for n in _thread_names())
    assert not list(tmp_path.glob("hang_rank*")) and not list(tmp_path.glob("heartbeat_rank*"))


class Watched(Regression):
    def __init__(self, held: list[tuple[bool, bool]]) -> None:
        super().__init__()
        self.held = held

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == 2:
            watchers = [c for c in self.trainer.callbacks if isinstance(c, HangWatchdog)]
            self.held.append(tuple(w._watch.timer for w in watchers))
            assert sum(n.startswith("lightning_diag") for n in _thread_names()) == 2
        return super().training_step(batch, batch_idx)


def test_an_exception_in_the_run_stops_the_watch(tmp_path) -> None:
    class Fails(Regression):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if self.global_step == 3:
                raise RuntimeError("user bug")
            return super().training_step(batch, batch_idx)

    t = trainer(max_epochs=1, default_root_dir=str(tmp_path), callbacks=[HangWatchdog(min_timeout_s=1.0)])
    with pytest.raises(RuntimeError, match="user bug"):
        t.fit(Fails(), loader(n=64))
    assert _hang_watch._LEASE.owner is None and not any(
        n.startswith("lightning_diag") for n in _thread_names()
    )


def _thread_names() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate()]


class Garbage(Regression):
    """Every 10th step leaves a large cyclic garbage behind and collects it: a long GC pause."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx % 10 == 5:
            for _ in range(200_000):
                a: list[Any] = []
                a.append(a)
            gc.collect()
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("collects", [True, False])
def test_step_time_outliers_name_garbage_collection(collects: bool, tmp_path) -> None:
    t = trainer(max_epochs=1, log_every_n_steps=50, callbacks=[HangWatchdog()])
    t.fit(Garbage() if collects else Regression(), loader(n=8 * 160))
    finding = find(collect_findings(t), "step_time_outlier")
    if not collects:
        assert finding is None
        return
    assert finding.severity == "info" and finding.evidence["outliers"] >= 5
    assert finding.evidence["causes"].startswith("garbage collection")
    assert "gc.freeze()" in finding.advice[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"action": "stop"}, "`action` must be one of 'warn', 'raise'"),
        ({"min_timeout_s": 0}, "`min_timeout_s` must be > 0"),
        ({"min_timeout_s": 100.0, "max_timeout_s": 10.0}, "contradict"),
        ({"safety_factor": 0.5}, "`safety_factor` must be >= 1"),
        ({"step_timeout_s": -1.0}, "`step_timeout_s` must be > 0"),
        ({"straggler_threshold": 1.0}, r"`straggler_threshold` must be in \(0, 1\)"),
        ({"check_stragglers": False, "patience": 5}, "has no effect with `check_stragglers=False`"),
    ],
)
def test_arguments_are_checked(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HangWatchdog(**kwargs)


# -- 2-process DDP over gloo ----------------------------------------------------------------------------------


def _dist(mode: str, out: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("LOCAL_RANK", None)
    script = os.path.join(ROOT, "tests", "scripts", "hang_dist.py")
    return subprocess.Popen(
        [sys.executable, script, mode, str(out)],
        env=env,
        cwd=str(out),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError("the DDP run did not finish:\n" + output[-3000:]) from None
    assert proc.returncode == 0, output[-3000:]
    return output


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_ddp_rank_1_blocks_both_ranks_dump_and_the_report_names_rank_1(tmp_path) -> None:
    proc = _dist("hang", tmp_path)
    root = tmp_path / "hang-root0"
    hung = None
    deadline = time.monotonic() + 150
    while hung is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            report_ = json.loads((root / "diagnosis.json").read_text())
        except (OSError, ValueError):
            continue
        hung = report_ if report_["summary"]["status"] == "hung" else None
    _finish(proc, 150)
    assert hung is not None, "no diagnosis.json with status hung was written while the ranks were stuck"
    (entry,) = hung["findings"]
    assert (
        entry["code"] == "training_hang"
        and entry["severity"] == "error"
        and entry["evidence"]["rank_behind"] == 1
    )
    assert entry["evidence"]["phase"] == "backward"  # rank 0 waits in the gradient all-reduce
    assert entry["message"].startswith("Rank 1 is behind: rank 0 has waited for it")
    for rank in (0, 1):  # both ranks dumped into rank 0's log directory
        text = (root / f"hang_rank{rank}.txt").read_text()
        assert "the training thread" in text
    assert "time.sleep(HANG_S)" in (root / "hang_rank1.txt").read_text()
    r1 = json.loads((tmp_path / "hang-rank1.json").read_text())["hang"]
    (own,) = [f for f in r1["findings"] if f["code"] == "training_hang"]
    assert own["evidence"]["phase"] == "training step" and own["evidence"]["rank_behind"] == 1
    r0 = json.loads((tmp_path / "hang-rank0.json").read_text())["hang"]
    (final,) = [f for f in r0["findings"] if f["code"] == "training_hang"]
    assert final["severity"] == "warning" and final["evidence"]["resumed_after_s"] > 6.0
    assert not list(root.glob("heartbeat_rank*.json"))  # cleaned up at the end
    for name, f in (("rank 0 (waits in backward)", final), ("rank 1 (sleeps)", own)):
        print(
            f"\nDETECTION DDP {name}: {f['evidence']['waited_s']:.2f} s waited, budget {f['evidence']['budget_s']:.2f} s"
        )


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_ddp_uneven_batches_are_refused_and_stragglers_are_named(tmp_path) -> None:
    _finish(_dist("checks", tmp_path), 200)
    ranks = [json.loads((tmp_path / f"checks-rank{r}.json").read_text()) for r in (0, 1)]
    for run in ranks:
        uneven = run["uneven"]
        assert uneven["raised"] and "rank 0: 8, rank 1: 9" in uneven["raised"] and uneven["global_step"] == 0
        assert [f["code"] for f in uneven["findings"]] == ["uneven_batches"]
        for scenario, cause in (("compute", "compute"), ("input", "input")):
            (f,) = [f for f in run[scenario]["findings"] if f["code"] == "straggler"]
            assert f["evidence"]["rank"] == 1 and f["evidence"]["cause"] == cause, f["message"]
            assert f["severity"] == "warning" and f["evidence"]["score"] > 0.3
        assert not [f for f in run["balanced"]["findings"] if f["code"] == "straggler"]
    report_ = json.loads((tmp_path / "uneven-root0" / "diagnosis.json").read_text())
    assert report_["summary"]["status"] == "failed" and report_["findings"][0]["code"] == "uneven_batches"


# -- GPU ------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_side_sleep_then_item_shows_the_item_line(tmp_path) -> None:
    class DeviceWait(Regression):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            if self.global_step == AT:
                torch.cuda._sleep(int(3.0 * 1.5e9))  # ~2-3 s of device cycles
                self.waited = loss.item()  # the host blocks here, in a CUDA synchronisation
            return loss

    t = trainer(
        accelerator="cuda",
        max_epochs=1,
        default_root_dir=str(tmp_path),
        callbacks=[HangWatchdog(min_timeout_s=1.0)],
    )
    t.fit(DeviceWait(), loader(n=128))
    finding = find(collect_findings(t), "training_hang")
    assert finding is not None and finding.evidence["phase"] == "training step"
    assert "loss.item()" in finding.evidence["main_frame"]
    assert "self.waited = loss.item()" in (tmp_path / "hang_rank0.txt").read_text()
    report("device-side sleep then .item() (CUDA)", finding)
