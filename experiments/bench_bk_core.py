"""Benchmark of the BK core: associative vs sequential vs dense, and accuracy.

    python experiments/bench_bk_core.py [--batch_size 8] [--sizes 128 512 2048 8192 65536]

For each N and both causal and bidirectional forms it prints the median time of
one jitted call (after compile and a warm-up call, block_until_ready on every
call), the compile time of the associative form, and the max relative error of
the float32 associative result against a float64 reference: the float64 dense
method up to N = 2048, the float64 sequential recurrence above.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import ee_jax
from ee_jax import cli
from ee_jax.bk_core import resolvent_diagonal
from ee_jax.timing import time_jitted

DENSE_MAX_N = 2048


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.make_parser(__doc__)
    parser.add_argument(
        "--batch_size", type=cli.positive_int, default=8, help="batch size B (default 8)"
    )
    parser.add_argument(
        "--sizes",
        type=cli.positive_int,
        nargs="+",
        default=[128, 512, 2048, 8192, 65536],
        help="sequence lengths N to time (default 128 512 2048 8192 65536)",
    )
    parser.add_argument(
        "--seed", type=cli.nonnegative_int, default=0, help="random seed of the potentials"
    )
    return parser.parse_args(argv)


def reference(diag: np.ndarray, causal: bool) -> np.ndarray:
    """float64 dense method up to DENSE_MAX_N, float64 sequential above."""
    method = "dense" if diag.shape[-1] <= DENSE_MAX_N else "sequential"
    with jax.enable_x64(True):
        ones = np.ones(diag.shape[-1] - 1)
        return np.asarray(resolvent_diagonal(diag, ones, ones, 1j, causal=causal, method=method))


def bench_row(diag: np.ndarray, causal: bool) -> dict:
    n = diag.shape[-1]
    ones = jnp.ones(n - 1, jnp.float32)
    diag32 = jnp.float32(diag)

    def core(method):
        return lambda d: resolvent_diagonal(d, ones, ones, 1j, causal=causal, method=method)

    associative = time_jitted(core("associative"), diag32)
    sequential = time_jitted(core("sequential"), diag32)
    dense = time_jitted(core("dense"), diag32, min_repeats=3) if n <= DENSE_MAX_N else None
    result = np.asarray(jax.jit(core("associative"))(diag32))
    expected = reference(diag, causal)
    error = np.max(np.abs(result - expected) / np.abs(expected))
    return {
        "N": n,
        "form": "causal" if causal else "bidirectional",
        "associative_ms": associative.median_ms,
        "sequential_ms": sequential.median_ms,
        "dense_ms": dense.median_ms if dense else None,
        "compile_s": associative.compile_s,
        "max_rel_error": float(error),
        "finite": bool(np.all(np.isfinite(result))),
    }


def format_row(row: dict) -> str:
    dense = f"{row['dense_ms']:.2f}" if row["dense_ms"] is not None else "-"
    return (
        f"| {row['N']} | {row['form']} | {row['associative_ms']:.3f} | "
        f"{row['sequential_ms']:.3f} | {dense} | {row['compile_s']:.2f} | "
        f"{row['max_rel_error']:.1e} | {row['finite']} |"
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    ee_jax.enable_compilation_cache()
    rng = np.random.default_rng(args.seed)
    print(
        f"BK core, B={args.batch_size}, diag = -2 + U[-3, 3], off-diagonals 1, z = 1j, "
        f"device: {jax.devices()[0].device_kind}"
    )
    print(
        "| N | form | associative ms | sequential ms | dense ms | compile s (assoc.) "
        "| max rel err | finite |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for n in args.sizes:
        diag = -2.0 + rng.uniform(-3, 3, (args.batch_size, n))
        for causal in (True, False):
            print(format_row(bench_row(diag, causal)), flush=True)


if __name__ == "__main__":
    main()
