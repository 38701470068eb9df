"""Early-exit evaluation: internal consistency on a small model and corpus, and
against references computed from the plain forward's and the halting loop's logits."""

import collections
import contextlib
import functools

import jax
import numpy as np
import optax
import pytest
from conftest import TOLERANCE, init_variables

from ee_jax import calibrate as calibrate_lib
from ee_jax import evaluate, exit_scores, passes, report
from ee_jax.config import tiny
from ee_jax.data import make_lm_stream
from ee_jax.early_exit import ExitStats, early_exit_forward
from ee_jax.flops import exit_flops, tail_use_of
from ee_jax.model import EarlyExitLM

CONFIG = tiny()
CONFIGS = {
    "full": CONFIG,
    "adaptive": CONFIG.replace(output="adaptive", adaptive_cutoffs=(20, 50), adaptive_div=2.0),
    "attention": CONFIG.replace(mixer="attention", attention_heads=2),
    "none": CONFIG.replace(mixer="none"),
}
BAD_IDS = r"token ids must be in \[0, vocab_size=97\)"
THRESHOLDS = [0.0, 0.012, 0.02, 0.03, 0.05, 1.0]


@functools.cache
def model_and_split(output="full"):
    # A random model whose exits disagree, and a 1,000-token "split" that does not
    # fill its last window (so padding is exercised).
    config = CONFIGS[output]
    model = EarlyExitLM(config)
    params = init_variables(model, jax.random.key(0), np.zeros((1, config.n_seq), np.int32))
    ids = np.random.default_rng(0).integers(0, config.vocab_size, 1000)
    stream = make_lm_stream(ids, 4, config.n_seq, eos_id=0)
    scores = passes.collect_exit_scores(model, params, stream, progress=False)
    return model, params, ids, stream, scores


@pytest.fixture(scope="module")
def setup():
    return model_and_split("full")


def reference_nll_sums(logits_fn, stream) -> np.ndarray:
    """Summed target NLL over the masked targets of `stream`; logits_fn(inputs) gives a
    window's logits [..., B, N, V], scored by optax (valid for an adaptive output too:
    its logits are normalised log-probabilities, which softmax leaves unchanged).

    Returns: [...] float64 sums."""
    total = 0.0
    for index in range(len(stream)):
        batch = stream.window(index)
        logits = np.asarray(logits_fn(batch.inputs), np.float64)
        targets = np.broadcast_to(batch.targets, logits.shape[:-1])
        nll = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
        total = total + np.sum(nll * batch.mask, axis=(-2, -1))
    return total


@pytest.mark.parametrize("output", ["full", "adaptive", "attention", "none"])
def test_every_token_is_scored_once_and_full_depth_equals_the_plain_forward(output):
    # Given a model and a split.
    model, params, ids, stream, scores = model_and_split(output)
    config = model.config
    # When it is evaluated at full depth: offline sweep, per-exit perplexities,
    # the halting loop that never exits early.
    full = exit_scores.sweep(scores, config, "softmax_max", [1.0])[0]
    plain = passes.exit_perplexities(model, params, stream, progress=False)
    loop = passes.real_loop_row(model, params, stream, 1.0, "softmax_max", progress=False)
    # Then every target is scored once and each perplexity is the plain forward's,
    forward = jax.jit(functools.partial(model.apply, params))
    expected = np.exp(reference_nll_sums(forward, stream) / len(ids))
    assert scores.tokens == plain["tokens"] == loop["total_tokens"] == len(ids)
    for ppl in (full["ppl"], plain["exit_ppl"][-1], loop["ppl"]):
        assert ppl == pytest.approx(expected, rel=TOLERANCE["float32"])
    assert full["layer_speedup"] == 1.0 and full["avg_exit_layer"] == config.n_layers
    assert full["ppl_change_pct"] == pytest.approx(0.0, abs=1e-9)
    # and every exit's mean NLL is that of the exit's own logits.
    exits = jax.jit(functools.partial(model.apply, params, method=EarlyExitLM.exit_logits))
    expected = reference_nll_sums(exits, stream) / len(ids)  # [L]
    np.testing.assert_allclose(plain["exit_nll"], expected, rtol=TOLERANCE["float32"])
    np.testing.assert_allclose(scores.nll.mean(axis=1), expected, rtol=TOLERANCE["float32"])


