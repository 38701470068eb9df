"""Benchmark of the whole model: forward, early exit, training step, MoE, compile time.

    python experiments/bench_model.py [--vocab_size 33278] [--d_model 64] [--n_layers 4]
                                      [--batch_size 8] [--json bench_model.json]

Random parameters (`model.init`) and random tokens, float32, on the default JAX
device. Every time is the median of at least --min_repeats calls after compile
and a warm-up call, each followed by `jax.block_until_ready`. It prints:

1. the standard forward `model.apply(variables, tokens)` (full logits [B, N, V]);
2. `early_exit_forward` at several thresholds with the softmax_max measure (a
   random-init model has near-uniform softmax, so thresholds between 1/V and 1
   run full depth: that is reported, not hidden);
3. one training step (value_and_grad of `lm_loss` + adamw, dropout on), with
   the final exit's loss only (the PyTorch original's objective) and with every
   exit's loss (uniform weights);
4. the bare vocabulary projection [B*N, D] @ [D, V] in the same run (jitted
   einsum and numpy BLAS) and forward time / projection time;
5. the compile time of the halting loop at --n_layers and at --compile_layers;
6. the MoE FFN (top-k routed, `jax.lax.ragged_dot`) against running every expert
   on every token with the same parameters, forward and forward+backward.

`--section output` instead compares the exits' output layers on the `cpu`
training preset's model (B = 16, N = 128), "full" softmax against "adaptive"
softmax (`ee_jax.adaptive`), side by side in one run: the training step (and
variants: every position scored, tied adaptive input), the softmax_max halting
loop at threshold 1.0 (every check made, no exit) against the plain forward, and
one decoding step per token at B = 1 and B = 8 (logits of every word, and the
target's NLL only). Tokens are real WikiText-2 train windows when --data_dir or
$EE_JAX_DATA_DIR is given (frequency-ordered ids: cluster use as in training),
else Zipf-distributed ids (p ~ 1 / rank).

Tokens/s are B*N / (time of one call). "vs original" divides by the PyTorch
original's tokens/s measured on this repository's 2-core CPU machine.

On Linux CPU, every fresh [B*N, V] buffer (136 MB) is page-faulted in 4 KiB pages
unless glibc backs malloc with transparent huge pages; running with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` made the forward about 2x faster here.
The header line prints whether it is set.
"""

import argparse
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import ee_jax
from ee_jax import adaptive, cli
from ee_jax.config import ModelConfig, TrainConfig, train_preset
from ee_jax.data import Batch, load_wikitext2, make_lm_stream
from ee_jax.decode import decode_step
from ee_jax.early_exit import early_exit_forward, early_exit_loop
from ee_jax.losses import tail_capacities
from ee_jax.model import EarlyExitLM
from ee_jax.moe import MoEFeedForward
from ee_jax.state import RecurrentState
from ee_jax.timing import Timing, cold_compilation, time_jitted
from ee_jax.train_state import (
    TrainState,
    init_state,
    make_optimizer,
    make_train_step,
    run_keys,
    step_keys,
)

