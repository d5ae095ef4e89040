"""Eager argument checks with uniform messages.

Every check raises :class:`ArgumentError` (``"`{name}` must be {constraint}, got {value!r}."``) so users see the
argument, the rule and what they passed, at construction time rather than deep inside a fit. ``ArgumentError`` is
a ``ValueError`` and Lightning's ``MisconfigurationException``, so code written for either catches it; setup-time
refusals (a Trainer or model the callback cannot work with) raise its parent :class:`ConfigurationError`. Both
are deliberate: the hook containment (:mod:`lightning_diag._containment`) lets them through.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lightning_diag.errors import (
    ArgumentError,
    ConfigurationError,
    LightningDiagDeprecationWarning,
    MissingMetricError,
)

__all__ = [
    "ArgumentError",
    "ConfigurationError",
    "MissingMetricError",
    "Unused",
    "check_bool",
    "check_choice",
    "check_exclusive",
    "check_fraction",
    "check_ignored",
    "check_int",
    "check_key",
    "check_number",
    "check_order",
    "check_positive",
    "check_range",
    "check_unused",
    "renamed",
]


def _fail(name: str, constraint: str, value: Any, hint: str = "") -> ArgumentError:
    message = f"`{name}` must be {constraint}, got {value!r}."
    if hint:
        message += f" {hint}"
    return ArgumentError(message)


def check_bool(name: str, value: Any, *, optional: bool = False) -> bool | None:
    """A real ``bool`` (``None`` too when ``optional``): ``'no'`` or ``1`` would silently mean something."""
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        return_type = "True, False or None" if optional else "True or False"
        raise _fail(name, return_type, value)
    return value


def check_key(name: str, value: Any) -> str:
    """A non-empty metric key."""
    if not isinstance(value, str) or not value:
        raise _fail(name, "a non-empty metric key", value)
    return value


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
) -> float:
    """A number in the interval from ``low`` to ``high`` (either end may be open or absent)."""
    number = check_number(name, value, allow_inf=allow_inf)
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if too_low or too_high:
        if high is None:
            constraint = f"{'>' if low_open else '>='} {low:g}"
        elif low is None:
            constraint = f"{'<' if high_open else '<='} {high:g}"
        else:
            constraint = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise _fail(name, constraint, value)
    return number


def check_order(
    low_name: str, low: float | None, high_name: str, high: float | None, *, strict: bool = True
) -> None:
    """``low < high`` (``<=`` unless ``strict``) when both are given: two bounds that contradict each other."""
    if low is None or high is None:
        return
    if low > high or (strict and low == high):
        relation = "below" if strict else "at most"
        raise ArgumentError(
            f"`{low_name}` ({low!r}) must be {relation} `{high_name}` ({high!r}): the two contradict each other."
        )


def check_ignored(name: str, value: Any, default: Any, *, because: str, unless: str = "") -> None:
    """Refuse an argument set away from its default where the chosen mode never reads it.

    ``because`` names the deciding argument and its value (e.g. ``"`check_spikes=False`"``); ``unless`` says what
    would make ``name`` count.
    """
    if value == default and isinstance(value, bool) == isinstance(default, bool):
        return
    message = f"`{name}={value!r}` has no effect with {because}: remove it"
    message += f", or {unless}." if unless else "."
    raise ArgumentError(message)


@dataclasses.dataclass(frozen=True)
class Unused:
    """A row of a callback's table of arguments that have no effect: ``names`` are ignored when ``when(args)``.

    ``because`` names the deciding argument and its value (a string, or a function of the arguments for a text
    that depends on them); ``unless`` says what would make the arguments count.
    """

    names: tuple[str, ...]
    when: Callable[[Mapping[str, Any]], bool]
    because: str | Callable[[Mapping[str, Any]], str]
    unless: str = ""


def check_unused(init: Callable[..., Any], given: Mapping[str, Any], table: Iterable[Unused]) -> None:
    """The one "has no effect" rule: refuse every argument set away from its default (read from ``init``'s
    signature) where a row of ``table`` says the chosen settings never read it.

    Example:
        >>> def init(mode="a", size=1): ...
        >>> table = [Unused(("size",), lambda a: a["mode"] != "b", lambda a: f"`mode={a['mode']!r}`", "use 'b'")]
        >>> check_unused(init, {"mode": "a", "size": 1}, table)  # the default: fine
        >>> check_unused(init, {"mode": "a", "size": 2}, table)
        Traceback (most recent call last):
        ...
        lightning_diag.errors.ArgumentError: `size=2` has no effect with `mode='a'`: remove it, or use 'b'.
    """
    defaults = {
        name: p.default
        for name, p in inspect.signature(init).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    for row in table:
        if not row.when(given):
            continue
        because = row.because(given) if callable(row.because) else row.because
        for name in row.names:
            check_ignored(name, given[name], defaults[name], because=because, unless=row.unless)


_RENAMES_WARNED: set[tuple[str, str]] = set()


def renamed(init: Callable[..., Any], given: Mapping[str, Any], old: str, new: str) -> Any:
    """The value of the argument ``new`` of ``init``, which used to be called ``old``: the old name keeps working
    for one release with a :class:`~lightning_diag.LightningDiagDeprecationWarning` (once per process and name);
    both names at once is an error. ``given`` holds both (``locals()``); ``old`` is ``None`` when not used.
    """
    old_value, new_value = given[old], given[new]
    if old_value is None:
        return new_value
    owner = init.__qualname__.split(".")[0]
    if getattr(given.get("self"), "renamed_arguments", {}).get(old) != new:
        raise AssertionError(f"{owner}.renamed_arguments must map {old!r} to {new!r}")  # our own bug
    if new_value != inspect.signature(init).parameters[new].default:
        raise ArgumentError(
            f"`{old}` is the old name of `{new}`: pass only `{new}` (got `{old}={old_value!r}` and "
            f"`{new}={new_value!r}`)."
        )
    if (owner, old) not in _RENAMES_WARNED:
        _RENAMES_WARNED.add((owner, old))
        warnings.warn(
            f"{owner}(`{old}`) is deprecated and will be removed in the next release: use `{new}` instead.",
            LightningDiagDeprecationWarning,
            stacklevel=3,
        )
    return old_value


def check_number(name: str, value: Any, *, allow_inf: bool = False) -> float:
    """A real number (``bool`` is refused); NaN always refused, infinities only when ``allow_inf``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(name, "a number", value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise _fail(name, "a finite number", value)
    return float(value)


def check_positive(name: str, value: Any, *, strict: bool = True, allow_inf: bool = False) -> float:
    """A number ``> 0`` (``strict``) or ``>= 0``."""
    number = check_number(name, value, allow_inf=allow_inf)
    if number < 0 or (strict and number == 0):
        raise _fail(name, "> 0" if strict else ">= 0", value)
    return number


def check_fraction(name: str, value: Any, *, low_open: bool = False, high_open: bool = False) -> float:
    """A number in ``[0, 1]``; either end may be excluded."""
    number = check_number(name, value)
    too_low = number <= 0 if low_open else number < 0
    too_high = number >= 1 if high_open else number > 1
    if too_low or too_high:
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise _fail(name, f"in {interval}", value)
    return number


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """An ``int`` (not ``bool``), optionally ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(name, "an int", value)
    if minimum is not None and value < minimum:
        raise _fail(name, f">= {minimum}", value)
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """One of ``choices`` (LightningCLI already refuses others at parse time through ``Literal``)."""
    options = tuple(choices)
    if value not in options:
        raise _fail(name, "one of " + ", ".join(repr(c) for c in options), value)
    return str(value)


def check_exclusive(**named: Any) -> None:
    """At most one of the keyword arguments is not ``None``."""
    given = [name for name, value in named.items() if value is not None]
    if len(given) > 1:
        listed = ", ".join(f"`{n}`={named[n]!r}" for n in given)
        raise ArgumentError(f"Pass at most one of {', '.join(f'`{n}`' for n in named)}, got {listed}.")
