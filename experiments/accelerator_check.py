"""Accelerator check: BK core, model speed, generation and a short training run, one JSON.

    python experiments/accelerator_check.py --out accelerator_check.json --data_dir DIR
    python experiments/accelerator_check.py --dry_run --out /tmp/dry.json   # CPU, seconds

One command for a GPU/TPU lent for minutes (docs/results/gpu/README.md says how
to run it there). Sections, in order, each wrapped so that a failure is recorded
under its name (error and traceback) and the next one still runs:

1. data: WikiText-2 from --data_dir or $EE_JAX_DATA_DIR (the dry run without one
   uses a small synthetic Zipf corpus); the seconds it took.
2. bk_core: `resolvent_diagonal` associative vs sequential, causal and
   bidirectional, at every --sizes N and batch shapes B = (8,) and B x H = (16, 64);
   median ms per call, compile seconds, speed ratio and the largest relative
   difference between the two methods' results.
3. model: forward (final head's logits [B, N, V]) and one training step (loss,
   gradients, AdamW) at the `cpu` and `gpu` training presets' sizes (batch,
   n_seq, model), then the `gpu` preset with the other BK method; ms and tokens/s.
4. generate: `ee_jax.decode.generate` on the `gpu` preset's (random) model at
   B = 1, 8, 64, threshold 1.0 (every block runs) and 0.0 (one block); tokens/s.
5. train: `ee_jax.train.train` on the `gpu` preset for about --train_seconds
   (compilation included): a probe of `log_every` steps measures the step rate,
   then training resumes up to the step that fills the time left (`stop_at_step`,
   the preset's schedule unchanged); then the valid perplexity of every exit
   (`ee_jax.passes.exit_perplexities`) and the logged metrics rows.

Times are medians of at least --min_repeats calls after compilation and a
warm-up call, each followed by `jax.block_until_ready` (`ee_jax.timing`).
Every section has a time box: the items that did not fit are listed under
"skipped", and training stops so that the whole run ends near --time_limit_s.
The JSON (device, versions, date, every section) is rewritten after each
section, so a run killed at its limit still leaves what it measured. Exit
status 1 when a section failed.

--dry_run runs every section at tiny sizes (the `tiny` preset, N = 16, 3
training steps, 2 timed calls each) on the CPU, to check the script before a
device is lent.
"""

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import ee_jax
from ee_jax import cli
from ee_jax.bk_core import resolve_method, resolvent_diagonal
from ee_jax.config import TrainConfig, train_preset
from ee_jax.data import Batch, Corpus, Vocabulary, load_wikitext2, make_lm_stream
from ee_jax.losses import tail_capacities
from ee_jax.metrics import package_versions
from ee_jax.model import EarlyExitLM
from ee_jax.passes import exit_perplexities
from ee_jax.timing import Timing, cold_compilation, time_jitted
from ee_jax.train import train
from ee_jax.train_state import init_state, make_train_step, parameter_count, run_keys, step_keys

