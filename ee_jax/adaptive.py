"""The exits' output layer: full or adaptive softmax, scored without full logits.

Adaptive softmax (Grave et al. 2017, "Efficient softmax approximation for GPUs",
arXiv 1609.04309). Ids are in descending train frequency (`data.Vocabulary`),
so the clusters are id ranges given by `ModelConfig.cluster_bounds`
(c_1, ..., c_K, V): the head holds the c_1 most frequent words plus one logit
per tail cluster; tail k holds ids [c_k, c_{k+1}) and reads the features through
a projection to d_k = D // div**k dimensions:

    log p(w) = log softmax(head)[w]                                     w < c_1
    log p(w) = log softmax(head)[c_1 + k - 1] + log softmax(tail_k)[w - c_k]
                                                                    c_k <= w < c_{k+1}

This is an exact, normalised distribution over all V words, not an
approximation of another one. A "full" output is the same structure with no
tail (the head is the whole vocabulary), so every function here serves both.

Cheap exact decisions. A tail word's probability is at most its cluster's
probability P_k = softmax(head)[c_1 + k - 1], so a tail cluster only has to be
evaluated for the tokens where it can change the answer: where the target lies
in it (loss), where P_k exceeds the best head word (argmax), the second best
head word (top-2), or where P_k can reach the threshold (halting). Those tokens
are gathered into a static capacity (`on_selected`); when more are selected,
every token is computed instead, so no answer is ever approximated.
"""

import math

import flax.struct
import jax
import jax.numpy as jnp

from ee_jax.config import ExitMeasure

CHUNK_ELEMENTS = 64 * 33_278  # head logits scored at once in the loss: [C, head] floats


@flax.struct.dataclass
class OutputLayer:
    """One exit's output weights (`EarlyExitLM.output_layer`). K tail clusters."""

    head_kernel: jax.Array  # [c_1 + K, D]: head words, then one row per tail cluster
    head_bias: jax.Array  # [c_1 + K]
    tail_projections: tuple  # K arrays [d_k, D]: features -> tail k's space (x @ P^T)
    tail_kernels: tuple  # K arrays [n_k, d_k], n_k = c_{k+1} - c_k
    tail_biases: tuple  # K arrays [n_k]
    bounds: tuple[int, ...] = flax.struct.field(pytree_node=False)  # (c_1, ..., c_K, V)

    @property
    def head_words(self) -> int:
        return self.bounds[0]

    @property
    def n_tails(self) -> int:
        return len(self.bounds) - 1


def head_logits(layer: OutputLayer, x: jax.Array) -> jax.Array:
    """Head logits (words, then clusters) of features [..., D]; [..., c_1 + K]."""
    return jnp.einsum("...d,vd->...v", x, layer.head_kernel) + layer.head_bias


def tail_logits(layer: OutputLayer, k: int, x: jax.Array) -> jax.Array:
    """Logits of tail cluster k (0-based) given features [..., D]; [..., n_k]."""
    projected = jnp.einsum("...d,pd->...p", x, layer.tail_projections[k])  # [..., d_k]
    return jnp.einsum("...p,vp->...v", projected, layer.tail_kernels[k]) + layer.tail_biases[k]


def tail_log_probs(layer: OutputLayer, k: int, x: jax.Array) -> jax.Array:
    """log softmax of tail cluster k (0-based) given features [..., D]; [..., n_k]."""
    return jax.nn.log_softmax(tail_logits(layer, k, x), axis=-1)


def log_probs(layer: OutputLayer, x: jax.Array) -> jax.Array:
    """Exact, normalised log-probabilities of every word; [..., D] -> [..., V]."""
    head = jax.nn.log_softmax(head_logits(layer, x), axis=-1)  # [..., c_1 + K]
    words = layer.head_words
    parts = [head[..., :words]]
    for k in range(layer.n_tails):
        parts.append(head[..., words + k, None] + tail_log_probs(layer, k, x))
    return jnp.concatenate(parts, axis=-1)


