"""A training run's folder and the one way to load it.

    WORKDIR/
      config.json      the TrainConfig (`read_config`)
      vocab.txt        the words of the ids, one a line (utf-8): line i is id i
      vocab.sha256     its sha256 (`sha256sum -c` format), written with it
      metrics.jsonl    one strict-JSON row per logged step
      checkpoints/     orbax steps of the `TrainState` (`checkpoint.Checkpointer`)

`load_run(workdir)` gives a `Run`: the model, its variables, the config, the
vocabulary and the step; every script, notebook and doc loads runs with it.
"""

import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Sequence

import jax

from ee_jax.checkpoint import Checkpointer, CheckpointError, write_atomic
from ee_jax.config import TrainConfig
from ee_jax.model import EarlyExitLM
from ee_jax.train_state import init_state

VOCAB_FILE = "vocab.txt"  # the run's words, one per line (utf-8): line i is id i
VOCAB_CHECKSUM_FILE = "vocab.sha256"  # sha256 of vocab.txt's bytes, written with it


@dataclasses.dataclass(frozen=True)
class Run:
    """A trained run, ready to use: `run.model.apply(run.variables, tokens)`,
    `decode.generate(run.model, run.variables, ...)`; `data.encode_text(text,
    run.vocab)` turns text into its token ids."""

    model: EarlyExitLM
    variables: dict  # {"params": ...}
    config: TrainConfig
    vocab: "Vocabulary"  # noqa: F821 (ee_jax.data.Vocabulary, imported when loading)
    step: int  # the checkpoint's step
    workdir: pathlib.Path


def load_run(workdir, *, step: int | None = None, vocab=None) -> Run:
    """Loads a training run from its folder alone (module docstring).

    Works for WikiText-2 and custom corpora alike: the folder holds everything.
    The checkpoint is restored into an abstract template (shapes, dtypes, this
    device): nothing is initialised or compiled only to be overwritten; one of the
    earlier parameter layout is migrated (`ee_jax.layout`).

    Args:
      workdir: the training run folder.
      step: the checkpoint step (default: the latest).
      vocab: the vocabulary the caller maps words with (a corpus's `Vocabulary` or
        its words), checked to be the run's, in the same order; default: the run's.

    Raises:
      CheckpointError: a missing or damaged run; a vocab.txt that is missing or not
        the run's (not vocab_size words, not the words whose sha256 training
        recorded, CR line endings: `recorded_words`); or `vocab` another one.
    """
    from ee_jax.data import Vocabulary  # data imports TFDS: only when needed

    workdir = pathlib.Path(workdir).expanduser().resolve()
    config = read_config(workdir)
    if vocab is None:
        vocab = read_vocab(workdir, config.model.vocab_size)
    else:
        check_vocab(workdir, vocab_words(vocab), config.model.vocab_size)
        vocab = vocab if isinstance(vocab, Vocabulary) else Vocabulary(tuple(vocab))
    checkpointer = Checkpointer(workdir / "checkpoints")
    try:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        template = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
            jax.eval_shape(lambda: init_state(config)),
        )
        state = checkpointer.restore(template, step)
    finally:
        checkpointer.close()
    model = EarlyExitLM(config.model)
    return Run(model, state.params, config, vocab, int(state.step), workdir)


