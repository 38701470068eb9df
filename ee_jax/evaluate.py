"""The early-exit evaluation of a trained model: one pipeline, every program
compiled once.

    evaluate_checkpoint(model, params, valid, test, EvalConfig(...))
      1. one full-depth pass over each split -> exit scores
         (`passes.collect_exit_scores`)
      2. pure functions of the scores: the threshold sweep, the oracle, the
         threshold calibrated on valid per measure (`scores`), Learn-then-Test
         (`calibrate`)
      3. the real halting loop at each calibrated threshold (`passes.real_loop_row`)
      4. wall-clock: the halting loop against the plain forward (`time_early_exit`)

`experiments/eval_early_exit.py` runs it and writes results.json and results.md
(`report`).
"""

import dataclasses
import functools
import itertools

import jax
import numpy as np

from ee_jax.calibrate import LTT_RISKS, check_levels, learn_then_test_rows
from ee_jax.config import ExitWeighting, check_choice, check_count
from ee_jax.data import LMStream
from ee_jax.early_exit import check_exit_options, check_stream, early_exit_forward
from ee_jax.exit_scores import (
    calibrate,
    check_ppl_budget,
    depth_row,
    evaluated_measures,
    exit_depths,
    oracle_depths,
    sweep,
)
from ee_jax.model import EarlyExitLM
from ee_jax.passes import collect_exit_scores, protocol_name, real_loop_row
from ee_jax.state import check_carry
from ee_jax.timing import interleaved


def time_early_exit(
    model, params, stream: LMStream, thresholds, *, measure: str, windows: int = 8, repeats: int = 3
) -> dict:
    """Median wall-clock ms per window of the plain forward and of the halting loop.

    Each program is compiled and warmed up on the first window, then every program
    is timed on `windows` windows `repeats` times each, interleaved
    (`timing.interleaved`: a load that comes and goes slows them alike;
    block_until_ready every call).

    Returns:
      {"forward_ms": ..., "forward_spread", "full_loop_ms": ..., "windows": ...,
      "batch_size": B, threshold: {"ms", "speedup", "masked_ms", "masked_speedup",
      "exit_speedup", "layers_run", "spread"}} with speedup = forward_ms / ms,
      spread the largest interquartile range / median of the programs compared;
      "ms" is the compacted halting loop (the default), "masked_ms" the masked one
      (`early_exit_forward(..., compact=False)`), timed side by side. The plain
      forward returns the final head's [B, N, V] logits, which the loop never forms,
      so "exit_speedup" = full_loop_ms / ms, against the same compacted loop at
      threshold 1.0 (no token exits), is the part of the speedup that exiting earns.

    Raises:
      ValueError: windows or repeats not an integer >= 1, a bad threshold or
        measure, or a stream the model cannot read (`check_stream`).
    """
    check_count("windows", windows)
    check_count("repeats", repeats)
    for threshold in thresholds:
        check_exit_options(threshold, measure, "freeze")
    check_stream(stream, model.config)
    batches = [stream.window(i) for i in range(min(windows, len(stream)))]

    def cycled(call):  # each call reads the next window (the warm-up the first)
        inputs = itertools.cycle([batch.inputs for batch in batches])
        return lambda: call(next(inputs))

    programs = {"forward": cycled(lambda tokens: _plain_forward(model, params, tokens))}
    levels = sorted({*map(float, thresholds), 1.0})  # 1.0: the loop, no exit
    for threshold in levels:
        for name, compact in (("ms", True), ("masked_ms", False)):
            programs[threshold, name] = cycled(
                lambda t, th=threshold, c=compact: early_exit_forward(
                    model, params, t, th, measure=measure, compact=c
                )
            )
    timed = interleaved(programs, max(2, len(batches) * repeats))
    forward = timed["forward"]
    result = {
        "forward_ms": 1e3 * forward.median_s,
        "forward_spread": forward.spread,
        "windows": len(batches),
        "repeats": repeats,
        "batch_size": int(batches[0].inputs.shape[0]),
    }
    rows = {}
    for threshold in levels:
        compacted, masked = timed[threshold, "ms"], timed[threshold, "masked_ms"]
        _, info = early_exit_forward(model, params, batches[0].inputs, threshold, measure=measure)
        rows[threshold] = {
            "ms": 1e3 * compacted.median_s,
            "masked_ms": 1e3 * masked.median_s,
            # The largest spread of the programs this row's speedups compare.
            "spread": max(compacted.spread, masked.spread, forward.spread),
            "layers_run": int(info.layers_run),
        }
    result["full_loop_ms"] = rows[1.0]["ms"]
    for threshold in map(float, thresholds):
        row = rows[threshold]
        result[threshold] = {
            **row,
            "spread": max(row["spread"], rows[1.0]["spread"]),
            "speedup": result["forward_ms"] / row["ms"],
            "masked_speedup": result["forward_ms"] / row["masked_ms"],
            "exit_speedup": result["full_loop_ms"] / row["ms"],
        }
    return result


