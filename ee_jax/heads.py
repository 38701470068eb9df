"""The model's ends: the embedder, the output layers and the per-exit heads (Linen).

Embedder      ids -> [..., D]: token table (+ position table for position
              "learned"); with "tied" adaptive output, adaptive input (Baevski
              & Auli 2019, arXiv 1809.10853): head words from the table, tail
              words through their cluster's embedding and projection.
OutputLayers  the output weights, [H, ...] for H = L heads ("per_exit") or 1
              ("shared", "tied"); `layer(l)` gives exit l's `adaptive.OutputLayer`
              (kernels [out, in]), a full softmax or an adaptive softmax (Grave et
              al. 2017, arXiv 1609.04309), the tied parts read from the Embedder.
ExitHead      one exit's own parts: its LayerNorm before the output layer and its
              learned exit classifier, LN + a linear logit on the stop-gradient
              hidden state (the "learned" measure). `EarlyExitLM` stacks L of them
              on a leading layer axis, like the blocks.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from ee_jax import adaptive
from ee_jax.config import ModelConfig

normal = nn.initializers.normal


class Embedder(nn.Module):
    """Token ids (and positions) -> [..., D] (module docstring)."""

    config: ModelConfig

    def setup(self):
        config = self.config
        d, bounds = config.d_model, config.cluster_bounds
        tied = config.unembedding == "tied"
        # With "tied" adaptive output the table covers only the head words.
        self.token_embed = nn.Embed(
            bounds[0] if tied else config.vocab_size, d, embedding_init=normal(0.02)
        )
        if config.position == "learned":
            self.position_embed = self.param("position_embed", normal(0.02), (config.n_seq, d))
        projections, embeddings = [], []
        for k, width in enumerate(config.tail_dims if tied else ()):
            size = bounds[k + 1] - bounds[k]  # the projection serves both directions
            projections.append(
                self.param(f"tail{k + 1}_projection", normal(width**-0.5), (width, d))
            )
            embeddings.append(self.param(f"tail{k + 1}_embedding", normal(0.02), (size, width)))
        self.tail_projections, self.tail_embeddings = projections, embeddings

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """[...] ids (and their positions [...], for position "learned") -> [..., D]."""
        h = self.embed_tokens(tokens)
        if self.config.position == "learned":
            h = h + self.position_embed[positions]
        return h

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """[...] ids -> [..., D] token embeddings (adaptive input for "tied" adaptive)."""
        bounds = self.config.cluster_bounds
        if not self.tail_embeddings:
            return self.token_embed(tokens)
        in_head = tokens < bounds[0]
        h = self.token_embed(jnp.where(in_head, tokens, 0)) * in_head[..., None]
        for k, (projection, embedding) in enumerate(
            zip(self.tail_projections, self.tail_embeddings, strict=True)
        ):
            in_cluster = (tokens >= bounds[k]) & (tokens < bounds[k + 1])
            local = jnp.where(in_cluster, tokens - bounds[k], 0)
            tail = embedding[local] @ projection  # [..., d_k] @ [d_k, D] -> [..., D]
            h = h + tail * in_cluster[..., None]
        return h


class OutputLayers(nn.Module):
    """The exits' output weights (module docstring); `layer` reads them."""

    config: ModelConfig

    def setup(self):
        config = self.config
        d, bounds = config.d_model, config.cluster_bounds
        heads = config.n_layers if config.unembedding == "per_exit" else 1
        tied = config.unembedding == "tied"
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
            if not tied:  # tied: the Embedder's projections and embeddings
                projections.append(
                    self.param(f"tail{k + 1}_projection", normal(d**-0.5), (heads, width, d))
                )
                kernels.append(
                    self.param(f"tail{k + 1}_kernel", normal(width**-0.5), (heads, size, width))
                )
            biases.append(self.param(f"tail{k + 1}_bias", nn.initializers.zeros, (heads, size)))
        self.tail_projections, self.tail_kernels, self.tail_biases = projections, kernels, biases

    def layer(self, layer, embedder: Embedder) -> adaptive.OutputLayer:
        """Exit `layer`'s output weights (0-based, may be traced)."""
        config = self.config
        index = layer if config.unembedding == "per_exit" else 0
        if config.unembedding == "tied":
            table = embedder.token_embed.embedding
            kernel = (
                table
                if config.output == "full"
                else jnp.concatenate([table, self.cluster_kernel[index]])
            )
            projections, kernels = embedder.tail_projections, embedder.tail_embeddings
        else:
            kernel = (self.unembed_kernel if config.output == "full" else self.head_kernel)[index]
            projections = [p[index] for p in self.tail_projections]
            kernels = [k[index] for k in self.tail_kernels]
        return adaptive.OutputLayer(
            head_kernel=kernel,
            head_bias=self.head_bias[index],
            tail_projections=tuple(projections),
            tail_kernels=tuple(kernels),
            tail_biases=tuple(b[index] for b in self.tail_biases),
            bounds=config.cluster_bounds,
        )


class ExitHead(nn.Module):
    """One exit's LayerNorm and learned exit classifier (module docstring).

    Both norms are `nn.LayerNorm` (eps 1e-6, variance mean((x - mean)^2)) followed
    by their own scale and bias, ((x - mean) * rsqrt(var + eps)) * scale + bias:
    nn.LayerNorm's own affine multiplies the scale into rsqrt first, which rounds
    differently from the arithmetic every earlier run was trained with.
    """

    config: ModelConfig

    def setup(self):
        d = self.config.d_model
        ones, zeros = nn.initializers.ones, nn.initializers.zeros
        self.normalize = nn.LayerNorm(
            epsilon=1e-6, use_scale=False, use_bias=False, use_fast_variance=False
        )
        self.norm_scale = self.param("norm_scale", ones, (d,))
        self.norm_bias = self.param("norm_bias", zeros, (d,))
        self.classifier_norm_scale = self.param("classifier_norm_scale", ones, (d,))
        self.classifier_norm_bias = self.param("classifier_norm_bias", zeros, (d,))
        self.classifier_kernel = self.param("classifier_kernel", zeros, (d,))
        self.classifier_bias = self.param("classifier_bias", zeros, ())

    def __call__(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """h [..., D] -> (exit features [..., D], classifier logit [...])."""
        return self.features(h), self.classifier_logit(h)

    def features(self, h: jax.Array) -> jax.Array:
        """The exit's LayerNorm of hidden states [..., D]; [..., D]."""
        return self.normalize(h) * self.norm_scale + self.norm_bias

    def classifier_logit(self, h: jax.Array) -> jax.Array:
        """The learned exit classifier's logit [...] (input gradient stopped: it does
        not train the backbone)."""
        x = self.normalize(jax.lax.stop_gradient(h))
        x = x * self.classifier_norm_scale + self.classifier_norm_bias
        return x @ self.classifier_kernel + self.classifier_bias
