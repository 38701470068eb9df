"""Confidence-based early exit: the jit-compiled halting loop and exit statistics.

A token exits after block l (1-based depth l) when its confidence reaches the
threshold; otherwise it exits at depth L with the final head. Its logits are
those of its exit head. The loop over layers is a masked `jax.lax.while_loop`
that stops as soon as every token of the batch has exited, so in a batched
teacher-forced pass it can only stop when the last token of the batch exits.
The threshold is traced: one compilation serves every threshold.

Threshold 1.0 means "never exit early": float32 probabilities round to exactly
1.0 for very confident tokens, so `confidence >= 1.0` would otherwise still
let some tokens exit.
"""

import functools
from typing import Any, Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ee_jax import adaptive
from ee_jax.config import ExitMeasure, ModelConfig, check_choice
from ee_jax.flops import exit_flops
from ee_jax.model import EarlyExitLM, check_tokens
from ee_jax.state import RecurrentState

ExitedState = Literal["freeze", "compute"]
SOFTMAX_MEASURES = (ExitMeasure.SOFTMAX_MAX, ExitMeasure.SOFTMAX_MARGIN)


@flax.struct.dataclass
class ExitInfo:
    """What the halting loop did, per token."""

    exit_depth: jax.Array  # [B, N] int32 in [1, L]: blocks run before the token's exit
    confidence: jax.Array  # [B, N] float32: the measure at the exit (final head's at L)
    layers_run: jax.Array  # [] int32: blocks the loop executed for the whole batch
    flops_per_depth: jax.Array  # [L] float32: cost-model FLOPs of a token exiting at l
    full_depth_flops: jax.Array  # [] float32: cost-model FLOPs of the plain forward


@flax.struct.dataclass
class HaltState:
    """The while_loop carry. Token shape [...]: [B, N] for a sequence, [B] when decoding."""

    layer: jax.Array  # [] int32: blocks run so far
    hidden: jax.Array  # [..., D] float32: residual stream (frozen rows for exited tokens)
    exited: jax.Array  # [...] bool
    exit_depth: jax.Array  # [...] int32: 0 until the token exits
    confidence: jax.Array  # [...] float32
    features: jax.Array  # [..., D] exit features (the exit head's LayerNorm) at the exit
    block_state: Any  # pytree the block function carries (decoding: the RecurrentState)

    @classmethod
    def make(cls, hidden: jax.Array, block_state: Any = ()) -> "HaltState":
        tokens = hidden.shape[:-1]
        return cls(
            layer=jnp.zeros((), jnp.int32),
            hidden=hidden,
            exited=jnp.zeros(tokens, bool),
            exit_depth=jnp.zeros(tokens, jnp.int32),
            confidence=jnp.zeros(tokens, jnp.float32),
            features=jnp.zeros_like(hidden),
            block_state=block_state,
        )


def early_exit_forward(
    model: EarlyExitLM,
    variables,
    tokens,
    threshold: float | None = None,
    *,
    measure: str = "softmax_max",
    exited_state: ExitedState = "freeze",
    compact: bool = True,
) -> tuple[jax.Array, ExitInfo]:
    """Runs the model with per-token early exit.

    Args:
      model: the `EarlyExitLM`.
      variables: its variables ({"params": ...}).
      tokens: [B, N] integer ids in [0, V), N <= n_seq.
      threshold: confidence needed to exit, in [0, 1]; default
        `model.config.confidence_threshold`. Traced: changing it never recompiles.
      measure: an `ExitMeasure` value: "softmax_max", "softmax_margin",
        "state_saturation" or "learned".
      exited_state: "freeze" copies an exited token's hidden state unchanged to
        deeper blocks, which still read it as context (what token-by-token
        decoding does); "compute" keeps updating it (as the original did).
      compact: under "freeze", run each block's MoE and exit check only on the
        tokens still active, gathered into a static size (`halting_loop`); the
        sequence mixer still runs on every token. False: the masked loop, which
        computes every token at every layer it runs. Same results either way.

    Returns:
      (logits [B, N, V] of each token's exit head, ExitInfo).

    Raises:
      ValueError: bad tokens, a threshold outside [0, 1], an unknown measure or
        exited_state; raised before any computation.
    """
    threshold = model.config.confidence_threshold if threshold is None else threshold
    measure = check_exit_options(threshold, measure, exited_state)
    check_tokens(tokens, model.config)
    return _jitted_early_exit(
        model,
        variables,
        tokens,
        jnp.float32(threshold),
        measure,
        exited_state,
        compact=compact,
    )[:2]


