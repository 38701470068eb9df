"""The model as a true recurrence: passes that continue from a state, position-free
models of any length, carried training and evaluation, unbounded generation."""

import functools
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import apply_jitted, init_variables, random_exit_classifiers
from test_bk_core import reference_causal_solve, reference_dense

from ee_jax import bk_core, decode, train_state
from ee_jax import train as train_lib
from ee_jax.config import tiny, train_preset
from ee_jax.data import make_lm_stream
from ee_jax.decode import decode_sequence, generate
from ee_jax.losses import exit_nll
from ee_jax.model import EarlyExitLM
from ee_jax.passes import collect_exit_scores, exit_perplexities, stream_evaluate
from ee_jax.state import RecurrentState

FREE = tiny().replace(
    position="none", output="adaptive", adaptive_cutoffs=(20, 50), adaptive_div=2.0
)
VALUES = FREE.replace(bk_value_dim=3)
LSTM = FREE.replace(mixer="lstm")
V = FREE.vocab_size


# ------------------------------------------------------------ the BK core from a state


def split_system(n, seed):
    rng = np.random.default_rng(seed)
    diag = -2.0 + rng.uniform(-3, 3, n)
    upper, lower = rng.uniform(0.5, 1.5, n - 1), rng.uniform(0.5, 1.5, n - 1)
    return diag, upper, lower, rng.normal(size=(n, 3))


@pytest.mark.parametrize("method", ["associative", "sequential"])
@pytest.mark.parametrize("cut", [1, 9, 23])
def test_two_passes_with_the_state_handed_over_equal_a_float64_dense_solve(method, cut):
    # Given one tridiagonal system of 24 positions, cut into [0, cut) and [cut, 24).
    n, z = 24, 0.3 + 0.2j
    diag, upper, lower, values = split_system(n, cut)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    # When the first part is solved, and the second continues from its last G and y
    # (linked by the off-diagonals between positions cut-1 and cut).
    green_a, solved_a = bk_core.causal_solve(
        f32(diag[:cut]),
        f32(upper[: cut - 1]),
        f32(lower[: cut - 1]),
        z,
        f32(values[:cut]),
        method=method,
    )
    state = (green_a[-1], solved_a[-1])
    link = (f32(upper[cut - 1]), f32(lower[cut - 1]))
    green_b, solved_b = bk_core.causal_solve(
        f32(diag[cut:]),
        f32(upper[cut:]),
        f32(lower[cut:]),
        z,
        f32(values[cut:]),
        method=method,
        initial=state,
        link=link,
    )
    diagonal_b = bk_core.resolvent_diagonal(
        f32(diag[cut:]),
        f32(upper[cut:]),
        f32(lower[cut:]),
        z,
        causal=True,
        method=method,
        initial=state[0],
        link=link,
    )
    # Then both parts together are the whole sequence's causal diagonal and solve.
    green = np.concatenate([green_a, green_b])
    solved = np.concatenate([solved_a, solved_b])
    want_green = reference_dense(diag, upper, lower, z, True)
    want_solved = reference_causal_solve(diag, upper, lower, z, values)
    np.testing.assert_allclose(green, want_green, rtol=2e-5)
    np.testing.assert_allclose(diagonal_b, want_green[cut:], rtol=2e-5)
    np.testing.assert_allclose(solved, want_solved, atol=2e-5 * np.abs(want_solved).max())


def test_a_state_needs_the_causal_core_and_its_link():
    diag = jnp.zeros(4)
    with pytest.raises(ValueError, match="causal"):
        bk_core.resolvent_diagonal(diag, 1.0, 1.0, 1j, initial=jnp.zeros(()), link=(1.0, 1.0))
    with pytest.raises(ValueError, match="link"):
        bk_core.resolvent_diagonal(diag, 1.0, 1.0, 1j, causal=True, initial=jnp.zeros(()))


# ------------------------------------------------------------ the model from a state


@functools.cache
def model_and_variables(config=VALUES):
    model = EarlyExitLM(config)
    tokens = jnp.zeros((1, config.n_seq), jnp.int32)
    variables = init_variables(model, jax.random.key(1), tokens)
    return model, random_exit_classifiers(variables, jax.random.key(2))


def random_tokens(shape, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, V)


@pytest.mark.parametrize("config", [FREE, VALUES, LSTM], ids=["diagonal", "values", "lstm"])
def test_one_pass_equals_chunks_and_token_by_token_decoding(config):
    # Given a position-free model and 3 rows of 50 tokens (n_seq is 16).
    model, variables = model_and_variables(config)
    tokens = random_tokens((3, 50))
    # When the whole sequence is read in one pass, in chunks with the state handed
    # over, and token by token (decoding at full depth).
    whole, _ = apply_jitted(model, variables, tokens, method=EarlyExitLM.hidden_states)
    state, parts = RecurrentState.make(config, 3), []
    for chunk in np.split(np.asarray(tokens), [7, 8, 31], axis=1):
        states, _, state = model.apply(
            variables, chunk, state, method=EarlyExitLM.hidden_states_from
        )
        parts.append(states)
    decoded, depths = decode_sequence(model, variables, tokens, 1.0)
    # Then the hidden states and the final head's logits agree everywhere.
    np.testing.assert_allclose(np.concatenate(parts, axis=2), whole, atol=1e-5)
    assert np.all(np.asarray(state.position) == 50) and np.all(
        np.asarray(depths) == config.n_layers
    )
    final = apply_jitted(
        model, variables, whole[-1], config.n_layers - 1, method=EarlyExitLM.exit_head
    )
    np.testing.assert_allclose(decoded, final, atol=1e-4)


