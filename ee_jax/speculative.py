"""Self-speculative decoding: early exits made lossless.

Exit e (blocks 1..e, then its head) drafts k tokens one at a time; blocks
e+1..L then read the k + 1 tokens fed in the round (the last accepted token and
the k drafts) in one parallel pass from their saved BK states
(`EarlyExitLM.trace_blocks`). That pass gives the full model's prediction at
each of the k + 1 positions, and every layer's state after each position. Each
row keeps its drafts up to the first one the full model rejects, plus one token
of the full model's (a correction, or a bonus after k accepted drafts): 1 to
k + 1 tokens per verify pass. Because a recurrent layer's state after every
position comes out of the parallel pass, rolling a row back to its last accepted
token is picking an index; a transformer would have to trim a key-value cache.
Rows accept different counts and keep going at their own positions.

Greedy (temperature 0), the tokens are full-depth greedy decoding's
(`decode.generate` at threshold 1.0). Sampling accepts a draft d with
probability min(1, p(d) / q(d)) and replaces the first rejected one by a sample
of norm(max(0, p - q)) (speculative sampling: Leviathan et al. 2023, "Fast
Inference from Transformers via Speculative Decoding"; Chen et al. 2023), so
the output has exactly the full model's distribution (p, q: the full model's and
the draft exit's distributions after temperature, top-k and nucleus; with a
top k, both are lists of k candidates, `exit_distribution`).

Self-speculation with a model's own early layers: Draft & Verify (Zhang et al.
2023), LayerSkip (Elhoushi et al. 2024). It is a mode of `decode.generate`
(`draft_exit=`, `draft_tokens=`), with everything that has: a starting state,
a stop token, streaming by chunks, the returned state.
"""

import dataclasses
import functools
import numbers
import operator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ee_jax import adaptive
from ee_jax.config import ModelConfig, check_count
from ee_jax.model import EarlyExitLM
from ee_jax.sampling import (
    ranked_nucleus,
    row_key,
    tempered_log_probs,
    top_p_logits,
)
from ee_jax.state import RecurrentState


@dataclasses.dataclass(frozen=True)
class SpeculativeStats:
    """What the verify passes of a speculative `decode.generate` did, per row.

    accepted_per_round: [R, B] drafts accepted by each verify pass (0..k), -1
      where the row had all its tokens or had stopped (R: the most rounds any
      row took). A round cut at a chunk's end or a stop token keeps fewer tokens
      than it accepted; the count is the pass's.
    drafted_per_round: [R, B] drafts made for each verify pass (1..k; fewer than
      k where a draft's confidence fell below the draft threshold), 0 where
      accepted_per_round is -1.
    draft_tokens: k, the most drafts per round.
    """

    accepted_per_round: np.ndarray
    drafted_per_round: np.ndarray
    draft_tokens: int

    @property
    def rounds(self) -> np.ndarray:
        """Verify passes per row; [B]."""
        return (self.accepted_per_round >= 0).sum(axis=0)

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / drafts made, over every round of every row."""
        done = self.accepted_per_round >= 0
        made = self.drafted_per_round[done].sum()
        return float(self.accepted_per_round[done].sum() / made) if made else 0.0

    @property
    def drafts_per_round(self) -> float:
        """Drafts made per verify pass, over every round of every row."""
        done = self.accepted_per_round >= 0
        return float(self.drafted_per_round[done].mean()) if done.any() else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens per verify pass (accepted drafts + 1), over every round of every row."""
        done = self.accepted_per_round[self.accepted_per_round >= 0]
        return float(done.mean() + 1) if done.size else 0.0


def check_draft(config: ModelConfig, draft_exit, draft_tokens, draft_threshold=0.0) -> None:
    """Raises ValueError unless draft_exit is an integer in [1, L - 1] (1-based: the
    exit after block draft_exit), draft_tokens an integer >= 1 and draft_threshold
    a real in [0, 1]."""
    check_count("draft_tokens", draft_tokens, 1)
    if (
        isinstance(draft_threshold, bool)
        or not isinstance(draft_threshold, numbers.Real)
        or not 0.0 <= draft_threshold <= 1.0
    ):
        raise ValueError(f"draft_threshold must be a real in [0, 1], got {draft_threshold!r}")
    if (
        isinstance(draft_exit, bool)
        or not isinstance(draft_exit, numbers.Integral)
        or not 1 <= draft_exit < config.n_layers
    ):
        raise ValueError(
            f"draft_exit must be an integer in [1, {config.n_layers - 1}] (an exit before "
            f"the last), got {draft_exit!r}"
        )


