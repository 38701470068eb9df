"""Token-by-token decoding against the parallel halting loop."""

import argparse
import functools
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOLERANCE, apply_jitted, init_variables, random_exit_classifiers

import ee_jax
from ee_jax import decode, passes
from ee_jax.config import tiny, train_preset
from ee_jax.data import Vocabulary, make_lm_stream
from ee_jax.decode import decode_sequence, decode_step, generate
from ee_jax.early_exit import early_exit_forward
from ee_jax.model import EarlyExitLM
from ee_jax.passes import real_loop_row, stream_evaluate
from ee_jax.sampling import sample_tokens, top_p_logits
from ee_jax.state import RecurrentState

CONFIG = tiny()
ADAPTIVE = CONFIG.replace(output="adaptive", adaptive_cutoffs=(20, 50), adaptive_div=2.0)
VALUES = ADAPTIVE.replace(bk_value_dim=3)  # the BK solve of value vectors
FREE = CONFIG.replace(position="none")  # no position table: any length
V = CONFIG.vocab_size
BAD_IDS = r"token ids must be in \[0, vocab_size=97\)"
REPO = pathlib.Path(__file__).resolve().parents[1]


@functools.cache
def model_and_tokens(output="full"):
    config = {"full": CONFIG, "adaptive": ADAPTIVE, "values": VALUES, "free": FREE}[output]
    model = EarlyExitLM(config)
    tokens = jax.random.randint(jax.random.key(3), (2, config.n_seq), 0, config.vocab_size)
    variables = init_variables(model, jax.random.key(1), tokens)
    return model, random_exit_classifiers(variables, jax.random.key(2)), tokens


@pytest.fixture(scope="module")
def setup():
    return model_and_tokens("full")


@pytest.mark.parametrize(
    "output, measure",
    [
        ("full", "softmax_max"),
        ("full", "learned"),
        ("full", "state_saturation"),
        ("adaptive", "softmax_max"),
        ("adaptive", "learned"),
        ("values", "softmax_max"),
        ("values", "state_saturation"),
    ],
)
def test_decoding_equals_the_parallel_loop_with_frozen_exits(output, measure):
    # Given a threshold that splits the tokens between exits.
    model, variables, tokens = model_and_tokens(output)
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
    np.testing.assert_allclose(
        logits, apply_jitted(model, variables, tokens), atol=TOLERANCE["float32"]
    )
    assert np.all(np.asarray(depths) == CONFIG.n_layers)


def test_generate_greedy_continues_with_the_argmax(setup):
    model, variables, tokens = setup
    out, depths = generate(model, variables, tokens[:, :4], 6, jax.random.key(0), threshold=1.0)
    assert out.shape == (2, 10) and depths.shape == (2, 6)
    np.testing.assert_array_equal(out[:, :4], tokens[:, :4])
    # Greedy: each new token is the full model's argmax given what came before.
    logits = apply_jitted(model, variables, out[:, :-1])
    np.testing.assert_array_equal(out[:, 4:], np.argmax(np.asarray(logits)[:, 3:], -1))
    sampled, _ = generate(
        model, variables, tokens[:, :4], 6, jax.random.key(0), temperature=1.0, sample_top_k=5
    )
    assert sampled.shape == (2, 10)


def test_generate_rejects_bad_arguments(setup):
    model, variables, tokens = setup
    with pytest.raises(ValueError, match="n_seq"):
        generate(model, variables, tokens, 2, jax.random.key(0))
    with pytest.raises(ValueError, match="threshold"):
        generate(model, variables, tokens[:, :2], 2, jax.random.key(0), threshold=2.0)


@pytest.mark.parametrize(
    "output, carry", [("full", False), ("adaptive", False), ("values", False), ("values", True)]
)
def test_streaming_evaluation_matches_the_parallel_evaluation(output, carry):
    # The halting loop over windows (from a fresh state, or carried from the previous
    # window: continuous) against decoding the same windows token by token.
    model, variables, _ = model_and_tokens(output)
    ids = np.random.default_rng(1).integers(0, CONFIG.vocab_size, 150)
    stream = make_lm_stream(ids, 2, CONFIG.n_seq, eos_id=0)
    options = dict(carry=carry, progress=False)
    for threshold in (1.0, 0.02):
        streamed = stream_evaluate(model, variables, stream, threshold, **options)
        parallel = real_loop_row(model, variables, stream, threshold, "softmax_max", **options)
        assert streamed["total_tokens"] == parallel["total_tokens"] == len(ids)
        assert streamed["ppl"] == pytest.approx(parallel["ppl"], rel=1e-5)
        np.testing.assert_allclose(streamed["exit_distribution"], parallel["exit_distribution"])
        assert streamed["flops_speedup"] == pytest.approx(parallel["flops_speedup"], rel=1e-5)
        if threshold < 1.0:  # some tokens exited early
            assert streamed["exit_distribution"][-1] < 1.0


