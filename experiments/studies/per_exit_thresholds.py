"""One threshold per exit instead of one for all: does it exit earlier at +2%?

Offline, on the exact per-token scores of a trained run (`collect_exit_scores`,
depths as under exited_state="compute"): a single learned-exit threshold
calibrated on valid for at most +2% perplexity, against one threshold per exit
(a schedule over depth; CALM, Schuster et al. 2022, decays its threshold over
decoding steps instead) chosen by
coordinate descent on valid to minimise the FLOPs of the "freeze" cost model
(`ee_jax.flops`) within the same +2%; both checked on test.

    EE_JAX_DATA_DIR=../shared/data/wikitext-2 \
        python experiments/studies/per_exit_thresholds.py runs/cpu_bk_linear
"""

import sys

import numpy as np

import ee_jax
from ee_jax.data import make_lm_stream
from ee_jax.exit_scores import exit_depths
from ee_jax.flops import exit_flops
from ee_jax.passes import collect_exit_scores

MEASURE, TOLERANCE_PCT = "learned", 2.0
GRID = np.round(np.arange(0.5, 1.0, 0.0025), 4)


def summary(scores, config, thresholds):
    depths = exit_depths(scores, MEASURE, thresholds)
    nll = scores.nll[depths, np.arange(scores.tokens)].mean()
    per_depth, full = exit_flops(config, MEASURE, "freeze", scores.tail_use)
    return {
        "ppl_change_pct": 100 * (np.exp(nll - scores.nll[-1].mean()) - 1),
        "avg_exit": float(np.mean(depths + 1)),
        "flops_speedup": float(full / per_depth[depths].mean()),
    }


def within(scores, config, thresholds):
    return summary(scores, config, thresholds)["ppl_change_pct"] <= TOLERANCE_PCT


def main(workdir: str) -> None:
    ee_jax.enable_compilation_cache()
    run = ee_jax.load_run(workdir)
    model, variables, vocab, train_config = run.model, run.variables, run.vocab, run.config
    config, corpus = model.config, ee_jax.load_wikitext2()
    scores = {
        split: collect_exit_scores(
            model,
            variables,
            make_lm_stream(ids, train_config.eval_batch_size, config.n_seq, eos_id=vocab.eos_id),
            progress=False,
        )
        for split, ids in (("valid", corpus.valid), ("test", corpus.test))
    }
    early = config.n_layers - 1
    valid = scores["valid"]
    single = next(t for t in GRID if within(valid, config, np.full(early, t)))
    thresholds = np.full(early, single)
    for _ in range(4):  # coordinate descent: each exit's lowest cost within tolerance
        for layer in range(early):
            best = thresholds[layer]
            best_cost = 1 / summary(valid, config, thresholds)["flops_speedup"]
            for candidate in GRID:
                trial = thresholds.copy()
                trial[layer] = candidate
                row = summary(valid, config, trial)
                if row["ppl_change_pct"] <= TOLERANCE_PCT and 1 / row["flops_speedup"] < best_cost:
                    best, best_cost = candidate, 1 / row["flops_speedup"]
            thresholds[layer] = best
    print(
        "| thresholds (exits 1..L-1) | valid ppl change | test ppl change | test avg exit "
        "| test FLOP speedup (freeze) |\n|---|---:|---:|---:|---:|"
    )
    for name, chosen in (("single", np.full(early, single)), ("per exit", thresholds)):
        v, t = summary(valid, config, chosen), summary(scores["test"], config, chosen)
        print(
            f"| {name}: {' / '.join(f'{x:g}' for x in chosen)} | {v['ppl_change_pct']:+.2f}% "
            f"| {t['ppl_change_pct']:+.2f}% | {t['avg_exit']:.2f} | {t['flops_speedup']:.2f}x |"
        )


if __name__ == "__main__":
    main(sys.argv[1])