@pytest.mark.parametrize("measure", ["softmax_max", "learned", "state_saturation"])
def test_sweep_rows_are_consistent(setup, measure):
    *_, scores = setup
    rows = exit_scores.sweep(scores, CONFIG, measure, THRESHOLDS)
    depths = [row["avg_exit_layer"] for row in rows]
    assert np.all(np.diff(depths) >= 0), depths  # monotone in the threshold
    for row in rows:
        assert sum(row["exit_distribution"]) == pytest.approx(1.0)
        assert row["layer_speedup"] == pytest.approx(CONFIG.n_layers / row["avg_exit_layer"])


def eager_exit_depths(confidence, thresholds) -> list[int]:
    """The first early exit whose confidence [L, T] reaches its threshold (never at
    1.0), else the last; one token at a time."""
    n_layers, tokens = confidence.shape
    depths = []
    for token in range(tokens):
        depth = n_layers - 1
        for layer, threshold in enumerate(thresholds):
            if threshold < 1.0 and confidence[layer, token] >= threshold:
                depth = layer
                break
        depths.append(depth)
    return depths


def test_per_exit_thresholds_match_an_eager_loop(setup):
    *_, scores = setup
    confidence = scores.confidence["softmax_max"]
    # Exit 1 at its 70% quantile, exit 2 at its 20%: all three depths occur.
    thresholds = np.array([np.quantile(confidence[0], 0.7), np.quantile(confidence[1], 0.2)])
    depths = exit_scores.exit_depths(scores, "softmax_max", thresholds)
    np.testing.assert_array_equal(depths, eager_exit_depths(confidence, thresholds))
    assert set(depths) == {0, 1, 2}
    never = np.array([thresholds[0], 1.0])  # 1.0: exit 2 is never taken
    depths = exit_scores.exit_depths(scores, "softmax_max", never)
    np.testing.assert_array_equal(depths, eager_exit_depths(confidence, never))
    assert set(depths) == {0, 2}
    single = exit_scores.exit_depths(scores, "softmax_max", 0.02)
    np.testing.assert_array_equal(single, eager_exit_depths(confidence, [0.02, 0.02]))
    with pytest.raises(ValueError, match="per-exit thresholds must have shape"):
        exit_scores.exit_depths(scores, "softmax_max", np.full(CONFIG.n_layers, 0.5))


def halting_loop_reference(model, params, stream, threshold, measure, exited_state):
    """(summed target NLL, ExitStats) of `early_exit_forward`'s logits over `stream`,
    scored by optax."""
    stats, windows = ExitStats.zeros(model.config.n_layers), {}
    for index in range(len(stream)):
        batch = stream.window(index)
        logits, info = early_exit_forward(
            model, params, batch.inputs, threshold, measure=measure, exited_state=exited_state
        )
        windows[batch.inputs.tobytes()] = logits
        stats = stats.update(info, batch.mask)
    nll = reference_nll_sums(lambda inputs: windows[inputs.tobytes()], stream)
    return float(nll), stats


