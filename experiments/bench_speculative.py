"""Benchmark of self-speculative decoding (`ee_jax.speculative`) on a trained run.

    python experiments/bench_speculative.py --workdir runs/cpu [--json FILE]

Prompts are --prompt_length tokens of the WikiText-2 test split (row b starts at
b x 997), greedy decoding:
1. Acceptance: for every draft exit e in 1..L-1, k in --draft_tokens and draft
   threshold in --draft_thresholds, the acceptance rate, drafts and tokens per
   verify pass and tokens/s of `decode.generate` with draft_exit at B = 1 over
   --search_steps tokens; the best setting by tokens/s.
2. Lossless: the best (e, k) against full-depth greedy `decode.generate`
   (threshold 1.0) over --check_tokens tokens at B = 1 and B = 8: the share of
   tokens that are identical.
3. Speed, in the same process, medians of --repeats: tokens/s of full-depth,
   early-exit (`decode.generate` at --exit_measure/--exit_threshold: the run's
   calibrated threshold when results.json has one) and speculative decoding at
   B = 1 and B = 8, over --steps tokens each; and the time of one draft (k + 1
   steps of blocks 1..e) and one verify pass (blocks e+1..L on k + 1 positions).

Prints tables and writes --json.
"""

import argparse
import functools
import itertools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import ee_jax
from ee_jax import cli
from ee_jax.timing import interleaved, median_s


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.make_parser(__doc__)
    cli.add_data_flags(parser)
    parser.add_argument(
        "--draft_tokens",
        type=cli.positive_int,
        nargs="+",
        default=[1, 2, 3, 4, 6],
        help="k values searched",
    )
    parser.add_argument(
        "--draft_thresholds",
        type=cli.probability,
        nargs="+",
        default=[0.0],
        help="draft confidence thresholds searched (0: always k drafts)",
    )
    parser.add_argument("--prompt_length", type=cli.positive_int, default=32)
    parser.add_argument("--search_steps", type=cli.positive_int, default=512)
    parser.add_argument("--check_tokens", type=cli.positive_int, default=10_000)
    parser.add_argument("--steps", type=cli.positive_int, default=512, help="timed tokens")
    parser.add_argument("--repeats", type=cli.positive_int, default=3)
    parser.add_argument(
        "--temperature",
        type=cli.nonnegative_float,
        default=0.0,
        help="0: greedy (and the lossless check); > 0: speculative sampling against "
        "sampling at full depth (same distribution: tests/test_speculative.py)",
    )
    parser.add_argument("--sample_top_k", type=cli.positive_int, default=None)
    parser.add_argument("--exit_measure", default="learned")
    parser.add_argument(
        "--exit_threshold",
        type=cli.probability,
        default=None,
        help="default: the run's calibrated threshold for --exit_measure (results.json)",
    )
    parser.add_argument("--json", default="bench_speculative.json", help="results file")
    return parser.parse_args(argv)


def search(model, variables, prompt, args) -> list[dict]:
    from ee_jax.decode import generate

    rows = []
    for draft_exit, k, threshold in itertools.product(
        range(1, model.config.n_layers), args.draft_tokens, args.draft_thresholds
    ):
        options = dict(draft_exit=draft_exit, draft_tokens=k, draft_threshold=threshold)
        run = functools.partial(
            generate,
            model,
            variables,
            prompt,
            args.search_steps,
            jax.random.key(0),
            **options,
            **sampling(args),
            return_stats=True,
        )
        seconds = median_s(lambda run=run: run()[0], 1)
        stats = run()[2]
        rows.append(
            {
                **options,
                "acceptance_rate": stats.acceptance_rate,
                "drafts_per_round": stats.drafts_per_round,
                "tokens_per_round": stats.tokens_per_round,
                "tokens_per_s": args.search_steps / seconds,
            }
        )
        print(
            f"e={draft_exit} k={k} t={threshold:g}: acceptance {stats.acceptance_rate:.3f}, "
            f"{stats.drafts_per_round:.2f} drafts and {stats.tokens_per_round:.2f} tokens "
            f"a round, {rows[-1]['tokens_per_s']:.0f} tokens/s",
            flush=True,
        )
    return rows


def sampling(args) -> dict:
    return dict(temperature=args.temperature, sample_top_k=args.sample_top_k)


