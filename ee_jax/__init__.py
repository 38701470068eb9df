"""ee_jax: early-exit ResNet-BK language models in JAX/Flax."""

import os
import pathlib

import jax

__version__ = "0.1.0"

_REPO_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".cache" / "jax"


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> pathlib.Path:
    """Turns on JAX's persistent compilation cache (an associative scan takes
    seconds to compile on CPU; a cache hit takes a fraction of a second).

    Args:
      directory: where compiled programs go; default `$EE_JAX_CACHE_DIR`, else the
        repository's ignored `.cache/jax` folder.

    Returns:
      The absolute cache directory.
    """
    path = pathlib.Path(directory or os.environ.get("EE_JAX_CACHE_DIR") or _REPO_CACHE)
    path = path.expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
