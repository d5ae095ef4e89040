"""Eager argument checks with uniform messages.

Every check raises ``ValueError("`{name}` must be {constraint}, got {value!r}.")`` so users see the argument, the
rule and what they passed, at construction time rather than deep inside a fit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = [
    "check_choice",
    "check_exclusive",
    "check_fraction",
    "check_int",
    "check_number",
    "check_positive",
]


def _fail(name: str, constraint: str, value: Any, hint: str = "") -> ValueError:
    message = f"`{name}` must be {constraint}, got {value!r}."
    if hint:
        message += f" {hint}"
    return ValueError(message)


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
        raise ValueError(f"Pass at most one of {', '.join(f'`{n}`' for n in named)}, got {listed}.")
