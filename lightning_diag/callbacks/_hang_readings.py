"""Where HangWatchdog's run is and how long its steps take: the training thread's frames (from the interpreter or
from a faulthandler dump), the DataLoader worker pids, and :class:`StepTimer`, the step times the outlier and
straggler rules judge.

Nothing here touches Lightning or the faulthandler timer (that is :mod:`._hang_watch`): plain reads of frames, files,
child processes and clocks, called from the watchdog thread on a hang or from HangWatchdog's hooks.
"""

from __future__ import annotations

import contextlib
import gc
import linecache
import multiprocessing
import os
import re
import statistics
import sysconfig
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_diag.callbacks._hang_watch import Watch
    from lightning_diag.core.hangs import StepOutliers

__all__ = ["StepTimer", "describe_frames", "faulthandler_frames", "worker_pids"]

_AFTER = {"checkpoint": "a checkpoint save", "epoch_end": "the end of an epoch"}
_LIBRARY = tuple(
    os.path.normpath(p) + os.sep
    for p in {
        *(sysconfig.get_paths().get(k, "") for k in ("stdlib", "platstdlib", "purelib", "platlib")),
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    }
    if p
)


class StepTimer:
    """What the step-time rules need, measured from the heartbeats: each step's time from one training batch start
    to the next minus the validation and checkpoint saves in between, its data wait, its forward time (training
    step phase) and the garbage collector's pauses inside it (timed through ``gc.callbacks`` while installed).
    The first batch of each epoch (worker start-up) is left out.
    """

    def __init__(self, outliers: StepOutliers | None, stragglers: bool) -> None:
        self.outliers = outliers
        self.stragglers = stragglers
        #: per step since the last :meth:`medians`: data wait, forward, step time (ms) for the straggler rule
        self.samples: tuple[list[float], list[float], list[float]] = ([], [], [])
        self.first_in_epoch = True
        self._last_start: float | None = None
        self._last_step = 0
        self._paused_at_start = 0.0
        self._gc_s = self._gc_started = self._gc_at_start = 0.0

    def install(self) -> None:
        if self.outliers is not None:
            gc.callbacks.append(self._on_gc)

    def uninstall(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self._gc_s += time.perf_counter() - self._gc_started

    def batch_start(self, watch: Watch, before: str, elapsed: float) -> None:
        """A training batch started (its heartbeat just ran): account for the step that ended."""
        now = watch.hb.at
        if self._last_start is not None and not self.first_in_epoch:
            step_s = now - self._last_start - (watch.paused_s - self._paused_at_start)
            data_s = elapsed if before == "data" else 0.0
            if self.outliers is not None and watch.budgets.warm:
                after = ""
                if watch.paused_s > self._paused_at_start:
                    after = _AFTER.get(watch.paused_by, "validation")
                self.outliers.add(self._last_step, step_s, data_s, self._gc_s - self._gc_at_start, after)
            if before == "data" and self.stragglers:
                self.samples[0].append(data_s * 1e3)
                self.samples[2].append(step_s * 1e3)
        self.first_in_epoch = False
        self._last_start, self._paused_at_start, self._gc_at_start = now, watch.paused_s, self._gc_s
        self._last_step = watch.hb.step

    def forward(self, before: str, elapsed: float) -> None:
        """The backward pass started: ``elapsed`` was the training step phase (forward and loss)."""
        if before == "step" and self.stragglers:
            self.samples[1].append(elapsed * 1e3)

    def medians(self) -> list[float]:
        """``[data wait, forward, step time (ms), steps]`` medians since the last call (zeros without steps)."""
        data, forward, step = self.samples
        row = [statistics.median(s) if s else 0.0 for s in (data, forward, step)]
        row.append(float(min(len(data), len(forward))))
        for samples in self.samples:
            samples.clear()
        return row


def worker_pids() -> tuple[int, ...]:
    """Child processes started through ``multiprocessing`` (DataLoader workers among them)."""
    return tuple(p.pid for p in multiprocessing.active_children() if p.pid is not None)


def describe_frames(frames: list[tuple[str, int, str, str]]) -> tuple[str, str]:
    """``(innermost frame, innermost frame of the user's own code)`` as ``file:line in function: `code```."""
    if not frames:
        return "an unknown place (no Python frame)", ""
    user = next((f for f in frames if not os.path.normpath(f[0]).startswith(_LIBRARY)), None)
    return _where(frames[0]), _where(user) if user is not None else ""


def _where(frame: tuple[str, int, str, str]) -> str:
    path, line, name, code = frame
    for prefix in _LIBRARY:
        if path.startswith(prefix):
            path = path[len(prefix) :]
            break
    else:
        with contextlib.suppress(ValueError):
            relative = os.path.relpath(path)
            path = relative if not relative.startswith("..") else path
    text = f"{path}:{line} in {name}"
    code = code if len(code) <= 100 else code[:97] + "..."
    return f"{text}: `{code}`" if code else text


_FH_THREAD = re.compile(r"^(?:Current thread|Thread) (0x[0-9a-f]+) \(most recent call first\):$")
_FH_FRAME = re.compile(r'^\s+File "(.*)", line (\d+) in (.*)$')


def faulthandler_frames(text: str, ident: int) -> list[tuple[str, int, str, str]]:
    """The frames of thread ``ident`` in the last faulthandler dump of ``text``, innermost first."""
    frames: list[tuple[str, int, str, str]] = []
    current = None
    for line in text.splitlines():
        if line.startswith("Timeout ("):
            frames, current = [], None  # a later dump replaces an earlier one
            continue
        match = _FH_THREAD.match(line)
        if match:
            current = int(match.group(1), 16)
            continue
        frame = _FH_FRAME.match(line)
        if frame and current == ident:
            path, number = frame.group(1), int(frame.group(2))
            frames.append((path, number, frame.group(3), linecache.getline(path, number).strip()))
    return frames
