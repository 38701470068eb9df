"""WikiText-2 (word level, "wikitext-2-v1"): TFDS builder, vocabulary, LM batching.

Data flow: a source folder holding ``train.txt``, ``valid.txt`` and ``test.txt``
(or the official ``wiki.{train,valid,test}.tokens``) is checked (names, sha256)
-> the ``WikiText2`` TFDS builder writes it as ArrayRecord, one example per line
in file order -> each line becomes ``line.split() + ["<eos>"]`` -> a
``Vocabulary`` built from train, ids in descending train frequency (ties in
first-occurrence order), so that an adaptive softmax's clusters are contiguous
id ranges -> 1-D int32 id arrays, cached as ``.npy`` next to the prepared TFDS
data -> ``LMStream`` windows. One process prepares a cache folder while the
others wait on a file lock.

The data is Merity et al., "Pointer Sentinel Mixture Models" (2016,
arXiv:1609.07843), licensed CC BY-SA 3.0. It is never shipped with the project:
it is read from a folder (argument or ``EE_JAX_DATA_DIR``) or downloaded from
the mirrors in ``MIRRORS``, every file checked against its sha256.

Shape legend: T tokens of a split, B batch rows, S positions per row of a stream,
N positions per window.
"""

import codecs
import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import http.client
import io
import os
import re
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, Literal, NamedTuple

import numpy as np
import tensorflow_datasets as tfds

SPLITS: tuple[str, ...] = ("train", "valid", "test")
EOS = "<eos>"
UNK = "<unk>"  # WikiText's own token for words outside its vocabulary
ENV_VAR = "EE_JAX_DATA_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/ee_jax/tfds")
# Accepted file names per split, in order of preference. The PyTorch example's
# train/valid/test.txt are byte-identical to the archive's wiki.*.tokens (same
# sha1 as recorded by gluon-nlp), so one checksum table serves both names.
SOURCE_NAMES: Mapping[str, tuple[str, str]] = {
    split: (f"{split}.txt", f"wiki.{split}.tokens") for split in SPLITS
}
SHA256: Mapping[str, str] = {
    "train": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
    "valid": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "test": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
}
_EXPECTED_FILES = (
    "train.txt, valid.txt, test.txt (or wiki.train.tokens, wiki.valid.tokens, "
    "wiki.test.tokens) from wikitext-2-v1"
)


class DataError(ValueError):
    """The WikiText-2 source is missing, incomplete or not the expected data."""


def _source_error(folder: Path | None, problem: str) -> DataError:
    """Builds the one error a user sees for any problem with the source data."""
    where = folder if folder is not None else f"none given and {ENV_VAR} is unset"
    return DataError(
        f"{problem}\n  WikiText-2 source folder: {where}\n"
        f"  Expected files: {_EXPECTED_FILES}.\n"
        f"  Pass the folder with --data_dir (scripts), load_wikitext2(source_dir), or set "
        f"{ENV_VAR}=/path/to/wikitext-2."
    )


def _fingerprint(digests: Iterable[str]) -> str:
    """Short hex id of a corpus from its per-split sha256 digests (keys the cache)."""
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:16]


STANDARD_FINGERPRINT = _fingerprint(SHA256[split] for split in SPLITS)


# ----------------------------------------------------------------------------
# Source folder.


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceFiles:
    """A checked source folder: one text file per split."""

    folder: Path  # the folder the files were found in
    paths: Mapping[str, Path]  # split name -> text file, for every name in SPLITS
    fingerprint: str  # 16 hex digits from the files' sha256; the cache key


def resolve_source_dir(source_dir: str | os.PathLike | None = None) -> Path | None:
    """Returns the source folder: the argument, else ``$EE_JAX_DATA_DIR``, else None."""
    if source_dir is None:
        source_dir = os.environ.get(ENV_VAR) or None
    return None if source_dir is None else Path(source_dir).expanduser()


