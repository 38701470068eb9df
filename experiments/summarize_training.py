r"""Summarise training runs: Markdown tables of their metrics and a PNG curve.

    python experiments/summarize_training.py runs/cpu runs/small \
        --every 250 --out /tmp/summary

Reads each run's config.json and metrics.jsonl, and valid_exit_ppl.json /
test_exit_ppl.json when the training script wrote them; writes comparison.md (one
row per run: mixer, parameters, steps, median train tokens/s, training minutes,
every exit's perplexity), training.md (metrics per --every steps) and
training.png into --out.
"""

import argparse
import json
import pathlib
import sys

from ee_jax import cli, report, run, train_state


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.make_parser(__doc__)
    parser.add_argument("workdirs", nargs="+", help="training run folders (with metrics.jsonl)")
    parser.add_argument(
        "--every", type=cli.positive_int, default=250, help="table row every this many steps"
    )
    parser.add_argument("--out", required=True, help="output folder")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    runs, compared, validation = {}, {}, {}
    for workdir in map(pathlib.Path, args.workdirs):
        path = workdir / "metrics.jsonl"
        if not path.is_file():
            return cli.report_error(FileNotFoundError(f"{path} does not exist"))
        runs[workdir.name] = [json.loads(line) for line in path.read_text().splitlines()]
        runs[workdir.name] = [row for row in runs[workdir.name] if "loss" in row]  # training
        validation[workdir.name] = [
            row for row in map(json.loads, path.read_text().splitlines()) if "valid_exit_ppl" in row
        ]
        if (workdir / "config.json").is_file():
            config = run.read_config(workdir)
            compared[workdir.name] = {
                "config": config,
                "params": train_state.parameter_count(config.model),
                "rows": runs[workdir.name],
                **{split: _exit_ppl(workdir, split) for split in ("valid", "test")},
            }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    comparison = report.comparison_table(compared)
    table = report.training_table(runs, args.every)
    (out / "comparison.md").write_text(comparison + "\n")
    (out / "training.md").write_text(table + "\n")
    report.plot_training(runs, out / "training.png", validation)
    print(comparison, table, sep="\n\n")
    return 0


def _exit_ppl(workdir: pathlib.Path, split: str) -> list[float] | None:
    path = workdir / f"{split}_exit_ppl.json"
    return json.loads(path.read_text())["exit_ppl"] if path.is_file() else None


if __name__ == "__main__":
    sys.exit(main())
