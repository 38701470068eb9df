"""Evaluation on a whole split: every target scored exactly once."""

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ee_jax.data import LMStream
from ee_jax.losses import exit_nll
from ee_jax.model import EarlyExitLM


def exit_perplexities(model: EarlyExitLM, params, stream: LMStream, *, progress: bool = True):
    """Perplexity of every exit over all masked targets of `stream`.

    Returns:
      dict with "exit_ppl" [L], "exit_nll" [L] (mean over tokens) and "tokens".
    """
    layers = np.arange(model.config.n_layers)

    @jax.jit
    def window_sums(params, inputs, targets, mask):
        states, _ = model.apply(params, inputs, method=EarlyExitLM.hidden_states)
        states = states.reshape(len(layers), inputs.size, -1)  # [L, B*N, D]
        nll, _ = exit_nll(model, params, states, targets.reshape(-1), layers)  # [L, B*N]
        return jnp.sum(nll * mask.reshape(-1), axis=1), jnp.sum(mask)

    totals, count = np.zeros(len(layers)), 0
    for index in tqdm(range(len(stream)), desc="evaluate", disable=not progress):
        batch = stream.window(index)
        sums, tokens = window_sums(params, batch.inputs, batch.targets, batch.mask)
        totals += np.asarray(sums, np.float64)
        count += int(tokens)
    mean = totals / count
    return {"exit_nll": mean.tolist(), "exit_ppl": np.exp(mean).tolist(), "tokens": count}
