"""ee_jax: early-exit ResNet-BK language models in JAX/Flax.

The main names are importable from the package (`from ee_jax import EarlyExitLM,
ModelConfig, early_exit_forward, generate`); each is imported from its module on
first use, so `import ee_jax` stays cheap and changes no `jax.config` setting. The
modules stay importable by name (`from ee_jax import train`: the training module,
whose `train.train` trains).

Importing ee_jax makes glibc malloc keep freed memory for reuse
(`keep_freed_memory`: without it, a script on a CPU runs at about a third of the
measured speed); set EE_JAX_KEEP_FREED_MEMORY=0 before the import to leave malloc
as it is. It also adds XLA CPU compiler flags to $XLA_FLAGS (`use_cpu_xla_flags`:
faster compiles and steps on a CPU); EE_JAX_CPU_XLA_FLAGS=0 leaves $XLA_FLAGS as
it is.
"""

import importlib
import os
import pathlib
import shlex
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    "ModelConfig": "config",
    "TrainConfig": "config",
    "ExitMeasure": "config",
    "train_preset": "config",
    "EarlyExitLM": "model",
    "RecurrentState": "state",
    "early_exit_forward": "early_exit",
    "ExitInfo": "early_exit",
    "ExitStats": "early_exit",
    "generate": "decode",
    "decode_sequence": "decode",
    "stream_evaluate": "passes",
    "SpeculativeStats": "speculative",
    "Corpus": "data",
    "LMStream": "data",
    "Vocabulary": "data",
    "load_wikitext2": "data",
    "make_lm_stream": "data",
    "encode_text": "data",
    "TrainState": "train_state",
    "Run": "run",
    "load_run": "run",
    "exit_perplexities": "passes",
    "EvalConfig": "evaluate",
    "evaluate_checkpoint": "evaluate",
    "CheckpointError": "checkpoint",
}

__all__ = [  # the lazily imported names of _EXPORTS and this module's own
    "ModelConfig",
    "TrainConfig",
    "ExitMeasure",
    "train_preset",
    "EarlyExitLM",
    "RecurrentState",
    "early_exit_forward",
    "ExitInfo",
    "ExitStats",
    "generate",
    "decode_sequence",
    "stream_evaluate",
    "SpeculativeStats",
    "Corpus",
    "LMStream",
    "Vocabulary",
    "load_wikitext2",
    "make_lm_stream",
    "encode_text",
    "TrainState",
    "Run",
    "exit_perplexities",
    "evaluate_checkpoint",
    "EvalConfig",
    "CheckpointError",
    "enable_compilation_cache",
    "keep_freed_memory",
    "use_cpu_xla_flags",
    "CPU_XLA_FLAGS",
    "load_run",
    "user_cache_dir",
]