# The PyTorch original on this machine (tokens/s, B = 8, N = 128, V = 33,278).
ORIGINAL = {"forward": 1462.0, "early_exit": 688.0, "train_step": 885.0}
TARGETS = {
    "forward_vs_original": 5.0,
    "forward_vs_projection": 1.25,
    "train_final_vs_original": 3.0,
    "compile_ratio": 2.0,
}
BALANCE_WEIGHT = 0.01  # MoE load-balancing loss weight in the timed training step


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.make_parser(__doc__)
    parser.add_argument(
        "--vocab_size",
        type=cli.positive_int,
        default=33278,
        help="vocabulary size V (default 33278)",
    )
    parser.add_argument(
        "--d_model", type=cli.positive_int, default=64, help="model width D (default 64)"
    )
    parser.add_argument("--n_layers", type=cli.positive_int, default=4, help="blocks L (default 4)")
    parser.add_argument(
        "--batch_size", type=cli.positive_int, default=8, help="batch size B (default 8)"
    )
    parser.add_argument(
        "--n_seq", type=cli.positive_int, default=128, help="sequence length N (default 128)"
    )
    parser.add_argument(
        "--thresholds",
        type=cli.probability,
        nargs="+",
        default=[0.0, 0.5, 0.9, 1.0],
        help="early-exit thresholds to time (default 0 0.5 0.9 1)",
    )
    parser.add_argument(
        "--compile_layers",
        type=cli.positive_int,
        default=32,
        help="deep L whose halting-loop compile time is compared with --n_layers (default 32)",
    )
    parser.add_argument(
        "--min_repeats",
        type=cli.positive_int,
        default=7,
        help="least timed calls per median (default 7)",
    )
    parser.add_argument(
        "--budget",
        type=cli.nonnegative_float,
        default=2.0,
        help="seconds of timed calls per measurement, at least (default 2)",
    )
    parser.add_argument(
        "--seed", type=cli.nonnegative_int, default=0, help="seed of parameters and tokens"
    )
    parser.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    parser.add_argument(
        "--section",
        choices=("model", "output"),
        default="model",
        help="model: forward, early exit, training, MoE, compile (default); output: full vs "
        "adaptive softmax on the cpu preset (training step, halting loop, decoding)",
    )
    parser.add_argument(
        "--data_dir",
        default=os.environ.get("EE_JAX_DATA_DIR"),
        help="WikiText-2 folder for --section output (default $EE_JAX_DATA_DIR; "
        "without one, Zipf-distributed ids)",
    )
    return parser.parse_args(argv)


def time_call(function, *args, min_repeats: int, budget_s: float) -> Timing:
    """Like `time_jitted` for an already-jitted (or jit-wrapping) callable: the
    first call (compile + run) is timed as compile_s, then a warm-up call."""
    start = time.perf_counter()
    jax.block_until_ready(function(*args))
    first_s = time.perf_counter() - start
    jax.block_until_ready(function(*args))
    durations = []
    while len(durations) < min_repeats or sum(durations) < budget_s:
        start = time.perf_counter()
        jax.block_until_ready(function(*args))
        durations.append(time.perf_counter() - start)
    return Timing(
        compile_s=first_s, median_ms=1e3 * statistics.median(durations), repeats=len(durations)
    )


def build(config: ModelConfig, batch: int, seed: int):
    """(model, variables, tokens [B, N], targets [B, N]) with random values."""
    params_key, data_key = jax.random.split(jax.random.key(seed))
    model = EarlyExitLM(config)
    data = jax.random.randint(data_key, (batch, config.n_seq + 1), 0, config.vocab_size)
    variables = model.init(params_key, data[:, :-1])
    return model, variables, data[:, :-1], data[:, 1:]


def bench_forward(model, variables, tokens, timing) -> dict:
    result = time_jitted(lambda v, t: model.apply(v, t), variables, tokens, **timing)
    return {"ms": result.median_ms, "compile_s": result.compile_s, "repeats": result.repeats}


def bench_early_exit(model, variables, tokens, thresholds, timing) -> list[dict]:
    rows = []
    for threshold in thresholds:
        call = functools.partial(
            early_exit_forward, model, variables, tokens, threshold, measure="softmax_max"
        )
        result = time_call(call, **timing)
        _, info = call()
        rows.append(
            {
                "threshold": threshold,
                "ms": result.median_ms,
                "first_call_s": result.compile_s,
                "layers_run": int(info.layers_run),
                "avg_exit_depth": float(jnp.mean(info.exit_depth)),
                "repeats": result.repeats,
            }
        )
    return rows


def bench_train(model, variables, tokens, targets, scheme: str, timing) -> dict:
    """One `ee_jax.train` step (loss, gradients, AdamW) with the given exit weighting."""
    config = TrainConfig(
        model=model.config,
        batch_size=tokens.shape[0],
        exit_weighting=scheme,
        balance_weight=BALANCE_WEIGHT,
    )
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables,
        opt_state=make_optimizer(config).init(variables),
    )
    batch = Batch(tokens, targets, jnp.ones(tokens.shape, bool))
    rngs = step_keys(run_keys(1), 0)
    result = time_jitted(make_train_step(config), state, batch, rngs, **timing)
    return {
        "weights": scheme,
        "ms": result.median_ms,
        "compile_s": result.compile_s,
        "repeats": result.repeats,
    }


