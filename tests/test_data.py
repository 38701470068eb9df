"""Tests for ee_jax.data: WikiText-2 counts, vocabulary, evaluation windows, errors,
download fallback (offline, a fake opener), concurrent first loads.

The reference corpus is the real WikiText-2 when ``$EE_JAX_DATA_DIR`` is set or
``../shared/data/wikitext-2`` exists next to the repository, and otherwise a
small corpus written here with hand-counted sizes. It is prepared once per
session in a temporary cache.
"""

import collections
import dataclasses
import hashlib
import io
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ee_jax import data

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared" / "data" / "wikitext-2"

# Counts from the shared README (tokens include one <eos> per line).
WIKITEXT2_COUNTS = {"train": 2_088_628, "valid": 217_646, "test": 245_569}
WIKITEXT2_VOCAB_SIZE = 33_278

# A small corpus with the WikiText-2 layout: leading/trailing spaces, empty
# lines, a non-ASCII word. Counts by hand: words + one <eos> per line.
SMALL_CORPUS = {
    "train": "the cat sat on Senjō\n\n = Heading = \nthe dog sat down\n",  # 6 + 1 + 4 + 5
    "valid": "the cat\n dog sat \n",  # 3 + 3
    "test": "\nthe = down\n",  # 1 + 4
}
SMALL_COUNTS = {"train": 16, "valid": 6, "test": 5}
# Descending train count (<eos> 4; the, sat, = 2; the rest 1), ties in first-occurrence order.
SMALL_VOCAB = ("<eos>", "the", "sat", "=", "cat", "on", "Senjō", "Heading", "dog", "down")
# Measured earlier on WikiText-2 (JAX_NOTES): the 2,000 most frequent train
# words cover 79.7% of valid + test tokens.
WIKITEXT2_TOP_2000_COVERAGE = 79.7


@dataclasses.dataclass(frozen=True)
class Reference:
    source_dir: Path  # folder holding train.txt, valid.txt, test.txt
    verify_checksums: bool  # True for the real WikiText-2
    counts: dict  # split -> number of tokens
    vocab_size: int