@pytest.mark.parametrize("output", ["full", "adaptive"])
def test_sweep_equals_the_real_halting_loop_with_compute_policy(output):
    # The offline sweep is exact for exited_state="compute": compare with the loop.
    model, params, ids, stream, scores = model_and_split(output)
    config = model.config
    threshold = float(np.quantile(scores.confidence["softmax_max"][0], 0.5))
    row = exit_scores.sweep(scores, config, "softmax_max", [threshold])[0]
    nll, stats = halting_loop_reference(model, params, stream, threshold, "softmax_max", "compute")
    summary = stats.summary()
    assert summary["total_tokens"] == len(ids)
    assert summary["avg_exit_layer"] == pytest.approx(row["avg_exit_layer"])
    np.testing.assert_allclose(summary["exit_distribution"], row["exit_distribution"])
    assert np.exp(nll / len(ids)) == pytest.approx(row["ppl"], rel=TOLERANCE["float32"])
    assert 1.0 < row["avg_exit_layer"] < config.n_layers  # the threshold split the tokens


@pytest.mark.parametrize("output", ["full", "adaptive"])
def test_real_loop_row_scores_each_target_at_its_exit_head(output):
    # Given a threshold that splits the tokens between exits.
    model, params, ids, stream, scores = model_and_split(output)
    threshold = float(np.quantile(scores.confidence["softmax_max"][0], 0.5))
    # When the halting loop (policy "freeze") is evaluated from exit features...
    row = passes.real_loop_row(model, params, stream, threshold, "softmax_max", progress=False)
    # ...and from early_exit_forward's logits [B, N, V].
    nll, stats = halting_loop_reference(model, params, stream, threshold, "softmax_max", "freeze")
    # Then perplexity and exit statistics are the same,
    summary = stats.summary()
    assert row["total_tokens"] == summary["total_tokens"] == len(ids)
    assert row["ppl"] == pytest.approx(np.exp(nll / len(ids)), rel=TOLERANCE["float32"])
    np.testing.assert_array_equal(row["exit_distribution"], summary["exit_distribution"])
    # and the FLOP model counts the tail clusters the targets use (not every word).
    tail_use = tail_use_of(model.config, stream.targets, stream.mask)
    per_depth, full = exit_flops(model.config, "softmax_max", "freeze", tail_use)
    counts = np.asarray(stats.depth_counts, np.float64)
    expected = full * counts.sum() / np.dot(counts, per_depth)
    assert row["flops_speedup"] == pytest.approx(expected, rel=1e-6)
    assert 1.0 < row["avg_exit_layer"] < model.config.n_layers


@contextlib.contextmanager
def counted_traces():
    """Yields the list of the functions jax traces (for jit) inside the block."""
    traced = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_trace_duration":
            traced.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield traced
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


EVALUATIONS = {
    "exit_perplexities": lambda m, p, s: passes.exit_perplexities(m, p, s, progress=False),
    "collect_exit_scores": lambda m, p, s: passes.collect_exit_scores(m, p, s, progress=False),
    "real_loop_row": lambda m, p, s: passes.real_loop_row(
        m, p, s, 0.02, "softmax_max", progress=False
    ),
    "time_early_exit": lambda m, p, s: evaluate.time_early_exit(
        m, p, s, [0.02, 1.0], measure="softmax_max", windows=1, repeats=1
    ),
    "stream_evaluate": lambda m, p, s: passes.stream_evaluate(m, p, s, 0.02, progress=False),
}


JITTED = {  # the evaluation's own jitted functions
    "_window_nll_sums",
    "_window_scores",
    "_halting_loop_nll",
    "_plain_forward",
    "_stream_window",
    "early_exit_loop",
}


@pytest.mark.parametrize("name", EVALUATIONS)
def test_a_second_evaluation_with_the_same_model_traces_nothing(setup, name):
    # Given an evaluation run once on a split.
    model, params, ids, *_ = setup
    run = EVALUATIONS[name]
    with counted_traces() as first:
        run(model, params, make_lm_stream(ids[:300], 4, CONFIG.n_seq, eos_id=0))
    # When it runs again with an equal (new) model, other parameters and another
    # split of the same window shape.
    other_params = jax.tree.map(lambda p: p * 1.5, params)
    other_split = make_lm_stream(ids[300:650], 4, CONFIG.n_seq, eos_id=0)
    with counted_traces() as second:
        run(EarlyExitLM(CONFIG), other_params, other_split)
    # Then nothing is traced again: the jitted functions are built once, the model static.
    assert second == [], second
    # And the first run traced each of the evaluation's jitted functions at most once
    # per program: the timing runs the halting loop compacted and masked (a static
    # argument), so two programs.
    programs = {"early_exit_loop": 2} if name == "time_early_exit" else {}
    ours = collections.Counter(f for f in first if f in JITTED)
    assert all(count <= programs.get(f, 1) for f, count in ours.items()), first


