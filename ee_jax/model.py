"""The early-exit ResNet-BK language model (Flax Linen).

Shape legend: B batch, N positions, D width, V vocabulary, L layers, H BK heads.

    tokens [B, N] -> embed -> h_0 [B, N, D]
    h_l = h_{l-1} + dropout(MoE(LN(h_{l-1})) + s_l * BK(LN(h_{l-1})))   l = 1..L
          (in training, with layer_dropout, a row may keep h_{l-1}: `_skip_rows`)
    exit l: p_l(w) = output_l(LN_l(h_l))                                 [B, N, V]

The output layer (`ee_jax.adaptive`) is a full softmax, logits = x @ U^T + b, or
an adaptive softmax (head plus tail clusters), per exit, shared, or tied to the
input embedding (for the adaptive softmax: adaptive input, Baevski & Auli 2019,
arXiv 1809.10853, sharing the tail embeddings and projections).

With position "none" the model has no absolute position table: order comes
from the causal recurrence alone, so it reads sequences of any length and can
continue from a `RecurrentState` (`ee_jax.state`: every row's position and
every layer's mixer state after the positions read so far, `hidden_states_from`):
a long text is read in chunks, training windows carry their state (truncated
BPTT), and generation never ends.

Parameters ({"params": ...}):
    embedder   `heads.Embedder`: token table, position table, adaptive input
    blocks     `blocks.Block` x L, stacked on a leading layer axis
    exits      `heads.ExitHead` x L (LayerNorm, exit classifier), stacked likewise
    output     `heads.OutputLayers`: the output weights, per exit or shared
Stacked parameters let the training path scan over the layers and the halting
loop pick layer l with `jax.tree.map(lambda p: p[l], stack)`. The last exit is the
model's final head. Checkpoints of the earlier flat layout are migrated on
restore (`ee_jax.layout`).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ee_jax import adaptive
from ee_jax.blocks import Block
from ee_jax.config import ModelConfig
from ee_jax.heads import Embedder, ExitHead, OutputLayers
from ee_jax.state import RecurrentState


def check_tokens(tokens, config: ModelConfig, *, stream: bool = False) -> None:
    """Raises ValueError for bad token arrays; checks values only when concrete.

    The one checker of token ids for every public entry point (forward, halting
    loop, decoding, evaluation, scripts). JAX clamps out-of-range gathers silently
    (id V would read row V-1, id -1 the last row), so the ids are checked on the
    host; under jit (a tracer) only shapes and dtypes are.

    Args:
      tokens: [B, N] integer ids in [0, V) (an array or nested sequences).
      config: the model's config (vocab_size, n_seq, position: only a "learned"
        position table limits N to n_seq).
      stream: tokens are a whole stream [B, S] read in windows of n_seq positions
        (`LMStream`): S may exceed n_seq.
    """
    if not isinstance(tokens, jax.core.Tracer) and not hasattr(tokens, "dtype"):
        tokens = np.asarray(tokens)  # lists and scalars: numpy infers the dtype
    shape, dtype = np.shape(tokens), np.dtype(tokens.dtype)
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"tokens must have an integer dtype, got {dtype}")
    if len(shape) != 2 or shape[1] == 0:
        raise ValueError(f"tokens must have shape (B, N) with N >= 1, got {shape}")
    if not stream and config.position == "learned" and shape[1] > config.n_seq:
        raise ValueError(f"tokens have N = {shape[1]} positions, more than n_seq = {config.n_seq}")
    if isinstance(tokens, jax.core.Tracer):
        return
    values = np.asarray(tokens)
    if values.size and (values.min() < 0 or values.max() >= config.vocab_size):
        raise ValueError(
            f"token ids must be in [0, vocab_size={config.vocab_size}), "
            f"got min {values.min()} and max {values.max()}"
        )


def check_positions(config: ModelConfig, start: int, count: int) -> None:
    """Raises ValueError unless the `count` positions from `start` are rows of a
    "learned" position table (0..n_seq-1): inside jit, a gather past it would
    silently read the last row. Position "none" reads any length."""
    if config.position == "learned" and start + count > config.n_seq:
        raise ValueError(
            f"positions {start}..{start + count - 1} pass the position table of "
            f'n_seq={config.n_seq} rows (position "learned"); a model with position "none" '
            f"reads any length"
        )


class EarlyExitLM(nn.Module):
    """ResNet-BK language model with an exit head after every block."""

    config: ModelConfig

    def setup(self):
        self.embedder = Embedder(self.config, name="embedder")
        self.embed_dropout = nn.Dropout(self.config.dropout)
        self.blocks = self.param("blocks", self._init_stack, Block)
        self.exits = self.param("exits", self._init_stack, ExitHead)
        self.output = OutputLayers(self.config, name="output")

    def _init_stack(self, rng: jax.Array, module_type):
        """L independently initialised `module_type` parameters, stacked on axis 0."""
        module = module_type(self.config, parent=None)
        dummy = jnp.zeros((1, 1, self.config.d_model))
        init = lambda key: module.init(key, dummy)["params"]  # noqa: E731
        return jax.vmap(init)(jax.random.split(rng, self.config.n_layers))

    def _at(self, stack, layer, module_type, method, *args, **kwargs):
        """`module_type.method` of layer `layer` (0-based, may be traced) of a stack."""
        params = jax.tree.map(lambda p: p[layer], stack)
        module = module_type(self.config, parent=None)
        return module.apply({"params": params}, *args, method=method, **kwargs)

    # ------------------------------------------------------------ pieces

    def embed(self, tokens: jax.Array, deterministic: bool = True, offset=0) -> jax.Array:
        """[B, N] ids at positions offset..offset+N-1 -> [B, N, D] (token embeddings,
        plus the position table's rows for position "learned"). offset: [] or [B] (each
        row's first position, `RecurrentState.position`)."""
        check_tokens(tokens, self.config)
        length = tokens.shape[1]
        if not isinstance(offset, jax.core.Tracer):
            check_positions(self.config, int(np.max(offset)), length)
        positions = jnp.asarray(offset, jnp.int32)[..., None] + jnp.arange(length)
        h = self.embedder(tokens, positions)
        return self.embed_dropout(h, deterministic=deterministic)

    def embed_position(self, tokens: jax.Array, position) -> jax.Array:
        """[B] ids at positions [B] (or one position; may be traced) -> [B, D]."""
        check_tokens(tokens[:, None], self.config)
        return self.embedder(tokens, position)

    def block(self, h: jax.Array, layer, dropout_rng: jax.Array | None = None, mask=None):
        """Block `layer` (0-based, may be traced) on [B, N, D] -> ([B, N, D], loss []).

        Dropout is on when `dropout_rng` is given (folded with the layer index);
        mask [B, N] (1 = real token) weights the MoE balance loss.
        """
        params = jax.tree.map(lambda p: p[layer], self.blocks)
        return self._apply_block(params, h, layer, dropout_rng, mask, None)[:2]

    def _apply_block(self, params, h, layer, dropout_rng, mask, state):
        """One block (unstacked parameters) from its mixer state -> (h, balance loss,
        mixer state after it); see `block`."""
        block = Block(self.config, parent=None)
        if dropout_rng is None:
            return block.apply({"params": params}, h, True, mask, state)
        rngs = {"dropout": jax.random.fold_in(dropout_rng, layer)}
        return block.apply({"params": params}, h, False, mask, state, rngs=rngs)

    # The pieces of block `layer` that the halting loop and decoding run apart (`Block`).

    def block_mix(self, layer, h):
        """`Block.mix` of block `layer`: h [B, N, D] -> (LN(h), mixer output)."""
        return self._at(self.blocks, layer, Block, Block.mix, h)

    def block_mix_from(self, layer, h, state):
        """`Block.mix_from`: -> (LN(h), mixer output, mixer state after h)."""
        return self._at(self.blocks, layer, Block, Block.mix_from, h, state)

    def block_mix_step(self, layer, h, state):
        """`Block.mix_step` at one position: h [B, D] -> (LN(h), mixer output, state)."""
        return self._at(self.blocks, layer, Block, Block.mix_step, h, state)

    def block_feed_forward(self, layer, x):
        """`Block.feed_forward`: normalised x [..., D] -> MoE output [..., D]."""
        return self._at(self.blocks, layer, Block, Block.feed_forward, x)

    def block_propagate(self, layer, h, state):
        """`Block.propagate`: a skipped block's mixer state update for h [B, D]."""
        return self._at(self.blocks, layer, Block, Block.propagate, h, state)

    def exit_features(self, h: jax.Array, layer) -> jax.Array:
        """Exit `layer`'s LayerNorm of the hidden state; [..., D]."""
        return self._at(self.exits, layer, ExitHead, ExitHead.features, h)

    def output_layer(self, layer) -> adaptive.OutputLayer:
        """Exit `layer`'s output weights (0-based, may be traced)."""
        return self.output.layer(layer, self.embedder)

    def exit_head(self, h: jax.Array, layer) -> jax.Array:
        """Exit `layer`'s logits [..., V] (for an adaptive output: its normalised
        log-probabilities, see `adaptive.logits`).

        h: hidden states [..., D] after block `layer` (0-based), e.g. `states[layer]`
        of `hidden_states`; not token ids."""
        return adaptive.logits(self.output_layer(layer), self.exit_features(h, layer))

    def exit_log_probs(self, h: jax.Array, layer) -> jax.Array:
        """Exact, normalised log-probabilities of every word at exit `layer`; [..., V].

        h: hidden states [..., D] after block `layer` (0-based): with
        `states, _ = model.apply(v, tokens, method=EarlyExitLM.hidden_states)`,
        `model.apply(v, states[layer], layer, method=EarlyExitLM.exit_log_probs)`."""
        return adaptive.log_probs(self.output_layer(layer), self.exit_features(h, layer))

    def exit_classifier(self, h: jax.Array, layer) -> jax.Array:
        """Learned exit classifier logit [...] (input gradient stopped: it does not
        train the backbone)."""
        return self._at(self.exits, layer, ExitHead, ExitHead.classifier_logit, h)

    # ------------------------------------------------------------ full passes

    def hidden_states(
        self, tokens: jax.Array, deterministic: bool = True, mask: jax.Array | None = None
    ):
        """Every block's output via lax.scan: ([L, B, N, D], balance losses [L]).

        mask [B, N] (1 = scored token) keeps padding out of the MoE balance loss.
        The scan's xs are the stacked block parameters themselves (with the layer
        index, for dropout keys): slicing a closed-over stack instead makes the
        backward pass accumulate a full [L, ...] gradient in every step, O(L^2).
        """
        start = RecurrentState.make(self.config, tokens.shape[0])
        states, balance_losses, _ = self.hidden_states_from(tokens, start, deterministic, mask)
        return states, balance_losses

    def hidden_states_from(
        self,
        tokens: jax.Array,
        state: RecurrentState,
        deterministic: bool = True,
        mask: jax.Array | None = None,
    ):
        """`hidden_states` of tokens [B, N] that follow the positions `state` has read
        (one parallel pass; the BK core folds each layer's state into its first
        position, `bk_core.continue_pivots`): ([L, B, N, D], balance losses [L],
        the state after these tokens). Equal to one pass over the whole sequence.

        Raises:
          ValueError: bad tokens, or positions past a "learned" position table.
        """
        h = self.embed(tokens, deterministic, offset=state.position)
        dropout_rng = None if deterministic else self.make_rng("dropout")

        def step(h, layer_inputs):
            params, layer, layer_state = layer_inputs
            out, balance_loss, layer_state = self._apply_block(
                params, h, layer, dropout_rng, mask, layer_state
            )
            if dropout_rng is not None and self.config.layer_dropout:
                out = self._skip_rows(h, out, layer, dropout_rng)
            return out, (out, balance_loss, layer_state)

        layers = jnp.arange(self.config.n_layers)
        xs = (self.blocks, layers, state.layers)
        _, (states, balance_losses, layer_states) = jax.lax.scan(step, h, xs)
        after = RecurrentState(position=state.position + tokens.shape[1], layers=layer_states)
        return states, balance_losses, after

    def _skip_rows(self, before, after, layer, dropout_rng):
        """Layer dropout (stochastic depth, Huang et al. 2016, rising with depth as in
        LayerSkip, Elhoushi et al. 2024, arXiv 2404.16710): each row keeps block
        `layer`'s input instead of its output with probability
        layer_dropout * layer / (L - 1) (0 for the first block). The block's mixer
        state still reads the window (it does at inference). [B, N, D] each."""
        n_layers = self.config.n_layers
        rate = self.config.layer_dropout * layer / max(n_layers - 1, 1)
        key = jax.random.fold_in(dropout_rng, n_layers + layer)  # blocks use 0..L-1
        skip = jax.random.bernoulli(key, rate, (before.shape[0], 1, 1))
        return jnp.where(skip, before, after)

    def trace_blocks(self, h: jax.Array, layers, first: int):
        """Blocks first..L-1 (0-based, static) at inference on h [B, N, D], the output of
        block first-1, from their mixer states (`RecurrentState.layers[first:]`, leaves
        [L-first, B, ...]): -> (output of the last block [B, N, D], the mixer state of
        each of these layers after every position, leaves [L-first, B, N, ...]).
        The verify pass of self-speculative decoding (`ee_jax.speculative`)."""
        block = Block(self.config, parent=None)

        def step(h, inputs):
            params, layer_state = inputs
            return block.apply({"params": params}, h, layer_state, method=Block.trace_from)

        params = jax.tree.map(lambda p: p[first:], self.blocks)
        return jax.lax.scan(step, h, (params, layers))

    def exit_logits(self, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
        """Every exit's logits, [L, B, N, V] (the training path; differentiable)."""
        states, _ = self.hidden_states(tokens, deterministic)
        return jax.vmap(self.exit_head)(states, jnp.arange(self.config.n_layers))

    def __call__(self, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
        """The final head's logits, [B, N, V]."""
        states, _ = self.hidden_states(tokens, deterministic)
        return self.exit_head(states[-1], self.config.n_layers - 1)
