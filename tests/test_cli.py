"""Tests for the experiment scripts' command lines: every command the README, the
docs, the notebooks, the Makefile and the scripts' own docstrings show parses;
every numeric flag is refused by the parser, before any work, when out of range;
every flag a script's --help mentions exists."""

import ast
import functools
import importlib.util
import json
import pathlib
import re
import shlex
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted(path.stem for path in (REPO / "experiments").glob("*.py"))
COMMAND = re.compile(r"python experiments/(\w+)\.py\b")
FENCED = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
INLINE = re.compile(r"`([^`]+)`")
# What `make run` passes for its variables (DATA_FLAG is empty without a data folder).
MAKE_VARIABLES = {"$(WORKDIR)": "runs/cpu", "$(DATA_FLAG)": "--data_dir data", "$(VENV)": ".venv"}


@functools.cache
def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(name: str, argv: list[str], monkeypatch):
    """The script's own argument parsing (`parse_args`) of `argv`; it runs nothing."""
    monkeypatch.setattr(sys, "argv", [f"experiments/{name}.py", *argv])
    return load_script(name).parse_args()


def markdown_code(text: str) -> list[str]:
    """Fenced blocks, then inline code spans (a span may wrap onto the next line)."""
    inline = [" ".join(span.split()) for span in INLINE.findall(FENCED.sub("", text))]
    return FENCED.findall(text) + inline


def documents():
    """(file, text holding commands) of every place a command is shown."""
    for path in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        for code in markdown_code(path.read_text()):
            yield path, code
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            text = "".join(cell["source"])
            for code in markdown_code(text) if cell["cell_type"] == "markdown" else [text]:
                yield path, code
    for name in SCRIPTS:
        path = REPO / "experiments" / f"{name}.py"
        yield path, ast.get_docstring(ast.parse(path.read_text())) or ""
    makefile = (REPO / "Makefile").read_text()
    for variable, value in MAKE_VARIABLES.items():
        makefile = makefile.replace(variable, value)
    yield REPO / "Makefile", makefile


def commands(code: str):
    """(script, argv) of each `python experiments/<script>.py ...` in `code`: lines
    continued with a backslash are joined, the command ends at a pipe, redirection,
    `&&`, `;` or comment, and usage brackets (`[--seed 0]`) are dropped."""
    for line in re.sub(r"\\\n\s*", " ", code).splitlines():
        for match in COMMAND.finditer(line):
            rest = re.split(r"\s(?:\||&&|;|\d?>)", line[match.end() :])[0]
            yield match.group(1), shlex.split(rest.replace("[", " ").replace("]", " "), True)


DOCUMENTED = [
    pytest.param(script, argv, id=f"{path.relative_to(REPO)}:{script}:{i}")
    for path, code in documents()
    for i, (script, argv) in enumerate(commands(code))
]


def test_the_documents_show_commands_of_every_kind():
    # The extraction finds the commands (a broken pattern would pass vacuously).
    shown = {script for script, _ in (param.values for param in DOCUMENTED)}
    assert {"train_wikitext2", "eval_early_exit", "stream_early_exit", "bench_model"} <= shown
    assert len(DOCUMENTED) >= 30, len(DOCUMENTED)


def test_every_documented_script_path_exists():
    # Paths such as experiments/studies/probe.sh, which the parser tests do not run.
    named = {
        (path.relative_to(REPO), match)
        for path, code in documents()
        for match in re.findall(r"\bexperiments/[\w/]+\.(?:py|sh)\b", code)
    }
    missing = sorted(f"{path}: {name}" for path, name in named if not (REPO / name).is_file())
    assert not missing, missing


