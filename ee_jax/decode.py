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

Generation reads the prompt in one parallel pass (`EarlyExitLM.hidden_states_from`,
full depth: no prediction is made inside a prompt, so nothing exits there), then
produces tokens in jitted `lax.scan`s over chunks of steps, each step one
`decode_step` with per-token exits. The state (`state.RecurrentState`) is all a
continuation needs: it can be saved (`save_state`) and generation resumed later.
For position "none" nothing bounds the length: work and memory per token are
constant.
"""

import functools
import os
import pathlib
from collections.abc import Callable

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from ee_jax import adaptive, speculative
from ee_jax.config import ModelConfig, check_count
from ee_jax.early_exit import (
    HaltState,
    check_exit_options,
    exit_outputs,
    halting_loop,
)
from ee_jax.model import EarlyExitLM, check_positions, check_tokens
from ee_jax.sampling import check_sampling, row_key, sample_ranked, sample_tokens
from ee_jax.state import RecurrentState, check_carry, check_state


def decode_step(
    model: EarlyExitLM,
    variables,
    state: RecurrentState,
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
      ValueError: the model is bidirectional (`check_decodable`), or the state's
        position is past a "learned" position table (`check_positions`: checked
        when the position is concrete; under jit it is traced, and the entry
        point that jits the steps checks it, as `generate` does); raised before
        any computation.
    """
    check_decodable(model.config)
    if not isinstance(state.position, jax.core.Tracer):
        check_positions(model.config, int(np.max(state.position)), 1)
    apply = functools.partial(model.apply, variables)
    config = model.config
    hidden = apply(tokens, state.position, method=EarlyExitLM.embed_position)  # [B, D]

    def mix_block(hidden, layer, state):
        x, mixed, layer_state = apply(
            layer, hidden, state.layer(layer), method=EarlyExitLM.block_mix_step
        )
        return x, mixed, state.with_layer(layer, layer_state)

    halt = halting_loop(
        apply,
        config,
        HaltState.make(hidden, state),
        threshold,
        measure,
        "freeze",
        mix_block,
        compact,
    )

    def propagate(layer, state):  # layers every token skipped
        layer_state = apply(
            layer, halt.hidden, state.layer(layer), method=EarlyExitLM.block_propagate
        )
        return state.with_layer(layer, layer_state)

    new_state = jax.lax.fori_loop(halt.layer, config.n_layers, propagate, halt.block_state)
    output = exit_outputs(apply, config, halt, output_fn)
    new_state = new_state.replace(position=state.position + 1)
    return output, halt.exit_depth, halt.confidence, new_state


