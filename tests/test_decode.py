"""Token-by-token decoding against the parallel halting loop."""

import jax
import numpy as np
import pytest
from conftest import TOLERANCE

from ee_jax.config import tiny
from ee_jax.decode import decode_sequence, generate, stream_evaluate
from ee_jax.early_exit import early_exit_forward
from ee_jax.model import EarlyExitLM

CONFIG = tiny()


@pytest.fixture(scope="module")
def setup():
    model = EarlyExitLM(CONFIG)
    tokens = jax.random.randint(jax.random.key(3), (2, CONFIG.n_seq), 0, CONFIG.vocab_size)
    params = dict(model.init(jax.random.key(1), tokens)["params"])
    # Random exit classifiers (they start at zero: every token equally confident).
    params["classifier_kernel"] = jax.random.normal(
        jax.random.key(2), (CONFIG.n_layers, CONFIG.d_model)
    )
    return model, {"params": params}, tokens


@pytest.mark.parametrize("measure", ["softmax_max", "learned", "state_saturation"])
def test_decoding_equals_the_parallel_loop_with_frozen_exits(setup, measure):
    # Given a threshold that splits the tokens between exits.
    model, variables, tokens = setup
    _, info = early_exit_forward(model, variables, tokens, 0.0, measure=measure)
    threshold = float(np.quantile(np.asarray(info.confidence), 0.5))
    # When the sequence is decoded one token at a time and also run in parallel.
    logits, depths = decode_sequence(model, variables, tokens, threshold, measure=measure)
    expected, expected_info = early_exit_forward(
        model, variables, tokens, threshold, measure=measure, exited_state="freeze"
    )
    # Then exit depths are identical and logits agree.
    np.testing.assert_array_equal(depths, expected_info.exit_depth)
    np.testing.assert_allclose(logits, expected, atol=TOLERANCE["float32"])
    assert 1 < len(np.unique(np.asarray(depths)))


def test_threshold_one_decodes_the_plain_forward(setup):
    model, variables, tokens = setup
    logits, depths = decode_sequence(model, variables, tokens, 1.0)
    np.testing.assert_allclose(logits, model.apply(variables, tokens), atol=TOLERANCE["float32"])
    assert np.all(np.asarray(depths) == CONFIG.n_layers)


def test_generate_greedy_continues_with_the_argmax(setup):
    model, variables, tokens = setup
    out, depths = generate(model, variables, tokens[:, :4], 6, jax.random.key(0), threshold=1.0)
    assert out.shape == (2, 10) and depths.shape == (2, 9)
    np.testing.assert_array_equal(out[:, :4], tokens[:, :4])
    # Greedy: each new token is the full model's argmax given what came before.
    logits = model.apply(variables, out[:, :-1])
    np.testing.assert_array_equal(out[:, 4:], np.argmax(np.asarray(logits)[:, 3:], -1))
    sampled, _ = generate(
        model, variables, tokens[:, :4], 6, jax.random.key(0), temperature=1.0, top_k=5
    )
    assert sampled.shape == (2, 10)


def test_generate_rejects_bad_arguments(setup):
    model, variables, tokens = setup
    with pytest.raises(ValueError, match="n_seq"):
        generate(model, variables, tokens, 5, jax.random.key(0))
    with pytest.raises(ValueError, match="threshold"):
        generate(model, variables, tokens[:, :2], 2, jax.random.key(0), threshold=2.0)


def test_streaming_evaluation_matches_the_parallel_evaluation(setup):
    from ee_jax.data import make_lm_stream
    from ee_jax.evaluate import real_loop_row

    model, variables, _ = setup
    ids = np.random.default_rng(1).integers(0, CONFIG.vocab_size, 150)
    stream = make_lm_stream(ids, 2, CONFIG.n_seq, eos_id=0)
    for threshold in (1.0, 0.02):
        streamed = stream_evaluate(model, variables, stream, threshold, progress=False)
        parallel = real_loop_row(model, variables, stream, threshold, "softmax_max", progress=False)
        assert streamed["total_tokens"] == parallel["total_tokens"] == len(ids)
        assert streamed["ppl"] == pytest.approx(parallel["ppl"], rel=1e-5)
        np.testing.assert_allclose(streamed["exit_distribution"], parallel["exit_distribution"])
        assert streamed["flops_speedup"] == pytest.approx(parallel["flops_speedup"], rel=1e-5)