@pytest.mark.parametrize("script, argv", DOCUMENTED)
def test_every_documented_command_parses(script, argv, monkeypatch, capsys):
    assert script in SCRIPTS, f"no experiments/{script}.py"
    try:
        args = parse(script, argv, monkeypatch)
    except SystemExit as exit_:
        pytest.fail(f"{shlex.join(argv)}: exit {exit_.code}: {capsys.readouterr().err}")
    check_flags = getattr(load_script(script), "check_flags", None)
    if check_flags is not None:  # flags the configs refuse (train_wikitext2)
        check_flags(args)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_the_help_mentions_exists(script, monkeypatch, capsys):
    # Given the script's --help (its flags, their help, and the docstring).
    with pytest.raises(SystemExit) as exit_:
        parse(script, ["--help"], monkeypatch)
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    # Then every --flag it mentions is one of the script's flags.
    options = text.split("\n\n", 1)[1]  # after the usage lines
    defined = set(re.findall(r"^ {2}(?:-\w, )?(--\w+)", options, re.MULTILINE))
    mentioned = set(re.findall(r"(?<![\w-])--\w+", text))
    assert mentioned <= defined, f"not flags of {script}: {sorted(mentioned - defined)}"


WORKDIR = ["--workdir", "w"]
BAD_FLAGS = [
    ("eval_early_exit", [*WORKDIR, "--timing_windows", "0"], "--timing_windows"),
    ("eval_early_exit", [*WORKDIR, "--batch_size", "-1"], "--batch_size"),
    ("eval_early_exit", [*WORKDIR, "--step", "0"], "--step"),
    ("eval_early_exit", [*WORKDIR, "--thresholds", "0.5", "1.5"], "--thresholds"),
    ("eval_early_exit", [*WORKDIR, "--max_ppl_change_pct", "nan"], "--max_ppl_change_pct"),
    ("eval_early_exit", [*WORKDIR, "--max_ppl_change_pct", "-1"], "--max_ppl_change_pct"),
    ("stream_early_exit", [*WORKDIR, "--batch_size", "1", "0"], "--batch_size"),
    ("stream_early_exit", [*WORKDIR, "--repeats", "0"], "--repeats"),
    ("stream_early_exit", [*WORKDIR, "--max_tokens", "0"], "--max_tokens"),
    ("stream_early_exit", [*WORKDIR, "--threshold", "inf"], "--threshold"),
    ("summarize_training", ["run", "--out", "o", "--every", "0"], "--every"),
    ("bench_bk_core", ["--sizes", "128", "0"], "--sizes"),
    ("bench_bk_core", ["--batch_size", "x"], "--batch_size"),
    ("bench_bk_core", ["--batch", "8"], "--batch"),  # a stale prefix of --batch_size
    ("bench_bk_core", ["--seed", "-1"], "--seed"),
    ("bench_model", ["--n_layers", "0"], "--n_layers"),
    ("bench_model", ["--thresholds", "-0.1"], "--thresholds"),
    ("bench_model", ["--budget", "-2"], "--budget"),
    ("bench_model", ["--min_repeats", "0"], "--min_repeats"),
    ("bench_model", ["--layers", "8"], "--layers"),
    ("train_wikitext2", [*WORKDIR, "--resume_step", "0"], "--resume_step"),
    ("train_wikitext2", [*WORKDIR, "--learning_rate", "nan"], "--learning_rate"),
    ("train_wikitext2", [*WORKDIR, "--use_bk", "false"], "--use_bk"),
    ("accelerator_check", ["--out", "o", "--gen_steps", "0"], "--gen_steps"),
    ("accelerator_check", ["--out", "o", "--time_limit_s", "0"], "--time_limit_s"),
]


