"""Exit thresholds with a guarantee: Learn-then-Test (Angelopoulos et al. 2021,
"Learn then Test: Calibrating Predictive Algorithms to Achieve Risk Control"), as
CALM calibrates its exits (Schuster et al. 2022, "Confident Adaptive Language
Modeling").

The units are independent blocks of text (`ExitScores.unit`: one window of one
row, n_seq tokens; tokens of a text are not independent). For a threshold t,
each unit u has a risk r_u(t) in a known range; the risk R(t) is its mean over
units drawn like the calibration ones. Each threshold of the grid is a null
hypothesis "R(t) > epsilon" with a valid p-value; fixed-sequence testing, from
the most conservative threshold (1.0: no early exit, risk 0) down, rejects
while p <= delta. Every rejected threshold then has R(t) <= epsilon, all at
once, with probability >= 1 - delta over the calibration units; the lowest
(the most exits) is returned.

Two risks:
* "consistency": the share of a unit's tokens whose exit argmax differs from
  the full model's (CALM's textual consistency), in [0, 1]. p-value:
  Hoeffding-Bentkus (Bates et al. 2021, "Distribution-free, risk-controlling
  prediction sets", section 3.1.2), sharp for small risks of [0, 1] losses.
* "quality": 1 - ppl_full(u) / ppl_exit(u) (for a perplexity budget b, epsilon =
  1 - 1 / (1 + b)), at most 1 and lower-bounded at -1 (a unit whose exit halves
  its perplexity counts as -1: raising a loss only makes the bound
  conservative). Its values spread around zero with a small variance, which
  Hoeffding-type bounds over the range [-1, 1] ignore: they cannot certify
  budgets of a few percent with a few thousand units. p-value: the betting
  martingale of Waudby-Smith & Ramdas 2023 ("Estimating means of bounded random
  variables by betting", predictable plug-in bets), which adapts to the
  variance; by Ville's inequality 1 / max_t K_t is a valid p-value.
"""

import dataclasses
import math
import numbers

import numpy as np
import scipy.stats

from ee_jax.config import check_count
from ee_jax.exit_scores import ExitScores, depth_row, exit_depths

RISKS = ("consistency", "quality")


def check_risk(risk: str) -> None:
    """Raises ValueError for a risk not in RISKS."""
    if risk not in RISKS:
        raise ValueError(f"risk must be one of {RISKS}, got {risk!r}")


def _check_open_unit(**levels) -> None:
    """Raises ValueError unless every keyword's value is a number in (0, 1)."""
    if not all(isinstance(v, numbers.Real) and 0 < v < 1 for v in levels.values()):
        got = ", ".join(map(str, levels.values()))
        raise ValueError(f"{' and '.join(levels)} must be in (0, 1), got {got}")


def check_levels(risk: str, epsilon, delta) -> None:
    """Raises ValueError (one line) for an unknown risk, or epsilon or delta
    outside (0, 1): the checks of every Learn-then-Test entry point."""
    check_risk(risk)
    _check_open_unit(epsilon=epsilon, delta=delta)


def unit_risks(scores: ExitScores, measure: str, thresholds, risk: str):
    """Each unit's risk at each threshold: ([len(thresholds), U] float64, unit ids [U]).

    Raises:
      ValueError: an unknown risk, or a threshold outside [0, 1].
    """
    check_risk(risk)
    units, index = np.unique(scores.unit, return_inverse=True)
    count = np.bincount(index)
    columns = np.arange(scores.tokens)
    full_nll = np.bincount(index, scores.nll[-1]) / count
    rows = []
    for threshold in thresholds:
        depths = exit_depths(scores, measure, threshold)
        if risk == "consistency":
            differs = scores.argmax[depths, columns] != scores.argmax[-1]
            rows.append(np.bincount(index, differs) / count)
        else:
            exit_nll = np.bincount(index, scores.nll[depths, columns]) / count
            rows.append(np.maximum(1.0 - np.exp(full_nll - exit_nll), -1.0))
    return np.asarray(rows, np.float64), units


def hoeffding_bentkus_p_value(losses, epsilon: float) -> float:
    """p-value of "mean loss > epsilon" from n i.i.d. losses in [0, 1] (Bates et al.
    2021, Proposition 3.5 with the Hoeffding and Bentkus bounds). Raises ValueError
    for epsilon outside (0, 1)."""
    _check_open_unit(epsilon=epsilon)
    losses = np.asarray(losses, np.float64)
    n, mean = losses.size, float(losses.mean())
    low = min(mean, epsilon)
    kl = _bernoulli_kl(low, epsilon)
    hoeffding = math.exp(-n * kl)
    bentkus = math.e * scipy.stats.binom.cdf(math.ceil(n * mean), n, epsilon)
    return float(min(1.0, hoeffding, bentkus))