def test_oracle_and_calibration(setup):
    *_, scores = setup
    oracle = exit_scores.oracle_depths(scores)
    # At the oracle depth the prediction equals the final one, and not before it.
    columns = np.arange(scores.tokens)
    assert np.all(scores.argmax[oracle, columns] == scores.argmax[-1])
    row = exit_scores.depth_row(scores, oracle, CONFIG, "learned")
    assert row["top1_agreement"] == 1.0
    # Calibration returns the lowest threshold within tolerance.
    threshold = exit_scores.calibrate(
        scores, CONFIG, "softmax_max", THRESHOLDS, max_ppl_change_pct=2.0
    )
    rows = {r["threshold"]: r for r in exit_scores.sweep(scores, CONFIG, "softmax_max", THRESHOLDS)}
    assert rows[threshold]["ppl_change_pct"] <= 2.0
    assert all(rows[t]["ppl_change_pct"] > 2.0 for t in THRESHOLDS if t < threshold)
    # A negative or non-finite tolerance is refused, not calibrated to full depth.
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="max_ppl_change_pct"):
            exit_scores.calibrate(scores, CONFIG, "softmax_max", THRESHOLDS, max_ppl_change_pct=bad)


def test_report_writes_tables_and_plots(setup, tmp_path):
    model, params, ids, stream, scores = setup
    options = evaluate.EvalConfig(
        thresholds=[0.02, 1.0], measures=["softmax_max"], timing_windows=2
    )
    results = evaluate.evaluate_checkpoint(model, params, stream, stream, options, progress=False)
    # The exit speedup is measured against the same loop at threshold 1.0, timed once.
    timing = results["timing"]["softmax_max"]
    assert timing["full_loop_ms"] == timing[1.0]["ms"] and timing[1.0]["exit_speedup"] == 1.0
    path = report.write_report(results, tmp_path)
    text = path.read_text()
    assert "| softmax_max | 1.00 |" in text and "oracle" in text
    assert "vs the loop at threshold 1.0" in text
    # Calibration says when even the grid's lowest threshold met the target.
    calibrated = results["calibration"]["softmax_max"]
    assert calibrated["whole_grid_meets_target"] == (calibrated["threshold"] == 0.02)
    assert ("even the lowest threshold" in text) == calibrated["whole_grid_meets_target"]
    # Learn-then-Test rows for both risks, with their violation rate over halvings.
    ltt = results["learn_then_test"]
    assert [row["risk"] for row in ltt] == ["consistency", "quality"]
    assert all(0 <= row["violation_rate"] <= 1 and row["splits"] == 200 for row in ltt)
    assert "Learn-then-Test" in text
    # The headline comes first and shows real halting: the halting loop's perplexity
    # change against the final exit read the same way (every window fresh), and the
    # FLOPs of halting, also in the sweep rows.
    assert text.index("## Headline") < text.index("## Threshold sweep")
    real = results["real_loop"][0]
    assert results["real_loop_reference_ppl"] == results["test_exit_ppl"][-1]
    assert real["ppl_change_pct"] == pytest.approx(
        100 * (real["ppl"] / results["test_exit_ppl"][-1] - 1)
    )
    headline = report.headline_table(results).splitlines()[2]
    assert f"| {real['ppl_change_pct']:+.1f}% |" in headline
    assert f"| {calibrated['test']['halting_flops_speedup']:.2f}x |" in headline
    sweep_rows = [
        line for line in report.sweep_table(results).splitlines() if "| softmax_max |" in line
    ]
    for line, row in zip(sweep_rows, results["sweep"], strict=True):
        assert line.endswith(f"| {row['halting_flops_speedup']:.2f}x |")
    for name in (
        "exit_distribution.png",
        "ppl_vs_layer_speedup.png",
        "ppl_vs_flops_speedup.png",
        "ppl_vs_measured_speedup.png",
    ):
        assert (tmp_path / name).stat().st_size > 1000


