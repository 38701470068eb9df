"""Test perplexity of a trained run's final exit by position in the evaluation window.

How much would carrying the BK state across windows (truncated BPTT) give? With
non-overlapping windows and no state carried, a token at position i of its window
sees i tokens of context. If the perplexity stops falling after a few positions,
the model uses no more context than that, and carrying state could at best bring
every position down to the late positions' level.

    EE_JAX_DATA_DIR=../shared/data/wikitext-2 \
        python experiments/studies/context_by_position.py runs/cpu_bk
"""

import sys

import jax
import numpy as np

import ee_jax
from ee_jax.data import make_lm_stream
from ee_jax.losses import exit_nll
from ee_jax.model import EarlyExitLM


def main(workdir: str) -> None:
    ee_jax.enable_compilation_cache()
    ee_jax.keep_freed_memory()
    run = ee_jax.load_run(workdir)
    model, variables, vocab, train_config = run.model, run.variables, run.vocab, run.config
    corpus = ee_jax.load_wikitext2()
    n_seq, last = model.config.n_seq, model.config.n_layers - 1
    stream = make_lm_stream(corpus.test, train_config.eval_batch_size, n_seq, eos_id=vocab.eos_id)

    @jax.jit
    def final_nll(inputs, targets):  # [B, N]
        states, _ = model.apply(variables, inputs, method=EarlyExitLM.hidden_states)
        flat = states[-1:].reshape(1, inputs.size, -1)
        return exit_nll(model, variables, flat, targets.reshape(-1), [last])[0].reshape(
            inputs.shape
        )

    totals, counts = np.zeros(n_seq), np.zeros(n_seq)
    for index in range(len(stream)):
        batch = stream.window(index)
        totals += (np.asarray(final_nll(batch.inputs, batch.targets)) * batch.mask).sum(0)
        counts += batch.mask.sum(0)
    print("| positions | test ppl (final exit) |\n|---|---:|")
    edges = [0, 1, 2, 4, 8, 16, 32, 64, n_seq]
    for start, stop in zip(edges[:-1], edges[1:], strict=True):
        ppl = np.exp(totals[start:stop].sum() / counts[start:stop].sum())
        print(f"| {start}-{stop - 1} | {ppl:.1f} |")
    print(f"| all | {np.exp(totals.sum() / counts.sum()):.1f} |")


if __name__ == "__main__":
    main(sys.argv[1])