def exit_distribution(apply, hidden, layer, sampling):
    """Exit `layer`'s sampling distribution at hidden states [..., D] (`sample_tokens`'):
    (log probabilities [..., n], their ids [..., n] or None). With a top k: over the
    exit's k most likely words (`adaptive.top_k`, n = k, descending; no [..., V]
    array); otherwise over the whole vocabulary in id order (n = V, ids None).
    Then over the nucleus of mass sample_top_p; a T that is 0 to float32
    arithmetic gives all the mass to the argmax (`sampling.tempered_log_probs`).

    sampling: (temperature [], sample_top_k, sample_top_p)."""
    temperature, sample_top_k, sample_top_p = sampling
    if sample_top_k is None:
        logits = apply(hidden, layer, method=EarlyExitLM.exit_head)
        if sample_top_p is not None:
            logits = top_p_logits(logits, temperature, sample_top_p)
        return tempered_log_probs(logits, temperature), None
    output = apply(layer, method=EarlyExitLM.output_layer)
    features = apply(hidden, layer, method=EarlyExitLM.exit_features)
    values, ids = adaptive.top_k(output, features.reshape(-1, features.shape[-1]), sample_top_k)
    values = ranked_nucleus(values, temperature, sample_top_p)
    shape = (*features.shape[:-1], sample_top_k)
    return tempered_log_probs(values, temperature).reshape(shape), ids.reshape(shape)


def _fold_in(keys, data) -> jax.Array:
    """Each of keys [B] folded with `data`; [B]."""
    return jax.vmap(jax.random.fold_in, (0, None))(keys, data)


def _draw(keys, distribution) -> jax.Array:
    """A token per row from an `exit_distribution` ([B, n] entries), row b with key
    keys[b]; [B] int32."""
    log_probs, ids = distribution
    index = jax.vmap(jax.random.categorical)(keys, log_probs)
    token = index if ids is None else jnp.take_along_axis(ids, index[..., None], -1)[..., 0]
    return token.astype(jnp.int32)


def _log_prob_of(distribution, tokens) -> jax.Array:
    """log p of tokens [...] under an `exit_distribution` with entries [..., n]; [...]
    (-inf for a token outside a top-k list: ids in a list are distinct)."""
    log_probs, ids = distribution
    if ids is None:
        return jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
    return jnp.max(jnp.where(ids == tokens[..., None], log_probs, -jnp.inf), axis=-1)


def _per_row(x, index, position_axis: int, batch_axis: int):
    """Each row's entry at its own position: x with position_axis removed, where row b
    (along batch_axis) takes position index[b]."""
    row_position_axis = position_axis - (position_axis > batch_axis)
    out_batch_axis = batch_axis - (position_axis < batch_axis)
    take = lambda row, i: jnp.take(row, i, axis=row_position_axis)  # noqa: E731
    return jax.vmap(take, in_axes=(batch_axis, 0), out_axes=out_batch_axis)(x, index)


