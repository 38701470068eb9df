"""The residual block and its sequence mixers (Flax Linen).

Shape legend: B batch, N positions, D width, H BK heads, P values per head.

    Block:    h + dropout(MoE(LN(h)) + mixer(LN(h)))       [B, N, D] -> [B, N, D]
              (num_experts = 0: no MoE FFN, h + dropout(mixer(LN(h))))
    mixers:   "bk"         BKLayer: the diagonal of the resolvent (T - zI)^-1 of
                           T = H0 + diag(v(x)) per head (ResNet-BK), causal or not;
              "lstm"       LSTMLayer: an LSTM (the recurrent baseline);
              "attention"  causal multi-head self-attention (an ablation);
              "none"       no sequence mixing (an ablation).

A block's methods are the pieces the training pass, the halting loop and decoding
run: the whole block (`__call__`), the mixer over a sequence (`mix`, `mix_from`),
at one position (`mix_step`), a skipped block's state update (`propagate`), the
per-token rest (`feed_forward`), and the verify pass (`trace_from`).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ee_jax.bk_core import causal_solve, causal_solve_step, causal_step, resolvent_diagonal
from ee_jax.config import ModelConfig
from ee_jax.moe import MoEFeedForward
from ee_jax.state import BKState, LSTMState, mixer_state


def head_z(config: ModelConfig) -> jax.Array:
    """z of each BK head: Re z shared, Im z log-spaced from z_imag[0] to z_imag[1]; [H]."""
    low, high = config.z_imag
    imag = np.geomspace(low, high, config.bk_heads)
    return jnp.asarray(config.z_real + 1j * imag, jnp.complex64)


class BKLayer(nn.Module):
    """Sequence mixing through the resolvent of T = H0 + diag(v(x)), one T per head.

    Reads the causal (or bidirectional) diagonal G_ii of every head and, with
    bk_value_dim = P > 0, the causal solve y_i = [(T[:i+1, :i+1] - zI)^-1 u[:i+1]]_i
    of P learned values u per head and token (`bk_core.causal_solve`): a linear
    recurrence with the data-dependent decay -G_ii, so a head carries P numbers
    of context instead of one.
    """

    config: ModelConfig

    def setup(self):
        config = self.config
        self.potential = nn.Dense(config.bk_heads, name="potential")
        if config.bk_value_dim:
            self.values = nn.Dense(config.bk_heads * config.bk_value_dim, name="values")
        self.project = nn.Dense(config.d_model, name="project")

    def __call__(self, x: jax.Array, state: BKState) -> tuple[jax.Array, BKState]:
        """[B, N, D] normalised input and the state before it (G [B, H], y [B, H, P] of
        the previous position; zeros before the first) -> ([B, N, D] BK features, the
        state after position N-1). A bidirectional model ignores and returns `state`."""
        config = self.config
        if not config.causal:
            diag = jnp.swapaxes(self.potentials(x), -1, -2)  # [B, H, N]
            off = jnp.float32(config.h0_offdiagonal)
            z = jnp.broadcast_to(head_z(config), diag.shape[:-1])  # [B, H]
            green = resolvent_diagonal(diag, off, off, z, method=config.bk_method)  # [B, H, N]
            return self.features_to_output((jnp.swapaxes(green, -1, -2), None)), state
        features, states = self.trace(x, state)
        return features, jax.tree.map(lambda s: s[:, -1], states)

    def trace(self, x: jax.Array, state: BKState) -> tuple[jax.Array, BKState]:
        """The causal core keeping the state after every position: [B, N, D] and the
        state before position 0 -> ([B, N, D] features, BKState(G [B, N, H],
        y [B, N, H, P] or None)), where [:, i] is the state after position i (what
        decoding would hold there)."""
        config = self.config
        diag = jnp.swapaxes(self.potentials(x), -1, -2)  # [B, H, N]
        off = jnp.float32(config.h0_offdiagonal)
        z = jnp.broadcast_to(head_z(config), diag.shape[:-1])  # [B, H]
        if not config.bk_value_dim:
            green = resolvent_diagonal(
                diag,
                off,
                off,
                z,
                causal=True,
                method=config.bk_method,
                initial=state.green,
                link=(off, off),
            )  # [B, H, N]
            green = jnp.swapaxes(green, -1, -2)  # [B, N, H]
            return self.features_to_output((green, None)), BKState(green, None)
        values = jnp.moveaxis(self.value_vectors(x), 1, 2)  # [B, H, N, P]
        green, solved = causal_solve(
            diag, off, off, z, values, method=config.bk_method, initial=state, link=(off, off)
        )  # [B, H, N], [B, H, N, P]
        readout = BKState(jnp.swapaxes(green, -1, -2), jnp.moveaxis(solved, 2, 1))
        return self.features_to_output(readout), readout  # [B, N, H(, P)]

    def step(self, x: jax.Array, state: BKState) -> tuple[jax.Array, BKState]:
        """One position of the causal core: x [B, D], the BKState of the previous
        position (zeros before the first) -> (features [B, D], new state)."""
        state = self.recur(x, state)
        return self.features_to_output(state), state

    def recur(self, x: jax.Array, state: BKState) -> BKState:
        """The state update of `step` alone (no output projection)."""
        off = jnp.float32(self.config.h0_offdiagonal)
        z = head_z(self.config)
        if not self.config.bk_value_dim:
            return BKState(causal_step(state.green, self.potentials(x), off * off, z)[0], None)
        return BKState(
            *causal_solve_step(state, self.potentials(x), off, off * off, z, self.value_vectors(x))[
                0
            ]
        )

    def potentials(self, x: jax.Array) -> jax.Array:
        """Diagonal of T per head: H0's diagonal plus the learned potential; [..., H]."""
        return self.config.h0_diagonal + self.potential(x)

    def value_vectors(self, x: jax.Array) -> jax.Array:
        """Values u per head; [..., H, P]."""
        config = self.config
        return self.values(x).reshape(*x.shape[:-1], config.bk_heads, config.bk_value_dim)

    def features_to_output(self, readout) -> jax.Array:
        """(G [..., H], y [..., H, P] or None) complex -> [..., D] via [Re, Im] of Im(z) * G
        (and of Im(z) * y).

        For a real potential T is symmetric, so |G_ii| <= 1 / Im(z): scaling by
        Im(z) puts every head in the unit disk whatever its z (unscaled, a head
        with Im z = 0.05 reaches 20 and dominated the first gradients); likewise
        |Im(z) y_i| <= |u[:i+1]|_2.
        """
        green, solved = readout
        imag = head_z(self.config).imag  # [H]
        parts = [green * imag]
        if self.config.bk_value_dim:
            parts.append((solved * imag[:, None]).reshape(*solved.shape[:-2], -1))
        features = jnp.concatenate([p.real for p in parts] + [p.imag for p in parts], -1)
        return self.project(features)


