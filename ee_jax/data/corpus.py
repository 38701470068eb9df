"""Loading WikiText-2 as token ids, with an ids cache shared by processes.

``load_wikitext2`` checks the source (``sources.find_source``), prepares it with
the ``WikiText2`` TFDS builder on first use, encodes every split with the train
vocabulary and caches the 1-D int32 id arrays as ``.npy`` next to the prepared
TFDS data, so later loads skip TFDS entirely. One process prepares a cache
folder while the others wait on a file lock; cache files are written to a
temporary name and renamed into place.

Shape legend: T tokens of a split.
"""

import contextlib
import dataclasses
import fcntl
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from ee_jax.data.sources import (
    SPLITS,
    STANDARD_FINGERPRINT,
    DataError,
    _atomic_file,
    find_source,
    resolve_source_dir,
)
from ee_jax.data.tfds_builder import WikiText2, read_lines
from ee_jax.data.vocabulary import Vocabulary, tokenize

DEFAULT_CACHE_DIR = Path("~/.cache/ee_jax/tfds")


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """The vocabulary and the three splits as token ids."""

    vocab: Vocabulary  # built from train
    train: np.ndarray  # [T_train] int32
    valid: np.ndarray  # [T_valid] int32
    test: np.ndarray  # [T_test] int32


def load_wikitext2(
    source_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    verify_checksums: bool = True,
) -> Corpus:
    """Loads WikiText-2 as token ids, preparing and caching it on first use.

    Args:
      source_dir: folder with the split files; defaults to ``$EE_JAX_DATA_DIR``,
        and when neither is set the official archive is downloaded.
      cache_dir: where prepared data goes, one sub-folder per corpus fingerprint
        (default ``~/.cache/ee_jax/tfds``). Encoded ids are cached as ``.npy``
        there, so later calls skip TFDS entirely.
      verify_checksums: check the files' sha256 against wikitext-2-v1 (turn off
        for a custom corpus with the same file names).

    Returns:
      The corpus: train has 2,088,628 tokens, valid 217,646, test 245,569 and
      the vocabulary 33,278 words for the standard files.

    Raises:
      DataError: missing or wrong source data (before anything is prepared), a
        failed download (naming every mirror tried), or valid/test words outside
        the train vocabulary.

    Several processes may call this at once on the same fresh cache: one
    prepares while the others wait on ``wikitext2-<fingerprint>.lock``, then
    they read what it wrote.
    """
    folder = resolve_source_dir(source_dir)
    source = None if folder is None else find_source(folder, verify_checksums=verify_checksums)
    fingerprint = STANDARD_FINGERPRINT if source is None else source.fingerprint
    cache_root = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
    # TFDS renames its incomplete folder into place: a second process preparing
    # the same folder fails on that rename, hence one preparer at a time.
    with _exclusive_lock(cache_root / f"wikitext2-{fingerprint}.lock"):
        data_dir = cache_root / f"wikitext2-{fingerprint}"
        builder = WikiText2(source=source, data_dir=os.fspath(data_dir))
        ids_dir = Path(os.fspath(builder.data_dir))
        corpus = _load_cached(ids_dir)
        if corpus is None:
            builder.download_and_prepare()
            corpus = _encode_corpus({split: read_lines(builder, split) for split in SPLITS})
            _save_cached(corpus, ids_dir)
    return corpus


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive ``flock`` on `path` (created if needed) for the block.

    The kernel releases it when the process dies, so a crashed preparer never
    leaves the cache locked. Linux and macOS; on NFS it depends on the server.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


def _encode_corpus(lines: Mapping[str, list[str]]) -> Corpus:
    """Tokenizes every split and encodes it with the train vocabulary."""
    tokens = {split: tokenize(lines[split]) for split in SPLITS}
    vocab = Vocabulary.from_tokens(tokens["train"])
    ids = {}
    for split in SPLITS:
        try:
            ids[split] = vocab.encode(tokens[split])
        except ValueError as error:
            raise DataError(f"The {split} split has words outside train: {error}") from None
    return Corpus(vocab=vocab, **ids)


def _save_cached(corpus: Corpus, ids_dir: Path) -> None:
    """Writes ``{split}.ids.npy`` then ``vocab.txt``, whose presence marks a full cache."""
    for split in SPLITS:
        with _atomic_file(ids_dir / f"{split}.ids.npy") as file:
            np.save(file, getattr(corpus, split))
    with _atomic_file(ids_dir / "vocab.txt") as file:
        file.write("\n".join(corpus.vocab.words).encode("utf-8"))


def _load_cached(ids_dir: Path) -> Corpus | None:
    """Returns the cached corpus, or None when there is none or it is stale."""
    if not (ids_dir / "vocab.txt").is_file():
        return None
    # Bytes, not read_text: universal newlines must not touch the words.
    data = (ids_dir / "vocab.txt").read_bytes()
    if b"\r" in data:  # CR line endings (an editor's): its words would end in \r
        return None
    words = data.decode("utf-8").split("\n")
    ids = {split: np.load(ids_dir / f"{split}.ids.npy") for split in SPLITS}
    # Ids written in another order (say first-occurrence, before VERSION 1.1.0)
    # must not be reused. Train counts non-increasing in id is enough: ids that
    # pass it in first-occurrence order are the frequency order exactly.
    counts = np.bincount(ids["train"], minlength=len(words))  # [V]
    if counts.size != len(words) or np.any(np.diff(counts) > 0):
        return None
    return Corpus(vocab=Vocabulary(tuple(words)), **ids)