def draft(model, variables, token, position, layers, keys, threshold, *, draft_exit, k, sampling):
    """Up to k draft tokens per row from exit `draft_exit`, one step at a time, each
    fed to blocks 1..e in turn; a row stops drafting after a draft whose confidence
    (the draft exit's probability of its most likely token, in the distribution it
    draws from) is below `threshold`, and the steps stop when every row has
    (Kangaroo: Liu et al. 2024, "Kangaroo: Lossless Self-Speculative Decoding via
    Double Early Exiting"; SpecDec++, Huang et al. 2024).

    Args:
      token: [B] the last accepted token (not yet fed); position: [B] its position.
      layers: the mixer states of blocks 1..e before `token` (leaves [e, B, ...]).
      keys: [B] a key per row (used when sampling).
      threshold: [] float32 in [0, 1]; 0: every row drafts k tokens.
      sampling: None (greedy: the exit's argmax, `adaptive.exact_argmax`) or
        (temperature [], sample_top_k, sample_top_p) for draws from the exit's
        distribution.

    Returns:
      (layer-e hidden states of the k + 1 fed places [B, k+1, D], the mixer states
      of blocks 1..e after each (leaves [k+1, e, B, ...]), drafts [B, k], the draft
      exit's distribution q at each draft step (`exit_distribution`, entries
      [B, k, n]) or None when greedy, drafts made per row [B] int32 in [1, k]).
      Places after a row's last draft fed hold what the batch's other rows needed
      (or zeros): `accept` reads none of them.
    """
    config = model.config
    apply = functools.partial(model.apply, variables)

    def blocks(token, position, layers):  # blocks 1..e for one token per row
        if config.position == "learned":
            # Past the table only drafts beyond `steps` are fed: their tokens are dropped.
            position = jnp.minimum(position, config.n_seq - 1)
        hidden = apply(token, position, method=EarlyExitLM.embed_position)
        layer_states = []
        for layer in range(draft_exit):
            layer_state = jax.tree.map(operator.itemgetter(layer), layers)
            x, mixed, layer_state = apply(
                layer, hidden, layer_state, method=EarlyExitLM.block_mix_step
            )
            update = apply(layer, x, method=EarlyExitLM.block_feed_forward)
            hidden = hidden + (update + mixed)  # the sum of Block.__call__
            layer_states.append(layer_state)
        return hidden, jax.tree.map(lambda *xs: jnp.stack(xs), *layer_states)

    def head(hidden, keys):  # the draft exit's token [B], its q (sampling), confidence [B]
        if sampling is None:
            output = apply(draft_exit - 1, method=EarlyExitLM.output_layer)
            features = apply(hidden, draft_exit - 1, method=EarlyExitLM.exit_features)
            drafted, log_p = adaptive.exact_argmax(output, features)
            return drafted, None, jnp.exp(log_p)
        q = exit_distribution(apply, hidden, draft_exit - 1, sampling)
        return _draw(keys, q), q, jnp.exp(jnp.max(q[0], axis=-1))

    def step(carry):  # draft d_j from place j, then feed it (place j + 1)
        j, hiddens, states, drafts, q, drafting, drafted = carry
        at = lambda x: jax.tree.map(operator.itemgetter(j), x)  # noqa: E731
        token, q_j, confidence = head(at(hiddens), _fold_in(keys, j))
        hidden, layer_states = blocks(token, position + j + 1, at(states))
        return (
            j + 1,
            _set_place(hiddens, hidden, j + 1),
            _set_place(states, layer_states, j + 1),
            _set_place(drafts, token, j),
            None if q is None else _set_place(q, q_j, j),
            drafting & (confidence >= threshold) & (j + 1 < k),
            drafted + drafting,
        )

    def going(carry):
        return jnp.any(carry[5])

    hidden, layer_states = blocks(token, position, layers)  # place 0: the last token
    hiddens = jnp.zeros((k + 1, *hidden.shape), hidden.dtype).at[0].set(hidden)
    states = jax.tree.map(
        lambda x: jnp.zeros((k + 1, *x.shape), x.dtype).at[0].set(x), layer_states
    )
    batch = token.shape[0]
    q = None
    if sampling is not None:  # buffers shaped like one step's q
        shape = jax.eval_shape(lambda: exit_distribution(apply, hidden, draft_exit - 1, sampling))
        q = jax.tree.map(lambda s: jnp.zeros((k, *s.shape), s.dtype), shape)
    start = (
        jnp.int32(0),
        hiddens,
        states,
        jnp.zeros((k, batch), jnp.int32),
        q,
        jnp.ones(batch, bool),
        jnp.zeros(batch, jnp.int32),
    )
    _, hiddens, states, drafts, q, _, drafted = jax.lax.while_loop(going, step, start)
    q = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), q)  # entries [B, k, n]
    return jnp.swapaxes(hiddens, 0, 1), states, drafts.T, q, drafted


def _set_place(buffer, value, place):
    """buffer (leaves [n, ...]) with `value` (leaves [...]) at index `place`."""
    return jax.tree.map(
        lambda b, v: jax.lax.dynamic_update_index_in_dim(b, v, place, 0), buffer, value
    )


def verify(model, variables, hiddens, layers, *, draft_exit, sampling):
    """Blocks e+1..L on the layer-e hidden states [B, k+1, D] of a round in one pass
    from their mixer states (leaves [L-e, B, ...]): (the final exit's greedy tokens
    [B, k+1] (`decode.greedy_token`, as `decode.generate` picks them) or, sampling,
    its distribution p (`exit_distribution`, entries [B, k+1, n]); the mixer states
    after each position (leaves [L-e, B, k+1, ...]))."""
    apply = functools.partial(model.apply, variables)
    final, states = apply(hiddens, layers, draft_exit, method=EarlyExitLM.trace_blocks)
    last = model.config.n_layers - 1
    if sampling is not None:
        return exit_distribution(apply, final, last, sampling), states
    features = apply(final, last, method=EarlyExitLM.exit_features)  # [B, k+1, D]
    output = apply(last, method=EarlyExitLM.output_layer)
    tokens = adaptive.exact_argmax(output, features.reshape(-1, features.shape[-1]))[0]
    return tokens.reshape(features.shape[:-1]), states


