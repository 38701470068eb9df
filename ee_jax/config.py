"""Model configuration: one frozen, validated dataclass and its presets."""

import dataclasses
import enum
from typing import Literal, get_args

BKMethod = Literal["associative", "sequential"]
Unembedding = Literal["per_exit", "shared", "tied"]


class ExitMeasure(enum.StrEnum):
    """How confident a token is after a block (see `ee_jax.early_exit`)."""

    SOFTMAX_MAX = "softmax_max"  # max softmax probability of the exit's logits
    SOFTMAX_MARGIN = "softmax_margin"  # top-1 minus top-2 probability
    STATE_SATURATION = "state_saturation"  # cosine(hidden before, hidden after the block)
    LEARNED = "learned"  # sigmoid of a per-exit classifier on the hidden state


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Hyper-parameters of `EarlyExitLM`. Hashable: usable as a static jit argument."""

    vocab_size: int  # V, tokens are ids in [0, V)
    d_model: int = 64  # D, width of the residual stream
    n_layers: int = 4  # L, BK blocks, each followed by an exit head
    n_seq: int = 128  # N, longest sequence (size of the position table)
    num_experts: int = 4  # E, experts in each MoE FFN
    top_k: int = 1  # experts each token is routed to
    dropout: float = 0.1  # dropout rate on embeddings and residual branches (training)
    causal: bool = True  # causal BK core (next-token model); False sees later tokens
    confidence_threshold: float = 0.9  # default halting threshold in [0, 1]
    bk_heads: int = 1  # H, potentials per token = independent tridiagonal systems
    z_real: float = 0.0  # Re z of the resolvent (T - zI)^-1, shared by all heads
    z_imag: tuple[float, float] = (1.0, 1.0)  # Im z of the first and last head, log-spaced
    h0_diagonal: float = -2.0  # diagonal of H0 (discrete Laplacian: -2)
    h0_offdiagonal: float = 1.0  # off-diagonals of H0 (discrete Laplacian: 1)
    bk_method: BKMethod = "associative"  # scan used by the BK core (same values)
    unembedding: Unembedding = "shared"  # per-exit matrices, one shared, or tied to the input
    use_bk: bool = True  # False drops the BK features (the ablation without sequence mixing)

    def __post_init__(self):
        positive = ("vocab_size", "d_model", "n_layers", "n_seq", "num_experts", "bk_heads")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError(
                f"confidence_threshold must be in [0, 1], got {self.confidence_threshold}"
            )
        if len(self.z_imag) != 2 or min(self.z_imag) <= 0:
            raise ValueError(
                f"z_imag must be two positive numbers (first head, last head): Im z > 0 keeps "
                f"every pivot of the BK core non-zero; got {self.z_imag!r}"
            )
        for name, allowed in (("bk_method", BKMethod), ("unembedding", Unembedding)):
            if getattr(self, name) not in get_args(allowed):
                raise ValueError(
                    f"{name} must be one of {get_args(allowed)}, got {getattr(self, name)!r}"
                )

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def tiny(vocab_size: int = 97) -> ModelConfig:
    """Seconds-scale model for tests and the quickstart notebook."""
    return ModelConfig(
        vocab_size=vocab_size,
        d_model=16,
        n_layers=3,
        n_seq=16,
        num_experts=4,
        bk_heads=2,
        z_imag=(1.0, 1.0),
        dropout=0.0,
    )


def seed(vocab_size: int = 10000) -> ModelConfig:
    """The configuration of the public PyTorch original (its defaults)."""
    return ModelConfig(
        vocab_size=vocab_size,
        d_model=64,
        n_layers=4,
        n_seq=128,
        num_experts=4,
        top_k=1,
    )


PRESETS = {"tiny": tiny, "seed": seed}