def bench_projection(config: ModelConfig, tokens_per_call: int, timing) -> dict:
    """[T, D] @ [D, V] with jnp (jitted) and numpy, and jnp with the model's [V, D] layout."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((tokens_per_call, config.d_model), np.float32)
    w = rng.standard_normal((config.d_model, config.vocab_size), np.float32)
    jitted = time_jitted(lambda a, b: jnp.einsum("td,dv->tv", a, b), x, w, **timing)  # [T, V]
    w_vd = np.ascontiguousarray(w.T)  # [V, D]
    model_layout = time_jitted(lambda a, b: jnp.einsum("td,vd->tv", a, b), x, w_vd, **timing)
    numpy_ms = time_call(lambda: x @ w, **timing).median_ms
    return {
        "jnp_dv_ms": jitted.median_ms,
        "jnp_vd_ms": model_layout.median_ms,
        "numpy_ms": numpy_ms,
    }


def compile_seconds(config: ModelConfig, batch: int, seed: int) -> dict:
    """Trace+lower and XLA-compile seconds of the softmax_max halting loop, with the
    persistent compilation cache off (a cache hit would time a disk read). JAX decides
    once per process whether the cache is used, so `reset_cache` makes it re-read the
    setting on each side of the measurement."""
    model, variables, tokens, _ = build(config, batch, seed)
    # A fresh callable each time, so no in-memory trace or executable cache hits either.
    jitted = jax.jit(functools.partial(early_exit_loop), static_argnums=(0, 4, 5))
    with cold_compilation():
        start = time.perf_counter()
        lowered = jitted.lower(model, variables, tokens, jnp.float32(0.9), "softmax_max", "freeze")
        lower_s = time.perf_counter() - start
        start = time.perf_counter()
        lowered.compile()
        compile_s = time.perf_counter() - start
    return {"layers": config.n_layers, "lower_s": lower_s, "compile_s": compile_s}


def dense_moe(params, x: jax.Array, top_k: int) -> jax.Array:
    """Every expert on every token, then mixed by the top-k gates; [T, D]."""
    gates = jax.nn.softmax(x @ params["router"]["kernel"] + params["router"]["bias"])  # [T, E]
    top_gates, experts = jax.lax.top_k(gates, top_k)  # [T, k]
    mixing = jnp.einsum("tke,tk->te", jax.nn.one_hot(experts, gates.shape[-1]), top_gates)
    hidden = nn.gelu(jnp.einsum("td,edf->tef", x, params["up_kernel"]) + params["up_bias"])
    out = jnp.einsum("tef,efd->ted", hidden, params["down_kernel"]) + params["down_bias"]
    return jnp.einsum("ted,te->td", out, mixing)  # [T, D]


def bench_moe(config: ModelConfig, tokens_per_call: int, timing) -> dict:
    moe = MoEFeedForward(config.num_experts, config.top_k)
    x_key, params_key = jax.random.split(jax.random.key(2))
    x = jax.random.normal(x_key, (tokens_per_call, config.d_model))  # [T, D]
    params = moe.init(params_key, x)["params"]
    routed = lambda p, a: moe.apply({"params": p}, a)[0]  # noqa: E731
    dense = lambda p, a: dense_moe(p, a, config.top_k)  # noqa: E731
    error = float(jnp.max(jnp.abs(jax.jit(routed)(params, x) - jax.jit(dense)(params, x))))
    row = {"max_abs_diff": error, "flop_ratio": config.top_k / config.num_experts}
    for name, function in (("routed", routed), ("dense", dense)):
        backward = jax.grad(lambda p, a, f=function: jnp.sum(jnp.square(f(p, a))), argnums=(0, 1))
        row[f"{name}_fwd_ms"] = time_jitted(function, params, x, **timing).median_ms
        row[f"{name}_fwd_bwd_ms"] = time_jitted(backward, params, x, **timing).median_ms
    return row


def speed(ms: float, tokens_per_call: int) -> float:
    return tokens_per_call / (ms / 1e3)


def print_table(results: dict, tokens_per_call: int) -> None:
    print("| what | ms per call | tokens/s | vs original | target |")
    print("|---|---:|---:|---:|---|")

    def row(what, ms, original=None, target=""):
        rate = speed(ms, tokens_per_call)
        versus = "-"
        if original:
            versus = f"{rate / ORIGINAL[original]:.2f}x of {ORIGINAL[original]:,.0f}"
        print(f"| {what} | {ms:.1f} | {rate:,.0f} | {versus} | {target} |")

    projection = results["projection"]
    row(
        "forward, full logits [B, N, V]",
        results["forward"]["ms"],
        "forward",
        f">= {TARGETS['forward_vs_original']:.0f}x original",
    )
    for ee in results["early_exit"]:
        row(
            f"early exit, softmax_max, threshold {ee['threshold']:g} "
            f"(layers run {ee['layers_run']}, avg depth {ee['avg_exit_depth']:.2f})",
            ee["ms"],
            "early_exit",
        )
    for train in results["train"]:
        target = (
            f">= {TARGETS['train_final_vs_original']:.0f}x original"
            if train["weights"] == "final"
            else ""
        )
        row(f"training step, {train['weights']} exit weights", train["ms"], "train_step", target)
    row("projection [B*N, D] @ [D, V], jnp", projection["jnp_dv_ms"])
    row("projection [B*N, D] @ [V, D]^T, jnp (model layout)", projection["jnp_vd_ms"])
    row("projection [B*N, D] @ [D, V], numpy BLAS", projection["numpy_ms"])


def print_ratios(results: dict) -> None:
    forward, projection = results["forward"]["ms"], results["projection"]
    tokens_per_call = results["tokens_per_call"]
    final = next(t for t in results["train"] if t["weights"] == "final")
    shallow, deep = results["compile"]
    moe = results["moe"]
    lines = [
        (
            "forward vs original",
            speed(forward, tokens_per_call) / ORIGINAL["forward"],
            f"target >= {TARGETS['forward_vs_original']:g}",
        ),
        (
            "forward time / jnp projection time",
            forward / projection["jnp_dv_ms"],
            f"target <= {TARGETS['forward_vs_projection']:g}",
        ),
        ("forward time / numpy projection time", forward / projection["numpy_ms"], ""),
        (
            "training step (final exit) vs original",
            speed(final["ms"], tokens_per_call) / ORIGINAL["train_step"],
            f"target >= {TARGETS['train_final_vs_original']:g}",
        ),
        (
            f"halting-loop compile, L={deep['layers']} / L={shallow['layers']} "
            f"({deep['compile_s']:.2f} s / {shallow['compile_s']:.2f} s)",
            deep["compile_s"] / shallow["compile_s"],
            f"target < {TARGETS['compile_ratio']:g}",
        ),
        (
            f"  trace+lower, L={deep['layers']} / L={shallow['layers']} "
            f"({deep['lower_s']:.2f} s / {shallow['lower_s']:.2f} s)",
            deep["lower_s"] / shallow["lower_s"],
            "",
        ),
        (
            "MoE routed / dense time, forward",
            moe["routed_fwd_ms"] / moe["dense_fwd_ms"],
            f"analytic expert FLOPs {moe['flop_ratio']:g}",
        ),
        (
            "MoE routed / dense time, forward+backward",
            moe["routed_fwd_bwd_ms"] / moe["dense_fwd_bwd_ms"],
            f"analytic expert FLOPs {moe['flop_ratio']:g}",
        ),
    ]
    print("\n| ratio | value | note |")
    print("|---|---:|---|")
    for name, value, note in lines:
        print(f"| {name} | {value:.2f} | {note} |")
    print(
        f"\nMoE: routed fwd {moe['routed_fwd_ms']:.2f} ms, "
        f"dense fwd {moe['dense_fwd_ms']:.2f} ms, "
        f"routed fwd+bwd {moe['routed_fwd_bwd_ms']:.2f} ms, dense fwd+bwd "
        f"{moe['dense_fwd_bwd_ms']:.2f} ms; max |routed - dense| = {moe['max_abs_diff']:.1e}"
    )


# ---------------------------------------------------------------- --section output


OUTPUT_TARGETS = {"train_speedup": 6.0, "halting_vs_forward": 0.5}


def output_batch(vocab_size: int, batch: int, seq: int, data_dir, seed: int):
    """(inputs, targets [B, N] int32, source): WikiText-2 train window 0, or Zipf ids."""
    if data_dir:
        corpus = load_wikitext2(data_dir)
        if len(corpus.vocab) == vocab_size:
            stream = make_lm_stream(corpus.train, batch, seq, eos_id=corpus.vocab.eos_id)
            window = stream.window(0)
            return window.inputs, window.targets, "WikiText-2 train window 0"
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, vocab_size + 1)
    ids = rng.choice(vocab_size, size=(batch, seq + 1), p=weights / weights.sum())
    ids = ids.astype(np.int32)
    return ids[:, :-1], ids[:, 1:], "Zipf ids"


def bench_output_train(config: TrainConfig, inputs, targets, timing) -> dict:
    """One training step of `config` (capacities from this batch, as `train` does)."""
    mask = np.ones(inputs.shape, bool)
    capacities = tail_capacities(config.model, targets[None], mask[None])
    state = init_state(config)
    batch = Batch(jnp.asarray(inputs), jnp.asarray(targets), jnp.asarray(mask))
    step = make_train_step(config, capacities)
    result = time_jitted(step, state, batch, step_keys(run_keys(1), 0), **timing)
    return {"ms": result.median_ms, "compile_s": result.compile_s, "repeats": result.repeats}


def bench_output_inference(config: ModelConfig, inputs, targets, timing) -> dict:
    """Plain forward vs the softmax_max halting loop at threshold 1.0, and decoding."""
    model = EarlyExitLM(config)
    variables = model.init(jax.random.key(0), jnp.asarray(inputs))
    forward = time_jitted(lambda v, t: model.apply(v, t), variables, inputs, **timing)
    halting = time_call(
        functools.partial(early_exit_forward, model, variables, inputs, 1.0), **timing
    )
    row = {"forward_ms": forward.median_ms, "halting_ms": halting.median_ms}
    for batch in (1, 8):
        state = RecurrentState.make(config, batch)
        tokens, target = jnp.asarray(inputs[:batch, 0]), jnp.asarray(targets[:batch, 0])

        def logits(v, s, t, y):
            return decode_step(model, v, s, t, jnp.float32(1.0), "learned")[0]

        def nll(v, s, t, y):
            fn = lambda layer, x: adaptive.target_nll(layer, x, y)  # noqa: E731
            return decode_step(model, v, s, t, jnp.float32(1.0), "learned", fn)[0]

        for name, function in (("logits", logits), ("nll", nll)):
            result = time_jitted(function, variables, state, tokens, target, **timing)
            row[f"decode_{name}_b{batch}_ms_per_token"] = result.median_ms / batch
    return row


def run_output_section(args, timing) -> dict:
    base = train_preset("cpu", args.vocab_size)
    inputs, targets, source = output_batch(
        args.vocab_size, base.batch_size, base.model.n_seq, args.data_dir, args.seed
    )
    variants = {
        "full": base.replace(output="full"),
        "adaptive": base,
        "adaptive, every position scored": base.replace(exit_token_fraction=1.0),
        "adaptive, tied (adaptive input)": base.replace(unembedding="tied"),
    }
    results = {"source": source, "train": {}, "inference": {}}
    for name, config in variants.items():
        results["train"][name] = bench_output_train(config, inputs, targets, timing)
        print(f"train step, {name}: {results['train'][name]['ms']:.1f} ms", flush=True)
    for name in ("full", "adaptive"):
        model_config = variants[name].model
        results["inference"][name] = bench_output_inference(model_config, inputs, targets, timing)
        print(f"inference, {name}: {results['inference'][name]}", flush=True)
    return results


def decode_cell(row: dict, batch: int) -> str:
    logits, nll = (row[f"decode_{name}_b{batch}_ms_per_token"] for name in ("logits", "nll"))
    return f"{logits:.3f}, {nll:.3f}"


def print_output_tables(results: dict, config: TrainConfig) -> None:
    tokens = config.batch_size * config.model.n_seq
    full_ms = results["train"]["full"]["ms"]
    print(f"\nTokens: {results['source']}.")
    print("\n| training step (cpu preset, B=16, N=128) | ms | tokens/s | vs full |")
    print("|---|---:|---:|---:|")
    for name, row in results["train"].items():
        print(
            f"| {name} | {row['ms']:.1f} | {speed(row['ms'], tokens):,.0f} | "
            f"{full_ms / row['ms']:.2f}x |"
        )
    print(f"target: adaptive >= {OUTPUT_TARGETS['train_speedup']:g}x of full")
    print(
        "\n| output | forward ms | halting loop ms (softmax_max, t=1.0) | halting / forward "
        "speed | decode ms/token B=1 (logits, NLL) | decode ms/token B=8 (logits, NLL) |"
    )
    print("|---|---:|---:|---:|---|---|")
    for name, row in results["inference"].items():
        print(
            f"| {name} | {row['forward_ms']:.1f} | {row['halting_ms']:.1f} | "
            f"{row['forward_ms'] / row['halting_ms']:.2f}x | "
            f"{decode_cell(row, 1)} | {decode_cell(row, 8)} |"
        )
    print(f"target: halting / forward speed >= {OUTPUT_TARGETS['halting_vs_forward']:g}x")


def main(argv=None) -> None:
    args = parse_args(argv)
    ee_jax.enable_compilation_cache()
    if args.section == "output":
        timing = {"min_repeats": args.min_repeats, "budget_s": args.budget}
        print(
            f"Output-layer benchmark, cpu preset; device {jax.devices()[0].device_kind}, "
            f"jax {jax.__version__}; GLIBC_TUNABLES="
            f"{os.environ.get('GLIBC_TUNABLES', '(unset)')}",
            flush=True,
        )
        results = run_output_section(args, timing)
        print_output_tables(results, train_preset("cpu", args.vocab_size))
        if args.json:
            with open(args.json, "w") as file:
                json.dump(results, file, indent=2)
            print(f"wrote {args.json}")
        return
    config = ModelConfig(
        vocab_size=args.vocab_size,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_seq=args.n_seq,
        num_experts=4,
        top_k=1,
    )
    timing = {"min_repeats": args.min_repeats, "budget_s": args.budget}
    tokens_per_call = args.batch_size * args.n_seq
    device = jax.devices()[0]
    print(
        f"Model benchmark: B={args.batch_size}, N={args.n_seq}, V={args.vocab_size}, "
        f"D={args.d_model}, L={args.n_layers}, E=4, top_k=1, float32; device: {device.platform} "
        f"({device.device_kind}), {jax.local_device_count()} device(s), jax {jax.__version__}; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}",
        flush=True,
    )
    model, variables, tokens, targets = build(config, args.batch_size, args.seed)
    results = {
        "config": vars(args),
        "device": device.device_kind,
        "tokens_per_call": tokens_per_call,
        "original_tokens_per_s": ORIGINAL,
    }
    results["projection"] = bench_projection(config, tokens_per_call, timing)
    results["forward"] = bench_forward(model, variables, tokens, timing)
    results["early_exit"] = bench_early_exit(model, variables, tokens, args.thresholds, timing)
    results["train"] = [
        bench_train(model, variables, tokens, targets, scheme, timing)
        for scheme in ("final", "uniform")
    ]
    results["compile"] = [
        compile_seconds(config.replace(n_layers=layers), args.batch_size, args.seed)
        for layers in (args.n_layers, args.compile_layers)
    ]
    results["moe"] = bench_moe(config, tokens_per_call, timing)
    print_table(results, tokens_per_call)
    print_ratios(results)
    print(
        "\nCompile: trace+lower and XLA compile of jax.jit(early_exit_loop) at softmax_max, "
        "persistent cache off. Timing noise: 2 shared CPU cores; medians of "
        f">= {args.min_repeats} calls."
    )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
