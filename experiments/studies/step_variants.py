"""Training-step time of cpu-preset variants on one real WikiText-2 window.

    python experiments/studies/step_variants.py [VARIANT ...]

Starts from the trained parameters of the values probe (runs/probe_d128l6_values,
made by probe.sh) where the shapes match, so the output layer is a trained one
(the exact argmax of a trained adaptive softmax evaluates its tails); blocks of
other mixers are freshly initialised. Median of 6 steps after compile and warm-up.
"""

import json
import statistics
import sys
import time

import ee_jax

ee_jax.enable_compilation_cache()
ee_jax.keep_freed_memory()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ee_jax.data import (  # noqa: E402
    Batch,  # noqa: E402
    load_wikitext2,
    make_lm_stream,
)
from ee_jax.losses import tail_capacities  # noqa: E402
from ee_jax.run import load_run  # noqa: E402
from ee_jax.train_state import init_state, make_train_step, run_keys, step_keys  # noqa: E402

corpus = load_wikitext2("../shared/data/wikitext-2")
run = load_run("runs/probe_d128l6_values")
base, params = run.config, run.variables
stream = make_lm_stream(corpus.train, 16, 128, eos_id=corpus.vocab.eos_id)
window = stream.window(500)
batch = Batch(jnp.asarray(window.inputs), jnp.asarray(window.targets), jnp.asarray(window.mask))
fast = base.replace(classifier_token_fraction=1 / 16)
VARIANTS = {
    "values (classifier 1.0)": base,
    "values (classifier 1/16)": fast,
    "values, exits 1/8, classifier 1/16": fast.replace(exit_token_fraction=0.125),
    "diag H64 (classifier 1/16)": fast.replace(bk_value_dim=0, bk_heads=64),
    "none (classifier 1/16)": fast.replace(mixer="none"),
    "attention (classifier 1/16)": fast.replace(mixer="attention"),
    "values D128 L4 (classifier 1/16)": fast.replace(n_layers=4),
    "values final only": base.replace(exit_weighting="final"),
}


def same_shapes(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.shape == y.shape for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


for name in sys.argv[1:] or list(VARIANTS):
    config = VARIANTS[name]
    state = init_state(config)
    fresh = dict(state.params["params"])
    for key, value in params["params"].items():
        if key in fresh and (key != "blocks" or config.model == base.model):
            if same_shapes(fresh[key], value):
                fresh[key] = value
    state = state.replace(params={"params": fresh})
    targets, mask = np.asarray(window.targets)[None], np.asarray(window.mask)[None]
    step = jax.jit(make_train_step(config, tail_capacities(config.model, targets, mask)))
    keys = step_keys(run_keys(1), 0)
    start = time.perf_counter()
    jax.block_until_ready(step(state, batch, keys))
    compile_s = time.perf_counter() - start
    durations = []
    for _ in range(6):
        start = time.perf_counter()
        jax.block_until_ready(step(state, batch, keys))
        durations.append(time.perf_counter() - start)
    ms = 1e3 * statistics.median(durations)
    row = {"variant": name, "ms": round(ms, 1), "tokens_per_s": round(2048e3 / ms)}
    print(json.dumps({**row, "compile_s": round(compile_s, 1)}), flush=True)
