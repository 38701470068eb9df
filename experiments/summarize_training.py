r"""Summarise training runs: a Markdown table of their metrics and a PNG curve.

    python experiments/summarize_training.py runs/cpu runs/cpu_nobk \
        --every 250 --out docs/results/training

Reads each run's metrics.jsonl; writes training.md and training.png into --out.
"""

import json
import pathlib
import sys

from ee_jax import cli, report


def main(argv=None) -> int:
    parser = cli.make_parser(__doc__)
    parser.add_argument("workdirs", nargs="+", help="training run folders (with metrics.jsonl)")
    parser.add_argument("--every", type=int, default=250, help="table row every this many steps")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    runs = {}
    for workdir in args.workdirs:
        path = pathlib.Path(workdir) / "metrics.jsonl"
        if not path.is_file():
            return cli.report_error(FileNotFoundError(f"{path} does not exist"))
        lines = path.read_text().splitlines()
        runs[pathlib.Path(workdir).name] = [json.loads(line) for line in lines]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = report.training_table(runs, args.every)
    (out / "training.md").write_text(table + "\n")
    report.plot_training(runs, out / "training.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
