"""Shared test set-up: compilation cache, matmul precision, tolerances."""

import functools
import os
import pathlib

# The suite's programs are small and each runs a few times, so XLA's optimisation
# passes cost more than they save: compiling without them makes the suite about a
# third faster on 2 CPU cores. Set before JAX loads, so subprocesses (the CLI,
# multi-process and notebook tests) inherit it; results are compared to references
# with the same tolerances either way.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# `import ee_jax` below adds its CPU compiler flags to XLA_FLAGS
# (`ee_jax.use_cpu_xla_flags`), which the suite's subprocesses inherit: compiling is
# what the suite spends its time on, and they compile a test file in about 0.6 of
# the time on 2 cores.
# glibc's malloc as it is (not `ee_jax.keep_freed_memory`, which importing ee_jax
# applies): the suite's programs are small, and the test of that setting turns it on
# in its own subprocesses.
os.environ.setdefault("EE_JAX_KEEP_FREED_MEMORY", "0")
# Keys of JAX's "rbg" generator (XLA's RngBitGenerator) instead of the default
# threefry, in this process and the ones it starts: threefry's hash is most of the
# compile time of every program that draws numbers (the tiny model's init compiled
# in 19.6 s against 2.4 s). The tests assert properties of distributions, never
# particular draws; the package itself keeps JAX's default. The chi-square tests of
# sampling use threefry keys explicitly: rbg's bits under vmap over per-row keys are
# not independent enough for them (test_speculative.sample_rows).
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import ee_jax  # noqa: E402

# JAX's persistent compilation cache is used when $EE_JAX_CACHE_DIR names a folder:
# `make test` gives each suite run a fresh one, which the test files' processes (and
# the scripts they run in subprocesses, which call `ee_jax.enable_compilation_cache()`)
# share. Without it (a plain `pytest`), the cache stays off.
REPO = pathlib.Path(__file__).resolve().parents[1]
if os.environ.get("EE_JAX_CACHE_DIR"):
    ee_jax.enable_compilation_cache(os.environ["EE_JAX_CACHE_DIR"])
else:
    os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    jax.config.update("jax_enable_compilation_cache", False)
jax.config.update("jax_default_matmul_precision", "highest")

# One tolerance table for the suite (relative unless the name says otherwise).
TOLERANCE = {
    "float32": 1e-5,  # complex64 / float32 results against float64 references
    "float32_grad": 1e-4,  # float32 autodiff against float64 finite differences
    "long_sequence": 1e-4,  # N = 65536 against a float64 recurrence
    "bfloat16": 3e-2,
}


@functools.partial(jax.jit, static_argnums=0)
def init_variables(model, key, tokens) -> dict:
    """`model.init(key, tokens)` compiled as one program: run eagerly, each of its
    hundreds of operations is compiled apart, which took most of a test file's
    first seconds."""
    return model.init(key, tokens)


@functools.partial(jax.jit, static_argnums=0, static_argnames="method")
def apply_jitted(model, variables, *args, method=None):
    """`model.apply(variables, *args, method=method)` compiled as one program (for
    reference passes; arguments are traced, so only shapes are checked)."""
    return model.apply(variables, *args, method=method)


def random_exit_classifiers(variables: dict, key) -> dict:
    """`variables` with random exit classifier kernels (they start at zero, which makes
    every token equally confident under the "learned" measure)."""
    params = dict(variables["params"])
    exits = dict(params["exits"])
    exits["classifier_kernel"] = jax.random.normal(key, exits["classifier_kernel"].shape)
    return {"params": {**params, "exits": exits}}


def markov_text(n_lines: int, seed: int) -> str:
    """Lines from a small Markov chain: learnable structure in a 40-word vocabulary."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(40)]
    successors = np.random.default_rng(0).integers(0, 40, (40, 3))  # 3 likely successors
    lines = []
    for _ in range(n_lines):
        word = rng.integers(40)
        line = [words[word]]
        for _ in range(rng.integers(5, 15)):
            word = successors[word, rng.integers(3)] if rng.random() < 0.9 else rng.integers(40)
            line.append(words[word])
        lines.append(" ".join(line))
    return "\n".join(lines) + "\n"


def write_markov_corpus(folder: pathlib.Path, train_lines: int) -> pathlib.Path:
    """`folder` with train.txt, valid.txt and test.txt of `markov_text` (train_lines
    lines, a tenth of that for valid and test; seeds 1, 2, 3)."""
    for seed, (split, lines) in enumerate(
        [("train", train_lines), ("valid", train_lines // 10), ("test", train_lines // 10)], 1
    ):
        (folder / f"{split}.txt").write_text(markov_text(lines, seed))
    return folder
