"""Token-by-token decoding with per-token early exit.

The causal BK core is a recurrence with a tiny state: per layer and head, the
previous position's diagonal entry G_{i-1} (`bk_core.causal_step`). A decoding
step embeds one token per sequence, runs blocks through the same masked
`lax.while_loop` as `early_exit_forward` (rows that exited are frozen while the
batch continues), then updates the state of every layer the token skipped from
its exited hidden state, at the cost of that layer's norm, potential
projection and scalar recurrence (no MoE, no exit head). This is exactly
exited_state="freeze": decoding a sequence reproduces
`early_exit_forward(..., exited_state="freeze")` on the whole sequence.
"""

import functools
import math
import numbers
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ee_jax import adaptive
from ee_jax.config import ModelConfig
from ee_jax.early_exit import (
    ExitInfo,
    ExitStats,
    HaltState,
    check_exit_options,
    check_stream,
    exit_outputs,
    halting_loop,
)
from ee_jax.flops import exit_flops, tail_use_of
from ee_jax.model import EarlyExitLM, check_tokens, initial_bk_state


@flax.struct.dataclass
class DecodeState:
    """Everything a decoding step needs from the previous ones."""

    position: jax.Array  # [] int32: positions decoded so far (index of the next one)
    # Per layer, the BK state of the previous position (`model.initial_bk_state`):
    # (G [L, B, H], solved values y [L, B, H, P]) complex64.
    bk_state: tuple[jax.Array, jax.Array]

    @classmethod
    def make(cls, config: ModelConfig, batch: int) -> "DecodeState":
        layers = lambda x: jnp.broadcast_to(x, (config.n_layers, *x.shape))  # noqa: E731
        state = jax.tree.map(layers, initial_bk_state(config, batch))
        return cls(position=jnp.zeros((), jnp.int32), bk_state=state)


def decode_step(
    model: EarlyExitLM,
    variables,
    state: DecodeState,
    tokens,
    threshold,
    measure: str = "softmax_max",
    output_fn=adaptive.logits,
    compact: bool = True,
):
    """Feeds one token per sequence; returns (output [B, ...], exit depth [B] int32,
    confidence [B], new state). Pure: jit with model, measure, output_fn and compact
    static. compact: the MoE and exit check of a block run only on the rows still
    active (`early_exit.halting_loop`).

    output_fn(output layer, exit features [B, D]) -> [B, ...] is what each token's
    exit head computes: by default its logits [B, V] (`adaptive.logits`); a
    target's NLL needs only the head and that target's cluster.

    Raises:
      ValueError: the model is bidirectional (`check_decodable`); raised when
        traced, before any computation.
    """
    check_decodable(model.config)
    apply = functools.partial(model.apply, variables)
    config = model.config
    hidden = apply(tokens, state.position, method=EarlyExitLM.embed_position)  # [B, D]

    def mix_block(hidden, layer, bk_state):
        x, mixed, layer_state = apply(
            "mix_step", layer, hidden, _at(bk_state, layer), method=EarlyExitLM.block_part
        )
        return x, mixed, _set(bk_state, layer, layer_state)

    halt = halting_loop(
        apply,
        config,
        HaltState.make(hidden, state.bk_state),
        threshold,
        measure,
        "freeze",
        mix_block,
        compact,
    )

    def propagate(layer, bk_state):  # layers every token skipped
        layer_state = apply(
            "propagate", layer, halt.hidden, _at(bk_state, layer), method=EarlyExitLM.block_part
        )
        return _set(bk_state, layer, layer_state)

    bk_state = jax.lax.fori_loop(halt.layer, config.n_layers, propagate, halt.block_state)
    output = exit_outputs(apply, config, halt, output_fn)
    new_state = DecodeState(position=state.position + 1, bk_state=bk_state)
    return output, halt.exit_depth, halt.confidence, new_state


_jitted_step = jax.jit(decode_step, static_argnums=(0, 5), static_argnames=("compact",))


def _at(layered, layer):
    """Layer `layer` of a pytree with a leading layer axis."""
    return jax.tree.map(lambda x: x[layer], layered)


def _set(layered, layer, value):
    return jax.tree.map(lambda x, v: x.at[layer].set(v), layered, value)