SECTIONS = ("data", "bk_core", "model", "generate", "train")
WIKITEXT2_VOCAB = 33278  # vocabulary size when no corpus could be loaded
EVAL_RESERVE_S = 30.0  # kept free after training for the valid-perplexity pass
STEP_RATE_SAFETY = 0.9  # fraction of the time left that the planned steps may fill
VERSIONED = (
    "jax",
    "jaxlib",
    "jax-cuda13-plugin",
    "jax-cuda12-plugin",
    "libtpu",
    "flax",
    "optax",
    "orbax-checkpoint",
    "chex",
    "numpy",
    "tensorflow-datasets",
)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each section runs: full sizes, or tiny ones for --dry_run."""

    bk_sizes: tuple[int, ...]  # N of the BK core
    bk_batches: tuple[tuple[int, ...], ...]  # batch shapes of the BK core: (B,), (B, H)
    presets: tuple[str, str]  # presets standing for "cpu" and "gpu"
    gen_batches: tuple[int, ...]  # B of generation
    gen_steps: int  # new tokens per generation call
    train_steps: int | None  # training steps (None: as many as fit the time box)


def full_sizes(args) -> Sizes:
    """The sizes of a real run, from the flags."""
    return Sizes(
        bk_sizes=tuple(args.sizes),
        bk_batches=((8,), (16, 64)),
        presets=("cpu", "gpu"),
        gen_batches=tuple(args.gen_batches),
        gen_steps=args.gen_steps,
        train_steps=None,
    )


DRY_SIZES = Sizes(
    bk_sizes=(16,),
    bk_batches=((2,), (2, 3)),
    presets=("tiny", "tiny"),
    gen_batches=(1, 2),
    gen_steps=3,
    train_steps=3,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.make_parser(__doc__)
    add = parser.add_argument
    add("--out", help="JSON file to write (rewritten after every section); required")
    add("--summarize", metavar="JSON", help="only print the tables of a report written earlier")
    add(
        "--data_dir",
        default=os.environ.get("EE_JAX_DATA_DIR"),
        help="WikiText-2 folder (train/valid/test.txt; default $EE_JAX_DATA_DIR); needed "
        "for the train section except in the dry run, which then uses a synthetic corpus",
    )
    add("--dry_run", action="store_true", help="tiny sizes on the CPU, in seconds")
    add(
        "--sections",
        nargs="+",
        choices=SECTIONS[1:],
        default=list(SECTIONS[1:]),
        help="sections to run (default all); data always runs first",
    )
    add(
        "--sizes",
        type=cli.positive_int,
        nargs="+",
        default=[512, 2048, 8192, 65536],
        help="BK core N (default 512 2048 8192 65536)",
    )
    add(
        "--gen_batches",
        type=cli.positive_int,
        nargs="+",
        default=[1, 8, 64],
        help="generation B (default 1 8 64)",
    )
    add(
        "--gen_steps",
        type=cli.positive_int,
        default=64,
        help="new tokens per generation call (default 64)",
    )
    add(
        "--time_limit_s",
        type=cli.positive_float,
        default=480.0,
        help="whole run, seconds (default 480)",
    )
    for section, seconds, note in (
        ("bk", 75, "bk_core"),
        ("model", 60, "model"),
        ("generate", 40, "generate"),
        ("train", 300, "training; compilation included, less if the time limit leaves less"),
    ):
        add(
            f"--{section}_seconds",
            type=cli.positive_float,
            default=float(seconds),
            help=f"time box of the {note} section, seconds (default {seconds})",
        )
    add(
        "--min_repeats",
        type=cli.positive_int,
        default=3,
        help="least timed calls per median (default 3)",
    )
    add(
        "--repeat_seconds",
        type=cli.positive_float,
        default=0.3,
        help="timed calls go on until they add up to this many seconds (at most 200 "
        "calls; default 0.3)",
    )
    add(
        "--seed",
        type=cli.nonnegative_int,
        default=0,
        help="seed of inputs and parameters (default 0)",
    )
    args = parser.parse_args(argv)
    if not (args.out or args.summarize):
        parser.error("--out is required (or --summarize JSON)")
    return args


# ---------------------------------------------------------------- bookkeeping


class TimeBox:
    """A section's time budget, capped by the whole run's deadline (time.monotonic)."""

    def __init__(self, seconds: float, deadline: float):
        self.end = min(time.monotonic() + seconds, deadline)

    def left(self) -> float:
        return self.end - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0


def versions() -> dict:
    """Python's version and the installed version of each package in VERSIONED (absent
    ones left out)."""
    found = {name: v for name, v in package_versions(VERSIONED).items() if v is not None}
    return {"python": platform.python_version(), **found}


def git_commit() -> str | None:
    """HEAD of the checkout the script runs from, None outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=pathlib.Path(__file__).parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip()


def device_info() -> dict:
    """The default backend, the first device's platform and kind, the device count, and
    what `bk_method="auto"` resolves to there."""
    device = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "bk_method_auto": resolve_method("auto"),
    }


