"""Tests for ee_jax.data: WikiText-2 counts, vocabulary, evaluation windows, errors.

The reference corpus is the real WikiText-2 when ``$EE_JAX_DATA_DIR`` is set or
``../shared/data/wikitext-2`` exists next to the repository, and otherwise a
small corpus written here with hand-counted sizes. It is prepared once per
session in a temporary cache.
"""

import dataclasses
import os
import shutil
import socket
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
SMALL_VOCAB = ("the", "cat", "sat", "on", "Senjō", "<eos>", "=", "Heading", "dog", "down")


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
    assert corpus.vocab.words == SMALL_VOCAB  # first-occurrence order in train
    assert corpus.vocab.decode(corpus.test) == ["<eos>", "the", "=", "down", "<eos>"]


def test_ids_match_a_direct_reading_of_the_files(corpus, reference):
    tokens = read_directly(reference.source_dir)
    words = list(dict.fromkeys(tokens["train"]))
    index = {word: i for i, word in enumerate(words)}
    assert corpus.vocab.words == tuple(words)
    for split in data.SPLITS:
        expected = np.array([index[word] for word in tokens[split]], np.int32)
        np.testing.assert_array_equal(getattr(corpus, split), expected)


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
    assert excinfo.traceback[-1].path.name == "data.py"  # not from deep inside TFDS
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


def test_error_on_test_words_outside_train(tmp_path):
    folder = write_corpus(tmp_path / "src", {**SMALL_CORPUS, "test": "the unicorn\n"})
    with pytest.raises(data.DataError, match=r"test split has words outside train.*'unicorn'"):
        data.load_wikitext2(folder, cache_dir=tmp_path / "cache", verify_checksums=False)


def test_error_offline_without_source(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", offline)
    with pytest.raises(data.DataError, match=f"{data.ENV_VAR} is unset") as excinfo:
        data.load_wikitext2(cache_dir=tmp_path / "cache")
    assert "train.txt" in str(excinfo.value)
