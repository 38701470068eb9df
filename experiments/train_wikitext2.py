r"""Train the early-exit BK language model on WikiText-2.

    python experiments/train_wikitext2.py --preset cpu --workdir runs/cpu \
        --data_dir ../shared/data/wikitext-2

Re-running the same command resumes from the latest checkpoint in --workdir
(with other settings only with --allow_config_change true). Ctrl-C or SIGTERM
saves the current step and prints the command that resumes it.
Every TrainConfig and ModelConfig field can be overridden by name
(e.g. --steps 2000 --d_model 256 --mixer none). With --eval_every N it
validates every N steps; after training it prints the validation perplexity of
every exit (--final_eval false skips it). Metrics go to WORKDIR/metrics.jsonl
and, as TensorBoard event files, to WORKDIR/tensorboard.
"""

import argparse
import dataclasses
import pathlib
import sys

import ee_jax
from ee_jax import cli
from ee_jax.config import TRAIN_PRESETS, ModelConfig, TrainConfig, field_help, train_preset
from ee_jax.data import load_wikitext2, make_lm_stream

SKIPPED = {"model", "vocab_size"}
# Stands in for the corpus's vocabulary size when the flags are checked before the
# corpus is loaded: above any adaptive cutoff (the real size is checked after).
PLACEHOLDER_VOCAB_SIZE = 2**31 - 1


def parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


def parse_pair(text: str) -> tuple[float, float]:
    low, high = (float(x) for x in text.split(","))
    return low, high


def parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, with the field's comment as its help."""
    for cls in (TrainConfig, ModelConfig):
        group = parser.add_argument_group(f"{cls.__name__} overrides (default: the preset's)")
        helps = field_help(cls)
        for field in dataclasses.fields(cls):
            if field.name in SKIPPED:
                continue
            kind = {
                "bool": parse_bool,
                "int": int,  # ranges: the configs' own checks (check_flags)
                "float": cli.finite_float,
                "tuple[float, float]": parse_pair,
                "tuple[int, ...]": parse_ints,  # --adaptive_cutoffs 2000,10000
            }.get(str(field.type).replace("<class '", "").replace("'>", ""), str)
            group.add_argument(
                f"--{field.name}", type=kind, default=None, help=helps.get(field.name, "")
            )


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.make_parser(__doc__)
    parser.add_argument(
        "--preset",
        default="cpu",
        choices=sorted(TRAIN_PRESETS),
        help="training preset (see ee_jax.config.train_preset)",
    )
    cli.add_data_flags(parser)
    parser.add_argument(
        "--verify_checksums",
        type=parse_bool,
        default=True,
        help="check the files' sha256 against wikitext-2-v1 (false for a "
        "custom corpus with the same file names)",
    )
    parser.add_argument(
        "--stop_at_step",
        type=int,  # its range depends on --steps: check_flags
        default=None,
        help="stop at this step, in [1, steps], (checkpointed) without changing the schedule",
    )
    parser.add_argument(
        "--resume_step",
        type=cli.positive_int,
        default=None,
        help="resume from this checkpoint step instead of the latest (later steps are "
        "moved to WORKDIR/superseded)",
    )
    parser.add_argument(
        "--allow_config_change",
        type=parse_bool,
        default=False,
        help="resume although the settings differ from WORKDIR/config.json in fields "
        "that change training (the changes are logged in metrics.jsonl)",
    )
    parser.add_argument(
        "--report_test",
        type=parse_bool,
        default=False,
        help="after training, also print every exit's test perplexity (test_exit_ppl.json)",
    )
    parser.add_argument(
        "--eval_every",
        type=cli.nonnegative_int,
        default=0,
        help="validate every N steps (every exit's perplexity, in metrics.jsonl and "
        "TensorBoard); 0: only after training",
    )
    parser.add_argument(
        "--eval_tokens",
        type=cli.nonnegative_int,
        default=0,
        help="validate on the first N valid tokens during training (0: all of them)",
    )
    parser.add_argument(
        "--final_eval",
        type=parse_bool,
        default=True,
        help="after training, every exit's valid (and with --report_test, test) perplexity",
    )
    parser.add_argument(
        "--profile",
        default=None,
        help="write a jax.profiler trace of a few training steps (after the compiling "
        "one) into this folder; open its perfetto_trace.json.gz in ui.perfetto.dev",
    )
    add_config_flags(parser)
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace, vocab_size: int) -> TrainConfig:
    config = train_preset(args.preset, vocab_size)
    names = {f.name for cls in (TrainConfig, ModelConfig) for f in dataclasses.fields(cls)}
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return config.replace(**overrides)


def check_flags(args: argparse.Namespace) -> None:
    """Raises ValueError (one line for the user) on flags the configs refuse or a
    --stop_at_step outside the run, before any data is loaded."""
    config = build_config(args, PLACEHOLDER_VOCAB_SIZE)
    if args.stop_at_step is not None and not 1 <= args.stop_at_step <= config.steps:
        raise ValueError(
            f"stop_at_step must be a step in [1, steps={config.steps}], got {args.stop_at_step}"
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_flags(args)
    except ValueError as error:  # a field out of range: the configs' own checks
        return cli.report_error(error)
    ee_jax.enable_compilation_cache()
    from ee_jax import passes, train  # after the cache is set

    try:
        corpus = load_wikitext2(
            args.data_dir, cache_dir=args.cache_dir, verify_checksums=args.verify_checksums
        )
    except cli.USER_ERRORS as error:
        return cli.report_error(error)
    try:
        config = build_config(args, len(corpus.vocab))
    except ValueError as error:  # a field out of range: the configs' own checks
        return cli.report_error(error)
    eos = corpus.vocab.eos_id
    stream = make_lm_stream(corpus.train, config.batch_size, config.model.n_seq, eos_id=eos)
    valid = corpus.valid[: args.eval_tokens or None]
    try:
        valid = make_lm_stream(valid, config.eval_batch_size, config.model.n_seq, eos_id=eos)
        state = train.train(
            config,
            stream,
            args.workdir,
            vocab=corpus.vocab,
            stop_at_step=args.stop_at_step,
            resume_step=args.resume_step,
            allow_config_change=args.allow_config_change,
            valid=valid,
            eval_every=args.eval_every,
            profile=args.profile,
        )
    except train.TrainingInterrupted as stopped:
        command = cli.resume_command(sys.argv[0], sys.argv[1:] if argv is None else argv)
        print(f"{stopped}\nresume with: {command}", file=sys.stderr)
        return 128 + stopped.signal_number
    except (*cli.USER_ERRORS, FloatingPointError) as error:
        return cli.report_error(error)
    if not args.final_eval:
        return 0
    model = train.EarlyExitLM(config.model)
    recurrent = config.model.causal and config.model.mixer != "attention"
    protocols = {"": False, "_continuous": True} if recurrent else {"": False}
    for name in ("valid", "test") if args.report_test else ("valid",):
        tokens = getattr(corpus, name)
        windows = make_lm_stream(tokens, config.eval_batch_size, config.model.n_seq, eos_id=eos)
        for suffix, carry in protocols.items():  # the window protocol, then continuous
            result = passes.exit_perplexities(model, state.params, windows, carry=carry)
            result["step"] = int(state.step)
            cli.write_json(pathlib.Path(args.workdir) / f"{name}_exit_ppl{suffix}.json", result)
            print(
                f"{name} perplexity per exit ({result['protocol']} protocol):",
                ", ".join(f"exit {i + 1}: {p:.1f}" for i, p in enumerate(result["exit_ppl"])),
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
