"""HangWatchdog's machinery: heartbeats, the watchdog thread, faulthandler's timer, the files they write, and
``action="raise"``'s signal. The readings (frames, worker pids, step times) are in :mod:`._hang_readings`.

Nothing here touches Lightning: HangWatchdog calls :meth:`Watch.beat` from its hooks and hears back from the
watchdog thread through the functions it hands to :class:`Watch`.

Two detectors, because neither sees everything:

* **The watchdog thread** (Python) wakes every ``poll_s`` and compares the time since the last heartbeat with the
  budget of the phase in progress. It runs whenever the training thread releases the GIL: sleeps, collectives,
  DataLoader waits, CUDA synchronisations, file I/O. On expiry it writes every thread's stack, with source lines,
  to ``hang_rank<r>.txt`` and calls ``on_hang``.
* **faulthandler's timer** (C): ``faulthandler.dump_traceback_later`` starts a C thread that writes every thread's
  Python stack *without the GIL*, so the dump appears even while a C call holds the GIL and no Python thread can
  run. Its deadline is kept between ``budget + slack`` and ``budget + 2 * slack`` after the latest heartbeat
  (``slack = max(budget / 10, 2 polls)``) and re-armed from the heartbeat only when it leaves that window (a
  re-arm starts a C thread: ~20 µs): phases that share a budget re-arm once per ``slack`` seconds of progress, not
  once per heartbeat. It fires after the watchdog thread would have, so it writes only when that thread could not;
  the thread notices the dump later (the file grew) and reports it.

A process has one faulthandler timer. lightning_diag wraps ``faulthandler.dump_traceback_later`` and
``cancel_dump_traceback_later`` when it is imported (transparent wrappers that note who armed the timer), so a timer
armed by other code after that import (pytest's ``faulthandler_timeout``, a script's own) is known and never
displaced: the watch then runs without it (:meth:`Watch.start` says so). A timer armed before ``import lightning_diag``, or
through a reference to the function taken before it, cannot be seen.

Under DDP every rank's watchdog thread writes ``heartbeat_rank<r>.json`` (its heartbeat count, step, phase) into the
directory every poll, so the rank that fires reads where every other rank is without a collective: the stuck path
never waits on another rank. A rank whose interpreter is blocked stops updating its file, which shows too.
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import json
import math
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple

from lightning_diag import _lightning
from lightning_diag.callbacks._hang_readings import describe_frames, faulthandler_frames, worker_pids
from lightning_diag.core.hangs import PHASES, HangEvent, PhaseBudgets, RankBeat, rank_behind
from lightning_diag.errors import TrainingHangError

__all__ = ["Heartbeat", "RaiseOnHang", "Watch", "poll_seconds"]

# -- the process's one faulthandler timer ---------------------------------------------------------------------

_LOCK = threading.Lock()
_ARM: Callable[..., Any] = getattr(
    faulthandler.dump_traceback_later, "__wrapped__", faulthandler.dump_traceback_later
)
_CANCEL: Callable[..., Any] = getattr(
    faulthandler.cancel_dump_traceback_later, "__wrapped__", faulthandler.cancel_dump_traceback_later
)


class _Lease:
    owner: object | None = None
    foreign = False  # a timer armed by other code and not cancelled since
    displaced = False  # other code armed or cancelled the timer while a watch held it


_LEASE = _Lease()


@functools.wraps(_ARM)
def _arm_by_others(*args: Any, **kwargs: Any) -> Any:
    with _LOCK:
        _LEASE.foreign = True
        _LEASE.displaced = _LEASE.owner is not None
        return _ARM(*args, **kwargs)


@functools.wraps(_CANCEL)
def _cancel_by_others(*args: Any, **kwargs: Any) -> Any:
    with _LOCK:
        _LEASE.foreign = False
        _LEASE.displaced = _LEASE.displaced or _LEASE.owner is not None
        return _CANCEL(*args, **kwargs)


if not hasattr(faulthandler.dump_traceback_later, "__wrapped__"):
    faulthandler.dump_traceback_later = _arm_by_others
    faulthandler.cancel_dump_traceback_later = _cancel_by_others


# -- heartbeats and the watch ---------------------------------------------------------------------------------


class Heartbeat(NamedTuple):
    """The phase in progress: its key, when it began (``time.monotonic``), its budget, the step, a counter."""

    phase: str
    at: float
    budget: float
    step: int
    beat: int


_PAUSES = frozenset({"val_first", "val", "val_end", "epoch_end", "checkpoint"})


class Watch:
    """The heartbeats of one fit, its watchdog thread and its faulthandler timer.

    ``on_hang(heartbeat, waited_s, detected_by, frames, blocked_s)`` and ``on_resumed(heartbeat, after_s)`` are
    called from the watchdog thread and from the training thread (at the next heartbeat) respectively;
    ``on_second_timeout(heartbeat, waited_s)`` from the watchdog thread when a reported hang lasts two budgets.
    """

    def __init__(
        self,
        budgets: PhaseBudgets,
        *,
        directory: str,
        rank: int,
        world_size: int,
        poll_s: float,
        on_hang: Callable[..., None],
        on_resumed: Callable[[Heartbeat, float], None],
        on_second_timeout: Callable[[Heartbeat, float], None] | None = None,
        on_displaced: Callable[[], None] | None = None,
    ) -> None:
        self.budgets = budgets
        self.directory = directory
        self.rank, self.world_size = rank, world_size
        self.poll_s = poll_s
        self.on_hang, self.on_resumed, self.on_second_timeout = on_hang, on_resumed, on_second_timeout
        self.on_displaced = on_displaced
        self.dump_path = os.path.join(directory, f"hang_rank{rank}.txt")
        self.beat_path = os.path.join(directory, f"heartbeat_rank{rank}.json")
        self.hb = self.prev = Heartbeat("startup", time.monotonic(), budgets.budget("startup"), 0, 0)
        self.timer = False
        self.armed_until = 0.0
        self.pending = False  # the watchdog thread has news for the training thread
        self.stalled: Heartbeat | None = None
        self.raised = False
        self.error: BaseException | None = None
        self.displaced = False
        self.paused_s = 0.0  # seconds spent in validation and checkpoint saves
        self.paused_by = ""
        self.thread_ident = threading.get_ident()
        self._file: Any = None
        self._known_size = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_wake = 0.0

    # -- life cycle ---------------------------------------------------------------------------------------
    def start(self, *, use_timer: bool) -> str | None:
        """Open the dump file, arm the timer (when free and ``use_timer``) and start the thread. Returns why the
        timer is not used (``"held"``, ``"foreign"``), else ``None``; raises ``OSError`` for an unwritable directory.
        """
        os.makedirs(self.directory, exist_ok=True)
        self._file = open(self.dump_path, "a", encoding="utf-8")  # noqa: SIM115 (open until stop(): the C timer writes to it)
        self._known_size = os.fstat(self._file.fileno()).st_size
        reason = None
        with _LOCK:
            if use_timer:
                reason = "held" if _LEASE.owner is not None else "foreign" if _LEASE.foreign else None
                if reason is None:
                    _LEASE.owner, _LEASE.displaced = self, False
                    self.timer = True
        self.hb = self.prev = Heartbeat("startup", time.monotonic(), self.budgets.budget("startup"), 0, 0)
        self._rearm(self.hb.at, self.hb.budget)
        self._last_wake = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="lightning_diag-HangWatchdog", daemon=True)
        self._thread.start()
        return reason

    def stop(self) -> None:
        """Stop the thread, cancel the timer, close the files (an empty dump file and this rank's heartbeat file
        are removed). Idempotent; safe on any exit path.
        """
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5 * self.poll_s, 1.0))
        with _LOCK:
            if _LEASE.owner is self:
                if not _LEASE.displaced:
                    _CANCEL()
                _LEASE.owner = None
        self.timer = False
        if self._file is not None:
            self._file.close()
            self._file = None
            with contextlib.suppress(OSError):
                if os.path.getsize(self.dump_path) == 0:
                    os.remove(self.dump_path)
        with contextlib.suppress(OSError):
            os.remove(self.beat_path)

    # -- the training thread's path (microseconds) ----------------------------------------------------------
    def beat(self, phase: str, step: int = -1) -> float:
        """Enter ``phase``; returns the seconds spent in the phase that ends."""
        now = time.monotonic()
        hb = self.hb
        elapsed = now - hb.at
        self.budgets.observe(hb.phase, elapsed)
        if hb.phase in _PAUSES:
            self.paused_s += elapsed
            self.paused_by = hb.phase
        budget = self.budgets.budget(phase)
        self.prev = hb
        self.hb = Heartbeat(phase, now, budget, hb.step if step < 0 else step, hb.beat + 1)
        if self.timer:
            slack = max(0.1 * budget, 2 * self.poll_s)
            if not now + budget + slack <= self.armed_until <= now + budget + 2 * slack:
                self._rearm(now, budget)
        if self.pending:
            self._attend(now)
        return elapsed

    def _rearm(self, now: float, budget: float) -> None:
        if not self.timer:
            return
        deadline = now + budget + 2 * max(0.1 * budget, 2 * self.poll_s)
        with _LOCK:
            if _LEASE.owner is not self or _LEASE.displaced:
                self.timer, self.displaced, self.pending = False, True, True
                return
            _ARM(max(deadline - time.monotonic(), 0.001), file=self._file)
        self.armed_until = deadline

    def _attend(self, now: float) -> None:
        """News from the watchdog thread, handled in the training thread: its error, or a reported hang that ended."""
        self.pending = False
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        if self.displaced and self.on_displaced is not None:
            on_displaced, self.on_displaced = self.on_displaced, None
            on_displaced()
        stalled = self.stalled
        if stalled is not None and self.hb.beat > stalled.beat:
            ended = now if self.prev.beat == stalled.beat else self.prev.at
            self.stalled, self.raised = None, False
            self.on_resumed(stalled, ended - stalled.at)

    # -- the watchdog thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._check(time.monotonic())
            except Exception as error:  # reported in the training thread at its next heartbeat
                self.error, self.pending = error, True
                return

    def _check(self, now: float) -> None:
        blocked_s = now - self._last_wake - self.poll_s  # how long this thread could not run
        self._last_wake = now
        hb = self.hb
        if self.timer and _LEASE.displaced:  # other code armed or cancelled the timer: it is theirs now
            self.timer, self.displaced, self.pending = False, True, True
        if self.world_size > 1:
            self._write_beat(hb, now)
        if self.timer and self._dump_grew():
            self._timer_fired(now, blocked_s)
            return
        if self.stalled is None:
            waited = now - hb.at
            if waited <= hb.budget:
                return
            self._cancel_timer()
            if self.hb is not hb:  # it moved on meanwhile
                return
            frames = self._training_frames()
            self._write_dump(self._header(hb, waited))
            self.stalled, self.pending = hb, True
            self.on_hang(hb, waited, "watchdog thread", frames, 0.0)
        elif self.stalled is hb and not self.raised and now - hb.at > 2 * hb.budget:
            self.raised = True
            if self.on_second_timeout is not None:
                self.on_second_timeout(hb, now - hb.at)

    def _cancel_timer(self) -> None:
        with _LOCK:
            if _LEASE.owner is self and not _LEASE.displaced:
                _CANCEL()
        self.armed_until = 0.0

    def _dump_grew(self) -> bool:
        return self._file is not None and os.fstat(self._file.fileno()).st_size > self._known_size

    def _timer_fired(self, now: float, blocked_s: float) -> None:
        """Faulthandler's C timer wrote a dump: the watchdog thread could not run in time. Report it."""
        fired_at = now - max(time.time() - os.fstat(self._file.fileno()).st_mtime, 0.0)
        self._known_size = os.fstat(self._file.fileno()).st_size
        self.armed_until = 0.0  # spent (repeat=False): the next heartbeat re-arms it
        stuck = self.hb if self.hb.at <= fired_at else self.prev
        with open(self.dump_path, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
        frames = faulthandler_frames(text, self.thread_ident)
        waited = fired_at - stuck.at
        note = (
            f"==== lightning_diag HangWatchdog: faulthandler's timer wrote the dump above: no progress for "
            f"{waited:.1f} s in `{PHASES.get(stuck.phase, stuck.phase)}` at step {stuck.step} (budget {stuck.budget:.3g} s)"
        )
        if blocked_s > self.poll_s:
            note += f"; the watchdog thread could not run for {blocked_s:.1f} s (a C call held the GIL)"
        self._write_dump(note + " ====\n", stacks=False)
        if self.hb is stuck:  # still stuck, now that this thread runs: add the stacks with source lines
            self._write_dump(self._header(stuck, now - stuck.at))
        self.stalled, self.pending = stuck, True
        self.on_hang(stuck, waited, "faulthandler timer", frames, max(blocked_s, 0.0))

    # -- files ----------------------------------------------------------------------------------------------
    def _header(self, hb: Heartbeat, waited: float) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        return (
            f"==== lightning_diag HangWatchdog: rank {self.rank}, pid {os.getpid()}, {stamp} ====\n"
            f"No progress for {waited:.1f} s in `{PHASES.get(hb.phase, hb.phase)}` at step {hb.step} "
            f"(budget {hb.budget:.3g} s). Every thread's stack, most recent call last:\n"
        )

    def _write_dump(self, header: str, *, stacks: bool = True) -> None:
        parts = [header]
        if stacks:
            threads = _lightning.thread_stacks()
            for ident in sorted(threads, key=lambda i: i != self.thread_ident):  # the training thread first
                name, frames = threads[ident]
                role = ", the training thread" if ident == self.thread_ident else ""
                parts.append(f"\nThread {name} (0x{ident:016x}{role}):\n")
                parts.extend(traceback.format_list(frames))
            parts.append("\n")
        self._file.write("".join(parts))
        self._file.flush()
        self._known_size = os.fstat(self._file.fileno()).st_size

    def _training_frames(self) -> list[tuple[str, int, str, str]]:
        """The training thread's frames, innermost first: ``(file, line, function, code)``."""
        stack = _lightning.thread_stacks().get(self.thread_ident)
        if stack is None:
            return []
        return [(f.filename, f.lineno or 0, f.name, (f.line or "").strip()) for f in reversed(stack[1])]

    def _write_beat(self, hb: Heartbeat, now: float) -> None:
        wall = time.time()
        data = {
            "rank": self.rank,
            "beats": hb.beat,
            "step": hb.step,
            "phase": hb.phase,
            "since": wall - (now - hb.at),
            "written": wall,
            "pid": os.getpid(),
        }
        tmp = f"{self.beat_path}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle)
        os.replace(tmp, self.beat_path)

    def read_beats(self) -> list[RankBeat]:
        """Every rank's heartbeat (this rank's from memory, the others' from their files)."""
        wall, now = time.time(), time.monotonic()
        beats = [RankBeat(self.rank, self.hb.beat, self.hb.step, self.hb.phase, now - self.hb.at, 0.0)]
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            try:
                with open(
                    os.path.join(self.directory, f"heartbeat_rank{rank}.json"), encoding="utf-8"
                ) as handle:
                    d = json.load(handle)
            except (OSError, ValueError):
                continue
            beats.append(
                RankBeat(
                    rank,
                    int(d["beats"]),
                    int(d["step"]),
                    str(d["phase"]),
                    wall - d["since"],
                    wall - d["written"],
                )
            )
        return beats

    def hang_event(
        self,
        hb: Heartbeat,
        waited: float,
        detected_by: str,
        frames: list[tuple[str, int, str, str]],
        blocked_s: float,
        action: str,
    ) -> HangEvent:
        """Everything the ``training_hang`` finding says about the heartbeat ``hb`` that overran its budget."""
        main_frame, user_frame = describe_frames(frames)
        behind, ranks = rank_behind(self.read_beats(), self.world_size) if self.world_size > 1 else (None, "")
        return HangEvent(
            phase=hb.phase,
            step=hb.step,
            waited_s=waited,
            budget_s=hb.budget,
            budget_rule=self.budgets.explain(hb.phase),
            budget_argument=self.budgets.argument_for(hb.phase),
            main_frame=main_frame,
            user_frame=user_frame,
            dump=self.dump_path,
            rank=self.rank,
            world_size=self.world_size,
            rank_behind=behind,
            ranks=ranks,
            detected_by=detected_by,
            worker_pids=worker_pids() if hb.phase in ("data", "data_first") else (),
            action=action,
            blocked_s=blocked_s,
        )


# -- action="raise" -------------------------------------------------------------------------------------------


class RaiseOnHang:
    """Raise :class:`~lightning_diag.errors.TrainingHangError` in the training thread from the watchdog thread.

    The training thread must be the main thread (Python runs signal handlers there): ``install`` puts a handler on
    ``SIGUSR2`` and ``fire`` sends that signal to the main thread with ``pthread_kill``, which also interrupts a
    blocking system call (sleep, lock, queue wait), so the handler runs at once. A C call that does not return to
    the interpreter (a collective waiting in C++, a GIL-holding call) delays the exception until it returns.
    """

    signum = getattr(signal, "SIGUSR2", None)

    def __init__(self) -> None:
        self.message = ""
        self._previous: Any = None
        self._installed = False

    def install(self) -> str | None:
        """Install the handler; returns why it cannot be (``None``: installed)."""
        if self.signum is None or not hasattr(signal, "pthread_kill"):
            return "this platform has no SIGUSR2/pthread_kill"
        if threading.current_thread() is not threading.main_thread():
            return "fit does not run in the main thread (signal handlers run only there)"
        previous = signal.getsignal(self.signum)
        if previous not in (signal.SIG_DFL, None):
            return f"SIGUSR2 already has a handler ({previous!r})"
        self._previous = signal.signal(self.signum, self._handle)
        self._installed = True
        return None

    def _handle(self, _signum: int, _frame: Any) -> None:
        if self.message:  # not withdrawn: the run did not resume in between
            raise TrainingHangError(self.message)

    def fire(self, message: str) -> None:
        if self._installed and self.signum is not None:
            self.message = message
            signal.pthread_kill(threading.main_thread().ident or 0, self.signum)

    def withdraw(self) -> None:
        """The run resumed: a signal still in flight raises nothing."""
        self.message = ""

    def restore(self) -> None:
        self.message = ""
        if self._installed and self.signum is not None:
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False


def poll_seconds(smallest_budget_s: float) -> float:
    """How often the watchdog thread wakes: a twentieth of the smallest budget, between 20 ms and 1 s."""
    return min(max(smallest_budget_s / 20.0, 0.02), 1.0) if math.isfinite(smallest_budget_s) else 1.0