if TYPE_CHECKING:  # static checkers and IDEs see the names; runtime imports them lazily
    from ee_jax.checkpoint import CheckpointError
    from ee_jax.config import ExitMeasure, ModelConfig, TrainConfig, train_preset
    from ee_jax.data import (
        Corpus,
        LMStream,
        Vocabulary,
        encode_text,
        load_wikitext2,
        make_lm_stream,
    )
    from ee_jax.decode import decode_sequence, generate
    from ee_jax.early_exit import ExitInfo, ExitStats, early_exit_forward
    from ee_jax.evaluate import EvalConfig, evaluate_checkpoint
    from ee_jax.model import EarlyExitLM
    from ee_jax.passes import exit_perplexities, stream_evaluate
    from ee_jax.run import Run, load_run
    from ee_jax.speculative import SpeculativeStats
    from ee_jax.state import RecurrentState
    from ee_jax.train_state import TrainState


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ee_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ee_jax.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def user_cache_dir() -> pathlib.Path:
    """`$EE_JAX_CACHE_DIR`, else `$XDG_CACHE_HOME/ee_jax/jax`, else `~/.cache/ee_jax/jax`."""
    if os.environ.get("EE_JAX_CACHE_DIR"):
        return pathlib.Path(os.environ["EE_JAX_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base).expanduser() / "ee_jax" / "jax"


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> pathlib.Path:
    """Turns on JAX's persistent compilation cache (an associative scan takes
    seconds to compile on CPU; a cache hit takes a fraction of a second).

    This changes process-wide JAX settings, so only scripts, notebooks and test
    set-ups call it; importing ee_jax changes none.

    Args:
      directory: where compiled programs go; default `user_cache_dir()` (never
        inside the installed package).

    Returns:
      The absolute cache directory.
    """
    import jax

    path = pathlib.Path(directory or user_cache_dir()).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
    """Makes glibc malloc reuse freed memory for large buffers (Linux; a no-op elsewhere).

    XLA on CPU allocates every output and temporary afresh; glibc serves buffers
    above 32 MiB with mmap and returns them with munmap, so every call
    page-faults its [tokens, V] buffers in 4 KiB pages again. Serving them from
    one heap that is never trimmed (`mallopt`: one arena, no mmap, trim
    threshold 1 GiB) reuses pages already mapped. Measured here: the full-softmax
    forward at B = 8, N = 128 took 41 ms with it, 57 ms with
    `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` and 128 ms with neither. The cost is
    that the process keeps its peak heap. Process-wide; importing ee_jax calls
    it unless EE_JAX_KEEP_FREED_MEMORY=0 (calling it again changes nothing).

    Returns:
      True when glibc accepted the settings.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30))
    return all(mallopt(option, value) == 1 for option, value in settings)


# XLA CPU compiler options (GPUs and TPUs ignore them): the MLIR fusion emitters off,
# one LLVM module per program.
CPU_XLA_FLAGS = ("--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1")
# The jaxlib releases they were measured with: XLA aborts the process on a flag it
# does not know, and a later release may drop one.
CPU_XLA_FLAGS_JAXLIB = ("0.10.",)


def use_cpu_xla_flags() -> str:
    """Adds CPU_XLA_FLAGS to $XLA_FLAGS, each unless $XLA_FLAGS already sets it, when
    the installed jaxlib is one of CPU_XLA_FLAGS_JAXLIB (else changes nothing). The
    flags are appended: $XLA_FLAGS as the user wrote it stays its exact prefix.

    With XLA's MLIR fusion emitters (jaxlib 0.10.2) a CPU compiles more slowly and
    runs these models more slowly. Measured on 2 cores, a fresh 150-step run of
    the small preset (experiments/train_wikitext2.py, docs/benchmarks.md): 7,200 to
    7,400 training tokens/s with these flags, 5,900 to 6,400 without, and the
    training step compiled in 18.9 s instead of 20.1 s; a test file compiled in
    about 0.6 of the time. XLA reads $XLA_FLAGS when JAX starts its backend (the
    first computation), so this acts only before that. Importing ee_jax calls it
    unless EE_JAX_CPU_XLA_FLAGS=0.

    Returns:
      $XLA_FLAGS as it is now.
    """
    from importlib import metadata

    try:
        measured = metadata.version("jaxlib").startswith(CPU_XLA_FLAGS_JAXLIB)
    except metadata.PackageNotFoundError:
        measured = False
    given = os.environ.get("XLA_FLAGS", "")
    if not measured:
        return given
    try:  # parsed only to find the flags set: the user's string stays as written
        named = {flag.split("=")[0] for flag in shlex.split(given)}
    except ValueError:  # an unclosed quote: XLA reports it
        named = {flag.split("=")[0] for flag in given.split()}
    missing = [flag for flag in CPU_XLA_FLAGS if flag.split("=")[0] not in named]
    if missing:
        os.environ["XLA_FLAGS"] = " ".join([given, *missing] if given else missing)
    return os.environ.get("XLA_FLAGS", "")


if os.environ.get("EE_JAX_KEEP_FREED_MEMORY", "1") != "0":
    keep_freed_memory()
if os.environ.get("EE_JAX_CPU_XLA_FLAGS", "1") != "0":
    use_cpu_xla_flags()
