"""Early-exit numbers as pure functions of a split's exit scores.

`passes.collect_exit_scores` runs the full-depth model once over a split and
keeps, for every token and every exit, the target's NLL, the argmax and each
confidence measure (`ExitScores`). Under exited_state="compute" an exited
token's hidden state keeps being updated, so the full-depth pass contains
everything an early exit would see: `sweep` then gives exact perplexity, exit
depths and agreement for any threshold without running the model again,
`calibrate` picks a threshold, and `ee_jax.calibrate` certifies one
(Learn-then-Test).
"""

import dataclasses
import math
import numbers

import numpy as np

from ee_jax.config import ExitMeasure
from ee_jax.flops import exit_flops
from ee_jax.losses import exit_weights


def check_ppl_budget(max_ppl_change_pct) -> None:
    """Raises ValueError unless the calibration tolerance is a finite number >= 0."""
    value = max_ppl_change_pct
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
        raise ValueError(f"max_ppl_change_pct must be finite and >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ExitScores:
    """Every scored token of a split at every exit (host arrays, T tokens)."""

    nll: np.ndarray  # [L, T] float64: NLL of the target at each exit
    argmax: np.ndarray  # [L, T] int32: each exit's top-1 prediction
    confidence: dict  # measure value -> [L, T] float32
    tail_use: np.ndarray  # [K] float64: share of the targets in each adaptive tail cluster
    # [T] int32: the block of text each token belongs to, window index * B + row (a
    # window of one row: n_seq tokens); the independent units of `ee_jax.calibrate`.
    unit: np.ndarray

    @property
    def tokens(self) -> int:
        return self.nll.shape[1]


def exit_depths(scores: ExitScores, measure: str, threshold) -> np.ndarray:
    """0-based exit layer of every token under exited_state="compute"; [T].

    threshold: one float for every exit, or an [L-1] array with one per early exit
    (a schedule over depth; CALM, Schuster et al. 2022, decays its threshold over
    decoding steps instead). Compared in the confidences' dtype (float32), as the
    halting loop compares them. A token exits
    at the first layer l < L-1 whose confidence >= threshold[l] (never where the
    threshold is 1.0, as in `early_exit_forward`), else at the last layer.

    Raises:
      ValueError: a threshold outside [0, 1], or an array threshold whose shape is
        not [L-1].
    """
    n_layers = scores.nll.shape[0]
    thresholds = np.asarray(threshold, scores.confidence[measure].dtype)
    if not np.all((thresholds >= 0) & (thresholds <= 1)):
        raise ValueError(f"thresholds must be in [0, 1], got {threshold}")
    if thresholds.ndim:
        if thresholds.shape != (n_layers - 1,):
            raise ValueError(
                f"per-exit thresholds must have shape ({n_layers - 1},), got {thresholds.shape}"
            )
    else:
        thresholds = np.full(n_layers - 1, thresholds)
    confident = scores.confidence[measure][:-1] >= thresholds[:, None]
    confident &= (thresholds < 1.0)[:, None]
    confident = np.concatenate([confident, np.ones((1, scores.tokens), bool)])
    return np.argmax(confident, axis=0)


def oracle_depths(scores: ExitScores) -> np.ndarray:
    """First layer whose argmax equals the final argmax (CALM's oracle); [T]."""
    return np.argmax(scores.argmax == scores.argmax[-1], axis=0)


def depth_row(scores: ExitScores, depths: np.ndarray, config, measure: str) -> dict:
    """Perplexity, agreement and speedups of given 0-based exit depths [T]."""
    n_layers, tokens = scores.nll.shape
    columns = np.arange(tokens)
    nll = scores.nll[depths, columns]
    full_nll = scores.nll[-1].mean()
    counts = np.bincount(depths, minlength=n_layers)
    per_depth, full = exit_flops(config, measure, "compute", scores.tail_use)
    halting, _ = exit_flops(config, measure, "freeze", scores.tail_use)
    average = float(np.mean(depths + 1))
    return {
        "ppl": float(np.exp(nll.mean())),
        "ppl_change_pct": float(100 * (np.exp(nll.mean() - full_nll) - 1)),
        "top1_agreement": float(np.mean(scores.argmax[depths, columns] == scores.argmax[-1])),
        "avg_exit_layer": average,
        "exit_distribution": (counts / tokens).tolist(),
        "layer_speedup": n_layers / average,
        # exited_state "compute" (what the sweep scores: exited tokens still run every
        # block, so 1.00x for measures without a head) and "freeze" (real halting).
        "flops_speedup": float(full * tokens / np.dot(counts, per_depth)),
        "halting_flops_speedup": float(full * tokens / np.dot(counts, halting)),
        "tokens": tokens,
    }


def sweep(scores: ExitScores, config, measure: str, thresholds) -> list[dict]:
    """One row per threshold (exact for exited_state="compute")."""
    return [
        {
            "measure": measure,
            "threshold": float(threshold),
            **depth_row(scores, exit_depths(scores, measure, threshold), config, measure),
        }
        for threshold in thresholds
    ]


def calibrate(scores: ExitScores, config, measure: str, thresholds, *, max_ppl_change_pct=2.0):
    """The lowest threshold (the most exits) whose perplexity change is within tolerance.

    Returns the threshold, or 1.0 (full depth) when none qualifies.

    Raises:
      ValueError: max_ppl_change_pct is not a finite number >= 0, or a threshold
        outside [0, 1].
    """
    check_ppl_budget(max_ppl_change_pct)
    for threshold in sorted(thresholds):
        row = depth_row(scores, exit_depths(scores, measure, threshold), config, measure)
        if row["ppl_change_pct"] <= max_ppl_change_pct:
            return float(threshold)
    return 1.0


def untrained_measures(exit_weighting: str, n_layers: int) -> dict[str, str]:
    """Measures whose parameters a run with this exit weighting never trained: {measure:
    why}.

    The learned exit classifiers compare every exit with the final one (their
    argmax, or their target NLL): `losses.lm_loss` trains them only when every exit
    before the last has a non-zero loss weight ("final" scores the last exit alone).
    Untrained, they keep their initial output and say nothing.
    """
    weights = exit_weights(n_layers, exit_weighting)  # [L]
    unscored = (np.flatnonzero(weights[:-1] == 0) + 1).tolist()  # 1-based exits
    if not unscored:
        return {}
    return {
        ExitMeasure.LEARNED.value: (
            f"exit_weighting={exit_weighting!r} leaves exit(s) {unscored} unscored in "
            "training, so the learned exit classifiers were never trained"
        )
    }


def evaluated_measures(measures, exit_weighting: str | None, n_layers: int):
    """(measures to evaluate, {skipped measure: why}) for a run's exit weighting
    (None: unknown, every measure is kept). Raises ValueError when none is left."""
    if not measures:
        raise ValueError("measures must name at least one confidence measure")
    untrained = {} if exit_weighting is None else untrained_measures(exit_weighting, n_layers)
    skipped = {m: why for m, why in untrained.items() if m in measures}
    kept = [m for m in measures if m not in skipped]
    if not kept:
        raise ValueError(f"no confidence measure left to evaluate: {'; '.join(skipped.values())}")
    return kept, skipped
