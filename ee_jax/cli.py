"""Pieces shared by the experiment scripts: common flags and one-line user errors."""

import argparse
import sys

from ee_jax.checkpoint import CheckpointError
from ee_jax.data import DataError, load_wikitext2

# Errors a user can cause (bad data folder, damaged checkpoint, bad flag value):
# reported as one message, without a traceback.
USER_ERRORS = (CheckpointError, DataError, FileNotFoundError, ValueError, KeyError)


def make_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the script docstring's first line."""
    return argparse.ArgumentParser(
        description=doc.split("\n")[0],
        epilog=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_data_flags(parser: argparse.ArgumentParser, *, workdir: bool = True) -> None:
    if workdir:
        parser.add_argument(
            "--workdir", required=True, help="training run folder (config.json and checkpoints/)"
        )
    parser.add_argument(
        "--data_dir",
        default=None,
        help="WikiText-2 folder (default: $EE_JAX_DATA_DIR, else download)",
    )
    parser.add_argument("--cache_dir", default=None, help="prepared-data cache folder")


def report_error(error: Exception) -> int:
    """Prints `error: ...` on stderr; returns the exit status 2."""
    print(f"error: {error}", file=sys.stderr)
    return 2


def load_run(args: argparse.Namespace, step: int | None = None):
    """(TrainConfig, {"params": ...}, step, Corpus) of --workdir and the data flags."""
    from ee_jax import train

    config, params, step = train.restore_params(args.workdir, step)
    corpus = load_wikitext2(args.data_dir, cache_dir=args.cache_dir)
    return config, params, step, corpus
