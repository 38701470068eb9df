"""Speed without a ritual: a script that only imports ee_jax against one that opts out.

    python experiments/bench_first_use.py [--repeats 20]

Runs the same user script in two fresh processes: the seed-size model (D = 64,
L = 4, full 10,000-word softmax) forward at B = 8, N = 128, jitted, median of
--repeats calls after a warm-up. The script calls nothing but `import ee_jax`
(which applies `ee_jax.keep_freed_memory`); the second process sets
EE_JAX_KEEP_FREED_MEMORY=0 first, as a script would run without the fix.
"""

import argparse
import os
import subprocess
import sys

from ee_jax import cli

USER_SCRIPT = """
import statistics, sys, time
import ee_jax
import jax, jax.numpy as jnp
from ee_jax.config import seed
from ee_jax.model import EarlyExitLM
model = EarlyExitLM(seed())
tokens = jnp.zeros((8, 128), jnp.int32)
variables = model.init(jax.random.key(0), tokens)
forward = jax.jit(model.apply)
jax.block_until_ready(forward(variables, tokens))
times = []
for _ in range(int(sys.argv[1])):
    start = time.perf_counter()
    jax.block_until_ready(forward(variables, tokens))
    times.append(time.perf_counter() - start)
print(1e3 * statistics.median(times))
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.make_parser(__doc__)
    parser.add_argument("--repeats", type=cli.positive_int, default=20, help="timed calls")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = {}
    for name, setting in (("import ee_jax, nothing else", None), ("opted out", "0")):
        unset = ("GLIBC_TUNABLES", "EE_JAX_KEEP_FREED_MEMORY")  # the first: the default
        env = {key: value for key, value in os.environ.items() if key not in unset}
        if setting is not None:
            env["EE_JAX_KEEP_FREED_MEMORY"] = setting
        run = subprocess.run(
            [sys.executable, "-c", USER_SCRIPT, str(args.repeats)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        results[name] = float(run.stdout.split()[-1])
    print("| seed-size forward, B = 8, N = 128 | ms (median) |")
    print("|---|---:|")
    for name, ms in results.items():
        print(f"| {name} | {ms:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