def test_a_learned_position_table_still_bounds_the_length():
    model, variables = model_and_variables(VALUES.replace(position="learned"))
    with pytest.raises(ValueError, match="n_seq"):
        model.apply(variables, random_tokens((1, 17)))
    state = RecurrentState.make(model.config, 1).replace(position=jnp.full(1, 10, jnp.int32))
    with pytest.raises(ValueError, match="position table"):
        model.apply(variables, random_tokens((1, 7)), state, method=EarlyExitLM.hidden_states_from)


# ------------------------------------------------------------ continuous evaluation


def reference_continuous_nll(model, variables, stream):
    """Each row of the stream read in ONE pass (no windows): mean target NLL per exit."""
    config = model.config
    states, _ = apply_jitted(model, variables, stream.inputs, method=EarlyExitLM.hidden_states)
    flat = states.reshape(config.n_layers, stream.inputs.size, -1)
    nll = exit_nll(model, variables, flat, stream.targets.reshape(-1), range(config.n_layers))
    mask = stream.mask.reshape(-1)
    return np.asarray(nll, np.float64)[:, mask].mean(axis=1)


def test_continuous_protocol_equals_reading_each_row_in_one_pass():
    # Given a stream of 2 rows, each 5 windows of 16 (the last partly padding).
    model, variables = model_and_variables()
    ids = np.random.default_rng(3).integers(0, V, 150)
    stream = make_lm_stream(ids, 2, VALUES.n_seq, eos_id=0)
    reference = reference_continuous_nll(model, variables, stream)
    # When the exits are scored window by window with the state carried.
    carried = exit_perplexities(model, variables, stream, carry=True, progress=False)
    scores = collect_exit_scores(model, variables, stream, carry=True, progress=False)
    streamed = stream_evaluate(model, variables, stream, 1.0, carry=True, progress=False)
    reset = exit_perplexities(model, variables, stream, progress=False)
    # Then every protocol-"continuous" number is the one-pass reference.
    np.testing.assert_allclose(carried["exit_nll"], reference, rtol=1e-5)
    np.testing.assert_allclose(scores.nll.mean(axis=1), reference, rtol=1e-5)
    assert streamed["ppl"] == pytest.approx(np.exp(reference[-1]), rel=1e-5)
    assert carried["protocol"] == streamed["protocol"] == "continuous"
    # And the window protocol differs (each window forgets the text before it).
    assert reset["protocol"] == "window"
    assert not np.allclose(reset["exit_nll"], reference, rtol=1e-3)


# ------------------------------------------------------------ generation


def test_greedy_generation_far_past_n_seq_is_the_full_models_argmax():
    # Given a position-free model (n_seq 16), a 5-token prompt and 60 new tokens.
    model, variables = model_and_variables()
    prompt = random_tokens((2, 5), seed=4)
    out, depths = generate(model, variables, prompt, 60, jax.random.key(0), threshold=1.0, chunk=16)
    assert out.shape == (2, 65) and depths.shape == (2, 60)
    # Then each new token is the argmax of the full model over everything before it.
    logits = apply_jitted(model, variables, out[:, :-1])
    np.testing.assert_array_equal(out[:, 5:], np.argmax(np.asarray(logits)[:, 4:], -1))


def test_sampling_does_not_depend_on_the_chunk_and_a_saved_state_continues_it(tmp_path):
    # Run in a fresh interpreter: in a suite worker that had compiled the programs of
    # many earlier test files, XLA's CPU compiler (jax 0.10.2) segfaulted while
    # compiling this test's generation program, in three suite runs; alone it passes.
    code = "import sys, pathlib, test_recurrence as t; t.sampling_check(pathlib.Path(sys.argv[1]))"
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=pathlib.Path(__file__).parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def sampling_check(tmp_path):
    # Given sampled generation with early exit, 45 tokens in one call.
    model, variables = model_and_variables()
    prompt, rng = random_tokens((2, 3), seed=5), jax.random.key(7)
    options = dict(threshold=0.3, measure="learned", temperature=1.0, sample_top_k=10)
    whole, whole_depths = generate(model, variables, prompt, 45, rng, chunk=64, **options)
    # When it is generated in chunks of 4, and in two calls with the state saved
    # to disk and loaded in between.
    chunked, _ = generate(model, variables, prompt, 45, rng, chunk=4, **options)
    first, first_depths, state = generate(
        model, variables, prompt, 20, rng, return_state=True, **options
    )
    decode.save_state(tmp_path / "state.msgpack", state)
    loaded = decode.load_state(tmp_path / "state.msgpack", model.config, 2)
    second, second_depths = generate(
        model, variables, first[:, -1:], 25, rng, state=loaded, **options
    )
    # Then all three are the same tokens and exit depths.
    np.testing.assert_array_equal(chunked, whole)
    np.testing.assert_array_equal(np.concatenate([first, second[:, 1:]], axis=1), whole)
    np.testing.assert_array_equal(np.concatenate([first_depths, second_depths], 1), whole_depths)
    assert 1 < len(np.unique(np.asarray(whole_depths)))  # some tokens exited early