def lossless(model, variables, corpus, best, args) -> dict:
    from ee_jax.decode import generate

    result = {}
    for batch in (1, 8):
        steps = -(-args.check_tokens // batch)
        prompt = cli.prompts_from_test_split(corpus, batch, args.prompt_length)
        full, _ = generate(model, variables, prompt, steps, jax.random.key(0), threshold=1.0)
        spec, _ = generate(model, variables, prompt, steps, jax.random.key(0), **best)
        new = slice(args.prompt_length, None)
        same = np.asarray(full[:, new]) == np.asarray(spec[:, new])
        result[f"B{batch}"] = {"tokens": int(same.size), "identical": float(same.mean())}
    return result


def speed_row(model, variables, corpus, best, threshold, args, batch: int) -> dict:
    """tokens/s of full-depth, early-exit and speculative decoding at one batch size,
    and one round's draft and verify time."""
    from ee_jax import speculative
    from ee_jax.decode import generate
    from ee_jax.state import RecurrentState

    prompt = cli.prompts_from_test_split(corpus, batch, args.prompt_length)
    key = jax.random.key(0)
    common = (model, variables, prompt, args.steps, key)
    sample = sampling(args)
    calls = {
        # Full depth: threshold 1.0 with the learned measure, whose check is a Dense(1).
        "full depth": lambda: generate(*common, threshold=1.0, measure="learned", **sample),
        "early exit": lambda: generate(
            *common, threshold=threshold, measure=args.exit_measure, **sample
        ),
        "speculative": lambda: generate(*common, **best, **sample),
    }
    timed = interleaved(calls, max(2, args.repeats))  # the modes side by side
    seconds = {name: measured.median_s for name, measured in timed.items()}
    row = {f"{name} tokens/s": batch * args.steps / s for name, s in seconds.items()}
    row["spread"] = max(measured.spread for measured in timed.values())
    row["speculative / full depth"] = seconds["full depth"] / seconds["speculative"]
    row["early exit / full depth"] = seconds["full depth"] / seconds["early exit"]
    # One round's two parts, timed alone from a fresh state.
    e, k = best["draft_exit"], best["draft_tokens"]
    state = RecurrentState.make(model.config, batch).layers
    lower, upper = (jax.tree.map(lambda x: x[:e], state), jax.tree.map(lambda x: x[e:], state))
    token, position = jnp.asarray(prompt[:, 0]), jnp.zeros(batch, jnp.int32)
    options = dict(draft_exit=e, k=k, sampling=None)
    keys = jax.random.split(key, batch)
    draft = jax.jit(
        lambda: speculative.draft(model, variables, token, position, lower, keys, 0.0, **options)
    )
    hiddens = draft()[0]
    verify = jax.jit(
        lambda: speculative.verify(model, variables, hiddens, upper, draft_exit=e, sampling=None)
    )
    parts = interleaved({"draft": draft, "verify": verify}, 10 * args.repeats)
    row["draft ms per round"] = 1e3 * parts["draft"].median_s
    row["verify ms per round"] = 1e3 * parts["verify"].median_s
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    ee_jax.enable_compilation_cache()
    try:
        run, corpus = cli.load_run_and_corpus(args)
    except cli.USER_ERRORS as error:
        return cli.report_error(error)
    model, variables, step = run.model, run.variables, run.step
    threshold = args.exit_threshold
    if threshold is None:
        threshold = cli.calibrated_threshold(args.workdir, args.exit_measure)
    if threshold is None:
        return cli.report_error(
            ValueError(
                f"{args.workdir} has no calibrated {args.exit_measure} threshold: "
                "pass --exit_threshold"
            )
        )
    greedy = args.temperature == 0
    prompt = cli.prompts_from_test_split(corpus, 1, args.prompt_length)
    rows = search(model, variables, prompt, args)
    best_row = max(rows, key=lambda row: row["tokens_per_s"])
    best = {name: best_row[name] for name in ("draft_exit", "draft_tokens", "draft_threshold")}
    results = {
        "run": f"{args.workdir} step {step}",
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", *sys.argv]),
        "search": rows,
        "best": best,
        "early_exit": {"measure": args.exit_measure, "threshold": threshold},
        "sampling": sampling(args),
        "lossless": lossless(model, variables, corpus, best, args) if greedy else {},
        "speed": {
            f"B{batch}": speed_row(model, variables, corpus, best, threshold, args, batch)
            for batch in (1, 8)
        },
    }
    cli.write_json(args.json, results)
    print(f"\nbest: draft exit {best['draft_exit']}, k = {best['draft_tokens']}")
    for name, check in results["lossless"].items():
        print(f"{name}: {100 * check['identical']:.2f}% of {check['tokens']} tokens identical")
    columns = list(results["speed"]["B1"])
    print("| B | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in results["speed"].items():
        print(f"| {name[1:]} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
