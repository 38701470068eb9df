"""experiments/publish_run.py on a tiny fake `make run` work directory."""

import importlib.util
import json
import pathlib

import pytest

from ee_jax.config import train_preset

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def publish_run():
    path = REPO / "experiments" / "publish_run.py"
    spec = importlib.util.spec_from_file_location("publish_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(workdir: pathlib.Path, step: int = 4) -> pathlib.Path:
    """The files `make run` leaves in its work directory, with made-up numbers."""
    config = train_preset("tiny", 50).to_dict()
    (workdir / "eval").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(config))
    row = {"exit_nll": [4.1, 4.0], "exit_ppl": [60.0, 55.0], "grad_norm": 1.0}
    rows = [
        {"step": s, "loss": 4.0 - s / 10, **row, "tokens_per_s": 100.0, "compile_s": 1.0}
        for s in range(1, step + 1)
    ]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for split in ("valid", "test"):
        exits = {"exit_ppl": [60.0, 55.0], "step": step}
        (workdir / f"{split}_exit_ppl.json").write_text(json.dumps(exits))
    command = "experiments/eval_early_exit.py --workdir runs/cpu"
    (workdir / "eval" / "results.json").write_text(json.dumps({"step": step, "command": command}))
    (workdir / "eval" / "results.md").write_text("## Threshold sweep\n")
    (workdir / "eval" / "exit_distribution.png").write_bytes(b"png")
    stream = {"step": step, "command": "experiments/stream_early_exit.py --workdir runs/cpu"}
    (workdir / "eval" / "stream_results.json").write_text(json.dumps(stream))
    return workdir


def test_publishes_every_file_with_a_header_and_keeps_the_readme_text(
    publish_run, tmp_path, capsys
):
    # Given a finished run and a results folder whose README has text below a header.
    run, out = fake_run(tmp_path / "cpu"), tmp_path / "results"
    argv = ["--workdir", str(run), "--out", str(out)]
    assert publish_run.main(argv) == 0
    (out / "README.md").write_text((out / "README.md").read_text() + "\nThe table.\n")
    # When it is published again.
    assert publish_run.main(argv) == 0
    # Then every published file is there, and README.md has one header, then the text.
    names = {path.name for path in out.iterdir()}
    assert {
        "results.json",
        "results.md",
        "exit_distribution.png",
        "stream_results.json",
        "config.json",
        "metrics.jsonl",
        "valid_exit_ppl.json",
        "test_exit_ppl.json",
        "comparison.md",
        "training.md",
        "training.png",
        "README.md",
    } <= names
    readme = (out / "README.md").read_text()
    assert readme.startswith("# `make run` output: cpu, step 4, evaluated ")
    assert readme.count(publish_run.MARKER) == 1
    assert readme.endswith("The table.\n")
    assert "python experiments/eval_early_exit.py --workdir runs/cpu" in readme


@pytest.mark.parametrize("missing", ["eval/stream_results.json", "test_exit_ppl.json"])
def test_a_missing_file_is_one_error_line_and_nothing_is_written(
    publish_run, tmp_path, capsys, missing
):
    run, out = fake_run(tmp_path / "cpu"), tmp_path / "results"
    (run / missing).unlink()
    assert publish_run.main(["--workdir", str(run), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1
    assert missing.split("/")[-1].split(".")[0].rstrip("*") in error
    assert not out.exists()


def test_files_of_another_step_are_refused(publish_run, tmp_path, capsys):
    run, out = fake_run(tmp_path / "cpu"), tmp_path / "results"
    (run / "test_exit_ppl.json").write_text(json.dumps({"exit_ppl": [1.0], "step": 3}))
    assert publish_run.main(["--workdir", str(run), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "test_exit_ppl.json is step 3" in error and error.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("inside", ["", "eval", "published"])
def test_out_in_the_run_folder_is_refused_and_nothing_changes(
    publish_run, tmp_path, capsys, inside
):
    run = fake_run(tmp_path / "cpu")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert publish_run.main(["--workdir", str(run), "--out", str(run / inside)]) == 2
    error = capsys.readouterr().err
    assert "inside the run folder" in error and error.count("\n") == 1
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_the_users_files_in_out_are_never_deleted_or_overwritten(publish_run, tmp_path, capsys):
    run, out = fake_run(tmp_path / "cpu"), tmp_path / "results"
    out.mkdir()
    (out / "my_plot.png").write_bytes(b"mine")
    argv = ["--workdir", str(run), "--out", str(out)]
    assert publish_run.main(argv) == 0
    assert (
        out / "my_plot.png"
    ).read_bytes() == b"mine"  # a pattern it writes (*.png), not its file
    # A file of a name it would write, which it did not write, stops it before any write.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.md").write_text("my notes")
    assert publish_run.main(["--workdir", str(run), "--out", str(mine)]) == 2
    error = capsys.readouterr().err
    assert "results.md exists and was not written by publish_run.py" in error
    assert [p.name for p in mine.iterdir()] == ["results.md"]
    assert (mine / "results.md").read_text() == "my notes"


def test_a_republication_removes_only_its_own_stale_files(publish_run, tmp_path):
    run, out = fake_run(tmp_path / "cpu"), tmp_path / "results"
    (run / "eval" / "extra.png").write_bytes(b"png")
    argv = ["--workdir", str(run), "--out", str(out)]
    assert publish_run.main(argv) == 0
    (out / "mine.png").write_bytes(b"mine")
    (run / "eval" / "extra.png").unlink()
    assert publish_run.main(argv) == 0
    assert not (out / "extra.png").exists() and (out / "mine.png").read_bytes() == b"mine"
    written = (out / publish_run.MANIFEST).read_text().split()
    assert "extra.png" not in written and "exit_distribution.png" in written


@pytest.mark.parametrize("evaluated", [32768, 245569])
def test_the_header_says_when_the_run_was_evaluated_on_part_of_a_split(
    publish_run, tmp_path, evaluated
):
    # Given a run whose evaluations scored the first `evaluated` test tokens.
    run, out = fake_run(tmp_path / "cpu"), tmp_path / "results"
    for name in ("results.json", "stream_results.json"):
        path = run / "eval" / name
        counts = {"tokens": {"test": evaluated}, "split_tokens": {"test": 245569}}
        path.write_text(json.dumps({**json.loads(path.read_text()), **counts}))
    # When it is published.
    assert publish_run.main(["--workdir", str(run), "--out", str(out)]) == 0
    # Then the header says a partial evaluation is one, for each file, and a full one
    # is not called partial.
    header = (out / "README.md").read_text().split(publish_run.MARKER)[0]
    note = "Partial evaluation: the first 32,768 of 245,569 test tokens."
    if evaluated < 245569:
        assert f"**results.md**: {note}" in header
        assert f"**stream_results.json**: {note}" in header
        assert header.index(note) < header.index("The run:")
    else:
        assert "partial" not in header.lower()