def test_a_stop_token_ends_each_row_and_bad_states_are_refused(tmp_path):
    model, variables = model_and_variables()
    prompt = random_tokens((2, 3), seed=6)
    free, _ = generate(model, variables, prompt, 30, jax.random.key(0), threshold=1.0)
    stop = int(free[0, 3 + 4])  # row 0's fifth new token
    out, depths = generate(
        model, variables, prompt, 30, jax.random.key(0), threshold=1.0, stop_token=stop, chunk=8
    )
    row = np.asarray(out[0, 3:])
    first = int(np.argmax(row == stop))
    assert first <= 4 and np.all(row[first:] == stop)
    assert out.shape[1] == depths.shape[1] + 3 <= 33
    with pytest.raises(ValueError, match="batch"):
        generate(
            model, variables, prompt, 2, jax.random.key(0), state=RecurrentState.make(VALUES, 3)
        )
    (tmp_path / "bad").write_bytes(b"not a state")
    with pytest.raises(ValueError, match="not a decoding state"):
        decode.load_state(tmp_path / "bad", VALUES, 2)


# ------------------------------------------------------------ carried training


def test_carried_training_stopped_and_resumed_equals_the_straight_run(tmp_path):
    # Given a tiny run whose state is carried from window to window (6 windows an epoch).
    config = train_preset("tiny", V).replace(
        position="none", carry_state=True, steps=14, checkpoint_every=5, batch_size=2
    )
    ids = np.random.default_rng(0).integers(0, V, 6 * 2 * config.model.n_seq)
    stream = make_lm_stream(ids, 2, config.model.n_seq, eos_id=0)
    assert len(stream) == 6
    # When it trains straight through, and in two parts (stopped at step 8, resumed).
    straight = train_lib.train(config, stream, tmp_path / "straight", progress=False)
    train_lib.train(config, stream, tmp_path / "parts", stop_at_step=8, progress=False)
    resumed = train_lib.train(config, stream, tmp_path / "parts", progress=False)
    # Then parameters and the carried state are identical.
    jax.tree.map(np.testing.assert_array_equal, straight.params, resumed.params)
    jax.tree.map(np.testing.assert_array_equal, straight.carry, resumed.carry)


def test_each_step_continues_the_last_windows_state_and_an_epoch_restarts_it():
    # Given the train step of a carried tiny run (3 windows an epoch, no dropout).
    config = train_preset("tiny", V).replace(position="none", carry_state=True, batch_size=2)
    ids = np.random.default_rng(1).integers(0, V, 3 * 2 * config.model.n_seq)
    stream = make_lm_stream(ids, 2, config.model.n_seq, eos_id=0)
    step = jax.jit(train_lib.make_train_step(config, windows_per_epoch=len(stream)))
    model, state = EarlyExitLM(config.model), train_lib.init_state(config)
    keys = train_lib.run_keys(config.seed)

    def read(params, window, layers):
        """The state after a plain forward over the window from the mixer states."""
        start = RecurrentState(position=jnp.zeros(2, jnp.int32), layers=layers)
        batch = stream.window(window)
        return model.apply(params, batch.inputs, start, method=EarlyExitLM.hidden_states_from)[2]

    fresh = RecurrentState.make(config.model, 2).layers
    expected_start = fresh
    carried = lambda: train_state.carried_layers(config.model, state.carry)  # noqa: E731
    for s in range(5):  # windows 0, 1, 2, then 0 and 1 of the next epoch
        window = s % len(stream)
        if window == 0:
            expected_start = fresh
        # When step s runs, then its carry is what a forward over its window leaves
        # from the previous carry (from zeros at the start of each epoch).
        expected = read(state.params, window, expected_start).layers
        state, _ = step(state, stream.window(window), train_lib.step_keys(keys, s))
        jax.tree.map(
            lambda got, want: np.testing.assert_allclose(got, want, atol=1e-6),
            carried(),
            expected,
        )
        expected_start = carried()


def test_carry_state_needs_a_recurrent_causal_model():
    with pytest.raises(ValueError, match="carry_state"):
        train_preset("tiny", V).replace(mixer="attention", carry_state=True)
    with pytest.raises(ValueError, match="carry_state"):
        train_preset("tiny", V).replace(causal=False, carry_state=True)
