r"""Early-exit evaluation of a trained checkpoint on the WikiText-2 test set.

    python experiments/eval_early_exit.py --workdir runs/cpu \
        --data_dir ../shared/data/wikitext-2

Scores every test token once per exit, sweeps the thresholds of each confidence
measure, calibrates a threshold on valid (at most --max_ppl_change_pct worse
perplexity), runs the real halting loop at it, times the loop against the plain
forward, and writes results.json, results.md and PNG plots into --out
(default: WORKDIR/eval).
"""

import argparse
import pathlib
import sys

import ee_jax
from ee_jax import cli
from ee_jax.config import ExitMeasure
from ee_jax.data import make_lm_stream

DEFAULT_THRESHOLDS = [
    0.5,
    0.6,
    0.7,
    0.8,
    0.85,
    0.9,
    0.92,
    0.94,
    0.95,
    0.96,
    0.97,
    0.975,
    0.98,
    0.985,
    0.99,
    0.995,
    1.0,
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.make_parser(__doc__)
    cli.add_data_flags(parser)
    parser.add_argument(
        "--step", type=cli.positive_int, default=None, help="checkpoint step (default: latest)"
    )
    parser.add_argument("--out", default=None, help="output folder (default: WORKDIR/eval)")
    parser.add_argument(
        "--thresholds",
        type=cli.probability,
        nargs="+",
        default=DEFAULT_THRESHOLDS,
        help="thresholds to sweep, each in [0, 1]; 1.0 is full depth",
    )
    parser.add_argument(
        "--measures",
        nargs="+",
        default=[m.value for m in ExitMeasure],
        choices=[m.value for m in ExitMeasure],
        help='confidence measures ("learned" is skipped, with a note, when the run\'s '
        "exit_weighting never trained the exit classifiers)",
    )
    parser.add_argument(
        "--max_ppl_change_pct",
        type=cli.nonnegative_float,
        default=2.0,
        help="calibration tolerance: most perplexity increase on valid, in %%",
    )
    parser.add_argument(
        "--timing_windows",
        type=cli.positive_int,
        default=8,
        help="test windows timed for the wall-clock speedup (>= 1)",
    )
    parser.add_argument(
        "--max_tokens",
        type=cli.positive_int,
        default=None,
        help="score only the first tokens of valid and of test (default: all), said at "
        "the top of results.md; with --timing_windows 2, a quick look at a small run",
    )
    parser.add_argument(
        "--batch_size",
        type=cli.positive_int,
        default=None,
        help="rows per evaluation window (default: the run's eval_batch_size)",
    )
    cli.add_protocol_flag(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)  # every numeric flag is checked here, before any work
    ee_jax.enable_compilation_cache()
    from ee_jax import evaluate, report

    try:
        run, corpus = cli.load_run_and_corpus(args, args.step)
        config, params, step = run.config, run.variables, run.step
    except cli.USER_ERRORS as error:
        return cli.report_error(error)
    try:  # the library's own checks (say, no measure left the run trained), up front
        options = evaluate.EvalConfig(
            thresholds=args.thresholds,
            measures=args.measures,
            exit_weighting=config.exit_weighting,
            max_ppl_change_pct=args.max_ppl_change_pct,
            timing_windows=args.timing_windows,
            carry=cli.carried(args.protocol, config),
        )
        options.measures_for(config.model)
    except ValueError as error:
        return cli.report_error(error)
    batch_size = args.batch_size or config.eval_batch_size
    streams = [
        make_lm_stream(
            getattr(corpus, split)[: args.max_tokens],
            batch_size,
            config.model.n_seq,
            eos_id=corpus.vocab.eos_id,
        )
        for split in ("valid", "test")
    ]
    results = evaluate.evaluate_checkpoint(run.model, params, *streams, options)
    results.update(
        split_tokens={split: len(getattr(corpus, split)) for split in ("test", "valid")},
        step=step,
        config=config.to_dict(),
        command=" ".join(sys.argv),
    )
    out = pathlib.Path(args.out or pathlib.Path(args.workdir) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    cli.write_json(out / "results.json", results, default=str)
    print(report.write_report(results, out).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