def peak_memory_bytes() -> int | None:
    """The first device's peak bytes in use so far (None where not reported, e.g. CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def write_report(path: pathlib.Path, report: dict) -> None:
    """Writes `report` as JSON through a temporary file, so `path` is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report, indent=2, default=float) + "\n")
    partial.replace(path)


def run_section(name: str, function, report: dict, out: pathlib.Path) -> None:
    """Runs `function()`, records its result or its error under report["sections"][name]."""
    start = time.monotonic()
    print(f"[{name}] ...", flush=True)
    try:
        entry = {"status": "ok", "result": function()}
    except Exception as error:  # noqa: BLE001 - one section's failure must not stop the others
        entry = {
            "status": "error",
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(),
        }
    entry["seconds"] = time.monotonic() - start
    entry["peak_bytes_in_use"] = peak_memory_bytes()
    report["sections"][name] = entry
    write_report(out, report)
    summary = entry["error"] if entry["status"] == "error" else "ok"
    print(f"[{name}] {summary} ({entry['seconds']:.1f} s)", flush=True)


# ---------------------------------------------------------------- data


def synthetic_corpus(vocab_size: int, seed: int) -> Corpus:
    """A Zipf-distributed corpus (p ~ 1 / rank) with `vocab_size` words, "<eos>" among them:
    4,096 train tokens, 512 valid and 512 test. Ids are in frequency order, as in
    `load_wikitext2`."""
    rng = np.random.default_rng(seed)
    words = ("<eos>", *(f"w{i}" for i in range(1, vocab_size)))
    train, valid, test = (zipf_ids(rng, vocab_size, (n,)) for n in (4096, 512, 512))
    return Corpus(vocab=Vocabulary(words), train=train, valid=valid, test=test)


def zipf_ids(rng: np.random.Generator, vocab_size: int, shape: tuple[int, ...]) -> np.ndarray:
    """Ids in [0, V) with p(id) ~ 1 / (id + 1), int32 of `shape`."""
    weights = 1.0 / np.arange(1, vocab_size + 1)
    return rng.choice(vocab_size, size=shape, p=weights / weights.sum()).astype(np.int32)


def data_section(args, state: dict) -> dict:
    """Loads the corpus into state["corpus"]; returns where it came from and its size."""
    if args.data_dir:
        start = time.monotonic()
        corpus = load_wikitext2(args.data_dir)
        source, seconds = f"WikiText-2 from {args.data_dir}", time.monotonic() - start
    elif args.dry_run:
        corpus, source, seconds = synthetic_corpus(97, args.seed), "synthetic Zipf corpus", 0.0
    else:
        raise FileNotFoundError(
            "no WikiText-2 folder: pass --data_dir or set EE_JAX_DATA_DIR (the model section "
            "then uses Zipf ids; the train section needs the corpus)"
        )
    state["corpus"] = corpus
    return {
        "source": source,
        "load_seconds": seconds,
        "vocab_size": len(corpus.vocab),
        "tokens": {split: int(getattr(corpus, split).size) for split in ("train", "valid", "test")},
    }


def token_batch(corpus: Corpus | None, vocab_size: int, batch: int, n_seq: int, seed: int):
    """(inputs, targets) [B, N] int32: the corpus' first B * (N + 1) train tokens cut
    into rows, or Zipf ids when there is no corpus of that vocabulary."""
    size = batch * (n_seq + 1)
    if corpus is not None and len(corpus.vocab) == vocab_size and corpus.train.size >= size:
        rows = np.asarray(corpus.train[:size], np.int32).reshape(batch, n_seq + 1)  # [B, N + 1]
    else:
        rows = zipf_ids(np.random.default_rng(seed), vocab_size, (batch, n_seq + 1))
    return rows[:, :-1], rows[:, 1:]


def vocab_size_of(state: dict) -> int:
    """V of the loaded corpus, else WikiText-2's."""
    corpus = state.get("corpus")
    return len(corpus.vocab) if corpus is not None else WIKITEXT2_VOCAB


# ---------------------------------------------------------------- bk_core