def check_exit_options(threshold, measure: str, exited_state: str) -> ExitMeasure:
    """Validates the options of `early_exit_forward`; returns the measure."""
    if not isinstance(threshold, jax.core.Tracer) and not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if measure not in ExitMeasure._value2member_map_:
        raise ValueError(
            f"measure must be one of {[m.value for m in ExitMeasure]}, got {measure!r}"
        )
    check_choice("exited_state", exited_state, ExitedState)
    return ExitMeasure(measure)


def check_stream(stream, config: ModelConfig) -> None:
    """Raises ValueError, before any computation, for a stream (`LMStream`) the model
    cannot read: ids outside [0, V) in its inputs or targets, or windows longer
    than n_seq. Checked once for the whole stream, not per window."""
    if not 1 <= stream.n_seq <= config.n_seq:
        raise ValueError(f"stream windows have {stream.n_seq} positions, n_seq is {config.n_seq}")
    check_tokens(stream.inputs, config, stream=True)
    check_tokens(stream.targets, config, stream=True)
    shapes = [np.shape(array) for array in (stream.inputs, stream.targets, stream.mask)]
    if len(set(shapes)) != 1:
        raise ValueError(f"stream inputs, targets and mask must have one shape, got {shapes}")


def early_exit_loop(
    model,
    variables,
    tokens,
    threshold,
    measure,
    exited_state,
    output_fn=adaptive.logits,
    compact: bool = True,
    state: RecurrentState | None = None,
):
    """The halting loop over a sequence (pure; jit with model, measure, exited_state,
    output_fn and compact static). Returns (output_fn of each token's exit features at
    its exit head [B, N, ...], ExitInfo, the state after the tokens or None); see
    `exit_outputs` and `decode.decode_step`.

    state: None reads the tokens from the start of a text; a `RecurrentState`
    continues from it (a causal recurrent model: the continuous protocol) and the
    state after the tokens is returned, where every block a token skipped has
    still read its exited hidden state (as `decode.decode_step` does: under
    "freeze" a window from a state gives what decoding it token by token gives).
    """
    apply = functools.partial(model.apply, variables)
    offset = 0 if state is None else state.position
    hidden = apply(tokens, True, offset, method=EarlyExitLM.embed)

    def mix_block(hidden, layer, state):
        if state is None:
            return *apply(layer, hidden, method=EarlyExitLM.block_mix), None
        layer_state = state.layer(layer)
        x, mixed, after = apply(layer, hidden, layer_state, method=EarlyExitLM.block_mix_from)
        return x, mixed, state.with_layer(layer, after)

    halt = halting_loop(
        apply,
        model.config,
        HaltState.make(hidden, state),
        threshold,
        measure,
        exited_state,
        mix_block,
        compact,
    )
    output = exit_outputs(apply, model.config, halt, output_fn)
    after = None
    if state is not None:  # the blocks every token skipped read the exited states too
        after = jax.lax.fori_loop(
            halt.layer,
            model.config.n_layers,
            lambda layer, s: mix_block(halt.hidden, layer, s)[2],
            halt.block_state,
        )
        after = after.replace(position=state.position + tokens.shape[1])
    return output, exit_info(model.config, halt, measure, exited_state), after


COMPACT_SIZES = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4)  # fractions of the tokens