def accept(drafts, q, p, keys, drafted):
    """Each row's accepted drafts and its one token from the full model.

    Greedy (q None): drafts are kept while they equal the full model's argmax; the
    extra token is the argmax at the first disagreement (or after the last draft).
    Sampling: a draft d is kept with probability min(1, p(d) / q(d)); the extra
    token is drawn from norm(max(0, p - q)) at the first rejection, from p after
    every draft was accepted (Leviathan et al. 2023, algorithm 1). With top-k lists
    the residual lives on p's list, q read at its ids.

    Args:
      drafts: [B, k]; q: the draft exit's distributions (entries [B, k, n]) or None;
        p: the full model's (entries [B, k+1, n]), greedy: its tokens [B, k+1].
      drafted: [B] int32 in [1, k]: drafts each row made (the first ones; the rest
        of its places are not read).

    Returns:
      (accepted drafts per row [B] int32 in [0, drafted], extra token [B] int32).
    """
    batch, k = drafts.shape
    made = jnp.arange(k) < drafted[:, None]  # [B, k]
    if q is None:  # p: the full model's greedy tokens
        accepted = jnp.sum(jnp.cumprod((drafts == p[:, :k]) & made, axis=1), axis=1)
        return accepted, jnp.take_along_axis(p, accepted[:, None], axis=1)[:, 0]
    first_k = jax.tree.map(lambda x: x[:, :k], p)
    ratio = jnp.exp(_log_prob_of(first_k, drafts) - _log_prob_of(q, drafts))  # q(d) > 0: drawn
    uniform = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(_fold_in(keys, 0))
    accepted = jnp.sum(jnp.cumprod((uniform < ratio) & made, axis=1), axis=1)
    # p and q at the first rejected place; after every draft accepted q = 0.
    log_p, p_ids = jax.tree.map(lambda x: _per_row(x, accepted, 1, 0), p)  # [B, n]
    log_q, q_ids = jax.tree.map(
        lambda x: _per_row(jnp.concatenate([x, jnp.zeros_like(x[:, :1])], 1), accepted, 1, 0), q
    )
    q_probs = jnp.where(accepted[:, None] < drafted[:, None], jnp.exp(log_q), 0.0)  # [B, n]
    if p_ids is not None:  # q at each of p's ids
        same = p_ids[:, :, None] == q_ids[:, None, :]  # [B, n, n]
        q_probs = jnp.sum(jnp.where(same, q_probs[:, None, :], 0.0), axis=-1)
    probs = jnp.exp(log_p)
    residual = jnp.maximum(probs - q_probs, 0.0)
    # A rejection where p <= q everywhere has probability 0; if rounding makes one, p.
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, probs)
    extra = _draw(_fold_in(keys, 1), (jnp.log(residual), p_ids))
    return accepted, extra


@flax.struct.dataclass
class _Rounds:
    """The carry of `speculative_chunk`'s rounds."""

    tokens: jax.Array  # [B, length] int32: the chunk's new tokens (the first `count`)
    depths: jax.Array  # [B, length] int32: draft_exit (accepted draft) or L, 0 unwritten
    count: jax.Array  # [B] int32: new tokens each row has
    stopped: jax.Array  # [B] bool: the row has written the stop token
    last: jax.Array  # [B] int32: each row's last token, not yet fed
    state: RecurrentState  # before `last`: each row at its own position
    accepted: jax.Array  # [length, B] int32: drafts accepted per round, -1 if none ran
    drafted: jax.Array  # [length, B] int32: drafts made per round, 0 if none ran
    index: jax.Array  # [] int32: rounds run