def _bernoulli_kl(a: float, b: float) -> float:
    """KL(Bernoulli(a) || Bernoulli(b)), 0 log 0 = 0."""
    terms = [(a, b), (1 - a, 1 - b)]
    return sum(p * math.log(p / q) for p, q in terms if p > 0)


def betting_p_value(losses, epsilon: float, delta: float, *, low=0.0, high=1.0) -> float:
    """p-value of "mean loss > epsilon" from i.i.d. losses in [low, high], in the
    order given, by a betting martingale (Waudby-Smith & Ramdas 2023, predictable
    plug-in bets; eq. 26 there, truncated at 1/2 of the largest bet).

    Mapped to [0, 1], K_t = prod_i (1 + lambda_i (epsilon - x_i)) is a nonnegative
    supermartingale when the mean is >= epsilon, so P(max_t K_t >= 1/delta) <= delta
    (Ville's inequality): 1 / max_t K_t is a valid p-value.

    Raises:
      ValueError: delta outside (0, 1), or not low < high.
    """
    _check_open_unit(delta=delta)
    if not low < high:
        raise ValueError(f"low must be below high, got {low}, {high}")
    x = (np.asarray(losses, np.float64) - low) / (high - low)
    m = (epsilon - low) / (high - low)
    if m >= 1:
        return 0.0 if x.max() < 1 else 1.0
    n = x.size
    t = np.arange(1, n + 1)
    running_mean = (0.5 + np.cumsum(x)) / (t + 1)  # mu_t, from x_1..x_t
    spread = np.cumsum((x - running_mean) ** 2)
    variance = (0.25 + np.concatenate([[0.0], spread[:-1]])) / t  # sigma^2_{t-1}: predictable
    bet = np.minimum(np.sqrt(2 * math.log(1 / delta) / (n * variance)), 0.5 / (1 - m))
    log_capital = np.cumsum(np.log1p(bet * (m - x)))
    return float(min(1.0, math.exp(-max(0.0, log_capital.max()))))


def p_value(losses, risk: str, epsilon: float, delta: float) -> float:
    """The p-value of "risk > epsilon" this module uses for `risk` (module docstring).
    Raises ValueError for bad levels (`check_levels`)."""
    check_levels(risk, epsilon, delta)
    if risk == "consistency":
        return hoeffding_bentkus_p_value(losses, epsilon)
    return betting_p_value(losses, epsilon, delta, low=-1.0, high=1.0)


@dataclasses.dataclass(frozen=True)
class Certified:
    """A Learn-then-Test result: `threshold` has risk <= epsilon with probability >=
    1 - delta over the calibration units (1.0, full depth, when nothing is certified)."""

    threshold: float
    risk: str
    epsilon: float
    delta: float
    calibration_risk: float  # mean unit risk of `threshold` on the calibration units
    tested: list  # [(threshold, p-value)], in testing order, until the first failure


def learn_then_test(risks, thresholds, risk: str, epsilon: float, delta: float, *, seed=0):
    """Fixed-sequence testing over `thresholds` (most conservative first: descending).

    Args:
      risks: [len(thresholds), U] unit risks (`unit_risks`); units are taken in a
        random order fixed by `seed` (the betting p-value is sequential).

    Raises:
      ValueError: bad levels (`check_levels`), thresholds not descending, or risks
        not one row per threshold.
    """
    check_levels(risk, epsilon, delta)
    thresholds = np.asarray(thresholds, np.float64)
    if np.any(np.diff(thresholds) >= 0):
        raise ValueError("thresholds must be strictly descending (most conservative first)")
    if np.ndim(risks) != 2 or len(risks) != len(thresholds):
        raise ValueError(
            f"risks must be [{len(thresholds)} thresholds, units], got shape {np.shape(risks)}"
        )
    order = np.random.default_rng(seed).permutation(risks.shape[1])
    chosen, tested = 1.0, []
    for threshold, losses in zip(thresholds, risks[:, order], strict=True):
        p = p_value(losses, risk, epsilon, delta)
        tested.append((float(threshold), p))
        if p > delta:
            break
        chosen = float(threshold)
    row = np.flatnonzero(thresholds == chosen)
    calibration = float(risks[row[0]].mean()) if row.size else 0.0
    return Certified(chosen, risk, epsilon, delta, calibration, tested)


