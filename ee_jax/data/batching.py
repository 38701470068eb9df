"""Language-modelling batches: a token stream cut into rows and fixed-width windows.

``batchify`` cuts a split into B contiguous rows, padding the tail instead of
dropping it; ``LMStream`` pairs every token with the one before it (the first
with ``<eos>``), so evaluation predicts every token of a split exactly once (the
standard protocol) and training reads window ``step % len(stream)`` at step
``step``.

Shape legend: T tokens of a split, B batch rows, S positions per row of a stream,
N positions per window.
"""

import dataclasses
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np


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
