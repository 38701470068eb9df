"""Evaluation on a whole split: every target scored exactly once.

Two ways to get early-exit numbers, used together by `experiments/eval_early_exit.py`:

* `collect_exit_scores` runs the full-depth model once over a split and keeps,
  for every token and every exit, the target's NLL, the argmax and each
  confidence measure. Under exited_state="compute" an exited token's hidden
  state keeps being updated, so the full-depth pass contains everything an
  early exit would see: `sweep` then gives exact perplexity, exit depths and
  agreement for any threshold without running the model again.
* `time_early_exit` runs the real jit-compiled halting loop (default policy
  "freeze") and the plain forward on the same windows for wall-clock speedups.

A split is read in one of two protocols (`map_windows`): "window", every window
from a fresh state (what a model with a learned position table was trained on),
or "continuous" (carry=True), each of the B rows one contiguous part of the split
and the recurrent state carried from window to window, as LSTM language models
are evaluated: the first tokens of a window then see the text before it.
"""

import dataclasses
import functools
import itertools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ee_jax import adaptive
from ee_jax.config import ExitMeasure
from ee_jax.data import LMStream
from ee_jax.early_exit import (
    ExitStats,
    check_exit_options,
    check_stream,
    early_exit_forward,
    early_exit_loop,
    state_saturation,
)
from ee_jax.flops import exit_flops, tail_use_of
from ee_jax.losses import exit_nll, exit_weights
from ee_jax.model import EarlyExitLM
from ee_jax.state import RecurrentState, check_carry
from ee_jax.timing import interleaved