def certify(
    valid: ExitScores,
    test: ExitScores,
    config,
    measure: str,
    thresholds,
    *,
    risk: str,
    epsilon: float,
    delta: float,
) -> dict:
    """Learn-then-Test on the valid split's units, checked on the test split's.

    Returns a JSON-ready dict: measure, risk, epsilon, delta, p-value method, the
    certified threshold, its valid (calibration) risk, its realised test risk and
    its `depth_row` on test (perplexity change, exit distribution, speedups).
    Raises ValueError for bad levels (`check_levels`) before any computation.
    """
    check_levels(risk, epsilon, delta)
    grid = np.sort(np.unique(np.append(np.asarray(thresholds, np.float64), 1.0)))[::-1]
    result = learn_then_test(unit_risks(valid, measure, grid, risk)[0], grid, risk, epsilon, delta)
    test_risk = float(unit_risks(test, measure, [result.threshold], risk)[0].mean())
    depths = exit_depths(test, measure, result.threshold)
    return {
        "measure": measure,
        "risk": risk,
        "epsilon": epsilon,
        "delta": delta,
        "p_value": "Hoeffding-Bentkus" if risk == "consistency" else "betting (WSR 2023)",
        "threshold": result.threshold,
        "valid_risk": result.calibration_risk,
        "test_risk": test_risk,
        "tested": result.tested,
        "test": depth_row(test, depths, config, measure),
    }


def violation_rate(
    risks, thresholds, risk: str, epsilon: float, delta: float, *, splits=200, seed=0
):
    """The rate at which the certified threshold's realised risk exceeds epsilon over
    random halvings of the units: calibrate on one half, measure the mean unit risk
    on the other. Learn-then-Test promises a rate <= delta (up to the evaluation
    half's own sampling noise).

    Args:
      risks: [len(thresholds), U] unit risks; thresholds descending.

    Returns:
      (violation rate, mean realised risk, mean certified threshold).

    Raises:
      ValueError: splits not an integer >= 1, or bad levels (`check_levels`).
    """
    check_count("splits", splits)
    check_levels(risk, epsilon, delta)
    rng = np.random.default_rng(seed)
    units = risks.shape[1]
    violations, realised, chosen = [], [], []
    for split in range(splits):
        order = rng.permutation(units)
        calibration, evaluation = order[: units // 2], order[units // 2 :]
        result = learn_then_test(
            risks[:, calibration], thresholds, risk, epsilon, delta, seed=split
        )
        row = np.flatnonzero(np.asarray(thresholds) == result.threshold)
        value = float(risks[row[0], evaluation].mean()) if row.size else 0.0
        violations.append(value > epsilon)
        realised.append(value)
        chosen.append(result.threshold)
    return float(np.mean(violations)), float(np.mean(realised)), float(np.mean(chosen))


LTT_RISKS = (("consistency", 0.05), ("quality", 1 - 1 / 1.02))  # (risk, epsilon) pairs
LTT_BUDGETS_PCT = (0.1, 0.2, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0)  # perplexity budgets tried


def learn_then_test_rows(valid, test, config, measures, thresholds, risks, delta, *, splits=200):
    """Learn-then-Test thresholds  for every measure and risk:
    certified on valid's units, checked on test's, and the violation rate over
    `splits` random halvings of valid + test units. For the quality risk also the
    smallest perplexity budget of LTT_BUDGETS_PCT that certifies some early exit.

    Returns a JSON-ready list of rows (`certify` plus "violation_rate",
    "splits", and for quality "smallest_budget_pct").

    Raises:
      ValueError: splits not an integer >= 1, an unknown risk, or an epsilon or
        delta outside (0, 1); before any computation.
    """
    check_count("splits", splits)
    for risk, epsilon in risks:
        check_levels(risk, epsilon, delta)
    grid = np.sort(np.unique(np.append(np.asarray(thresholds, np.float64), 1.0)))[::-1]
    rows = []
    for measure in measures:
        for risk, epsilon in risks:
            row = certify(
                valid, test, config, measure, grid, risk=risk, epsilon=epsilon, delta=delta
            )
            pooled = np.concatenate(
                [unit_risks(s, measure, grid, risk)[0] for s in (valid, test)], axis=1
            )
            rate, realised, chosen = violation_rate(
                pooled, grid, risk, epsilon, delta, splits=splits
            )
            row.update(violation_rate=rate, splits=splits, mean_realised_risk=realised)
            if risk == "quality":
                valid_risks = unit_risks(valid, measure, grid, risk)[0]
                row["smallest_budget_pct"] = next(
                    (
                        budget
                        for budget in LTT_BUDGETS_PCT
                        if learn_then_test(
                            valid_risks, grid, risk, 1 - 1 / (1 + budget / 100), delta
                        ).threshold
                        < 1.0
                    ),
                    None,
                )
            rows.append(row)
    return rows