def test_thresholds_are_shown_with_the_digits_that_tell_them_apart():
    # Calibration grids mix 0.97, 0.975 and 0.98; results store float32 values.
    for threshold in (0.0, 0.5, 0.97, 0.975, 0.98, 0.995, 0.9995, 1.0):
        shown = report.format_threshold(float(np.float32(threshold)))
        assert float(shown) == threshold and len(shown.split(".")[1]) >= 2, shown


def test_training_summary_averages_each_window_of_logged_rows(tmp_path):
    # Given two runs' metrics rows logged every 25 steps.
    def row(step, nll):
        return {
            "step": step,
            "loss": nll,
            "exit_nll": [nll + 1.0, nll],
            "grad_norm": 1.0,
            "tokens_per_s": None if step == 25 else 100.0,  # None: a compile step
        }

    runs = {
        "a": [row(25, np.log(100.0)), row(50, np.log(400.0)), row(75, 0.0)],
        "b": [row(25, 0.0)],
    }
    # When summarised every 50 steps.
    lines = report.training_table(runs, every=50).splitlines()
    # Then each window averages its rows' NLL (a geometric mean of perplexities),
    # a partial last window is kept, and the curve is written.
    assert lines[2].startswith("| a | 1-50 |") and "| 544 / 200 |" in lines[2]
    assert lines[3].startswith("| a | 51-75 |") and lines[3].endswith("| 1 |")
    assert lines[4].startswith("| b | 1-25 |") and len(lines) == 5
    report.plot_training(runs, tmp_path / "training.png")
    assert (tmp_path / "training.png").stat().st_size > 1000


def test_training_summary_reads_null_metrics_as_nan(tmp_path):
    # Given metrics rows as metrics.jsonl stores them: an exit the run does not score
    # (here the first, with "final" weighting) is null, and so is one grad norm.
    rows = [
        {"step": 10, "loss": 1.0, "exit_nll": [None, 1.0], "grad_norm": 2.0},
        {"step": 20, "loss": 3.0, "exit_nll": [None, 3.0], "grad_norm": None},
        {"step": 30, "loss": 2.0, "exit_nll": [None, None], "grad_norm": 1.0},
    ]
    # When summarised and plotted.
    lines = report.training_table({"run": rows}, every=20).splitlines()
    report.plot_training({"run": rows}, tmp_path / "training.png")
    # Then null is NaN: the unscored exit shows "-", the scored one its perplexity,
    # a window with a null grad norm averages to nan, and the plot is written.
    assert lines[2] == f"| run | 1-20 | 2.000 | - / {np.exp(2.0):.0f} | nan | 2 |"
    assert lines[3] == "| run | 21-30 | 2.000 | - / - | 1.00 | 1 |"
    assert (tmp_path / "training.png").stat().st_size > 1000


def test_comparison_table_counts_parameters_and_training_minutes():
    # Given a run's rows: a compile step, then 50 and 100 steps at 1,000 and 500
    # tokens/s with 100 tokens a step.
    from ee_jax.config import TrainConfig
    from ee_jax.train_state import parameter_count

    config = TrainConfig(model=tiny(), batch_size=4).replace(n_seq=25)
    rows = [
        {"step": 1, "tokens_per_s": None, "compile_s": 10.0},
        {"step": 51, "tokens_per_s": 1000.0, "compile_s": None},
        {"step": 151, "tokens_per_s": 500.0, "compile_s": None},
    ]
    assert report.training_seconds(rows, 100) == 10.0 + 5.0 + 20.0
    # The parameter count is that of the initialised model.
    variables = EarlyExitLM(config.model).init(jax.random.key(0), np.zeros((1, 25), np.int32))
    count = parameter_count(config.model)
    assert count == sum(x.size for x in jax.tree.leaves(variables))
    run = {"config": config, "params": count, "rows": rows, "valid": [9.0, 8.0], "test": None}
    line = report.comparison_table({"r": run}).splitlines()[2]
    assert line == f"| r | bk | {count:,} | 151 | 750 | 0.6 | 8.0 | - |"