def logits(layer: OutputLayer, x: jax.Array) -> jax.Array:
    """Scores whose softmax is the exit's distribution; [..., V]. Raw logits for a
    full output (no extra normalisation pass), log-probabilities for an adaptive one."""
    if layer.n_tails == 0:
        return head_logits(layer, x)
    return log_probs(layer, x)


def cluster_of(layer: OutputLayer, ids: jax.Array) -> jax.Array:
    """0 for head words, k for ids in tail cluster k (1-based); same shape as ids."""
    return jnp.searchsorted(jnp.asarray(layer.bounds[:-1]), ids, side="right").astype(jnp.int32)


def gather_sizes(tokens: int, capacity=None) -> tuple[int, ...]:
    """Static gather sizes below `tokens`, ascending (see `on_selected`).

    capacity: None for the default ladder T/64, T/16, T/4 (a few selected tokens
    cost a few tokens' work); an int, a fraction of T as a float, or a tuple of them.
    """
    if capacity is None:
        capacity = tuple(math.ceil(tokens / 4**j) for j in (3, 2, 1))
    if not isinstance(capacity, tuple):
        capacity = (capacity,)
    sizes = {math.ceil(c * tokens) if isinstance(c, float) else int(c) for c in capacity}
    return tuple(sorted(size for size in sizes if 1 <= size < tokens))


def on_selected(fn, inputs, selected: jax.Array, capacity, empty):
    """fn's per-token outputs where `selected`, `empty`'s values elsewhere.

    The selected tokens are gathered into the smallest static size of
    `gather_sizes(T, capacity)` that holds them; with more, fn runs on all T
    tokens. Exact either way; one `lax.switch` branch runs. fn is rematerialised
    in the backward pass (`jax.checkpoint`): otherwise every branch would carry
    the all-tokens branch's [T, n] residuals, allocated and zeroed on every call.

    Args:
      fn: per-token function of a pytree of [C, ...] arrays -> pytree of [C, ...].
      inputs: pytree of [T, ...] arrays; selected: [T] bool.
      capacity: see `gather_sizes`.
      empty: pytree like fn's output for T tokens, kept where not selected.
    """
    total = selected.shape[0]
    count = jnp.sum(selected)
    sizes = gather_sizes(total, capacity)
    fn = jax.checkpoint(fn)

    def gathered(size):
        def branch():
            index = jnp.nonzero(selected, size=size, fill_value=0)[0]  # [C]
            rows = jax.tree.map(lambda x: x[index], inputs)
            index = jnp.where(jnp.arange(size) < count, index, total)  # padding: dropped
            return jax.tree.map(lambda e, o: e.at[index].set(o, mode="drop"), empty, fn(rows))

        return branch

    def everything():
        outputs = fn(inputs)
        return jax.tree.map(
            lambda e, o: jnp.where(selected.reshape(-1, *[1] * (o.ndim - 1)), o, e),
            empty,
            outputs,
        )

    branches = [lambda: empty, *map(gathered, sizes), everything]
    index = jnp.where(count == 0, 0, 1 + jnp.sum(jnp.asarray(sizes, jnp.int32) < count))
    return jax.lax.switch(index, branches)


# ---------------------------------------------------------------- top-2 pieces