def check_decodable(config: ModelConfig) -> None:
    """Raises ValueError unless the model can be decoded token by token.

    Decoding runs the causal recurrence (`bk_core.causal_step`): for a bidirectional
    model (causal=False) every position's G also depends on later positions, which
    a decoder has not seen, so the decoded outputs would not be the model's.
    """
    if config.mixer == "attention":
        raise ValueError(
            'token-by-token decoding is built for the recurrent mixers ("bk", "none"); '
            'this model\'s mixer is "attention", which would need a key-value cache. '
            "Score it with the batched evaluation (evaluate, early_exit_forward) instead"
        )
    if not config.causal:
        raise ValueError(
            "token-by-token decoding needs a causal model (causal=True); this one is "
            "bidirectional (causal=False): each position also reads later positions, "
            "which decoding has not seen yet"
        )


def decode_sequence(
    model: EarlyExitLM, variables, tokens, threshold=None, *, measure: str = "softmax_max"
):
    """Decodes [B, N] tokens one position at a time (teacher forcing).

    Returns:
      (logits [B, N, V], exit depths [B, N]).

    Raises:
      ValueError: a bidirectional model, bad tokens (`check_tokens`: ids outside
        [0, V), a non-integer dtype, not [B, N], N > n_seq) or bad exit options;
        raised before any computation.
    """
    threshold = model.config.confidence_threshold if threshold is None else threshold
    check_decodable(model.config)
    check_exit_options(threshold, measure, "freeze")
    check_tokens(tokens, model.config)
    tokens = jnp.asarray(tokens, jnp.int32)  # [B, N]; ids checked, so no value changes
    state = DecodeState.make(model.config, tokens.shape[0])
    logits, depths = [], []
    for position in range(tokens.shape[1]):
        step_logits, depth, _, state = _jitted_step(
            model, variables, state, tokens[:, position], jnp.float32(threshold), measure
        )
        logits.append(step_logits)
        depths.append(depth)
    return jnp.stack(logits, axis=1), jnp.stack(depths, axis=1)


def generate(
    model: EarlyExitLM,
    variables,
    prompt,
    steps: int,
    rng,
    *,
    threshold=None,
    measure: str = "softmax_max",
    temperature: float = 0.0,
    sample_top_k: int | None = None,
):
    """Continues each [B, P] prompt by `steps` tokens with early exit.

    temperature 0 is greedy; otherwise samples from softmax(logits / temperature),
    restricted to the sample_top_k largest logits when given (`sample_tokens`).

    Returns:
      (tokens [B, P + steps] int32, exit depths [B, P + steps - 1] of every
      prediction made, prompt positions included).

    Raises:
      ValueError: a bidirectional model, a bad prompt (`check_tokens`), steps not
        an integer >= 0, P + steps - 1 > n_seq, bad sampling parameters
        (`check_sampling`) or exit options; raised before any computation.
    """
    config = model.config
    threshold = config.confidence_threshold if threshold is None else threshold
    check_decodable(config)
    check_exit_options(threshold, measure, "freeze")
    check_tokens(prompt, config)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    batch, prompt_length = np.shape(prompt)
    if prompt_length + steps - 1 > config.n_seq:
        raise ValueError(
            f"prompt length {prompt_length} + steps {steps} - 1 must be at most "
            f"n_seq={config.n_seq}"
        )
    check_sampling(temperature, sample_top_k, config.vocab_size)
    prompt = jnp.asarray(prompt, jnp.int32)  # [B, P]; ids checked, so no value changes
    state = DecodeState.make(config, batch)
    tokens, depths = [prompt[:, i] for i in range(prompt_length)], []
    for position in range(prompt_length + steps - 1):
        logits, depth, _, state = _jitted_step(
            model, variables, state, tokens[position], jnp.float32(threshold), measure
        )
        depths.append(depth)
        if position + 1 >= prompt_length:
            key = jax.random.fold_in(rng, position)
            tokens.append(sample_tokens(logits, key, temperature, sample_top_k))
    depths = jnp.stack(depths, axis=1) if depths else jnp.zeros((batch, 0), jnp.int32)
    return jnp.stack(tokens, axis=1), depths


