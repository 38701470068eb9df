"""Tokens and vocabulary: WikiText-2's tokenisation, word <-> id maps, text encoding.

Each line of a split becomes ``line.split() + ["<eos>"]`` (``tokenize``, the
standard protocol). The ``Vocabulary`` of a corpus is built from train, ids in
descending train frequency (ties in first-occurrence order), so that an
adaptive softmax's clusters are contiguous id ranges (``token_frequencies``
gives their share of tokens). ``encode_text`` turns plain text into a corpus's
ids with WikiText's own tokenisation rules (Merity et al. 2016,
arXiv:1609.07843, Moses-style).

Shape legend: N tokens, T tokens of a split, V words in the vocabulary.
"""

import collections
import dataclasses
import re
from collections.abc import Iterable, Sequence

import numpy as np

EOS = "<eos>"
UNK = "<unk>"  # WikiText's own token for words outside its vocabulary


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
    """Plain text -> token ids with WikiText-2's tokenisation rules.

    Each line is its words then "<eos>", as in the corpus (`tokenize`); a line ends
    at any line break `str.splitlines` knows ("\n", "\r\n", "\r", "\u2028"...). A
    last line without a line break gets its "<eos>" only with `eos_at_end`; text
    ending in a line break already ends with that line's "<eos>" (never a second),
    and empty text has no lines (no tokens).

    Words not in the vocabulary become "<unk>" (the corpus's own unknown word), each
    listed in `unknown` with a hint when a change of case would find it ("japan":
    'did you mean "Japan"?'). Punctuation is split off only where the word with it
    is unknown, so the vocabulary's "U.S." stays whole.

    Returns:
      EncodedText: ids [N] int32, words [N] and the unknown words with their hints.

    Raises:
      ValueError: the vocabulary has no "<unk>" (needed for unknown words) and the
        text has some.
    """
    words: list[str] = []
    for ended in text.splitlines(keepends=True):  # each line with its break, if any
        (line,) = ended.splitlines()
        has_break = line != ended
        line = _CLITIC.sub(r" \1", _INFIX.sub(lambda m: f" @{m.group(1) or m.group(2)}@ ", line))
        for raw in line.split():
            words.extend(_split_punctuation(raw, vocab))
        if has_break or eos_at_end:
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
