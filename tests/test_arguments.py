"""Property test over every public constructor: any arguments are either accepted as given or refused cleanly.

Refused means an :class:`~lightning_diag._validation.ArgumentError` (a ``ValueError`` and a Lightning
``MisconfigurationException``) whose message names one of the constructor's arguments; never a ``TypeError`` or an
``AttributeError`` from deep inside. Accepted means the object keeps the values it was given (no argument is
mutated), pickles, and has a plain ``state_dict``.
"""

from __future__ import annotations

import inspect
import math
import pickle
import typing
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.fabric.utilities.exceptions import MisconfigurationException

import lightning_diag
from lightning_diag.callbacks import DiagCallback

PUBLIC = sorted(
    (
        obj
        for name in lightning_diag.__all__
        if inspect.isclass(obj := getattr(lightning_diag, name))
        and issubclass(obj, DiagCallback)
        and obj is not DiagCallback
    ),
    key=lambda c: c.__name__,
)

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 1000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "no", "val_loss", "min", "max", "norm", "skip", "rollback"]),
    st.lists(st.sampled_from(["net", "head", ""]), max_size=2),
)


def _choices(annotation: Any) -> list[Any]:
    """The values of the ``Literal`` inside an annotation (``[]`` when there is none)."""
    found: list[Any] = []
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    for inner in typing.get_args(annotation):
        found += _choices(inner)
    return found


def _value(parameter: inspect.Parameter, hints: dict[str, Any]) -> st.SearchStrategy[Any]:
    choices = _choices(hints.get(parameter.name))
    options = [JUNK]
    if choices:
        options.append(st.sampled_from(choices))
    if parameter.default is not inspect.Parameter.empty:
        options.append(st.just(parameter.default))
    return st.one_of(options)


def _arguments(cls: type) -> st.SearchStrategy[dict[str, Any]]:
    hints = typing.get_type_hints(cls.__init__)
    params = [
        p
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.name not in cls.renamed_arguments  # the old names: tests/test_renamed.py
    ]
    required = {p.name: _value(p, hints) for p in params if p.default is inspect.Parameter.empty}
    optional = {p.name: _value(p, hints) for p in params if p.default is not inspect.Parameter.empty}
    return st.fixed_dictionaries(required, optional=optional)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


@pytest.mark.parametrize("cls", PUBLIC, ids=lambda c: c.__name__)
def test_any_arguments_are_kept_or_refused_cleanly(cls) -> None:
    names = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(kwargs=_arguments(cls))
    def check(kwargs: dict[str, Any]) -> None:
        given_values = pickle.loads(pickle.dumps(kwargs))
        refused: ValueError | None = None
        try:
            callback = cls(**kwargs)
        except ValueError as exc:
            refused = exc
        if refused is not None:
            assert isinstance(refused, MisconfigurationException), f"{type(refused).__name__}: {refused}"
            assert any(f"`{name}" in str(refused) for name in names), f"no argument named: {refused}"
            return
        assert kwargs == given_values or all(_same(kwargs[k], given_values[k]) for k in kwargs)  # not mutated
        for name, value in kwargs.items():
            if name in vars(callback) and isinstance(value, (bool, int, float, str, type(None))):
                kept = vars(callback)[name]
                assert _same(kept, value) or (
                    isinstance(value, (int, float))
                    and not isinstance(value, bool)
                    and _same(float(kept), value)
                ), f"{name}: given {value!r}, kept {kept!r}"
        pickle.loads(pickle.dumps(callback))
        state = callback.state_dict()
        assert isinstance(state, dict)

    check()