def check_sampling(temperature, sample_top_k, vocab_size: int) -> None:
    """Raises ValueError unless temperature is a finite real >= 0 and sample_top_k is
    None or an integer in [1, vocab_size]."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a real number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if sample_top_k is None:
        return
    if isinstance(sample_top_k, bool) or not isinstance(sample_top_k, numbers.Integral):
        raise ValueError(f"sample_top_k must be an integer or None, got {sample_top_k!r}")
    if not 1 <= sample_top_k <= vocab_size:
        raise ValueError(f"sample_top_k must be in [1, {vocab_size}], got {sample_top_k}")


@functools.partial(jax.jit, static_argnames="sample_top_k")
def sample_tokens(logits, rng, temperature, sample_top_k: int | None = None) -> jax.Array:
    """One token per row from softmax(logits / temperature) over the top k; [B] int32.

    Gumbel-max: with g ~ Gumbel(0, 1) i.i.d., argmax(logits / T + g) is a sample of
    softmax(logits / T). For T < 1 the same argmax is taken of logits + T * g
    (scaled by T > 0), so nothing can overflow: logits / T with T >= 1 is at most
    the logits, T * g with T < 1 at most g (|g| < 17 in float32). At T = 0, or a T
    whose product with g underflows, this is exactly the argmax (ties: lowest id):
    sampling tends to greedy as T -> 0+.

    sample_top_k keeps exactly k ids: the first k of a stable descending order of
    the logits, so a tie at the cut keeps the lowest ids.

    Args:
      logits: [B, V] logits (or log-probabilities) of the next token.
      rng: a PRNG key.
      temperature: [] finite, >= 0 (traced: one compilation for all).
      sample_top_k: None (every id) or k in [1, V] (static).
    """
    logits = logits.astype(jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    if sample_top_k is not None:
        order = jnp.argsort(-logits, axis=-1, stable=True)  # [B, V] ids, largest first
        rank = jnp.argsort(order, axis=-1)  # [B, V] each id's place in that order
        logits = jnp.where(rank < sample_top_k, logits, -jnp.inf)
    noise = jax.random.gumbel(rng, logits.shape, jnp.float32)  # [B, V], finite
    scores = jnp.where(
        temperature >= 1, logits / temperature + noise, logits + temperature * noise
    )  # [B, V]
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def stream_evaluate(
    model: EarlyExitLM,
    variables,
    stream,
    threshold,
    *,
    measure: str = "softmax_max",
    progress: bool = True,
) -> dict:
    """Scores every masked target of `stream` by decoding token by token.

    Each window of `stream` (B independent rows, n_seq positions) is decoded from
    a fresh state, as the parallel evaluation does, in one jitted scan over its
    positions; each exit head scores only the target (for an adaptive output: the
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
    window = functools.partial(_stream_window, model, variables, measure=measure)
    jax.block_until_ready(window(first.inputs, first.targets, first.mask, threshold))
    stats, total = ExitStats.zeros(config.n_layers), 0.0
    start = time.perf_counter()
    for index in tqdm(range(len(stream)), desc="stream", disable=not progress):
        batch = stream.window(index)
        nll, depth = window(batch.inputs, batch.targets, batch.mask, threshold)
        total += float(nll)
        info = ExitInfo(
            exit_depth=depth,
            confidence=jnp.zeros(depth.shape),
            layers_run=jnp.max(depth),
            flops_per_depth=per_depth,
            full_depth_flops=full,
        )
        stats = stats.update(info, batch.mask)
    seconds = time.perf_counter() - start
    summary = stats.summary()
    return {
        "measure": measure,
        "threshold": float(threshold),
        "batch_size": first.inputs.shape[0],
        "ppl": float(np.exp(total / summary["total_tokens"])),
        "seconds": seconds,
        "tokens_per_s": summary["total_tokens"] / seconds,
        **summary,
    }


@functools.partial(jax.jit, static_argnums=0, static_argnames="measure")
def _stream_window(model: EarlyExitLM, variables, inputs, targets, mask, threshold, *, measure):
    """Decodes a window [B, N] from a fresh state in one scan over its positions, each
    exit head scoring only the target: (summed NLL over masked targets [], depths [B, N])."""

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

    state = DecodeState.make(model.config, inputs.shape[0])
    _, (nll, depth) = jax.lax.scan(step, state, (inputs.T, targets.T))  # [N, B] each
    return jnp.sum(nll.T * mask), depth.T