def halting_loop(
    apply,
    config: ModelConfig,
    state: HaltState,
    threshold,
    measure,
    exited_state,
    mix_block,
    compact: bool = True,
) -> HaltState:
    """Runs blocks while some token has not exited; shared by sequences and decoding.

    A block is split into its sequence mixer, run on every token (exited tokens
    still feed their frozen state to later tokens), and the per-token rest: the
    MoE FFN and the exit check. With `compact` (and "freeze") the per-token rest
    runs only on the active tokens, gathered into the smallest of the static sizes
    COMPACT_SIZES x T that holds them (`adaptive.on_selected`: one `lax.switch`
    branch runs), so layer savings of a batch become time before its deepest
    token exits. Otherwise every token is computed (the masked loop).

    Args:
      apply: `model.apply` with the variables bound.
      state: the initial carry (`HaltState.make` of the embeddings).
      mix_block: (hidden, layer, block_state) -> (LN(hidden), mixer output,
        block_state) of block `layer` (`Block.mix` / `Block.mix_step`).
    """
    measure = ExitMeasure(measure)
    can_exit_early = threshold < 1.0
    compact = compact and exited_state == "freeze"
    # Inside a compacted branch the tokens are gathered already: a tail cluster runs
    # for all of them or none (a second ladder of gather sizes in each of the
    # branches made the loop compile 4x slower).
    tail_capacity = () if compact else None

    def cond_fn(state: HaltState) -> jax.Array:
        return (state.layer < config.n_layers) & ~jnp.all(state.exited)

    def body_fn(state: HaltState) -> HaltState:
        layer = state.layer
        x, mixed, block_state = mix_block(state.hidden, layer, state.block_state)

        def per_token(inputs):  # [T, D] each -> after, features [T, D], confidence [T]
            before, x, mixed = inputs
            # The same sum as Block.__call__, h + (MoE + mixer), so that the loop's
            # hidden states equal the training path's bit for bit (exit decisions
            # at a threshold must not flip on rounding).
            update = apply(layer, x, method=EarlyExitLM.block_feed_forward)
            after = before + (update + mixed)
            features = apply(after, layer, method=EarlyExitLM.exit_features)
            confidence = _confidence(
                apply, measure, before, after, features, layer, threshold, tail_capacity
            )
            return after, features, confidence

        tokens = state.exited.shape
        flat = [a.reshape(-1, a.shape[-1]) for a in (state.hidden, x, mixed)]
        if compact:
            empty = (flat[0], jnp.zeros_like(flat[0]), jnp.zeros(flat[0].shape[0]))
            active = ~state.exited.reshape(-1)
            outputs = adaptive.on_selected(per_token, tuple(flat), active, COMPACT_SIZES, empty)
        else:
            outputs = per_token(tuple(flat))
        after, features, confidence = (o.reshape(*tokens, *o.shape[1:]) for o in outputs)
        exits = ((confidence >= threshold) & can_exit_early) | (layer == config.n_layers - 1)
        newly = exits & ~state.exited
        if exited_state == "freeze":
            after = jnp.where(state.exited[..., None], state.hidden, after)
        return state.replace(
            layer=layer + 1,
            hidden=after,
            exited=state.exited | newly,
            exit_depth=jnp.where(newly, layer + 1, state.exit_depth),
            confidence=jnp.where(newly, confidence, state.confidence),
            features=jnp.where(newly[..., None], features, state.features),
            block_state=block_state,
        )

    return jax.lax.while_loop(cond_fn, body_fn, state)


def exit_info(config: ModelConfig, state: HaltState, measure, exited_state) -> ExitInfo:
    per_depth, full = exit_flops(config, measure, exited_state)
    return ExitInfo(
        exit_depth=state.exit_depth,
        confidence=state.confidence,
        layers_run=state.layer,
        flops_per_depth=jnp.asarray(per_depth, jnp.float32),
        full_depth_flops=jnp.float32(full),
    )


_jitted_early_exit = jax.jit(
    early_exit_loop, static_argnums=(0, 4, 5), static_argnames=("output_fn", "compact")
)


def _confidence(
    apply, measure, before, after, features, layer, threshold, capacity=None
) -> jax.Array:
    """The measure for every token after block `layer`; [...] (token shape).

    Softmax measures are decided exactly from the exit's head, evaluating tail
    clusters only where they can change "confidence >= threshold"
    (`adaptive.exit_confidence`, gathering those tokens by `capacity`).
    """
    if measure in SOFTMAX_MEASURES:
        output = apply(layer, method=EarlyExitLM.output_layer)
        flat = features.reshape(-1, features.shape[-1])  # [T, D]
        confidence = adaptive.exit_confidence(output, flat, measure, threshold, capacity)
        return confidence.reshape(features.shape[:-1])
    if measure == ExitMeasure.LEARNED:
        return jax.nn.sigmoid(apply(after, layer, method=EarlyExitLM.exit_classifier))
    return state_saturation(before, after)


def softmax_confidence(logits: jax.Array, measure: ExitMeasure) -> jax.Array:
    """Max probability, or top-1 minus top-2 probability, of logits [..., V]; [...].

    Computed from the log-normaliser, without materialising the softmax. The
    second largest logit is the largest after masking the maximum (the maximum
    itself when it is tied): `lax.top_k` on [B, N, V] took 12 s here on CPU.
    """
    normaliser = jax.nn.logsumexp(logits, axis=-1)
    top = jnp.max(logits, axis=-1)
    if measure == ExitMeasure.SOFTMAX_MAX:
        return jnp.exp(top - normaliser)
    is_top = logits == top[..., None]
    second = jnp.where(
        jnp.sum(is_top, axis=-1) > 1, top, jnp.max(jnp.where(is_top, -jnp.inf, logits), axis=-1)
    )
    return jnp.exp(top - normaliser) - jnp.exp(second - normaliser)


