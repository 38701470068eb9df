"""EarlyExitLM, its MoE FFN and its configuration."""

import functools
import operator

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOLERANCE, apply_jitted, init_variables

from ee_jax.bk_core import resolve_method
from ee_jax.config import ModelConfig, TrainConfig, tiny
from ee_jax.losses import exit_classifier_loss, exit_weights, lm_loss
from ee_jax.model import EarlyExitLM
from ee_jax.moe import MoEFeedForward

CONFIG = tiny()
BATCH = 2


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (BATCH, CONFIG.n_seq), 0, CONFIG.vocab_size)


def init(config, tokens, seed=0):
    model = EarlyExitLM(config)
    return model, init_variables(model, jax.random.key(seed), tokens)


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(vocab_size=0), "vocab_size"),
        (dict(d_model=-1), "d_model"),
        (dict(n_layers=1.5), "n_layers"),
        (dict(top_k=5), "top_k"),
        (dict(dropout=1.0), "dropout"),
        (dict(layer_dropout=1.0), "layer_dropout"),
        (dict(confidence_threshold=1.2), "confidence_threshold"),
        (dict(z_imag=(0.0, 1.0)), "z_imag"),
        (dict(bk_method="dense"), "bk_method"),
        (dict(unembedding="tie"), "unembedding"),
        (dict(bk_heads=0), "bk_heads"),
        (dict(mixer="gru"), "mixer"),
        (dict(num_experts=-1), "num_experts"),
        (dict(bk_value_dim=-1), "bk_value_dim"),
        (dict(bk_value_dim=2, causal=False), "bk_value_dim"),
        (dict(mixer="attention", attention_heads=3), "attention_heads"),
    ],
)
def test_config_rejects_invalid_values_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        CONFIG.replace(**changes)


@pytest.mark.parametrize("unembedding", ["shared", "per_exit", "tied"])
def test_exit_logits_stack_every_exit_and_last_equals_forward(tokens, unembedding):
    config = CONFIG.replace(unembedding=unembedding)
    model, variables = init(config, tokens)
    final = apply_jitted(model, variables, tokens)
    exits = apply_jitted(model, variables, tokens, method=EarlyExitLM.exit_logits)
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
    before, after = apply_jitted(model, variables, tokens), apply_jitted(model, variables, changed)
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
    # Then the outputs agree, the balance loss is E * sum_e f_e P_e...
    np.testing.assert_allclose(output, dense_moe_reference(params, x, top_k), atol=1e-5)
    want = balance_loss_reference(params, x, np.ones(len(x)), top_k)
    np.testing.assert_allclose(balance, want, rtol=TOLERANCE["float32"])
    # ...and the router gets a non-zero gradient through the gates.
    gradient = jax.grad(lambda p: jnp.sum(moe.apply({"params": p}, x)[0] ** 2))(params)
    assert float(jnp.abs(gradient["router"]["kernel"]).max()) > 0


def balance_loss_reference(params, x, mask, top_k):
    """float64 NumPy: E * sum_e f_e P_e over the tokens with mask 1 only."""
    width = x.shape[-1]
    keep = np.asarray(mask, bool).reshape(-1)
    x = np.asarray(x, np.float64).reshape(-1, width)[keep]  # [T', D]
    router = {k: np.asarray(v, np.float64) for k, v in params["router"].items()}
    logits = x @ router["kernel"] + router["bias"]  # [T', E]
    gates = np.exp(logits - logits.max(axis=1, keepdims=True))
    gates /= gates.sum(axis=1, keepdims=True)
    experts = np.argsort(-gates, axis=1, kind="stable")[:, :top_k]  # [T', k]
    num_experts = gates.shape[1]
    fraction = np.bincount(experts.ravel(), minlength=num_experts) / experts.size
    return num_experts * np.sum(fraction * gates.mean(axis=0))