@pytest.mark.parametrize(
    "script, argv, flag", BAD_FLAGS, ids=[f"{s}:{' '.join(a[-2:])}" for s, a, _ in BAD_FLAGS]
)
def test_bad_numeric_flags_are_refused_by_the_parser(script, argv, flag, monkeypatch, capsys):
    # When the script parses a flag with a bad value, the parser itself stops it
    # (exit status 2, naming the flag), before the script loads or compiles anything.
    with pytest.raises(SystemExit) as exit_:
        parse(script, argv, monkeypatch)
    assert exit_.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--d_model", "0"], "d_model must be a positive integer, got 0"),
        (["--dropout", "1.5"], r"dropout must be in \[0, 1\), got 1.5"),
        (["--stop_at_step", "500"], r"stop_at_step must be a step in \[1, steps=200\], got 500"),
        (["--warmup_steps", "300"], r"warmup_steps must be in \[0, steps=200\), got 300"),
    ],
)
def test_training_flags_are_checked_before_the_corpus_is_loaded(
    flags, message, monkeypatch, capsys
):
    # Given a training script whose corpus loading would fail the test.
    script = load_script("train_wikitext2")

    def never(*args, **kwargs):
        raise AssertionError("the corpus was loaded before the flags were checked")

    monkeypatch.setattr(script, "load_wikitext2", never)
    # When a config field is out of range, it exits with one error line at once.
    assert script.main(["--preset", "tiny", *WORKDIR, *flags]) == 2
    assert re.fullmatch(f"error: {message}\n", capsys.readouterr().err)


def fake_run(monkeypatch, split_tokens: int):
    """The evaluation scripts' run loading replaced by a tiny random model and a
    corpus of random ids (every split `split_tokens` long)."""
    import jax
    import numpy as np

    import ee_jax
    from ee_jax import cli
    from ee_jax.config import train_preset
    from ee_jax.data.corpus import Corpus
    from ee_jax.data.vocabulary import EOS, Vocabulary
    from ee_jax.model import EarlyExitLM

    config = train_preset("tiny", 97)
    params = EarlyExitLM(config.model).init(
        jax.random.key(0), np.zeros((1, config.model.n_seq), np.int32)
    )
    ids = np.random.default_rng(0).integers(0, 97, split_tokens).astype(np.int32)
    corpus = Corpus(Vocabulary((EOS, *(f"w{i}" for i in range(96)))), ids, ids, ids)
    run = ee_jax.Run(EarlyExitLM(config.model), params, config, corpus.vocab, 7, pathlib.Path("r"))
    monkeypatch.setattr(cli, "load_run_and_corpus", lambda *args: (run, corpus))
    monkeypatch.setattr(ee_jax, "enable_compilation_cache", lambda *args: None)


def test_a_partial_evaluation_says_so_in_its_results(monkeypatch, tmp_path, capsys):
    # Given a run whose splits are 600 tokens long.
    fake_run(monkeypatch, 600)
    flags = ["--workdir", str(tmp_path), "--max_tokens", "200", "--measures", "softmax_max"]
    # When both evaluations score only the first 200 tokens.
    assert load_script("eval_early_exit").main([*flags, "--timing_windows", "1"]) == 0
    stream_flags = ["--batch_size", "2", "--repeats", "1", "--threshold", "0.5"]
    assert load_script("stream_early_exit").main([*flags, *stream_flags]) == 0
    # Then results.md says so first, the JSON records what was scored of what,
    # and the streaming table says so too.
    eval_dir = tmp_path / "eval"
    note = "Partial evaluation: the first 200 of 600 test tokens"
    markdown = (eval_dir / "results.md").read_text()
    assert markdown.startswith(f"{note} and the first 200 of 600 valid tokens.\n\n## Headline")
    results = json.loads((eval_dir / "results.json").read_text())
    assert results["tokens"] == {"valid": 200, "test": 200}
    assert results["split_tokens"] == {"test": 600, "valid": 600}
    assert all(row["total_tokens"] == 200 for row in results["real_loop"])
    stream = json.loads((eval_dir / "stream_results.json").read_text())
    assert stream["tokens"] == {"test": 200} and stream["split_tokens"] == {"test": 600}
    assert all(row["total_tokens"] == 200 for row in stream["rows"])
    assert f"{note}.\n\n| B | measure |" in capsys.readouterr().out