def _find_split_file(folder: Path, split: str) -> Path:
    """Returns the first accepted file name for `split` present in `folder`."""
    for name in SOURCE_NAMES[split]:
        if (folder / name).is_file():
            return folder / name
    names = " or ".join(SOURCE_NAMES[split])
    raise _source_error(folder, f"The WikiText-2 source folder has no {names}.")


def _file_sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def first_invalid_utf8(path: Path, chunk_size: int = 1 << 20) -> tuple[int, int, bytes] | None:
    """(byte offset, line number from 1, the bytes) of the first bytes of `path`
    that are not UTF-8, or None when the whole file is UTF-8; read in chunks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = newlines = 0  # bytes and line breaks before the current chunk
    with path.open("rb") as file:
        while True:
            chunk = file.read(chunk_size)
            pending = len(decoder.getstate()[0])  # an unfinished character's bytes
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                data = error.object  # the pending bytes (never a line break) + chunk
                line = newlines + data[: error.start].count(b"\n") + 1
                return offset - pending + error.start, line, data[error.start : error.end]
            if not chunk:
                return None
            offset, newlines = offset + len(chunk), newlines + chunk.count(b"\n")


def find_source(source_dir: str | os.PathLike, *, verify_checksums: bool = True) -> SourceFiles:
    """Finds and checks the three split files of a WikiText-2 source folder.

    Args:
      source_dir: folder holding the split files (see ``SOURCE_NAMES``).
      verify_checksums: compare each file's sha256 with the wikitext-2-v1 one.
        Turn off for a custom corpus laid out with the same file names.

    Returns:
      The files and the corpus fingerprint.

    Raises:
      DataError: the folder or a file is missing, a file is empty or not UTF-8
        text (naming the byte offset), or a checksum differs. Raised before
        anything is prepared.
    """
    folder = Path(source_dir).expanduser()
    if not folder.is_dir():
        raise _source_error(folder, "The WikiText-2 source folder does not exist.")
    paths = {split: _find_split_file(folder, split) for split in SPLITS}
    for path in paths.values():
        if path.stat().st_size == 0:
            raise _source_error(folder, f"{path} is empty.")
        invalid = first_invalid_utf8(path)
        if invalid is not None:
            offset, line, data = invalid
            raise _source_error(
                folder,
                f"{path} is not UTF-8 text: byte offset {offset} (line {line}) holds "
                f"{data!r}, which is not UTF-8. Convert the file to UTF-8 (e.g. "
                f"`iconv -f latin1 -t utf-8`) before preparing it.",
            )
    digests = {split: _file_sha256(path) for split, path in paths.items()}
    for split, digest in digests.items():
        if verify_checksums and digest != SHA256[split]:
            raise _source_error(
                folder,
                f"{paths[split]} has sha256 {digest}, but the wikitext-2-v1 {split} file "
                f"has {SHA256[split]}: it is truncated, altered or another corpus. "
                "Replace it, or pass verify_checksums=False for a custom corpus.",
            )
    fingerprint = _fingerprint(digests[split] for split in SPLITS)
    return SourceFiles(folder=folder, paths=paths, fingerprint=fingerprint)


# ----------------------------------------------------------------------------
# Download.


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mirror:
    """A place that serves the wikitext-2-v1 files."""

    name: str  # shown in messages
    urls: tuple[str, ...]  # the archive ("zip"), or one file per split in SPLITS order ("parquet")
    format: Literal["zip", "parquet"]  # the official archive, or Hugging Face parquet shards

    def __post_init__(self):
        if self.format not in ("zip", "parquet"):
            raise ValueError(f"Mirror format must be 'zip' or 'parquet', got {self.format!r}.")
        expected = 1 if self.format == "zip" else len(SPLITS)
        if len(self.urls) != expected:
            raise ValueError(f"A {self.format} mirror has {expected} url(s), got {len(self.urls)}.")


_HF_PARQUET = (
    "https://huggingface.co/datasets/Salesforce/wikitext/resolve/main/"
    "wikitext-2-v1/{}-00000-of-00001.parquet"
)
# Tried in order. The original Salesforce S3 bucket has answered 403 since 2024;
# it stays last in case it comes back. The parquet shards are not the original
# files, but the original bytes are rebuilt from them (see _unpack_parquet) and
# checked against SHA256 like every other source.
MIRRORS: tuple[Mirror, ...] = (
    Mirror(
        name="the dataset author's mirror, wikitext.smerity.com",
        urls=("https://wikitext.smerity.com/wikitext-2-v1.zip",),
        format="zip",
    ),
    Mirror(
        name="the Hugging Face Hub copy, Salesforce/wikitext",
        urls=tuple(_HF_PARQUET.format(name) for name in ("train", "validation", "test")),
        format="parquet",
    ),
    Mirror(
        name="the original Salesforce S3 bucket",
        urls=("https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip",),
        format="zip",
    ),
)
# Some hosts answer 403 to Python's default "Python-urllib/3.x" agent.
USER_AGENT = "Mozilla/5.0 (compatible; ee_jax WikiText-2 download)"
DOWNLOAD_TIMEOUT_S = 60
# What one failing mirror may raise; anything else is a bug and propagates.
_MIRROR_ERRORS = (
    OSError,
    ValueError,
    KeyError,
    ImportError,
    zipfile.BadZipFile,
    http.client.HTTPException,
)


def _fetch(opener: urllib.request.OpenerDirector, url: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with opener.open(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
        return response.read()


def _unpack_zip(payloads: Sequence[bytes]) -> dict[str, bytes]:
    """Reads ``wikitext-2/wiki.{split}.tokens`` from the official archive."""
    with zipfile.ZipFile(io.BytesIO(payloads[0])) as archive:
        return {split: archive.read(f"wikitext-2/wiki.{split}.tokens") for split in SPLITS}


def _unpack_parquet(payloads: Sequence[bytes]) -> dict[str, bytes]:
    """Rebuilds the original files from the Hugging Face parquet shards.

    Their builder stored one row per line, the line with its newline, except that
    a blank line became "" (wikitext-2-v1's blank lines are all " \\n").
    """
    import pyarrow.parquet  # a dependency of tensorflow-datasets; only needed here

    files = {}
    for split, payload in zip(SPLITS, payloads, strict=True):
        rows = pyarrow.parquet.read_table(io.BytesIO(payload), columns=["text"])
        lines = rows.column("text").to_pylist()
        files[split] = "".join(line or " \n" for line in lines).encode("utf-8")
    return files


def _fetch_mirror(
    mirror: Mirror, opener: urllib.request.OpenerDirector, checksums: Mapping[str, str]
) -> dict[str, bytes]:
    """Returns the split files of one mirror, or raises one of _MIRROR_ERRORS."""
    payloads = [_fetch(opener, url) for url in mirror.urls]
    unpack = _unpack_zip if mirror.format == "zip" else _unpack_parquet
    files = unpack(payloads)
    for split, content in files.items():
        digest = hashlib.sha256(content).hexdigest()
        if digest != checksums[split]:
            raise ValueError(f"{split} has sha256 {digest}, expected {checksums[split]}")
    return files


def _describe(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return f"unreachable ({error.reason})"
    return f"{type(error).__name__}: {error}"


def download_wikitext2(
    folder: str | os.PathLike,
    *,
    mirrors: Sequence[Mirror] | None = None,
    opener: urllib.request.OpenerDirector | None = None,
    checksums: Mapping[str, str] | None = None,
) -> SourceFiles:
    """Downloads wikitext-2-v1 into `folder` as ``{split}.txt``, trying mirrors in turn.

    Args:
      folder: where the three files go (created if needed).
      mirrors: sources to try in order (default ``MIRRORS``).
      opener: what fetches a ``urllib.request.Request`` (``.open(request,
        timeout=...)``); default ``urllib.request.build_opener()``.
      checksums: split -> sha256 every file must have (default ``SHA256``).

    Returns:
      The checked files, from the first mirror whose three files all match.

    Raises:
      DataError: every mirror failed; the message lists each one with its reason
        and says how to point ``--data_dir`` / ``EE_JAX_DATA_DIR`` at a folder.
    """
    mirrors = MIRRORS if mirrors is None else mirrors
    opener = opener or urllib.request.build_opener()
    checksums = SHA256 if checksums is None else checksums
    failures = []
    for mirror in mirrors:
        try:
            files = _fetch_mirror(mirror, opener, checksums)
        except _MIRROR_ERRORS as error:
            failures.append(f"    {mirror.name}: {_describe(error)}\n      {' '.join(mirror.urls)}")
            continue
        folder = Path(folder).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        for split, content in files.items():
            with _atomic_file(folder / f"{split}.txt") as file:
                file.write(content)
        return find_source(folder, verify_checksums=False)  # checked above
    raise _source_error(
        None,
        "Could not download wikitext-2-v1; tried, in order:\n" + "\n".join(failures) + "\n"
        "  Fetch wikitext-2-v1.zip by hand (the first URL above), unzip it and pass its\n"
        "  wikitext-2 folder to the scripts with --data_dir /path/to/wikitext-2.",
    )


# ----------------------------------------------------------------------------
# TFDS builder.


class WikiText2(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """WikiText-2 word level ("wikitext-2-v1"), one example per line, in file order.

    Each example is ``{"text": line}``, the raw line without its newline (read
    back as ``bytes``). Works without TensorFlow: files are ArrayRecord and are
    read with ``builder.as_data_source(split=...)``.

    Example::

      builder = WikiText2(source=find_source(folder), data_dir=cache)
      builder.download_and_prepare()
      lines = builder.as_data_source(split="test")
    """

    name = "wikitext2"
    # The id cache lives in the versioned folder: bump VERSION when the examples,
    # the tokenization or the id order change.
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "One example per line of wikitext-2-v1, in file order.",
        "1.1.0": "Same examples; cached ids in descending train frequency (were first-occurrence).",
    }
    # TFDS looks for a checksums.tsv next to the builder's code; there is none.
    # Saying so also avoids TFDS 4.9.10 importing `importlib_resources` (not one
    # of its dependencies) for a builder defined inside a package.
    code_path = None

    def __init__(self, *, source: SourceFiles | None = None, **kwargs):
        """Creates the builder.

        Args:
          source: checked local files (``find_source``); None downloads them
            (``download_wikitext2``) when the data is not prepared yet.
          **kwargs: ``tfds.core.GeneratorBasedBuilder`` arguments (``data_dir``...);
            ``file_format`` defaults to ArrayRecord, the format readable without
            TensorFlow.
        """
        self._source = source
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="WikiText-2 word-level language modelling corpus, one line per example.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            homepage="https://arxiv.org/abs/1609.07843",
            citation="Merity, Xiong, Bradbury, Socher. Pointer Sentinel Mixture Models. 2016.",
            license="CC BY-SA 3.0",
            disable_shuffling=True,  # line order is the text order
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        source = self._source or self._download(dl_manager)
        return {split: self._generate_examples(path) for split, path in source.paths.items()}

    def _download(self, dl_manager: tfds.download.DownloadManager) -> SourceFiles:
        return download_wikitext2(Path(os.fspath(dl_manager.download_dir)) / "wikitext-2-v1")

    def _generate_examples(self, path: Path):
        with path.open(encoding="utf-8") as file:
            for index, line in enumerate(file):
                yield index, {"text": line.rstrip("\n")}


def read_lines(builder: WikiText2, split: str) -> list[str]:
    """Returns the lines of a prepared split, in file order."""
    source = builder.as_data_source(split=split)
    # One batched read: about 5x faster than indexing the lines one by one.
    examples = source.__getitems__(range(len(source)))
    return [example["text"].decode("utf-8") for example in examples]


# ----------------------------------------------------------------------------
# Tokens and vocabulary.


def tokenize(lines: Iterable[str]) -> list[str]:
    """Standard protocol: ``line.split() + ["<eos>"]`` for every line, empty ones too."""
    return [word for line in lines for word in (*line.split(), EOS)]


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Word <-> id mapping; ids are positions in ``words``."""

    words: tuple[str, ...]  # one entry per id, no duplicates
    _index: dict[str, int] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "words", tuple(self.words))
        index = {word: i for i, word in enumerate(self.words)}
        if len(index) != len(self.words):
            raise ValueError("Vocabulary words must be unique.")
        object.__setattr__(self, "_index", index)

    @classmethod
    def from_tokens(cls, tokens: Iterable[str]) -> "Vocabulary":
        """Builds the vocabulary of `tokens`, ids in descending count, ties by first occurrence.

        Frequent words get small ids, so an adaptive softmax's clusters are
        contiguous id ranges (``token_frequencies`` gives their share of tokens).
        """
        counts = collections.Counter(tokens)  # keys in first-occurrence order
        # sorted is stable: equal counts keep first-occurrence order.
        return cls(tuple(sorted(counts, key=counts.__getitem__, reverse=True)))

    def __len__(self) -> int:
        return len(self.words)

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words)"

    @property
    def eos_id(self) -> int:
        """Id of the end-of-line token ``<eos>``."""
        return self._index[EOS]

    def encode(self, words: Sequence[str]) -> np.ndarray:
        """Maps words [N] to ids [N] int32; raises ValueError on unknown words."""
        try:
            return np.fromiter((self._index[w] for w in words), np.int32, count=len(words))
        except KeyError:
            unknown = list(dict.fromkeys(w for w in words if w not in self._index))
            raise ValueError(
                f"{len(unknown)} word(s) not in the vocabulary of {len(self)}: {unknown[:5]}"
            ) from None

    def decode(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        """Maps ids [N] to words [N]; raises ValueError on ids outside [0, V)."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise ValueError(f"Ids must lie in [0, {len(self)}), got {ids.min()}..{ids.max()}.")
        return [self.words[i] for i in ids.tolist()]


# WikiText's tokenisation (Merity et al. 2016, Moses-style): separators inside
# numbers and hyphens inside words become "@,@", "@.@", "@-@"; clitics are split
# off ("game's" -> "game 's", "don't" -> "don 't"); punctuation is its own token,
# except inside a word the vocabulary knows ("U.S.", "No.").
_INFIX = re.compile(r"(?<=\d)([,.])(?=\d)|(?<=\w)(-)(?=\w)")
_CLITIC = re.compile(r"(?<=\w)('(?:s|t|re|m|ve|ll|d))\b", re.IGNORECASE)
_LEADING = "(\"'[{"
_TRAILING = ".,;:!?)\"']}"


@dataclasses.dataclass(frozen=True)
class EncodedText:
    """Text as a corpus's tokens and ids (`encode_text`)."""

    ids: np.ndarray  # [N] int32
    words: list[str]  # [N] the tokens, "<unk>" where unknown
    unknown: dict[str, str | None]  # each unknown word -> a hint (or None)


def encode_text(text: str, vocab: Vocabulary, *, eos_at_end: bool = False) -> EncodedText:
    """Plain text -> token ids with WikiText-2's tokenisation rules (a line break is
    "<eos>", as in the corpus; `eos_at_end` adds one after the last line too).

    Words not in the vocabulary become "<unk>" (the corpus's own unknown word), each
    listed in `unknown` with a hint when a change of case would find it ("japan":
    'did you mean "Japan"?'). Punctuation is split off only where the word with it
    is unknown, so the vocabulary's "U.S." stays whole.

    Raises:
      ValueError: the vocabulary has no "<unk>" (needed for unknown words) and the
        text has some.
    """
    lines = text.split("\n")
    words: list[str] = []
    for number, line in enumerate(lines):
        line = _CLITIC.sub(r" \1", _INFIX.sub(lambda m: f" @{m.group(1) or m.group(2)}@ ", line))
        for raw in line.split():
            words.extend(_split_punctuation(raw, vocab))
        if number < len(lines) - 1 or eos_at_end:
            words.append(EOS)
    unknown = {}
    for word in words:
        if word not in vocab._index and word not in unknown:
            unknown[word] = _case_hint(word, vocab)
    if unknown and UNK not in vocab._index:
        raise ValueError(f"words not in the vocabulary, which has no {UNK!r}: {list(unknown)[:5]}")
    words = [UNK if word in unknown else word for word in words]
    return EncodedText(vocab.encode(words), words, unknown)


def _split_punctuation(raw: str, vocab: Vocabulary) -> list[str]:
    """raw with the fewest leading and trailing punctuation marks split off that leaves
    a word the vocabulary knows (raw itself when known), else with all of them; the
    marks are tokens of their own ("..." one token)."""
    lead = len(raw) - len(raw.lstrip(_LEADING))
    trail = len(raw) - len(raw.rstrip(_TRAILING))
    cuts = [(a, b) for a in range(lead + 1) for b in range(trail + 1) if a + b < len(raw)]
    known = [(a, b) for a, b in cuts if raw[a : len(raw) - b] in vocab._index]
    a, b = min(known, key=sum) if known else max(cuts, key=sum)
    after = raw[len(raw) - b :].replace("...", "\0")  # "..." as one mark
    marks = [mark.replace("\0", "...") for mark in after]
    return [*raw[:a], raw[a : len(raw) - b], *marks]


def _case_hint(word: str, vocab: Vocabulary) -> str | None:
    for candidate in (word.lower(), word.capitalize(), word.upper(), word.title()):
        if candidate != word and candidate in vocab._index:
            return f"did you mean {candidate!r}? (the corpus is case-sensitive)"
    return None


def token_frequencies(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """Fraction of the tokens of `ids` [T] that are each id: [V] float64, summing to 1.

    With ids in frequency order, ``token_frequencies(ids, V)[a:b].sum()`` is the
    share of tokens an adaptive-softmax cluster over ids [a, b) receives.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"ids must be a non-empty 1-D array, got shape {ids.shape}.")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"Ids must lie in [0, {vocab_size}), got {ids.min()}..{ids.max()}.")
    return np.bincount(ids, minlength=vocab_size) / ids.size  # [V]


# ----------------------------------------------------------------------------
# Loading.


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


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Opens a temporary file for writing and renames it to `path` once written."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("wb") as file:
        yield file
    os.replace(temporary, path)


def _load_cached(ids_dir: Path) -> Corpus | None:
    """Returns the cached corpus, or None when there is none or it is stale."""
    if not (ids_dir / "vocab.txt").is_file():
        return None
    # Bytes, not read_text: universal newlines must not touch the words.
    words = (ids_dir / "vocab.txt").read_bytes().decode("utf-8").split("\n")
    ids = {split: np.load(ids_dir / f"{split}.ids.npy") for split in SPLITS}
    # Ids written in another order (say first-occurrence, before VERSION 1.1.0)
    # must not be reused. Train counts non-increasing in id is enough: ids that
    # pass it in first-occurrence order are the frequency order exactly.
    counts = np.bincount(ids["train"], minlength=len(words))  # [V]
    if counts.size != len(words) or np.any(np.diff(counts) > 0):
        return None
    return Corpus(vocab=Vocabulary(tuple(words)), **ids)


# ----------------------------------------------------------------------------
# Batching.


class Batch(NamedTuple):
    """One window of a language-modelling stream (a pytree, ready for jit)."""

    inputs: np.ndarray  # [B, N] int32, the token before each target
    targets: np.ndarray  # [B, N] int32
    mask: np.ndarray  # [B, N] bool, True for real targets, False for padding


def _as_ids(ids: np.ndarray) -> np.ndarray:
    """Returns `ids` as a non-empty 1-D int32 array, or raises ValueError."""
    ids = np.asarray(ids, np.int32)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"ids must be a non-empty 1-D array, got shape {ids.shape}.")
    return ids


def batchify(
    ids: np.ndarray, batch_size: int, *, row_multiple: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Cuts a 1-D stream into B contiguous rows, padding instead of dropping the tail.

    Row r holds ``ids[r * S:(r + 1) * S]`` with ``S = ceil(len(ids) / B)`` rounded
    up to a multiple of `row_multiple`; the positions past the end are 0 with
    mask False, so every token appears exactly once with mask True.

    Args:
      ids: [T] token ids.
      batch_size: number of rows B.
      row_multiple: S is rounded up to a multiple of this (the window length).

    Returns:
      tokens [B, S] int32 and mask [B, S] bool.
    """
    ids = _as_ids(ids)
    if batch_size < 1 or row_multiple < 1:
        raise ValueError(
            f"batch_size and row_multiple must be >= 1, got {batch_size}, {row_multiple}."
        )
    row_length = -(-ids.size // batch_size)  # ceil
    row_length = -(-row_length // row_multiple) * row_multiple
    padding = batch_size * row_length - ids.size
    tokens = np.pad(ids, (0, padding)).reshape(batch_size, row_length)  # [B, S]
    mask = np.pad(np.ones(ids.size, bool), (0, padding)).reshape(batch_size, row_length)  # [B, S]
    return tokens, mask


@dataclasses.dataclass(frozen=True, eq=False)
class LMStream:
    """Next-token prediction over a token stream, cut into B rows and N-wide windows.

    Every token of the stream is a target exactly once (mask True): the first
    one is predicted from an ``<eos>`` context, as if the text followed a line
    end, so perplexity counts ``len(ids)`` predictions (245,569 on the
    WikiText-2 test split, the standard protocol). Rows are contiguous, so state
    can be carried from window i to window i + 1 of the same row.
    """

    inputs: np.ndarray  # [B, S] int32, S a multiple of n_seq
    targets: np.ndarray  # [B, S] int32
    mask: np.ndarray  # [B, S] bool
    n_seq: int  # window length N

    def __len__(self) -> int:
        """Number of windows (batches) per pass over the stream."""
        return self.inputs.shape[1] // self.n_seq

    def window(self, index: int) -> Batch:
        """Returns window `index` in [0, len(self)): positions [index * N, (index + 1) * N)."""
        if not 0 <= index < len(self):
            raise IndexError(f"Window {index} out of range [0, {len(self)}).")
        span = slice(index * self.n_seq, (index + 1) * self.n_seq)
        return Batch(self.inputs[:, span], self.targets[:, span], self.mask[:, span])


def make_lm_stream(ids: np.ndarray, batch_size: int, n_seq: int, *, eos_id: int) -> LMStream:
    """Builds the stream of (previous token -> token) pairs of `ids`.

    Args:
      ids: [T] token ids of one split.
      batch_size: rows B.
      n_seq: window length N.
      eos_id: context id for the first target (``Vocabulary.eos_id``).

    Returns:
      The stream; its windows cover every one of the T targets exactly once.
    """
    ids = _as_ids(ids)
    context = np.concatenate([np.array([eos_id], np.int32), ids[:-1]])  # [T]
    inputs, mask = batchify(context, batch_size, row_multiple=n_seq)  # [B, S]
    targets, _ = batchify(ids, batch_size, row_multiple=n_seq)  # [B, S]
    return LMStream(inputs=inputs, targets=targets, mask=mask, n_seq=n_seq)


def lm_windows(ids: np.ndarray, batch_size: int, n_seq: int, *, eos_id: int) -> Iterator[Batch]:
    """Yields the evaluation windows of `ids` in order (see ``LMStream``).

    Sum the loss over ``mask`` and divide by ``mask.sum()`` totalled over all
    windows, which is ``len(ids)``.
    """
    stream = make_lm_stream(ids, batch_size, n_seq, eos_id=eos_id)
    return (stream.window(index) for index in range(len(stream)))


def train_batch(stream: LMStream, step: int) -> Batch:
    """Returns the batch of training `step`: a pure function of the step.

    Step s reads window ``s % len(stream)`` of epoch ``s // len(stream)``, so a
    run resumed from a checkpoint at step s continues at exactly the same data.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    return stream.window(step % len(stream))
