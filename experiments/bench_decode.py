"""Decoding speed of a trained run: greedy against sampled, full depth and early exit.

    python experiments/bench_decode.py --workdir runs/small [--json FILE]

Prompts are --prompt_length tokens of the WikiText-2 test split (row b starts at
b x 997). Every mode continues them by --steps tokens with `decode.generate`, at
B = 1 and B = 8 (--batch_sizes):
  greedy           temperature 0
  sampled top-k    temperature 1, the --top_k most likely tokens
  sampled top-p    temperature 1, the nucleus of mass --top_p
each at full depth (threshold 1.0 with the "learned" measure, whose per-block
check is a Dense(1)) and, when the run has a calibrated threshold for
--exit_measure (eval/results.json, `experiments/eval_early_exit.py`), at that
threshold. The modes of one batch size are timed interleaved
(`timing.interleaved`, --repeats rounds, compilation excluded); each row gives
tokens/s (median), the spread of its timings and the share of distinct tokens in
its text (a greedy loop shows as a small share).

Prints a table and writes --json.
"""

import argparse
import sys
import time

import jax
import numpy as np

import ee_jax
from ee_jax import cli
from ee_jax.timing import interleaved


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.make_parser(__doc__)
    cli.add_data_flags(parser)
    parser.add_argument("--prompt_length", type=cli.positive_int, default=24)
    parser.add_argument("--steps", type=cli.positive_int, default=256, help="new tokens per row")
    parser.add_argument("--batch_sizes", type=cli.positive_int, nargs="+", default=[1, 8])
    parser.add_argument("--top_k", type=cli.positive_int, default=40, help="for top-k sampling")
    parser.add_argument("--top_p", type=cli.probability, default=0.9, help="nucleus mass")
    parser.add_argument("--exit_measure", default="learned")
    parser.add_argument("--repeats", type=cli.positive_int, default=3, help="timed rounds (>= 2)")
    parser.add_argument("--json", default="bench_decode.json", help="results file")
    return parser.parse_args(argv)


def modes(args, threshold: float | None) -> dict[str, dict]:
    """name -> `decode.generate` options of every mode (module docstring)."""
    samplers = {
        "greedy": dict(temperature=0.0),
        f"sampled top-k {args.top_k}": dict(temperature=1.0, sample_top_k=args.top_k),
        f"sampled top-p {args.top_p:g}": dict(temperature=1.0, sample_top_p=args.top_p),
    }
    depths = {"full depth": dict(threshold=1.0, measure="learned")}
    if threshold is not None:
        depths[f"exit {args.exit_measure} {threshold:g}"] = dict(
            threshold=threshold, measure=args.exit_measure
        )
    return {
        f"{sampler}, {depth}": {**sampling, **exit_options}
        for depth, exit_options in depths.items()
        for sampler, sampling in samplers.items()
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.repeats < 2:
        return cli.report_error(ValueError("--repeats must be >= 2 (a spread needs two)"))
    ee_jax.enable_compilation_cache()
    from ee_jax import decode

    try:
        run, corpus = cli.load_run_and_corpus(args)
    except cli.USER_ERRORS as error:
        return cli.report_error(error)
    threshold = cli.calibrated_threshold(args.workdir, args.exit_measure)
    rows = []
    for batch in args.batch_sizes:
        prompt = cli.prompts_from_test_split(corpus, batch, args.prompt_length)
        calls = {
            name: lambda options=options, prompt=prompt: decode.generate(
                run.model, run.variables, prompt, args.steps, jax.random.key(0), **options
            )
            for name, options in modes(args, threshold).items()
        }
        timed = interleaved(calls, args.repeats)
        for name, call in calls.items():
            tokens, depths = call()
            new = np.asarray(tokens[:, args.prompt_length :])
            rows.append(
                {
                    "batch_size": batch,
                    "mode": name,
                    "tokens_per_s": batch * args.steps / timed[name].median_s,
                    "spread": timed[name].spread,
                    "distinct_share": len(np.unique(new)) / new.size,
                    "avg_exit_layer": float(np.mean(np.asarray(depths))),
                }
            )
    results = {
        "run": f"{args.workdir} step {run.step}",
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", *sys.argv]),
        "rows": rows,
    }
    cli.write_json(args.json, results)
    print("| B | mode | tokens/s | spread | distinct tokens | avg exit layer |")
    print("|---:|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['batch_size']} | {row['mode']} | {row['tokens_per_s']:,.0f} "
            f"| {100 * row['spread']:.0f}% | {100 * row['distinct_share']:.1f}% "
            f"| {row['avg_exit_layer']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