# ------------------------------------------------------------ token ids


def no_computation(*args, **kwargs):
    raise AssertionError("a step ran before the arguments were checked")


def forbid_computation(monkeypatch):
    """Every jitted decoding program (`decode`, `passes.stream_evaluate`) raises if called."""
    for name in ("_decode_scan", "_prefill", "_generate_chunk"):
        monkeypatch.setattr(decode, name, no_computation)
    monkeypatch.setattr(passes, "_stream_window", no_computation)


@pytest.mark.parametrize("bad_id", [V, -1])
def test_bad_token_ids_raise_before_decoding(setup, bad_id, monkeypatch):
    # Given token arrays with one id outside [0, V) (V reads a NaN row, -1 the last one).
    model, variables, tokens = setup
    bad = np.asarray(tokens).copy()
    bad[1, 2] = bad_id
    forbid_computation(monkeypatch)
    # Then every decoding entry point raises the checker's error before any step.
    with pytest.raises(ValueError, match=BAD_IDS):
        decode_sequence(model, variables, bad, 0.5)
    with pytest.raises(ValueError, match=BAD_IDS):
        generate(model, variables, bad[:, :4], 3, jax.random.key(0))
    with pytest.raises(ValueError, match=BAD_IDS):
        early_exit_forward(model, variables, bad, 0.5)


@pytest.mark.parametrize("position, bad_id", [(20, V), (20, -1), (-1, V)])
def test_streaming_evaluation_checks_every_id_of_the_stream_up_front(
    setup, position, bad_id, monkeypatch
):
    # Given a stream with one bad id (the last one is only a target, never an input).
    model, variables, _ = setup
    monkeypatch.setattr(decode, "decode_step", no_computation)
    ids = np.random.default_rng(1).integers(0, V, 150)
    ids[position] = bad_id
    stream = make_lm_stream(ids, 2, CONFIG.n_seq, eos_id=0)
    # Then the streaming evaluation refuses it with the same error.
    with pytest.raises(ValueError, match=BAD_IDS):
        stream_evaluate(model, variables, stream, 0.5, progress=False)


@pytest.mark.parametrize(
    "prompt, message",
    [
        (np.zeros((1, 3), np.float32), "integer dtype"),
        (np.zeros((1, 3), bool), "integer dtype"),
        (np.zeros(3, np.int32), "shape"),
        (np.zeros((1, 1, 3), np.int32), "shape"),
        (np.zeros((1, 0), np.int32), "shape"),
    ],
)
def test_generate_checks_the_prompt_dtype_and_rank(setup, prompt, message, monkeypatch):
    model, variables, _ = setup
    forbid_computation(monkeypatch)
    with pytest.raises(ValueError, match=message):
        generate(model, variables, prompt, 2, jax.random.key(0))


def test_generate_accepts_nested_lists_as_the_prompt(setup):
    model, variables, tokens = setup
    prompt = np.asarray(tokens[:, :3])
    expected, _ = generate(model, variables, prompt, 2, jax.random.key(0), threshold=1.0)
    out, _ = generate(model, variables, prompt.tolist(), 2, jax.random.key(0), threshold=1.0)
    np.testing.assert_array_equal(out, expected)


# ------------------------------------------------------------ sampling