def no_computation(*args, **kwargs):
    raise AssertionError("the model ran before the stream was checked")


@pytest.mark.parametrize("position, bad_id", [(500, CONFIG.vocab_size), (500, -1), (-1, 97)])
@pytest.mark.parametrize(
    "run",
    [
        lambda m, p, s: passes.exit_perplexities(m, p, s, progress=False),
        lambda m, p, s: passes.collect_exit_scores(m, p, s, progress=False),
        lambda m, p, s: evaluate.time_early_exit(m, p, s, [0.5], measure="softmax_max"),
        lambda m, p, s: passes.real_loop_row(m, p, s, 0.5, "softmax_max", progress=False),
        lambda m, p, s: evaluate.evaluate_checkpoint(
            m, p, s, s, evaluate.EvalConfig(thresholds=[0.5], measures=["softmax_max"])
        ),
    ],
    ids=["exit_perplexities", "collect_exit_scores", "time", "real_loop_row", "checkpoint"],
)
def test_streams_with_bad_ids_raise_before_the_model_runs(
    setup, run, position, bad_id, monkeypatch
):
    # Given a stream with one id outside [0, V) (the last id is only ever a target).
    model, params, ids, *_ = setup
    ids = ids.copy()
    ids[position] = bad_id
    stream = make_lm_stream(ids, 4, CONFIG.n_seq, eos_id=0)
    monkeypatch.setattr(model, "apply", no_computation, raising=False)
    # Then every evaluation taking a stream raises the checker's error up front.
    with pytest.raises(ValueError, match=BAD_IDS):
        run(model, params, stream)


def small_evaluation(model, params, stream, **options):
    """`evaluate_checkpoint` on one stream (as valid and test), two thresholds, the
    softmax_max and learned measures, one timing window."""
    options = evaluate.EvalConfig(
        thresholds=[0.02, 1.0], measures=["softmax_max", "learned"], timing_windows=1, **options
    )
    return evaluate.evaluate_checkpoint(model, params, stream, stream, options, progress=False)


def test_the_whole_evaluation_runs_for_an_attention_model():
    # Sweeps, calibration, the real halting loop and its timing need no decoding.
    model, params, ids, *_ = model_and_split("attention")
    stream = make_lm_stream(ids[:300], 4, CONFIG.n_seq, eos_id=0)
    results = small_evaluation(model, params, stream)
    assert set(results["calibration"]) == set(results["timing"]) == {"softmax_max", "learned"}
    for row in results["real_loop"]:
        assert row["total_tokens"] == 300


def test_untrained_exit_classifiers_are_skipped_and_said_so(setup, capsys):
    # Given a run trained with "final" weighting: only the last exit is scored, so the
    # learned exit classifiers never trained (losses.lm_loss).
    model, params, ids, _, _ = setup
    stream = make_lm_stream(ids[:200], 4, CONFIG.n_seq, eos_id=0)
    assert exit_scores.untrained_measures("uniform", CONFIG.n_layers) == {}
    assert exit_scores.untrained_measures("linear", CONFIG.n_layers) == {}
    assert "learned" in exit_scores.untrained_measures("final", CONFIG.n_layers)
    # When the checkpoint is evaluated with the learned measure requested.
    results = small_evaluation(model, params, stream, exit_weighting="final")
    # Then it is not evaluated, a note says why, and the results record it.
    assert "note: not evaluating the 'learned' measure" in capsys.readouterr().out
    assert results["measures"] == ["softmax_max"] and results["exit_weighting"] == "final"
    assert "never trained" in results["skipped_measures"]["learned"]
    assert {row["measure"] for row in results["sweep"]} == {"softmax_max"}
    assert set(results["calibration"]) == set(results["timing"]) == {"softmax_max"}
    assert [row["measure"] for row in results["real_loop"]] == ["softmax_max"]
    # And asking for the learned measure alone is refused before any computation.
    with pytest.raises(ValueError, match="no confidence measure left"):
        exit_scores.evaluated_measures(["learned"], "final", CONFIG.n_layers)


