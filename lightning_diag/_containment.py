"""Containment of lightning_diag's own bugs: an unexpected exception in a hook never ends the user's run.

:func:`contain_hooks` wraps the Lightning hooks of a callback class. When a wrapped hook raises an exception that
lightning_diag did not raise on purpose, the callback records an ``internal_error`` finding (callback, hook,
exception and traceback in the evidence), warns once, disables itself for the rest of the fit and returns as if
the hook had done nothing; the run goes on without it, and the report (``diagnosis.json``) is still written.

Passed through unchanged:

* what lightning_diag raises on purpose: subclasses of :class:`Deliberate` (``SanityCheckError``,
  ``NonFiniteError``, setup-time refusals such as :class:`~lightning_diag._validation.ConfigurationError`) and
  Lightning's ``MisconfigurationException``;
* ``BaseException`` s that are not ``Exception`` s (``KeyboardInterrupt``, ``SystemExit``);
* everything, when the environment variable ``LIGHTNING_DIAG_STRICT`` is ``1`` (the test suite sets it, so tests
  see our bugs);
* everything under distributed training (``world_size > 1``), after recording the finding: a rank that went on
  alone would wait forever in the next collective of the others.

An error in ``on_exception`` itself is recorded and swallowed: the user sees their own exception, not ours.

A disabled callback's hooks do nothing, except what the owner asks for through ``_when_disabled`` (the
end-of-run report, the findings in ``state_dict``). The next ``setup("fit")`` enables it again.
:class:`Contained` is the mixin that applies all of this to every subclass (``DiagCallback`` derives from it).
"""

from __future__ import annotations

import functools
import os
import traceback
import warnings
import weakref
from collections.abc import Callable
from typing import Any

from lightning.pytorch.callbacks import Callback

from lightning_diag.errors import Deliberate, LightningDiagWarning
from lightning_diag.findings import Finding

__all__ = [
    "STRICT_ENV",
    "Contained",
    "Deliberate",
    "contain_hooks",
    "disabled_hook",
    "is_deliberate",
    "is_disabled",
    "strict",
]

STRICT_ENV = "LIGHTNING_DIAG_STRICT"

#: The hooks that are wrapped: every hook of Lightning's Callback, plus the state methods.
HOOKS: tuple[str, ...] = tuple(
    sorted(
        name
        for name in dir(Callback)
        if (name.startswith("on_") or name in ("setup", "teardown", "state_dict", "load_state_dict"))
        and callable(getattr(Callback, name))
    )
)
#: Hooks whose first argument is not the Trainer.
_NO_TRAINER = ("state_dict", "load_state_dict")
#: Characters of the traceback kept in the finding's evidence (the end, where the error is).
TRACEBACK_CHARS = 4000


def strict() -> bool:
    """Whether ``LIGHTNING_DIAG_STRICT`` asks for internal errors to be raised (``1``, ``true``, ``yes``, ``on``)."""
    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def is_deliberate(exc: BaseException) -> bool:
    """An exception raised on purpose (or one that is not ours to hold back)."""
    from lightning_diag._lightning import misconfiguration_errors

    return not isinstance(exc, Exception) or isinstance(exc, (Deliberate, *misconfiguration_errors()))


class _State:
    """Per-instance containment state (out of ``state_dict``; a pickle or copy of the callback starts fresh)."""

    __slots__ = ("disabled", "hook", "trainer_id", "trainer_ref")

    def __init__(self) -> None:
        self.disabled = False
        self.hook = ""
        self.trainer_id = 0
        self.trainer_ref: Callable[[], Any] | None = None  # weak: the last Trainer a hook was called with

    def __reduce__(self) -> tuple[Any, ...]:
        return (_State, ())

    def remember(self, trainer: Any) -> None:
        if id(trainer) != self.trainer_id:
            self.trainer_id = id(trainer)
            try:
                self.trainer_ref = weakref.ref(trainer)
            except TypeError:  # a stand-in object in tests
                self.trainer_ref = None

    def trainer(self) -> Any:
        return self.trainer_ref() if self.trainer_ref is not None else None


def _state(callback: Any) -> _State:
    state = callback.__dict__.get("_containment")
    if state is None:
        state = _State()
        callback.__dict__["_containment"] = state
    return state


def is_disabled(callback: Any) -> bool:
    """Whether ``callback`` disabled itself after an internal error during the current fit."""
    state = callback.__dict__.get("_containment")
    return bool(state is not None and state.disabled)