def read_config(workdir) -> TrainConfig:
    """The TrainConfig of a run folder; CheckpointError if missing or unreadable."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path} not found: is {workdir} a training work directory?")
    try:
        return TrainConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{path} is not a readable TrainConfig: {error}") from error


def vocab_words(vocab) -> tuple[str, ...]:
    """The words of a `Vocabulary` or of a sequence of words."""
    return tuple(vocab.words if hasattr(vocab, "words") else vocab)


def save_vocab(workdir: pathlib.Path, words: Sequence[str]) -> None:
    """Records the run's vocabulary as `workdir/vocab.txt` (utf-8 bytes, "\n" between
    words: universal newlines must not touch them) and its sha256 as
    `workdir/vocab.sha256` (`sha256sum -c` format), which loaders verify.

    Raises:
      CheckpointError: a word holds a line break ("\n" or "\r"): one word a line
        could not record it.
    """
    broken = next((word for word in words if "\n" in word or "\r" in word), None)
    if broken is not None:
        raise CheckpointError(f"{VOCAB_FILE} has a word a line: {broken!r} cannot be one")
    data = "\n".join(words).encode("utf-8")
    line = f"{hashlib.sha256(data).hexdigest()}  {VOCAB_FILE}\n"
    write_atomic(workdir / VOCAB_CHECKSUM_FILE, line.encode())
    write_atomic(workdir / VOCAB_FILE, data)


def recorded_words(workdir: pathlib.Path, vocab_size: int | None) -> tuple[str, ...] | None:
    """The words of `workdir/vocab.txt` (id i is line i), None when there is no such
    file, checked to be the run's: no "\r", the sha256 of `vocab.sha256` where the
    run recorded one (runs before it did not), and `vocab_size` words (the model's V;
    None: not checked here, as when the caller compares the words with its own).

    Raises:
      CheckpointError: the file fails a check (truncated, edited, CRLF line endings,
        another run's): its ids would map to the wrong words.
    """
    path = pathlib.Path(workdir) / VOCAB_FILE
    if not path.is_file():
        return None
    data = path.read_bytes()
    checksum = path.with_name(VOCAB_CHECKSUM_FILE)
    recorded = checksum.read_text(errors="replace").split()[:1] if checksum.is_file() else None
    restore = f"put back the {VOCAB_FILE} this run was trained with"
    if b"\r" in data:
        raise CheckpointError(
            f"{path} has CR (\\r) line endings (saved by a Windows editor or git's "
            f"autocrlf?), so its words would end in \\r: convert it to LF endings "
            f"(dos2unix) or {restore}"
        )
    if recorded is not None and recorded != [hashlib.sha256(data).hexdigest()]:
        raise CheckpointError(
            f"{path} is not the vocabulary this run recorded (its sha256 differs from "
            f"{checksum.name}): it was edited, truncated or replaced, and ids would map "
            f"to the wrong words; {restore}"
        )
    try:
        words = tuple(data.decode("utf-8").split("\n"))
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{path} is not utf-8 ({error.reason}): {restore}") from None
    if vocab_size is not None and len(words) != vocab_size:
        raise CheckpointError(
            f"{path} has {len(words)} words but the run's model has vocab_size {vocab_size}: "
            f"the file is truncated or another run's, and ids would map to the wrong "
            f"words; {restore}"
        )
    return words


def read_vocab(workdir: pathlib.Path, vocab_size: int):
    """The run's vocabulary (`data.Vocabulary`) from `workdir/vocab.txt`, checked by
    `recorded_words` against the model's `vocab_size` and the run's checksum.

    Raises:
      CheckpointError: the run has no vocab.txt (trained before runs recorded it),
        or it is not the run's (`recorded_words`).
    """
    from ee_jax.data import Vocabulary  # data imports TFDS: only when needed

    words = recorded_words(workdir, vocab_size)
    if words is None:
        raise CheckpointError(
            f"{pathlib.Path(workdir) / VOCAB_FILE} not found: {workdir} is not a training "
            f"run, or one trained before runs recorded their vocabulary"
        )
    return Vocabulary(words)


def check_vocab(workdir: pathlib.Path, words: Sequence[str], vocab_size: int | None = None) -> None:
    """Checks that the run in `workdir` was trained with exactly `words` (in order),
    its recorded vocabulary intact (`recorded_words`, with the model's `vocab_size`).

    Raises:
      CheckpointError: the run has no recorded vocabulary (trained before it was
        recorded), a damaged one (`recorded_words`) or another one; its word ids
        would silently mean other words.
    """
    words = tuple(words)
    recorded = recorded_words(workdir, vocab_size)
    if recorded is None:
        raise CheckpointError(
            f"{workdir} has no {VOCAB_FILE}: it was trained before runs recorded their "
            f"vocabulary, so its word ids cannot be checked against this corpus's "
            f"{len(words)} words (whose order has since changed). Retrain it."
        )
    if recorded != words:
        first = next(
            (i for i, pair in enumerate(zip(recorded, words, strict=False)) if len(set(pair)) > 1),
            min(len(recorded), len(words)),
        )
        shown = [ws[first] if first < len(ws) else "<none>" for ws in (recorded, words)]
        raise CheckpointError(
            f"{workdir} was trained with a different vocabulary (order) than this corpus: "
            f"{len(recorded)} vs {len(words)} words, first difference at id {first} "
            f"({shown[0]!r} vs {shown[1]!r}); its word ids would mean other words. "
            f"Retrain it with this corpus (or load the corpus it was trained on)."
        )
