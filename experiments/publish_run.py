r"""Publish a finished `make run` into the repository's results folder.

    python experiments/publish_run.py --workdir runs/cpu --out docs/results/cpu

Copies what `make run` wrote into --workdir to --out: the early-exit evaluation
(eval/results.json, eval/results.md, eval/*.png), the token-by-token decoding
(eval/stream_results.json), the training run's config.json, metrics.jsonl,
valid_exit_ppl*.json and test_exit_ppl*.json; writes the training summary
(comparison.md, training.md, training.png, by summarize_training.py); and puts a
header naming the run, its step, the date and the commands at the top of
README.md in --out (replacing an earlier publication's header; the rest of an
existing README.md is kept). --out records what it wrote in published_files.txt:
a later publication replaces and removes only those files. Nothing is written
(one error line says why) when a file is missing, the files are of different
steps, --out is the run folder or inside it, or --out holds a file of a name it
would write that an earlier publication did not write (the user's own file).
"""

import argparse
import datetime
import importlib.util
import json
import pathlib
import shutil
import sys

from ee_jax import cli

# (pattern relative to the work directory, must match at least one file)
PUBLISHED = (
    "eval/results.json",
    "eval/results.md",
    "eval/*.png",
    "eval/stream_results.json",
    "config.json",
    "metrics.jsonl",
    "valid_exit_ppl*.json",
    "test_exit_ppl*.json",
)
SUMMARY = ("comparison.md", "training.md", "training.png")  # summarize_training.py's files
MANIFEST = "published_files.txt"  # in --out: the names the last publication wrote


class PublishError(Exception):
    """A work directory that is not a finished `make run` (one line for the user)."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.make_parser(__doc__)
    parser.add_argument("--workdir", required=True, help="the finished run (make run's WORKDIR)")
    parser.add_argument("--out", required=True, help="results folder to write")
    return parser.parse_args(argv)


def published_files(workdir: pathlib.Path) -> list[pathlib.Path]:
    """Every file to copy; PublishError when a pattern matches none."""
    if not workdir.is_dir():
        raise PublishError(f"{workdir} is not a folder: train and evaluate it with make run first")
    files = []
    for pattern in PUBLISHED:
        found = sorted(path for path in workdir.glob(pattern) if path.is_file())
        if not found:
            raise PublishError(
                f"{workdir / pattern} does not exist: {workdir} is not a finished make run "
                "(training with --report_test true, eval_early_exit.py, stream_early_exit.py)"
            )
        files.extend(found)
    return files


def read_json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise PublishError(f"{path} cannot be read as JSON: {error}") from None


def check_steps(workdir: pathlib.Path, files: list[pathlib.Path]) -> int:
    """The evaluated step; PublishError when the files are of different steps."""
    steps = {}
    for path in files:
        if path.suffix == ".json" and path.name != "config.json":
            step = read_json(path).get("step")
            if step is not None:
                steps[path.relative_to(workdir).as_posix()] = step
    step = steps.get("eval/results.json")
    if step is None:
        raise PublishError(f"{workdir / 'eval/results.json'} names no step")
    others = {name: s for name, s in steps.items() if s != step}
    if others:
        listed = ", ".join(f"{name} is step {s}" for name, s in sorted(others.items()))
        raise PublishError(
            f"eval/results.json is step {step} but {listed}: re-run the stale commands of make run"
        )
    return step


def summarize(workdir: pathlib.Path, out: pathlib.Path) -> None:
    """summarize_training.py WORKDIR --out OUT, in this process."""
    path = pathlib.Path(__file__).with_name("summarize_training.py")
    spec = importlib.util.spec_from_file_location("summarize_training", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    status = module.main([str(workdir), "--out", str(out)])
    if status:
        raise PublishError(f"summarize_training.py {workdir} --out {out} failed (status {status})")


def describe(config: dict) -> str:
    """The run's settings in a few words, from its config.json."""
    model = config.get("model", {})
    parts = [
        f"D = {model.get('d_model')}, L = {model.get('n_layers')}",
        f"mixer {model.get('mixer', 'bk')}",
        f"position {model.get('position', 'learned')}",
        "state carried across windows" if config.get("carry_state") else "window resets",
        f"{model.get('output', 'full')} output",
        f"exit weights {config.get('exit_weighting')}",
        f"distillation {config.get('distillation_weight', 0.0)}",
        f"{config.get('steps'):,} steps" if config.get("steps") else "steps unknown",
    ]
    return ", ".join(parts)