class LSTMLayer(nn.Module):
    """The "lstm" mixer: one LSTM layer of D units (flax `nn.OptimizedLSTMCell`;
    Hochreiter & Schmidhuber 1997, gates as in Zaremba et al. 2014, arXiv
    1409.2329), D -> D, causal; its (cell, hidden) state is carried like BK's."""

    config: ModelConfig

    def setup(self):
        self.cell = nn.OptimizedLSTMCell(self.config.d_model, name="cell")

    def __call__(self, x: jax.Array, state: LSTMState) -> tuple[jax.Array, LSTMState]:
        """[B, N, D] input and the state before it -> ([B, N, D] hidden outputs, the
        state after position N-1)."""
        last, outputs = self._scan(lambda cell, carry, x: cell(carry, x), x, state)
        return outputs, LSTMState(*last)

    def trace(self, x: jax.Array, state: LSTMState) -> tuple[jax.Array, LSTMState]:
        """`__call__` keeping the state after every position: -> ([B, N, D] outputs,
        LSTMState with leaves [B, N, D]); [:, i] the state after position i."""

        def body(cell, carry, x):
            carry, _ = cell(carry, x)
            return carry, carry

        states = LSTMState(*self._scan(body, x, state)[1])
        return states.hidden, states

    def step(self, x: jax.Array, state: LSTMState) -> tuple[jax.Array, LSTMState]:
        """One position: x [B, D] and the state before it -> (output [B, D], state)."""
        carry, output = self.cell(tuple(state), x)
        return output, LSTMState(*carry)

    def _scan(self, body, x, state):
        """nn.scan of body(cell, carry, x_t) over the positions of x [B, N, D]."""
        scan = nn.scan(
            body, variable_broadcast="params", split_rngs={"params": False}, in_axes=1, out_axes=1
        )
        return scan(self.cell, tuple(state), x)


class CausalSelfAttention(nn.Module):
    """The "attention" mixer: causal multi-head self-attention (flax's
    `nn.MultiHeadDotProductAttention`, Vaswani et al. 2017), D -> D."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, N, D] normalised input -> [B, N, D]."""
        mask = nn.make_causal_mask(jnp.ones(x.shape[:-1], jnp.int32))  # [B, 1, N, N]
        attention = nn.MultiHeadDotProductAttention(
            num_heads=self.config.attention_heads, deterministic=True, name="attention"
        )
        return attention(x, x, mask=mask)