def write_corpus(folder: Path, texts: dict, names: dict | None = None) -> Path:
    """Writes one file per split (default names ``{split}.txt``) and returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in texts.items():
        name = names[split] if names else f"{split}.txt"
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Reference:
    env_dir = os.environ.get(data.ENV_VAR)
    if env_dir or SHARED_DIR.is_dir():
        folder = Path(env_dir) if env_dir else SHARED_DIR
        return Reference(folder, True, WIKITEXT2_COUNTS, WIKITEXT2_VOCAB_SIZE)
    folder = write_corpus(tmp_path_factory.mktemp("small_corpus"), SMALL_CORPUS)
    return Reference(folder, False, SMALL_COUNTS, len(SMALL_VOCAB))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def corpus(reference, cache_dir) -> data.Corpus:
    return data.load_wikitext2(
        reference.source_dir, cache_dir=cache_dir, verify_checksums=reference.verify_checksums
    )


def read_directly(folder: Path) -> dict:
    """Slow, obviously correct twin of the loader (the PyTorch example's reading)."""
    tokens = {}
    for split in data.SPLITS:
        with open(folder / f"{split}.txt", encoding="utf-8") as file:
            tokens[split] = [word for line in file for word in line.split() + ["<eos>"]]
    return tokens


def frequency_order(tokens: list) -> list:
    """Words by descending count, ties by first occurrence: sorted on an explicit key."""
    counts = collections.Counter(tokens)
    first = {}
    for position, word in enumerate(tokens):
        first.setdefault(word, position)
    return sorted(counts, key=lambda word: (-counts[word], first[word]))


# ----------------------------------------------------------------------------
# Counts, order, cache.


def test_counts_match_the_reference(corpus, reference):
    # Given the reference corpus, When loaded, Then sizes match exactly.
    assert {split: getattr(corpus, split).shape for split in data.SPLITS} == {
        split: (count,) for split, count in reference.counts.items()
    }
    assert len(corpus.vocab) == reference.vocab_size
    assert all(getattr(corpus, split).dtype == np.int32 for split in data.SPLITS)


def test_small_corpus_counts_vocab_order_and_eos(tmp_path):
    folder = write_corpus(tmp_path / "src", SMALL_CORPUS)
    corpus = data.load_wikitext2(folder, cache_dir=tmp_path / "cache", verify_checksums=False)
    assert {split: getattr(corpus, split).size for split in data.SPLITS} == SMALL_COUNTS
    assert corpus.vocab.words == SMALL_VOCAB  # frequency order in train
    assert corpus.vocab.decode(corpus.test) == ["<eos>", "the", "=", "down", "<eos>"]


def test_ids_match_a_direct_reading_of_the_files(corpus, reference):
    tokens = read_directly(reference.source_dir)
    words = frequency_order(tokens["train"])
    index = {word: i for i, word in enumerate(words)}
    assert corpus.vocab.words == tuple(words)
    for split in data.SPLITS:
        expected = np.array([index[word] for word in tokens[split]], np.int32)
        np.testing.assert_array_equal(getattr(corpus, split), expected)


def test_ids_are_in_descending_train_frequency_ties_in_first_occurrence(corpus, reference):
    # Given counts and first positions from a direct reading of train.txt,
    tokens = read_directly(reference.source_dir)["train"]
    counts = collections.Counter(tokens)
    first = {}
    for position, word in enumerate(tokens):
        first.setdefault(word, position)
    # Then the counts of ids 0, 1, ... never increase, and equal counts keep
    # first-occurrence order.
    id_counts = [counts[word] for word in corpus.vocab.words]
    assert sum(id_counts) == reference.counts["train"]
    assert all(a >= b for a, b in itertools.pairwise(id_counts))
    for word, next_word in itertools.pairwise(corpus.vocab.words):
        if counts[word] == counts[next_word]:
            assert first[word] < first[next_word], (word, next_word)
    np.testing.assert_array_equal(np.bincount(corpus.train), id_counts)


def test_top_ids_cover_the_share_counted_directly_in_valid_and_test(corpus, reference):
    # Given the held-out tokens read directly and the train frequency order,
    tokens = read_directly(reference.source_dir)
    words = frequency_order(tokens["train"])
    top = min(2000, len(words) // 2)
    held_out = collections.Counter(tokens["valid"] + tokens["test"])
    expected = sum(held_out[word] for word in words[:top]) / sum(held_out.values())
    # When token_frequencies counts the encoded splits,
    frequencies = data.token_frequencies(
        np.concatenate([corpus.valid, corpus.test]), len(corpus.vocab)
    )
    # Then the top ids cover the counted share, and on WikiText-2 the measured 79.7%.
    np.testing.assert_allclose(frequencies[:top].sum(), expected, rtol=1e-12)
    if reference.verify_checksums:
        assert round(100 * frequencies[:2000].sum(), 1) == WIKITEXT2_TOP_2000_COVERAGE


def test_from_tokens_breaks_count_ties_by_first_occurrence():
    # Given c, b, a twice each (first seen in that order) and d once,
    vocab = data.Vocabulary.from_tokens(["c", "b", "d", "a", "b", "a", "c"])
    # Then the tied words keep first-occurrence order, before the rarer d.
    assert vocab.words == ("c", "b", "a", "d")
    assert data.Vocabulary.from_tokens(["x", "y", "z"]).words == ("x", "y", "z")
    assert data.Vocabulary.from_tokens(["x", "y", "y", "z", "z", "z"]).words == ("z", "y", "x")


def test_token_frequencies():
    frequencies = data.token_frequencies(np.array([2, 0, 2, 2]), 4)
    assert frequencies.dtype == np.float64
    np.testing.assert_array_equal(frequencies, [0.25, 0.0, 0.75, 0.0])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        data.token_frequencies(np.array([0, 4]), 4)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        data.token_frequencies(np.array([], np.int32), 4)


def test_a_cache_in_first_occurrence_order_is_rebuilt(tmp_path):
    # Given a cache whose ids were written in the old first-occurrence order,
    folder = write_corpus(tmp_path / "src", SMALL_CORPUS)
    corpus = data.load_wikitext2(folder, cache_dir=tmp_path / "cache", verify_checksums=False)
    (ids_dir,) = {path.parent for path in (tmp_path / "cache").rglob("vocab.txt")}
    assert ids_dir.name == str(data.WikiText2.VERSION) != "1.0.0"
    tokens = read_directly(folder)
    old_words = list(dict.fromkeys(tokens["train"]))
    old_index = {word: i for i, word in enumerate(old_words)}
    for split in data.SPLITS:
        np.save(ids_dir / f"{split}.ids.npy", [old_index[w] for w in tokens[split]])
    (ids_dir / "vocab.txt").write_bytes("\n".join(old_words).encode("utf-8"))
    # When loaded again, Then the stale ids are not reused.
    again = data.load_wikitext2(folder, cache_dir=tmp_path / "cache", verify_checksums=False)
    assert again.vocab.words == corpus.vocab.words == SMALL_VOCAB
    for split in data.SPLITS:
        np.testing.assert_array_equal(getattr(again, split), getattr(corpus, split))


def test_a_cache_vocabulary_with_cr_line_endings_is_rebuilt(tmp_path):
    # Given a cache whose vocab.txt an editor saved with CRLF line endings,
    folder = write_corpus(tmp_path / "src", SMALL_CORPUS)
    corpus = data.load_wikitext2(folder, cache_dir=tmp_path / "cache", verify_checksums=False)
    (path,) = (tmp_path / "cache").rglob("vocab.txt")
    path.write_bytes("\r\n".join(corpus.vocab.words).encode("utf-8"))
    # When loaded again, Then it is rebuilt from the source: no word ends in \r.
    again = data.load_wikitext2(folder, cache_dir=tmp_path / "cache", verify_checksums=False)
    assert again.vocab.words == corpus.vocab.words == SMALL_VOCAB
    assert b"\r" not in path.read_bytes()


def test_second_load_reads_the_cache_without_tfds(corpus, reference, cache_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the cached load must not prepare again")

    monkeypatch.setattr(data.WikiText2, "download_and_prepare", fail)
    again = data.load_wikitext2(
        reference.source_dir, cache_dir=cache_dir, verify_checksums=reference.verify_checksums
    )
    assert again.vocab == corpus.vocab
    for split in data.SPLITS:
        np.testing.assert_array_equal(getattr(again, split), getattr(corpus, split))


def test_without_source_uses_the_prepared_standard_data(
    corpus, reference, cache_dir, monkeypatch, tmp_path
):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    if reference.verify_checksums:
        # The real WikiText-2 was prepared in this cache: no folder is needed.
        again = data.load_wikitext2(cache_dir=cache_dir)
        np.testing.assert_array_equal(again.test, corpus.test)
    else:
        # Nothing prepared and no folder: one clear error naming the variable.
        with pytest.raises(data.DataError, match=data.ENV_VAR):
            data.load_wikitext2(cache_dir=tmp_path / "empty_cache")


def test_official_file_names_and_env_var_are_accepted(tmp_path, monkeypatch):
    names = {split: f"wiki.{split}.tokens" for split in data.SPLITS}
    folder = write_corpus(tmp_path / "src", SMALL_CORPUS, names)
    monkeypatch.setenv(data.ENV_VAR, str(folder))
    corpus = data.load_wikitext2(cache_dir=tmp_path / "cache", verify_checksums=False)
    assert {split: getattr(corpus, split).size for split in data.SPLITS} == SMALL_COUNTS


# ----------------------------------------------------------------------------
# Vocabulary.


def test_vocabulary_round_trip(corpus):
    ids = corpus.test[:5000]
    words = corpus.vocab.decode(ids)
    np.testing.assert_array_equal(corpus.vocab.encode(words), ids)
    assert corpus.vocab.decode(corpus.vocab.encode(words)) == words
    assert corpus.vocab.words[corpus.vocab.eos_id] == "<eos>"


def test_vocabulary_errors():
    vocab = data.Vocabulary.from_tokens(["b", "a", "b", "<eos>"])
    assert vocab.words == ("b", "a", "<eos>") and vocab.eos_id == 2
    with pytest.raises(ValueError, match=r"not in the vocabulary.*'zebra'"):
        vocab.encode(["a", "zebra"])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        vocab.decode([0, 3])
    with pytest.raises(ValueError, match="unique"):
        data.Vocabulary(("a", "a"))


# ----------------------------------------------------------------------------
# Batching.


@pytest.mark.parametrize(
    "length, batch_size, n_seq",
    [(1, 1, 1), (2, 3, 4), (101, 1, 7), (101, 3, 5), (100, 4, 5), (101, 7, 128), (37, 50, 3)],
)
def test_eval_windows_predict_every_token_exactly_once(length, batch_size, n_seq):
    # Given distinct ids 1..T and eos id 0, the previous token of id t is t - 1.
    ids = np.arange(1, length + 1, dtype=np.int32)
    windows = list(data.lm_windows(ids, batch_size, n_seq, eos_id=0))
    assert all(
        w.inputs.shape == w.targets.shape == w.mask.shape == (batch_size, n_seq) for w in windows
    )
    targets = np.concatenate([w.targets for w in windows], axis=1)  # [B, S]
    inputs = np.concatenate([w.inputs for w in windows], axis=1)  # [B, S]
    mask = np.concatenate([w.mask for w in windows], axis=1)  # [B, S]
    # Then each token is a target once, rows read the stream in order, and each
    # input is the token just before its target.
    np.testing.assert_array_equal(targets[mask], ids)
    np.testing.assert_array_equal(inputs[mask], ids - 1)
    np.testing.assert_array_equal(mask.ravel(), np.arange(mask.size) < length)  # tail padding


def test_eval_windows_on_the_test_split(corpus, reference):
    windows = list(data.lm_windows(corpus.test, 10, 35, eos_id=corpus.vocab.eos_id))
    mask_total = sum(int(w.mask.sum()) for w in windows)
    assert mask_total == reference.counts["test"]
    masked = np.concatenate([w.targets[w.mask] for w in windows])
    counts = np.bincount(masked, minlength=len(corpus.vocab))
    np.testing.assert_array_equal(counts, np.bincount(corpus.test, minlength=len(corpus.vocab)))


def test_batchify_keeps_rows_contiguous_and_pads_the_tail():
    tokens, mask = data.batchify(np.arange(10), 3, row_multiple=2)
    np.testing.assert_array_equal(tokens, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]])
    np.testing.assert_array_equal(mask.sum(axis=1), [4, 4, 2])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        data.batchify(np.zeros((2, 2), np.int32), 1)
    with pytest.raises(ValueError, match=">= 1"):
        data.batchify(np.arange(3), 0)


def test_train_batch_is_a_pure_function_of_the_step():
    ids = np.arange(1, 48, dtype=np.int32)
    stream = data.make_lm_stream(ids, 3, 4, eos_id=0)
    windows = list(data.lm_windows(ids, 3, 4, eos_id=0))
    assert len(stream) == len(windows) == 4
    for step in range(3 * len(stream)):
        batch = data.train_batch(stream, step)
        expected = windows[step % len(stream)]
        for got, want in zip(batch, expected, strict=True):
            np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="step"):
        data.train_batch(stream, -1)