@functools.partial(jax.jit, static_argnums=0)
def _plain_forward(model: EarlyExitLM, params, tokens):
    """The final head's logits [B, N, V] (the plain forward `time_early_exit` compares with)."""
    return model.apply(params, tokens)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """The options of `evaluate_checkpoint`; checked when made (one-line ValueError).

    thresholds: the grid swept, calibrated and certified, each in [0, 1].
    measures: the confidence measures (`config.ExitMeasure` values) to evaluate.
    """

    thresholds: tuple[float, ...]  # the threshold grid, each in [0, 1]
    measures: tuple[str, ...]  # confidence measures (ExitMeasure values)
    exit_weighting: str | None = None  # the run's TrainConfig.exit_weighting (None: unknown)
    max_ppl_change_pct: float = 2.0  # calibration budget: test-ppl change allowed, in %
    timing_windows: int = 8  # windows timed per measure (wall-clock table)
    carry: bool = False  # the "continuous" protocol (state carried across windows)
    ltt_risks: tuple = LTT_RISKS  # (risk, epsilon) pairs certified by Learn-then-Test
    ltt_delta: float = 0.1  # Learn-then-Test level: guarantees hold w.p. >= 1 - delta

    def __post_init__(self):
        object.__setattr__(self, "thresholds", tuple(map(float, self.thresholds)))
        object.__setattr__(self, "measures", tuple(self.measures))
        object.__setattr__(self, "ltt_risks", tuple(map(tuple, self.ltt_risks)))
        if not self.thresholds:
            raise ValueError("thresholds must hold at least one threshold")
        if not self.measures:
            raise ValueError("measures must name at least one confidence measure")
        for measure in self.measures:
            for threshold in self.thresholds:
                check_exit_options(threshold, measure, "freeze")
        if self.exit_weighting is not None:
            check_choice("exit_weighting", self.exit_weighting, ExitWeighting)
        check_ppl_budget(self.max_ppl_change_pct)
        check_count("timing_windows", self.timing_windows)
        if not isinstance(self.carry, bool):
            raise ValueError(f"carry must be True or False, got {self.carry!r}")
        for risk, epsilon in self.ltt_risks:
            check_levels(risk, epsilon, self.ltt_delta)

    def measures_for(self, model_config) -> tuple[list[str], dict[str, str]]:
        """(measures to evaluate, {skipped measure: why}) for a model of
        `model_config` (`exit_scores.evaluated_measures`).

        Raises:
          ValueError: no measure left, or carry for a model that cannot carry its state.
        """
        if self.carry:
            check_carry(model_config)
        return evaluated_measures(self.measures, self.exit_weighting, model_config.n_layers)