def moe_with_router(x, kernel, bias, top_k=1):
    """Balance loss of a MoE layer whose router is set to (kernel, bias)."""
    moe = MoEFeedForward(num_experts=len(bias), top_k=top_k)
    params = dict(moe.init(jax.random.key(0), x)["params"])
    params["router"] = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}
    return float(moe.apply({"params": params}, x)[1])


def test_balance_loss_is_one_when_balanced_and_num_experts_when_collapsed():
    num_experts = 4
    # Balanced routing: token t goes to expert t mod E (router = identity on one-hot-ish
    # inputs, gates far from uniform). f is uniform, so the loss is sum_e P_e = 1.
    x = 3.0 * jnp.eye(num_experts)[jnp.arange(12) % num_experts]  # [12, E], D = E
    identity, zeros = np.eye(num_experts), np.zeros(num_experts)
    assert moe_with_router(x, identity, zeros) == pytest.approx(1.0, abs=1e-6)
    # Uniform gates (a zero router; every tie goes to expert 0): P is uniform, loss 1.
    assert moe_with_router(x, 0 * identity, zeros) == pytest.approx(1.0, abs=1e-6)
    # Collapse: every token to expert 0 with gate 1, the maximum E.
    collapsed = np.array([100.0, 0.0, 0.0, 0.0])
    assert moe_with_router(x, 0 * identity, collapsed) == pytest.approx(num_experts, abs=1e-6)


