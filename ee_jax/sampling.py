"""Sampling the next token: temperature, top-k and nucleus (top-p), without sorts.

`sample_tokens` draws one token per row from softmax(logits / T) over the kept
ids (Gumbel-max); with a top k, among the k candidates alone (`sample_ranked`,
which decoding feeds from `adaptive.top_k` without every word's logit);
without a top k, `top_p_logits` masks the ids outside the nucleus with -inf;
`tempered_log_probs` is that distribution's log (self-speculative decoding's
p and q). A T that is 0 to float32 arithmetic is greedy (the argmax, lowest id
among ties) on every path.
"""

import functools
import math
import numbers

import jax
import jax.numpy as jnp


def row_key(rng, row, position) -> jax.Array:
    """The sampling key of batch row `row` at `position`: rows draw independently,
    and a row's draws do not depend on how its text was split into calls."""
    return jax.random.fold_in(jax.random.fold_in(rng, row), position)


def check_sampling(temperature, sample_top_k, vocab_size: int, sample_top_p=None) -> None:
    """Raises ValueError unless temperature is a finite real >= 0, sample_top_k is
    None or an integer in [1, vocab_size] and sample_top_p None or a real in (0, 1]."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a real number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if sample_top_p is not None and (
        isinstance(sample_top_p, bool)
        or not isinstance(sample_top_p, numbers.Real)
        or not 0 < sample_top_p <= 1
    ):
        raise ValueError(
            f"sample_top_p must be a real number in (0, 1] or None, got {sample_top_p!r}"
        )
    if sample_top_k is None:
        return
    if isinstance(sample_top_k, bool) or not isinstance(sample_top_k, numbers.Integral):
        raise ValueError(f"sample_top_k must be an integer or None, got {sample_top_k!r}")
    if not 1 <= sample_top_k <= vocab_size:
        raise ValueError(f"sample_top_k must be in [1, {vocab_size}], got {sample_top_k}")


@functools.partial(jax.jit, static_argnames="sample_top_k")
def sample_tokens(
    logits, rng, temperature, sample_top_k: int | None = None, sample_top_p=None
) -> jax.Array:
    """One token per row from softmax(logits / temperature) over the top k and the
    nucleus of mass top p; [B] int32.

    sample_top_k keeps exactly k ids: the first k of a stable descending order of
    the logits (`lax.top_k`), so a tie at the cut keeps the lowest ids; the draw is
    then among those k (`sample_ranked`). sample_top_p then keeps the nucleus of
    that distribution; without a top k, the nucleus of all V (`top_p_logits`).

    Args:
      logits: [B, V] logits (or log-probabilities) of the next token.
      rng: a PRNG key, or one per row [B].
      temperature: [] finite, >= 0 (traced: one compilation for all).
      sample_top_k: None (every id) or k in [1, V] (static).
      sample_top_p: None (every id) or p in (0, 1] ([], traced).
    """
    logits = logits.astype(jnp.float32)
    if sample_top_k is not None:
        return sample_ranked(*jax.lax.top_k(logits, sample_top_k), rng, temperature, sample_top_p)
    if sample_top_p is not None:
        logits = top_p_logits(logits, temperature, sample_top_p)
    return gumbel_argmax(logits, rng, temperature).astype(jnp.int32)


def sample_ranked(values, ids, rng, temperature, sample_top_p=None) -> jax.Array:
    """One token per row among ranked candidates: ids [B, k] drawn from
    softmax(values / T) over values [B, k] (descending, ties lowest id first: the
    order of `lax.top_k` and `adaptive.top_k`), restricted with sample_top_p to the
    nucleus: the first candidates whose mass reaches top p, each kept while the
    mass before it is below p (Holtzman et al. 2020). k-sized work only; [B] int32."""
    choice = gumbel_argmax(ranked_nucleus(values, temperature, sample_top_p), rng, temperature)
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def ranked_nucleus(values, temperature, sample_top_p=None) -> jax.Array:
    """Ranked candidates' values [..., k] (descending, ties lowest id first) as float32,
    those outside the nucleus of mass sample_top_p set to -inf (None: all kept): a
    candidate is kept while the mass of softmax(values / T) before it is below p."""
    values = values.astype(jnp.float32)
    if sample_top_p is None:
        return values
    probs = jnp.exp(tempered_log_probs(values, temperature))  # [..., k]
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the candidates before each
    top_p = jnp.asarray(sample_top_p, jnp.float32)[..., None]
    return jnp.where(before < top_p, values, -jnp.inf)


def gumbel_argmax(scores, rng, temperature) -> jax.Array:
    """A draw of softmax(scores / T) per row of scores [B, n] (-inf allowed): the index
    argmax(scores / T + g), g ~ Gumbel(0, 1) i.i.d. (Gumbel-max); [B].

    For T < 1 the same argmax is taken of scores + T * g (scaled by T > 0), so
    nothing can overflow: scores / T with T >= 1 is at most the scores, T * g with
    T < 1 at most g (|g| < 17 in float32). At T = 0, or a T whose product with g
    underflows, this is exactly the argmax (ties: lowest index): sampling tends to
    greedy as T -> 0+. rng: one key, or one per row [B].
    """
    temperature = jnp.asarray(temperature, jnp.float32)
    if jnp.ndim(rng) == 0:
        noise = jax.random.gumbel(rng, scores.shape, jnp.float32)  # finite
    else:  # a key per row
        noise = jax.vmap(lambda key: jax.random.gumbel(key, scores.shape[1:], jnp.float32))(rng)
    scores = jnp.where(temperature >= 1, scores / temperature + noise, scores + temperature * noise)
    return jnp.argmax(scores, axis=-1)


def tempered_log_probs(logits, temperature) -> jax.Array:
    """log softmax(logits / T) of logits [..., V] (-inf allowed) for T >= 0; a T that is
    0 to float32 arithmetic (XLA flushes one below the normal range, < 1.2e-38, to 0)
    gives all the mass to the argmax (ties: the lowest id), as `sample_tokens` does."""
    logits = logits.astype(jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    # (logits - max) <= 0, so dividing by a small T gives -inf at worst, never inf.
    tempered = jax.nn.log_softmax((logits - jnp.max(logits, -1, keepdims=True)) / temperature)
    argmax = jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=bool)
    return jnp.where(temperature > 0, tempered, jnp.where(argmax, 0.0, -jnp.inf))


NUCLEUS_STEPS = 31  # bisection steps over the bit patterns of non-negative float32s


def top_p_logits(logits, temperature, top_p) -> jax.Array:
    """logits [..., V] float32 with every id outside the nucleus set to -inf: the fewest
    ids, taken in a stable descending order of softmax(logits / T) (ties: lowest id
    first), whose probability reaches top_p (nucleus sampling, Holtzman et al. 2020,
    "The Curious Case of Neural Text Degeneration").

    Without a sort of the V probabilities (slow on a CPU): the probability at the
    cut is the largest one whose "mass of every probability >= it" reaches top_p,
    found by bisection over the float32 bit patterns (monotone for non-negative
    floats), NUCLEUS_STEPS passes over V; every id above it is kept, and ids equal
    to it, lowest first, while the mass kept before them is below top_p.

    Args:
      logits: [..., V]; temperature: [] >= 0; top_p: [] or [...] (one per row) in (0, 1].
    """
    logits = logits.astype(jnp.float32)
    probs = jnp.exp(tempered_log_probs(logits, temperature))  # [..., V]
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), bits.shape[:-1])  # [...]

    def mass_from(cut):  # mass of the probabilities >= the float with bits `cut`; [...]
        return jnp.sum(jnp.where(bits >= cut[..., None], probs, 0.0), axis=-1)

    def bisect(_, bounds):  # invariant: mass_from(low) >= top_p (or low = 0)
        low, high = bounds
        middle = low + (high - low + 1) // 2
        reaches = mass_from(middle) >= top_p
        return jnp.where(reaches, middle, low), jnp.where(reaches, high, middle - 1)

    start = (jnp.zeros(bits.shape[:-1], jnp.int32), jnp.max(bits, axis=-1))
    cut = jax.lax.fori_loop(0, NUCLEUS_STEPS, bisect, start)[0][..., None]  # [..., 1]
    above, tied = bits > cut, bits == cut
    mass_above = jnp.sum(jnp.where(above, probs, 0.0), axis=-1, keepdims=True)
    value = jax.lax.bitcast_convert_type(cut, jnp.float32)
    before = mass_above + (jnp.cumsum(tied, axis=-1) - 1) * value  # mass before each tie
    return jnp.where(above | (tied & (before < top_p[..., None])), logits, -jnp.inf)