def time_with_output(function, *args, min_repeats: int, budget_s: float):
    """`ee_jax.timing.time_jitted` that also returns the warm-up call's output, so a
    result can be checked without compiling the function a second time.

    Returns:
      (Timing: compile seconds, median ms per call, calls timed; the output).
    """
    with cold_compilation():
        start = time.perf_counter()
        compiled = jax.jit(function).lower(*args).compile()
        compile_s = time.perf_counter() - start
    output = jax.block_until_ready(compiled(*args))  # warm-up
    durations = []
    while len(durations) < max(min_repeats, 1) or sum(durations) < budget_s:
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        durations.append(time.perf_counter() - start)
        if len(durations) >= 200:
            break
    median_ms = 1e3 * statistics.median(durations)
    return Timing(compile_s=compile_s, median_ms=median_ms, repeats=len(durations)), output


def bk_row(batch: tuple[int, ...], n: int, causal: bool, timing: dict, seed: int) -> dict:
    """Associative vs sequential `resolvent_diagonal` on diag [*batch, N] = -2 + U[-3, 3],
    off-diagonals 1 and z = 1j (float32 in, complex64 out)."""
    rng = np.random.default_rng(seed)
    diag = jnp.asarray(-2.0 + rng.uniform(-3, 3, (*batch, n)), jnp.float32)  # [*batch, N]
    one = jnp.float32(1.0)
    row = {"batch": list(batch), "N": n, "form": "causal" if causal else "bidirectional"}
    results = {}
    for method in ("associative", "sequential"):

        def core(d, method=method):
            return resolvent_diagonal(d, one, one, 1j, causal=causal, method=method)

        timed, output = time_with_output(core, diag, **timing)
        row[f"{method}_ms"] = timed.median_ms
        row[f"{method}_compile_s"] = timed.compile_s
        row[f"{method}_repeats"] = timed.repeats
        results[method] = np.asarray(output)
    row["sequential_over_associative"] = row["sequential_ms"] / row["associative_ms"]
    expected = results["sequential"]
    row["max_rel_diff"] = float(
        np.max(np.abs(results["associative"] - expected) / np.abs(expected))
    )
    row["finite"] = bool(np.all(np.isfinite(results["associative"])))
    return row


def bk_core_section(args, sizes: Sizes, box: TimeBox, timing: dict) -> dict:
    """A `bk_row` per (N, batch shape, form) while the box lasts; the rest "skipped"."""
    rows, skipped = [], []
    for n in sizes.bk_sizes:
        for batch in sizes.bk_batches:
            for causal in (True, False):
                item = {"batch": list(batch), "N": n, "causal": causal}
                if box.expired():
                    skipped.append(item)
                    continue
                row = bk_row(batch, n, causal, timing, args.seed)
                rows.append(row)
                print(
                    f"  bk_core N={n} B={batch} {row['form']}: associative "
                    f"{row['associative_ms']:.3f} ms, sequential {row['sequential_ms']:.3f} ms",
                    flush=True,
                )
    faster = sorted({r["N"] for r in rows if r["associative_ms"] < r["sequential_ms"]})
    return {"rows": rows, "skipped": skipped, "associative_faster_at_N": faster}


# ---------------------------------------------------------------- model


def model_variants(sizes: Sizes, vocab_size: int) -> list[tuple[str, TrainConfig]]:
    """(label, config) in the order timed: the gpu preset (its "auto" BK method resolved
    for this backend), the cpu preset, then the gpu preset with the other BK method."""
    cpu, gpu = (train_preset(name, vocab_size) for name in sizes.presets)
    used = resolve_method(gpu.model.bk_method)
    other = "sequential" if used == "associative" else "associative"
    return [
        (f"gpu (bk_method {used})", gpu.replace(bk_method=used)),
        ("cpu", cpu),
        (f"gpu (bk_method {other})", gpu.replace(bk_method=other)),
    ]