def state_saturation(before: jax.Array, after: jax.Array) -> jax.Array:
    """Cosine similarity of a token's hidden state before and after a block; [...]."""
    return jnp.sum(before * after, -1) / (
        jnp.linalg.norm(before, axis=-1) * jnp.linalg.norm(after, axis=-1)
    )


def exit_outputs(apply, config: ModelConfig, state: HaltState, fn):
    """fn(output layer, features [T, D]) -> [T, ...] (or a pytree of them) of every
    token at its exit head.

    Run from each token's stored exit features: once per exit head that some token
    used (a single head unless heads are per exit). Carrying features [..., D]
    through the loop instead of logits avoids a [..., V] select per layer; the
    output computed at the end is the one a token's exit head computes anyway.

    Returns: [*token shape, ...] (a pytree of them).
    """
    tokens = state.exit_depth.shape
    features = state.features.reshape(-1, state.features.shape[-1])  # [T, D]

    def run(layer):
        output = fn(apply(layer, method=EarlyExitLM.output_layer), features)  # [T, ...]
        return jax.tree.map(lambda o: o.reshape(*tokens, *o.shape[1:]), output)

    if config.unembedding != "per_exit":
        return run(0)

    def add_head(layer, outputs):
        chosen = state.exit_depth == layer + 1  # [...]
        expand = lambda c, o: c.reshape(*c.shape, *[1] * (o.ndim - c.ndim))  # noqa: E731
        select = lambda new, old: jnp.where(expand(chosen, old), new, old)  # noqa: E731
        return jax.lax.cond(
            jnp.any(chosen),
            lambda: jax.tree.map(select, run(layer), outputs),
            lambda: outputs,
        )

    empty = jax.tree.map(lambda o: jnp.zeros(o.shape, o.dtype), jax.eval_shape(run, 0))
    return jax.lax.fori_loop(0, config.n_layers, add_head, empty)


@flax.struct.dataclass
class ExitStats:
    """Exit statistics accumulated over batches (pure: `update` returns a new one)."""

    depth_counts: jax.Array  # [L] int32: tokens that exited at depth 1..L
    flops: jax.Array  # [] float32: cost-model FLOPs spent with early exit
    full_flops: jax.Array  # [] float32: cost-model FLOPs of the full forward, same tokens

    @classmethod
    def zeros(cls, n_layers: int) -> "ExitStats":
        return cls(
            depth_counts=jnp.zeros(n_layers, jnp.int32),
            flops=jnp.zeros((), jnp.float32),
            full_flops=jnp.zeros((), jnp.float32),
        )

    def update(self, info: ExitInfo, mask: jax.Array | None = None) -> "ExitStats":
        """Adds the tokens of `info` (only where `mask` [B, N] is true, if given)."""
        mask = jnp.ones_like(info.exit_depth, bool) if mask is None else mask.astype(bool)
        n_layers = self.depth_counts.shape[0]
        onehot = jax.nn.one_hot(info.exit_depth - 1, n_layers, dtype=jnp.int32)  # [B, N, L]
        counts = jnp.sum(onehot * mask[..., None], axis=(0, 1))  # [L]
        return self.replace(
            depth_counts=self.depth_counts + counts,
            flops=self.flops + jnp.sum(counts * info.flops_per_depth),
            full_flops=self.full_flops + jnp.sum(counts) * info.full_depth_flops,
        )

    def summary(self) -> dict:
        """Host-side numbers (avg_exit_layer is 1-based; layer_speedup = L / avg)."""
        counts = np.asarray(self.depth_counts, np.float64)
        total = counts.sum()
        n_layers = len(counts)
        if total == 0:
            raise ValueError("ExitStats.summary() needs at least one token")
        average = float(np.dot(counts, np.arange(1, n_layers + 1)) / total)
        return {
            "avg_exit_layer": average,
            "exit_distribution": (counts / total).tolist(),
            "layer_speedup": n_layers / average,
            "flops_speedup": float(self.full_flops) / float(self.flops),
            "total_tokens": int(total),
        }
