from __future__ import annotations

import math

import pytest

from lightning_diag._validation import (
    check_choice,
    check_exclusive,
    check_fraction,
    check_int,
    check_number,
    check_positive,
)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: check_int("warmup_steps", -3, minimum=0), r"^`warmup_steps` must be >= 0, got -3\.$"),
        (lambda: check_int("patience", 2.5), r"`patience` must be an int, got 2\.5"),
        (lambda: check_int("patience", True), r"`patience` must be an int, got True"),
        (lambda: check_positive("max_norm", 0.0), r"`max_norm` must be > 0, got 0\.0"),
        (lambda: check_positive("min_delta", -1, strict=False), r"`min_delta` must be >= 0, got -1"),
        (lambda: check_number("x", math.nan), r"`x` must be a finite number, got nan"),
        (lambda: check_number("x", "1"), r"`x` must be a number, got '1'"),
        (
            lambda: check_fraction("warmup_ratio", 1.0, high_open=True),
            r"`warmup_ratio` must be in \[0, 1\), got 1\.0",
        ),
        (
            lambda: check_choice("mode", "avg", ("min", "max")),
            r"`mode` must be one of 'min', 'max', got 'avg'",
        ),
        (
            lambda: check_exclusive(min_lr=0.1, min_lr_ratio=0.5),
            r"Pass at most one of `min_lr`, `min_lr_ratio`",
        ),
    ],
)
def test_messages_name_argument_constraint_and_value(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_accepts_good_values() -> None:
    assert check_int("n", 3, minimum=0) == 3
    assert check_positive("x", 2) == 2.0
    assert check_number("x", math.inf, allow_inf=True) == math.inf
    assert check_fraction("r", 0.0) == 0.0
    check_exclusive(a=None, b=1)
