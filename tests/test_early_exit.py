"""The jit-compiled halting loop against an eager Python reference, and exit stats."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOLERANCE, apply_jitted, init_variables, random_exit_classifiers

from ee_jax.config import tiny
from ee_jax.early_exit import ExitInfo, ExitStats, early_exit_forward, early_exit_loop
from ee_jax.flops import exit_flops
from ee_jax.model import EarlyExitLM

CONFIG = tiny()
ADAPTIVE = CONFIG.replace(output="adaptive", adaptive_cutoffs=(20, 50), adaptive_div=2.0)
MEASURES = ("softmax_max", "softmax_margin", "state_saturation", "learned")


@functools.cache
def model_and_variables(seed=0, causal=True, output="full"):
    config = ADAPTIVE if output == "adaptive" else CONFIG
    model = EarlyExitLM(config.replace(causal=causal))
    tokens = jnp.zeros((1, CONFIG.n_seq), jnp.int32)
    variables = init_variables(model, jax.random.key(seed), tokens)
    if seed:  # make the learned classifiers non-trivial (they start at zero)
        variables = random_exit_classifiers(variables, jax.random.key(seed))
    return model, variables


def random_tokens(seed, batch=3):
    return jax.random.randint(jax.random.key(seed), (batch, CONFIG.n_seq), 0, CONFIG.vocab_size)


def reference_early_exit(model, variables, tokens, threshold, measure, exited_state):
    """An eager Python loop over layers, written from the definition (the exit head's
    full [..., V] logits; for an adaptive output its log-probabilities)."""
    apply = functools.partial(apply_jitted, model, variables)  # each piece compiled whole
    n_layers = model.config.n_layers
    hidden = np.asarray(apply(tokens, method=EarlyExitLM.embed))
    exited = np.zeros(tokens.shape, bool)
    depth = np.zeros(tokens.shape, np.int32)
    logits = np.zeros((*tokens.shape, model.config.vocab_size), np.float32)
    for layer in range(n_layers):
        if exited.all():
            break
        after = np.array(apply(jnp.asarray(hidden), layer, method=EarlyExitLM.block)[0])
        head = np.asarray(apply(jnp.asarray(after), layer, method=EarlyExitLM.exit_head))
        probabilities = np.asarray(jax.nn.softmax(head))
        ordered = np.sort(probabilities, axis=-1)
        confidence = {
            "softmax_max": ordered[..., -1],
            "softmax_margin": ordered[..., -1] - ordered[..., -2],
            "learned": np.asarray(
                jax.nn.sigmoid(apply(jnp.asarray(after), layer, method=EarlyExitLM.exit_classifier))
            ),
            "state_saturation": np.sum(hidden * after, -1)
            / (np.linalg.norm(hidden, axis=-1) * np.linalg.norm(after, axis=-1)),
        }[measure]
        leaving = ~exited & ((confidence >= threshold) & (threshold < 1) | (layer == n_layers - 1))
        depth[leaving] = layer + 1
        logits[leaving] = head[leaving]
        if exited_state == "freeze":
            after[exited] = hidden[exited]
        exited |= leaving
        hidden = after
    return logits, depth


def thresholds_that_split(model, variables, tokens, measure):
    """Thresholds between the quantiles of the first exit's confidence, so that
    some tokens exit early and some do not."""
    _, info = early_exit_forward(model, variables, tokens, 0.0, measure=measure)
    confidence = np.asarray(info.confidence)
    return [float(np.quantile(confidence, q)) for q in (0.3, 0.7)]


ADAPTIVE_CASES = [  # the adaptive output, for the measures that read the output layer
    ("adaptive", measure, "freeze") for measure in ("softmax_max", "softmax_margin", "learned")
]


@pytest.mark.parametrize(
    "output, measure, exited_state",
    [
        *[("full", m, e) for m in MEASURES for e in ("freeze", "compute")],
        *ADAPTIVE_CASES,
    ],
)
def test_while_loop_matches_eager_reference(output, measure, exited_state):
    for seed in (1, 2):
        # Given a random model, tokens, and thresholds that split the tokens.
        model, variables = model_and_variables(seed, output=output)
        tokens = random_tokens(seed)
        for threshold in thresholds_that_split(model, variables, tokens, measure):
            # When the jitted loop and the eager reference run.
            logits, info = early_exit_forward(
                model, variables, tokens, threshold, measure=measure, exited_state=exited_state
            )
            expected_logits, expected_depth = reference_early_exit(
                model, variables, tokens, threshold, measure, exited_state
            )
            # Then exit depths are identical and logits agree.
            np.testing.assert_array_equal(info.exit_depth, expected_depth)
            np.testing.assert_allclose(logits, expected_logits, atol=TOLERANCE["float32"])
            assert 1 < len(np.unique(expected_depth)), "the thresholds should split tokens"
            # Every token that exited before L was confident enough.
            early = np.asarray(info.exit_depth) < model.config.n_layers
            assert np.all(np.asarray(info.confidence)[early] >= threshold)
            assert int(info.layers_run) == int(expected_depth.max())


MIXERS = {
    "bk_values": ADAPTIVE.replace(bk_value_dim=2),
    "attention": ADAPTIVE.replace(mixer="attention", attention_heads=2),
    "none": ADAPTIVE.replace(mixer="none"),
    "lstm": ADAPTIVE.replace(mixer="lstm"),
}


@pytest.mark.parametrize(
    "mixer, measure",
    [
        ("bk_values", "softmax_max"),
        ("attention", "learned"),
        ("none", "softmax_max"),
        ("lstm", "softmax_margin"),
    ],
)
def test_compacted_loop_equals_the_masked_loop_and_the_eager_reference(mixer, measure):
    # Given each mixer and thresholds from "almost everyone exits at once" to
    # "almost no one": active-token counts that take several gather sizes.
    model = EarlyExitLM(MIXERS[mixer])
    tokens = random_tokens(4, batch=4)
    variables = init_variables(model, jax.random.key(4), tokens)
    variables = random_exit_classifiers(variables, jax.random.key(5))
    _, info = early_exit_forward(model, variables, tokens, 0.0, measure=measure)
    confidence = np.asarray(info.confidence)
    for q in (0.05, 0.5, 0.97):
        threshold = float(np.quantile(confidence, q))
        # When the compacted loop (the default), the masked loop and the reference run.
        logits, info = early_exit_forward(model, variables, tokens, threshold, measure=measure)
        masked_logits, masked = early_exit_forward(
            model, variables, tokens, threshold, measure=measure, compact=False
        )
        expected_logits, expected_depth = reference_early_exit(
            model, variables, tokens, threshold, measure, "freeze"
        )
        # Then all three agree.
        np.testing.assert_array_equal(info.exit_depth, masked.exit_depth)
        np.testing.assert_array_equal(info.exit_depth, expected_depth)
        np.testing.assert_allclose(logits, masked_logits, atol=TOLERANCE["float32"])
        np.testing.assert_allclose(logits, expected_logits, atol=TOLERANCE["float32"])
        np.testing.assert_allclose(info.confidence, masked.confidence, atol=TOLERANCE["float32"])
        assert int(info.layers_run) == int(masked.layers_run)


@pytest.mark.parametrize("measure", ["softmax_max", "softmax_margin"])
def test_threshold_one_is_the_full_forward_and_zero_is_the_first_exit(measure):
    model, variables = model_and_variables(0)
    tokens = random_tokens(0)
    full = model.apply(variables, tokens)
    first_exit = model.apply(variables, tokens, method=EarlyExitLM.exit_logits)[0]

    logits, info = early_exit_forward(model, variables, tokens, 1.0, measure=measure)
    np.testing.assert_allclose(logits, full, atol=TOLERANCE["float32"])
    assert np.all(np.asarray(info.exit_depth) == CONFIG.n_layers)

    logits, info = early_exit_forward(model, variables, tokens, 0.0, measure=measure)
    np.testing.assert_allclose(logits, first_exit, atol=TOLERANCE["float32"])
    assert np.all(np.asarray(info.exit_depth) == 1)
    assert int(info.layers_run) == 1


@pytest.mark.parametrize("causal", [True, False])
def test_early_exit_is_causal_when_the_core_is(causal):
    # Given a sequence and a copy with token t + 1 changed.
    model, variables = model_and_variables(1, causal)
    tokens = random_tokens(5)
    t = 7
    changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 3) % CONFIG.vocab_size)
    threshold = thresholds_that_split(model, variables, tokens, "softmax_max")[0]
    # When both go through the halting loop.
    before, info_before = early_exit_forward(model, variables, tokens, threshold)
    after, info_after = early_exit_forward(model, variables, changed, threshold)
    # Then with a causal core positions <= t keep their logits and exit depths.
    difference = float(jnp.max(jnp.abs(before[:, : t + 1] - after[:, : t + 1])))
    if causal:
        assert difference <= 1e-6
        np.testing.assert_array_equal(
            info_before.exit_depth[:, : t + 1], info_after.exit_depth[:, : t + 1]
        )
    else:
        assert difference > 1e-4


def test_average_depth_is_monotone_in_threshold_when_exited_tokens_compute():
    model, variables = model_and_variables(2)
    tokens = random_tokens(2, batch=4)
    depths = []
    for threshold in np.linspace(0.0, 1.0, 11):
        _, info = early_exit_forward(
            model, variables, tokens, float(threshold), exited_state="compute"
        )
        depths.append(float(np.mean(info.exit_depth)))
    assert np.all(np.diff(depths) >= 0), depths
    assert depths[0] == 1.0 and depths[-1] == CONFIG.n_layers


def test_thresholds_and_new_batches_compile_once():
    model, variables = model_and_variables(1)
    chex.clear_trace_counter()

    def halting_loop(variables, tokens, threshold):
        return early_exit_loop(model, variables, tokens, threshold, "softmax_max", "freeze")

    loop = jax.jit(chex.assert_max_traces(halting_loop, n=1))
    for seed, threshold in enumerate((0.0, 0.1, 0.5, 0.9, 1.0)):
        tokens = random_tokens(10 + seed)
        loop(variables, tokens, jnp.float32(threshold))
        early_exit_forward(model, variables, tokens, threshold)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(threshold=1.5), "threshold"),
        (dict(threshold=-0.1), "threshold"),
        (dict(measure="entropy"), "measure"),
        (dict(exited_state="skip"), "exited_state"),
    ],
)
def test_bad_options_raise(arguments, message):
    model, variables = model_and_variables(0)
    with pytest.raises(ValueError, match=message):
        early_exit_forward(model, variables, random_tokens(0), **arguments)


def test_bad_tokens_raise_before_the_loop():
    model, variables = model_and_variables(0)
    with pytest.raises(ValueError, match="vocab_size"):
        early_exit_forward(model, variables, random_tokens(0).at[0, 0].set(CONFIG.vocab_size))


def exit_info(exit_depth, per_depth, full):
    return ExitInfo(
        exit_depth=exit_depth,
        confidence=jnp.zeros(exit_depth.shape),
        layers_run=jnp.max(exit_depth),
        flops_per_depth=jnp.float32(per_depth),
        full_depth_flops=jnp.float32(full),
    )


def test_exit_stats_summary():
    # Given exit depths and a mask that hides some tokens.
    n_layers = 4
    per_depth, full = exit_flops(CONFIG.replace(n_layers=n_layers), "learned", "freeze")
    depth = jnp.array([[1, 2, 4, 4], [3, 1, 1, 4]], jnp.int32)
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)

    def info(exit_depth):
        return exit_info(exit_depth, per_depth, full)

    # When they are accumulated twice (second batch: nobody exits early).
    stats = ExitStats.zeros(n_layers).update(info(depth), mask)
    stats = jax.jit(ExitStats.update)(stats, info(jnp.full((2, 4), n_layers, jnp.int32)))
    summary = stats.summary()
    # Then the numbers follow from the kept depths: 1, 2, 4, 4, 3, 1 and eight 4s.
    kept = np.array([1, 2, 4, 4, 3, 1] + [4] * 8)
    assert summary["total_tokens"] == len(kept)
    assert summary["avg_exit_layer"] == pytest.approx(kept.mean())
    np.testing.assert_allclose(
        summary["exit_distribution"], np.bincount(kept, minlength=5)[1:] / len(kept)
    )
    assert summary["layer_speedup"] == pytest.approx(n_layers / kept.mean())
    expected_flops = len(kept) * full / per_depth[kept - 1].sum()
    assert summary["flops_speedup"] == pytest.approx(expected_flops, rel=1e-6)


def test_layer_speedup_is_exactly_one_when_nobody_exits_early():
    depth = jnp.full((3, 5), CONFIG.n_layers, jnp.int32)
    per_depth, full = exit_flops(CONFIG, "softmax_max", "freeze")
    info = exit_info(depth, per_depth, full)
    summary = ExitStats.zeros(CONFIG.n_layers).update(info).summary()
    assert summary["layer_speedup"] == 1.0
    assert summary["exit_distribution"][-1] == 1.0
    # Softmax checks cost a vocabulary projection each: no exit, no FLOP saving.
    assert summary["flops_speedup"] < 1.0