def check_decodable(config: ModelConfig) -> None:
    """Raises ValueError unless the model can be decoded token by token.

    Decoding runs the causal recurrence (`bk_core.causal_step`), which needs what a
    pass continuing from a state needs (`state.check_carry`): for a bidirectional
    model every position's G also depends on later positions, which a decoder has
    not seen, and the attention mixer would need a key-value cache.
    """
    check_carry(config)


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
    state = RecurrentState.make(model.config, tokens.shape[0])
    return _decode_scan(model, variables, state, tokens, jnp.float32(threshold), measure)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _decode_scan(model, variables, state, tokens, threshold, measure):
    """`decode_step` over the columns of tokens [B, N] in one scan: (logits [B, N, V],
    depths [B, N])."""

    def step(state, column):
        logits, depth, _, state = decode_step(model, variables, state, column, threshold, measure)
        return state, (logits, depth)

    _, (logits, depths) = jax.lax.scan(step, state, tokens.T)  # [N, B, ...]
    return jnp.swapaxes(logits, 0, 1), depths.T


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
    sample_top_p: float | None = None,
    state: RecurrentState | None = None,
    stop_token: int | None = None,
    chunk: int = 64,
    on_chunk: Callable[[np.ndarray, np.ndarray], None] | None = None,
    return_state: bool = False,
    draft_exit: int | None = None,
    draft_tokens: int = 1,
    draft_threshold: float = 0.0,
    return_stats: bool = False,
):
    """Continues each [B, P] prompt by `steps` tokens with early exit, or by the full
    model's tokens drafted by an early exit (self-speculative decoding).

    The prompt is read in one parallel pass at full depth, from `state` (default:
    the start of a text); then each new token is one `decode_step` with per-token
    exits, `chunk` steps per jitted scan. temperature 0 is greedy; otherwise
    samples from softmax(logits / temperature), restricted to the sample_top_k
    largest logits and then to the nucleus of mass sample_top_p when given
    (`sample_tokens`; with a top k, its k candidates come from the exit's head
    and only the tail clusters that can hold one, `adaptive.top_k`), with the key
    `row_key(rng, row, position of the token fed)`: the output does not depend on
    `chunk` or on the other rows of the batch, and a generation resumed
    from a returned state continues exactly as an uninterrupted one (pass the last
    token as the prompt and the same rng).

    With draft_exit, each chunk is rounds of `speculative.speculative_chunk`: exit
    draft_exit drafts draft_tokens tokens, blocks draft_exit+1..L verify them in
    one pass, and the tokens are the full model's (greedy: exactly threshold 1.0's;
    sampling: exactly its distribution). A round's key is `row_key(rng, row,
    position of its first token fed)`; rounds start where the last one's tokens
    end, and a chunk cuts the round at its end, so sampled text depends on
    `chunk` and a resumed generation continues an uninterrupted one exactly when
    the first call's steps is a multiple of `chunk` (greedy text: always).

    Args:
      prompt: [B, P] ids, P >= 1 (after a returned state: its last token).
      steps: new tokens per row, an integer >= 0; unbounded for position "none".
      state: the state before the prompt (a returned or loaded `RecurrentState`).
      stop_token: a row stops at this id (e.g. `Vocabulary.eos_id`): it reads
        nothing more, its later places repeat the id (exit depth 0), and
        generation ends at the stop of the last row to stop.
      chunk: steps per jitted scan (>= 1); on_chunk(tokens [B, n], exit depths [B, n])
        sees each chunk's new tokens as soon as they exist (to print them).
      return_state: also return the state after the last token fed (the last
        generated token is not fed yet: continue with it as the prompt). A row
        that stopped has read its text up to its stop token (not fed yet), and is
        at that token's position.
      draft_exit: None (per-token early exit) or the exit that drafts, an integer
        in [1, L - 1]; threshold and measure are then unused (a threshold other
        than None or 1.0 is refused: the tokens are the full model's).
      draft_tokens: the most drafts per verify pass, an integer >= 1 (with draft_exit).
      draft_threshold: in [0, 1]: a row stops drafting after a draft whose
        confidence (the draft exit's probability of its most likely token, in the
        distribution it draws from) is below it (`speculative.draft`); 0: always
        draft_tokens drafts.
      return_stats: also return the `speculative.SpeculativeStats` of the verify
        passes (with draft_exit).

    Returns:
      (tokens [B, P + S] int32, exit depths [B, S] of each new token), S <= steps
      (less only with stop_token), plus the RecurrentState with return_state, plus
      the SpeculativeStats with return_stats. With draft_exit a token's depth is
      draft_exit for an accepted draft and L for the full model's own token.

    Raises:
      ValueError: a bidirectional or attention model, a bad prompt
        (`check_tokens`), steps or chunk not an integer in range, a state of
        another batch size or model, a "learned" position table too short for
        the positions, bad sampling parameters (`check_sampling`), stop_token out
        of range, bad exit or draft options (`speculative.check_draft`), or
        return_stats without draft_exit; raised before any computation.
    """
    config = model.config
    check_decodable(config)
    if draft_exit is None:
        threshold = config.confidence_threshold if threshold is None else threshold
        check_exit_options(threshold, measure, "freeze")
        if return_stats:
            raise ValueError("return_stats needs draft_exit: stats are of verify passes")
    else:
        speculative.check_draft(config, draft_exit, draft_tokens, draft_threshold)
        if threshold is not None and threshold != 1.0:
            raise ValueError(
                f"with draft_exit the tokens are the full model's: threshold must be None "
                f"or 1.0, got {threshold!r}"
            )
    check_tokens(prompt, config, stream=True)
    check_count("steps", steps, 0)
    check_count("chunk", chunk, 1)
    check_sampling(temperature, sample_top_k, config.vocab_size, sample_top_p)
    batch, prompt_length = np.shape(prompt)
    state = RecurrentState.make(config, batch) if state is None else state
    check_state(state, config, batch)
    check_positions(config, int(np.max(state.position)), prompt_length + steps - 1)
    if stop_token is not None:
        check_count("stop_token", stop_token, 0)
        if stop_token >= config.vocab_size:
            raise ValueError(f"stop_token must be in [0, {config.vocab_size}), got {stop_token}")
    prompt = jnp.asarray(prompt, jnp.int32)  # [B, P]; ids checked, so no value changes
    if prompt_length > 1:
        state = _prefill(model, variables, state, prompt[:, :-1])
    options = dict(sample_top_k=sample_top_k, greedy=temperature == 0)
    options["sample_top_p"] = None if sample_top_p is None else jnp.float32(sample_top_p)
    stop = jnp.int32(-1 if stop_token is None else stop_token)  # -1: no id matches
    scalars = (jnp.float32(temperature), rng, stop)
    if draft_exit is None:
        generate_chunk = functools.partial(
            _generate_chunk, threshold=jnp.float32(threshold), measure=measure, **options
        )
    else:
        generate_chunk = functools.partial(
            speculative.speculative_chunk,
            draft_threshold=jnp.float32(draft_threshold),
            draft_exit=int(draft_exit),
            draft_tokens=int(draft_tokens),
            **options,
        )
    last, stopped = prompt[:, -1], jnp.zeros(batch, bool)
    tokens, depths, accepted = [np.asarray(prompt)], [], []
    for done in range(0, steps, chunk):
        length, fed = min(chunk, steps - done), np.asarray(state.position)
        with jax.profiler.TraceAnnotation("generate_chunk"):  # named in a profiler trace
            new, depth, state, stopped, *rounds = generate_chunk(
                model, variables, state, last, stopped, *scalars, length
            )
        if rounds:  # drafts accepted and made per round [length, B]: the rounds that ran
            ran, made = np.asarray(rounds[0][0]), np.asarray(rounds[0][1])
            count = int((ran >= 0).any(axis=1).sum())
            accepted.append((ran[:count], made[:count]))
        last = new[:, -1]  # a stopped row's places repeat its stop token
        # A row's position advances while it is going: the chunk ends at the last stop.
        kept = int(np.max(np.asarray(state.position) - fed))
        tokens.append(np.asarray(new)[:, :kept])
        depths.append(np.asarray(depth)[:, :kept])
        if on_chunk is not None:
            on_chunk(tokens[-1], depths[-1])
        if np.all(stopped):
            break
    tokens = jnp.asarray(np.concatenate(tokens, axis=1))
    depths = jnp.asarray(
        np.concatenate(depths, axis=1) if depths else np.zeros((batch, 0)), jnp.int32
    )
    outputs = (tokens, depths) + ((state,) if return_state else ())
    if return_stats:
        ran, made = (
            [np.concatenate(parts) for parts in zip(*accepted, strict=True)]
            if accepted
            else [np.zeros((0, batch), np.int32)] * 2
        )
        outputs += (speculative.SpeculativeStats(ran, made, int(draft_tokens)),)
    return outputs