def test_balance_loss_can_be_below_one():
    # The review's counterexample, E = 2: gates (0.51, 0.49), (0, 1), (0.51, 0.49) route
    # to experts 0, 1, 0: f = (2/3, 1/3), P = (0.34, 0.66), loss 2 * (0.2267 + 0.22).
    gates = np.array([[0.51, 0.49], [1e-30, 1.0], [0.51, 0.49]])
    x = jnp.asarray(np.log(gates), jnp.float32)  # router = identity: logits = log gates
    assert moe_with_router(x, np.eye(2), np.zeros(2)) == pytest.approx(0.89333, abs=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_masked_balance_loss_counts_only_kept_tokens(top_k):
    # Given tokens [B, N, D] and a mask dropping a suffix of one row and a middle token.
    x = jax.random.normal(jax.random.key(0), (2, 10, 8))
    mask = jnp.ones((2, 10)).at[1, 6:].set(0).at[0, 3].set(0)
    moe = MoEFeedForward(num_experts=4, top_k=top_k)
    params = moe.init(jax.random.key(1), x)["params"]
    # When the layer runs with the mask, and on the kept tokens alone without one.
    output, balance = moe.apply({"params": params}, x, mask)
    unmasked_output, _ = moe.apply({"params": params}, x)
    _, kept_only = moe.apply({"params": params}, x[np.asarray(mask, bool)])
    # Then the loss is the float64 reference over kept tokens (and equals the layer on
    # them alone), and the mask changes no output.
    want = balance_loss_reference(params, x, mask, top_k)
    np.testing.assert_allclose(balance, want, rtol=TOLERANCE["float32"])
    np.testing.assert_allclose(balance, kept_only, rtol=TOLERANCE["float32"])
    np.testing.assert_array_equal(output, unmasked_output)


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
            v,
            tokens,
            targets,
            jnp.ones_like(tokens),
            TrainConfig(model=config, exit_weighting=weighting, balance_weight=0.01),
            rngs={"dropout": jax.random.key(3)},
        )[0]

    # When it is differentiated.
    gradients = jax.grad(loss)(variables)["params"]
    # Then every exit head, every router, every potential and every exit classifier
    # receive finite, non-zero gradients.
    per_layer = {
        "exit norm": gradients["exits"]["norm_scale"],
        "unembedding": gradients["output"]["unembed_kernel"],
        "router": gradients["blocks"]["moe"]["router"]["kernel"],
        "potential": gradients["blocks"]["bk"]["potential"]["kernel"],
        # The last exit's classifier has nothing to learn (a token there exits anyway).
        "exit classifier": jnp.concatenate(
            [gradients["exits"]["classifier_kernel"][:-1], jnp.ones((1, config.d_model))]
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
        variables,
        tokens,
        targets,
        mask,
        TrainConfig(model=CONFIG, exit_weighting="uniform", balance_weight=0.0),
    )
    logits = apply_jitted(model, variables, tokens, method=EarlyExitLM.exit_logits)
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
    train_config = TrainConfig(model=model.config, exit_weighting="linear", balance_weight=0.01)

    def chunked(v):
        return lm_loss(v, tokens, targets, mask, train_config)

    def reference(v):
        logits = model.apply(v, tokens, method=EarlyExitLM.exit_logits)  # [L, B, N, V]
        log_probs = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(log_probs, targets[None, ..., None], -1)[..., 0]
        per_exit = jnp.sum(nll * mask, axis=(1, 2)) / mask.sum()
        _, balance = model.apply(v, tokens, True, mask, method=EarlyExitLM.hidden_states)
        return jnp.dot(weights, per_exit) + 0.01 * balance.mean()

    # When both are differentiated.
    (loss, metrics), got = jax.value_and_grad(chunked, has_aux=True)(variables)
    want_loss, want = jax.value_and_grad(reference)(variables)
    # Then the backbone and head gradients agree (the exit classifiers' own loss
    # is not in the reference: it only trains the classifier parameters).
    np.testing.assert_allclose(
        loss - metrics["classifier_loss"], want_loss, rtol=TOLERANCE["float32"]
    )
    # Every part; of the exits only the norms (the classifiers have no loss here).
    for path in (["blocks"], ["embedder"], ["output"], ["exits", "norm_scale"]):
        name = "/".join(path)
        leaves = [
            jax.tree.leaves(functools.reduce(dict.get, path, g["params"])) for g in (got, want)
        ]
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
    config = config.replace(bk_value_dim=2)  # [Re, Im] of G and of 2 values, per head
    model, variables = init(config, tokens)
    blocks = variables["params"]["blocks"]
    chex.assert_shape(blocks["bk"]["values"]["kernel"], (config.n_layers, config.d_model, 6))
    chex.assert_shape(blocks["bk"]["project"]["kernel"], (config.n_layers, 18, config.d_model))


def test_seed_preset_matches_the_original():
    from ee_jax.config import seed

    config = seed()
    assert (config.vocab_size, config.d_model, config.n_layers, config.n_seq) == (10000, 64, 4, 128)
    assert (config.num_experts, config.top_k) == (4, 1)
    assert isinstance(config, ModelConfig)


MIXERS = {
    "bk": CONFIG,
    "bk_values": CONFIG.replace(bk_value_dim=3),
    "attention": CONFIG.replace(mixer="attention", attention_heads=2),
    "none": CONFIG.replace(mixer="none"),
    "lstm": CONFIG.replace(mixer="lstm"),
}


@pytest.mark.parametrize("mixer", list(MIXERS))
def test_only_the_mixer_carries_context_and_only_forward(tokens, mixer):
    # Given a change of token t, when the model runs with each sequence mixer,
    # then earlier positions never change, and later ones change only through the
    # mixer (the MoE is per token).
    config = MIXERS[mixer]
    model, variables = init(config, tokens)
    t = 4
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % config.vocab_size)
    before, after = apply_jitted(model, variables, tokens), apply_jitted(model, variables, changed)
    later = float(jnp.max(jnp.abs(before[:, t + 1 :] - after[:, t + 1 :])))
    np.testing.assert_array_equal(before[:, :t], after[:, :t])
    assert (later == 0.0) if mixer == "none" else (later > 1e-3)


