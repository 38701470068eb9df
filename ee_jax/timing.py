"""Wall-clock timing of jitted functions: compile separately, warm up, medians."""

import dataclasses
import statistics
import time
from collections.abc import Callable


@dataclasses.dataclass(frozen=True, kw_only=True)
class Timing:
    compile_s: float  # lowering + compilation of the jitted function
    median_ms: float  # median wall time of one call after warm-up
    repeats: int  # calls the median is taken over


def time_jitted(function: Callable, *args, min_repeats: int = 5, budget_s: float = 1.0) -> Timing:
    """Times `jax.jit`-ed `function(*args)`: compile once, warm up once, then
    repeat (at least `min_repeats`, up to about `budget_s`) and take the median.
    Every call is followed by `block_until_ready` on all outputs."""
    import jax

    start = time.perf_counter()
    compiled = jax.jit(function).lower(*args).compile()
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
