"""Markdown tables and PNG plots: early-exit evaluations and training metrics."""

import pathlib

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ee_jax.timing import NOISY_SPREAD  # noqa: E402


def format_threshold(threshold: float) -> str:
    """A threshold for a table: at least two decimals, up to six (0.5 -> "0.50",
    0.975 -> "0.975", also from its float32 0.97500002; 0.9995 -> "0.9995", never
    "1.00", which reads as the never-exit threshold)."""
    whole, decimals = f"{threshold:.6f}".split(".")
    return f"{whole}.{decimals.rstrip('0').ljust(2, '0')}"


def partial_note(results: dict) -> str:
    """The line "Partial evaluation: the first 32,768 of 245,569 test tokens." when
    results (`evaluate_checkpoint`'s or stream_early_exit.py's JSON) scored only the
    first tokens of a split, else "": "tokens" holds the tokens scored per split and
    "split_tokens" the split's whole length (each {split: count})."""
    whole = results.get("split_tokens") or {}
    parts = [
        f"the first {results['tokens'][split]:,} of {total:,} {split} tokens"
        for split, total in whole.items()
        if results.get("tokens", {}).get(split, total) < total
    ]
    return f"Partial evaluation: {' and '.join(parts)}." if parts else ""


def headline_table(results: dict) -> str:
    """Per measure, its threshold calibrated on valid and what it gives on test with
    real halting, the measure with the largest halting FLOPs speedup first.

    Columns: the test perplexity of the halting loop itself (exited tokens skip the
    blocks after their exit; their state is frozen for later tokens) and its change
    against the final exit read the same way (`real_loop_reference_ppl`, in the
    run's protocol), blocks run per token, the FLOP speedup of that halting
    (`flops.exit_flops`, exited_state "freeze") and the measured batched wall-clock
    speedup of the compacted halting loop over the plain forward (`timing_table`).
    """
    layers = len(results["test_exit_ppl"])
    lines = [
        f"| measure | threshold (valid, <= +{_budget(results):g}% ppl) | halting loop test ppl "
        f"| test ppl change | blocks run per token (of {layers}) | halting FLOPs speedup "
        "| measured speedup, batched |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    real = {row["measure"]: row for row in results["real_loop"]}
    rows = sorted(
        results["calibration"].items(), key=lambda item: -item[1]["test"]["halting_flops_speedup"]
    )
    for measure, row in rows:
        timed = results.get("timing", {}).get(measure, {})
        measured = next(
            (
                t
                for key, t in timed.items()
                if isinstance(t, dict) and float(key) == row["threshold"]
            ),
            None,
        )
        lines.append(
            f"| {measure} | {format_threshold(row['threshold'])} | {real[measure]['ppl']:.1f} "
            f"| {real[measure]['ppl_change_pct']:+.1f}% "
            f"| {real[measure]['avg_exit_layer']:.2f} "
            f"| {row['test']['halting_flops_speedup']:.2f}x "
            f"| {'-' if measured is None else format(measured['speedup'], '.2f') + 'x'} |"
        )
    return "\n".join(lines)


def _budget(results: dict) -> float:
    """The perplexity budget (%) the thresholds were calibrated for."""
    return next(iter(results["calibration"].values()))["max_ppl_change_pct"]


def sweep_table(results: dict) -> str:
    """The threshold sweep (and oracle) as a Markdown table: perplexity, agreement and
    depths exact for exited_state "compute" (one full pass), FLOPs those of real
    halting (exited_state "freeze")."""
    lines = [
        "| measure | threshold | test ppl | ppl change | top-1 agreement | avg exit layer "
        "| exit distribution (%) | layer speedup | halting FLOPs speedup |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    rows = [
        *results["sweep"],
        {"measure": "oracle", "threshold": float("nan"), **results["oracle"]},
    ]
    for row in rows:
        distribution = " / ".join(f"{100 * share:.0f}" for share in row["exit_distribution"])
        threshold = "-" if row["measure"] == "oracle" else format_threshold(row["threshold"])
        lines.append(
            f"| {row['measure']} | {threshold} | {row['ppl']:.1f} | {row['ppl_change_pct']:+.1f}% "
            f"| {100 * row['top1_agreement']:.1f}% | {row['avg_exit_layer']:.2f} "
            f"| {distribution} | {row['layer_speedup']:.2f}x "
            f"| {row['halting_flops_speedup']:.2f}x |"
        )
    return "\n".join(lines)


def calibration_table(results: dict) -> str:
    """Thresholds calibrated on valid, their valid and test rows (from the full pass)
    and the real halting loop's test perplexity and depth."""
    lines = [
        f"| measure | threshold (valid, <= +{_budget(results):g}% ppl) | valid ppl change "
        "| test ppl change | test avg exit layer | test layer speedup "
        "| test halting FLOPs speedup | halting loop (freeze) test ppl "
        "| halting loop avg exit layer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    real = {row["measure"]: row for row in results["real_loop"]}
    notes = []
    for measure, row in results["calibration"].items():
        if row.get("whole_grid_meets_target"):
            notes.append(
                f"{measure}: even the lowest threshold of the grid meets the target; "
                "a lower one may too (pass lower --thresholds)."
            )
        lines.append(
            f"| {measure} | {format_threshold(row['threshold'])} "
            f"| {row['valid']['ppl_change_pct']:+.1f}% "
            f"| {row['test']['ppl_change_pct']:+.1f}% | {row['test']['avg_exit_layer']:.2f} "
            f"| {row['test']['layer_speedup']:.2f}x "
            f"| {row['test']['halting_flops_speedup']:.2f}x | {real[measure]['ppl']:.1f} "
            f"| {real[measure]['avg_exit_layer']:.2f} |"
        )
    return "\n".join(lines + [""] + notes if notes else lines)


def learn_then_test_table(results: dict) -> str:
    """Learn-then-Test thresholds (certified on valid, checked on test) as Markdown."""
    lines = [
        "| measure | risk | epsilon | delta | p-value | certified threshold | valid risk "
        "| test risk | test ppl change | test avg exit layer | halting FLOPs speedup "
        "| violations over random halvings | smallest ppl budget certified |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results.get("learn_then_test", []):
        budget = row.get("smallest_budget_pct", "")
        budget = "-" if budget == "" else ("none" if budget is None else f"+{budget:g}%")
        lines.append(
            f"| {row['measure']} | {row['risk']} | {row['epsilon']:.4f} | {row['delta']:g} "
            f"| {row['p_value']} | {format_threshold(row['threshold'])} "
            f"| {row['valid_risk']:.4f} | {row['test_risk']:.4f} "
            f"| {row['test']['ppl_change_pct']:+.2f}% | {row['test']['avg_exit_layer']:.2f} "
            f"| {row['test']['halting_flops_speedup']:.2f}x "
            f"| {100 * row['violation_rate']:.1f}% of {row['splits']} | {budget} |"
        )
    return "\n".join(lines)


def timing_table(results: dict) -> str:
    """The wall-clock table; a row whose timings spread more than
    `timing.NOISY_SPREAD` (interquartile range / median) is marked "noisy"."""
    lines = [
        "| measure | threshold | halting loop ms / window (compacted) | masked loop ms "
        "| plain forward ms | measured speedup (compacted) | masked speedup "
        "| vs the loop at threshold 1.0 | blocks run | spread |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for measure, timing in results["timing"].items():
        for threshold, row in timing.items():
            if isinstance(row, dict):
                spread = row.get("spread")
                shown = "-" if spread is None else f"{100 * spread:.0f}%"
                if spread is not None and spread > NOISY_SPREAD:
                    shown += " noisy"
                lines.append(
                    f"| {measure} | {format_threshold(float(threshold))} | {row['ms']:.0f} "
                    f"| {row['masked_ms']:.0f} | {timing['forward_ms']:.0f} "
                    f"| {row['speedup']:.2f}x | {row['masked_speedup']:.2f}x "
                    f"| {row['exit_speedup']:.2f}x | {row['layers_run']} | {shown} |"
                )
    return "\n".join(lines)


def write_report(results: dict, directory: str | pathlib.Path) -> pathlib.Path:
    """Writes results.md and three PNG plots into `directory`; returns results.md."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join(
        [
            *filter(None, [partial_note(results)]),
            "## Headline: thresholds calibrated on valid, real halting on test",
            "The halting loop runs each test window with exited tokens skipping their "
            "remaining blocks; the measured speedup is the batched wall-clock of that loop "
            "(compacted) over the plain forward (table Wall-clock below).",
            headline_table(results),
            "## Threshold sweep on test",
            "Perplexity, agreement and exit depths come from one full pass, where exited "
            "tokens still compute their state for later tokens (exited_state compute, "
            "exact); the FLOPs speedup is that of real halting (exited_state freeze: an "
            "exited token skips its remaining blocks), whose own perplexity is the "
            "halting-loop column of the next table.",
            sweep_table(results),
            "## Thresholds calibrated on valid, checked on test",
            calibration_table(results),
            "## Learn-then-Test thresholds (risk <= epsilon with probability >= 1 - delta)",
            "Units: one n_seq-token window of one row. consistency: share of a unit's tokens "
            "whose exit argmax differs from the full model's; quality: 1 - ppl_full / ppl_exit "
            "of the unit (epsilon 0.0196 = a +2% budget). Violations: over random halvings "
            "of valid + test units, how often the certified threshold's risk on the other "
            "half exceeded epsilon.",
            learn_then_test_table(results),
            "## Wall-clock (batched, teacher-forced; the loop stops when the last token exits)",
            timing_table(results),
        ]
    )
    path = directory / "results.md"
    path.write_text(text + "\n")
    _plot_distribution(results, directory / "exit_distribution.png")
    _plot_tradeoff(results, directory / "ppl_vs_layer_speedup.png")
    _plot_tradeoff(results, directory / "ppl_vs_flops_speedup.png", "halting_flops_speedup")
    _plot_measured(results, directory / "ppl_vs_measured_speedup.png")
    return path


AVERAGED = ("loss", "exit_nll", "grad_norm")


def training_table(runs: dict[str, list[dict]], every: int) -> str:
    """Training metrics (rows of metrics.jsonl) of each run, averaged per `every` steps.

    Each logged row is one batch, so a row of the table averages the logged
    rows of its window (loss, per-exit NLL -> perplexity, grad norm). A null
    (None) value, such as the NLL of an exit the run does not score, is NaN: its
    average is NaN, shown as "-".
    """
    lines = [
        "| run | steps | loss | train ppl per exit | grad norm | logged rows |",
        "|---|---|---:|---|---:|---:|",
    ]
    for name, rows in runs.items():
        windows: dict[int, list[dict]] = {}
        for row in rows:
            windows.setdefault(-(-row["step"] // every), []).append(row)
        for window, group in windows.items():
            mean = {key: np.mean(_floats(group, key), axis=0) for key in AVERAGED}
            ppl = " / ".join("-" if np.isnan(p) else f"{p:.0f}" for p in np.exp(mean["exit_nll"]))
            lines.append(
                f"| {name} | {(window - 1) * every + 1}-{group[-1]['step']} | {mean['loss']:.3f} "
                f"| {ppl} | {mean['grad_norm']:.2f} | {len(group)} |"
            )
    return "\n".join(lines)


def training_seconds(rows: list[dict], tokens_per_step: int) -> float:
    """Training wall time from metrics.jsonl rows: every row's steps since the previous
    row at its logged tokens/s, plus the compile time of the first step (evaluation
    and checkpoint restores not included)."""
    seconds, previous = 0.0, 0
    for row in rows:
        if row.get("compile_s") is not None:
            seconds += row["compile_s"]
        elif row.get("tokens_per_s"):
            seconds += (row["step"] - previous) * tokens_per_step / row["tokens_per_s"]
        previous = row["step"]
    return seconds


def comparison_table(runs: dict[str, dict]) -> str:
    """One row per trained run: mixer, parameters, steps, median train tokens/s,
    training minutes (`training_seconds`), and every exit's valid and test perplexity.

    runs: {name: {"config": TrainConfig, "params": int, "rows": metrics rows,
    "valid": [L] or None, "test": [L] or None}}.
    """
    lines = [
        "| run | mixer | parameters | steps | train tokens/s (median) | training min "
        "| valid ppl, final exit | test ppl, exits 1..L |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, run in runs.items():
        config, rows = run["config"], run["rows"]
        rates = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
        minutes = training_seconds(rows, config.batch_size * config.model.n_seq) / 60
        test = " / ".join(f"{p:.1f}" for p in run["test"]) if run["test"] else "-"
        valid = f"{run['valid'][-1]:.1f}" if run["valid"] else "-"
        rate = f"{np.median(rates):,.0f}" if rates else "-"
        steps = rows[-1]["step"] if rows else 0
        lines.append(
            f"| {name} | {config.model.mixer} | {run['params']:,} | {steps} "
            f"| {rate} | {minutes:.1f} | {valid} | {test} |"
        )
    return "\n".join(lines)


def _floats(rows: list[dict], key: str) -> np.ndarray:
    """rows[i][key] as one float array ([R] or [R, L]); null (None) entries become NaN."""
    return np.asarray([row[key] for row in rows], float)


def plot_training(
    runs: dict[str, list[dict]], path: str | pathlib.Path, validation: dict | None = None
) -> None:
    """Final-exit train perplexity against step, one line per run (log scale; a null
    NLL is a gap); validation rows (`train.train` with eval_every), if any, as
    markers of the same colour."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, rows in runs.items():
        steps, ppl = [r["step"] for r in rows], np.exp(_floats(rows, "exit_nll")[:, -1])
        (line,) = axis.plot(steps, ppl, label=name)
        checks = (validation or {}).get(name, [])
        if checks:
            axis.plot(
                [r["step"] for r in checks],
                [r["valid_exit_ppl"][-1] for r in checks],
                "o",
                color=line.get_color(),
                label=f"{name}, valid",
            )
    axis.set_yscale("log")
    _save(
        figure,
        axis,
        path,
        xlabel="step",
        ylabel="final-exit perplexity (train batch; markers: valid)",
        title="Training",
    )


def _plot_distribution(results, path):
    """The exit distribution at each threshold, one panel per measure."""
    measures = list(dict.fromkeys(row["measure"] for row in results["sweep"]))
    figure, axes = plt.subplots(
        len(measures), 1, figsize=(7, 3 * len(measures)), squeeze=False, sharex=True
    )
    for axis, measure in zip(axes[:, 0], measures, strict=True):
        rows = [row for row in results["sweep"] if row["measure"] == measure]
        bottom = np.zeros(len(rows))
        labels = [format_threshold(row["threshold"]) for row in rows]
        for depth in range(len(rows[0]["exit_distribution"])):
            shares = np.asarray([row["exit_distribution"][depth] for row in rows])
            axis.bar(labels, shares, bottom=bottom, label=f"exit {depth + 1}")
            bottom += shares
        axis.set(ylabel="share of test tokens", title=measure)
    axes[0, 0].legend(fontsize="small", ncols=3)
    axes[-1, 0].set_xlabel("threshold")
    axes[-1, 0].tick_params(axis="x", labelrotation=60)
    figure.suptitle("Exit distribution")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


SPEEDUP_LABELS = {
    "layer_speedup": "layer speedup (L / average exit layer)",
    "halting_flops_speedup": "FLOPs speedup of real halting (exited tokens stop)",
}


def _plot_tradeoff(results, path, speedup="layer_speedup"):
    """Test perplexity against a speedup of the sweep (and the oracle, and the
    Learn-then-Test thresholds)."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for measure in dict.fromkeys(row["measure"] for row in results["sweep"]):
        rows = [row for row in results["sweep"] if row["measure"] == measure]
        axis.plot([r[speedup] for r in rows], [r["ppl"] for r in rows], "o-", label=measure)
    oracle = results["oracle"]
    axis.plot([oracle[speedup]], [oracle["ppl"]], "k*", markersize=12, label="oracle")
    certified = [r for r in results.get("learn_then_test", []) if r["threshold"] < 1.0]
    for risk, marker in (("consistency", "s"), ("quality", "D")):
        points = [(r["test"][speedup], r["test"]["ppl"]) for r in certified if r["risk"] == risk]
        if points:
            axis.plot(
                *zip(*points, strict=True),
                marker,
                fillstyle="none",
                markersize=10,
                color="black",
                linestyle="none",
                label=f"Learn-then-Test, {risk}",
            )
    _save(
        figure,
        axis,
        path,
        xlabel=SPEEDUP_LABELS[speedup],
        ylabel="test perplexity",
        title="Perplexity vs speedup",
    )


def _plot_measured(results, path):
    figure, axis = plt.subplots(figsize=(6, 4))
    sweep = {(row["measure"], row["threshold"]): row for row in results["sweep"]}
    for measure, timing in results["timing"].items():
        points = [
            (row["speedup"], sweep[(measure, float(t))]["ppl"])
            for t, row in timing.items()
            if isinstance(row, dict) and (measure, float(t)) in sweep
        ]
        axis.plot(*zip(*sorted(points), strict=True), "o-", label=measure)
    axis.axvline(1.0, color="grey", linestyle=":")
    _save(
        figure,
        axis,
        path,
        xlabel="measured wall-clock speedup vs plain forward",
        ylabel="test perplexity",
        title="Perplexity vs measured speedup",
    )


def _save(figure, axis, path, **labels):
    axis.set(**labels)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
