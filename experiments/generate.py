"""Generate WikiText-2-style text from a checkpoint, showing each token's exit depth.

    python experiments/generate.py --workdir runs/cpu --prompt "the game was" \
        --steps 40 --temperature 0.8 --top_k 40
"""

import argparse
import sys

import jax
import jax.numpy as jnp

import ee_jax
from ee_jax import cli
from ee_jax.config import ExitMeasure
from ee_jax.early_exit import check_exit_options


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.make_parser(__doc__)
    cli.add_data_flags(parser)
    parser.add_argument("--prompt", default="the", help="space-separated words of the prompt")
    parser.add_argument("--steps", type=int, default=30, help="tokens to generate")
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="exit threshold in [0, 1] (default: the model's)",
    )
    parser.add_argument(
        "--measure",
        default="softmax_max",
        choices=[m.value for m in ExitMeasure],
        help="confidence measure",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=None, help="sample from the top k tokens")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    return parser.parse_args(argv)


def check_generate_flags(args: argparse.Namespace, config, prompt_length: int) -> None:
    """Raises ValueError (one line for the user) on flags decode.generate would refuse;
    a ValueError from generate itself is then a bug and keeps its traceback."""
    if args.threshold is not None:
        check_exit_options(args.threshold, args.measure, "freeze")
    if not 1 <= prompt_length + args.steps - 1 <= config.model.n_seq or args.steps < 0:
        raise ValueError(
            f"prompt length {prompt_length} + --steps {args.steps} - 1 must be in "
            f"[1, n_seq={config.model.n_seq}]"
        )
    if args.temperature < 0 or not 1 <= (args.top_k or 1) <= config.model.vocab_size:
        raise ValueError(
            f"--temperature must be >= 0 and --top_k in [1, {config.model.vocab_size}], "
            f"got {args.temperature}, {args.top_k}"
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    ee_jax.enable_compilation_cache()
    from ee_jax import decode, train

    try:
        config, params, _, corpus = cli.load_run(args)
    except cli.USER_ERRORS as error:
        return cli.report_error(error)
    vocab = corpus.vocab
    try:  # the flags' own checks: unknown prompt words, threshold, lengths
        prompt = jnp.asarray(vocab.encode(args.prompt.split()))[None]
        check_generate_flags(args, config, prompt.shape[1])
    except ValueError as error:
        return cli.report_error(error)
    tokens, depths = decode.generate(
        train.EarlyExitLM(config.model),
        params,
        prompt,
        args.steps,
        jax.random.key(args.seed),
        threshold=args.threshold,
        measure=args.measure,
        temperature=args.temperature,
        top_k=args.top_k,
    )
    words = vocab.decode(list(tokens[0]))
    # depths[i] is the exit depth of the prediction made after reading token i.
    shown = [words[0]] + [
        f"{word}[{int(depth)}]" for word, depth in zip(words[1:], depths[0], strict=True)
    ]
    print(" ".join(shown))
    print(f"(word[d]: predicted at exit depth d of {config.model.n_layers})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