@functools.partial(jax.jit, static_argnums=0)
def _prefill(model: EarlyExitLM, variables, state: RecurrentState, tokens) -> RecurrentState:
    """The state after tokens [B, N] read from `state` in one parallel pass."""
    return model.apply(variables, tokens, state, method=EarlyExitLM.hidden_states_from)[2]


def greedy_token(output: adaptive.OutputLayer, features: jax.Array) -> jax.Array:
    """The greedy token of exit features [T, D]: the exact argmax of the exit's
    distribution (lowest id among ties, as `sample_tokens` at temperature 0), from its
    head and only the tail clusters that can hold it (`adaptive.exact_argmax`); [T]."""
    return adaptive.exact_argmax(output, features)[0]


@functools.partial(
    jax.jit, static_argnums=(0, 8), static_argnames=("measure", "sample_top_k", "greedy")
)
def _generate_chunk(
    model,
    variables,
    state,
    token,
    stopped,
    temperature,
    rng,
    stop,
    length,
    *,
    threshold,
    measure,
    sample_top_k,
    greedy,
    sample_top_p,
):
    """`length` generation steps from `token` [B] in one scan: (new tokens [B, length],
    their exit depths [B, length], state after feeding all but the last new token,
    stopped [B]).

    A row that has written `stop` (stopped [B]) is frozen: its state (position
    included) keeps what it had before the stop was fed, its places repeat `stop`
    at exit depth 0."""

    def step(carry, _):
        state, token, stopped = carry
        key = jax.vmap(row_key, (None, 0, 0))(rng, jnp.arange(token.shape[0]), state.position)
        if greedy:  # the exact argmax, without every word's log-probability
            new, depth, _, after = decode_step(
                model, variables, state, token, threshold, measure, greedy_token
            )
        elif sample_top_k is not None:  # the k candidates, without every word's logit
            top_k = functools.partial(adaptive.top_k, k=sample_top_k)
            (values, ids), depth, _, after = decode_step(
                model, variables, state, token, threshold, measure, top_k
            )
            new = sample_ranked(values, ids, key, temperature, sample_top_p)
        else:
            logits, depth, _, after = decode_step(
                model, variables, state, token, threshold, measure
            )
            new = sample_tokens(logits, key, temperature, None, sample_top_p)
        state = after.select(~stopped, state)  # a stopped row keeps its state and position
        new, depth = jnp.where(stopped, stop, new), jnp.where(stopped, 0, depth)
        return (state, new, stopped | (new == stop)), (new, depth)

    (state, _, stopped), (tokens, depths) = jax.lax.scan(
        step, (state, token, stopped), length=length
    )
    return tokens.T, depths.T, state, stopped


def save_state(path: str | os.PathLike, state: RecurrentState) -> None:
    """Writes a decoding state to `path` (flax msgpack, written whole or not at all)."""
    path = pathlib.Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(flax.serialization.to_bytes(jax.device_get(state)))
    os.replace(temporary, path)


def load_state(path: str | os.PathLike, config: ModelConfig, batch: int) -> RecurrentState:
    """The decoding state saved at `path` for this model and batch size.

    Raises:
      ValueError: the file is not a saved state of this model and batch size.
    """
    template = RecurrentState.make(config, batch)
    try:
        state = flax.serialization.from_bytes(template, pathlib.Path(path).read_bytes())
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a decoding state of this model: {error}") from error
    check_state(state, config, batch)
    return jax.tree.map(jnp.asarray, state)