# ----------------------------------------------------------------------------
# Errors: one DataError naming the path, the expected files and the env var,
# raised before anything is prepared.


def assert_clear_error(excinfo, path: Path, cache: Path) -> None:
    message = str(excinfo.value)
    assert str(path) in message and data.ENV_VAR in message and "train.txt" in message
    # Raised by the source checks, not from deep inside TFDS.
    assert excinfo.traceback[-1].path == Path(data.sources.__file__)
    assert not cache.exists() or not any(cache.iterdir())  # nothing prepared


def copy_source(reference: Reference, folder: Path) -> Path:
    folder.mkdir()
    for split in data.SPLITS:
        shutil.copy(reference.source_dir / f"{split}.txt", folder / f"{split}.txt")
    return folder


def test_error_on_missing_or_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(data.DataError) as excinfo:
            data.load_wikitext2(folder, cache_dir=tmp_path / "cache")
        assert_clear_error(excinfo, folder, tmp_path / "cache")


def test_error_on_missing_file(reference, tmp_path):
    folder = copy_source(reference, tmp_path / "src")
    (folder / "test.txt").unlink()
    with pytest.raises(data.DataError, match=r"no test\.txt or wiki\.test\.tokens") as excinfo:
        data.load_wikitext2(folder, cache_dir=tmp_path / "cache")
    assert_clear_error(excinfo, folder, tmp_path / "cache")


