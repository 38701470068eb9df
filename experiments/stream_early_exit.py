r"""Streaming (token-by-token) early-exit evaluation on the WikiText-2 test set.

    python experiments/stream_early_exit.py --workdir runs/cpu \
        --data_dir ../shared/data/wikitext-2

For each batch size (B independent streams) it decodes the whole test split one
token at a time at full depth (threshold 1.0) and with early exit at each
(measure, threshold) pair, and reports perplexity, average exit layer, the
measured wall-clock speedup over full-depth decoding at the same B (the median
of --repeats interleaved passes of each setting, in one process), and the
FLOP-model prediction. Thresholds default to the ones calibrated by
eval_early_exit.py (WORKDIR/eval/results.json), else 0.9.
"""

import argparse
import pathlib
import statistics
import sys

import ee_jax
from ee_jax import cli, report
from ee_jax.config import ExitMeasure
from ee_jax.data import make_lm_stream


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.make_parser(__doc__)
    cli.add_data_flags(parser)
    parser.add_argument(
        "--batch_size",
        type=cli.positive_int,
        nargs="+",
        default=[1, 8],
        help="numbers of independent streams B, each >= 1 (one pass per value)",
    )
    parser.add_argument(
        "--measures",
        nargs="+",
        default=["softmax_max", "learned"],
        choices=[m.value for m in ExitMeasure],
        help='confidence measures ("learned" is skipped, with a note, when the run\'s '
        "exit_weighting never trained the exit classifiers)",
    )
    parser.add_argument(
        "--threshold",
        type=cli.probability,
        default=None,
        help="one threshold for every measure (default: calibrated, else 0.9)",
    )
    parser.add_argument(
        "--repeats",
        type=cli.positive_int,
        default=3,
        help="timed passes of each setting, interleaved; the median is reported (>= 1)",
    )
    parser.add_argument(
        "--max_tokens",
        type=cli.positive_int,
        default=None,
        help="score only the first tokens of test, >= 1 (default: all); the results "
        "then say they are partial",
    )
    cli.add_protocol_flag(parser)
    return parser.parse_args(argv)


def thresholds(args) -> dict:
    if args.threshold is not None:
        return {measure: args.threshold for measure in args.measures}
    calibrated = {m: cli.calibrated_threshold(args.workdir, m) for m in args.measures}
    return {m: 0.9 if t is None else t for m, t in calibrated.items()}


def check_stream_flags(args: argparse.Namespace, config) -> tuple[list, dict]:
    """Raises ValueError (one line for the user) on flags or a model the streaming
    evaluation would refuse; returns (measures to evaluate, {skipped measure: why})."""
    from ee_jax import decode, exit_scores
    from ee_jax.early_exit import check_exit_options

    decode.check_decodable(config.model)  # the numeric flags were checked by the parser
    measures, skipped = exit_scores.evaluated_measures(
        args.measures, config.exit_weighting, config.model.n_layers
    )
    for measure in measures:
        if args.threshold is not None:
            check_exit_options(args.threshold, measure, "freeze")
    return measures, skipped


def main(argv=None) -> int:
    args = parse_args(argv)
    ee_jax.enable_compilation_cache()
    from ee_jax import passes

    try:
        run, corpus = cli.load_run_and_corpus(args)
        args.measures, skipped = check_stream_flags(args, run.config)
    except (*cli.USER_ERRORS, ValueError) as error:
        return cli.report_error(error)
    model, params, config, step = run.model, run.variables, run.config, run.step
    for measure, why in skipped.items():
        print(f"note: not evaluating the {measure!r} measure: {why}")
    carry = cli.carried(args.protocol, config)
    ids = corpus.test[: args.max_tokens]
    rows = []
    # Full depth: threshold 1.0 with the learned measure, whose per-layer check is a
    # Dense(1); a softmax measure would pay a vocabulary projection per layer.
    settings = [("learned", 1.0), *thresholds(args).items()]
    for batch_size in args.batch_size:
        stream = make_lm_stream(ids, batch_size, config.model.n_seq, eos_id=corpus.vocab.eos_id)
        timed_runs = [[] for _ in settings]
        for _ in range(args.repeats):  # interleaved, so load changes hit every setting
            for runs, (measure, threshold) in zip(timed_runs, settings, strict=True):
                runs.append(
                    passes.stream_evaluate(
                        model, params, stream, threshold, measure=measure, carry=carry
                    )
                )
        full_s = statistics.median(result["seconds"] for result in timed_runs[0])
        for runs, (measure, _) in zip(timed_runs, settings, strict=True):
            seconds = statistics.median(run["seconds"] for run in runs)
            rows.append(
                {
                    **runs[0],
                    "measure": "full depth" if runs is timed_runs[0] else measure,
                    "seconds": seconds,
                    "seconds_each": [run["seconds"] for run in runs],
                    "tokens_per_s": runs[0]["total_tokens"] / seconds,
                    "measured_speedup": full_s / seconds,
                }
            )
    results = {
        "step": step,
        "command": " ".join(sys.argv),
        "exit_weighting": config.exit_weighting,
        "skipped_measures": skipped,
        "tokens": {"test": len(ids)},
        "split_tokens": {"test": len(corpus.test)},
        "rows": rows,
    }
    out = pathlib.Path(args.workdir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    cli.write_json(out / "stream_results.json", results)
    if report.partial_note(results):
        print(report.partial_note(results) + "\n")
    print(
        "| B | measure | threshold | test ppl | avg exit layer | tokens/s | measured speedup "
        "| FLOP-model speedup | measured / FLOP |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['batch_size']} | {row['measure']} "
            f"| {report.format_threshold(row['threshold'])} "
            f"| {row['ppl']:.1f} | {row['avg_exit_layer']:.2f} | {row['tokens_per_s']:.0f} "
            f"| {row['measured_speedup']:.2f}x | {row['flops_speedup']:.2f}x "
            f"| {row['measured_speedup'] / row['flops_speedup']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
