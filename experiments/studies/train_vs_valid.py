"""Does the trained preset over-fit? Perplexity of every exit on training text
(dropout off, as in evaluation) beside valid and test.

The training log's perplexity is measured with dropout on and on one batch at a
time; this evaluates the run's final parameters on the first windows of the train
split, as many tokens as valid has, the same way `exit_perplexities` evaluates
valid and test. A train perplexity well below valid's means the run over-fits and
needs its dropout; one close to valid's means it under-fits.

    EE_JAX_DATA_DIR=../shared/data/wikitext-2 \
        python experiments/studies/train_vs_valid.py runs/cpu_bk_gap
"""

import sys

import ee_jax
from ee_jax.data import make_lm_stream
from ee_jax.passes import exit_perplexities


def main(workdir: str) -> None:
    ee_jax.enable_compilation_cache()
    run = ee_jax.load_run(workdir)
    model, variables, vocab, train_config = run.model, run.variables, run.vocab, run.config
    corpus = ee_jax.load_wikitext2()
    size = train_config.eval_batch_size
    for split, ids in (
        ("train (first tokens)", corpus.train[: len(corpus.valid)]),
        ("valid", corpus.valid),
        ("test", corpus.test),
    ):
        stream = make_lm_stream(ids, size, model.config.n_seq, eos_id=vocab.eos_id)
        ppl = exit_perplexities(model, variables, stream, progress=False)["exit_ppl"]
        print(f"| {split} | {' / '.join(f'{p:.1f}' for p in ppl)} |")


if __name__ == "__main__":
    main(sys.argv[1])