def check_count(name: str, value, low: int = 1) -> None:
    """Raises ValueError unless `value` is an integer >= low (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_ppl_budget(max_ppl_change_pct) -> None:
    """Raises ValueError unless the calibration tolerance is a finite number >= 0."""
    value = max_ppl_change_pct
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
        raise ValueError(f"max_ppl_change_pct must be finite and >= 0, got {value!r}")


def map_windows(
    model: EarlyExitLM,
    stream: LMStream,
    window_fn,
    *,
    carry: bool,
    desc: str,
    progress: bool = True,
) -> list:
    """[window_fn(state, batch)[0] for each window of `stream`], in order: the one
    window loop of every evaluation over a split.

    window_fn(state, batch) -> (result, state after the window) reads a window from
    a `RecurrentState`: a fresh one for every window (carry False, the "window"
    protocol) or the one the previous window of the same rows ended in (carry
    True, "continuous"). A carried state restarts its position count at each window
    (a learned position table reads rows 0..N-1 of every window, as in training);
    only the BK states carry the context.

    Raises:
      ValueError: carry for a model that cannot continue from a state (`check_carry`).
    """
    if carry:
        check_carry(model.config)
    # Committed to the device, as the states the windows return are: a jitted
    # window_fn then compiles once, not once more for the uncommitted first state.
    fresh = jax.device_put(
        RecurrentState.make(model.config, stream.inputs.shape[0]), jax.devices()[0]
    )
    state, results = fresh, []
    for index in tqdm(range(len(stream)), desc=desc, disable=not progress):
        result, after = window_fn(state if carry else fresh, stream.window(index))
        state = after.replace(position=fresh.position)
        results.append(result)
    return results


def exit_perplexities(
    model: EarlyExitLM, params, stream: LMStream, *, carry: bool = False, progress: bool = True
):
    """Perplexity of every exit over all masked targets of `stream`.

    carry: the "continuous" protocol (`map_windows`); False: "window".

    Returns:
      dict with "exit_ppl" [L], "exit_nll" [L] (mean over tokens), "tokens" and
      "protocol".

    Raises:
      ValueError: ids outside [0, V) or windows longer than n_seq (`check_stream`),
        or carry for a model that cannot carry its state.
    """
    check_stream(stream, model.config)

    def window(state, batch):
        sums, tokens, after = _window_nll_sums(
            model, params, state, batch.inputs, batch.targets, batch.mask
        )
        return (sums, tokens), after

    parts = map_windows(model, stream, window, carry=carry, desc="evaluate", progress=progress)
    totals = np.sum([np.asarray(sums, np.float64) for sums, _ in parts], axis=0)  # [L]
    count = int(sum(int(tokens) for _, tokens in parts))
    mean = totals / count
    return {
        "exit_nll": mean.tolist(),
        "exit_ppl": np.exp(mean).tolist(),
        "tokens": count,
        "protocol": protocol_name(carry),
    }


@functools.partial(jax.jit, static_argnums=0)
def _window_nll_sums(model: EarlyExitLM, params, state, inputs, targets, mask):
    """Every exit's summed target NLL [L] over a window's masked tokens read from
    `state`, their count [] and the state after the window."""
    n_layers = model.config.n_layers
    states, _, after = model.apply(params, inputs, state, method=EarlyExitLM.hidden_states_from)
    states = states.reshape(n_layers, inputs.size, -1)  # [L, B*N, D]
    nll = exit_nll(model, params, states, targets.reshape(-1), range(n_layers))  # [L, B*N]
    return jnp.sum(nll * mask.reshape(-1), axis=1), jnp.sum(mask), after


def protocol_name(carry: bool) -> str:
    """How a split was read: "continuous" (each of B rows one contiguous text, the
    state carried from window to window) or "window" (every window from a fresh state)."""
    return "continuous" if carry else "window"


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


def collect_exit_scores(
    model: EarlyExitLM, params, stream: LMStream, *, carry: bool = False, progress: bool = True
):
    """One full-depth pass over `stream`; returns `ExitScores` of its masked targets.

    carry: the "continuous" protocol (`map_windows`); False: "window".

    Every number is that of the exit's full distribution, computed exactly from the
    head and only the tail clusters that can matter (`adaptive.top_two`,
    `adaptive.target_nll`): no [B, N, V] array is made for an adaptive output.
    Raises ValueError for a stream the model cannot read (`check_stream`).
    """
    check_stream(stream, model.config)

    rows = stream.inputs.shape[0]
    windows = iter(range(len(stream)))

    def window(state, batch):
        scores, after = _window_scores(model, params, state, batch.inputs, batch.targets)
        scores = jax.device_get(scores)
        mask = np.asarray(batch.mask, bool)
        kept = {name: value[:, mask] for name, value in scores.items()}  # [L, t]
        unit = next(windows) * rows + np.arange(rows)[:, None]  # [B, 1]
        kept["unit"] = np.broadcast_to(unit, mask.shape)[mask][None]  # [1, t]
        return kept, after

    parts = map_windows(model, stream, window, carry=carry, desc="score exits", progress=progress)
    joined = {name: np.concatenate([part[name] for part in parts], axis=1) for name in parts[0]}
    return ExitScores(
        nll=joined["nll"].astype(np.float64),
        argmax=joined["argmax"],
        confidence={m.value: joined[m.value] for m in ExitMeasure},
        tail_use=tail_use_of(model.config, stream.targets, stream.mask),
        unit=joined["unit"][0].astype(np.int32),
    )


@functools.partial(jax.jit, static_argnums=0)
def _window_scores(model: EarlyExitLM, params, state, inputs, targets):
    """Every exit's target NLL, argmax and confidence measures of a window read from
    `state`, {name: [L, B, N]}, and the state after the window."""
    n_layers = model.config.n_layers
    apply = lambda *args, **kwargs: model.apply(params, *args, **kwargs)  # noqa: E731
    before = apply(inputs, True, state.position, method=EarlyExitLM.embed)  # [B, N, D]
    states, _, after = apply(inputs, state, method=EarlyExitLM.hidden_states_from)
    rows = {name: [] for name in ("nll", "argmax", *(m.value for m in ExitMeasure))}
    for layer in range(n_layers):
        output = apply(layer, method=EarlyExitLM.output_layer)
        x = apply(states[layer], layer, method=EarlyExitLM.exit_features)
        x = x.reshape(-1, x.shape[-1])  # [T, D]
        first, second, argmax = adaptive.top_two(output, x)
        rows["nll"].append(adaptive.target_nll(output, x, targets.reshape(-1)))
        rows["argmax"].append(argmax)
        rows[ExitMeasure.SOFTMAX_MAX.value].append(jnp.exp(first))
        rows[ExitMeasure.SOFTMAX_MARGIN.value].append(jnp.exp(first) - jnp.exp(second))
        classifier = apply(states[layer], layer, method=EarlyExitLM.exit_classifier)
        rows[ExitMeasure.LEARNED.value].append(jax.nn.sigmoid(classifier).reshape(-1))
        saturation = state_saturation(before, states[layer]).reshape(-1)
        rows[ExitMeasure.STATE_SATURATION.value].append(saturation)
        before = states[layer]
    return {
        name: jnp.stack(values).reshape(n_layers, *inputs.shape) for name, values in rows.items()
    }, after


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


def real_loop_row(
    model,
    params,
    stream: LMStream,
    threshold: float,
    measure: str,
    *,
    carry: bool = False,
    progress: bool = True,
) -> dict:
    """Perplexity and exit statistics of the real halting loop (policy "freeze") over a
    whole split, every masked target once, in the window or continuous protocol
    (`carry`, `map_windows`: the loop then starts each window from the state the
    previous one left, as decoding the text token by token would). Each token's
    target is scored at its exit head from its exit features (`adaptive.target_nll`:
    for an adaptive output only the head and the target's cluster; no [B, N, V]
    logits), so the FLOP model counts
    the tail clusters at the split's target shares, as `sweep` and
    `decode.stream_evaluate` do. Raises ValueError for a stream the model cannot
    read (`check_stream`) or bad exit options."""
    measure = check_exit_options(threshold, measure, "freeze").value
    check_stream(stream, model.config)
    tail_use = tail_use_of(model.config, stream.targets, stream.mask)
    per_depth, full = exit_flops(model.config, measure, "freeze", tail_use)

    def window(state, batch):
        nll, info, after = _halting_loop_nll(
            model, params, state, batch.inputs, batch.targets, batch.mask, threshold, measure
        )
        info = info.replace(
            flops_per_depth=jnp.float32(per_depth), full_depth_flops=jnp.float32(full)
        )
        return (nll, info, batch.mask), after

    parts = map_windows(
        model, stream, window, carry=carry, desc=f"halting loop {threshold}", progress=progress
    )
    stats, total = ExitStats.zeros(model.config.n_layers), 0.0
    for nll, info, mask in parts:
        total += float(nll)
        stats = stats.update(info, mask)
    summary = stats.summary()
    return {
        "measure": measure,
        "threshold": threshold,
        "exited_state": "freeze",
        "protocol": protocol_name(carry),
        "ppl": float(np.exp(total / summary["total_tokens"])),
        **summary,
    }


@functools.partial(jax.jit, static_argnums=(0, 7))
def _halting_loop_nll(model: EarlyExitLM, params, state, inputs, targets, mask, threshold, measure):
    """The halting loop (`early_exit_loop`, policy "freeze") on a window from `state`,
    scoring each token's target at its exit head: (summed NLL over masked tokens [],
    ExitInfo, the state after the window)."""
    flat_targets = targets.reshape(-1)  # [T]
    nll, info, after = early_exit_loop(
        model,
        params,
        inputs,
        jnp.float32(threshold),
        measure,
        "freeze",
        lambda layer, x: adaptive.target_nll(layer, x, flat_targets),
        state=state,
    )  # [B, N]
    return jnp.sum(nll * mask), info, after


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


LTT_RISKS = (("consistency", 0.05), ("quality", 1 - 1 / 1.02))  # (risk, epsilon) pairs


def check_evaluation(
    config,
    *,
    thresholds,
    measures,
    exit_weighting: str | None = None,
    max_ppl_change_pct: float = 2.0,
    timing_windows: int = 8,
    carry: bool = False,
    ltt_risks=LTT_RISKS,
    ltt_delta: float = 0.1,
):
    """Checks the options of `evaluate_checkpoint` for a model of `config`, on the
    host, before any work; returns (measures to evaluate, {skipped measure: why})
    (`evaluated_measures`).

    Raises:
      ValueError (one line): no threshold, or one outside [0, 1]; no or an unknown
        measure, or none left; an unknown exit_weighting; max_ppl_change_pct not
        finite and >= 0; timing_windows not an integer >= 1; carry for a model that
        cannot carry its state; an unknown Learn-then-Test risk, or its epsilon or
        ltt_delta outside (0, 1).
    """
    from ee_jax import calibrate  # it builds on this module's scores

    if not len(thresholds):
        raise ValueError("thresholds must hold at least one threshold")
    measures, skipped = evaluated_measures(measures, exit_weighting, config.n_layers)
    for measure in measures:
        for threshold in thresholds:
            check_exit_options(threshold, measure, "freeze")
    check_ppl_budget(max_ppl_change_pct)
    check_count("timing_windows", timing_windows)
    if carry:
        check_carry(config)
    for risk, epsilon in ltt_risks:
        calibrate.check_levels(risk, epsilon, ltt_delta)
    return measures, skipped


def evaluate_checkpoint(
    model,
    params,
    valid: LMStream,
    test: LMStream,
    *,
    thresholds,
    measures,
    exit_weighting: str | None = None,
    max_ppl_change_pct: float = 2.0,
    timing_windows: int = 8,
    carry: bool = False,
    progress: bool = True,
    ltt_risks=LTT_RISKS,
    ltt_delta: float = 0.1,
) -> dict:
    """The whole early-exit evaluation of a trained model (see the module docstring).

    Args:
      exit_weighting: the run's `TrainConfig.exit_weighting`. Measures it left
        untrained (`untrained_measures`: "learned" when some exit before the last
        was never scored) are skipped with a printed note, and listed with the
        reason under "skipped_measures". None: unknown, every measure is evaluated.
      carry: score the exits (perplexities, sweep, oracle, calibration) and run the
        real halting loop in the "continuous" protocol (`map_windows`); the
        timings read windows from a fresh state either way ("window"), as the
        results record under "protocol" and "timing_protocol".
      ltt_risks: (risk, epsilon) pairs certified by Learn-then-Test at level
        ltt_delta (`learn_then_test_rows`).

    Returns a JSON-ready dict: the tokens scored per split ("tokens": {"valid",
    "test"}), full-depth exit perplexities, the threshold sweep per
    measure on test, the oracle row, the threshold calibrated on valid per measure
    and its test row, the real halting loop at each calibrated threshold (its
    perplexity change against "real_loop_reference_ppl", the final exit in the
    same protocol), and wall-clock timings.

    Raises:
      ValueError: a bad option (`check_evaluation`) or a stream the model cannot
        read (`check_stream`); raised before any computation.
    """
    config = model.config
    measures, skipped = check_evaluation(
        config,
        thresholds=thresholds,
        measures=measures,
        exit_weighting=exit_weighting,
        max_ppl_change_pct=max_ppl_change_pct,
        timing_windows=timing_windows,
        carry=carry,
        ltt_risks=ltt_risks,
        ltt_delta=ltt_delta,
    )
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
        "exit_weighting": exit_weighting,
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
        valid_scores, test_scores, config, measures, thresholds, ltt_risks, ltt_delta
    )
    timed = sorted({*(c["threshold"] for c in results["calibration"].values()), 0.9, 1.0})
    results["timing"] = {
        measure: time_early_exit(
            model, params, test, timed, measure=measure, windows=timing_windows
        )
        for measure in measures
    }
    return results


LTT_BUDGETS_PCT = (0.1, 0.2, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0)  # perplexity budgets tried


def learn_then_test_rows(valid, test, config, measures, thresholds, risks, delta, *, splits=200):
    """Learn-then-Test thresholds (`ee_jax.calibrate`) for every measure and risk:
    certified on valid's units, checked on test's, and the violation rate over
    `splits` random halvings of valid + test units. For the quality risk also the
    smallest perplexity budget of LTT_BUDGETS_PCT that certifies some early exit.

    Returns a JSON-ready list of rows (`calibrate.certify` plus "violation_rate",
    "splits", and for quality "smallest_budget_pct").

    Raises:
      ValueError: splits not an integer >= 1, an unknown risk, or an epsilon or
        delta outside (0, 1); before any computation.
    """
    from ee_jax import calibrate  # it builds on this module's scores

    check_count("splits", splits)
    for risk, epsilon in risks:
        calibrate.check_levels(risk, epsilon, delta)
    grid = np.sort(np.unique(np.append(np.asarray(thresholds, np.float64), 1.0)))[::-1]
    rows = []
    for measure in measures:
        for risk, epsilon in risks:
            row = calibrate.certify(
                valid, test, config, measure, grid, risk=risk, epsilon=epsilon, delta=delta
            )
            pooled = np.concatenate(
                [calibrate.unit_risks(s, measure, grid, risk)[0] for s in (valid, test)], axis=1
            )
            rate, realised, chosen = calibrate.violation_rate(
                pooled, grid, risk, epsilon, delta, splits=splits
            )
            row.update(violation_rate=rate, splits=splits, mean_realised_risk=realised)
            if risk == "quality":
                valid_risks = calibrate.unit_risks(valid, measure, grid, risk)[0]
                row["smallest_budget_pct"] = next(
                    (
                        budget
                        for budget in LTT_BUDGETS_PCT
                        if calibrate.learn_then_test(
                            valid_risks, grid, risk, 1 - 1 / (1 + budget / 100), delta
                        ).threshold
                        < 1.0
                    ),
                    None,
                )
            rows.append(row)
    return rows