def reference_lstm_model(params, tokens, n_layers):
    """Hidden states [L, B, N, D] of an "lstm" model without FFN, in float64 numpy, by
    an eager loop over positions: h_l = h_{l-1} + LSTM_l(LN_l(h_{l-1})), the LSTM
    equations of Hochreiter & Schmidhuber (gates i, f, g, o; c = f c + i g,
    h = o tanh(c))."""
    as64 = lambda tree: jax.tree.map(lambda p: np.asarray(p, np.float64), tree)  # noqa: E731
    params = as64(params)
    h = params["embedder"]["token_embed"]["embedding"][np.asarray(tokens)]  # [B, N, D]
    sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    outputs = []
    for layer in range(n_layers):
        block = jax.tree.map(operator.itemgetter(layer), params["blocks"])
        norm, cell = block["norm"], block["lstm"]["cell"]
        mean = h.mean(-1, keepdims=True)
        x = (h - mean) / np.sqrt(((h - mean) ** 2).mean(-1, keepdims=True) + 1e-6)
        x = x * norm["scale"] + norm["bias"]
        c = y = np.zeros(h.shape[::2])
        out = np.zeros_like(h)
        for t in range(h.shape[1]):
            gate = {
                g: x[:, t] @ cell[f"i{g}"]["kernel"]
                + y @ cell[f"h{g}"]["kernel"]
                + cell[f"h{g}"]["bias"]
                for g in "ifgo"
            }
            c = sigmoid(gate["f"]) * c + sigmoid(gate["i"]) * np.tanh(gate["g"])
            y = sigmoid(gate["o"]) * np.tanh(c)
            out[:, t] = y
        h = h + out
        outputs.append(h)
    return np.stack(outputs)


