"""A run saved in an earlier parameter layout (tests/data/layout_2026-12, written by
its make_fixture.py with the package of that layout) loads and computes what it
computed then."""

import pathlib
import shutil

import numpy as np

import ee_jax
from ee_jax.model import EarlyExitLM

FIXTURE = pathlib.Path(__file__).resolve().parent / "data" / "layout_2026-12"


def test_a_run_of_the_earlier_layout_loads_and_gives_its_outputs(tmp_path):
    run = shutil.copytree(FIXTURE / "run", tmp_path / "run")  # loading never writes, but
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    model, variables, vocab, config = ee_jax.load_run(run)
    saved = np.load(FIXTURE / "outputs.npz")
    states, _ = model.apply(variables, saved["tokens"], method=EarlyExitLM.hidden_states)
    last = config.model.n_layers - 1
    log_probs = model.apply(variables, states[-1], last, method=EarlyExitLM.exit_log_probs)
    np.testing.assert_allclose(log_probs, saved["log_probs"], rtol=1e-6, atol=1e-6)
    for layer in range(config.model.n_layers):
        logit = model.apply(variables, states[layer], layer, method=EarlyExitLM.exit_classifier)
        np.testing.assert_allclose(logit, saved["classifier"][layer], rtol=1e-6, atol=1e-6)
    assert len(vocab) == config.model.vocab_size == 40
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
