"""SpikeDetector: the rule in its docstring, checked against a plain-Python reference and by properties."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_diag.core.spikes import SpikeDetector


def reference(
    values: list[float], window: int, threshold: float, min_ratio: float, warmup: int, extreme: float = 100.0
) -> list[bool]:
    """The documented rule written out in Python floats."""
    alpha = 2.0 / (window + 1)
    count, mean, var, out = 0, 0.0, 0.0, []
    for x in values:
        finite = math.isfinite(x)
        std = math.sqrt(max(var, 0.0))
        spike = finite and (
            (count >= 1 and mean > 0 and x > extreme * mean)
            or (count >= warmup and x > mean + threshold * std and (mean <= 0 or x > min_ratio * mean))
        )
        out.append(spike)
        if finite and not spike:
            delta = x - mean
            if count < warmup:
                n = count + 1
                new_mean = mean + delta / n
                var = (var * (n - 1) + delta * (x - new_mean)) / n
                mean = new_mean
            else:
                mean += alpha * delta
                var = (1 - alpha) * (var + alpha * delta * delta)
            count += 1
    return out


finite_or_not = st.one_of(
    st.floats(min_value=-10, max_value=1e3, allow_nan=False, allow_infinity=False),
    st.sampled_from([math.nan, math.inf, -math.inf]),
)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(finite_or_not, min_size=1, max_size=60),
    window=st.integers(1, 30),
    threshold=st.floats(0.5, 8.0),
    min_ratio=st.floats(1.0, 3.0),
    warmup=st.integers(0, 10),
)
def test_matches_the_documented_rule(values, window, threshold, min_ratio, warmup) -> None:
    detector = SpikeDetector(window, threshold, min_ratio, warmup)
    assert [detector.update(v) for v in values] == reference(values, window, threshold, min_ratio, warmup)


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(0.1, 10.0), min_size=5, max_size=40))
def test_non_finite_values_never_enter_the_statistics(values) -> None:
    clean, dirty = SpikeDetector(warmup=3), SpikeDetector(warmup=3)
    for v in values:
        clean.update(v)
        dirty.update(v)
        dirty.update(math.nan)
        dirty.update(math.inf)
    assert clean.state_dict() == dirty.state_dict()


def test_a_spike_does_not_raise_the_bar_for_the_next_one() -> None:
    detector = SpikeDetector(window=10, threshold=4.0, warmup=5)
    for v in [1.0, 1.2, 0.8, 1.1, 0.9, 1.0]:
        assert not detector.update(v)
    assert detector.update(20.0) and detector.update(20.0)
    assert detector.mean < 1.2


def test_no_spike_during_warmup_and_none_on_a_constant_series() -> None:
    detector = SpikeDetector(warmup=4)
    assert not any(detector.update(v) for v in [1.0, 50.0, 1.0, 1.0])
    constant = SpikeDetector(warmup=2)
    assert not any(constant.update(3.0) for _ in range(50))


def test_min_ratio_guards_tiny_variance_series() -> None:
    strict, guarded = (
        SpikeDetector(threshold=3.0, min_ratio=1.0, warmup=5),
        SpikeDetector(threshold=3.0, warmup=5),
    )
    for v in [1.0, 1.001, 0.999, 1.0, 1.0005, 0.9995]:
        strict.update(v)
        guarded.update(v)
    assert strict.update(1.05)  # 50+ standard deviations, but only 5% above the mean
    assert not guarded.update(1.05)


def test_state_round_trip() -> None:
    a = SpikeDetector(warmup=2)
    for v in [1.0, 2.0, 3.0]:
        a.update(v)
    b = SpikeDetector(warmup=2)
    b.load_state_dict(a.state_dict())
    assert a.update(50.0) == b.update(50.0)
    assert a.state_dict() == b.state_dict()
    SpikeDetector().load_state_dict({})  # tolerates missing keys


def test_an_extreme_value_is_a_spike_even_during_warmup() -> None:
    detector = SpikeDetector(warmup=20)
    assert not detector.update(0.96)  # the first value has nothing to be compared with
    assert detector.update(4.6e4)  # Adam at lr=5: the norm 48,000x its first value at step 1
    assert detector.mean == 0.96  # and it stays out of the statistics
    assert not SpikeDetector(warmup=20, extreme_ratio=math.inf).update(4.6e4)


def test_heavy_tailed_steps_are_not_spikes_but_practically_large_ones_are() -> None:
    detector = SpikeDetector(window=100, threshold=6.0, warmup=20)
    for i in range(40):
        detector.update(0.3 + 0.01 * (i % 3))
    assert not detector.update(1.1)  # 0.33 -> 1.1: many standard deviations, only 3.5x the level
    assert detector.update(3.0)  # 10x the level and far outside the spread


def test_a_short_last_batch_is_neither_judged_nor_counted() -> None:
    detector = SpikeDetector(warmup=3)
    for _ in range(5):
        detector.update(1.0, batch_size=32)
    before = detector.state_dict()
    assert not detector.update(50.0, batch_size=3)  # the 3-sample remainder of an epoch
    assert detector.state_dict() == before
    assert detector.update(50.0, batch_size=32)
    growing = SpikeDetector(warmup=1)
    assert not growing.update(1.0, batch_size=4) and growing.max_batch == 4
