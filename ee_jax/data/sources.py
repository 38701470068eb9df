"""WikiText-2 source files: finding a local folder, checking it, downloading it.

A source folder holds ``train.txt``, ``valid.txt`` and ``test.txt`` (or the
official ``wiki.{train,valid,test}.tokens``); ``find_source`` checks the names,
that every file is non-empty UTF-8 text, and each file's sha256 against
wikitext-2-v1's, before anything is prepared. Any problem is one ``DataError``
naming the folder, the expected files and ``EE_JAX_DATA_DIR``.

The data is Merity et al., "Pointer Sentinel Mixture Models" (2016,
arXiv:1609.07843), licensed CC BY-SA 3.0. It is never shipped with the project:
it is read from a folder (argument or ``EE_JAX_DATA_DIR``) or downloaded from
the mirrors in ``MIRRORS`` (``download_wikitext2``), every file checked against
its sha256.
"""

import codecs
import contextlib
import dataclasses
import hashlib
import http.client
import io
import os
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, Literal

SPLITS: tuple[str, ...] = ("train", "valid", "test")
ENV_VAR = "EE_JAX_DATA_DIR"
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


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Opens a temporary file for writing and renames it to `path` once written
    (downloads here; the ids cache in ``corpus``)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("wb") as file:
        yield file
    os.replace(temporary, path)


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
