"""Early exit in absolute terms: the fewest blocks for a given test perplexity.

The +2% calibration measures each model against its own last exit, so a
training change that makes the last exit worse also loosens the budget of the
early ones. This compares runs at equal absolute test perplexity instead: for
each target, the learned-exit threshold of the test sweep (`eval_early_exit.py`'s
results.json, depths and perplexity as under exited_state="compute") with the
fewest blocks whose test perplexity is at most the target, and its FLOP speedup
under the "freeze" cost model (`ee_jax.flops`, from the sweep's exit
distribution). Reads only the runs' WORKDIR/eval/results.json (sweep and config);
needs the data only for the share of test targets in each tail cluster.

    EE_JAX_DATA_DIR=../shared/data/wikitext-2 python experiments/studies/absolute_frontier.py \
        runs/cpu_bk_linear runs/cpu_bk_distill1
"""

import json
import pathlib
import sys

import numpy as np

import ee_jax
from ee_jax.config import TrainConfig
from ee_jax.data import make_lm_stream
from ee_jax.flops import exit_flops, tail_use_of

MEASURE = "learned"
TARGETS = (171.0, 172.0, 173.0, 174.0, 175.0, 176.0, 178.0, 180.0)


def main(workdirs: list[str]) -> None:
    corpus = ee_jax.load_wikitext2()
    print(
        "| run | full depth | "
        + " | ".join(f"<= {t:.0f}: avg exit, FLOPs" for t in TARGETS)
        + " |\n|---|---:|"
        + "---|" * len(TARGETS)
    )
    for workdir in workdirs:
        results = json.loads((pathlib.Path(workdir) / "eval" / "results.json").read_text())
        train_config = TrainConfig.from_dict(results["config"])
        config = train_config.model
        stream = make_lm_stream(
            corpus.test, train_config.eval_batch_size, config.n_seq, eos_id=corpus.vocab.eos_id
        )
        per_depth, full = exit_flops(
            config, MEASURE, "freeze", tail_use_of(config, stream.targets, stream.mask)
        )
        sweep = [row for row in results["sweep"] if row["measure"] == MEASURE]
        cells = []
        for target in TARGETS:
            within = [row for row in sweep if row["ppl"] <= target]
            if not within:
                cells.append("-")
                continue
            best = min(within, key=lambda row: row["avg_exit_layer"])
            speedup = full / float(np.dot(best["exit_distribution"], per_depth))
            cells.append(f"{best['avg_exit_layer']:.2f}, {speedup:.2f}x")
        final = results["test_exit_ppl"][-1]
        print(f"| `{pathlib.Path(workdir).name}` | {final:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
