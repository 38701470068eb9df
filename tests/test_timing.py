"""ee_jax.timing.interleaved against a scripted clock."""

import itertools

import pytest

from ee_jax import timing


def test_interleaved_rotates_the_calls_and_reports_median_and_spread(monkeypatch):
    # Given two calls whose durations a scripted clock decides: "a" takes 1, 2, 3, 4,
    # 10 s in its five timed calls, "b" always 2 s.
    order, durations = [], {"a": iter([1.0, 2.0, 3.0, 4.0, 10.0]), "b": itertools.repeat(2.0)}
    clock = {"now": 0.0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["now"])

    def call(name):
        def run():
            order.append(name)
            if len(order) > 2:  # after the two warm-up calls
                clock["now"] += next(durations[name])

        return run

    # When they are timed interleaved over 5 rounds.
    timed = timing.interleaved({"a": call("a"), "b": call("b")}, 5)
    # Then each warms up once, every round runs both, the order rotating.
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]
    # And the median and the interquartile range / median are those of the durations.
    assert timed["a"].median_s == 3.0 and timed["a"].spread == pytest.approx((4 - 2) / 3)
    assert timed["a"].noisy and timed["a"].repeats == 5
    assert timed["b"].median_s == 2.0 and timed["b"].spread == 0.0 and not timed["b"].noisy


@pytest.mark.parametrize("repeats", [0, 1, 2.0, True])
def test_interleaved_needs_two_repeats_or_more(repeats):
    with pytest.raises(ValueError, match="repeats must be an integer >= 2"):
        timing.interleaved({"a": lambda: None}, repeats)
