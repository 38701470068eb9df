"""Adaptive-softmax exits against float64 NumPy references of the same distribution."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TOLERANCE, apply_jitted, init_variables

from ee_jax import adaptive
from ee_jax.config import ExitMeasure, ModelConfig, TrainConfig, tiny
from ee_jax.early_exit import early_exit_forward
from ee_jax.flops import exit_flops, tail_use_of
from ee_jax.losses import exit_weights, lm_loss, tail_capacities
from ee_jax.model import EarlyExitLM

CONFIG = tiny().replace(output="adaptive", adaptive_cutoffs=(20, 50), adaptive_div=2.0)
THRESHOLDS = (0.0, 0.05, 0.3, 0.5, 0.9, 1.0)


def reference_log_probs(layer: adaptive.OutputLayer, x) -> np.ndarray:
    """float64 NumPy log p(w) of every word, written from the factorisation."""
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    x = f64(x)

    def log_softmax(logits):
        shifted = logits - logits.max(-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))

    head = log_softmax(x @ f64(layer.head_kernel).T + f64(layer.head_bias))
    words = layer.head_words
    parts = [head[..., :words]]
    for k in range(layer.n_tails):
        projected = x @ f64(layer.tail_projections[k]).T
        tail = log_softmax(projected @ f64(layer.tail_kernels[k]).T + f64(layer.tail_biases[k]))
        parts.append(head[..., words + k, None] + tail)
    return np.concatenate(parts, axis=-1)


@functools.cache
def model_and_variables(unembedding: str, seed: int = 0):
    model = EarlyExitLM(CONFIG.replace(unembedding=unembedding))
    tokens = jnp.zeros((1, CONFIG.n_seq), jnp.int32)
    return model, init_variables(model, jax.random.key(seed), tokens)


def random_tokens(seed: int, batch: int = 3):
    return jax.random.randint(jax.random.key(seed), (batch, CONFIG.n_seq), 0, CONFIG.vocab_size)


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(adaptive_cutoffs=(50, 20)), "adaptive_cutoffs"),
        (dict(adaptive_cutoffs=(20, 20)), "adaptive_cutoffs"),
        (dict(adaptive_cutoffs=(0, 20)), "adaptive_cutoffs"),
        (dict(adaptive_cutoffs=(20, 97)), "adaptive_cutoffs"),
        (dict(adaptive_cutoffs=()), "adaptive_cutoffs"),
        (dict(adaptive_div=0.0), "adaptive_div"),
        (dict(adaptive_div=-2.0), "adaptive_div"),
        (dict(adaptive_div=8.0), "adaptive_div"),  # 16 // 8**2 = 0 dimensions
        (dict(output="hierarchical"), "output"),
    ],
)
def test_config_rejects_bad_adaptive_settings_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        CONFIG.replace(**changes)


def test_cluster_bounds_and_tail_dims():
    assert CONFIG.cluster_bounds == (20, 50, 97)
    assert CONFIG.tail_dims == (8, 4)
    assert CONFIG.replace(output="full").cluster_bounds == (97,)


# ---------------------------------------------------------------- the distribution


@pytest.mark.parametrize("unembedding", ["shared", "per_exit", "tied"])
def test_exit_log_probs_are_normalised_and_match_a_float64_reference(unembedding):
    model, variables = model_and_variables(unembedding)
    hidden = jax.random.normal(jax.random.key(1), (64, CONFIG.d_model)) * 3.0
    for layer in range(CONFIG.n_layers):
        log_probs = model.apply(variables, hidden, layer, method=EarlyExitLM.exit_log_probs)
        chex.assert_shape(log_probs, (64, CONFIG.vocab_size))
        total = np.asarray(jnp.exp(log_probs).sum(-1))
        np.testing.assert_allclose(total, 1.0, atol=1e-5)
        output = model.apply(variables, layer, method=EarlyExitLM.output_layer)
        features = model.apply(variables, hidden, layer, method=EarlyExitLM.exit_features)
        expected = reference_log_probs(output, features)
        np.testing.assert_allclose(log_probs, expected, atol=1e-5)


def test_per_exit_heads_differ_and_shared_heads_agree():
    for unembedding, differ in (("per_exit", True), ("shared", False)):
        model, variables = model_and_variables(unembedding)
        first, last = (
            model.apply(variables, layer, method=EarlyExitLM.output_layer)
            for layer in (0, CONFIG.n_layers - 1)
        )
        same = all(
            np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(last), strict=True)
        )
        assert same != differ


def test_tied_adaptive_input_embeds_tail_words_through_their_cluster_projection():
    # Adaptive input (Baevski & Auli 2019): the input embedding of a word of tail
    # cluster k is its d_k-dim row projected to D by the output's own projection.
    model, variables = model_and_variables("tied")
    params = variables["params"]
    tokens = jnp.array([[0, 19, 20, 49, 50, 96]])
    embed = lambda module, ids: module.embedder.embed_tokens(ids)  # noqa: E731
    embedded = np.asarray(model.apply(variables, tokens, method=embed))[0]
    embedder = params["embedder"]
    head = np.asarray(embedder["token_embed"]["embedding"])
    tail1 = np.asarray(embedder["tail1_embedding"]) @ np.asarray(embedder["tail1_projection"])
    tail2 = np.asarray(embedder["tail2_embedding"]) @ np.asarray(embedder["tail2_projection"])
    expected = np.stack([head[0], head[19], tail1[0], tail1[29], tail2[0], tail2[46]])
    np.testing.assert_allclose(embedded, expected, atol=1e-6)
    # The output's tail kernels are those embedding rows.
    output = model.apply(variables, 0, method=EarlyExitLM.output_layer)
    np.testing.assert_array_equal(output.tail_kernels[0], embedder["tail1_embedding"])
    np.testing.assert_array_equal(output.head_kernel[:20], head)


# ---------------------------------------------------------------- exact cheap queries


def output_layer(regime: str, seed: int = 0):
    """A V = 600 adaptive output (cutoffs 60, 250; D = 32) in one of three regimes:
    "random" (flat distributions), "trained" (Zipfian biases, peaked features) and
    "tail" (clusters hold most of the mass, peaked inside)."""
    bounds, d, dims = (60, 250, 600), 32, (16, 8)
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    normal = lambda shape, scale: scale * jax.random.normal(next(keys), shape)  # noqa: E731
    zipf = -np.log(np.arange(1, 601))  # log of 1 / rank
    head_bias = np.concatenate(
        [zipf[:60], [np.logaddexp.reduce(zipf[60:250]), np.logaddexp.reduce(zipf[250:])]]
    )
    biases = [zipf[60:250] - zipf[60], zipf[250:] - zipf[250]]
    scale = {"random": 1.0, "trained": 3.0, "tail": 4.0}[regime]
    if regime == "random":
        head_bias, biases = 0 * head_bias, [0 * b for b in biases]
    if regime == "tail":
        head_bias = head_bias + np.r_[np.zeros(60), 6.0, 5.0]
    sizes = (190, 350)
    return adaptive.OutputLayer(
        head_kernel=normal((62, d), scale * d**-0.5),
        head_bias=jnp.asarray(head_bias, jnp.float32),
        tail_projections=tuple(normal((w, d), d**-0.5) for w in dims),
        tail_kernels=tuple(
            normal((n, w), scale * w**-0.5) for n, w in zip(sizes, dims, strict=True)
        ),
        tail_biases=tuple(jnp.asarray(b, jnp.float32) for b in biases),
        bounds=bounds,
    )


def reference_confidence(log_probs: np.ndarray):
    ordered = np.sort(np.exp(log_probs), axis=-1)
    return {
        ExitMeasure.SOFTMAX_MAX: ordered[:, -1],
        ExitMeasure.SOFTMAX_MARGIN: ordered[:, -1] - ordered[:, -2],
    }


@pytest.mark.parametrize("regime", ["random", "trained", "tail"])
def test_exit_decisions_equal_the_full_distribution_for_every_threshold(regime):
    # Given hidden states and the float64 full distribution they define.
    layer = output_layer(regime)
    x = jax.random.normal(jax.random.key(7), (2048, 32))
    log_probs = reference_log_probs(layer, x)
    expected = reference_confidence(log_probs)
    head_only = np.max(np.exp(log_probs[:, :60]), axis=-1)
    decide = jax.jit(adaptive.exit_confidence, static_argnums=(2, 4))
    evaluated_tails = 0
    for measure in (ExitMeasure.SOFTMAX_MAX, ExitMeasure.SOFTMAX_MARGIN):
        for threshold in THRESHOLDS:
            want = (expected[measure] >= threshold) & (threshold < 1.0)
            # Tokens within float32 rounding of the threshold are left out; there
            # are (almost) none.
            clear = np.abs(expected[measure] - threshold) > 1e-6
            assert clear.mean() > 0.999
            # When the head-bound decision runs (gathered, overflowing, all tokens).
            for capacity in (None, 1, 2048):
                confidence = np.asarray(decide(layer, x, measure, jnp.float32(threshold), capacity))
                got = (confidence >= threshold) & (threshold < 1.0)
                # Then every decision is that of the full distribution.
                np.testing.assert_array_equal(got[clear], want[clear])
            # Count exits the head words alone could not justify.
            evaluated_tails += int(np.sum(want & (head_only < threshold)))
    if regime == "tail":
        assert evaluated_tails > 100  # the tails really decided some exits


@pytest.mark.parametrize("regime", ["random", "trained", "tail"])
def test_top_two_argmax_and_target_nll_are_exact(regime):
    layer = output_layer(regime, seed=1)
    x = jax.random.normal(jax.random.key(8), (1024, 32))
    targets = jax.random.randint(jax.random.key(9), (1024,), 0, 600)
    log_probs = reference_log_probs(layer, x)
    ordered = np.sort(log_probs, axis=-1)
    for capacity in (None, 1):
        first, second, argmax = adaptive.top_two(layer, x, capacity)
        np.testing.assert_allclose(first, ordered[:, -1], atol=1e-5)
        np.testing.assert_allclose(second, ordered[:, -2], atol=1e-5)
        np.testing.assert_array_equal(argmax, np.argmax(log_probs, axis=-1))
        index, _ = adaptive.exact_argmax(layer, x, capacity)
        np.testing.assert_array_equal(index, np.argmax(log_probs, axis=-1))
        nll = adaptive.target_nll(layer, x, targets, capacity)
        expected = -np.take_along_axis(log_probs, np.asarray(targets)[:, None], -1)[:, 0]
        np.testing.assert_allclose(nll, expected, atol=1e-5)
    if regime == "tail":
        assert np.mean(np.argmax(log_probs, axis=-1) >= 60) > 0.2  # tails hold the argmax


@pytest.mark.parametrize("regime", ["random", "trained", "tail"])
def test_top_k_is_the_stable_top_k_of_the_full_distribution(regime):
    # Given the float64 full distribution and its stable descending order.
    layer = output_layer(regime, seed=2)
    x = jax.random.normal(jax.random.key(10), (512, 32))
    log_probs = reference_log_probs(layer, x)
    order = np.argsort(-log_probs, axis=-1, kind="stable")
    top = jax.jit(adaptive.top_k, static_argnums=2)
    for k, rows in ((1, 512), (40, 512), (1, 1), (40, 1), (100, 4)):
        # When the top k come from the head and the tails that can hold one (rows
        # decide together whether a tail runs).
        values, ids = top(layer, x[:rows], k)
        # Then they are the first k of that order, with their log-probabilities (rows
        # with two of the first k + 1 within float32 rounding are left out).
        expected = np.take_along_axis(log_probs[:rows], order[:rows, : k + 1], -1)
        clear = np.all(-np.diff(expected, axis=-1) > 1e-5, axis=-1)
        assert clear.mean() > 0.9 or rows < 10
        np.testing.assert_array_equal(np.asarray(ids)[clear], order[:rows][clear, :k])
        np.testing.assert_allclose(values, expected[:, :k], atol=1e-5)
    if regime == "tail":
        assert np.mean(order[:, :40] >= 60) > 0.3  # tail words are among the top 40


def test_top_k_ties_at_the_cut_keep_the_lowest_ids_across_clusters():
    # Word 3 (head) and word 60 (all of cluster 1) have the same probability.
    layer = output_layer("random")
    zero = lambda a: jnp.zeros_like(a)  # noqa: E731
    layer = layer.replace(
        head_kernel=zero(layer.head_kernel),
        head_bias=jnp.zeros(62).at[3].set(2.0).at[60].set(2.0).at[7].set(3.0),
        tail_kernels=tuple(map(zero, layer.tail_kernels)),
        tail_biases=(jnp.full(190, -jnp.inf).at[0].set(0.0), layer.tail_biases[1]),
    )
    _, ids = adaptive.top_k(layer, jnp.ones((2, 32)), 3)
    np.testing.assert_array_equal(ids, [[7, 3, 60]] * 2)
    _, ids = adaptive.top_k(layer, jnp.ones((2, 32)), 2)
    np.testing.assert_array_equal(ids, [[7, 3]] * 2)


def test_argmax_ties_take_the_lowest_id_across_clusters():
    # A head word and a tail word with exactly equal probability: argmax is the head word.
    layer = output_layer("random")
    zero = lambda a: jnp.zeros_like(a)  # noqa: E731
    layer = layer.replace(
        head_kernel=zero(layer.head_kernel),
        head_bias=jnp.zeros(62).at[3].set(2.0).at[60].set(2.0),
        tail_kernels=tuple(map(zero, layer.tail_kernels)),
        tail_biases=(jnp.full(190, -jnp.inf).at[0].set(0.0), layer.tail_biases[1]),
    )
    x = jnp.ones((4, 32))
    # Word 60 (first of cluster 1) has all of P_1, which equals p(word 3) bit for bit.
    index, _ = adaptive.exact_argmax(layer, x)
    np.testing.assert_array_equal(index, 3)
    first, second, argmax = adaptive.top_two(layer, x)
    np.testing.assert_array_equal(argmax, 3)
    np.testing.assert_allclose(first, second, atol=1e-6)


# ---------------------------------------------------------------- the training loss


def materialised_loss(
    model,
    v,
    tokens,
    targets,
    mask,
    weights,
    sample=None,
    classified=None,
    target="agreement",
    distillation=0.0,
):
    """The joint loss from every exit's full log-probabilities [L, T, V]: the early
    exits scored on positions `sample`, the classifiers on `classified` (default all)
    with `classifier_target` = `target`, and `distillation` times the head KL."""
    states, balance = model.apply(v, tokens, True, mask, method=EarlyExitLM.hidden_states)
    states = states.reshape(CONFIG.n_layers, -1, states.shape[-1])  # [L, T, D]
    targets, mask = targets.reshape(-1), mask.reshape(-1)
    sample = jnp.arange(targets.size) if sample is None else sample
    classified = sample if classified is None else classified
    log_probs = jax.vmap(
        lambda h, layer: model.apply(v, h, layer, method=EarlyExitLM.exit_log_probs)
    )(states, jnp.arange(CONFIG.n_layers))  # [L, T, V]
    nll = -jnp.take_along_axis(log_probs, targets[None, :, None], -1)[..., 0]  # [L, T]
    final = jnp.sum(nll[-1] * mask) / mask.sum()
    early = jnp.sum(nll[:-1, sample] * mask[sample], axis=1) / mask[sample].sum()
    classifier = jax.vmap(
        lambda h, layer: model.apply(v, h, layer, method=EarlyExitLM.exit_classifier)
    )(states[:-1, classified], jnp.arange(CONFIG.n_layers - 1))
    if target == "agreement":
        argmax = jnp.argmax(log_probs[:, classified], -1)
        agrees = (argmax[:-1] == argmax[-1]).astype(jnp.float32)
        errors = optax.sigmoid_binary_cross_entropy(classifier, agrees)
    else:  # the predicted gap softplus(-a) against the observed NLL gap
        gap = jax.lax.stop_gradient(nll[:-1, classified] - nll[-1, classified])
        errors = (jax.nn.softplus(-classifier) - gap) ** 2
    classifier_loss = (jnp.sum(errors * mask[classified], axis=1) / mask[classified].sum()).mean()
    per_exit = jnp.concatenate([early, final[None]])
    loss = jnp.dot(weights, per_exit) + 0.01 * balance.mean() + classifier_loss
    if distillation:
        # The head's distribution by summing the full one: head words, then each
        # cluster's total probability.
        bounds = CONFIG.cluster_bounds
        clusters = [
            jax.nn.logsumexp(log_probs[..., low:high], axis=-1, keepdims=True)
            for low, high in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        head = jnp.concatenate([log_probs[..., : bounds[0]], *clusters], axis=-1)[:, sample]
        teacher = jax.lax.stop_gradient(head[-1])
        kl = jnp.sum(jnp.exp(teacher) * (teacher - head[:-1]), axis=-1)  # [L-1, S]
        kl = jnp.sum(kl * mask[sample], axis=1) / mask[sample].sum()
        loss = loss + distillation * kl.mean()
    return loss


@pytest.mark.parametrize(
    "unembedding, capacities",
    [("per_exit", None), ("per_exit", (1, 1)), ("tied", "tight")],
)
def test_training_loss_and_gradients_equal_a_materialised_log_softmax(unembedding, capacities):
    # Given the adaptive joint loss and a reference from every word's log-probability.
    model, variables = model_and_variables(unembedding)
    tokens = random_tokens(3, batch=4)
    # Row 0 puts 16 targets in tail cluster 2: a capacity of 1 overflows.
    targets = jnp.roll(tokens, -1, axis=1).at[0].set(90)
    mask = jnp.ones_like(tokens).at[1, 9:].set(0)
    config = TrainConfig(model=model.config, exit_weighting="linear", balance_weight=0.01)
    if capacities == "tight":  # what training computes from the data
        capacities = tail_capacities(CONFIG, np.asarray(targets)[None], np.asarray(mask)[None])

    # When both are differentiated, then loss and gradients agree.
    assert_loss_and_gradients_match(
        (model, variables, tokens, targets, mask), config, tail_capacities=capacities
    )


def assert_loss_and_gradients_match(
    arguments, config, *, rngs=None, tail_capacities=None, sample=None, classified=None
):
    """`lm_loss` with TrainConfig `config` (balance_weight 0.01), `rngs` and
    `tail_capacities` against `materialised_loss` on the same arguments."""
    target, distillation = config.classifier_target, config.distillation_weight
    model, variables, tokens, targets, mask = arguments
    weights = exit_weights(CONFIG.n_layers, config.exit_weighting)
    arguments = (*arguments, weights)

    def loss(v):
        return lm_loss(
            v, tokens, targets, mask, config, rngs=rngs, tail_capacities=tail_capacities
        )[0]

    got_loss, got = jax.jit(jax.value_and_grad(loss))(variables)
    want_loss, want = jax.jit(
        jax.value_and_grad(materialised_loss, argnums=1), static_argnums=(0, 8, 9)
    )(*arguments, sample, classified, target, distillation)
    np.testing.assert_allclose(got_loss, want_loss, rtol=TOLERANCE["float32"])
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        w = functools.reduce(lambda t, k: t[k.key], path, want)
        scale = float(jnp.abs(w).max())
        np.testing.assert_allclose(g, w, atol=1e-5 * max(scale, 1e-6), err_msg=str(path))


@pytest.mark.parametrize(
    "classifier_target, distillation", [("agreement", 0.0), ("loss_gap", 0.0), ("loss_gap", 0.3)]
)
def test_sampled_exits_and_classifiers_equal_the_reference_on_those_positions(
    classifier_target, distillation
):
    # Given early exits scored on half the positions and the classifiers trained
    # on an eighth (the first of the same random permutation), for either target.
    model, variables = model_and_variables("shared")
    tokens = random_tokens(5, batch=4)
    targets = jnp.roll(tokens, -1, axis=1)
    mask = jnp.ones_like(tokens).at[2, 5:].set(0)
    rng = jax.random.key(11)
    total = tokens.size
    order = jax.random.permutation(rng, total)

    config = TrainConfig(
        model=model.config,
        exit_weighting="uniform",
        balance_weight=0.01,
        exit_token_fraction=0.5,
        classifier_token_fraction=0.125,
        classifier_target=classifier_target,
        distillation_weight=distillation,
    )
    assert_loss_and_gradients_match(
        (model, variables, tokens, targets, mask),
        config,
        rngs={"sample": rng},
        sample=order[: total // 2],
        classified=order[: total // 8],
    )


def test_tail_capacities_count_the_most_targets_of_a_cluster_per_batch():
    targets = np.array([[[0, 25, 30, 60]], [[55, 60, 70, 96]]])  # [S=2, B=1, N=4]
    mask = np.array([[[1, 1, 1, 1]], [[1, 1, 1, 0]]], bool)
    assert tail_capacities(CONFIG, targets, mask) == (2, 3)  # 96 is masked out
    assert tail_capacities(CONFIG.replace(output="full"), targets, mask) == ()


# ---------------------------------------------------------------- halting, decoding, FLOPs


@pytest.mark.parametrize("measure", ["softmax_max", "softmax_margin"])
def test_halting_loop_compiles_once_for_every_threshold(measure):
    model, variables = model_and_variables("shared")
    loop = jax.jit(
        chex.assert_max_traces(
            lambda v, t, th: early_exit_forward(model, v, t, th, measure=measure), n=1
        )
    )
    chex.clear_trace_counter()
    for seed, threshold in enumerate(THRESHOLDS):
        loop(variables, random_tokens(seed), jnp.float32(threshold))


def test_threshold_one_gives_the_full_forward_and_zero_the_first_exit():
    model, variables = model_and_variables("per_exit")
    tokens = random_tokens(4)
    logits, info = early_exit_forward(model, variables, tokens, 1.0, measure="softmax_margin")
    np.testing.assert_allclose(logits, apply_jitted(model, variables, tokens), atol=1e-5)
    assert np.all(np.asarray(info.exit_depth) == CONFIG.n_layers)
    logits, info = early_exit_forward(model, variables, tokens, 0.0, measure="softmax_margin")
    first = apply_jitted(model, variables, tokens, method=EarlyExitLM.exit_logits)[0]
    np.testing.assert_allclose(logits, first, atol=1e-5)
    assert np.all(np.asarray(info.exit_depth) == 1)


def test_flop_model_counts_head_and_expected_tails():
    config = ModelConfig(vocab_size=33278, output="adaptive")  # cutoffs 2,000 / 10,000
    full = config.replace(output="full")
    targets = np.r_[np.zeros(80), np.full(14, 5000), np.full(6, 20000)].astype(int)
    use = tail_use_of(config, targets)
    np.testing.assert_allclose(use, [0.14, 0.06])
    per_depth, whole = exit_flops(config, "learned", "freeze", use)
    _, whole_full = exit_flops(full, "learned", "freeze")
    d = 64
    head = (2 * d + 3) * 2002
    tails = [2 * d * 16 + (2 * 16 + 3) * 8000, 2 * d * 4 + (2 * 4 + 3) * 23278]
    output = head + 0.14 * tails[0] + 0.06 * tails[1]
    blocks = whole_full - (2 * d + 3) * 33278
    np.testing.assert_allclose(whole, blocks + output)
    # A softmax check costs a head: at full depth L - 1 of them (the last one's head
    # is the output's); a learned check costs 2 D.
    per_depth_max, _ = exit_flops(config, "softmax_max", "freeze", use)
    np.testing.assert_allclose(per_depth_max[-1] - per_depth[-1], 3 * (head - 2 * d))
