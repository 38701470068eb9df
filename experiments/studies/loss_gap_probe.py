"""Would a learned exit that predicts the loss gap exit earlier than one that
predicts argmax agreement? Measured offline on a trained run's frozen backbone.

For every valid and test token and every exit l < L it takes the layer-normalised
hidden state and the gap nll_l - nll_L of the target; fits, per exit, a ridge
regression (the same LN + Dense(1) form as the learned exit, without the sigmoid)
of the gap on valid; a token halts at the first exit whose predicted gap is <= tau.
tau is calibrated on valid (at most +2% perplexity) and checked on test, beside the
run's own agreement classifiers calibrated the same way. FLOP speedups count the
blocks run and one exit output only (no skipped-layer state, no checks): an upper
bound of `ee_jax.flops`.

    EE_JAX_DATA_DIR=../shared/data/wikitext-2 \
        python experiments/studies/loss_gap_probe.py runs/cpu_bk
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

import ee_jax
from ee_jax.data import make_lm_stream
from ee_jax.flops import block_flops, output_flops, tail_use_of
from ee_jax.losses import exit_nll
from ee_jax.model import EarlyExitLM


def collect(model, variables, ids, eos_id, batch_size):
    """(nll [L, T], normalised states [L, T, D], agreement confidence [L, T])."""
    n_layers = model.config.n_layers

    @jax.jit
    def window(inputs, targets):
        states, _ = model.apply(variables, inputs, method=EarlyExitLM.hidden_states)
        states = states.reshape(n_layers, inputs.size, -1)
        nll = exit_nll(model, variables, states, targets.reshape(-1), range(n_layers))
        classify = lambda h, layer: model.apply(  # noqa: E731
            variables, h, layer, method=EarlyExitLM.exit_classifier
        )
        confidence = jax.nn.sigmoid(jax.vmap(classify)(states, jnp.arange(n_layers)))
        mean = states.mean(-1, keepdims=True)
        normalised = (states - mean) * jax.lax.rsqrt(states.var(-1, keepdims=True) + 1e-6)
        return nll, normalised, confidence

    stream = make_lm_stream(ids, batch_size, model.config.n_seq, eos_id=eos_id)
    parts = []
    for index in range(len(stream)):
        batch = stream.window(index)
        scored = batch.mask.reshape(-1)
        parts.append([a[:, scored] for a in jax.device_get(window(batch.inputs, batch.targets))])
    nll, states, confidence = (np.concatenate(p, axis=1) for p in zip(*parts, strict=True))
    return nll.astype(np.float64), states, confidence


def halting_depths(scores, threshold, at_least: bool):
    """0-based exit of each token: the first l < L - 1 whose score is >= threshold
    (at_least) or <= threshold, else L - 1; scores [L - 1, T]."""
    exits = scores >= threshold if at_least else scores <= threshold
    depth = np.full(scores.shape[1], scores.shape[0])  # the last exit
    for layer in reversed(range(scores.shape[0])):
        depth = np.where(exits[layer], layer, depth)
    return depth


def summary(nll, depth, cost):
    """(perplexity, average exit layer, FLOP speedup upper bound) of given depths."""
    ppl = np.exp(nll[depth, np.arange(nll.shape[1])].mean())
    return ppl, depth.mean() + 1, cost(nll.shape[0] - 1) / cost(depth).mean()


def main(workdir: str) -> None:
    ee_jax.enable_compilation_cache()
    run = ee_jax.load_run(workdir)
    model, variables, vocab, train_config = run.model, run.variables, run.vocab, run.config
    corpus = ee_jax.load_wikitext2()
    config = model.config
    args = (model, variables)
    valid = collect(*args, corpus.valid, vocab.eos_id, train_config.eval_batch_size)
    test = collect(*args, corpus.test, vocab.eos_id, train_config.eval_batch_size)
    output = output_flops(config, tail_use_of(config, corpus.test))[1]  # at the test shares
    cost = lambda depth: (depth + 1) * block_flops(config) + output  # noqa: E731

    early = config.n_layers - 1
    with_bias = lambda x: np.concatenate([x, np.ones((len(x), 1), x.dtype)], axis=1)  # noqa: E731
    predicted = {"valid": [], "test": []}
    for layer in range(early):
        x, gap = with_bias(valid[1][layer]), valid[0][layer] - valid[0][-1]
        weights = np.linalg.solve(x.T @ x + np.eye(x.shape[1]), x.T @ gap)
        predicted["valid"].append(x @ weights)
        predicted["test"].append(with_bias(test[1][layer]) @ weights)
        print(f"exit {layer + 1}: mean valid gap {gap.mean():.4f} nats")

    # (valid scores, test scores, thresholds, exits when score >= threshold?)
    rules = {
        "agreement classifier (the run's)": (
            valid[2][:early],
            test[2][:early],
            np.linspace(0.5, 1.0, 201),
            True,
        ),
        "loss-gap regression": (
            np.stack(predicted["valid"]),
            np.stack(predicted["test"]),
            np.linspace(0, 0.2, 201),
            False,
        ),
    }
    full_valid, full_test = np.exp(valid[0][-1].mean()), np.exp(test[0][-1].mean())
    print("| learned exit | threshold | valid ppl | test ppl | avg exit | FLOP speedup <= |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (on_valid, on_test, grid, at_least) in rules.items():
        qualifying = []
        for threshold in grid:
            depth = halting_depths(on_valid, threshold, at_least)
            ppl, layer, _ = summary(valid[0], depth, cost)
            if ppl <= 1.02 * full_valid:
                qualifying.append((layer, threshold, ppl))
        layer, threshold, valid_ppl = min(qualifying)
        depth = halting_depths(on_test, threshold, at_least)
        ppl, layer, speedup = summary(test[0], depth, cost)
        print(
            f"| {name} | {threshold:.4f} | {valid_ppl:.1f} | {ppl:.1f} "
            f"({100 * (ppl / full_test - 1):+.1f}%) | {layer:.2f} | {speedup:.2f}x |"
        )


if __name__ == "__main__":
    main(sys.argv[1])