def test_error_on_truncated_file(reference, tmp_path):
    folder = copy_source(reference, tmp_path / "src")
    with open(folder / "test.txt", "r+b") as file:
        file.truncate(file.seek(0, os.SEEK_END) // 2)
    with pytest.raises(data.DataError, match="sha256") as excinfo:
        data.load_wikitext2(folder, cache_dir=tmp_path / "cache")
    # The small fallback corpus already differs from wikitext-2-v1 in train.txt.
    bad_file = "test.txt" if reference.verify_checksums else "train.txt"
    assert str(folder / bad_file) in str(excinfo.value)
    assert_clear_error(excinfo, folder, tmp_path / "cache")


def test_error_on_env_var_pointing_nowhere(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(data.DataError, match="does not exist") as excinfo:
        data.load_wikitext2(cache_dir=tmp_path / "cache")
    assert_clear_error(excinfo, tmp_path / "nowhere", tmp_path / "cache")


def test_error_on_custom_corpus_with_checksums_on(tmp_path):
    folder = write_corpus(tmp_path / "src", SMALL_CORPUS)
    with pytest.raises(data.DataError, match="verify_checksums=False"):
        data.load_wikitext2(folder, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("verify_checksums", [False, True])
def test_error_on_a_file_that_is_not_utf8_names_it_and_the_byte(verify_checksums, tmp_path):
    # Given a custom corpus whose valid split has one Latin-1 byte on its second line.
    folder = write_corpus(tmp_path / "src", SMALL_CORPUS)
    text = "the cat\n dog caf\xe9 sat \n".encode("latin-1")
    (folder / "valid.txt").write_bytes(text)
    # When it is loaded, one DataError names the file, the byte offset and the line,
    # before the checksums and before anything is prepared.
    with pytest.raises(data.DataError) as excinfo:
        data.load_wikitext2(folder, cache_dir=tmp_path / "cache", verify_checksums=verify_checksums)
    message = str(excinfo.value)
    assert f"{folder / 'valid.txt'} is not UTF-8 text: byte offset 16 (line 2)" in message
    assert text[16:17] == b"\xe9" and "b'\\xe9'" in message
    assert_clear_error(excinfo, folder, tmp_path / "cache")


def test_first_invalid_utf8_finds_the_byte_across_chunk_boundaries(tmp_path):
    # Given UTF-8 text with 2-, 3- and 4-byte characters, then a lone continuation byte.
    good = "ab\né€𝄞\nz".encode()
    path = tmp_path / "t.txt"
    for chunk_size in (1, 2, 3, 5, 1 << 20):  # a character split across reads is fine
        path.write_bytes(good)
        assert data.first_invalid_utf8(path, chunk_size) is None
        path.write_bytes(good + b"\x80tail")
        assert data.first_invalid_utf8(path, chunk_size) == (len(good), 3, b"\x80")
        # A character cut short at the end of the file is invalid too.
        path.write_bytes(good + "€".encode()[:2])
        assert data.first_invalid_utf8(path, chunk_size)[:2] == (len(good), 3)


def test_error_on_test_words_outside_train(tmp_path):
    folder = write_corpus(tmp_path / "src", {**SMALL_CORPUS, "test": "the unicorn\n"})
    with pytest.raises(data.DataError, match=r"test split has words outside train.*'unicorn'"):
        data.load_wikitext2(folder, cache_dir=tmp_path / "cache", verify_checksums=False)


def test_error_offline_without_source(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", offline)  # the real opener, no network
    with pytest.raises(data.DataError, match=f"{data.ENV_VAR} is unset") as excinfo:
        data.load_wikitext2(cache_dir=tmp_path / "cache")
    message = str(excinfo.value)
    assert "train.txt" in message and "--data_dir" in message
    assert all(mirror.name in message for mirror in data.MIRRORS)
    assert message.count("no network") == len(data.MIRRORS)


# ----------------------------------------------------------------------------
# Download fallback, offline: a fake opener serves archives built here.

# The wikitext-2-v1 layout: blank lines are " \n", words start with a space.
DOWNLOAD_CORPUS = {
    "train": " \n = Heading = \n \n the cat sat \n the dog sat \n",
    "valid": " \n the cat \n",
    "test": " the dog \n \n",
}
DOWNLOAD_SHA256 = {
    split: hashlib.sha256(text.encode()).hexdigest() for split, text in DOWNLOAD_CORPUS.items()
}
ZIP_MIRROR = data.Mirror(name="zip mirror", urls=("https://zip.test/wt2.zip",), format="zip")
ZIP_MIRROR_2 = data.Mirror(name="zip mirror 2", urls=("https://zip2.test/wt2.zip",), format="zip")
PARQUET_MIRROR = data.Mirror(
    name="parquet mirror",
    urls=tuple(f"https://hub.test/{split}.parquet" for split in ("train", "validation", "test")),
    format="parquet",
)


def make_zip(texts: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for split, text in texts.items():
            archive.writestr(f"wikitext-2/wiki.{split}.tokens", text.encode("utf-8"))
    return buffer.getvalue()


def make_parquet(text: str) -> bytes:
    """One row per line as the Hugging Face builder wrote it: blank lines become ""."""
    parquet = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    rows = [line if line.strip() else "" for line in text.splitlines(keepends=True)]
    buffer = io.BytesIO()
    parquet.write_table(pyarrow.table({"text": rows}), buffer)
    return buffer.getvalue()


class FakeOpener:
    """Stands in for urllib's opener: url -> bytes, or an exception to raise."""

    def __init__(self, responses: dict):
        self.responses = responses
        self.requests = []  # (url, User-Agent) in the order asked

    def open(self, request: urllib.request.Request, timeout: float | None = None):
        self.requests.append((request.full_url, request.get_header("User-agent")))
        response = self.responses.get(request.full_url, urllib.error.URLError("unknown host"))
        if isinstance(response, Exception):
            raise response
        return io.BytesIO(response)


def http_error(url: str, code: int, reason: str) -> urllib.error.HTTPError:
    return urllib.error.HTTPError(url, code, reason, None, None)


def test_download_falls_back_to_the_next_mirror(tmp_path):
    # Given a mirror answering 403 and a parquet mirror serving the files,
    zip_url = ZIP_MIRROR.urls[0]
    parquet = dict(
        zip(PARQUET_MIRROR.urls, map(make_parquet, DOWNLOAD_CORPUS.values()), strict=True)
    )
    opener = FakeOpener({zip_url: http_error(zip_url, 403, "Forbidden"), **parquet})
    # When downloading,
    source = data.download_wikitext2(
        tmp_path / "dl",
        mirrors=(ZIP_MIRROR, PARQUET_MIRROR),
        opener=opener,
        checksums=DOWNLOAD_SHA256,
    )
    # Then both were tried in order, not with Python's default agent, and the
    # original bytes were rebuilt from the parquet rows.
    assert [url for url, _ in opener.requests] == [zip_url, *PARQUET_MIRROR.urls]
    assert all(not agent.startswith("Python-urllib") for _, agent in opener.requests)
    for split, text in DOWNLOAD_CORPUS.items():
        assert source.paths[split] == tmp_path / "dl" / f"{split}.txt"
        assert source.paths[split].read_bytes() == text.encode()


def test_download_skips_a_mirror_whose_checksum_differs(tmp_path):
    altered = make_zip({**DOWNLOAD_CORPUS, "test": " the cat \n"})
    opener = FakeOpener(
        {ZIP_MIRROR.urls[0]: altered, ZIP_MIRROR_2.urls[0]: make_zip(DOWNLOAD_CORPUS)}
    )
    source = data.download_wikitext2(
        tmp_path / "dl",
        mirrors=(ZIP_MIRROR, ZIP_MIRROR_2),
        opener=opener,
        checksums=DOWNLOAD_SHA256,
    )
    assert len(opener.requests) == 2
    assert source.paths["test"].read_bytes() == DOWNLOAD_CORPUS["test"].encode()


def test_download_error_lists_every_mirror_tried(tmp_path):
    # Given three mirrors failing three ways (403, unreachable, not a zip),
    bad_zip = data.Mirror(name="bad zip", urls=("https://bad.test/wt2.zip",), format="zip")
    opener = FakeOpener(
        {
            ZIP_MIRROR.urls[0]: http_error(ZIP_MIRROR.urls[0], 403, "Forbidden"),
            bad_zip.urls[0]: b"<html>not a zip</html>",
        }
    )
    with pytest.raises(data.DataError) as excinfo:
        data.download_wikitext2(
            tmp_path / "dl",
            mirrors=(ZIP_MIRROR, PARQUET_MIRROR, bad_zip),
            opener=opener,
            checksums=DOWNLOAD_SHA256,
        )
    # Then one error names each mirror, url and reason, and how to pass a folder.
    message = str(excinfo.value)
    for mirror in (ZIP_MIRROR, PARQUET_MIRROR, bad_zip):
        assert mirror.name in message and mirror.urls[0] in message
    assert "HTTP 403 Forbidden" in message and "unknown host" in message
    assert "BadZipFile" in message
    assert "--data_dir" in message and data.ENV_VAR in message
    assert not (tmp_path / "dl").exists()


def test_load_without_source_downloads_then_reuses_the_cache(tmp_path, monkeypatch):
    # Given no folder, and the small corpus standing in for wikitext-2-v1,
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    # Patched where they are looked up: the download in sources, the cache key in corpus.
    monkeypatch.setattr(data.sources, "SHA256", DOWNLOAD_SHA256)
    fingerprint = data.sources._fingerprint(DOWNLOAD_SHA256[split] for split in data.SPLITS)
    monkeypatch.setattr(data.corpus, "STANDARD_FINGERPRINT", fingerprint)
    monkeypatch.setattr(data.sources, "MIRRORS", (ZIP_MIRROR,))
    opener = FakeOpener({ZIP_MIRROR.urls[0]: make_zip(DOWNLOAD_CORPUS)})
    monkeypatch.setattr(urllib.request, "build_opener", lambda: opener)
    # When loaded twice, Then it downloads once and reads the files it checked.
    corpus = data.load_wikitext2(cache_dir=tmp_path / "cache")
    again = data.load_wikitext2(cache_dir=tmp_path / "cache")
    assert len(opener.requests) == 1
    assert corpus.vocab.decode(corpus.test) == ["the", "dog", "<eos>", "<eos>"]
    np.testing.assert_array_equal(again.train, corpus.train)


def test_default_mirrors_start_with_the_original_files():
    assert [mirror.format for mirror in data.MIRRORS][:2] == ["zip", "parquet"]
    assert all(url.startswith("https://") for m in data.MIRRORS for url in m.urls)
    with pytest.raises(ValueError, match="3 url"):
        data.Mirror(name="x", urls=("https://a.test/x",), format="parquet")


# ----------------------------------------------------------------------------
# Concurrent first loads.

LOAD_SCRIPT = """
import json, pathlib, sys, time
from ee_jax import data
source, cache, ready, go, out = sys.argv[1:]
pathlib.Path(ready).touch()
while not pathlib.Path(go).exists():
    time.sleep(0.005)
corpus = data.load_wikitext2(source, cache_dir=cache, verify_checksums=False)
result = {split: getattr(corpus, split).tolist() for split in data.SPLITS}
pathlib.Path(out).write_text(json.dumps({"words": corpus.vocab.words, **result}))
"""


def test_concurrent_first_loads_all_succeed_with_identical_data(tmp_path):
    # Given three processes started on one fresh cache, released together,
    folder = write_corpus(tmp_path / "src", SMALL_CORPUS)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    go = tmp_path / "go"
    processes = []
    for index in range(3):
        args = [
            folder,
            tmp_path / "cache",
            tmp_path / f"ready{index}",
            go,
            tmp_path / f"out{index}",
        ]
        command = [sys.executable, "-c", LOAD_SCRIPT, *map(str, args)]
        processes.append(
            subprocess.Popen(
                command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    try:
        deadline = time.monotonic() + 120  # imports are slow on a loaded machine
        while not all((tmp_path / f"ready{i}").exists() for i in range(3)):
            assert all(p.poll() is None for p in processes), "a process died while starting"
            assert time.monotonic() < deadline, "processes did not start"
            time.sleep(0.01)
        go.touch()
        logs = [process.communicate(timeout=300)[0].decode() for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    # Then every one returns, with the same ids and vocabulary.
    assert [process.returncode for process in processes] == [0, 0, 0], "\n".join(logs)
    results = [json.loads((tmp_path / f"out{i}").read_text()) for i in range(3)]
    assert results[0] == results[1] == results[2]
    assert tuple(results[0]["words"]) == SMALL_VOCAB
    assert {split: len(results[0][split]) for split in data.SPLITS} == SMALL_COUNTS


# Every line break str.splitlines knows (Python's documentation lists them).
LINE_BREAKS = ("\r\n", "\n", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")


@pytest.mark.parametrize("eos_at_end", [False, True])
@pytest.mark.parametrize("ending", ["", *LINE_BREAKS])
@pytest.mark.parametrize("break_", LINE_BREAKS)
def test_encode_text_ends_every_line_with_one_eos_whatever_its_line_break(
    break_, ending, eos_at_end
):
    # Given text whose lines (one of them empty) end in this line break, and whose
    # last line ends in `ending` (none, or a line break).
    vocab = data.Vocabulary(("<eos>", "<unk>", "the", "cat", "sat"))
    text = break_.join(["the cat", "", " sat  the "]) + break_ + "cat sat" + ending
    # When it is encoded.
    words = data.encode_text(text, vocab, eos_at_end=eos_at_end).words
    # Then each line is line.split() + ["<eos>"] (the corpus protocol, by hand), the
    # last line's <eos> coming from its line break or else from eos_at_end.
    lines = ["the cat", "", " sat  the ", "cat sat"]
    expected = [word for line in lines for word in line.split() + ["<eos>"]]
    assert words == (expected if ending or eos_at_end else expected[:-1])