def evaluate_checkpoint(
    model, params, valid: LMStream, test: LMStream, options: EvalConfig, *, progress=True
) -> dict:
    """The whole early-exit evaluation of a trained model (module docstring).

    One pass over each split gives the exit scores (`passes.collect_exit_scores`);
    the sweep, the calibration on valid and Learn-then-Test are functions of them
    (`exit_scores`, `calibrate`). Measures the run's exit weighting left untrained
    (`exit_scores.untrained_measures`: "learned" when some exit before the last was
    never scored) are skipped with a printed note, and listed with the reason
    under "skipped_measures". With options.carry the exits are scored and the
    real halting loop runs in the "continuous" protocol; the timings read windows
    from a fresh state either way ("window"), as the results record under
    "protocol", "real_loop_protocol" and "timing_protocol".

    Returns a JSON-ready dict: the tokens scored per split ("tokens": {"valid",
    "test"}), full-depth exit perplexities, the threshold sweep per measure on
    test, the oracle row, the threshold calibrated on valid per measure and its
    test row, the real halting loop at each calibrated threshold (its perplexity
    change against "real_loop_reference_ppl", the final exit in the same
    protocol), Learn-then-Test rows and wall-clock timings.

    Raises:
      ValueError: options that do not fit the model (`EvalConfig.measures_for`) or
        a stream the model cannot read (`check_stream`); raised before any
        computation.
    """
    if not isinstance(options, EvalConfig):
        raise ValueError(f"options must be an EvalConfig, got {type(options).__name__}")
    config = model.config
    measures, skipped = options.measures_for(config)
    thresholds, carry = options.thresholds, options.carry
    max_ppl_change_pct = options.max_ppl_change_pct
    check_stream(valid, config)
    check_stream(test, config)
    for measure, why in skipped.items():
        print(f"note: not evaluating the {measure!r} measure: {why}")
    valid_scores = collect_exit_scores(model, params, valid, carry=carry, progress=progress)
    test_scores = collect_exit_scores(model, params, test, carry=carry, progress=progress)
    results = {
        "protocol": protocol_name(carry),
        "real_loop_protocol": protocol_name(carry),
        "timing_protocol": protocol_name(False),
        "exit_weighting": options.exit_weighting,
        "measures": measures,
        "skipped_measures": skipped,
        "tokens": {"valid": valid_scores.tokens, "test": test_scores.tokens},
        "test_exit_ppl": np.exp(test_scores.nll.mean(axis=1)).tolist(),
        "valid_exit_ppl": np.exp(valid_scores.nll.mean(axis=1)).tolist(),
        "sweep": [row for m in measures for row in sweep(test_scores, config, m, thresholds)],
        "oracle": depth_row(test_scores, oracle_depths(test_scores), config, "learned"),
        "calibration": {},
        "real_loop": [],
    }
    for measure in measures:
        threshold = calibrate(
            valid_scores, config, measure, thresholds, max_ppl_change_pct=max_ppl_change_pct
        )
        lowest = min(float(t) for t in thresholds)
        results["calibration"][measure] = {
            "threshold": threshold,
            "max_ppl_change_pct": max_ppl_change_pct,
            # Even the grid's lowest threshold met the target: a lower one may too.
            "whole_grid_meets_target": threshold == lowest < 1.0,
            "valid": depth_row(
                valid_scores, exit_depths(valid_scores, measure, threshold), config, measure
            ),
            "test": depth_row(
                test_scores, exit_depths(test_scores, measure, threshold), config, measure
            ),
        }
        results["real_loop"].append(
            real_loop_row(model, params, test, threshold, measure, carry=carry, progress=progress)
        )
    # The halting loop reads the windows in the same protocol as the exit scores.
    reference = results["test_exit_ppl"][-1]
    results["real_loop_reference_ppl"] = reference
    for row in results["real_loop"]:
        row["ppl_change_pct"] = 100 * (row["ppl"] / reference - 1)
    results["learn_then_test"] = learn_then_test_rows(
        valid_scores,
        test_scores,
        config,
        measures,
        thresholds,
        options.ltt_risks,
        options.ltt_delta,
    )
    timed = sorted({*(c["threshold"] for c in results["calibration"].values()), 0.9, 1.0})
    results["timing"] = {
        measure: time_early_exit(
            model, params, test, timed, measure=measure, windows=options.timing_windows
        )
        for measure in measures
    }
    return results
