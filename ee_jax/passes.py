"""Passes over a whole split, every target scored exactly once.

A split is read in one of two protocols (`map_windows`, the one window loop):
"window", every window from a fresh state (what a model with a learned position
table was trained on), or "continuous" (carry=True), each of the B rows one
contiguous part of the split and the recurrent state carried from window to
window, as LSTM language models are evaluated: the first tokens of a window then
see the text before it.

    exit_perplexities    every exit's perplexity (one full-depth pass)
    collect_exit_scores  every exit's target NLL, argmax and confidences
                         (`exit_scores.ExitScores`; sweeps and calibration need no
                         other pass)
    real_loop_row        the real halting loop ("freeze"), batched
    stream_evaluate      the halting loop token by token (`decode.decode_step`)
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ee_jax import adaptive
from ee_jax.config import ExitMeasure
from ee_jax.data import LMStream
from ee_jax.decode import check_decodable, decode_step
from ee_jax.early_exit import (
    ExitInfo,
    ExitStats,
    check_exit_options,
    check_stream,
    early_exit_loop,
    state_saturation,
)
from ee_jax.exit_scores import ExitScores
from ee_jax.flops import exit_flops, tail_use_of
from ee_jax.losses import exit_nll
from ee_jax.model import EarlyExitLM
from ee_jax.state import RecurrentState, check_carry


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


def protocol_name(carry: bool) -> str:
    """How a split was read: "continuous" (each of B rows one contiguous text, the
    state carried from window to window) or "window" (every window from a fresh state)."""
    return "continuous" if carry else "window"


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
    `passes.stream_evaluate` do. Raises ValueError for a stream the model cannot
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


def stream_evaluate(
    model: EarlyExitLM,
    variables,
    stream,
    threshold,
    *,
    measure: str = "softmax_max",
    carry: bool = False,
    progress: bool = True,
) -> dict:
    """Scores every masked target of `stream` by decoding token by token.

    Each window of `stream` (B rows, n_seq positions) is decoded in one jitted scan
    over its positions, from a fresh state (carry False: the "window" protocol of
    the parallel evaluation) or from the state the previous window of its row
    ended in (carry True: the "continuous" protocol, each row one contiguous text);
    each exit head scores only the target (for an adaptive output: the
    head and the target's cluster). Reports perplexity, exit statistics (with the
    FLOP-model speedup, tails counted at the stream's cluster shares) and the
    wall-clock seconds of the whole pass (compilation excluded: the first window
    is run once before the clock starts).

    Raises:
      ValueError: a bidirectional model, bad exit options, or a stream with ids
        outside [0, V) or windows longer than n_seq (`check_stream`, once for the
        whole stream); raised before any computation.
    """
    config = model.config
    check_decodable(config)
    check_exit_options(threshold, measure, "freeze")
    check_stream(stream, config)
    tail_use = tail_use_of(config, stream.targets, stream.mask)
    per_depth, full = (jnp.float32(x) for x in exit_flops(config, measure, "freeze", tail_use))

    threshold = jnp.float32(threshold)
    first = stream.window(0)
    scan = functools.partial(_stream_window, model, variables, measure=measure)

    def window(state, batch):
        nll, depth, after = scan(state, batch.inputs, batch.targets, batch.mask, threshold)
        return (nll, depth), after

    jax.block_until_ready(window(RecurrentState.make(config, first.inputs.shape[0]), first))
    start = time.perf_counter()
    parts = map_windows(model, stream, window, carry=carry, desc="stream", progress=progress)
    jax.block_until_ready(parts)
    seconds = time.perf_counter() - start
    stats, total = ExitStats.zeros(config.n_layers), 0.0
    for index, (nll, depth) in enumerate(parts):
        batch = stream.window(index)
        total += float(nll)
        info = ExitInfo(
            exit_depth=depth,
            confidence=jnp.zeros(depth.shape),
            layers_run=jnp.max(depth),
            flops_per_depth=per_depth,
            full_depth_flops=full,
        )
        stats = stats.update(info, batch.mask)
    summary = stats.summary()
    return {
        "measure": measure,
        "threshold": float(threshold),
        "protocol": protocol_name(carry),
        "batch_size": first.inputs.shape[0],
        "ppl": float(np.exp(total / summary["total_tokens"])),
        "seconds": seconds,
        "tokens_per_s": summary["total_tokens"] / seconds,
        **summary,
    }


@functools.partial(jax.jit, static_argnums=0, static_argnames="measure")
def _stream_window(
    model: EarlyExitLM, variables, state, inputs, targets, mask, threshold, *, measure
):
    """Decodes a window [B, N] from `state` in one scan over its positions, each exit
    head scoring only the target: (summed NLL over masked targets [], depths [B, N],
    the state after the window)."""

    def step(state, column):
        tokens, target = column  # [B] each
        nll, depth, _, state = decode_step(
            model,
            variables,
            state,
            tokens,
            threshold,
            measure,
            lambda layer, x: adaptive.target_nll(layer, x, target),
        )
        return state, (nll, depth)

    state, (nll, depth) = jax.lax.scan(step, state, (inputs.T, targets.T))  # [N, B] each
    return jnp.sum(nll.T * mask), depth.T, state
