"""Training losses: every exit's cross-entropy without materialising [B, N, V].

Each exit is scored by `adaptive.training_nll`: the head a chunk of
tokens at a time (recomputed in the backward pass), and for an adaptive output
each tail cluster only on the tokens whose target lies in it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ee_jax import adaptive
from ee_jax.config import ClassifierTarget, ExitWeighting, ModelConfig, check_choice
from ee_jax.model import EarlyExitLM, RecurrentState


def exit_weights(n_layers: int, scheme: ExitWeighting) -> np.ndarray:
    """Weights of the exits' losses, summing to 1; [L].

    "uniform": 1/L each; "linear": proportional to depth (CALM); "final": the
    last exit only (the original's training objective).
    """
    check_choice("exit_weighting", scheme, ExitWeighting)
    raw = {
        "uniform": np.ones(n_layers),
        "linear": np.arange(1, n_layers + 1, dtype=np.float64),
        "final": np.eye(n_layers)[-1],
    }[scheme]
    return raw / raw.sum()


def tail_capacities(config: ModelConfig, targets: np.ndarray, mask: np.ndarray) -> tuple:
    """The most scored targets any batch of `targets` has in each tail cluster.

    A static gather size for `lm_loss` computed on the host from the data (a batch
    with more is still scored exactly, by evaluating that cluster on all tokens).

    Args:
      targets: [S, B, N] or [S, T] target ids of S batches; mask: same shape, bool.

    Returns:
      One int >= 1 per tail cluster (empty for a full output).
    """
    bounds = config.cluster_bounds
    targets = np.asarray(targets).reshape(len(targets), -1)
    scored = np.asarray(mask, bool).reshape(len(targets), -1)
    return tuple(
        max(1, int((((targets >= low) & (targets < high)) & scored).sum(axis=1).max()))
        for low, high in zip(bounds[:-1], bounds[1:], strict=True)
    )


def exit_nll(
    model: EarlyExitLM,
    params,
    states: jax.Array,
    targets: jax.Array,
    layers,
    capacities=None,
) -> jax.Array:
    """Per-token NLL of the exits in `layers` from hidden states.

    Args:
      states: [K, T, D] hidden states of T tokens after each scored block;
      targets: [T]; layers: the K 0-based exits they belong to (static);
      capacities: static tail-cluster gather sizes (`tail_capacities`), or None.

    Returns:
      nll [K, T] of each exit's full (exact) distribution.
    """
    scored = []
    # A Python loop (L is small): a lax.map here made the backward pass replay the
    # checkpointed chunk scans once more per exit.
    for h, layer in zip(states, layers, strict=True):
        output, features = _exit(model, params, h, layer)
        scored.append(adaptive.training_nll(output, features, targets, tail_capacities=capacities))
    return jnp.stack(scored)


def lm_loss(model: EarlyExitLM, params, tokens, targets, mask, **options):
    """`lm_loss_from` the start of a text (a fresh state): (loss [], metrics)."""
    start = RecurrentState.make(model.config, tokens.shape[0])
    loss, (metrics, _) = lm_loss_from(model, params, start, tokens, targets, mask, **options)
    return loss, metrics


def lm_loss_from(
    model: EarlyExitLM,
    params,
    state: RecurrentState,
    tokens: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    *,
    weights: np.ndarray,
    balance_weight: float,
    dropout_rng: jax.Array | None = None,
    exit_token_fraction: float = 1.0,
    sample_rng: jax.Array | None = None,
    tail_capacities: tuple[int, ...] | None = None,
    classifier_token_fraction: float = 1.0,
    classifier_target: ClassifierTarget = "agreement",
    distillation_weight: float = 0.0,
) -> tuple[jax.Array, dict]:
    """The joint training loss of a window read from `state`, and its parts.

    `state` is what the model read before the window (`EarlyExitLM.hidden_states_from`):
    a fresh one for window-reset training, or the previous window's final state
    for truncated backpropagation through time (the state is an input, so no
    gradient flows into earlier windows).

    loss = sum_l weights[l] * CE_l + balance_weight * mean_l(balance_l) + C_exit
           + distillation_weight * mean_{l<L} KL_l,
    where CE_l is exit l's mean cross-entropy over masked tokens, balance_l block
    l's MoE balance loss with router statistics over masked tokens, and C_exit
    trains the learned exit classifiers (their input is stop-gradient: the
    backbone is not trained by it), averaged over exits 1..L-1, for
    `classifier_target`:

    - "agreement": binary cross-entropy of sigmoid(a_l) against "exit l's argmax
      equals the final exit's argmax" (the consistency target of CALM, Schuster
      et al. 2022, arXiv 2207.07061).
    - "loss_gap": squared error of g_l = -log sigmoid(a_l) = softplus(-a_l) >= 0
      against the observed gap nll_l - nll_L of the target (stop-gradient). Its
      minimiser is max(0, expected gap), the log-perplexity a token adds by
      exiting at l (0 where exiting is expected to cost nothing), so the
      confidence sigmoid(a_l) = exp(-g_l) is the predicted probability ratio
      p_l(target) / p_L(target) (in geometric mean: 1 / the perplexity factor
      of exiting) and a threshold t allows about -log t nats per exiting token.
      It needs no argmax: the gaps come from the NLLs the loss computes anyway.

    KL_l is the self-distillation term of multi-exit networks (Phuong & Lampert
    2019, "Distillation-based training for multi-exit architectures"), here on the
    head of the output layer: KL(q_L || q_l) between the last exit's head
    distribution q_L = softmax(head logits) over the c_1 head words and K cluster
    tokens (stop-gradient teacher) and exit l's, on the positions scoring the early
    exits. It is the head's share of the full KL (the chain rule adds each cluster's
    expected tail KL), at the cost of one head per exit, no tail. It pulls the early
    exits toward the last one, which is what lets tokens exit early at a small cost.

    Exits whose weight is 0 are not scored at all, and then the classifiers
    (which need every exit) are not trained: with "final" weighting the step
    does the work of an ordinary single-head LM.

    With exit_token_fraction < 1 the exits before the last are scored on a
    random subset of that fraction of the B*N positions (the same subset for
    all of them, drawn from `sample_rng`): an unbiased estimate of their loss at
    a fraction of the vocabulary-projection cost, which dominates training.
    The classifiers are trained on the first classifier_token_fraction * B*N
    positions of that subset (all of it when the fraction is larger): the
    "agreement" target needs every exit's exact argmax, which evaluates tail
    clusters for most tokens of a trained adaptive softmax.

    Args:
      params: {"params": ...}; tokens, targets: [B, N] ids; mask: [B, N] (1 = scored).
      weights: [L] static exit weights (see `exit_weights`).
      distillation_weight: >= 0, the weight of mean_l KL_l (0: not computed; nothing
        either when no early exit is scored, e.g. "final" weighting). For a "full"
        output the head is the whole vocabulary, so KL_l forms [S, V] logits per
        exit on the S scored positions.
      tail_capacities: static gather size per tail cluster for the final exit's
        targets (`tail_capacities` of the training data); for the exits scored on a
        subset they are capped at its size. Default: `adaptive.gather_sizes`' ladder.

    Returns:
      (loss [], (metrics, state after the window)), metrics: "exit_nll" [L] (nan for
      unscored exits), "balance_loss" [], "classifier_loss" [], "distillation_loss"
      [] (mean_l KL_l; 0 when not computed).
    """
    check_choice("classifier_target", classifier_target, ClassifierTarget)
    n_layers, total = model.config.n_layers, tokens.size
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
    states, balance, after = model.apply(
        params,
        tokens,
        state,
        dropout_rng is None,
        mask,
        rngs=rngs,
        method=EarlyExitLM.hidden_states_from,
    )
    states = states.reshape(n_layers, total, -1)  # [L, T, D]
    targets, mask = targets.reshape(-1), mask.reshape(-1).astype(jnp.float32)  # [T]
    final_nll = exit_nll(model, params, states[-1:], targets, [n_layers - 1], tail_capacities)
    sample = jnp.arange(total)
    if min(exit_token_fraction, classifier_token_fraction) < 1.0:
        count = max(1, int(round(exit_token_fraction * total)))
        sample = jax.random.permutation(sample_rng, total)[:count]  # [S]
    classified = min(len(sample), max(1, int(round(classifier_token_fraction * total))))
    early = np.flatnonzero(np.asarray(weights)[:-1])  # exits before the last, scored
    loss = weights[-1] * _masked_mean(final_nll[0], mask) + balance_weight * balance.mean()
    per_exit = jnp.full(n_layers, jnp.nan).at[-1].set(_masked_mean(final_nll[0], mask))
    classifier_loss = distillation_loss = jnp.zeros(())
    if len(early):
        capacities = tail_capacities
        if capacities is not None and exit_token_fraction < 1.0:
            capacities = tuple(min(c, len(sample)) for c in capacities)
        nll = exit_nll(
            model, params, states[early][:, sample], targets[sample], early.tolist(), capacities
        )
        early_loss = jax.vmap(_masked_mean, (0, None))(nll, mask[sample])  # [K]
        loss = loss + jnp.dot(jnp.asarray(weights)[early], early_loss)
        per_exit = per_exit.at[jnp.asarray(early)].set(early_loss)
        if distillation_weight > 0:
            distillation_loss = _head_distillation(
                model, params, states[:, sample], early, mask[sample]
            )
            loss = loss + distillation_weight * distillation_loss
    if len(early) == n_layers - 1:
        positions = sample[:classified]  # [C]
        frozen = jax.lax.stop_gradient(states[:, positions])  # [L, C, D]
        logits = jax.vmap(
            lambda h, layer: model.apply(params, h, layer, method=EarlyExitLM.exit_classifier)
        )(frozen[:-1], jnp.arange(n_layers - 1))  # [L-1, C]
        if classifier_target == "loss_gap":
            gap = jax.lax.stop_gradient(nll[:, :classified] - final_nll[:, positions])
            errors = optax.squared_error(-jax.nn.log_sigmoid(logits), gap)  # [L-1, C]
        else:
            argmax = jnp.stack(
                [_exact_argmax(model, params, h, layer) for layer, h in enumerate(frozen)]
            )
            agrees = (argmax[:-1] == argmax[-1]).astype(jnp.float32)  # [L-1, C]
            errors = optax.sigmoid_binary_cross_entropy(logits, agrees)
        classifier_loss = jax.vmap(_masked_mean, (0, None))(errors, mask[positions]).mean()
        loss = loss + classifier_loss
    metrics = {
        "exit_nll": per_exit,
        "balance_loss": balance.mean(),
        "classifier_loss": classifier_loss,
        "distillation_loss": distillation_loss,
    }
    return loss, (metrics, after)


def _head_distillation(model: EarlyExitLM, params, states, early, mask) -> jax.Array:
    """Mean over the exits in `early` of the masked mean KL(q_L || q_l) of their head
    distributions (see `lm_loss`); states [L, S, D], mask [S]."""

    def head_log_probs(layer: int) -> jax.Array:
        output, features = _exit(model, params, states[layer], layer)
        return jax.nn.log_softmax(adaptive.head_logits(output, features))  # [S, c_1 + K]

    teacher = jax.lax.stop_gradient(head_log_probs(len(states) - 1))
    kl = [
        optax.losses.kl_divergence_with_log_targets(head_log_probs(layer), teacher)
        for layer in early.tolist()
    ]  # each [S]
    return jnp.mean(jnp.stack([_masked_mean(k, mask) for k in kl]))


def _exact_argmax(model: EarlyExitLM, params, h: jax.Array, layer: int) -> jax.Array:
    """Exit `layer`'s exact argmax of hidden states h [C, D] (no gradient); [C]."""
    output, features = jax.lax.stop_gradient(_exit(model, params, h, layer))
    return adaptive.exact_argmax(output, features)[0]


def _exit(
    model: EarlyExitLM, params, h: jax.Array, layer
) -> tuple[adaptive.OutputLayer, jax.Array]:
    """Exit `layer`'s output weights and its LayerNorm features of h [..., D]."""
    features = model.apply(params, h, layer, method=EarlyExitLM.exit_features)
    return model.apply(params, layer, method=EarlyExitLM.output_layer), features


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(values * mask) / jnp.maximum(mask.sum(), 1.0)
