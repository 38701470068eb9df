"""Early-exit evaluation: internal consistency on a small model and corpus."""

import jax
import numpy as np
import pytest

from ee_jax import evaluate, report
from ee_jax.config import tiny
from ee_jax.data import make_lm_stream
from ee_jax.early_exit import ExitStats, early_exit_forward
from ee_jax.model import EarlyExitLM

CONFIG = tiny()
BAD_IDS = r"token ids must be in \[0, vocab_size=97\)"
THRESHOLDS = [0.0, 0.012, 0.02, 0.03, 0.05, 1.0]


@pytest.fixture(scope="module")
def setup():
    # A random model whose exits disagree, and a 1,000-token "split" that does not
    # fill its last window (so padding is exercised).
    model = EarlyExitLM(CONFIG)
    params = model.init(jax.random.key(0), np.zeros((1, CONFIG.n_seq), np.int32))
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, 1000)
    stream = make_lm_stream(ids, 4, CONFIG.n_seq, eos_id=0)
    scores = evaluate.collect_exit_scores(model, params, stream, progress=False)
    return model, params, ids, stream, scores


def test_every_token_is_scored_once_and_full_depth_equals_the_plain_forward(setup):
    model, params, ids, stream, scores = setup
    assert scores.tokens == len(ids)
    full = evaluate.sweep(scores, CONFIG, "softmax_max", [1.0])[0]
    plain = evaluate.exit_perplexities(model, params, stream, progress=False)
    assert plain["tokens"] == len(ids)
    assert full["ppl"] == pytest.approx(plain["exit_ppl"][-1], rel=1e-5)
    assert full["layer_speedup"] == 1.0 and full["avg_exit_layer"] == CONFIG.n_layers
    assert full["ppl_change_pct"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("measure", ["softmax_max", "learned", "state_saturation"])
def test_sweep_rows_are_consistent(setup, measure):
    *_, scores = setup
    rows = evaluate.sweep(scores, CONFIG, measure, THRESHOLDS)
    depths = [row["avg_exit_layer"] for row in rows]
    assert np.all(np.diff(depths) >= 0), depths  # monotone in the threshold
    for row in rows:
        assert sum(row["exit_distribution"]) == pytest.approx(1.0)
        assert row["layer_speedup"] == pytest.approx(CONFIG.n_layers / row["avg_exit_layer"])


def test_sweep_equals_the_real_halting_loop_with_compute_policy(setup):
    # The offline sweep is exact for exited_state="compute": compare with the loop.
    model, params, ids, stream, scores = setup
    threshold = float(np.quantile(scores.confidence["softmax_max"][0], 0.5))
    row = evaluate.sweep(scores, CONFIG, "softmax_max", [threshold])[0]
    stats, nll = ExitStats.zeros(CONFIG.n_layers), 0.0
    for index in range(len(stream)):
        batch = stream.window(index)
        logits, info = early_exit_forward(
            model, params, batch.inputs, threshold, exited_state="compute"
        )
        log_probs = jax.nn.log_softmax(logits)
        target = np.take_along_axis(np.asarray(log_probs), batch.targets[..., None], -1)[..., 0]
        nll -= float(np.sum(target * batch.mask))
        stats = stats.update(info, batch.mask)
    summary = stats.summary()
    assert summary["total_tokens"] == len(ids)
    assert summary["avg_exit_layer"] == pytest.approx(row["avg_exit_layer"])
    np.testing.assert_allclose(summary["exit_distribution"], row["exit_distribution"])
    assert np.exp(nll / len(ids)) == pytest.approx(row["ppl"], rel=1e-5)
    assert 1.0 < row["avg_exit_layer"] < CONFIG.n_layers  # the threshold split the tokens


def test_oracle_and_calibration(setup):
    *_, scores = setup
    oracle = evaluate.oracle_depths(scores)
    # At the oracle depth the prediction equals the final one, and not before it.
    columns = np.arange(scores.tokens)
    assert np.all(scores.argmax[oracle, columns] == scores.argmax[-1])
    row = evaluate.depth_row(scores, oracle, CONFIG, "learned")
    assert row["top1_agreement"] == 1.0
    # Calibration returns the lowest threshold within tolerance.
    threshold = evaluate.calibrate(
        scores, CONFIG, "softmax_max", THRESHOLDS, max_ppl_change_pct=2.0
    )
    rows = {r["threshold"]: r for r in evaluate.sweep(scores, CONFIG, "softmax_max", THRESHOLDS)}
    assert rows[threshold]["ppl_change_pct"] <= 2.0
    assert all(rows[t]["ppl_change_pct"] > 2.0 for t in THRESHOLDS if t < threshold)


def test_report_writes_tables_and_plots(setup, tmp_path):
    model, params, ids, stream, scores = setup
    results = evaluate.evaluate_checkpoint(
        model,
        params,
        stream,
        stream,
        thresholds=[0.02, 1.0],
        measures=["softmax_max"],
        timing_windows=2,
        progress=False,
    )
    path = report.write_report(results, tmp_path)
    text = path.read_text()
    assert "| softmax_max | 1.00 |" in text and "oracle" in text
    for name in (
        "exit_distribution.png",
        "ppl_vs_layer_speedup.png",
        "ppl_vs_measured_speedup.png",
    ):
        assert (tmp_path / name).stat().st_size > 1000


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


def no_computation(*args, **kwargs):
    raise AssertionError("the model ran before the stream was checked")


@pytest.mark.parametrize("position, bad_id", [(500, CONFIG.vocab_size), (500, -1), (-1, 97)])
@pytest.mark.parametrize(
    "run",
    [
        lambda m, p, s: evaluate.exit_perplexities(m, p, s, progress=False),
        lambda m, p, s: evaluate.collect_exit_scores(m, p, s, progress=False),
        lambda m, p, s: evaluate.time_early_exit(m, p, s, [0.5], measure="softmax_max"),
        lambda m, p, s: evaluate.real_loop_row(m, p, s, 0.5, "softmax_max", progress=False),
        lambda m, p, s: evaluate.evaluate_checkpoint(
            m, p, s, s, thresholds=[0.5], measures=["softmax_max"], progress=False
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


def test_untrained_exit_classifiers_are_skipped_and_said_so(setup, capsys):
    # Given a run trained with "final" weighting: only the last exit is scored, so the
    # learned exit classifiers never trained (losses.lm_loss).
    model, params, ids, _, _ = setup
    stream = make_lm_stream(ids[:200], 4, CONFIG.n_seq, eos_id=0)
    assert evaluate.untrained_measures("uniform", CONFIG.n_layers) == {}
    assert evaluate.untrained_measures("linear", CONFIG.n_layers) == {}
    assert "learned" in evaluate.untrained_measures("final", CONFIG.n_layers)
    # When the checkpoint is evaluated with the learned measure requested.
    results = evaluate.evaluate_checkpoint(
        model,
        params,
        stream,
        stream,
        thresholds=[0.02, 1.0],
        measures=["softmax_max", "learned"],
        exit_weighting="final",
        timing_windows=1,
        progress=False,
    )
    # Then it is not evaluated, a note says why, and the results record it.
    assert "note: not evaluating the 'learned' measure" in capsys.readouterr().out
    assert results["measures"] == ["softmax_max"] and results["exit_weighting"] == "final"
    assert "never trained" in results["skipped_measures"]["learned"]
    assert {row["measure"] for row in results["sweep"]} == {"softmax_max"}
    assert set(results["calibration"]) == set(results["timing"]) == {"softmax_max"}
    assert [row["measure"] for row in results["real_loop"]] == ["softmax_max"]
    # And asking for the learned measure alone is refused before any computation.
    with pytest.raises(ValueError, match="no confidence measure left"):
        evaluate.evaluated_measures(["learned"], "final", CONFIG.n_layers)