def model_row(config: TrainConfig, inputs, targets, timing: dict) -> dict:
    """Forward and one training step of `config` on (inputs, targets) [B, N] int32:
    median ms, tokens/s (B * N per call) and compile seconds of each."""
    model = EarlyExitLM(config.model)
    state = init_state(config)
    forward = time_jitted(lambda v, t: model.apply(v, t), state.params, inputs, **timing)
    mask = np.ones(inputs.shape, bool)
    capacities = tail_capacities(config.model, targets[None], mask[None])
    step = make_train_step(config, capacities)
    batch = Batch(jnp.asarray(inputs), jnp.asarray(targets), jnp.asarray(mask))
    trained = time_jitted(step, state, batch, step_keys(run_keys(config.seed), 0), **timing)
    tokens = inputs.size
    return {
        "batch_size": inputs.shape[0],
        "n_seq": inputs.shape[1],
        "d_model": config.model.d_model,
        "n_layers": config.model.n_layers,
        "output": config.model.output,
        "bk_method": config.model.bk_method,
        "parameters": parameter_count(config.model),
        "forward_ms": forward.median_ms,
        "forward_tokens_per_s": tokens / (forward.median_ms / 1e3),
        "forward_compile_s": forward.compile_s,
        "train_step_ms": trained.median_ms,
        "train_tokens_per_s": tokens / (trained.median_ms / 1e3),
        "train_step_compile_s": trained.compile_s,
    }


def model_section(args, sizes: Sizes, box: TimeBox, timing: dict, state: dict) -> dict:
    """Rows by label; a variant whose model is one already timed (the dry run's tiny
    stand-ins, once "auto" is resolved) names that row under "same_as" instead."""
    vocab_size = vocab_size_of(state)
    rows, skipped, timed = {}, [], {}
    for label, config in model_variants(sizes, vocab_size):
        resolved = config.replace(bk_method=resolve_method(config.model.bk_method))
        if resolved in timed:
            rows[label] = {"same_as": timed[resolved]}
            continue
        if box.expired():
            skipped.append(label)
            continue
        inputs, targets = token_batch(
            state.get("corpus"), vocab_size, config.batch_size, config.model.n_seq, args.seed
        )
        row = model_row(config, inputs, targets, timing)
        rows[label], timed[resolved] = {"preset": config_name(sizes, label), **row}, label
        print(
            f"  model {label}: forward {row['forward_ms']:.2f} ms, train step "
            f"{row['train_step_ms']:.2f} ms",
            flush=True,
        )
    return {"vocab_size": vocab_size, "rows": rows, "skipped": skipped}


def config_name(sizes: Sizes, label: str) -> str:
    """The preset a model_variants label was built from."""
    return sizes.presets[0] if label == "cpu" else sizes.presets[1]


# ---------------------------------------------------------------- generate


def time_generation(model, variables, prompt, steps: int, threshold: float, repeats: int):
    """(first call seconds, median seconds) of `generate` producing `steps` tokens."""
    rng = jax.random.key(0)
    start = time.perf_counter()
    jax.block_until_ready(
        ee_jax.generate(model, variables, prompt, steps, rng, threshold=threshold)[0]
    )
    first = time.perf_counter() - start
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = ee_jax.generate(model, variables, prompt, steps, rng, threshold=threshold)
        jax.block_until_ready(out[0])
        durations.append(time.perf_counter() - start)
    return first, statistics.median(durations)


def generate_section(args, sizes: Sizes, box: TimeBox, state: dict) -> dict:
    """Tokens/s of `generate` on the gpu preset's randomly initialised model, prompt of
    one token per row, at each B and threshold 1.0 (every block) and 0.0 (one block)."""
    preset = train_preset(sizes.presets[1], vocab_size_of(state))
    config = preset.model
    model, variables = EarlyExitLM(config), init_state(preset).params
    steps = min(sizes.gen_steps, config.n_seq)  # a prompt of 1 + steps - 1 <= n_seq positions
    rows, skipped = [], []
    for batch in sizes.gen_batches:
        prompt, _ = token_batch(state.get("corpus"), config.vocab_size, batch, 1, args.seed)
        for threshold in (1.0, 0.0):
            if box.expired():
                skipped.append({"batch_size": batch, "threshold": threshold})
                continue
            first, median = time_generation(
                model, variables, prompt, steps, threshold, args.min_repeats
            )
            rows.append(
                {
                    "batch_size": batch,
                    "threshold": threshold,
                    "steps": steps,
                    "first_call_s": first,
                    "median_s": median,
                    "tokens_per_s": batch * steps / median,
                    "ms_per_step": 1e3 * median / steps,
                }
            )
            print(
                f"  generate B={batch} threshold {threshold}: "
                f"{rows[-1]['tokens_per_s']:,.0f} tokens/s",
                flush=True,
            )
    return {
        "preset": sizes.presets[1],
        "n_layers": config.n_layers,
        "rows": rows,
        "skipped": skipped,
    }