class Block(nn.Module):
    """Pre-norm residual block: MoE FFN plus the scaled sequence mixer on LN(h)."""

    config: ModelConfig

    def setup(self):
        mixer = self.config.mixer
        self.norm = nn.LayerNorm(name="norm")
        if self.config.num_experts:
            self.moe = MoEFeedForward(self.config.num_experts, self.config.top_k, name="moe")
        if mixer == "lstm":
            self.lstm = LSTMLayer(self.config, name="lstm")
        if mixer == "bk":
            self.bk = BKLayer(self.config, name="bk")
            self.bk_scale = self.param("bk_scale", nn.initializers.ones, ())
        if mixer == "attention":
            self.attention = CausalSelfAttention(self.config, name="attention")
        self.dropout = nn.Dropout(self.config.dropout)

    def __call__(
        self,
        h: jax.Array,
        deterministic: bool = True,
        mask: jax.Array | None = None,
        state: BKState | None = None,
    ) -> tuple[jax.Array, jax.Array, BKState]:
        """[B, N, D] -> ([B, N, D], MoE load-balancing loss [], BK state after it).

        mask [B, N] (1 = real token) weights the balance loss only; default all.
        state: the mixer state before position 0 (`state.mixer_state`); default zeros.
        """
        if state is None:
            state = mixer_state(self.config, h.shape[0])
        x, mixed, state = self.mix_from(h, state)
        if self.config.num_experts:
            update, balance_loss = self.moe(x, mask)
            mixed = update + mixed
        else:
            balance_loss = jnp.zeros(())
        h = h + self.dropout(mixed, deterministic=deterministic)
        return h, balance_loss, state

    def mix(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The sequence part of the block from a fresh state: h [B, N, D] -> (LN(h),
        mixer output), both [B, N, D]. The rest, h + MoE(LN(h)) + mixer output, is
        per token."""
        return self.mix_from(h, mixer_state(self.config, h.shape[0]))[:2]

    def mix_from(self, h: jax.Array, state: BKState) -> tuple[jax.Array, jax.Array, BKState]:
        """`mix` continuing from the mixer state `state` (`state.mixer_state`): -> (LN(h),
        mixer output, state after the last position)."""
        x = self.norm(h)
        if self.config.mixer == "bk":
            features, state = self.bk(x, state)
            return x, self.bk_scale * features, state
        if self.config.mixer == "lstm":
            return x, *self.lstm(x, state)
        if self.config.mixer == "attention":
            return x, self.attention(x), state
        return x, jnp.zeros_like(x), state

    def trace_from(self, h: jax.Array, state: BKState) -> tuple[jax.Array, BKState]:
        """The block at inference continuing from the mixer state `state`, keeping it
        after every position: h [B, N, D] -> (block output [B, N, D], the state with
        leaves [B, N, ...]), [:, i] the state after position i (`BKLayer.trace`)."""
        x = self.norm(h)
        if self.config.mixer == "bk":
            features, states = self.bk.trace(x, state)
            mixed = self.bk_scale * features
        elif self.config.mixer == "lstm":
            mixed, states = self.lstm.trace(x, state)
        else:  # no mixer: the state never changes
            mixed = jnp.zeros_like(x)
            states = jax.tree.map(
                lambda s: jnp.broadcast_to(s[:, None], (s.shape[0], h.shape[1], *s.shape[1:])),
                state,
            )
        return h + (self.feed_forward(x) + mixed), states  # the sum of __call__

    def mix_step(self, h: jax.Array, state: BKState) -> tuple[jax.Array, jax.Array, BKState]:
        """`mix` at one position when decoding: h [B, D] -> (LN(h), mixer output, state)."""
        x = self.norm(h)
        if self.config.mixer == "lstm":
            return x, *self.lstm.step(x, state)
        if self.config.mixer != "bk":
            return x, jnp.zeros_like(x), state
        features, state = self.bk.step(x, state)
        return x, self.bk_scale * features, state

    def feed_forward(self, x: jax.Array) -> jax.Array:
        """The MoE FFN of normalised tokens x [..., D] -> [..., D] (inference); zeros
        without one (num_experts = 0)."""
        return self.moe(x)[0] if self.config.num_experts else jnp.zeros_like(x)

    def propagate(self, h: jax.Array, state: BKState) -> BKState:
        """A skipped block's mixer state update for an exited token (norm, potentials,
        values and the recurrence; no MoE): later tokens still see it as context."""
        if self.config.mixer == "lstm":
            return self.lstm.step(self.norm(h), state)[1]
        if self.config.mixer != "bk":
            return state
        return self.bk.recur(self.norm(h), state)
