"""A per-token FLOP cost model of the full and the early-exit forward.

FLOPs count 2 per multiply-add of the matrix products plus the elementwise work
that scales with V (softmax); O(D) elementwise terms (LayerNorms, GELU,
residual adds) are left out: they are a few percent of a block at D = 64.

    block       = 2*D*H (potentials) + BK_CORE*H (scan, x2 if bidirectional)
                + 2*2H*D (BK projection) + 2*D*E (router)
                + top_k * (2*D*2D + 2*2D*D) (experts)
    head        = 2*D*V (vocabulary projection)
    softmax     = 3*V (max, exp, sum)
    check       = head + softmax for "softmax_max"/"softmax_margin"; 2*D for
                  "learned" (a Dense(1)); 6*D for "state_saturation" (cosine)
    propagate   = 2*D*H + BK_CORE*H: a skipped layer under "freeze" still feeds an
                  exited token's potential to the BK recurrence (context for later
                  tokens); under "compute" a skipped layer costs a whole block.

    full depth              = L*block + head
    exit at depth l         = l*block + min(l, L-1)*check + skipped(l) + extra(l)
    skipped(l)              = (L-l)*propagate ("freeze") or (L-l)*block ("compute")
    extra(l)                = head for "learned"/"state_saturation" (logits once, at
                              the exit); for softmax measures the exit's check already
                              made the logits, except at l = L: head
"""

import numpy as np

from ee_jax.config import ExitMeasure, ModelConfig

BK_CORE = 20  # FLOPs of one position of the scalar pivot recurrence (complex arithmetic)


def block_flops(config: ModelConfig) -> float:
    d, h = config.d_model, config.bk_heads
    bk = 0.0
    if config.use_bk:
        bk = 2 * d * h + BK_CORE * h * (1 if config.causal else 2) + 2 * 2 * h * d
    experts = config.top_k * (2 * d * 2 * d + 2 * 2 * d * d)
    return bk + 2 * d * config.num_experts + experts


def exit_flops(config: ModelConfig, measure: str, exited_state: str) -> tuple[np.ndarray, float]:
    """(FLOPs of a token exiting at depth 1..L [L], FLOPs of the full forward)."""
    n_layers, d = config.n_layers, config.d_model
    block = block_flops(config)
    head = 2.0 * d * config.vocab_size
    softmax = ExitMeasure(measure) in (ExitMeasure.SOFTMAX_MAX, ExitMeasure.SOFTMAX_MARGIN)
    check = {
        ExitMeasure.SOFTMAX_MAX: head + 3.0 * config.vocab_size,
        ExitMeasure.SOFTMAX_MARGIN: head + 3.0 * config.vocab_size,
        ExitMeasure.LEARNED: 2.0 * d,
        ExitMeasure.STATE_SATURATION: 6.0 * d,
    }[ExitMeasure(measure)]
    propagate = (2.0 * d + BK_CORE) * config.bk_heads if config.use_bk else 0.0
    skip_cost = propagate if exited_state == "freeze" else block
    depth = np.arange(1, n_layers + 1, dtype=np.float64)
    per_depth = depth * block + np.minimum(depth, n_layers - 1) * check
    per_depth += (n_layers - depth) * skip_cost
    per_depth += np.where(depth == n_layers, head, 0.0) if softmax else head
    return per_depth, n_layers * block + head