# ---------------------------------------------------------------- train


def train_config(sizes: Sizes, vocab_size: int) -> TrainConfig:
    """The gpu preset, or for the dry run its stand-in cut to a few steps logged each."""
    config = train_preset(sizes.presets[1], vocab_size)
    if sizes.train_steps is None:
        return config
    return config.replace(steps=sizes.train_steps, warmup_steps=1, log_every=1)


def read_metrics(workdir: pathlib.Path) -> list[dict]:
    """The rows of a training run's metrics.jsonl."""
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def planned_end(config: TrainConfig, probe: int, rows: list[dict], seconds_left: float) -> int:
    """The last step to train to: the probe's logged rate (steps/s, compile excluded)
    times the time left (with STEP_RATE_SAFETY), at most config.steps."""
    rates = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    if not rates or seconds_left <= 0:
        return probe
    steps_per_s = rates[-1] / (config.batch_size * config.model.n_seq)
    return min(config.steps, probe + int(STEP_RATE_SAFETY * seconds_left * steps_per_s))


def train_section(args, sizes: Sizes, box: TimeBox, state: dict) -> dict:
    """Trains in a temporary folder (a probe, then up to the planned step) and scores
    every exit on the valid split.

    Raises:
      RuntimeError: no corpus was loaded.
    """
    corpus = state.get("corpus")
    if corpus is None:
        raise RuntimeError("no corpus (the data section failed or did not run)")
    config = train_config(sizes, len(corpus.vocab))
    eos = corpus.vocab.eos_id
    stream = make_lm_stream(corpus.train, config.batch_size, config.model.n_seq, eos_id=eos)
    probe = min(config.log_every, config.steps)
    with tempfile.TemporaryDirectory(prefix="accelerator_check_") as folder:
        workdir = pathlib.Path(folder)
        start = time.monotonic()
        train(config, stream, workdir, vocab=corpus.vocab, stop_at_step=probe, progress=False)
        probe_s = time.monotonic() - start
        end = sizes.train_steps or planned_end(config, probe, read_metrics(workdir), box.left())
        print(f"  train: probe {probe} steps in {probe_s:.1f} s, training to {end}", flush=True)
        final = train(config, stream, workdir, vocab=corpus.vocab, stop_at_step=end, progress=False)
        train_s = time.monotonic() - start
        rows = read_metrics(workdir)
    valid = make_lm_stream(corpus.valid, config.eval_batch_size, config.model.n_seq, eos_id=eos)
    start = time.monotonic()
    evaluation = exit_perplexities(EarlyExitLM(config.model), final.params, valid, progress=False)
    return {
        "preset": sizes.presets[1],
        "schedule_steps": config.steps,
        "steps": int(final.step),
        "tokens": int(final.step) * config.batch_size * config.model.n_seq,
        "probe_steps": probe,
        "probe_seconds": probe_s,
        "train_seconds": train_s,
        "compile_s": rows[0].get("compile_s"),
        "valid": evaluation,
        "eval_seconds": time.monotonic() - start,
        "metrics": rows,
    }


# ---------------------------------------------------------------- tables


