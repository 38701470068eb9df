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

Modules, one job each:
  sources       finding and checking a source folder, ``DataError``, download mirrors
  tfds_builder  the ``WikiText2`` TFDS builder and ``read_lines``
  vocabulary    ``tokenize``, ``Vocabulary``, ``encode_text``, ``token_frequencies``
  corpus        ``Corpus``, ``load_wikitext2`` and its ids cache
  batching      ``Batch``, ``batchify``, ``LMStream`` and its windows

This package re-exports their public names (``from ee_jax.data import X``). The
constants here are copies of the bindings: to change one (``SHA256``,
``MIRRORS``...) in a test, patch the module that defines it.

The data is Merity et al., "Pointer Sentinel Mixture Models" (2016,
arXiv:1609.07843), licensed CC BY-SA 3.0. It is never shipped with the project:
it is read from a folder (argument or ``EE_JAX_DATA_DIR``) or downloaded from
the mirrors in ``MIRRORS``, every file checked against its sha256.

Shape legend: T tokens of a split, B batch rows, S positions per row of a stream,
N positions per window.
"""

from ee_jax.data.batching import (
    Batch,
    LMStream,
    batchify,
    lm_windows,
    make_lm_stream,
    train_batch,
)
from ee_jax.data.corpus import DEFAULT_CACHE_DIR, Corpus, load_wikitext2
from ee_jax.data.sources import (
    DOWNLOAD_TIMEOUT_S,
    ENV_VAR,
    MIRRORS,
    SHA256,
    SOURCE_NAMES,
    SPLITS,
    STANDARD_FINGERPRINT,
    USER_AGENT,
    DataError,
    Mirror,
    SourceFiles,
    download_wikitext2,
    find_source,
    first_invalid_utf8,
    resolve_source_dir,
)
from ee_jax.data.tfds_builder import WikiText2, read_lines
from ee_jax.data.vocabulary import (
    EOS,
    UNK,
    EncodedText,
    Vocabulary,
    encode_text,
    token_frequencies,
    tokenize,
)

__all__ = [
    # sources
    "SPLITS",
    "ENV_VAR",
    "SOURCE_NAMES",
    "SHA256",
    "STANDARD_FINGERPRINT",
    "DataError",
    "SourceFiles",
    "resolve_source_dir",
    "first_invalid_utf8",
    "find_source",
    "Mirror",
    "MIRRORS",
    "USER_AGENT",
    "DOWNLOAD_TIMEOUT_S",
    "download_wikitext2",
    # tfds_builder
    "WikiText2",
    "read_lines",
    # vocabulary
    "EOS",
    "UNK",
    "tokenize",
    "Vocabulary",
    "EncodedText",
    "encode_text",
    "token_frequencies",
    # corpus
    "DEFAULT_CACHE_DIR",
    "Corpus",
    "load_wikitext2",
    # batching
    "Batch",
    "batchify",
    "LMStream",
    "make_lm_stream",
    "lm_windows",
    "train_batch",
]
