"""Benchmark of the model as a recurrence: unbounded generation and parallel prefill.

    python experiments/bench_recurrence.py --workdir runs/cpu [--steps 10000]
    python experiments/bench_recurrence.py --preset cpu   # random weights, same sizes

1. Generation of --steps tokens at B = 1 (`decode.generate`, --chunk tokens per
   jitted scan, --threshold 1.0 by default: every token runs every block, so the
   time does not depend on the weights). Each chunk's wall time is recorded as it
   is produced: the median time per token over the first and the last 1,000
   tokens, and the process's resident memory after token 1,000 and after the last.
   A recurrent model should keep both flat; a model that attends to its past
   would not.
2. Prefill of a --prompt_length token prompt at B = 1, medians of --repeats: one
   parallel pass (`EarlyExitLM.hidden_states_from`, what `generate` does) against
   feeding it token by token, both as a Python loop of one jitted `decode_step`
   per token and as one jitted `lax.scan` of those steps.

Needs a model with position "none" (a learned table ends at n_seq). Prints a
table and writes --json.
"""

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import ee_jax
from ee_jax import cli
from ee_jax.timing import interleaved


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.make_parser(__doc__)
    parser.add_argument("--workdir", default=None, help="a trained run (default: --preset)")
    parser.add_argument(
        "--preset", default="cpu", help="without --workdir: this preset's model, random weights"
    )
    parser.add_argument("--steps", type=cli.positive_int, default=10_000, help="tokens generated")
    parser.add_argument("--chunk", type=cli.positive_int, default=100, help="steps per jit call")
    parser.add_argument(
        "--threshold", type=cli.probability, default=1.0, help="exit threshold in [0, 1]"
    )
    parser.add_argument(
        "--prompt_length", type=cli.positive_int, default=1000, help="prefill prompt tokens"
    )
    parser.add_argument("--repeats", type=cli.positive_int, default=5, help="prefill repeats")
    parser.add_argument("--json", default="bench_recurrence.json", help="results file")
    return parser.parse_args(argv)


def resident_mb() -> float:
    """This process's resident memory now (Linux /proc), MiB."""
    pages = int(pathlib.Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 2**20


def load_model(args):
    from ee_jax.config import train_preset
    from ee_jax.model import EarlyExitLM
    from ee_jax.run import load_run

    if args.workdir:
        run = load_run(args.workdir)
        config, variables = run.config, run.variables
        source = f"run {args.workdir}"
    else:
        config = train_preset(args.preset, 33278).replace(position="none")
        variables = EarlyExitLM(config.model).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        source = f"preset {args.preset}, position none, random weights"
    if config.model.position != "none":
        raise ValueError(f"{source} has a learned position table: it cannot run past n_seq")
    return EarlyExitLM(config.model), variables, source


def time_generation(model, variables, args) -> dict:
    from ee_jax import decode

    prompt = jnp.zeros((1, 1), jnp.int32)
    options = dict(threshold=args.threshold, chunk=args.chunk)
    decode.generate(model, variables, prompt, 2 * args.chunk, jax.random.key(1), **options)
    marks = [(0, time.perf_counter(), resident_mb())]

    def record(new, depths):
        marks.append((marks[-1][0] + new.shape[1], time.perf_counter(), resident_mb()))

    decode.generate(
        model, variables, prompt, args.steps, jax.random.key(0), on_chunk=record, **options
    )
    done, times, memory = (np.array(column) for column in zip(*marks, strict=True))
    per_token = np.diff(times) / np.diff(done)  # [chunks] seconds a token
    first, last = done[1:] <= 1000, done[:-1] >= done[-1] - 1000
    at_1000 = memory[np.searchsorted(done, 1000)]
    result = {
        "tokens": int(done[-1]),
        "chunk": args.chunk,
        "first_1000_ms_per_token": 1e3 * float(np.median(per_token[first])),
        "last_1000_ms_per_token": 1e3 * float(np.median(per_token[last])),
        "rss_mb_at_1000": float(at_1000),
        "rss_mb_at_end": float(memory[-1]),
        "tokens_per_s": float(done[-1] / (times[-1] - times[0])),
    }
    result["time_ratio_last_to_first"] = (
        result["last_1000_ms_per_token"] / result["first_1000_ms_per_token"]
    )
    result["rss_ratio_end_to_1000"] = result["rss_mb_at_end"] / result["rss_mb_at_1000"]
    return result


def time_prefill(model, variables, args) -> dict:
    from ee_jax import decode
    from ee_jax.decode import decode_step
    from ee_jax.state import RecurrentState

    config = model.config
    prompt = jax.random.randint(jax.random.key(2), (1, args.prompt_length), 0, config.vocab_size)
    start = RecurrentState.make(config, 1)
    threshold = jnp.float32(1.0)
    step = jax.jit(decode_step, static_argnums=(0, 5))

    def python_loop():
        state = start
        for position in range(args.prompt_length):
            state = step(model, variables, state, prompt[:, position], threshold, "softmax_max")[3]
        return state

    timed = interleaved(
        {
            "parallel": lambda: decode._prefill(model, variables, start, prompt),
            "scanned": lambda: decode._decode_scan(
                model, variables, start, prompt, threshold, "softmax_max"
            ),
            "looped": python_loop,
        },
        max(2, args.repeats),
    )
    parallel, scanned, looped = (timed[name].median_s for name in ("parallel", "scanned", "looped"))
    return {
        "spread": max(measured.spread for measured in timed.values()),
        "prompt_length": args.prompt_length,
        "parallel_ms": 1e3 * parallel,
        "token_scan_ms": 1e3 * scanned,
        "token_loop_ms": 1e3 * looped,
        "speedup_vs_token_loop": looped / parallel,
        "speedup_vs_token_scan": scanned / parallel,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    ee_jax.enable_compilation_cache()
    try:
        model, variables, source = load_model(args)
    except (ValueError, *cli.USER_ERRORS) as error:
        return cli.report_error(error)
    results = {
        "model": source,
        "backend": jax.default_backend(),
        "generation": time_generation(model, variables, args),
        "prefill": time_prefill(model, variables, args),
    }
    cli.write_json(args.json, results)
    g, p = results["generation"], results["prefill"]
    print(f"{source}, {results['backend']}")
    print(f"| generation, B = 1, {g['tokens']} tokens | first 1,000 | last 1,000 | ratio |")
    print("|---|---:|---:|---:|")
    print(
        f"| ms per token (median) | {g['first_1000_ms_per_token']:.3f} | "
        f"{g['last_1000_ms_per_token']:.3f} | {g['time_ratio_last_to_first']:.3f} |"
    )
    print(
        f"| resident MiB (at 1,000 / end) | {g['rss_mb_at_1000']:.1f} | "
        f"{g['rss_mb_at_end']:.1f} | {g['rss_ratio_end_to_1000']:.3f} |"
    )
    print(f"\n| prefill of {p['prompt_length']} tokens, B = 1 | ms (median) | parallel is |")
    print("|---|---:|---:|")
    print(f"| one parallel pass | {p['parallel_ms']:.1f} | |")
    print(
        f"| token by token, one jitted scan | {p['token_scan_ms']:.1f} | "
        f"{p['speedup_vs_token_scan']:.1f}x faster |"
    )
    print(
        f"| token by token, Python loop of jitted steps | {p['token_loop_ms']:.1f} | "
        f"{p['speedup_vs_token_loop']:.1f}x faster |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