def no_work(*args, **kwargs):
    raise AssertionError("a split was read or timed before the options were checked")


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(timing_windows=0), "timing_windows must be an integer >= 1, got 0"),
        (dict(timing_windows=2.5), "timing_windows must be an integer >= 1, got 2.5"),
        (dict(max_ppl_change_pct=-1.0), "max_ppl_change_pct must be finite and >= 0"),
        (dict(thresholds=[]), "thresholds must hold at least one threshold"),
        (dict(measures=[]), "measures must name at least one confidence measure"),
        (dict(ltt_delta=1.0), r"epsilon and delta must be in \(0, 1\)"),
        (dict(ltt_risks=[("coverage", 0.1)]), "risk must be one of"),
    ],
)
def test_bad_evaluation_options_raise_one_line_before_any_work(
    setup, options, message, monkeypatch
):
    # Given an evaluation whose every pass over a split would fail the test.
    model, params, _, stream, _ = setup
    monkeypatch.setattr(passes, "map_windows", no_work)
    monkeypatch.setattr(evaluate, "interleaved", no_work)
    arguments = dict(thresholds=[0.5, 1.0], measures=["softmax_max"])
    # When an option is out of range, one one-line ValueError says which, at once:
    # making the options, or (carry for a model that cannot) evaluating with them.
    with pytest.raises(ValueError, match=message) as error:
        options = evaluate.EvalConfig(**{**arguments, **options})
        evaluate.evaluate_checkpoint(model, params, stream, stream, options, progress=False)
    assert "\n" not in str(error.value)


def test_bad_counts_and_thresholds_of_the_parts_are_refused(setup, monkeypatch):
    model, params, _, stream, scores = setup
    monkeypatch.setattr(evaluate, "interleaved", no_work)
    for options, name in [(dict(windows=0), "windows"), (dict(repeats=0), "repeats")]:
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1, got 0"):
            evaluate.time_early_exit(model, params, stream, [0.5], measure="softmax_max", **options)
    # A threshold outside [0, 1] (or nan) neither always nor never exits: it is refused.
    for bad in (1.5, -0.1, float("nan"), [0.5, 2.0]):
        with pytest.raises(ValueError, match=r"thresholds must be in \[0, 1\]"):
            exit_scores.exit_depths(scores, "softmax_max", bad)
    with pytest.raises(ValueError, match="splits must be an integer >= 1, got 0"):
        calibrate_lib.learn_then_test_rows(
            scores, scores, CONFIG, ["softmax_max"], [0.5], calibrate_lib.LTT_RISKS, 0.1, splits=0
        )


def test_results_say_partial_only_when_a_split_was_cut():
    # Given results that scored every token of test, or only its first ones.
    full = {"tokens": {"test": 600}, "split_tokens": {"test": 600}}
    cut = {"tokens": {"test": 200, "valid": 200}, "split_tokens": {"test": 600, "valid": 900}}
    # Then only the cut ones are called partial, with the counts of each split.
    assert report.partial_note(full) == report.partial_note({}) == ""
    assert report.partial_note(cut) == (
        "Partial evaluation: the first 200 of 600 test tokens "
        "and the first 200 of 900 valid tokens."
    )