@pytest.mark.parametrize("temperature", [1e-39, 1e-30])
def test_sampling_tends_to_greedy_as_the_temperature_goes_to_zero(setup, temperature):
    # Given greedy continuations (checked against the argmax above).
    model, variables, tokens = setup
    prompt, key = tokens[:, :4], jax.random.key(5)
    greedy, _ = generate(model, variables, prompt, 8, key, threshold=1.0)
    # When sampling at a tiny temperature (logits / T overflows float32).
    sampled, _ = generate(model, variables, prompt, 8, key, threshold=1.0, temperature=temperature)
    # Then the tokens are the greedy ones.
    np.testing.assert_array_equal(sampled, greedy)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature="1"), "temperature"),
        (dict(temperature=1.0, sample_top_k=0), "sample_top_k"),
        (dict(temperature=1.0, sample_top_p=0.0), "sample_top_p"),
        (dict(temperature=1.0, sample_top_p=True), "sample_top_p"),
        (dict(temperature=1.0, sample_top_k=V + 1), "sample_top_k"),
        (dict(temperature=1.0, sample_top_k=2.0), "sample_top_k"),
        (dict(steps=-1), "steps"),
        (dict(steps=1.5), "steps"),
    ],
)
def test_bad_sampling_parameters_raise(setup, arguments, message, monkeypatch):
    model, variables, tokens = setup
    forbid_computation(monkeypatch)
    arguments = {"steps": 3, **arguments}
    steps = arguments.pop("steps")
    with pytest.raises(ValueError, match=message):
        generate(model, variables, tokens[:, :4], steps, jax.random.key(0), **arguments)


def test_top_1_of_an_exact_tie_is_the_lowest_id(setup):
    # Given a final head whose logits for ids 9 and 5 are both exactly 50, the maximum.
    model, variables, tokens = setup
    output = dict(variables["params"]["output"])
    output["unembed_kernel"] = output["unembed_kernel"].at[:, jnp.array([5, 9])].set(0.0)
    output["unembed_bias"] = output["unembed_bias"].at[:, jnp.array([5, 9])].set(50.0)
    tied = {"params": {**variables["params"], "output": output}}
    # When sampling at temperature 1 from the top 1, with several keys.
    for seed in range(3):
        out, _ = generate(
            model,
            tied,
            tokens[:, :4],
            6,
            jax.random.key(seed),
            threshold=1.0,
            temperature=1.0,
            sample_top_k=1,
        )
        # Then every new token is the lowest tied id, as greedy decoding gives.
        assert np.all(np.asarray(out[:, 4:]) == 5)


@pytest.mark.parametrize("temperature", [0.7, 2.5])
def test_top_k_samples_softmax_over_exactly_k_ids(temperature):
    # Given logits with ties, one of them at the cut of the top 4 (ids 2 and 4 at 2.0).
    logits = np.array([1.0, 3.0, 2.0, 3.0, 2.0, 0.5, -1.0, 2.5], np.float32)
    kept = np.array([1, 3, 7, 2])  # the 4 largest, lowest id first among equals
    samples = 20_000
    # When sampling 20,000 rows with one key.
    batch = jnp.broadcast_to(jnp.asarray(logits), (samples, len(logits)))
    drawn = np.asarray(sample_tokens(batch, jax.random.key(0), temperature, 4))
    # Then only the kept ids appear, at the frequencies of softmax(logits / T) over them.
    assert set(np.unique(drawn)) <= set(kept.tolist())
    scaled = logits[kept].astype(np.float64) / temperature
    expected = np.exp(scaled - scaled.max())
    expected /= expected.sum()
    counts = np.array([np.sum(drawn == i) for i in kept])
    standard_error = np.sqrt(expected * (1 - expected) / samples)
    np.testing.assert_array_less(np.abs(counts / samples - expected), 3 * standard_error)


def test_sampling_without_top_k_matches_the_softmax():
    logits = np.array([0.0, 1.0, -2.0, 1.0, 0.3], np.float32)
    samples = 20_000
    batch = jnp.broadcast_to(jnp.asarray(logits), (samples, len(logits)))
    drawn = np.asarray(sample_tokens(batch, jax.random.key(1), 1.0))
    expected = np.exp(logits.astype(np.float64))
    expected /= expected.sum()
    frequencies = np.bincount(drawn, minlength=len(logits)) / samples
    standard_error = np.sqrt(expected * (1 - expected) / samples)
    np.testing.assert_array_less(np.abs(frequencies - expected), 3 * standard_error)


# ------------------------------------------------------------ bidirectional models


@pytest.mark.parametrize(
    "changes, message", [(dict(causal=False), "causal"), (dict(mixer="attention"), "attention")]
)
def test_decoding_a_bidirectional_or_attention_model_raises(setup, monkeypatch, changes, message):
    # Given a bidirectional model (same parameter shapes as the causal one), or an
    # attention model (decoding has no key-value cache).
    _, variables, tokens = setup
    config = CONFIG.replace(**changes)
    model = EarlyExitLM(config)
    if config.mixer == "attention":
        variables = model.init(jax.random.key(0), tokens)
    stream = make_lm_stream(np.arange(40) % V, 2, CONFIG.n_seq, eos_id=0)
    # Then decode_step itself refuses it (at trace time), and so does every entry point.
    with pytest.raises(ValueError, match=message):
        decode_step(model, variables, RecurrentState.make(config, 2), tokens[:, 0], 0.5)
    forbid_computation(monkeypatch)
    with pytest.raises(ValueError, match=message):
        decode_sequence(model, variables, tokens, 0.5)
    with pytest.raises(ValueError, match=message):
        generate(model, variables, tokens[:, :4], 2, jax.random.key(0))
    with pytest.raises(ValueError, match=message):
        stream_evaluate(model, variables, stream, 0.5, progress=False)