def markdown(header: tuple[str, ...], rows: list[tuple]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def print_tables(report: dict) -> None:
    """The report's numbers as markdown tables (ms are medians; see the module docstring)."""
    device = report["device"]
    print(f"\n{device['device_kind']} ({device['platform']}), jax {report['versions']['jax']}")
    results = {n: s["result"] for n, s in report["sections"].items() if s["status"] == "ok"}
    for name, section in report["sections"].items():
        if section["status"] != "ok":
            print(f"{name}: {section['error']}")
    if "bk_core" in results:
        header = ("B", "N", "form", "associative ms", "sequential ms", "seq/assoc", "max rel diff")
        rows = [
            ("x".join(map(str, r["batch"])), r["N"], r["form"], f"{r['associative_ms']:.3f}",
             f"{r['sequential_ms']:.3f}", f"{r['sequential_over_associative']:.2f}",
             f"{r['max_rel_diff']:.1e}")
            for r in results["bk_core"]["rows"]
        ]  # fmt: skip
        print("\n" + markdown(header, rows))
    if "model" in results:
        header = ("model", "B x N", "forward ms", "forward tok/s", "train ms", "train tok/s")
        rows = [
            (label, f"{r['batch_size']}x{r['n_seq']}", f"{r['forward_ms']:.2f}",
             f"{r['forward_tokens_per_s']:,.0f}", f"{r['train_step_ms']:.2f}",
             f"{r['train_tokens_per_s']:,.0f}")
            for label, r in results["model"]["rows"].items() if "same_as" not in r
        ]  # fmt: skip
        print("\n" + markdown(header, rows))
    if "generate" in results:
        header = ("B", "threshold", "tokens/s", "ms per step")
        rows = [
            (
                r["batch_size"],
                r["threshold"],
                f"{r['tokens_per_s']:,.0f}",
                f"{r['ms_per_step']:.2f}",
            )
            for r in results["generate"]["rows"]
        ]
        print("\n" + markdown(header, rows))
    if "train" in results:
        t = results["train"]
        ppl = ", ".join(f"{p:.1f}" for p in t["valid"]["exit_ppl"])
        print(
            f"\ntrain: {t['steps']} steps in {t['train_seconds']:.0f} s; valid ppl per exit: {ppl}"
        )


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summarize:
        print_tables(json.loads(pathlib.Path(args.summarize).read_text()))
        return 0
    if args.dry_run:
        jax.config.update("jax_platforms", "cpu")  # before the first backend use
    deadline = time.monotonic() + args.time_limit_s
    sizes = DRY_SIZES if args.dry_run else full_sizes(args)
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "dry_run": args.dry_run,
        "command": sys.argv if argv is None else [__file__, *argv],
        "git_commit": git_commit(),
        "device": device_info(),
        "versions": versions(),
        # glibc heap reuse (ee_jax.keep_freed_memory, applied on import unless opted out).
        "keep_freed_memory": os.environ.get("EE_JAX_KEEP_FREED_MEMORY", "1") != "0",
        "sizes": dataclasses.asdict(sizes),
        "sections": {},
    }
    ee_jax.enable_compilation_cache()  # training resumes after its probe: a cache hit
    print(f"device {report['device']}, versions {report['versions']}", flush=True)
    timing = {"min_repeats": args.min_repeats, "budget_s": args.repeat_seconds}
    if args.dry_run:  # the dry run checks the plumbing, not the numbers
        timing = {"min_repeats": 2, "budget_s": 0.0}
    state: dict = {}
    out = pathlib.Path(args.out).expanduser().resolve()
    sections = {
        "data": lambda: data_section(args, state),
        "bk_core": lambda: bk_core_section(args, sizes, TimeBox(args.bk_seconds, deadline), timing),
        "model": lambda: model_section(
            args, sizes, TimeBox(args.model_seconds, deadline), timing, state
        ),
        "generate": lambda: generate_section(
            args, sizes, TimeBox(args.generate_seconds, deadline), state
        ),
        "train": lambda: train_section(
            args, sizes, TimeBox(args.train_seconds, deadline - EVAL_RESERVE_S), state
        ),
    }
    for name in SECTIONS:
        if name == "data" or name in args.sections:
            run_section(name, sections[name], report, out)
    print_tables(report)
    print(f"wrote {out}")
    failed = [n for n, s in report["sections"].items() if s["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
