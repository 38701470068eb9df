"""Learn-then-Test: valid p-values, risk control on data with a known risk, unit risks
against an eager per-unit loop."""

import numpy as np
import pytest

from ee_jax.calibrate import (
    betting_p_value,
    hoeffding_bentkus_p_value,
    learn_then_test,
    p_value,
    unit_risks,
    violation_rate,
)
from ee_jax.exit_scores import ExitScores, exit_depths


@pytest.mark.parametrize("method", ["hoeffding_bentkus", "betting"])
def test_p_values_are_valid_at_the_edge_of_the_null(method):
    # Given 2,000 samples of 300 losses whose mean is exactly epsilon (the null's
    # hardest case): Bernoulli for [0, 1], a spread of values for [-1, 1].
    rng = np.random.default_rng(0)
    epsilon, delta, trials = 0.05, 0.1, 2000
    if method == "hoeffding_bentkus":
        samples = rng.random((trials, 300)) < epsilon
        p = [hoeffding_bentkus_p_value(s, epsilon) for s in samples]
    else:
        samples = np.clip(rng.normal(epsilon, 0.05, (trials, 300)), -1, 1)
        p = [betting_p_value(s, epsilon, delta, low=-1.0, high=1.0) for s in samples]
    # Then "risk > epsilon" is rejected at level delta at most a delta share of the
    # time (plus three standard errors of 2,000 trials).
    rate = np.mean(np.asarray(p) <= delta)
    assert rate <= delta + 3 * np.sqrt(delta * (1 - delta) / trials), rate


def known_risk_units(rng, true_risks, units, tokens):
    """[K, units] unit risks: each unit's share of `tokens` Bernoulli(true_risk) errors."""
    return rng.binomial(tokens, np.asarray(true_risks)[:, None], (len(true_risks), units)) / tokens


def test_learn_then_test_controls_a_known_risk_where_a_plain_sweep_does_not():
    # Given thresholds whose true risk grows as they fall, one just above epsilon = 0.05.
    true_risks = np.array([0, 0.01, 0.02, 0.03, 0.04, 0.045, 0.0502, 0.06, 0.08, 0.1, 0.12])
    thresholds = np.linspace(1.0, 0.1, len(true_risks))
    epsilon, delta, trials = 0.05, 0.1, 300
    rng = np.random.default_rng(1)
    ltt, sweep = [], []
    for trial in range(trials):
        risks = known_risk_units(rng, true_risks, 400, 128)
        # When Learn-then-Test certifies a threshold, and a plain sweep picks the
        # lowest threshold whose calibration risk is within epsilon.
        chosen = learn_then_test(risks, thresholds, "consistency", epsilon, delta, seed=trial)
        ltt.append(true_risks[thresholds == chosen.threshold][0] > epsilon)
        within = risks.mean(axis=1) <= epsilon
        sweep.append(true_risks[np.flatnonzero(within)[-1]] > epsilon)
    # Then the certified threshold's true risk exceeds epsilon at most delta of the
    # time, while the sweep's does far more often.
    assert np.mean(ltt) <= delta
    assert np.mean(sweep) > 3 * delta


def test_the_betting_bound_certifies_small_budgets_hoeffding_cannot():
    # Given 1,700 unit losses in [-1, 1] with mean 0.005 and spread 0.02 (a +2%
    # perplexity budget is epsilon = 1 - 1/1.02 = 0.0196).
    losses = np.random.default_rng(2).normal(0.005, 0.02, 1700)
    epsilon, delta = 1 - 1 / 1.02, 0.1
    # Then the betting p-value rejects "risk > epsilon"; Hoeffding over the range
    # [-1, 1], exp(-2 n (epsilon - mean)^2 / 2^2), does not.
    assert betting_p_value(losses, epsilon, delta, low=-1.0, high=1.0) <= delta
    assert np.exp(-2 * losses.size * (epsilon - losses.mean()) ** 2 / 4) > delta


def test_unit_risks_equal_an_eager_per_unit_loop():
    # Given scores of 3 exits over 60 tokens in 5 units.
    rng = np.random.default_rng(3)
    layers, tokens = 3, 60
    scores = ExitScores(
        nll=rng.uniform(1, 6, (layers, tokens)),
        argmax=rng.integers(0, 4, (layers, tokens)).astype(np.int32),
        confidence={"softmax_max": rng.random((layers, tokens)).astype(np.float32)},
        tail_use=np.zeros(0),
        unit=np.repeat(np.arange(5), 12).astype(np.int32),
    )
    thresholds = [0.9, 0.5, 0.2]
    consistency, units = unit_risks(scores, "softmax_max", thresholds, "consistency")
    quality, _ = unit_risks(scores, "softmax_max", thresholds, "quality")
    # Then each unit's risk is the one computed token by token.
    for i, threshold in enumerate(thresholds):
        depths = exit_depths(scores, "softmax_max", threshold)
        for j, unit in enumerate(units):
            members = [t for t in range(tokens) if scores.unit[t] == unit]
            differs = [scores.argmax[depths[t], t] != scores.argmax[-1, t] for t in members]
            assert consistency[i, j] == pytest.approx(np.mean(differs))
            exit_nll = np.mean([scores.nll[depths[t], t] for t in members])
            full_nll = np.mean([scores.nll[-1, t] for t in members])
            expected = max(1 - np.exp(full_nll) / np.exp(exit_nll), -1.0)
            assert quality[i, j] == pytest.approx(expected)


@pytest.mark.parametrize(
    "args, message",
    [
        ((0.0, 0.1), "epsilon and delta"),
        ((0.05, 1.0), "epsilon and delta"),
    ],
)
def test_bad_levels_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        learn_then_test(np.zeros((2, 10)), [1.0, 0.5], "consistency", *args)


def test_thresholds_must_be_tested_from_the_most_conservative():
    with pytest.raises(ValueError, match="descending"):
        learn_then_test(np.zeros((2, 10)), [0.5, 1.0], "consistency", 0.05, 0.1)


def test_bad_arguments_of_every_entry_point_are_refused():
    risks = np.zeros((2, 10))
    # An unknown risk is refused, not scored with another risk's p-value.
    for call in (
        lambda: learn_then_test(risks, [1.0, 0.5], "coverage", 0.05, 0.1),
        lambda: p_value(risks[0], "coverage", 0.05, 0.1),
    ):
        with pytest.raises(ValueError, match="risk must be one of"):
            call()
    with pytest.raises(ValueError, match=r"epsilon must be in \(0, 1\), got 1.0"):
        hoeffding_bentkus_p_value(risks[0], 1.0)
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\), got 0"):
        betting_p_value(risks[0], 0.05, 0)
    with pytest.raises(ValueError, match="low must be below high"):
        betting_p_value(risks[0], 0.05, 0.1, low=1.0, high=-1.0)
    # Rows of risks must be the thresholds', and a rate needs at least one split.
    with pytest.raises(ValueError, match=r"risks must be \[3 thresholds, units\]"):
        learn_then_test(risks, [1.0, 0.7, 0.5], "consistency", 0.05, 0.1)
    with pytest.raises(ValueError, match="splits must be an integer >= 1, got 0"):
        violation_rate(risks, [1.0, 0.5], "consistency", 0.05, 0.1, splits=0)
