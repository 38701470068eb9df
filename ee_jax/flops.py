"""A per-token FLOP cost model of the full and the early-exit forward.

FLOPs count 2 per multiply-add of the matrix products plus the elementwise work
that scales with the output size (softmax); O(D) elementwise terms (LayerNorms,
GELU, residual adds) are left out: they are a few percent of a block at D = 64.

    block       = mixer + 2*D*E (router) + top_k * (2*D*2D + 2*2D*D) (experts; none
                  for E = 0)
    mixer "bk"  = 2*D*H (potentials) + BK_CORE*H (scan, x2 if bidirectional)
                + 2*D*H*P (values) + BK_SOLVE*H*P (value recurrence)
                + 2*2H(1+P)*D (projection); P = bk_value_dim
    "attention" = 2*4*D*D (q, k, v, output projections) + 4*n*D (scores and
                  weighted values over n = (N+1)/2 positions, the average context
                  of an N-position window) + 3*n*A (softmax over A heads)
    "lstm"      = 2*2*D*4D (input and recurrent products of the 4 gates) + 16*D
                  (gate nonlinearities) + 5*D (cell and output)
    "none"      = 0
    head        = (2*D + 3) * S, S = c_1 + K head outputs (S = V for a full output;
                  3 for max, exp, sum of the softmax)
    tail_k      = 2*D*d_k + (2*d_k + 3) * n_k (projection, then cluster k's softmax)
    output      = head + sum_k u_k * tail_k: the exit's prediction, u_k the fraction
                  of tokens that evaluate tail k (1 for the log-probabilities of every
                  word; the share of targets in cluster k when scoring targets,
                  `tail_use`)
    check       = head for "softmax_max"/"softmax_margin" (the head-bound decision;
                  the tails it evaluates where the head leaves the decision open are
                  not counted: the wall-clock benchmarks include them); 2*D for
                  "learned" (a Dense(1)); 6*D for "state_saturation" (cosine)
    propagate   = 2*D*H(1+P) + (BK_CORE + BK_SOLVE*P)*H for "bk": a skipped layer
                  under "freeze" still feeds an exited token's potential and values
                  to the BK recurrence (context for later tokens); 2*2*D*D for
                  "attention" (keys and values of the frozen state); the whole step
                  for "lstm"; 0 for "none".
                  Under "compute" a skipped layer costs a whole block.

    full depth              = L*block + output
    exit at depth l         = l*block + min(l, L-1)*check + skipped(l) + extra(l)
    skipped(l)              = (L-l)*propagate ("freeze") or (L-l)*block ("compute")
    extra(l)                = output for "learned"/"state_saturation"; for softmax
                              measures the exit's check already made the head, so
                              output - head, except at l = L: output
"""

import numpy as np

from ee_jax.config import ExitMeasure, ModelConfig

BK_CORE = 20  # FLOPs of one position of the scalar pivot recurrence (complex arithmetic)
BK_SOLVE = 14  # FLOPs of one value of the solve: y = a y + g u (complex, u real)


def mixer_flops(config: ModelConfig) -> tuple[float, float]:
    """(FLOPs of the sequence mixer per token, of its update for a skipped token)."""
    d, h, p = config.d_model, config.bk_heads, config.bk_value_dim
    if config.mixer == "bk":
        recurrence = (BK_CORE * (1 if config.causal else 2) + BK_SOLVE * p) * h
        propagate = 2 * d * h * (1 + p) + recurrence
        return propagate + 2 * 2 * h * (1 + p) * d, propagate
    if config.mixer == "lstm":  # input and recurrent matmuls of 4 gates, gates, cell
        step = 2 * 2 * d * 4 * d + 4 * d * 4 + 5 * d
        return step, step
    if config.mixer == "attention":
        context = (config.n_seq + 1) / 2
        return 2 * 4 * d * d + 4 * context * d + 3 * context * config.attention_heads, 4 * d * d
    return 0.0, 0.0


def block_flops(config: ModelConfig) -> float:
    d = config.d_model
    experts = config.top_k * (2 * d * 2 * d + 2 * 2 * d * d) if config.num_experts else 0
    return mixer_flops(config)[0] + 2 * d * config.num_experts + experts


def output_flops(config: ModelConfig, tail_use=None) -> tuple[float, float]:
    """(head FLOPs, output FLOPs) of one exit prediction (see the module docstring).

    tail_use: [K] fraction of tokens evaluating each tail cluster; None = 1 each.
    """
    bounds, d = config.cluster_bounds, config.d_model
    head = (2.0 * d + 3.0) * (bounds[0] + len(bounds) - 1)
    tail_use = np.ones(len(bounds) - 1) if tail_use is None else np.asarray(tail_use)
    tails = [
        2.0 * d * width + (2.0 * width + 3.0) * (high - low)
        for width, low, high in zip(config.tail_dims, bounds[:-1], bounds[1:], strict=True)
    ]
    return head, head + float(np.dot(tail_use, tails)) if tails else head


def tail_use_of(config: ModelConfig, targets, mask=None) -> np.ndarray:
    """Fraction of the (masked) target ids in each tail cluster; [K]."""
    targets = np.asarray(targets)
    mask = np.ones(targets.shape, bool) if mask is None else np.asarray(mask, bool)
    counts = np.bincount(targets[mask], minlength=config.vocab_size)
    bounds = config.cluster_bounds
    in_tails = [counts[low:high].sum() for low, high in zip(bounds[:-1], bounds[1:], strict=True)]
    return np.array(in_tails, np.float64) / max(1, int(mask.sum()))


def exit_flops(
    config: ModelConfig, measure: str, exited_state: str, tail_use=None
) -> tuple[np.ndarray, float]:
    """(FLOPs of a token exiting at depth 1..L [L], FLOPs of the full forward).

    tail_use: see `output_flops` (None: the exit computes every word's log-probability).
    """
    n_layers, d = config.n_layers, config.d_model
    block = block_flops(config)
    head, output = output_flops(config, tail_use)
    softmax = ExitMeasure(measure) in (ExitMeasure.SOFTMAX_MAX, ExitMeasure.SOFTMAX_MARGIN)
    check = {
        ExitMeasure.SOFTMAX_MAX: head,
        ExitMeasure.SOFTMAX_MARGIN: head,
        ExitMeasure.LEARNED: 2.0 * d,
        ExitMeasure.STATE_SATURATION: 6.0 * d,
    }[ExitMeasure(measure)]
    propagate = mixer_flops(config)[1]
    skip_cost = propagate if exited_state == "freeze" else block
    depth = np.arange(1, n_layers + 1, dtype=np.float64)
    per_depth = depth * block + np.minimum(depth, n_layers - 1) * check
    per_depth += (n_layers - depth) * skip_cost
    per_depth += np.where(depth == n_layers, output, output - head) if softmax else output
    return per_depth, n_layers * block + output
