"""Pieces shared by the experiment scripts: common flags and one-line user errors."""

import argparse
import json
import math
import pathlib
import shlex
import sys

import numpy as np

from ee_jax import run as run_lib
from ee_jax import train
from ee_jax.checkpoint import CheckpointError
from ee_jax.data import DataError, load_wikitext2

# ee_jax's own errors a user can cause (bad data folder, damaged or mismatched
# checkpoint, bad training flags): reported as one message, without a traceback.
# Anything else (a ValueError inside training, say) is a bug and shows its traceback;
# scripts catch a plain ValueError only around the one call that validates a flag.
USER_ERRORS = (CheckpointError, DataError, train.TrainSetupError)


def make_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the script docstring's first line.

    Flags must be spelled in full: a prefix of a flag (`--batch` for
    `--batch_size`) is refused, so a renamed flag cannot silently match another.
    """
    return argparse.ArgumentParser(
        description=doc.split("\n")[0],
        epilog=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )


# Types of numeric flags (`add_argument(..., type=positive_int)`): a bad value is
# refused by the parser, before a script loads data, restores or compiles anything.


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _checked(parse, expected: str, ok):
    """A flag type: `parse(text)`, refused unless ok(value) ("expected <expected>")."""

    def flag_type(text: str):
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return flag_type


positive_int = _checked(_integer, "an integer >= 1", lambda v: v >= 1)
nonnegative_int = _checked(_integer, "an integer >= 0", lambda v: v >= 0)
finite_float = _checked(_finite, "a finite number", lambda v: True)
positive_float = _checked(_finite, "a finite number > 0", lambda v: v > 0)  # durations
nonnegative_float = _checked(_finite, "a finite number >= 0", lambda v: v >= 0)
probability = _checked(_finite, "a number in [0, 1]", lambda v: 0.0 <= v <= 1.0)  # thresholds


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


def resume_command(script: str, argv: list[str]) -> str:
    """The command that resumes an interrupted run: this one without --resume_step
    (which would go back to that step and set aside the progress since)."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--resume_step="):
            skip = False
        elif arg == "--resume_step":
            skip = True
        else:
            kept.append(arg)
    return shlex.join(["python", script, *kept])


def strict_json(value):
    """`value` with every non-finite float as None (strict JSON has no NaN/Infinity)."""
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(item) for item in value]
    if isinstance(value, np.ndarray):
        return strict_json(value.tolist())
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: str | pathlib.Path, value, **kwargs) -> None:
    """Writes `value` as strict JSON (non-finite numbers as null), indented."""
    text = json.dumps(strict_json(value), indent=2, allow_nan=False, **kwargs)
    pathlib.Path(path).write_text(text)


def load_run_and_corpus(args: argparse.Namespace, step: int | None = None):
    """(`run.Run` of --workdir, the corpus of the data flags): `run.load_run` checks
    that the run was trained with the corpus's vocabulary (CheckpointError)."""
    corpus = load_wikitext2(args.data_dir, cache_dir=args.cache_dir)
    return run_lib.load_run(args.workdir, step=step, vocab=corpus.vocab), corpus


def add_protocol_flag(parser: argparse.ArgumentParser) -> None:
    """--protocol of the evaluation scripts (read with `carried`)."""
    parser.add_argument(
        "--protocol",
        default="auto",
        choices=["auto", "window", "continuous"],
        help="window: every window from a fresh state; continuous: each row one "
        "contiguous text, the state carried; auto: continuous for a run trained "
        "with the state carried (carry_state), else window",
    )


def carried(protocol: str, config) -> bool:
    """Whether an evaluation reads the split in the "continuous" protocol: as asked,
    or for "auto" as the run trained (`TrainConfig.carry_state`)."""
    return config.carry_state if protocol == "auto" else protocol == "continuous"


def calibrated_threshold(workdir, measure: str) -> float | None:
    """The threshold `experiments/eval_early_exit.py` calibrated on valid for
    `measure` (WORKDIR/eval/results.json), or None when there is none."""
    path = pathlib.Path(workdir) / "eval" / "results.json"
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("calibration", {}).get(measure, {}).get("threshold")


def prompts_from_test_split(corpus, batch: int, length: int) -> np.ndarray:
    """[batch, length] int32 prompts of the test split: row b starts at token b x 997."""
    ids = np.asarray(corpus.test, np.int32)
    return np.stack([ids[b * 997 : b * 997 + length] for b in range(batch)])
