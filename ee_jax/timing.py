"""Wall-clock timing of jitted functions: compile separately, warm up, medians.

Programs that are compared run interleaved (`interleaved`): each repetition
round calls every one of them once, so a load that comes and goes on a shared
machine slows them alike, and each result keeps its spread (interquartile range
over median); a spread above NOISY_SPREAD marks a measurement to repeat.
"""

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


NOISY_SPREAD = 0.10  # interquartile range / median above which a timing is flagged


@dataclasses.dataclass(frozen=True)
class Measured:
    """Wall-clock seconds of one call: median and spread over the repeats."""

    median_s: float
    spread: float  # interquartile range / median
    repeats: int

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY_SPREAD


def interleaved(calls: dict[str, Callable], repeats: int) -> dict[str, Measured]:
    """Times `calls` (name -> call(), outputs made ready) side by side: one warm-up
    call each (which compiles a jitted call), then `repeats` rounds in which every
    call runs once, the order rotating from round to round.

    Raises:
      ValueError: repeats not an integer >= 2 (a spread needs two).
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 2:
        raise ValueError(f"repeats must be an integer >= 2, got {repeats!r}")
    names = list(calls)
    for name in names:
        jax.block_until_ready(calls[name]())
    durations = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            jax.block_until_ready(calls[name]())
            durations[name].append(time.perf_counter() - start)
    return {name: _measured(values) for name, values in durations.items()}


def _measured(durations: list[float]) -> Measured:
    low, _, high = statistics.quantiles(durations, n=4, method="inclusive")
    median = statistics.median(durations)
    return Measured(median_s=median, spread=(high - low) / median, repeats=len(durations))


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
