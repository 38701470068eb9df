"""Wall-clock timing of jitted functions: compile separately, warm up, medians."""

import contextlib
import dataclasses
import functools
import statistics
import time
from collections.abc import Callable

import jax
from jax.experimental.compilation_cache import compilation_cache


@dataclasses.dataclass(frozen=True, kw_only=True)
class Timing:
    compile_s: float  # lowering + compilation, persistent cache bypassed
    median_ms: float  # median wall time of one call after warm-up
    repeats: int  # calls the median is taken over


def time_jitted(function: Callable, *args, min_repeats: int = 5, budget_s: float = 1.0) -> Timing:
    """Times `jax.jit`-ed `function(*args)`: compile once, warm up once, then
    repeat (at least `min_repeats`, up to about `budget_s`) and take the median.
    Every call is followed by `block_until_ready` on all outputs."""
    with cold_compilation():
        start = time.perf_counter()
        # A fresh partial: no in-memory cache hit from an earlier jit of `function`.
        compiled = jax.jit(functools.partial(function)).lower(*args).compile()
        compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))  # warm-up
    durations = []
    while len(durations) < min_repeats or sum(durations) < budget_s:
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        durations.append(time.perf_counter() - start)
        if len(durations) >= 200:
            break
    return Timing(
        compile_s=compile_s, median_ms=1e3 * statistics.median(durations), repeats=len(durations)
    )


def median_s(call: Callable, repeats: int) -> float:
    """Median wall time in seconds of `call()` (its outputs made ready), over
    `repeats` calls after one warm-up call (which compiles a jitted call)."""
    jax.block_until_ready(call())
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


@contextlib.contextmanager
def cold_compilation():
    """Compiles without the persistent compilation cache, so compile times are real.

    JAX reads the cache setting once per process, so the cache is reset on the
    way in and out for the switch to take effect.
    """
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()