def _top_two(values: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(largest, second largest counting ties, index of the first largest) over the
    last axis of [T, n]; the second is -inf when n = 1."""
    first = jnp.argmax(values, axis=-1)  # [T]
    largest = jnp.take_along_axis(values, first[:, None], axis=-1)[:, 0]
    others = jnp.where(jnp.arange(values.shape[-1]) == first[:, None], -jnp.inf, values)
    return largest, jnp.max(others, axis=-1), first.astype(jnp.int32)


def _merge_top_two(best, candidate):
    """Top-2 of two (first, second, id) sets whose ids in `candidate` are all larger
    (a later cluster), so a tie keeps the earlier, lower id (as argmax does)."""
    first, second, index = best
    other_first, other_second, other_index = candidate
    wins = other_first > first
    return (
        jnp.where(wins, other_first, first),
        jnp.where(wins, jnp.maximum(first, other_second), jnp.maximum(second, other_first)),
        jnp.where(wins, other_index, index),
    )


def _tail_top_two(layer: OutputLayer, k: int):
    """Per-token fn for `on_selected`: (x [C, D], cluster log-prob [C]) -> top-2
    log-probabilities of cluster k's words and the first one's vocabulary id."""

    def fn(inputs):
        x, cluster_log_prob = inputs
        first, second, index = _top_two(tail_log_probs(layer, k, x))
        return (
            cluster_log_prob + first,
            cluster_log_prob + second,
            index + layer.bounds[k],
        )

    return fn


def _unset(total: int):
    """The `empty` of a top-2 set: no word seen."""
    return (
        jnp.full(total, -jnp.inf),
        jnp.full(total, -jnp.inf),
        jnp.zeros(total, jnp.int32),
    )


def _add_tails(layer, x, cluster_log_probs, best, need_fn, capacity):
    """Merges into `best` the top-2 of every tail cluster k, evaluated only for the
    tokens where need_fn(log P_k [T], best) is true; cluster_log_probs [T, K]."""
    total = x.shape[0]
    for k in range(layer.n_tails):
        cluster_log_prob = cluster_log_probs[:, k]  # [T]
        need = need_fn(cluster_log_prob, best)
        candidate = on_selected(
            _tail_top_two(layer, k), (x, cluster_log_prob), need, capacity, _unset(total)
        )
        best = _merge_top_two(best, candidate)
    return best


def _head(layer: OutputLayer, x: jax.Array, second: bool = True, index: bool = True):
    """(cluster log-probabilities log P_k [T, K], top-2 of the head words' log p).

    Reductions of the logits, shifted by their log-normaliser afterwards: no
    [T, c_1 + K] log-softmax is materialised (for a full output that is [T, V]).
    Without `second` the second value is -inf, without `index` the argmax is 0
    (each a reduction fewer).
    """
    logits, words = head_logits(layer, x), layer.head_words
    normaliser = jax.nn.logsumexp(logits, axis=-1)  # [T]
    if second:
        first, runner_up, index = _top_two(logits[:, :words])
    else:
        if index:
            index = jnp.argmax(logits[:, :words], axis=-1).astype(jnp.int32)
            first = jnp.take_along_axis(logits, index[:, None], axis=-1)[:, 0]
        else:
            first = jnp.max(logits[:, :words], axis=-1)
            index = jnp.zeros(first.shape, jnp.int32)
        runner_up = jnp.full_like(first, -jnp.inf)
    best = (first - normaliser, runner_up - normaliser, index)
    return logits[:, words:] - normaliser[:, None], best


# ---------------------------------------------------------------- exact queries


def top_k(layer: OutputLayer, x: jax.Array, k: int):
    """The k most likely words of the full distribution, with their log p.

    The top k of the head's words and of every tail cluster's words, merged: each
    list is in `lax.top_k` order (descending, ties lowest index first) and the
    lists are concatenated in id order, so the merged list is a stable descending
    order of the whole vocabulary's log-probabilities (a tie at the cut keeps the
    lowest ids). A cluster's order is that of its raw logits, so only its
    log-normaliser is reduced over all its words, and no [T, V] array is
    materialised. Every cluster runs for every token: for decoding's few tokens a
    `lax.cond` skipping the clusters that cannot hold a top-k word cost more on
    CPU than the clusters themselves.

    Args:
      x: [T, D] exit features; k: static, 1 <= k <= V.

    Returns:
      (log p [T, k] descending, ids [T, k] int32).
    """
    logits, words = head_logits(layer, x), layer.head_words
    normaliser = jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # [T, 1]
    values, ids = _padded_top_k(logits[:, :words], k)
    values, ids = [values - normaliser], [ids]
    for c in range(layer.n_tails):
        tail = tail_logits(layer, c, x)  # [T, n_c]
        offset = logits[:, words + c, None] - normaliser  # log P_c  [T, 1]
        offset = offset - jax.nn.logsumexp(tail, axis=-1, keepdims=True)
        tail_values, tail_ids = _padded_top_k(tail, k)
        values.append(tail_values + offset)
        ids.append(tail_ids + layer.bounds[c])
    merged, order = jax.lax.top_k(jnp.concatenate(values, -1), k)
    return merged, jnp.take_along_axis(jnp.concatenate(ids, -1), order, -1)


def _padded_top_k(values: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`lax.top_k` of [T, n] padded with -inf (id 0) to k entries when n < k."""
    top, ids = jax.lax.top_k(values, min(k, values.shape[-1]))
    padding = ((0, 0), (0, k - top.shape[-1]))
    return jnp.pad(top, padding, constant_values=-jnp.inf), jnp.pad(ids, padding)


def top_two(layer: OutputLayer, x: jax.Array, capacity=None):
    """Exact top-2 log-probabilities and argmax of the full distribution.

    A tail cluster is evaluated only for tokens whose cluster probability exceeds
    the second best head word (no word of another cluster can enter the top 2).

    Args:
      x: [T, D] exit features. capacity: see `gather_sizes`.

    Returns:
      (log p of the most likely word [T], log p of the second, counting ties [T],
      argmax id [T] int32, the lowest id among ties).
    """
    head, best = _head(layer, x)
    return _add_tails(layer, x, head, best, lambda p, b: p > b[1], capacity)


def exact_argmax(layer: OutputLayer, x: jax.Array, capacity=None):
    """The full distribution's argmax [T] int32 (lowest id among ties) and its log p [T];
    a tail cluster is evaluated only where its probability exceeds the best head word."""
    head, best = _head(layer, x, second=False)
    first, _, index = _add_tails(layer, x, head, best, lambda p, b: p > b[0], capacity)
    return index, first


def exit_confidence(
    layer: OutputLayer,
    x: jax.Array,
    measure: ExitMeasure,
    threshold: jax.Array,
    capacity=None,
) -> jax.Array:
    """softmax_max or softmax_margin for the halting decision "confidence >= threshold".

    The decision equals that of the full distribution for every threshold in
    [0, 1], while a tail cluster is evaluated only for tokens where it can change
    it: for the max, where the head words stay below the threshold and the
    cluster probability P_k reaches it; for the margin (top-1 minus top-2
    probability), where the head's bounds leave the decision open (upper bound
    max(p_1, max_k P_k) >= t and lower bound p_1 - max(p_2, max_k P_k) < t) and
    P_k exceeds the second head word. Below t = 0.5 several clusters can matter.

    Args:
      x: [T, D] exit features; threshold: [] float32 (may be traced).

    Returns:
      [T] float32: the exact measure wherever a tail was evaluated (always, for a
      full output); elsewhere the head's value, which is on the same side of the
      threshold as the exact one.
    """
    maximum = measure == ExitMeasure.SOFTMAX_MAX  # needs neither the second nor the argmax
    head, best = _head(layer, x, second=not maximum, index=not maximum)
    if maximum:
        undecided = jnp.exp(best[0]) < threshold

        def need(cluster_log_prob, _):
            return undecided & (jnp.exp(cluster_log_prob) >= threshold)

        first, _, _ = _add_tails(layer, x, head, best, need, capacity)
        return jnp.exp(first)
    top, second = jnp.exp(best[0]), jnp.exp(best[1])
    clusters = jnp.exp(head)  # [T, K] cluster probabilities P_k
    largest_cluster = jnp.max(clusters, axis=-1, initial=0.0)  # [T]
    upper = jnp.maximum(top, largest_cluster)
    lower = top - jnp.maximum(second, largest_cluster)
    undecided = (upper >= threshold) & (lower < threshold) & (threshold > 0)

    def need(cluster_log_prob, _):
        return undecided & (jnp.exp(cluster_log_prob) > second)

    first, second, _ = _add_tails(layer, x, head, best, need, capacity)
    return jnp.exp(first) - jnp.exp(second)


def target_nll(layer: OutputLayer, x: jax.Array, targets: jax.Array, capacity=None) -> jax.Array:
    """-log p(target) [T] from the head and, per token, only the target's cluster.

    Args:
      x: [T, D] exit features; targets: [T] ids in [0, V).
    """
    logits = head_logits(layer, x)  # [T, c_1 + K]
    cluster = cluster_of(layer, targets)
    head_target = _head_target(layer, targets, cluster)
    target_logit = jnp.take_along_axis(logits, head_target[:, None], axis=-1)[:, 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    return nll + _tail_nll(layer, x, targets, cluster, capacity)


def _head_target(layer: OutputLayer, targets: jax.Array, cluster: jax.Array) -> jax.Array:
    """The head entry a target is scored by: itself, or its tail cluster's logit; [T]."""
    return jnp.where(cluster == 0, targets, layer.head_words + cluster - 1)


def _tail_nll(layer, x, targets, cluster, capacities) -> jax.Array:
    """-log softmax(tail_k)[target] for each token whose target is in a tail, else 0.

    capacities: `gather_sizes` capacity for every cluster, or a list of one per cluster.
    """
    total = x.shape[0]
    if not isinstance(capacities, list):
        capacities = [capacities] * layer.n_tails
    nll = jnp.zeros(total)
    for k in range(layer.n_tails):
        size = layer.bounds[k + 1] - layer.bounds[k]
        local = jnp.clip(targets - layer.bounds[k], 0, size - 1)

        def fn(inputs, k=k):
            features, index = inputs
            log_p = tail_log_probs(layer, k, features)  # [C, n_k]
            return -jnp.take_along_axis(log_p, index[:, None], axis=-1)[:, 0]

        selected = cluster == k + 1
        nll = nll + on_selected(fn, (x, local), selected, capacities[k], jnp.zeros(total))
    return nll


# ---------------------------------------------------------------- training loss


def training_nll(
    layer: OutputLayer,
    x: jax.Array,
    targets: jax.Array,
    *,
    tail_capacities: tuple[int, ...] | None = None,
) -> jax.Array:
    """-log p(target) [T], differentiable.

    The head is scored a chunk of tokens at a time, each chunk's logits
    recomputed in the backward pass (`jax.checkpoint`) instead of stored: for a
    full output over V = 33,278 that is what keeps the step in cache. Each tail
    cluster is evaluated only on the tokens whose target lies in it (gathered
    into `tail_capacities[k]`, exact beyond it).

    Args:
      x: [T, D] exit features; targets: [T] ids in [0, V).
      tail_capacities: static gather size per tail cluster (e.g. the most targets
        a training batch has in it, `losses.tail_capacities`); default `gather_sizes`.
    """
    tail_capacities = [None] * layer.n_tails if tail_capacities is None else list(tail_capacities)
    cluster = cluster_of(layer, targets)
    head_target = _head_target(layer, targets, cluster)
    return _chunked_head_nll(layer, x, head_target) + _tail_nll(
        layer, x, targets, cluster, tail_capacities
    )


def _chunked_head_nll(layer: OutputLayer, x: jax.Array, head_target: jax.Array) -> jax.Array:
    """Head NLL [T] of each token's head target, a chunk of tokens at a time."""
    total, width = x.shape
    size = layer.head_kernel.shape[0]
    chunk = min(total, max(64, CHUNK_ELEMENTS // size))
    padded = -(-total // chunk) * chunk
    x_chunks = jnp.pad(x, ((0, padded - total), (0, 0))).reshape(-1, chunk, width)
    y_chunks = jnp.pad(head_target, (0, padded - total)).reshape(-1, chunk)

    @jax.checkpoint
    def score(inputs):
        features, target = inputs  # [C, D], [C]
        logits = head_logits(layer, features)  # [C, c_1 + K]
        normaliser = jax.nn.logsumexp(logits, axis=-1)
        return normaliser - jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0]

    return jax.lax.map(score, (x_chunks, y_chunks)).reshape(padded)[:total]
