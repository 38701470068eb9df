r"""Generate text from a trained run, showing each token's exit depth.

    python experiments/generate.py --workdir runs/cpu --prompt "The game was" --steps 40

By default it samples (temperature 1, the 40 most likely tokens) and exits at
the threshold `experiments/eval_early_exit.py` calibrated on valid for the
learned exit (WORKDIR/eval/results.json), when the run has one; else at the
model's threshold with the softmax_max measure. --temperature 0 is greedy
(greedy text falls into loops); --sample_top_k none samples from every token.

Needs only the run folder (`ee_jax.load_run`). The prompt is plain text, split
with the corpus's rules (`data.encode_text`: "game's" -> "game 's"); words
outside the vocabulary become <unk>, with a hint when their case is why. The
text is printed as it is produced (--chunk tokens at a time). A model with
position "none" generates any number of --steps; one with a learned position
table at most n_seq positions in all.

With --draft_exit E (and --draft_tokens K) it decodes self-speculatively: exit E
drafts K tokens, the blocks after it verify them in one pass, and every token is
the full model's (the same text greedy, the same distribution sampled); a
token's depth is then E for an accepted draft and L for the full model's own.

    python experiments/generate.py --workdir runs/cpu --steps 40 --draft_exit 2 --draft_tokens 2
"""

import argparse
import contextlib
import sys

import jax
import numpy as np

import ee_jax
from ee_jax import cli
from ee_jax.config import ExitMeasure

CALIBRATED_MEASURE = "learned"  # the default measure, where the run has calibrated it


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.make_parser(__doc__)
    parser.add_argument("--workdir", required=True, help="training run folder")
    parser.add_argument("--prompt", default="The", help="the prompt, plain text")
    parser.add_argument("--steps", type=cli.nonnegative_int, default=30, help="tokens to generate")
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="exit threshold in [0, 1] (default: the calibrated one, else the model's)",
    )
    parser.add_argument(
        "--measure",
        default=None,
        choices=[m.value for m in ExitMeasure],
        help=f"confidence measure (default: {CALIBRATED_MEASURE} when the run has its "
        "calibrated threshold, else softmax_max)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="sampling temperature, finite, >= 0; 0 = greedy",
    )
    parser.add_argument(
        "--sample_top_k",
        type=lambda text: None if text.lower() == "none" else int(text),
        default=40,
        help="sample only from the k most likely tokens, k in [1, V], or none (all)",
    )
    parser.add_argument(
        "--sample_top_p",
        type=float,
        default=None,
        help="sample only from the nucleus: the most likely tokens whose probability "
        "reaches p, p in (0, 1] (default: all)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument(
        "--profile",
        default=None,
        help="write a jax.profiler trace of the generation (each chunk of decoding steps "
        "annotated) into this folder; open its perfetto_trace.json.gz in ui.perfetto.dev",
    )
    parser.add_argument(
        "--chunk",
        type=cli.positive_int,
        default=32,
        help="tokens per jitted call (and per printed line)",
    )
    parser.add_argument(
        "--draft_exit",
        type=cli.positive_int,
        default=None,
        help="decode self-speculatively, drafting with this exit, in [1, L - 1] "
        "(default: per-token early exit)",
    )
    parser.add_argument(
        "--draft_tokens",
        type=cli.positive_int,
        default=2,
        help="drafts per verify pass, with --draft_exit",
    )
    parser.add_argument(
        "--draft_threshold",
        type=cli.probability,
        default=0.0,
        help="with --draft_exit: a row stops drafting after a draft whose confidence is "
        "below this, in [0, 1] (default 0: always --draft_tokens drafts)",
    )
    parser.add_argument(
        "--stop_at_eos",
        type=lambda text: {"true": True, "false": False}[text.lower()],
        default=False,
        help="true: stop once the model writes <eos> (the end of a line of the corpus): "
        "the text and the exit-depth counts end with it",
    )
    return parser.parse_args(argv)


def encode_prompt(vocab, text: str, model_config) -> np.ndarray:
    """The --prompt text as token ids [1, P] (`data.encode_text`), a note on stderr per
    unknown word; ValueError (one line for the user) on an empty prompt or ids the
    model cannot read (`check_tokens`)."""
    from ee_jax.data import encode_text
    from ee_jax.model import check_tokens

    encoded = encode_text(text, vocab)
    if not encoded.words:
        raise ValueError("--prompt must have at least one word")
    for word, hint in encoded.unknown.items():
        print(
            f"note: {word!r} is not in the vocabulary: read as <unk>"
            + (f"; {hint}" if hint else ""),
            file=sys.stderr,
        )
    prompt = encoded.ids[None]  # [1, P] int32
    check_tokens(prompt, model_config)
    return prompt


