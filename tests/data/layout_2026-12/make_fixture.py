"""Writes this folder's run: a tiny run in the parameter layout of 2026-12-07 (raw
[L, D] exit arrays), to check that `ee_jax.load_run` upgrades it.

Run with the package as of that layout (git commit fd25535):
    python tests/data/layout_2026-12/make_fixture.py
It trains a tiny tied-adaptive run with value solves and a carried state for 2
steps on random ids, saves it under run/, and writes outputs.npz: the final
exit's log-probabilities and every exit's classifier logit on fixed tokens, and
what one more train step from the saved state gives on step 2's batch (its loss,
gradient norm and the parameters after it, flattened in the tree's order), all
under the test suite's settings (tests/conftest.py), which change rounding.
"""

import os
import pathlib
import shutil

os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # as tests/conftest.py sets

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ee_jax import train as train_lib  # noqa: E402
from ee_jax.config import train_preset  # noqa: E402
from ee_jax.data import make_lm_stream, train_batch  # noqa: E402
from ee_jax.model import EarlyExitLM  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py sets
HERE = pathlib.Path(__file__).resolve().parent
V = 40


def main():
    run = HERE / "run"
    shutil.rmtree(run, ignore_errors=True)
    config = train_preset("tiny", V).replace(
        steps=2,
        warmup_steps=1,
        checkpoint_every=2,
        log_every=1,
        carry_state=True,
        position="none",
        output="adaptive",
        adaptive_cutoffs=(20,),
        adaptive_div=2.0,
        unembedding="tied",
        bk_value_dim=2,
    )
    ids = np.random.default_rng(0).integers(1, V, 2000)
    stream = make_lm_stream(ids, config.batch_size, config.model.n_seq, eos_id=0)
    words = ["<eos>", "<unk>"] + [f"w{i}" for i in range(V - 2)]
    state = train_lib.train(config, stream, run, progress=False, vocab=words, tensorboard=False)
    model = EarlyExitLM(config.model)
    tokens = np.random.default_rng(1).integers(0, V, (2, 12)).astype(np.int32)
    states, _ = model.apply(state.params, tokens, method=EarlyExitLM.hidden_states)
    last = config.model.n_layers - 1
    log_probs = model.apply(state.params, states[-1], last, method=EarlyExitLM.exit_log_probs)
    classifier = [
        model.apply(state.params, states[i], i, method=EarlyExitLM.exit_classifier)
        for i in range(config.model.n_layers)
    ]
    step = jax.jit(
        train_lib.make_train_step(config, train_lib.stream_capacities(config, stream), len(stream))
    )
    batch = train_batch(stream, 2)
    after, metrics = step(state, batch, train_lib.step_keys(train_lib.run_keys(config.seed), 2))
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(after.params))])
    np.savez(
        HERE / "outputs.npz",
        tokens=tokens,
        log_probs=log_probs,
        classifier=classifier,
        step_loss=np.asarray(metrics["loss"]),
        step_grad_norm=np.asarray(metrics["grad_norm"]),
        step_params=flat,
    )


if __name__ == "__main__":
    main()