# ------------------------------------------------------------ command lines


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script_config(**changes):
    return train_preset("tiny", V).replace(**changes)


def test_generate_cli_checks_prompt_ids_model_and_sampling_flags():
    script = load_script("generate")
    config = script_config()
    # The prompt: known words whose ids the model cannot read, or no word at all.
    vocab = Vocabulary(tuple(f"w{i}" for i in range(V + 3)))
    np.testing.assert_array_equal(script.encode_prompt(vocab, "w3 w1", config.model), [[3, 1]])
    with pytest.raises(ValueError, match=BAD_IDS):
        script.encode_prompt(vocab, "w3 w98", config.model)
    with pytest.raises(ValueError, match="at least one word"):
        script.encode_prompt(vocab, "  ", config.model)
    # The flags: renamed --sample_top_k (the MoE has its own top_k).
    args = script.parse_args(
        ["--workdir", "w", "--steps", "5", "--temperature", "0.5", "--sample_top_k", "3"]
    )
    assert args.sample_top_k == 3 and not hasattr(args, "top_k")
    script.check_generate_flags(args, config, 2)
    for flags, message in [
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=-0.5), "temperature"),
        (dict(sample_top_k=0), "sample_top_k"),
        (dict(sample_top_k=V + 1), "sample_top_k"),
        (dict(sample_top_p=0.0), "sample_top_p"),
        (dict(sample_top_p=1.5), "sample_top_p"),
        (dict(sample_top_p=float("nan")), "sample_top_p"),
        (dict(steps=-1), "steps"),
        (dict(draft_exit=config.model.n_layers), "--draft_exit / --draft_tokens"),
        (dict(draft_exit=1, draft_tokens=0), "--draft_exit / --draft_tokens"),
        (dict(draft_exit=1, threshold=0.5), "leave out --threshold and --measure"),
    ]:
        with pytest.raises(ValueError, match=message):
            script.check_generate_flags(argparse.Namespace(**{**vars(args), **flags}), config, 2)
    with pytest.raises(ValueError, match="causal"):
        script.check_generate_flags(args, script_config(causal=False), 2)


def test_stream_cli_checks_the_model_and_skips_untrained_classifiers():
    script = load_script("stream_early_exit")
    args = script.parse_args(["--workdir", "w", "--batch_size", "1", "8"])
    assert args.batch_size == [1, 8]
    measures, skipped = script.check_stream_flags(args, script_config())
    assert measures == ["softmax_max", "learned"] and skipped == {}
    measures, skipped = script.check_stream_flags(args, script_config(exit_weighting="final"))
    assert measures == ["softmax_max"] and "never trained" in skipped["learned"]
    with pytest.raises(ValueError, match="causal"):
        script.check_stream_flags(args, script_config(causal=False))
    for flag in ("--batch_size", "--repeats"):  # refused by the parser (tests/test_cli.py)
        with pytest.raises(SystemExit):
            script.parse_args(["--workdir", "w", flag, "0"])
    with pytest.raises(ValueError, match="attention"):
        script.check_stream_flags(args, script_config(mixer="attention"))


# ------------------------------------------------------------ stops and positions


def reference_state(model, variables, tokens):
    """The state after tokens [N] of one row, fed one decode_step at a time."""
    step = jax.jit(decode_step, static_argnums=0)
    state = RecurrentState.make(model.config, 1)
    for token in np.asarray(tokens):
        state = step(model, variables, state, jnp.asarray([token]), 1.0)[3]
    return state


