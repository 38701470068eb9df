"""A run saved in an earlier parameter layout (tests/data/layout_2026-12, written by
its make_fixture.py with the package of that layout) loads and computes exactly
what it computed then: the same outputs and the same train step, bit for bit."""

import pathlib
import shutil

import chex
import jax
import numpy as np

import ee_jax
from ee_jax import layout, train_state
from ee_jax import train as train_lib
from ee_jax.checkpoint import Checkpointer
from ee_jax.data import make_lm_stream, train_batch
from ee_jax.model import EarlyExitLM
from ee_jax.run import read_config

FIXTURE = pathlib.Path(__file__).resolve().parent / "data" / "layout_2026-12"


def test_a_run_of_the_earlier_layout_loads_and_gives_its_outputs(tmp_path):
    run = shutil.copytree(FIXTURE / "run", tmp_path / "run")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    loaded = ee_jax.load_run(run)
    model, variables, vocab, config = loaded.model, loaded.variables, loaded.vocab, loaded.config
    saved = np.load(FIXTURE / "outputs.npz")
    states, _ = model.apply(variables, saved["tokens"], method=EarlyExitLM.hidden_states)
    last = config.model.n_layers - 1
    log_probs = model.apply(variables, states[-1], last, method=EarlyExitLM.exit_log_probs)
    np.testing.assert_array_equal(log_probs, saved["log_probs"])
    for layer in range(config.model.n_layers):
        logit = model.apply(variables, states[layer], layer, method=EarlyExitLM.exit_classifier)
        np.testing.assert_array_equal(logit, saved["classifier"][layer])
    assert len(vocab) == config.model.vocab_size == 40
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def fixture_stream(config):
    """The training stream make_fixture.py trained on."""
    ids = np.random.default_rng(0).integers(1, config.model.vocab_size, 2000)
    return make_lm_stream(ids, config.batch_size, config.model.n_seq, eos_id=0)


def test_the_train_step_from_an_earlier_layout_checkpoint_is_bit_identical(tmp_path):
    # Given the earlier layout's state at step 2, restored and upgraded.
    run = shutil.copytree(FIXTURE / "run", tmp_path / "run")
    config = read_config(run)
    stream = fixture_stream(config)
    template = jax.eval_shape(lambda: train_state.init_state(config))
    checkpointer = Checkpointer(run / "checkpoints")
    state = checkpointer.restore(template)
    checkpointer.close()
    # When the step after it runs on step 2's batch with step 2's keys.
    step = jax.jit(
        train_state.make_train_step(
            config, train_state.stream_capacities(config, stream), len(stream)
        )
    )
    keys = train_state.step_keys(train_state.run_keys(config.seed), 2)
    after, metrics = step(state, train_batch(stream, 2), keys)
    # Then loss, gradient norm and every parameter equal the earlier package's, bit
    # for bit (compared in the earlier layout's order).
    saved = np.load(FIXTURE / "outputs.npz")
    np.testing.assert_array_equal(metrics["loss"], saved["step_loss"])
    np.testing.assert_array_equal(metrics["grad_norm"], saved["step_grad_norm"])
    earlier = layout.earlier_layout(jax.device_get(after.params))
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(earlier)])
    np.testing.assert_array_equal(flat, saved["step_params"])


def test_a_run_of_the_earlier_layout_resumes_training_in_todays_layout(tmp_path):
    # Given the earlier layout's run (2 steps of 2), copied.
    run = shutil.copytree(FIXTURE / "run", tmp_path / "run")
    config = read_config(run)
    stream = fixture_stream(config)
    # When it trains one step more (parameters and AdamW moments upgraded on restore).
    longer = config.replace(steps=3)
    state = train_lib.train(
        longer, stream, run, allow_config_change=True, progress=False, tensorboard=False
    )
    # Then step 3 is saved in today's layout and loads as such.
    assert int(state.step) == 3
    assert set(state.params["params"]) == {"embedder", "blocks", "exits", "output"}
    adam = [
        s
        for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
        if hasattr(s, "mu")
    ][0]
    assert jax.tree.structure(adam.mu) == jax.tree.structure(state.params)
    loaded = ee_jax.load_run(run)
    assert loaded.step == 3
    chex.assert_trees_all_equal(loaded.variables, state.params)
