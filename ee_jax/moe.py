"""Mixture-of-experts FFN with top-k routing, dropless, in O(k/E) expert work."""

import jax
import jax.numpy as jnp
from flax import linen as nn


class MoEFeedForward(nn.Module):
    """Top-k routed experts (each D -> 2D -> D), Switch-Transformer style.

    Every token goes to its top_k experts and their outputs are summed, each
    scaled by its gate probability (softmax of the router logits), so the router
    receives a gradient through the gates. No token is dropped and no capacity
    is set: tokens are sorted by expert and each expert multiplies only its own
    group (`jax.lax.ragged_dot`), so the expert work is top_k / num_experts of
    running every expert on every token, and a token's output never depends on
    the other tokens of the batch (needed for causality and for decoding).

    Returns (output [..., D], load-balancing loss []). The loss is
    E * sum_e f_e * P_e, with f_e the fraction of routed slots that picked
    expert e and P_e its mean gate probability, both over the tokens the mask
    keeps (padding must not steer the router). It is 1 when either f or P is
    uniform and E when every token goes to one expert with gate 1; it is not
    bounded below by 1 (f and P can disagree), so it is a penalty, not a distance.
    """

    num_experts: int
    top_k: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """x [..., D], mask [...] (1 = token counts in the balance loss; default all)."""
        batch_shape, width = x.shape[:-1], x.shape[-1]
        tokens = x.reshape(-1, width)  # [T, D]
        gates = jax.nn.softmax(nn.Dense(self.num_experts, name="router")(tokens))  # [T, E]
        top_gates, experts = jax.lax.top_k(gates, self.top_k)  # [T, k]
        hidden = nn.gelu(self._ragged_dense(tokens, experts, 2 * width, "up"))  # [T*k, 2D]
        outputs = self._ragged_dense(hidden, experts, width, "down", repeat=False)  # [T*k, D]
        outputs = outputs.reshape(-1, self.top_k, width)  # [T, k, D]
        mixed = jnp.einsum("tkd,tk->td", outputs, top_gates)  # [T, D]
        weights = jnp.ones(batch_shape) if mask is None else mask.astype(jnp.float32)
        balance_loss = self._balance_loss(gates, experts, weights.reshape(-1))
        return mixed.reshape(*batch_shape, width), balance_loss

    def _ragged_dense(self, inputs, experts, features, name, *, repeat=True):
        """Each row times its expert's matrix; [T*k, F]. Rows are in (token, slot) order.

        Args:
          inputs: [T, D] tokens (repeat=True, each used top_k times) or [T*k, D].
          experts: [T, k] expert of each (token, slot).
        """
        kernel = self.param(
            f"{name}_kernel",
            nn.initializers.lecun_normal(batch_axis=(0,)),
            (self.num_experts, inputs.shape[-1], features),
        )  # [E, D, F]
        bias = self.param(f"{name}_bias", nn.initializers.zeros, (self.num_experts, features))
        flat_experts = experts.reshape(-1)  # [T*k]
        rows = jnp.repeat(inputs, self.top_k, axis=0) if repeat else inputs  # [T*k, D]
        order = jnp.argsort(flat_experts, stable=True)  # [T*k]
        group_sizes = jnp.bincount(flat_experts, length=self.num_experts).astype(jnp.int32)
        product = jax.lax.ragged_dot(rows[order], kernel, group_sizes)  # [T*k, F], sorted
        unsorted = jnp.zeros_like(product).at[order].set(product)  # [T*k, F]
        return unsorted + bias[flat_experts]

    def _balance_loss(self, gates: jax.Array, experts: jax.Array, weights: jax.Array) -> jax.Array:
        """E * sum_e f_e P_e with mask-weighted means over tokens; gates [T, E],
        experts [T, k], weights [T] (0 for padding). 0 when no token is kept."""
        total = jnp.maximum(weights.sum(), 1.0)
        routed = jax.nn.one_hot(experts, self.num_experts).sum(axis=1)  # [T, E]
        # Sums rather than matmuls: exact float32 on backends whose default matmul is bf16.
        fraction = jnp.sum(weights[:, None] * routed, axis=0) / (total * self.top_k)  # [E]
        probability = jnp.sum(weights[:, None] * gates, axis=0) / total  # [E]
        return self.num_experts * jnp.sum(fraction * probability)