# Row 1 never writes the id of row 0's 3rd new token; it writes its 5th before row 0 does.
@pytest.mark.parametrize("place", [2, 4])
def test_the_state_after_a_stop_has_read_each_row_up_to_its_stop_token(place):
    # Given greedy continuations of 2 prompts (position "none") and a stop id: row 0's
    # new token at `place`.
    model, variables, tokens = model_and_tokens("free")
    prompt, key, steps = tokens[:, :3], jax.random.key(0), 20
    free, _ = generate(model, variables, prompt, steps, key, threshold=1.0)
    new = np.asarray(free[:, 3:])
    stop = int(new[0, place])
    firsts = [int(np.argmax(row == stop)) if np.any(row == stop) else None for row in new]
    assert firsts[0] == place and firsts[1] != place
    # When generation stops there, in chunks of 4, returning the state.
    out, depths, state = generate(
        model,
        variables,
        prompt,
        steps,
        key,
        threshold=1.0,
        stop_token=stop,
        chunk=4,
        return_state=True,
    )
    # Then each row's state is that of its text read up to the last token it shows, a
    # stopped row's up to its stop (not fed yet), at that token's position.
    ends = [steps if first is None else first + 1 for first in firsts]  # new tokens shown
    rows = [reference_state(model, variables, free[row, : 2 + end]) for row, end in enumerate(ends)]
    expected = jax.tree.map(lambda *xs: np.concatenate(xs, axis=1), *[r.layers for r in rows])
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
    jax.tree.map(close, state.layers, expected)  # BKState(G [L, B, H], y [L, B, H, P])
    np.testing.assert_array_equal(state.position, [2 + end for end in ends])
    # So each row continues as its own text does from a fresh start.
    more, _ = generate(model, variables, out[:, -1:], 4, key, threshold=1.0, state=state)
    for row, end in enumerate(ends):
        alone, _ = generate(model, variables, free[row : row + 1, : 3 + end], 4, key, threshold=1.0)
        np.testing.assert_array_equal(more[row, 1:], alone[0, -4:])
    # And the tokens end at the last row's stop, a stopped row repeating its stop at depth 0.
    assert out.shape == (2, 3 + max(ends)) and depths.shape == (2, max(ends))
    for row, end in enumerate(ends):
        np.testing.assert_array_equal(out[row, : 3 + end], free[row, : 3 + end])
        assert np.all(out[row, 3 + end :] == stop) and np.all(depths[row, end:] == 0)
        assert np.all(depths[row, :end] == CONFIG.n_layers)


def test_decode_step_refuses_a_position_past_the_learned_table(setup):
    # Given a model with a learned table of n_seq = 16 positions.
    model, variables, tokens = setup
    fresh = RecurrentState.make(CONFIG, 2)
    at = lambda position: fresh.replace(position=jnp.full(2, position, jnp.int32))  # noqa: E731
    # When one token is fed at the last row of the table, it reads that row.
    decode_step(model, variables, at(15), tokens[:, 0], 1.0)
    # Then a step at position 16 (past the table) raises one line, as generate does.
    message = r"positions 16\.\.16 pass the position table of n_seq=16 rows"
    with pytest.raises(ValueError, match=message) as error:
        decode_step(model, variables, at(16), tokens[:, 0], 1.0)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"positions 15\.\.16 pass the position table"):
        generate(model, variables, tokens[:, :1], 2, jax.random.key(0), state=at(15))


def test_generate_cli_samples_at_the_calibrated_exit_by_default(tmp_path):
    # Given a run folder without an evaluation, then one with a calibrated learned exit.
    script = load_script("generate")
    args = script.parse_args(["--workdir", str(tmp_path)])
    # Then the script samples (T = 1, top 40) and, without a calibration, exits by
    # softmax_max at the model's threshold.
    assert (args.temperature, args.sample_top_k) == (1.0, 40)
    assert script.exit_options(args)[:2] == ("softmax_max", None)
    (tmp_path / "eval").mkdir()
    results = {"calibration": {"learned": {"threshold": 0.97}, "softmax_max": {"threshold": 0.5}}}
    (tmp_path / "eval" / "results.json").write_text(json.dumps(results))
    # When there is one: the learned exit at its calibrated threshold, unless the
    # flags say otherwise; --sample_top_k none samples from every token.
    measure, threshold, source = script.exit_options(args)
    assert (measure, threshold) == ("learned", 0.97) and "calibrated" in source
    args = script.parse_args(["--workdir", str(tmp_path), "--measure", "softmax_max"])
    assert script.exit_options(args)[:2] == ("softmax_max", 0.5)
    args = script.parse_args(["--workdir", str(tmp_path), "--threshold", "0.8"])
    assert script.exit_options(args)[:2] == ("learned", 0.8)
    args = script.parse_args(["--workdir", str(tmp_path), "--sample_top_k", "none"])
    assert args.sample_top_k is None