def disabled_hook(callback: Any) -> str:
    """The hook whose internal error disabled ``callback`` (``""`` when it is enabled)."""
    state = callback.__dict__.get("_containment")
    return state.hook if state is not None and state.disabled else ""


def contain_hooks(cls: type) -> type:
    """Wrap every Lightning hook ``cls`` defines or inherits (not Lightning's no-op defaults); returns ``cls``.

    Idempotent, and safe to call on subclasses of an already wrapped class (each override is wrapped once).
    """
    for name in HOOKS:
        method = getattr(cls, name, None)
        if method is None or method is getattr(Callback, name, None):
            continue
        if getattr(method, "__lightning_diag_contained__", False):
            continue
        setattr(cls, name, _wrap(name, method))
    return cls


def _wrap(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def hook(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = _state(self)
        trainer = None if name in _NO_TRAINER or not args else args[0]
        if name == "setup" and _stage(args, kwargs) == "fit":
            state.disabled = False  # a new fit: the callback gets another chance
        if state.disabled:
            return _when_disabled(self, name, args, kwargs)
        if trainer is not None:
            state.remember(trainer)
        try:
            return method(self, *args, **kwargs)
        except BaseException as exc:
            if is_deliberate(exc) or strict():
                raise
            _record(self, name, trainer, exc)
            if trainer is not None and _int(trainer, "world_size", 1) > 1:
                raise
            return _when_disabled(self, name, args, kwargs)

    hook.__lightning_diag_contained__ = True  # type: ignore[attr-defined]
    return hook


def _stage(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if "stage" in kwargs:
        return kwargs["stage"]
    return args[2] if len(args) > 2 else None


def _int(obj: Any, attr: str, default: int = 0) -> int:
    try:
        return int(getattr(obj, attr))
    except Exception:
        return default


def _when_disabled(callback: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    fallback = getattr(callback, "_when_disabled", None)
    if fallback is not None:
        try:
            return fallback(name, *args, **kwargs)
        except Exception:
            if strict():
                raise
    return {} if name == "state_dict" else None


def _record(callback: Any, hook: str, trainer: Any, exc: BaseException) -> None:
    state = _state(callback)
    state.disabled = True
    state.hook = hook
    who = type(callback).__name__
    known = trainer if trainer is not None else state.trainer()
    step, epoch = _int(known, "global_step"), _int(known, "current_epoch")
    error = f"{type(exc).__name__}: {exc}"
    message = (
        f"{who} disabled itself for the rest of the fit after an internal error in `{hook}` at step {step}: "
        f"{error[:300]}. The run went on without it."
    )
    distributed = trainer is not None and _int(trainer, "world_size", 1) > 1
    if distributed:
        message = message.replace(
            "The run went on without it.",
            "Under distributed training the error is raised (a rank going on alone would wait forever).",
        )
    evidence = {
        "callback": who,
        "hook": hook,
        "exception": error[:1000],
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[
            -TRACEBACK_CHARS:
        ],
    }
    finding = Finding(
        code="internal_error",
        severity="warning",
        message=message,
        step=step,
        epoch=epoch,
        evidence=evidence,  # type: ignore[arg-type]
        advice=[
            "This is a bug in lightning_diag, not in your code: please report it with the traceback from "
            "diagnosis.json.",
            f"Set {STRICT_ENV}=1 to make internal errors raise instead (for debugging).",
        ],
        source=who,
    )
    log = getattr(callback, "_finding_log", None)
    if log is not None:
        log.record(finding, key=f"internal_error:{hook}")
    if trainer is None or getattr(trainer, "is_global_zero", True):
        warnings.warn(message, LightningDiagWarning, stacklevel=3)


class Contained:
    """Mixin: every subclass has its hooks wrapped by :func:`contain_hooks`; disabled, it still reports.

    Meant for classes that also derive from :class:`~lightning_diag.DiagCallback`'s parts: ``_finish_run`` (the
    end-of-run report) and ``_findings_state`` are used when present.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        contain_hooks(cls)

    def _when_disabled(self, hook: str, *args: Any, **kwargs: Any) -> Any:
        """What a disabled callback still does: write the report at the end of the fit, keep its findings."""
        finish = getattr(self, "_finish_run", None)
        if hook == "on_fit_end" and finish is not None:
            finish(args[0], "finished")
        elif hook == "on_exception" and finish is not None:
            exception = args[2] if len(args) > 2 else kwargs.get("exception")
            status = "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed"
            finish(args[0], status, error=f"{type(exception).__name__}: {exception}")
        elif hook == "state_dict":
            findings = getattr(self, "_findings_state", None)
            return {"findings": findings()} if findings is not None else {}
        return None