def header(workdir: pathlib.Path, out: pathlib.Path, step: int, argv: list[str]) -> str:
    results = read_json(workdir / "eval" / "results.json")
    stream = read_json(workdir / "eval" / "stream_results.json")
    config = read_json(workdir / "config.json")
    evaluated = datetime.date.fromtimestamp((workdir / "eval" / "results.json").stat().st_mtime)
    publish = " ".join(["python experiments/publish_run.py", *argv])
    from ee_jax import report

    # A run evaluated on only the first tokens of a split says so first.
    partial = "".join(
        f"**{name}**: {report.partial_note(data)}\n\n"
        for name, data in (("results.md", results), ("stream_results.json", stream))
        if report.partial_note(data)
    )
    return (
        f"# `make run` output: {workdir.name}, step {step:,}, evaluated {evaluated.isoformat()}\n"
        f"\n"
        f"{partial}"
        f"The run: `{workdir.as_posix()}` ({describe(config)}), trained by `make run`'s\n"
        f"`experiments/train_wikitext2.py` and evaluated at step {step:,} by\n"
        f"`python {results.get('command', 'experiments/eval_early_exit.py')}` and\n"
        f"`python {stream.get('command', 'experiments/stream_early_exit.py')}`;\n"
        f"published into `{out.as_posix()}` on {datetime.date.today().isoformat()} by\n"
        f"`{publish}` (what `make publish` runs).\n"
    )


MARKER = "<!-- header written by experiments/publish_run.py; the text below it is kept -->"


def write_readme(path: pathlib.Path, text: str) -> None:
    """Puts `text` at the top of README.md: it replaces the header an earlier
    publication wrote (everything up to its MARKER line) and keeps the rest."""
    rest = path.read_text() if path.is_file() else ""
    if MARKER in rest:
        rest = rest.split(MARKER, 1)[1].lstrip("\n")
    path.write_text(f"{text}{MARKER}\n" + (f"\n{rest}" if rest.strip() else ""))


def check_out(workdir: pathlib.Path, out: pathlib.Path, names: list[str]) -> list[str]:
    """The names an earlier publication wrote into `out` (its manifest).

    Raises PublishError when `out` is the run folder or inside it, or when `out`
    holds a file named like one this publication writes that no earlier
    publication wrote (README.md excepted: its text below the header is kept).
    """
    if out.resolve() == workdir.resolve() or workdir.resolve() in out.resolve().parents:
        raise PublishError(
            f"--out {out} is inside the run folder {workdir}: choose a folder outside it"
        )
    manifest = out / MANIFEST
    earlier = manifest.read_text().split() if manifest.is_file() else []
    foreign = [n for n in names if n not in earlier and n != "README.md" and (out / n).exists()]
    if foreign:
        raise PublishError(
            f"{out / foreign[0]} exists and was not written by publish_run.py "
            f"(not in {manifest}): move it or choose another --out"
        )
    return earlier


def publish(workdir: pathlib.Path, out: pathlib.Path, argv: list[str]) -> list[pathlib.Path]:
    files = published_files(workdir)
    step = check_steps(workdir, files)
    names = list(dict.fromkeys([path.name for path in files] + [*SUMMARY, "README.md"]))
    earlier = check_out(workdir, out, names)
    text = header(workdir, out, step, argv)
    out.mkdir(parents=True, exist_ok=True)
    for name in set(earlier) - set(names) - {"README.md"}:  # an earlier publication's files
        (out / name).unlink(missing_ok=True)
    for path in files:
        shutil.copy2(path, out / path.name)
    summarize(workdir, out)
    write_readme(out / "README.md", text)
    (out / MANIFEST).write_text("".join(f"{name}\n" for name in names))
    return [out / name for name in names]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        written = publish(pathlib.Path(args.workdir), pathlib.Path(args.out), argv)
    except (PublishError, OSError) as error:
        return cli.report_error(error)
    print(f"wrote {len(written)} files into {args.out}:")
    print("\n".join(f"  {path.as_posix()}" for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