@functools.partial(
    jax.jit,
    static_argnums=(0, 8),
    static_argnames=("draft_exit", "draft_tokens", "greedy", "sample_top_k"),
)
def speculative_chunk(
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
    draft_threshold,
    draft_exit,
    draft_tokens,
    greedy,
    sample_top_k,
    sample_top_p,
):
    """Draft-verify-accept rounds from `token` [B] (not yet fed) and `state`, in one
    jitted `lax.while_loop`, until every row has `length` new tokens or has written
    `stop` (`decode.generate`'s chunk with draft_exit).

    A round's tokens are cut after `length` and after a stop token: the row's state
    is then the one after the tokens before the last kept one (picked from the
    round's per-position states, as a rejection is). The sampling key of a round is
    `row_key(rng, row, position of its first fed token)`, so rows draw
    independently. draft_threshold: [] float32, `draft`'s threshold.

    Returns:
      (new tokens [B, length] (`stop` after a row's stop), their depths [B, length]:
      draft_exit for an accepted draft, L for the full model's token, 0 after a
      stop; the state after feeding all but the last new token; stopped [B];
      (drafts accepted by each verify pass [length, B], -1 where the row had
      finished or the round never ran; drafts made [length, B], 0 there)).
    """
    batch, k, last_layer = token.shape[0], draft_tokens, model.config.n_layers
    sampling = None if greedy else (temperature, sample_top_k, sample_top_p)
    rows, slot = jnp.arange(batch), jnp.arange(draft_tokens + 1)

    def round_fn(carry: _Rounds) -> _Rounds:
        active = (carry.count < length) & ~carry.stopped  # [B]
        keys = jax.vmap(row_key, (None, 0, 0))(rng, rows, carry.state.position)
        layers = carry.state.layers
        lower = jax.tree.map(lambda x: x[:draft_exit], layers)  # blocks 1..e
        upper = jax.tree.map(lambda x: x[draft_exit:], layers)  # blocks e+1..L
        hiddens, lower_states, drafts, q, drafted = draft(
            model,
            variables,
            carry.last,
            carry.state.position,
            lower,
            _fold_in(keys, 0),
            draft_threshold,
            draft_exit=draft_exit,
            k=k,
            sampling=sampling,
        )
        p, upper_states = verify(
            model, variables, hiddens, upper, draft_exit=draft_exit, sampling=sampling
        )
        accepted, extra = accept(drafts, q, p, _fold_in(keys, 1), drafted)
        new = jnp.concatenate([drafts, extra[:, None]], axis=1)  # [B, k+1]
        new = jnp.where(slot == accepted[:, None], extra[:, None], new)
        # The last kept place: the full model's token, the first stop, or the chunk's end.
        is_stop = (new == stop) & (slot <= accepted[:, None])
        first_stop = jnp.min(jnp.where(is_stop, slot, k + 1), axis=1)
        cut = jnp.minimum(jnp.minimum(accepted, first_stop), length - 1 - carry.count)
        keep = (slot <= cut[:, None]) & active[:, None]
        index = jnp.where(keep, carry.count[:, None] + slot, length)  # else dropped
        depth = jnp.where(slot < accepted[:, None], draft_exit, last_layer)
        write = lambda x, values: x.at[rows[:, None], index].set(values, mode="drop")  # noqa: E731
        # Roll back: every layer's state after the tokens before the last kept one.
        rolled = jax.tree.map(
            lambda low, high: jnp.concatenate(
                [_per_row(low, cut, 0, 2), _per_row(high, cut, 2, 1)]
            ),
            lower_states,
            upper_states,
        )  # leaves [L, B, ...]
        step = jnp.where(active, cut + 1, 0)
        after = RecurrentState(position=carry.state.position + step, layers=rolled)
        return _Rounds(
            tokens=write(carry.tokens, new),
            depths=write(carry.depths, depth),
            count=carry.count + step,
            stopped=carry.stopped | (active & (first_stop <= cut)),
            last=jnp.where(active, _per_row(new, cut, 1, 0), carry.last),
            state=after.select(active, carry.state),
            accepted=carry.accepted.at[carry.index].set(jnp.where(active, accepted, -1)),
            drafted=carry.drafted.at[carry.index].set(jnp.where(active, drafted, 0)),
            index=carry.index + 1,
        )

    start = _Rounds(
        tokens=jnp.full((batch, length), stop, jnp.int32),
        depths=jnp.zeros((batch, length), jnp.int32),
        count=jnp.zeros(batch, jnp.int32),
        stopped=stopped,
        last=token,
        state=state,
        accepted=jnp.full((length, batch), -1, jnp.int32),
        drafted=jnp.zeros((length, batch), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )
    going = lambda carry: jnp.any((carry.count < length) & ~carry.stopped)  # noqa: E731
    done = jax.lax.while_loop(going, round_fn, start)
    return done.tokens, done.depths, done.state, done.stopped, (done.accepted, done.drafted)
