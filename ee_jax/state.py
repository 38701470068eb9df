"""The model's recurrent state: all a pass needs from the text before it.

One `RecurrentState` serves every road that continues a text: training windows
that carry their state (truncated BPTT), evaluation in the continuous protocol,
token-by-token decoding, self-speculative decoding (each row at its own
position) and `decode.save_state` / `load_state`.

    RecurrentState
      position  [B] int32       positions each row has read (index of its next one)
      layers    mixer state     every layer's state after the last position read,
                                stacked on a leading layer axis [L, B, ...]

The mixer state is typed by the model's mixer:
  "bk"    `BKState`: per head, G_ii of the last position read and, with
          bk_value_dim P > 0, the causal solve's values y (`bk_core.causal_solve`);
  "lstm"  `LSTMState`: the LSTM's cell and hidden vectors (`blocks.LSTMLayer`);
  "none", "attention"  None: the mixer-free ablation keeps nothing, and the
          attention mixer cannot continue a text (it would need a key-value cache;
          `check_carry`).
"""

from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ee_jax.bk_core import causal_initial_state
from ee_jax.config import ModelConfig


class BKState(NamedTuple):
    """A BK layer's state after a position (`model.BKLayer`); leading axes [..., B]."""

    green: jax.Array  # [..., B, H] complex64: G_ii of the last position read
    solved: jax.Array | None  # [..., B, H, P] complex64: values y_i; None when P = 0


class LSTMState(NamedTuple):
    """An LSTM layer's state after a position (`blocks.LSTMLayer`); leading axes [..., B]."""

    cell: jax.Array  # [..., B, D] float32: the memory cell c
    hidden: jax.Array  # [..., B, D] float32: the output h


MIXER_STATES = {"bk": BKState, "lstm": LSTMState}  # the mixers that keep a state


def mixer_state(config: ModelConfig, batch: int) -> BKState | LSTMState | None:
    """One layer's mixer state before the first position (zeros), for `batch` rows."""
    if config.mixer == "lstm":
        zeros = jnp.zeros((batch, config.d_model), jnp.float32)
        return LSTMState(zeros, zeros)
    if config.mixer != "bk":
        return None
    shape = (batch, config.bk_heads)
    solved = None
    if config.bk_value_dim:
        solved = jnp.zeros((*shape, config.bk_value_dim), jnp.complex64)
    return BKState(causal_initial_state(shape), solved)


@flax.struct.dataclass
class RecurrentState:
    """Every row's position and every layer's mixer state (module docstring)."""

    position: jax.Array  # [B] int32: positions read so far by each row
    layers: Any  # `mixer_state` of every layer, stacked: leaves [L, B, ...]; or None

    @classmethod
    def make(cls, config: ModelConfig, batch: int) -> "RecurrentState":
        """The state before the first position of `batch` rows: position 0, zeros."""
        stack = lambda x: jnp.broadcast_to(x, (config.n_layers, *x.shape))  # noqa: E731
        layers = jax.tree.map(stack, mixer_state(config, batch))
        return cls(position=jnp.zeros((batch,), jnp.int32), layers=layers)

    @property
    def batch_size(self) -> int:
        return self.position.shape[0]

    def layer(self, index) -> Any:
        """Layer `index`'s mixer state (0-based, may be traced); leaves [B, ...]."""
        return jax.tree.map(lambda x: x[index], self.layers)

    def with_layer(self, index, value) -> "RecurrentState":
        """This state with layer `index`'s mixer state replaced by `value`."""
        layers = jax.tree.map(lambda x, v: x.at[index].set(v), self.layers, value)
        return self.replace(layers=layers)

    def select(self, rows: jax.Array, other: "RecurrentState") -> "RecurrentState":
        """Per-row choice: row b of this state where rows[b] (bool [B]), else other's."""
        position = jnp.where(rows, self.position, other.position)
        layers = jax.tree.map(
            lambda a, b: jnp.where(rows.reshape(1, -1, *[1] * (a.ndim - 2)), a, b),
            self.layers,
            other.layers,
        )
        return RecurrentState(position=position, layers=layers)

    def rows(self, index) -> "RecurrentState":
        """The state of rows `index` (an int array [B'] or a slice): a state of B' rows."""
        layers = jax.tree.map(lambda x: x[:, index], self.layers)
        return RecurrentState(position=self.position[index], layers=layers)


def check_state(state, config: ModelConfig, batch: int) -> None:
    """Raises ValueError unless `state` is a `RecurrentState` of this model for `batch`
    rows (shapes and dtypes of every array)."""
    if not isinstance(state, RecurrentState):
        raise ValueError(f"state must be a RecurrentState, got {type(state).__name__}")
    expected = jax.eval_shape(lambda: RecurrentState.make(config, batch))
    shapes = jax.tree.map(lambda x: (tuple(np.shape(x)), np.dtype(x.dtype)), (state, expected))
    if jax.tree.structure(state) != jax.tree.structure(expected) or shapes[0] != shapes[1]:
        raise ValueError(
            f"the state does not fit this model and batch of {batch} rows: its arrays are "
            f"{jax.tree.leaves(shapes[0])}, this model needs {jax.tree.leaves(shapes[1])}"
        )


def check_carry(config: ModelConfig) -> None:
    """Raises ValueError unless a pass can continue from a state (`RecurrentState`).

    The causal recurrences (BK, LSTM; and the mixer-free ablation, which needs no
    state) can; a bidirectional model reads later positions, and the attention mixer
    would need a key-value cache of every earlier position.
    """
    if config.mixer == "attention":
        raise ValueError(
            'carrying context across passes is built for the recurrent mixers ("bk", '
            '"lstm", "none"); this model\'s mixer is "attention", which would need a key-value '
            "cache"
        )
    if not config.causal:
        raise ValueError(
            "carrying context across passes needs a causal model (causal=True); this one is "
            "bidirectional: each position also reads later positions"
        )
