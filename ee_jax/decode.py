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
    exit_outputs,
    halting_loop,
)
from ee_jax.flops import exit_flops, tail_use_of
from ee_jax.model import EarlyExitLM


@flax.struct.dataclass
class DecodeState:
    """Everything a decoding step needs from the previous ones."""

    position: jax.Array  # [] int32: positions decoded so far (index of the next one)
    bk_state: jax.Array  # [L, B, H] complex64: previous causal G entry per layer and head

    @classmethod
    def make(cls, config: ModelConfig, batch: int) -> "DecodeState":
        return cls(
            position=jnp.zeros((), jnp.int32),
            bk_state=jnp.zeros((config.n_layers, batch, config.bk_heads), jnp.complex64),
        )


def decode_step(
    model: EarlyExitLM,
    variables,
    state: DecodeState,
    tokens,
    threshold,
    measure: str = "softmax_max",
    output_fn=adaptive.logits,
):
    """Feeds one token per sequence; returns (output [B, ...], exit depth [B] int32,
    confidence [B], new state). Pure: jit with model, measure and output_fn static.

    output_fn(output layer, exit features [B, D]) -> [B, ...] is what each token's
    exit head computes: by default its logits [B, V] (`adaptive.logits`); a
    target's NLL needs only the head and that target's cluster.
    """
    apply = functools.partial(model.apply, variables)
    config = model.config
    hidden = apply(tokens, state.position, method=EarlyExitLM.embed_position)  # [B, D]

    def run_block(hidden, layer, bk_state):
        after, layer_state = apply(hidden, bk_state[layer], layer, method=EarlyExitLM.block_step)
        return after, bk_state.at[layer].set(layer_state)

    halt = halting_loop(
        apply,
        config,
        HaltState.make(hidden, state.bk_state),
        threshold,
        measure,
        "freeze",
        run_block,
    )

    def propagate(layer, bk_state):  # layers every token skipped
        layer_state = apply(halt.hidden, bk_state[layer], layer, method=EarlyExitLM.block_propagate)
        return bk_state.at[layer].set(layer_state)

    bk_state = jax.lax.fori_loop(halt.layer, config.n_layers, propagate, halt.block_state)
    output = exit_outputs(apply, config, halt, output_fn)
    new_state = DecodeState(position=state.position + 1, bk_state=bk_state)
    return output, halt.exit_depth, halt.confidence, new_state


_jitted_step = jax.jit(decode_step, static_argnums=(0, 5))


def decode_sequence(
    model: EarlyExitLM, variables, tokens, threshold=None, *, measure: str = "softmax_max"
):
    """Decodes [B, N] tokens one position at a time (teacher forcing).

    Returns:
      (logits [B, N, V], exit depths [B, N]).
    """
    threshold = model.config.confidence_threshold if threshold is None else threshold
    check_exit_options(threshold, measure, "freeze")
    batch, length = tokens.shape
    if length > model.config.n_seq:
        raise ValueError(
            f"tokens have N = {length} positions, more than n_seq = {model.config.n_seq}"
        )
    state = DecodeState.make(model.config, batch)
    logits, depths = [], []
    for position in range(length):
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
    top_k: int | None = None,
):
    """Continues each [B, P] prompt by `steps` tokens with early exit.

    temperature 0 is greedy; otherwise samples from softmax(logits / temperature),
    restricted to the top_k tokens when given.

    Returns:
      (tokens [B, P + steps] int32, exit depths [B, P + steps - 1] of every
      prediction made, prompt positions included).
    """
    threshold = model.config.confidence_threshold if threshold is None else threshold
    check_exit_options(threshold, measure, "freeze")
    batch, prompt_length = prompt.shape
    if prompt_length < 1 or prompt_length + steps - 1 > model.config.n_seq:
        raise ValueError(
            f"prompt length {prompt_length} + steps {steps} - 1 must be in "
            f"[1, n_seq={model.config.n_seq}]"
        )
    if temperature < 0 or (top_k is not None and not 1 <= top_k <= model.config.vocab_size):
        raise ValueError(
            f"temperature must be >= 0 and top_k in [1, vocab_size], got {temperature}, {top_k}"
        )
    state = DecodeState.make(model.config, batch)
    tokens, depths = [prompt[:, i] for i in range(prompt_length)], []
    for position in range(prompt_length + steps - 1):
        logits, depth, _, state = _jitted_step(
            model, variables, state, tokens[position], jnp.float32(threshold), measure
        )
        depths.append(depth)
        if position + 1 >= prompt_length:
            tokens.append(_choose(logits, jax.random.fold_in(rng, position), temperature, top_k))
    return jnp.stack(tokens, axis=1), jnp.stack(depths, axis=1)


def _choose(logits, rng, temperature, top_k):
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if top_k is not None:
        cutoff = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits / temperature).astype(jnp.int32)


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
    """
    check_exit_options(threshold, measure, "freeze")
    config = model.config
    tail_use = tail_use_of(config, stream.targets, stream.mask)
    per_depth, full = (jnp.float32(x) for x in exit_flops(config, measure, "freeze", tail_use))

    @jax.jit
    def window(variables, inputs, targets, mask, threshold):
        def step(state, column):
            tokens, target = column
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

        state = DecodeState.make(config, inputs.shape[0])
        _, (nll, depth) = jax.lax.scan(step, state, (inputs.T, targets.T))  # [N, B] each
        return jnp.sum(nll.T * mask), depth.T

    threshold = jnp.float32(threshold)
    first = stream.window(0)
    jax.block_until_ready(window(variables, first.inputs, first.targets, first.mask, threshold))
    stats, total = ExitStats.zeros(config.n_layers), 0.0
    start = time.perf_counter()
    for index in tqdm(range(len(stream)), desc="stream", disable=not progress):
        batch = stream.window(index)
        nll, depth = window(variables, batch.inputs, batch.targets, batch.mask, threshold)
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
