"""Training losses: every exit's cross-entropy without materialising [B, N, V].

Each exit is scored by `adaptive.training_nll`: the head a chunk of
tokens at a time (recomputed in the backward pass), and for an adaptive output
each tail cluster only on the tokens whose target lies in it.

`lm_loss_from` composes the terms of the joint loss, each a function of its own:
`exit_cross_entropies`, `moe_balance_loss`, `exit_classifier_loss` and
`head_distillation_loss`, with the settings of a `TrainConfig`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ee_jax import adaptive
from ee_jax.config import (
    ClassifierTarget,
    ExitWeighting,
    ModelConfig,
    TrainConfig,
    check_choice,
)
from ee_jax.model import EarlyExitLM
from ee_jax.state import RecurrentState


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


def lm_loss(params, tokens, targets, mask, config: TrainConfig, **options):
    """`lm_loss_from` the start of a text (a fresh state), with its keyword
    options (rngs, tail_capacities, step): (loss [], metrics)."""
    start = RecurrentState.make(config.model, tokens.shape[0])
    loss, (metrics, _) = lm_loss_from(params, start, tokens, targets, mask, config, **options)
    return loss, metrics


def lm_loss_from(
    params,
    state: RecurrentState,
    tokens: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    config: TrainConfig,
    *,
    rngs: dict[str, jax.Array] | None = None,
    tail_capacities: tuple[int, ...] | None = None,
    step=None,
) -> tuple[jax.Array, tuple[dict, RecurrentState]]:
    """The joint training loss of a window read from `state`, and its parts.

    `state` is what the model read before the window (`EarlyExitLM.hidden_states_from`):
    a fresh one for window-reset training, or the previous window's final state
    for truncated backpropagation through time (the state is an input, so no
    gradient flows into earlier windows).

    loss = sum_l weights[l] * CE_l + balance_weight * mean_l(balance_l) + C_exit
           + distillation_weight * mean_{l<L} KL_l,
    with weights = `exit_weights`(L, config.exit_weighting), the early exits'
    (l < L) times min(1, step / exit_ramp_steps) with config.exit_ramp_steps > 0
    (an early-exit curriculum: the exits join as training goes, as in LayerSkip,
    Elhoushi et al. 2024), and the terms of
    `exit_cross_entropies` (CE_l), `moe_balance_loss`, `exit_classifier_loss`
    (C_exit, for config.classifier_target) and `head_distillation_loss` (KL_l), the
    early exits and the classifiers on the positions of `sampled_positions`.

    Exits whose weight is 0 are not scored at all, and then the classifiers
    (which need every exit) are not trained: with "final" weighting the step
    does the work of an ordinary single-head LM.

    Args:
      params: {"params": ...} of `EarlyExitLM(config.model)`; tokens, targets: [B, N]
        ids; mask: [B, N] (1 = scored).
      config: the training settings read: exit_weighting, balance_weight,
        exit_token_fraction, classifier_token_fraction, classifier_target,
        distillation_weight (and model). With distillation_weight 0 the KL is not
        computed, nor when no early exit is scored (e.g. "final" weighting).
      rngs: {"dropout": key, "sample": key} (`train.step_keys`). Without "dropout" the
        model runs deterministically (no dropout); "sample" is needed when a token
        fraction is < 1.
      tail_capacities: static gather size per tail cluster for the final exit's
        targets (`tail_capacities` of the training data); for the exits scored on a
        subset they are capped at its size. Default: `adaptive.gather_sizes`' ladder.
      step: the training step [] (for config.exit_ramp_steps; None: the ramp is over).

    Returns:
      (loss [], (metrics, state after the window)), metrics: "exit_nll" [L] (nan for
      unscored exits), "balance_loss" [], "classifier_loss" [], "distillation_loss"
      [] (mean_l KL_l; 0 when not computed).
    """
    model, n_layers, total = EarlyExitLM(config.model), config.model.n_layers, tokens.size
    rngs = rngs or {}
    states, balance, after = _hidden_states(model, params, state, tokens, mask, rngs.get("dropout"))
    targets, mask = targets.reshape(-1), mask.reshape(-1).astype(jnp.float32)  # [T]
    sample, classified = sampled_positions(total, config, rngs.get("sample"))
    weights = exit_weights(n_layers, config.exit_weighting)
    exits = exit_cross_entropies(
        model, params, states, targets, mask, weights, sample, tail_capacities
    )
    # This order of summation fixes the last bit of the logged loss (recorded runs).
    balance_loss = moe_balance_loss(balance)
    early_loss = exits.early_loss
    if config.exit_ramp_steps and step is not None:
        early_loss = early_loss * jnp.minimum(1.0, step / config.exit_ramp_steps)
    loss = exits.final_loss + config.balance_weight * balance_loss + early_loss
    classifier_loss = distillation_loss = jnp.zeros(())
    if len(exits.early) and config.distillation_weight > 0:
        distillation_loss = head_distillation_loss(
            model, params, states[:, sample], exits.early, mask[sample]
        )
        loss = loss + config.distillation_weight * distillation_loss
    if len(exits.early) == n_layers - 1:
        classifier_loss = exit_classifier_loss(
            model,
            params,
            states,
            sample[:classified],
            mask,
            config.classifier_target,
            early_nll=exits.early_nll,
            final_nll=exits.final_nll,
        )
        loss = loss + classifier_loss
    metrics = {
        "exit_nll": exits.per_exit,
        "balance_loss": balance_loss,
        "classifier_loss": classifier_loss,
        "distillation_loss": distillation_loss,
    }
    return loss, (metrics, after)


def sampled_positions(total: int, config: TrainConfig, rng: jax.Array | None) -> tuple:
    """The positions scoring the early exits and how many of them train the classifiers.

    With config.exit_token_fraction < 1 the exits before the last are scored on a
    random subset of that fraction of the T = B*N positions (the same subset for
    all of them, the first of a permutation drawn from `rng`): an unbiased
    estimate of their loss at a fraction of the vocabulary-projection cost, which
    dominates training. The classifiers are trained on the first
    config.classifier_token_fraction * T positions of that subset (all of it when
    the fraction is larger): the "agreement" target needs every exit's exact
    argmax, which evaluates tail clusters for most tokens of a trained adaptive
    softmax. With both fractions 1 every position, in order (no key needed).

    Returns:
      (sample [S] int positions in [0, T), C: the classifiers' positions are sample[:C]).
    """
    sample = jnp.arange(total)
    if min(config.exit_token_fraction, config.classifier_token_fraction) < 1.0:
        if rng is None:
            raise ValueError('a token fraction < 1 needs a "sample" key in rngs')
        count = max(1, int(round(config.exit_token_fraction * total)))
        sample = jax.random.permutation(rng, total)[:count]  # [S]
    classified = max(1, int(round(config.classifier_token_fraction * total)))
    return sample, min(len(sample), classified)


class ExitLosses(NamedTuple):
    """`exit_cross_entropies`' result."""

    final_loss: jax.Array  # [] weights[L-1] * CE_{L-1}, the last exit's term
    early_loss: jax.Array  # [] sum over the scored exits before the last of weights[l] * CE_l
    per_exit: jax.Array  # [L] CE_l, nan for the exits not scored
    early: np.ndarray  # [K] the exits before the last that are scored (weight > 0)
    final_nll: jax.Array  # [T] per-token NLL of the last exit
    early_nll: jax.Array | None  # [K, S] per-token NLL of the `early` exits on the sample


def exit_cross_entropies(
    model: EarlyExitLM,
    params,
    states: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    weights: np.ndarray,
    sample: jax.Array,
    capacities: tuple[int, ...] | None = None,
) -> ExitLosses:
    """The exits' weighted cross-entropy: sum_l weights[l] * CE_l = final_loss + early_loss.

    CE_l is exit l's masked mean cross-entropy (NLL of the target under its full,
    exact distribution, `exit_nll`): the last exit's over all T positions, each
    earlier exit's over the `sample` positions (an unbiased estimate when it is a
    random subset, `sampled_positions`). Exits whose weight is 0 are not scored.

    Args:
      states: [L, T, D] hidden states after each block; targets: [T] ids; mask: [T]
        float (1 = scored); weights: [L] static (`exit_weights`); sample: [S]
        positions scoring the early exits; capacities: static tail-cluster gather
        sizes of the last exit's targets (`tail_capacities`), capped at S for the
        early exits when S < T, or None.
    """
    n_layers, total = len(weights), len(targets)
    final_nll = exit_nll(model, params, states[-1:], targets, [n_layers - 1], capacities)[0]
    final_ce = _masked_mean(final_nll, mask)
    per_exit = jnp.full(n_layers, jnp.nan).at[-1].set(final_ce)
    early = np.flatnonzero(np.asarray(weights)[:-1])  # exits before the last, scored
    if not len(early):
        return ExitLosses(weights[-1] * final_ce, jnp.zeros(()), per_exit, early, final_nll, None)
    if capacities is not None and len(sample) < total:
        capacities = tuple(min(c, len(sample)) for c in capacities)
    early_nll = exit_nll(
        model, params, states[early][:, sample], targets[sample], early.tolist(), capacities
    )  # [K, S]
    early_ce = jax.vmap(_masked_mean, (0, None))(early_nll, mask[sample])  # [K]
    weighted = jnp.dot(jnp.asarray(weights)[early], early_ce)
    per_exit = per_exit.at[jnp.asarray(early)].set(early_ce)
    return ExitLosses(weights[-1] * final_ce, weighted, per_exit, early, final_nll, early_nll)


def moe_balance_loss(balance: jax.Array) -> jax.Array:
    """The MoE load-balancing term: mean over blocks of balance_l; [L] -> [].

    balance_l is block l's E * sum_e f_e P_e (the auxiliary loss of the Switch
    Transformer, Fedus et al. 2021, arXiv 2101.03961; `moe.MoEFeedForward`), with
    the router statistics over the masked tokens only.
    """
    return balance.mean()


def exit_classifier_loss(
    model: EarlyExitLM,
    params,
    states: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    target: ClassifierTarget,
    *,
    early_nll: jax.Array | None = None,
    final_nll: jax.Array | None = None,
) -> jax.Array:
    """C_exit: the learned exit classifiers' loss, averaged over exits 1..L-1; [].

    Exit l's classifier logit a_l is computed from its hidden state under
    stop-gradient (the backbone is not trained by this term), and its per-token
    error, a masked mean over `positions`, is for `target`:

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

    Args:
      states: [L, T, D] hidden states after each block; positions: [C] the
        positions trained on; mask: [T] float (1 = scored).
      early_nll: ("loss_gap" only) [L-1, S] NLL of exits 1..L-1 on positions whose
        first C are `positions` (`exit_cross_entropies`); final_nll: [T] the last
        exit's NLL.
    """
    check_choice("classifier_target", target, ClassifierTarget)
    n_layers = len(states)
    frozen = jax.lax.stop_gradient(states[:, positions])  # [L, C, D]
    logits = jax.vmap(
        lambda h, layer: model.apply(params, h, layer, method=EarlyExitLM.exit_classifier)
    )(frozen[:-1], jnp.arange(n_layers - 1))  # [L-1, C]
    if target == "loss_gap":
        if early_nll is None or final_nll is None:
            raise ValueError('classifier_target "loss_gap" needs early_nll and final_nll')
        gap = jax.lax.stop_gradient(early_nll[:, : len(positions)] - final_nll[positions])
        errors = optax.squared_error(-jax.nn.log_sigmoid(logits), gap)  # [L-1, C]
    else:
        argmax = jnp.stack(
            [_exact_argmax(model, params, h, layer) for layer, h in enumerate(frozen)]
        )
        agrees = (argmax[:-1] == argmax[-1]).astype(jnp.float32)  # [L-1, C]
        errors = optax.sigmoid_binary_cross_entropy(logits, agrees)
    return jax.vmap(_masked_mean, (0, None))(errors, mask[positions]).mean()


def head_distillation_loss(
    model: EarlyExitLM, params, states: jax.Array, early, mask: jax.Array
) -> jax.Array:
    """mean_{l in early} KL_l, the early exits' head self-distillation term; [].

    KL_l is the self-distillation term of multi-exit networks (Phuong & Lampert
    2019, "Distillation-based training for multi-exit architectures"), here on the
    head of the output layer: the masked mean of KL(q_L || q_l) between the last
    exit's head distribution q_L = softmax(head logits) over the c_1 head words and
    K cluster tokens (stop-gradient teacher) and exit l's. It is the head's share of
    the full KL (the chain rule adds each cluster's expected tail KL), at the cost
    of one head per exit, no tail. It pulls the early exits toward the last one,
    which is what lets tokens exit early at a small cost. For a "full" output the
    head is the whole vocabulary, so it forms [S, V] logits per exit.

    Args:
      states: [L, S, D] hidden states after each block on the S positions scoring
        the early exits; early: the exits before the last to distil (static);
        mask: [S] float (1 = scored).
    """

    def head_log_probs(layer: int) -> jax.Array:
        output, features = _exit(model, params, states[layer], layer)
        return jax.nn.log_softmax(adaptive.head_logits(output, features))  # [S, c_1 + K]

    teacher = jax.lax.stop_gradient(head_log_probs(len(states) - 1))
    kl = [
        optax.losses.kl_divergence_with_log_targets(head_log_probs(layer), teacher)
        for layer in np.asarray(early).tolist()
    ]  # each [S]
    return jnp.mean(jnp.stack([_masked_mean(k, mask) for k in kl]))


def _hidden_states(
    model: EarlyExitLM, params, state: RecurrentState, tokens, mask, dropout_rng
) -> tuple[jax.Array, jax.Array, RecurrentState]:
    """Every block's output of the window, [L, T, D] with T = B*N, its balance losses
    [L] and the state after it; with dropout unless dropout_rng is None."""
    deterministic = dropout_rng is None
    states, balance, after = model.apply(
        params,
        tokens,
        state,
        deterministic,
        mask,
        rngs={} if deterministic else {"dropout": dropout_rng},
        method=EarlyExitLM.hidden_states_from,
    )
    return states.reshape(model.config.n_layers, tokens.size, -1), balance, after


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
