"""EarlyExitLM, its MoE FFN and its configuration."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOLERANCE

from ee_jax.config import ModelConfig, tiny
from ee_jax.losses import exit_weights, lm_loss
from ee_jax.model import EarlyExitLM
from ee_jax.moe import MoEFeedForward

CONFIG = tiny()
BATCH = 2


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (BATCH, CONFIG.n_seq), 0, CONFIG.vocab_size)


def init(config, tokens, seed=0):
    model = EarlyExitLM(config)
    return model, model.init(jax.random.key(seed), tokens)


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(vocab_size=0), "vocab_size"),
        (dict(d_model=-1), "d_model"),
        (dict(n_layers=1.5), "n_layers"),
        (dict(top_k=5), "top_k"),
        (dict(dropout=1.0), "dropout"),
        (dict(confidence_threshold=1.2), "confidence_threshold"),
        (dict(z_imag=(0.0, 1.0)), "z_imag"),
        (dict(bk_method="dense"), "bk_method"),
        (dict(unembedding="tie"), "unembedding"),
        (dict(bk_heads=0), "bk_heads"),
    ],
)
def test_config_rejects_invalid_values_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        CONFIG.replace(**changes)


@pytest.mark.parametrize("unembedding", ["shared", "per_exit", "tied"])
def test_exit_logits_stack_every_exit_and_last_equals_forward(tokens, unembedding):
    config = CONFIG.replace(unembedding=unembedding)
    model, variables = init(config, tokens)
    final = model.apply(variables, tokens)
    exits = model.apply(variables, tokens, method=EarlyExitLM.exit_logits)
    chex.assert_shape(final, (BATCH, config.n_seq, config.vocab_size))
    chex.assert_shape(exits, (config.n_layers, BATCH, config.n_seq, config.vocab_size))
    np.testing.assert_allclose(exits[-1], final, atol=1e-6)
    # Different exits give different predictions (each head reads its own block).
    assert not np.allclose(exits[0], exits[-1])


@pytest.mark.parametrize("causal", [True, False])
def test_changing_a_token_changes_only_later_logits_when_causal(tokens, causal):
    # Given a sequence and a copy with token t + 1 changed.
    config = CONFIG.replace(causal=causal)
    model, variables = init(config, tokens)
    t = 9
    changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % config.vocab_size)
    # When both are run through the full forward.
    before, after = model.apply(variables, tokens), model.apply(variables, changed)
    # Then positions <= t are unchanged if and only if the core is causal.
    difference = float(jnp.max(jnp.abs(before[:, : t + 1] - after[:, : t + 1])))
    if causal:
        assert difference <= 1e-6
    else:
        assert difference > 1e-4


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda t: t.at[0, 0].set(CONFIG.vocab_size), "vocab_size"),
        (lambda t: t.at[0, 0].set(-1), r"\[0, vocab_size"),
        (lambda t: t.astype(jnp.float32), "integer"),
        (lambda t: jnp.concatenate([t, t], axis=1), "n_seq"),
        (lambda t: t[0], r"\(B, N\)"),
    ],
)
def test_bad_tokens_raise_before_computation(tokens, bad, message):
    model, variables = init(CONFIG, tokens)
    with pytest.raises(ValueError, match=message):
        model.apply(variables, bad(tokens))


def test_jitted_apply_still_works(tokens):
    model, variables = init(CONFIG, tokens)
    np.testing.assert_allclose(
        jax.jit(model.apply)(variables, tokens),
        model.apply(variables, tokens),
        rtol=TOLERANCE["float32"],
        atol=1e-6,
    )


def dense_moe_reference(params, x, top_k):
    """Every expert on every token, then the top-k outputs weighted by their gates."""
    gates = jax.nn.softmax(x @ params["router"]["kernel"] + params["router"]["bias"])
    hidden = jax.nn.gelu(
        jnp.einsum("td,edf->etf", x, params["up_kernel"]) + params["up_bias"][:, None]
    )
    outputs = (
        jnp.einsum("etf,efd->etd", hidden, params["down_kernel"]) + params["down_bias"][:, None]
    )  # [E, T, D]
    top_gates, experts = jax.lax.top_k(gates, top_k)
    chosen = jnp.take_along_axis(outputs.transpose(1, 0, 2), experts[..., None], axis=1)
    return jnp.einsum("tkd,tk->td", chosen, top_gates)


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_equals_dense_reference_and_trains_its_router(top_k):
    # Given a MoE layer and tokens.
    x = jax.random.normal(jax.random.key(0), (40, 8))
    moe = MoEFeedForward(num_experts=4, top_k=top_k)
    params = moe.init(jax.random.key(1), x)["params"]
    # When it runs (ragged expert products) and when every expert runs densely.
    output, balance = moe.apply({"params": params}, x)
    # Then the outputs agree, the balance loss is >= 1 (1 = perfectly balanced)...
    np.testing.assert_allclose(output, dense_moe_reference(params, x, top_k), atol=1e-5)
    assert float(balance) >= 1.0 - 1e-6
    # ...and the router gets a non-zero gradient through the gates.
    gradient = jax.grad(lambda p: jnp.sum(moe.apply({"params": p}, x)[0] ** 2))(params)
    assert float(jnp.abs(gradient["router"]["kernel"]).max()) > 0


def test_moe_output_of_a_token_ignores_the_rest_of_the_batch():
    x = jax.random.normal(jax.random.key(0), (16, 8))
    moe = MoEFeedForward(num_experts=4, top_k=1)
    variables = moe.init(jax.random.key(1), x)
    whole, _ = moe.apply(variables, x)
    alone, _ = moe.apply(variables, x[3:4])
    np.testing.assert_allclose(alone[0], whole[3], atol=1e-6)


@pytest.mark.parametrize("weighting", ["uniform", "linear"])
def test_training_loss_gradients_reach_every_exit_router_and_potentials(tokens, weighting):
    # Given the joint loss with every exit weighted.
    config = CONFIG.replace(unembedding="per_exit", dropout=0.1)
    model, variables = init(config, tokens)
    targets = jnp.roll(tokens, -1, axis=1)

    def loss(v):
        return lm_loss(
            model,
            v,
            tokens,
            targets,
            jnp.ones_like(tokens),
            weights=exit_weights(config.n_layers, weighting),
            balance_weight=0.01,
            dropout_rng=jax.random.key(3),
        )[0]

    # When it is differentiated.
    gradients = jax.grad(loss)(variables)["params"]
    # Then every exit head, every router, every potential and every exit classifier
    # receive finite, non-zero gradients.
    per_layer = {
        "exit norm": gradients["exit_norm_scale"],
        "unembedding": gradients["unembed_kernel"],
        "router": gradients["blocks"]["moe"]["router"]["kernel"],
        "potential": gradients["blocks"]["bk"]["potential"]["kernel"],
        # The last exit's classifier has nothing to learn (a token there exits anyway).
        "exit classifier": jnp.concatenate(
            [gradients["classifier_kernel"][:-1], jnp.ones((1, config.d_model))]
        ),
    }
    for name, gradient in per_layer.items():
        chex.assert_tree_all_finite(gradient)
        magnitude = jnp.abs(gradient).reshape(config.n_layers, -1).max(axis=1)
        assert np.all(magnitude > 0), f"{name} has a layer without gradient: {magnitude}"


def test_loss_matches_log_softmax_of_materialised_logits(tokens):
    model, variables = init(CONFIG, tokens)
    targets = jnp.roll(tokens, -1, axis=1)
    mask = jnp.ones_like(tokens).at[1, 5:].set(0)
    _, metrics = lm_loss(
        model,
        variables,
        tokens,
        targets,
        mask,
        weights=exit_weights(CONFIG.n_layers, "uniform"),
        balance_weight=0.0,
    )
    logits = model.apply(variables, tokens, method=EarlyExitLM.exit_logits)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[None, ..., None], -1)[..., 0]
    expected = jnp.sum(nll * mask, axis=(1, 2)) / mask.sum()
    np.testing.assert_allclose(metrics["exit_nll"], expected, rtol=TOLERANCE["float32"])


def test_chunked_loss_gradient_equals_autodiff_of_materialised_log_softmax(tokens):
    # Given the chunked, checkpointed joint loss and a reference: autodiff
    # through a log-softmax of all logits, with the same masked mean.
    model, variables = init(CONFIG.replace(unembedding="per_exit"), tokens)
    targets = jnp.roll(tokens, -1, axis=1)
    mask = jnp.ones_like(tokens).at[0, 9:].set(0)
    weights = exit_weights(CONFIG.n_layers, "linear")

    def chunked(v):
        return lm_loss(model, v, tokens, targets, mask, weights=weights, balance_weight=0.01)

    def reference(v):
        logits = model.apply(v, tokens, method=EarlyExitLM.exit_logits)  # [L, B, N, V]
        log_probs = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(log_probs, targets[None, ..., None], -1)[..., 0]
        per_exit = jnp.sum(nll * mask, axis=(1, 2)) / mask.sum()
        _, balance = model.apply(v, tokens, method=EarlyExitLM.hidden_states)
        return jnp.dot(weights, per_exit) + 0.01 * balance.mean()

    # When both are differentiated.
    (loss, metrics), got = jax.value_and_grad(chunked, has_aux=True)(variables)
    want_loss, want = jax.value_and_grad(reference)(variables)
    # Then the backbone and head gradients agree (the exit classifiers' own loss
    # is not in the reference: it only trains the classifier parameters).
    np.testing.assert_allclose(
        loss - metrics["classifier_loss"], want_loss, rtol=TOLERANCE["float32"]
    )
    for name in ("blocks", "token_embed", "exit_norm_scale", "unembed_kernel", "unembed_bias"):
        leaves = jax.tree.leaves(got["params"][name]), jax.tree.leaves(want["params"][name])
        for g, w in zip(*leaves, strict=True):
            scale = float(jnp.abs(w).max())
            assert scale > 0, name
            np.testing.assert_allclose(g, w, atol=TOLERANCE["float32_grad"] * scale)


def test_bk_heads_give_independent_systems(tokens):
    config = CONFIG.replace(bk_heads=3)
    model, variables = init(config, tokens)
    blocks = variables["params"]["blocks"]
    chex.assert_shape(blocks["bk"]["potential"]["kernel"], (config.n_layers, config.d_model, 3))
    chex.assert_shape(blocks["bk"]["project"]["kernel"], (config.n_layers, 6, config.d_model))


def test_seed_preset_matches_the_original():
    from ee_jax.config import seed

    config = seed()
    assert (config.vocab_size, config.d_model, config.n_layers, config.n_seq) == (10000, 64, 4, 128)
    assert (config.num_experts, config.top_k) == (4, 1)
    assert isinstance(config, ModelConfig)


@pytest.mark.parametrize("use_bk", [True, False])
def test_only_the_bk_features_carry_context(tokens, use_bk):
    # Given a change of token t, when the model runs with and without BK features,
    # then later positions see it only through the BK core (the MoE is per token).
    config = CONFIG.replace(use_bk=use_bk)
    model, variables = init(config, tokens)
    t = 4
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % config.vocab_size)
    before, after = model.apply(variables, tokens), model.apply(variables, changed)
    later = float(jnp.max(jnp.abs(before[:, t + 1 :] - after[:, t + 1 :])))
    assert (later > 1e-3) if use_bk else (later == 0.0)