def exit_options(args: argparse.Namespace) -> tuple[str, float | None, str]:
    """(measure, threshold or None for the model's, a line saying where they come
    from): the flags where given, else the run's calibrated learned exit, else
    softmax_max at the model's threshold."""
    measure, threshold = args.measure, args.threshold
    if measure is None:
        calibrated = cli.calibrated_threshold(args.workdir, CALIBRATED_MEASURE)
        measure = CALIBRATED_MEASURE if calibrated is not None else "softmax_max"
    if threshold is not None:
        return measure, threshold, f"exit: {measure} >= {threshold:g} (--threshold)"
    threshold = cli.calibrated_threshold(args.workdir, measure)
    if threshold is None:
        return measure, None, f"exit: {measure} at the model's threshold"
    return measure, threshold, f"exit: {measure} >= {threshold:g}, calibrated on valid"


def check_generate_flags(args: argparse.Namespace, config, prompt_length: int) -> None:
    """Raises ValueError (one line for the user) on flags or a model decode.generate
    would refuse; a ValueError from generate itself is then a bug and keeps its
    traceback."""
    from ee_jax import decode, sampling, speculative
    from ee_jax.early_exit import check_exit_options
    from ee_jax.model import check_positions

    decode.check_decodable(config.model)
    if args.draft_exit is not None:
        try:
            speculative.check_draft(
                config.model, args.draft_exit, args.draft_tokens, args.draft_threshold
            )
        except ValueError as error:  # name the flags
            raise ValueError(f"--draft_exit / --draft_tokens: {error}") from None
        if args.threshold is not None or args.measure is not None:
            raise ValueError(
                "--draft_exit gives the full model's tokens: leave out --threshold and --measure"
            )
    if args.threshold is not None:
        check_exit_options(args.threshold, args.measure or CALIBRATED_MEASURE, "freeze")
    if args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    if args.chunk < 1:
        raise ValueError(f"--chunk must be >= 1, got {args.chunk}")
    try:  # the positions generate reads: the prompt's and all but the last new token's
        check_positions(config.model, 0, prompt_length + args.steps - 1)
    except ValueError as error:  # name the flag
        raise ValueError(
            f"prompt length {prompt_length} + --steps {args.steps} - 1: {error}"
        ) from None
    try:
        sampling.check_sampling(
            args.temperature, args.sample_top_k, config.model.vocab_size, args.sample_top_p
        )
    except ValueError as error:  # name the flags
        raise ValueError(f"--temperature / --sample_top_k / --sample_top_p: {error}") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    ee_jax.enable_compilation_cache()
    from ee_jax import decode

    try:
        run = ee_jax.load_run(args.workdir)
        model, params, vocab, config = run.model, run.variables, run.vocab, run.config
    except cli.USER_ERRORS as error:
        return cli.report_error(error)
    try:  # the flags' own checks: prompt words and ids, model, threshold, lengths, sampling
        prompt = encode_prompt(vocab, args.prompt, config.model)
        check_generate_flags(args, config, prompt.shape[1])
    except ValueError as error:
        return cli.report_error(error)
    if args.draft_exit is None:
        args.measure, args.threshold, source = exit_options(args)
        depth = f"predicted at exit depth d of {config.model.n_layers}"
    else:
        source = f"speculative: exit {args.draft_exit} drafts {args.draft_tokens} at a time"
        depth = f"{args.draft_exit}: an accepted draft, {config.model.n_layers}: the full model's"
    print(f"({source}; word[d]: {depth})")
    print(" ".join(vocab.decode(list(prompt[0]))), flush=True)
    tracing = contextlib.nullcontext()
    if args.profile:  # the first chunk includes compiling the decoding step
        tracing = jax.profiler.trace(args.profile, create_perfetto_trace=True)
    with tracing:
        tokens, depths = generate_text(decode, model, params, vocab, prompt, args)
    shown = vocab.decode(list(tokens[0, prompt.shape[1] :]))
    counts = np.bincount(np.asarray(depths[0]), minlength=config.model.n_layers + 1)[1:]
    print(f"{len(shown)} tokens; exit depths 1..{config.model.n_layers}: {counts.tolist()}")
    return 0


def generate_text(decode, model, params, vocab, prompt, args):
    """`decode.generate` as the flags ask, printing each chunk as it comes."""
    return decode.generate(
        model,
        params,
        prompt,
        args.steps,
        jax.random.key(args.seed),
        threshold=args.threshold,
        measure=args.measure,
        temperature=args.temperature,
        sample_top_k=args.sample_top_k,
        sample_top_p=args.sample_top_p,
        stop_token=vocab.eos_id if args.stop_at_eos else None,
        chunk=args.chunk,
        draft_exit=args.draft_exit,
        draft_tokens=args.draft_tokens,
        draft_threshold=args.draft_threshold,
        on_chunk=lambda new, depth: print(
            " ".join(
                f"{w}[{d}]" for w, d in zip(vocab.decode(list(new[0])), depth[0], strict=True)
            ),
            flush=True,
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
