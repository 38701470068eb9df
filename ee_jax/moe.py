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
    expert e and P_e its mean gate probability: 1.0 when perfectly balanced.
    """

    num_experts: int
    top_k: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        batch_shape, width = x.shape[:-1], x.shape[-1]
        tokens = x.reshape(-1, width)  # [T, D]
        gates = jax.nn.softmax(nn.Dense(self.num_experts, name="router")(tokens))  # [T, E]
        top_gates, experts = jax.lax.top_k(gates, self.top_k)  # [T, k]
        hidden = nn.gelu(self._ragged_dense(tokens, experts, 2 * width, "up"))  # [T*k, 2D]
        outputs = self._ragged_dense(hidden, experts, width, "down", repeat=False)  # [T*k, D]
        outputs = outputs.reshape(-1, self.top_k, width)  # [T, k, D]
        mixed = jnp.einsum("tkd,tk->td", outputs, top_gates)  # [T, D]
        return mixed.reshape(*batch_shape, width), self._balance_loss(gates, experts)

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

    def _balance_loss(self, gates: jax.Array, experts: jax.Array) -> jax.Array:
        routed = jax.nn.one_hot(experts, self.num_experts).sum(axis=1)  # [T, E]
        fraction = routed.mean(axis=0) / self.top_k  # [E]
        return self.num_experts * jnp.sum(fraction * gates.mean(axis=0))