def test_generate_cli_prints_and_counts_the_tokens_up_to_eos(monkeypatch, capsys):
    # Given an untrained tiny model, its greedy continuation of "w3 w1" (12 tokens), and
    # a vocabulary whose <eos> is the first new id it writes after its 2nd token.
    script = load_script("generate")
    config = script_config()
    model = EarlyExitLM(config.model)
    variables = init_variables(model, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    prompt, steps = np.array([[3, 1]]), 12
    free, free_depths = generate(model, variables, prompt, steps, jax.random.key(0))
    new, new_depths = np.asarray(free[0, 2:]), np.asarray(free_depths[0])
    seen = {3, 1}
    for eos, token in enumerate(new):
        if eos >= 2 and token not in seen:
            break
        seen.add(int(token))
    chunk = eos + 2  # tokens after <eos> in its chunk (the tokens do not depend on chunk)
    assert chunk < steps
    words = [f"w{i}" for i in range(V)]
    words[new[eos]] = "<eos>"
    vocab = Vocabulary(tuple(words))
    run = ee_jax.Run(model, variables, config, vocab, 1, pathlib.Path("w"))
    monkeypatch.setattr(ee_jax, "load_run", lambda workdir: run)
    monkeypatch.setattr(ee_jax, "enable_compilation_cache", lambda *args: None)
    # When the script generates with --stop_at_eos true.
    argv = ["--workdir", "w", "--prompt", "w3 w1", "--steps", str(steps), "--chunk", str(chunk)]
    argv += ["--temperature", "0"]  # greedy, as the reference
    assert script.main([*argv, "--stop_at_eos", "true"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # Then it prints and counts the tokens up to <eos> with their depths, and no more.
    shown = [
        f"{word}[{depth}]"
        for word, depth in zip(
            vocab.decode(list(new[: eos + 1])), new_depths[: eos + 1], strict=True
        )
    ]
    assert shown[-1].startswith("<eos>[")
    assert lines[2:-1] == [" ".join(shown[i : i + chunk]) for i in range(0, eos + 1, chunk)]
    layers = config.model.n_layers
    counts = np.bincount(new_depths[: eos + 1], minlength=layers + 1)[1:]
    assert lines[-1] == f"{eos + 1} tokens; exit depths 1..{layers}: {counts.tolist()}"


@pytest.mark.parametrize("k", [1, 3, 7, 40, 97])
def test_top_k_keeps_the_first_k_of_a_stable_descending_order(k):
    # Given logits with many ties (few distinct values), 4 rows of V = 97.
    logits = np.random.default_rng(k).integers(-3, 4, (4, V)).astype(np.float32)
    # When sample_tokens picks its k candidates (lax.top_k, no sort).
    _, ids = jax.lax.top_k(jnp.asarray(logits), k)
    # Then they are the first k of numpy's stable descending sort, in that order.
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    np.testing.assert_array_equal(ids, order)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_top_p_keeps_the_nucleus_of_a_stable_descending_order(temperature):
    # Given logits with ties (few distinct values), 4 rows of V = 97, and for each
    # row every nucleus size m: a top_p halfway between the masses of the first m - 1
    # and m ids of a float64 stable descending sort (so rounding cannot move the cut).
    rng = np.random.default_rng(int(10 * temperature))
    logits = rng.integers(-4, 4, (4, V)).astype(np.float32) / 2
    probs = np.exp(logits.astype(np.float64) / temperature)
    probs /= probs.sum(axis=-1, keepdims=True)
    order = np.argsort(-probs, axis=-1, kind="stable")
    cumulative = np.cumsum(np.take_along_axis(probs, order, axis=-1), axis=-1)
    for m in (1, 2, 5, 30, V):
        top_p = (cumulative[:, m - 2] if m > 1 else 0.0) / 2 + cumulative[:, m - 1] / 2
        top_p = np.minimum(top_p, 1.0).astype(np.float32)
        # When the ids outside the nucleus are masked (bisection, no sort).
        masked = top_p_logits(jnp.asarray(logits), temperature, jnp.asarray(top_p))
        # Then the kept ids are the first m of the sort.
        expected = np.zeros(logits.shape, bool)
        np.put_along_axis(expected, order[:, :m], True, axis=-1)
        np.testing.assert_array_equal(np.asarray(masked) > -np.inf, expected, err_msg=f"m={m}")
