"""experiments/accelerator_check.py: the dry run fills every section with numbers;
one section's failure is recorded without stopping the others; the training plan
fits the time left."""

import datetime
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "accelerator_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("accelerator_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """(exit status, report) of one dry run with no data folder (synthetic corpus)."""
    out = tmp_path_factory.mktemp("accelerator_check") / "dry.json"
    env = {k: v for k, v in os.environ.items() if k != "EE_JAX_DATA_DIR"}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry_run", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.exists(), result.stdout + result.stderr
    return result.returncode, json.loads(out.read_text()), result.stdout


def test_dry_run_records_every_section_without_errors(dry_run):
    # Given a dry run on the CPU, when it finishes, then every section is "ok".
    status, report, stdout = dry_run
    sections = report["sections"]
    assert list(sections) == ["data", "bk_core", "model", "generate", "train"], stdout
    errors = {name: s.get("error") for name, s in sections.items() if s["status"] != "ok"}
    assert not errors, errors
    assert status == 0
    assert report["dry_run"] is True
    assert report["device"]["platform"] == "cpu"
    assert report["device"]["bk_method_auto"] == "sequential"
    assert report["versions"]["jax"]
    datetime.datetime.fromisoformat(report["date"])
    assert "| B | N | form | associative ms |" in stdout  # the tables printed at the end
    assert all(positive(s["seconds"]) or s["seconds"] == 0 for s in sections.values())


def test_dry_run_bk_core_times_both_methods_and_they_agree(dry_run):
    result = dry_run[1]["sections"]["bk_core"]["result"]
    # Every (batch shape, form) of the dry run's one N: 2 x 2 rows, none skipped.
    assert len(result["rows"]) == 4 and result["skipped"] == []
    assert {tuple(r["batch"]) for r in result["rows"]} == {(2,), (2, 3)}
    assert {r["form"] for r in result["rows"]} == {"causal", "bidirectional"}
    for row in result["rows"]:
        for method in ("associative", "sequential"):
            assert positive(row[f"{method}_ms"]) and positive(row[f"{method}_compile_s"])
            assert row[f"{method}_repeats"] >= 2
        assert row["finite"] and row["max_rel_diff"] < 1e-4  # float32 twins agree
        ratio = row["sequential_ms"] / row["associative_ms"]
        assert math.isclose(row["sequential_over_associative"], ratio)


def test_dry_run_model_generate_and_train_have_numbers(dry_run):
    sections = dry_run[1]["sections"]
    rows = sections["model"]["result"]["rows"]
    # On the CPU "auto" is sequential, so the gpu stand-in with sequential is the cpu row.
    assert rows["cpu"] == {"same_as": "gpu (bk_method sequential)"}
    timed = [r for r in rows.values() if "same_as" not in r]
    assert {r["bk_method"] for r in timed} == {"sequential", "associative"}
    for row in timed:
        for key in ("forward_ms", "forward_tokens_per_s", "train_step_ms", "train_tokens_per_s"):
            assert positive(row[key]), (key, row)
        assert row["forward_tokens_per_s"] == pytest.approx(
            row["batch_size"] * row["n_seq"] / (row["forward_ms"] / 1e3)
        )
    generated = sections["generate"]["result"]["rows"]
    assert {(r["batch_size"], r["threshold"]) for r in generated} == {
        (b, t) for b in (1, 2) for t in (1.0, 0.0)
    }
    assert all(positive(r["tokens_per_s"]) and r["steps"] == 3 for r in generated)
    trained = sections["train"]["result"]
    assert trained["steps"] == 3 and [r["step"] for r in trained["metrics"]] == [1, 2, 3]
    valid = trained["valid"]
    assert valid["tokens"] == 512  # every token of the synthetic valid split, once
    assert len(valid["exit_ppl"]) == 3 and all(1 < p < 1e4 for p in valid["exit_ppl"])


def test_a_failing_section_is_recorded_and_the_next_runs(tmp_path):
    # Given a report and a section that raises, when both sections run,
    # then the error and its traceback are in the JSON and the next section's result too.
    script = load_script()
    out = tmp_path / "report.json"
    report = {"sections": {}}

    def broken():
        raise ValueError("no such thing")

    script.run_section("broken", broken, report, out)
    script.run_section("fine", lambda: {"answer": 42}, report, out)
    written = json.loads(out.read_text())["sections"]
    assert written["broken"]["status"] == "error"
    assert written["broken"]["error"] == "ValueError: no such thing"
    assert "raise ValueError" in written["broken"]["traceback"]
    assert written["fine"] == {**written["fine"], "status": "ok", "result": {"answer": 42}}


def test_training_plan_fills_the_time_left_and_never_passes_the_schedule():
    script = load_script()
    config = script.train_preset("tiny", 97)  # B = 4, N = 16, 200 steps
    tokens_per_step = config.batch_size * config.model.n_seq
    rows = [{"step": 1, "tokens_per_s": None}, {"step": 20, "tokens_per_s": 10 * tokens_per_step}]
    # 10 steps/s for 5 s, at the safety fraction, after a probe of 20 steps.
    assert script.planned_end(config, 20, rows, 5.0) == 20 + int(script.STEP_RATE_SAFETY * 50)
    assert script.planned_end(config, 20, rows, 1e6) == config.steps
    assert script.planned_end(config, 20, rows, -1.0) == 20
    assert script.planned_end(config, 20, rows[:1], 100.0) == 20  # no rate measured