def test_lstm_mixer_without_ffn_equals_a_float64_eager_lstm(tokens):
    # Given an "lstm" model without FFN (the LSTM anchor's block) and random biases.
    config = CONFIG.replace(mixer="lstm", num_experts=0, position="none")
    model, variables = init(config, tokens)
    noise = lambda p, k: p + 0.3 * jax.random.normal(k, p.shape)  # noqa: E731
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    variables = jax.tree.unflatten(
        treedef, [noise(p, k) for p, k in zip(leaves, keys, strict=True)]
    )
    # When its hidden states are computed, then they equal the eager float64 loop.
    states, balance = apply_jitted(model, variables, tokens, method=EarlyExitLM.hidden_states)
    expected = reference_lstm_model(variables["params"], tokens, config.n_layers)
    np.testing.assert_allclose(states, expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(balance, 0.0)


def test_attention_mixer_is_flax_attention_with_a_causal_mask(tokens):
    # The mixer of block 0 equals an independent softmax(QK^T/sqrt(d))V with
    # masked future positions, from the same parameters.
    config = MIXERS["attention"]
    model, variables = init(config, tokens)
    from ee_jax.blocks import CausalSelfAttention

    params = jax.tree.map(lambda p: p[0], variables["params"]["blocks"])["attention"]
    x = jax.random.normal(jax.random.key(5), (BATCH, config.n_seq, config.d_model))
    out = CausalSelfAttention(config).apply({"params": params}, x)
    p = params["attention"]
    q, k, v = (
        np.einsum("bnd,dhk->bnhk", x, p[name]["kernel"]) + p[name]["bias"]
        for name in ("query", "key", "value")
    )
    scores = np.einsum("bnhk,bmhk->bhnm", q, k) / np.sqrt(q.shape[-1])
    n = config.n_seq
    scores = np.where(np.tril(np.ones((n, n), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    mixed = np.einsum("bhnm,bmhk->bnhk", weights, v)
    reference = np.einsum("bnhk,hkd->bnd", mixed, p["out"]["kernel"]) + p["out"]["bias"]
    np.testing.assert_allclose(out, reference, atol=1e-5)


def test_old_configs_with_use_bk_read_as_a_mixer():
    from ee_jax.config import TrainConfig

    for use_bk, mixer in ((True, "bk"), (False, "none")):
        values = TrainConfig(model=CONFIG).to_dict()
        del values["model"]["mixer"], values["model"]["bk_value_dim"]
        values["model"]["use_bk"] = use_bk
        config = TrainConfig.from_dict(values)
        assert config.model.mixer == mixer and config.model.bk_value_dim == 0


def test_old_runs_keep_the_agreement_classifiers_and_bad_targets_are_refused():
    # A run saved before classifier_target existed trained agreement classifiers.
    values = TrainConfig(model=CONFIG, classifier_target="loss_gap").to_dict()
    del values["classifier_target"]
    assert TrainConfig.from_dict(values).classifier_target == "agreement"
    with pytest.raises(ValueError, match="classifier_target must be one of"):
        TrainConfig(model=CONFIG, classifier_target="gap")
    with pytest.raises(ValueError, match="classifier_target must be one of"):
        # The loss term refuses it too, for a caller without a TrainConfig.
        exit_classifier_loss(EarlyExitLM(CONFIG), {}, None, None, None, "gap")


def joint_loss(model, variables, tokens, targets, mask):
    return lm_loss(
        variables,
        tokens,
        targets,
        mask,
        TrainConfig(model=model.config, exit_weighting="uniform", balance_weight=0.5),
        rngs={"dropout": jax.random.key(3)},
    )


def test_masked_out_positions_change_neither_loss_nor_gradients(tokens):
    # Given two batches that differ only where the mask is 0 (padding at the end of
    # each row, as the last window of a stream has), with dropout on.
    config = CONFIG.replace(dropout=0.1)
    model, variables = init(config, tokens)
    targets = jnp.roll(tokens, -1, axis=1)
    mask = jnp.ones_like(tokens).at[0, 11:].set(0).at[1, 6:].set(0)
    padded = jnp.where(mask == 1, tokens, (tokens * 7 + 3) % config.vocab_size)
    padded_targets = jnp.where(mask == 1, targets, 0)
    assert not np.array_equal(padded, tokens)
    # When the joint loss and its gradients are computed for both.
    grad = jax.value_and_grad(joint_loss, argnums=1, has_aux=True)
    (loss, metrics), gradients = grad(model, variables, tokens, targets, mask)
    (loss_padded, metrics_padded), gradients_padded = grad(
        model, variables, padded, padded_targets, mask
    )
    # Then the balance loss, the whole loss and every gradient are the same.
    assert float(metrics["balance_loss"]) == pytest.approx(float(metrics_padded["balance_loss"]))
    np.testing.assert_allclose(loss, loss_padded, rtol=1e-6)
    leaves = jax.tree.leaves(gradients_padded), jax.tree.leaves(gradients)
    for got, want in zip(*leaves, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_model_balance_losses_equal_reference_over_unmasked_tokens(tokens):
    # Given a mask and each block's input (the embedding, then the previous block's).
    config = CONFIG.replace(top_k=2)
    model, variables = init(config, tokens)
    mask = jnp.ones_like(tokens).at[0, 12:].set(0).at[1, 3:].set(0)
    states, balance = model.apply(variables, tokens, True, mask, method=EarlyExitLM.hidden_states)
    inputs = [apply_jitted(model, variables, tokens, method=EarlyExitLM.embed), *states[:-1]]
    blocks = variables["params"]["blocks"]
    for layer, h in enumerate(inputs):
        # When the router statistics are recomputed in float64 on LN(h) of kept tokens.
        h = np.asarray(h, np.float64)
        norm = {name: np.asarray(p[layer], np.float64) for name, p in blocks["norm"].items()}
        x = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
        x = x * norm["scale"] + norm["bias"]
        router = {"router": {name: p[layer] for name, p in blocks["moe"]["router"].items()}}
        want = balance_loss_reference(router, x, mask, config.top_k)
        # Then each block's balance loss is that reference.
        np.testing.assert_allclose(balance[layer], want, rtol=TOLERANCE["float32"])


def python_loop_hidden_states(module, tokens, deterministic, mask):
    """Reference: `block(h, layer)` in a Python loop, drawing the same dropout keys."""
    h = module.embed(tokens, deterministic)
    dropout_rng = None if deterministic else module.make_rng("dropout")
    states, losses = [], []
    for layer in range(module.config.n_layers):
        h, balance = module.block(h, layer, dropout_rng, mask)
        states.append(h)
        losses.append(balance)
    return jnp.stack(states), jnp.stack(losses)


def test_scan_over_stacked_params_equals_python_loop_values_and_gradients(tokens):
    # Given dropout on and a mask.
    config = CONFIG.replace(dropout=0.1)
    model, variables = init(config, tokens)
    mask = jnp.ones_like(tokens).at[1, 9:].set(0)
    rngs = {"dropout": jax.random.key(5)}

    def summary(v, method):
        states, balance = model.apply(v, tokens, False, mask, rngs=rngs, method=method)
        return jnp.sum(jnp.sin(states)) + jnp.sum(balance), (states, balance)

    # When the scanned hidden states and the loop are evaluated and differentiated.
    grad = jax.grad(summary, has_aux=True)
    got_grad, (got_states, got_balance) = grad(variables, EarlyExitLM.hidden_states)
    want_grad, (want_states, want_balance) = grad(variables, python_loop_hidden_states)
    # Then values and gradients agree to float32 rounding (the two programs fuse
    # differently; the same dropout keys, else the difference would be O(1)).
    tolerance = dict(rtol=TOLERANCE["float32"], atol=1e-6)
    np.testing.assert_allclose(got_states, want_states, **tolerance)
    np.testing.assert_allclose(got_balance, want_balance, **tolerance)
    for got, want in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
        scale = max(1.0, float(jnp.abs(want).max()))
        np.testing.assert_allclose(got, want, atol=TOLERANCE["float32"] * scale)


def scan_carry_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of the carries of every lax.scan in a (closed) jaxpr, nested ones too."""
    shapes = []
    for equation in jaxpr.eqns:
        if equation.primitive.name == "scan":
            start = equation.params["num_consts"]
            carries = equation.invars[start : start + equation.params["num_carry"]]
            shapes += [tuple(v.aval.shape) for v in carries]
        for sub in jax.extend.core.jaxprs_in_params(equation.params):
            shapes += scan_carry_shapes(sub)
    return shapes


def test_backward_scan_carries_no_full_stack_of_block_gradients(tokens):
    # Given the stacked block parameters [L, ...] (shapes unique in this model).
    model, variables = init(CONFIG, tokens)
    stacked = {tuple(p.shape) for p in jax.tree.leaves(variables["params"]["blocks"])}
    stacked = {s for s in stacked if len(s) >= 3}  # kernels; not confusable with h [B, N, D]

    def loss(v):
        states, balance = apply_jitted(model, v, tokens, method=EarlyExitLM.hidden_states)
        return jnp.sum(states) + jnp.sum(balance)

    # When the gradient is traced.
    jaxpr = jax.make_jaxpr(jax.grad(loss))(variables).jaxpr
    # Then no scan carries an [L, ...] accumulator of block gradients (scanning over
    # the parameters returns each layer's gradient as a scan output instead).
    carried = set(scan_carry_shapes(jaxpr))
    assert stacked and not (carried & stacked), carried & stacked


def test_block_with_a_traced_layer_index_still_works(tokens):
    model, variables = init(CONFIG, tokens)
    h = apply_jitted(model, variables, tokens, method=EarlyExitLM.embed)
    run = jax.jit(lambda layer: model.apply(variables, h, layer, method=EarlyExitLM.block)[0])
    states, _ = apply_jitted(model, variables, tokens, method=EarlyExitLM.hidden_states)
    np.testing.assert_allclose(run(0), states[0], atol=1e-6)


def test_auto_bk_method_is_the_backends_method_and_methods_agree(tokens):
    # Given the default config ("auto") and both explicit methods.
    assert ModelConfig(vocab_size=5).bk_method == "auto" and CONFIG.bk_method == "auto"
    explicit = resolve_method("auto")
    assert explicit == ("sequential" if jax.default_backend() == "cpu" else "associative")
    model, variables = init(CONFIG, tokens)
    outputs = {
        method: EarlyExitLM(CONFIG.replace(bk_method=method)).apply(variables, tokens)
        for method in ("auto", "associative", "sequential")
    }
    # Then "auto" is exactly the backend's method, and the two methods agree.
    np.testing.assert_array_equal(outputs["auto"], outputs[explicit])
    np.testing.assert_allclose(
        outputs["associative"], outputs["sequential"], rtol=TOLERANCE["float32"], atol=1e-5
    )


def test_layer_dropout_skips_whole_rows_more_often_in_deeper_blocks(tokens):
    # Given layer dropout 0.6 (blocks 1, 2, 3 of 3 skipped at rates 0, 0.3, 0.6) and
    # 400 rows, without other dropout.
    config = CONFIG.replace(layer_dropout=0.6, dropout=0.0)
    model, variables = init(config, tokens)
    rows = jnp.tile(tokens, (200, 1))
    # When the training pass runs (and the inference pass, which never skips).
    states, _ = model.apply(
        variables,
        rows,
        False,
        rngs={"dropout": jax.random.key(4)},
        method=EarlyExitLM.hidden_states,
    )
    plain, _ = apply_jitted(model, variables, rows, method=EarlyExitLM.hidden_states)
    # Then each block either ran or left a row exactly as it was, the first one always
    # ran, and deeper blocks skipped more rows, at about their rates.
    np.testing.assert_array_equal(states[0], plain[0])
    for layer, rate in ((1, 0.3), (2, 0.6)):
        ran = apply_jitted(model, variables, states[layer - 1], layer, method=EarlyExitLM.block)[0]
        skipped = np.all(np.asarray(states[layer] == states[layer - 1]), axis=(1, 2))
        np.testing.assert_allclose(states[layer][~skipped], ran[~skipped], atol=1e-5)
        assert abs(skipped.mean() - rate) < 0.1, (layer, skipped.mean())


def test_the_early_exit_ramp_scales_the_early_exits_loss_from_zero(tokens):
    # Given the joint loss with a ramp of 100 steps (uniform weights, 3 exits).
    model, variables = init(CONFIG, tokens)
    targets, mask = jnp.roll(tokens, -1, axis=1), jnp.ones_like(tokens)
    config = TrainConfig(model=CONFIG, exit_ramp_steps=100)
    # When it is taken at steps 0, 25 and 400 and after the ramp (no step).
    loss = {
        step: lm_loss(variables, tokens, targets, mask, config, step=step)
        for step in (0, 25, 400, None)
    }
    # Then the early exits' term (1/3 of each early exit's cross-entropy) is
    # scaled by 0, 0.25, 1 and 1.
    nll = loss[None][1]["exit_nll"]
    early = float(nll[0] + nll[1]) / 3
    for step, scale in ((0, 0.0), (25, 0.25), (400, 1.0)):
        expected = float(loss[None][0]) - (1 - scale) * early
        np.testing.assert_allclose(float(loss[step][0]), expected, rtol=1e-6)


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(exit_ramp_steps=-1), "exit_ramp_steps"),
        (dict(exit_ramp_steps=2.5), "exit_ramp_steps"),
        (dict(optimizer="adam"), "optimizer"),
        (dict(lr_schedule="cosine"), "lr_schedule"),
        (dict(plateau_factor=1.0), "plateau_factor"),
        (dict(optimizer="sgd", weight_decay=0.01), "weight_decay"),
    ],
)
def test_train_config_rejects_invalid_values_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(model=CONFIG, **changes)
