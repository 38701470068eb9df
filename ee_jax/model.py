"""The early-exit ResNet-BK language model (Flax Linen).

Shape legend: B batch, N positions, D width, V vocabulary, L layers, H BK heads.

    tokens [B, N] -> embed -> h_0 [B, N, D]
    h_l = h_{l-1} + dropout(MoE(LN(h_{l-1})) + s_l * BK(LN(h_{l-1})))   l = 1..L
    exit l: p_l(w) = output_l(LN_l(h_l))                                 [B, N, V]

The output layer (`ee_jax.adaptive`) is a full softmax, logits = x @ U^T + b, or
an adaptive softmax (head plus tail clusters), per exit, shared, or tied to the
input embedding (for the adaptive softmax: adaptive input, Baevski & Auli 2019,
arXiv 1809.10853, sharing the tail embeddings and projections).

With position "none" the model has no absolute position table: order comes
from the causal recurrence alone, so it reads sequences of any length and can
continue from a `RecurrentState` (`ee_jax.state`: every row's position and
every layer's mixer state after the positions read so far, `hidden_states_from`): a long text is read in chunks,
training windows carry their state (truncated BPTT), and generation never ends.

The L blocks' parameters are stacked on a leading layer axis (params["blocks"]),
so the training path scans over them and the halting loop picks block l with
`jax.tree.map(lambda p: p[l], blocks)`. The last exit is the model's final head.
"""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ee_jax import adaptive
from ee_jax.bk_core import causal_solve, causal_solve_step, causal_step, resolvent_diagonal
from ee_jax.config import ModelConfig
from ee_jax.moe import MoEFeedForward
from ee_jax.state import BKState, RecurrentState, check_carry, mixer_state


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
            *causal_solve_step(state, self.potentials(x), off, off * off, z, self.value_vectors(x))[0]
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
        self.moe = MoEFeedForward(self.config.num_experts, self.config.top_k, name="moe")
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
        update, balance_loss = self.moe(x, mask)
        h = h + self.dropout(update + mixed, deterministic=deterministic)
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
        if self.config.mixer != "bk":
            return x, jnp.zeros_like(x), state
        features, state = self.bk.step(x, state)
        return x, self.bk_scale * features, state

    def feed_forward(self, x: jax.Array) -> jax.Array:
        """The MoE FFN of normalised tokens x [..., D] -> [..., D] (inference)."""
        return self.moe(x)[0]

    def propagate(self, h: jax.Array, state: BKState) -> BKState:
        """A skipped block's mixer state update for an exited token (norm, potentials,
        values and the recurrence; no MoE): later tokens still see it as context."""
        if self.config.mixer != "bk":
            return state
        return self.bk.recur(self.norm(h), state)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm over the last axis with given parameters (same as nn.LayerNorm)."""
    mean = x.mean(axis=-1, keepdims=True)
    variance = jnp.square(x - mean).mean(axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(variance + eps) * scale + bias


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


class EarlyExitLM(nn.Module):
    """ResNet-BK language model with an exit head after every block."""

    config: ModelConfig

    def setup(self):
        config = self.config
        d, n_layers = config.d_model, config.n_layers
        self._setup_embedding_and_output()
        if config.position == "learned":
            self.position_embed = self.param(
                "position_embed", nn.initializers.normal(0.02), (config.n_seq, d)
            )
        self.embed_dropout = nn.Dropout(config.dropout)
        self.blocks = self.param("blocks", self._init_blocks)
        self.exit_norm_scale = self.param("exit_norm_scale", nn.initializers.ones, (n_layers, d))
        self.exit_norm_bias = self.param("exit_norm_bias", nn.initializers.zeros, (n_layers, d))
        # Learned exit classifiers: LN + Dense(1) per exit on the hidden state.
        self.classifier_norm_scale = self.param(
            "classifier_norm_scale", nn.initializers.ones, (n_layers, d)
        )
        self.classifier_norm_bias = self.param(
            "classifier_norm_bias", nn.initializers.zeros, (n_layers, d)
        )
        self.classifier_kernel = self.param(
            "classifier_kernel", nn.initializers.zeros, (n_layers, d)
        )
        self.classifier_bias = self.param("classifier_bias", nn.initializers.zeros, (n_layers,))

    def _setup_embedding_and_output(self):
        """Token embedding and output parameters; output ones have a leading axis of
        L heads ("per_exit") or 1. Kernels are [out, in]."""
        config = self.config
        d, bounds = config.d_model, config.cluster_bounds
        heads = config.n_layers if config.unembedding == "per_exit" else 1
        tied = config.unembedding == "tied"
        normal = nn.initializers.normal
        # With "tied" adaptive output the input embedding covers only the head words;
        # tail words are embedded through their cluster's (shared) projection.
        embedded = bounds[0] if tied else config.vocab_size
        self.token_embed = nn.Embed(embedded, d, embedding_init=normal(0.02))
        head_size = bounds[0] + len(bounds) - 1
        if config.output == "full" and not tied:
            self.unembed_kernel = self.param(
                "unembed_kernel", normal(d**-0.5), (heads, bounds[0], d)
            )
        if config.output == "adaptive" and not tied:
            self.head_kernel = self.param("head_kernel", normal(d**-0.5), (heads, head_size, d))
        if config.output == "adaptive" and tied:
            self.cluster_kernel = self.param(
                "cluster_kernel", normal(0.02), (heads, head_size - bounds[0], d)
            )
        bias_name = "unembed_bias" if config.output == "full" else "head_bias"
        self.head_bias = self.param(bias_name, nn.initializers.zeros, (heads, head_size))
        projections, kernels, biases = [], [], []
        for k, width in enumerate(config.tail_dims):
            size = bounds[k + 1] - bounds[k]
            if tied:  # adaptive input: the projection serves both directions
                projections.append(
                    self.param(f"tail{k + 1}_projection", normal(width**-0.5), (width, d))
                )
                kernels.append(self.param(f"tail{k + 1}_embedding", normal(0.02), (size, width)))
            else:
                projections.append(
                    self.param(f"tail{k + 1}_projection", normal(d**-0.5), (heads, width, d))
                )
                kernels.append(
                    self.param(f"tail{k + 1}_kernel", normal(width**-0.5), (heads, size, width))
                )
            biases.append(self.param(f"tail{k + 1}_bias", nn.initializers.zeros, (heads, size)))
        self.tail_projections, self.tail_kernels, self.tail_biases = projections, kernels, biases

    def _init_blocks(self, rng: jax.Array):
        block = Block(self.config, parent=None)
        dummy = jnp.zeros((1, 1, self.config.d_model))
        init = lambda key: block.init(key, dummy)["params"]  # noqa: E731
        return jax.vmap(init)(jax.random.split(rng, self.config.n_layers))

    # ------------------------------------------------------------ pieces

    def embed(self, tokens: jax.Array, deterministic: bool = True, offset=0) -> jax.Array:
        """[B, N] ids at positions offset..offset+N-1 -> [B, N, D] (token embeddings,
        plus the position table's rows for position "learned"). offset: [] or [B] (each
        row's first position, `RecurrentState.position`)."""
        check_tokens(tokens, self.config)
        h = self.embed_tokens(tokens)
        if self.config.position == "learned":
            length = tokens.shape[1]
            if not isinstance(offset, jax.core.Tracer):
                last = int(np.max(offset)) + length - 1
                if last >= self.config.n_seq:
                    raise ValueError(
                        f"position {last} is past the position table (n_seq="
                        f'{self.config.n_seq}); a model with position "none" reads any length'
                    )
            positions = jnp.asarray(offset, jnp.int32)[..., None] + jnp.arange(length)
            h = h + self.position_embed[positions]  # [(B,) N, D]
        return self.embed_dropout(h, deterministic=deterministic)

    def block(self, h: jax.Array, layer, dropout_rng: jax.Array | None = None, mask=None):
        """Block `layer` (0-based, may be traced) on [B, N, D] -> ([B, N, D], loss []).

        Dropout is on when `dropout_rng` is given (folded with the layer index);
        mask [B, N] (1 = real token) weights the MoE balance loss.
        """
        params = jax.tree.map(lambda p: p[layer], self.blocks)
        return self._apply_block(params, h, layer, dropout_rng, mask)

    def _apply_block(self, params, h, layer, dropout_rng, mask):
        """One block with its own (unstacked) parameters; see `block`."""
        return self._apply_block_from(params, h, layer, dropout_rng, mask, None)[:2]

    def _apply_block_from(self, params, h, layer, dropout_rng, mask, state):
        """One block continuing from its mixer state -> (h, balance loss, mixer state)."""
        block = Block(self.config, parent=None)
        if dropout_rng is None:
            return block.apply({"params": params}, h, True, mask, state)
        rngs = {"dropout": jax.random.fold_in(dropout_rng, layer)}
        return block.apply({"params": params}, h, False, mask, state, rngs=rngs)

    def embed_position(self, tokens: jax.Array, position) -> jax.Array:
        """[B] ids at positions [B] (or one position; may be traced) -> [B, D]."""
        check_tokens(tokens[:, None], self.config)
        if self.config.position == "learned":
            return self.embed_tokens(tokens) + self.position_embed[position]
        return self.embed_tokens(tokens)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """[...] ids -> [..., D] token embeddings (adaptive input for "tied" adaptive)."""
        bounds = self.config.cluster_bounds
        if len(bounds) == 1 or self.config.unembedding != "tied":
            return self.token_embed(tokens)
        in_head = tokens < bounds[0]
        h = self.token_embed(jnp.where(in_head, tokens, 0)) * in_head[..., None]
        for k, (projection, embedding) in enumerate(
            zip(self.tail_projections, self.tail_kernels, strict=True)
        ):
            in_cluster = (tokens >= bounds[k]) & (tokens < bounds[k + 1])
            local = jnp.where(in_cluster, tokens - bounds[k], 0)
            tail = embedding[local] @ projection  # [..., d_k] @ [d_k, D] -> [..., D]
            h = h + tail * in_cluster[..., None]
        return h

    def block_part(self, method: str, layer, *args):
        """Block `layer`'s `Block.<method>` ("mix", "mix_from", "mix_step",
        "feed_forward" or "propagate") on args: the pieces of a block the halting loop and decoding
        run separately."""
        params = jax.tree.map(lambda p: p[layer], self.blocks)
        block = Block(self.config, parent=None)
        return block.apply({"params": params}, *args, method=getattr(Block, method))

    def exit_features(self, h: jax.Array, layer) -> jax.Array:
        """Exit `layer`'s LayerNorm of the hidden state; [..., D]."""
        return layer_norm(h, self.exit_norm_scale[layer], self.exit_norm_bias[layer])

    def output_layer(self, layer) -> adaptive.OutputLayer:
        """Exit `layer`'s output weights (0-based, may be traced)."""
        config = self.config
        index = layer if config.unembedding == "per_exit" else 0
        tied = config.unembedding == "tied"
        if config.output == "full":
            kernel = self.token_embed.embedding if tied else self.unembed_kernel[index]
        elif tied:
            kernel = jnp.concatenate([self.token_embed.embedding, self.cluster_kernel[index]])
        else:
            kernel = self.head_kernel[index]
        pick = (lambda p: p) if tied else (lambda p: p[index])  # noqa: E731
        return adaptive.OutputLayer(
            head_kernel=kernel,
            head_bias=self.head_bias[index],
            tail_projections=tuple(pick(p) for p in self.tail_projections),
            tail_kernels=tuple(pick(k) for k in self.tail_kernels),
            tail_biases=tuple(b[index] for b in self.tail_biases),
            bounds=config.cluster_bounds,
        )

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
        x = layer_norm(
            jax.lax.stop_gradient(h),
            self.classifier_norm_scale[layer],
            self.classifier_norm_bias[layer],
        )
        return x @ self.classifier_kernel[layer] + self.classifier_bias[layer]

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
            h, balance_loss, layer_state = self._apply_block_from(
                params, h, layer, dropout_rng, mask, layer_state
            )
            return h, (h, balance_loss, layer_state)

        layers = jnp.arange(self.config.n_layers)
        xs = (self.blocks, layers, state.layers)
        _, (states, balance_losses, layer_states) = jax.lax.scan(step, h, xs)
        after = RecurrentState(position=state.position + tokens.shape[1], layers=layer_states)
        return states, balance_losses, after

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
