"""How early could tokens exit on this backbone? An oracle bound and richer exit
classifiers, offline on a trained run's frozen parameters.

1. Oracle: knowing every token's target NLL at every exit, pick each token's exit
   to minimise the mean FLOPs ("freeze" cost model, `ee_jax.flops`) subject to at
   most +2% test perplexity. The mean NLL is a sum over tokens, so the Lagrangian
   relaxation min_l flops_l + lam * nll_l per token, with lam bisected, solves it
   (up to one token's rounding). No halting rule that cannot see the target does
   better, so the bound says how much room the cost model leaves.
2. Halting rules regressing the loss gap nll_l - nll_L per exit l < L on the
   layer-normalised hidden state, as the run's learned exit does: LN + Dense(1)
   (its form), and MLPs LN + Dense(H) + GELU + Dense(1), fitted here by least
   squares with optax (`FITS`: on the first 217,646 train tokens or on the first
   half of valid); a token halts at the first exit whose predicted gap is <= a
   threshold calibrated on the second half of valid (at most +2%), checked on
   test. An MLP's check costs 2*D*H + 2*H FLOPs instead of 2*D.

    EE_JAX_DATA_DIR=../shared/data/wikitext-2 \
        python experiments/studies/exit_headroom.py runs/cpu_bk_linear
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from loss_gap_probe import collect, halting_depths  # the loss-gap probe beside this file

import ee_jax
from ee_jax.data import make_lm_stream
from ee_jax.flops import exit_flops, tail_use_of

TOLERANCE = np.log1p(0.02)  # +2% perplexity, in mean nats
# (split fitted on, MLP width (0: linear), Adam steps of 4,096 tokens)
FITS = [
    ("train", 0, 3000),
    ("valid_fit", 0, 3000),
    ("valid_fit", 32, 3000),
    ("valid_fit", 128, 3000),
    ("valid_fit", 32, 300),
    ("valid_fit", 128, 300),
]


def oracle(nll, per_depth):
    """Least mean FLOPs within TOLERANCE given the target NLLs; (avg exit, FLOPs, ppl %)."""
    budget = nll[-1].mean() + TOLERANCE

    def pick(lam):
        return np.argmin(per_depth[:, None] + lam * nll, axis=0)

    low, high = 0.0, 1e12
    for _ in range(100):
        lam = np.sqrt(low * high) if low > 0 else high / 1e6
        depths = pick(lam)
        if nll[depths, np.arange(nll.shape[1])].mean() <= budget:
            high = lam
        else:
            low = lam
        if high / max(low, 1e-300) < 1 + 1e-6:
            break
    depths = pick(high)
    return summary(nll, per_depth, depths)


def summary(nll, per_depth, depths):
    mean = nll[depths, np.arange(nll.shape[1])].mean()
    return {
        "avg_exit": float(np.mean(depths + 1)),
        "flops_speedup": float(per_depth[-1] / per_depth[depths].mean()),
        "ppl_change_pct": float(100 * np.expm1(mean - nll[-1].mean())),
        "distribution_pct": np.round(100 * np.bincount(depths, minlength=len(nll)) / len(depths)),
    }


def fit_gap_regressor(states, gaps, hidden, seed=0, steps=3000, batch=4096):
    """Per exit: LN(h) -> [Dense(hidden) -> GELU ->] Dense(1), least squares on gaps."""
    n_exits, _, d = states.shape
    key = jax.random.PRNGKey(seed)

    def init(key):
        k1, k2 = jax.random.split(key)
        params = {"scale": jnp.ones(d), "bias": jnp.zeros(d), "out_b": jnp.zeros(())}
        width = hidden or d
        if hidden:
            params["w1"] = jax.random.normal(k1, (d, hidden)) * d**-0.5
            params["b1"] = jnp.zeros(hidden)
        params["out_w"] = jnp.zeros(width)
        return params

    def predict(params, h):
        x = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-6)
        x = x * params["scale"] + params["bias"]
        if "w1" in params:
            x = jax.nn.gelu(x @ params["w1"] + params["b1"])
        return x @ params["out_w"] + params["out_b"]

    optimizer = optax.adamw(optax.cosine_decay_schedule(3e-3, steps), weight_decay=1e-4)

    @jax.jit
    def train(params, h, y, key):
        state = optimizer.init(params)

        def step(carry, key):
            params, state = carry
            rows = jax.random.randint(key, (batch,), 0, h.shape[0])
            loss, grads = jax.value_and_grad(
                lambda p: jnp.mean((predict(p, h[rows]) - y[rows]) ** 2)
            )(params)
            updates, state = optimizer.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        (params, _), _ = jax.lax.scan(step, (params, state), jax.random.split(key, steps))
        return params

    fitted = []
    for layer in range(n_exits):
        key, k_init, k_train = jax.random.split(key, 3)
        params = train(init(k_init), jnp.asarray(states[layer]), jnp.asarray(gaps[layer]), k_train)
        fitted.append(params)
    return lambda layer, h: np.asarray(predict(fitted[layer], jnp.asarray(h)))


def main(workdir: str) -> None:
    ee_jax.enable_compilation_cache()
    run = ee_jax.load_run(workdir)
    model, variables, vocab, train_config = run.model, run.variables, run.vocab, run.config
    config, corpus = model.config, ee_jax.load_wikitext2()
    size = train_config.eval_batch_size
    splits = {}
    half = len(corpus.valid) // 2
    for split, ids in (
        ("train", corpus.train[: len(corpus.valid)]),
        ("valid_fit", corpus.valid[:half]),
        ("valid", corpus.valid[half:]),
        ("test", corpus.test),
    ):
        nll, states, _ = collect(model, variables, ids, vocab.eos_id, size)
        stream = make_lm_stream(ids, size, config.n_seq, eos_id=vocab.eos_id)
        splits[split] = (states, nll, tail_use_of(config, stream.targets, stream.mask))
        print(
            f"{split}: {splits[split][1].shape[1]} tokens, exit ppl "
            f"{np.round(np.exp(splits[split][1].mean(1)), 1)}",
            flush=True,
        )
    test_states, test_nll, test_tails = splits["test"]
    per_depth, _ = exit_flops(config, "learned", "freeze", test_tails)
    print("oracle (test):", oracle(test_nll, per_depth))
    for fit_split, hidden, steps in FITS:
        fit_states, fit_nll, _ = splits[fit_split]
        gaps = fit_nll[:-1] - fit_nll[-1]
        predict = fit_gap_regressor(fit_states[:-1], gaps, hidden, steps=steps)
        valid_states, valid_nll, _ = splits["valid"]
        exits = range(config.n_layers - 1)
        valid_pred = np.stack([predict(layer, valid_states[layer]) for layer in exits])
        test_pred = np.stack([predict(layer, test_states[layer]) for layer in exits])
        grid = np.linspace(-0.2, 0.5, 701)
        chosen = grid[0]
        for threshold in grid:
            depths = halting_depths(valid_pred, threshold, at_least=False)
            if summary(valid_nll, per_depth, depths)["ppl_change_pct"] <= 100 * np.expm1(TOLERANCE):
                chosen = threshold
        check = 2.0 * config.d_model * (hidden or 1) + 2.0 * hidden
        depth = np.arange(1, config.n_layers + 1)
        cost = per_depth + np.minimum(depth, config.n_layers - 1) * (check - 2.0 * config.d_model)
        row = summary(test_nll, cost, halting_depths(test_pred, chosen, at_least=False))
        valid_row = summary(valid_nll, cost, halting_depths(valid_pred, chosen, at_least=False))
        print(
            f"fit on {fit_split}, hidden {hidden}, {steps} steps: threshold {chosen:.4f} "
            f"valid {valid_row['ppl_change_pct']:.2f}% test {row}",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1])
