"""Model configuration: one frozen, validated dataclass and its presets."""

import dataclasses
import enum
import inspect
import numbers
import re
from typing import Literal, get_args

BKMethod = Literal["auto", "associative", "sequential"]
Unembedding = Literal["per_exit", "shared", "tied"]
ExitWeighting = Literal["uniform", "linear", "final"]
ClassifierTarget = Literal["agreement", "loss_gap"]
Output = Literal["full", "adaptive"]
Mixer = Literal["bk", "lstm", "attention", "none"]
Optimizer = Literal["adamw", "sgd"]
Schedule = Literal["warmup_cosine", "plateau"]
Position = Literal["learned", "none"]


def check_count(name: str, value, low: int = 1) -> None:
    """Raises ValueError unless `value` is an integer >= low (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_choice(name: str, value, choices) -> None:
    """Raises ValueError unless `value` is one of the Literal type `choices`."""
    if value not in get_args(choices):
        raise ValueError(f"{name} must be one of {get_args(choices)}, got {value!r}")


class ExitMeasure(enum.StrEnum):
    """How confident a token is after a block (see `ee_jax.early_exit`)."""

    SOFTMAX_MAX = "softmax_max"  # max softmax probability of the exit's logits
    SOFTMAX_MARGIN = "softmax_margin"  # top-1 minus top-2 probability
    STATE_SATURATION = "state_saturation"  # cosine(hidden before, hidden after the block)
    LEARNED = "learned"  # sigmoid of a per-exit classifier (TrainConfig.classifier_target)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Hyper-parameters of `EarlyExitLM`. Hashable: usable as a static jit argument."""

    vocab_size: int  # V, tokens are ids in [0, V)
    d_model: int = 64  # D, width of the residual stream
    n_layers: int = 4  # L, BK blocks, each followed by an exit head
    n_seq: int = 128  # N, training window (and, for position "learned", longest sequence)
    position: Position = "learned"  # "learned" table of n_seq positions, or "none" (any length)
    num_experts: int = 4  # E, experts in each MoE FFN (0: blocks without an FFN)
    top_k: int = 1  # experts each token is routed to
    dropout: float = 0.1  # dropout rate on embeddings and residual branches (training)
    layer_dropout: float = 0.0  # rate a row skips the last block in training; depth-linear
    causal: bool = True  # causal BK core (next-token model); False sees later tokens
    confidence_threshold: float = 0.9  # default halting threshold in [0, 1]
    bk_heads: int = 1  # H, potentials per token = independent tridiagonal systems
    z_real: float = 0.0  # Re z of the resolvent (T - zI)^-1, shared by all heads
    z_imag: tuple[float, float] = (1.0, 1.0)  # Im z of the first and last head, log-spaced
    h0_diagonal: float = -2.0  # diagonal of H0 (discrete Laplacian: -2)
    h0_offdiagonal: float = 1.0  # off-diagonals of H0 (discrete Laplacian: 1)
    bk_method: BKMethod = "auto"  # BK core scan; auto: sequential on CPU, else associative
    unembedding: Unembedding = "shared"  # per-exit matrices, one shared, or tied to the input
    mixer: Mixer = "bk"  # sequence mixing: "bk", "lstm", causal "attention", or "none" (ablation)
    bk_value_dim: int = 0  # P: per-head values solved through the causal resolvent (0: none)
    attention_heads: int = 4  # heads of the "attention" mixer (d_model must divide by it)
    output: Output = "full"  # exit output layer: "full" or "adaptive" softmax (ee_jax.adaptive)
    adaptive_cutoffs: tuple[int, ...] = (2000, 10000)  # first id of each tail cluster (adaptive)
    adaptive_div: float = 4.0  # tail cluster k projects D to D // div**k dimensions (adaptive)

    def __post_init__(self):
        positive = (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_seq",
            "bk_heads",
            "attention_heads",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        check_count("num_experts", self.num_experts, 0)
        check_count("bk_value_dim", self.bk_value_dim, 0)
        if self.bk_value_dim and not self.causal:
            raise ValueError("bk_value_dim > 0 needs causal=True (the causal solve)")
        if self.mixer == "attention" and self.d_model % self.attention_heads:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by attention_heads="
                f"{self.attention_heads}"
            )
        if self.num_experts and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}"
            )
        for name in ("dropout", "layer_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError(
                f"confidence_threshold must be in [0, 1], got {self.confidence_threshold}"
            )
        if len(self.z_imag) != 2 or min(self.z_imag) <= 0:
            raise ValueError(
                f"z_imag must be two positive numbers (first head, last head): Im z > 0 keeps "
                f"every pivot of the BK core non-zero; got {self.z_imag!r}"
            )
        for name, allowed in (
            ("bk_method", BKMethod),
            ("unembedding", Unembedding),
            ("output", Output),
            ("mixer", Mixer),
            ("position", Position),
        ):
            check_choice(name, getattr(self, name), allowed)
        if self.output == "adaptive":
            self._check_adaptive()

    def _check_adaptive(self):
        cutoffs = self.adaptive_cutoffs
        if (
            not cutoffs
            or any(not isinstance(c, int) or isinstance(c, bool) for c in cutoffs)
            or any(b <= a for a, b in zip(cutoffs, cutoffs[1:], strict=False))
            or not 0 < cutoffs[0]
            or not cutoffs[-1] < self.vocab_size
        ):
            raise ValueError(
                f"adaptive_cutoffs must be strictly increasing integers inside (0, "
                f"vocab_size={self.vocab_size}), got {cutoffs!r}"
            )
        if not self.adaptive_div > 0:
            raise ValueError(f"adaptive_div must be > 0, got {self.adaptive_div}")
        smallest = self.tail_dims[-1]
        if smallest < 1:
            raise ValueError(
                f"adaptive_div={self.adaptive_div} leaves tail cluster {len(cutoffs)} with "
                f"d_model // div**{len(cutoffs)} = {smallest} dimensions; it must be >= 1"
            )

    @property
    def tail_dims(self) -> tuple[int, ...]:
        """Projection width d_k = D // div**k of each adaptive tail cluster k = 1..K."""
        if self.output != "adaptive":
            return ()
        return tuple(
            int(self.d_model // self.adaptive_div**k)
            for k in range(1, len(self.adaptive_cutoffs) + 1)
        )

    @property
    def cluster_bounds(self) -> tuple[int, ...]:
        """(c_1, ..., c_K, V): the head holds ids [0, c_1), tail k ids [c_k, c_{k+1}).
        A full output is one cluster, (V,)."""
        if self.output != "adaptive":
            return (self.vocab_size,)
        return (*self.adaptive_cutoffs, self.vocab_size)

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Training hyper-parameters; `model` is the ModelConfig being trained."""

    model: ModelConfig  # the model (vocab_size is set from the data's vocabulary)
    batch_size: int = 16  # B, sequences per step (divisible by the device count)
    steps: int = 1000  # optimizer steps in total (the schedule's length)
    optimizer: Optimizer = "adamw"  # AdamW, or plain SGD (the LSTM baselines' optimiser)
    learning_rate: float = 3e-3  # peak (warmup_cosine) or starting (plateau) learning rate
    lr_schedule: Schedule = "warmup_cosine"  # or "plateau": times plateau_factor per bad epoch
    plateau_factor: float = 0.25  # "plateau": factor after an epoch that did not improve valid
    warmup_steps: int = 100  # linear warm-up steps, then cosine decay to 0 (warmup_cosine)
    weight_decay: float = 0.01  # AdamW decoupled weight decay (sgd: must be 0)
    grad_clip: float = 1.0  # clip gradients to this global norm
    exit_weighting: ExitWeighting = "uniform"  # loss weight of each exit: uniform/linear/final
    balance_weight: float = 0.01  # weight of the MoE load-balancing loss
    exit_ramp_steps: int = 0  # the early exits' loss weight rises from 0 over these steps
    exit_token_fraction: float = 1.0  # fraction of positions scoring the exits before the last
    classifier_token_fraction: float = 1.0  # of positions training exit classifiers (<= above)
    classifier_target: ClassifierTarget = "agreement"  # what the learned exit measure predicts
    distillation_weight: float = 0.0  # weight of the early exits' head KL to the last (0: off)
    carry_state: bool = False  # truncated BPTT: each window starts from the last one's state
    seed: int = 0  # initialisation, dropout and nothing else
    log_every: int = 50  # steps between metric rows (metrics leave the device only then)
    checkpoint_every: int = 500  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3  # checkpoints kept on disk
    eval_batch_size: int = 16  # rows of the evaluation streams

    def __post_init__(self):
        for name in (
            "batch_size",
            "steps",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
            "eval_batch_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        check_count("exit_ramp_steps", self.exit_ramp_steps, 0)
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(
                f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}"
            )
        for name in ("learning_rate", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("exit_token_fraction", "classifier_token_fraction"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        for name in ("weight_decay", "balance_weight", "distillation_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not isinstance(self.carry_state, bool):
            raise ValueError(f"carry_state must be True or False, got {self.carry_state!r}")
        if self.carry_state and (self.model.mixer == "attention" or not self.model.causal):
            raise ValueError(
                'carry_state=True needs a recurrent causal model (mixer "bk", "lstm" or "none", '
                f"causal=True), got mixer={self.model.mixer!r}, causal={self.model.causal}"
            )
        if self.optimizer == "sgd" and self.weight_decay:
            raise ValueError(
                f"optimizer sgd has no weight decay here: set weight_decay=0, "
                f"got {self.weight_decay}"
            )
        if not 0.0 < self.plateau_factor < 1.0:
            raise ValueError(f"plateau_factor must be in (0, 1), got {self.plateau_factor}")
        check_choice("optimizer", self.optimizer, Optimizer)
        check_choice("lr_schedule", self.lr_schedule, Schedule)
        check_choice("exit_weighting", self.exit_weighting, ExitWeighting)
        check_choice("classifier_target", self.classifier_target, ClassifierTarget)

    def replace(self, **changes) -> "TrainConfig":
        """A copy with some fields changed; ModelConfig fields go to `model`."""
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        model_changes = {k: v for k, v in changes.items() if k in model_fields}
        changes = {k: v for k, v in changes.items() if k not in model_fields}
        if model_changes:
            changes["model"] = self.model.replace(**model_changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        values = upgrade_dict(values)
        model = dict(values["model"])
        model["z_imag"] = tuple(model["z_imag"])
        model["adaptive_cutoffs"] = tuple(model["adaptive_cutoffs"])
        return cls(**{**values, "model": ModelConfig(**model)})


def upgrade_dict(values: dict) -> dict:
    """A `TrainConfig.to_dict()` written by an older version, in today's fields.

    `use_bk: false` became `mixer: "none"`; fields added since (of the model and of
    training) take their defaults, which give the older behaviour."""
    model = dict(values.get("model", {}))
    if "use_bk" in model:
        model["mixer"] = "bk" if model.pop("use_bk") else "none"
    as_json = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    defaults = {
        f.name: as_json(f.default)
        for f in dataclasses.fields(ModelConfig)
        if f.name != "vocab_size"
    }
    training = {
        f.name: f.default
        for f in dataclasses.fields(TrainConfig)
        if f.default is not dataclasses.MISSING
    }
    return {**training, **values, "model": {**defaults, **model}}


def field_help(cls) -> dict[str, str]:
    """The one-line comment of every field of a config dataclass (for --help)."""
    pattern = re.compile(r"^\s+(\w+): [^=]+(?:= [^#]+)?#\s*(.+)$")
    return {
        m.group(1): m.group(2)
        for line in inspect.getsource(cls).splitlines()
        if (m := pattern.match(line))
    }


def tiny(vocab_size: int = 97) -> ModelConfig:
    """Seconds-scale model for tests and the quickstart notebook."""
    return ModelConfig(
        vocab_size=vocab_size,
        d_model=16,
        n_layers=3,
        n_seq=16,
        num_experts=4,
        bk_heads=2,
        dropout=0.0,
    )


def seed(vocab_size: int = 10000) -> ModelConfig:
    """The configuration of the public PyTorch original: its defaults (D = 64, L = 4,
    N = 128, 4 experts, top-1 routing) are ModelConfig's."""
    return ModelConfig(vocab_size=vocab_size)


def train_preset(name: str, vocab_size: int) -> TrainConfig:
    """Training presets (run with `python experiments/train_wikitext2.py --preset NAME`).

    tiny: tests and the offline notebooks; seconds on a CPU; says nothing about quality.
    small: a first look: the cpu preset's choices at D = 64, L = 4, 1,500 steps
          (about 1.5 epochs of WikiText-2 train); trains in minutes on 2 CPU cores.
    cpu:  the main job on a 2-core CPU: D = 128, L = 6, BK with value solves and
          no absolute positions, trained with the state carried across windows
          (truncated BPTT), adaptive-softmax exits weighted linearly in depth and
          distilled from the last exit (weight 0.5), 5,500 steps (about 5.4 epochs
          of WikiText-2 train), learned exits regressing the loss gap;
          docs/results/archive/preset-probes_d128-l6_2026-11-30/ and
          docs/results/recurrence/ have the runs that chose it.
    gpu:  Colab GPU/TPU: the cpu preset's choices at D = 256, L = 8, N = 256,
          B = 64: 1,300 steps, about 10 epochs; not yet run on an accelerator.
    lstm: the recurrent anchor, the PyTorch word_language_model example's tied
          2-layer LSTM-200 and its SGD recipe, 6 epochs, in this harness (`_lstm`).
    """
    if name not in TRAIN_PRESETS:
        raise ValueError(f"preset must be one of {sorted(TRAIN_PRESETS)}, got {name!r}")
    return TRAIN_PRESETS[name](vocab_size)


def _cpu(vocab_size: int) -> TrainConfig:
    """The cpu preset (`train_preset`); the small and gpu presets scale it."""
    # Chosen by measured short runs: docs/results/archive/preset-probes_d128-l6_2026-11-30.
    return TrainConfig(
        model=ModelConfig(
            vocab_size=vocab_size,
            d_model=128,
            n_layers=6,
            n_seq=128,
            position="none",  # order from the recurrence: any length (docs/results/recurrence)
            bk_heads=16,
            bk_value_dim=8,
            z_imag=(0.05, 1.0),
            dropout=0.1,
            bk_method="sequential",  # faster than the associative scan on CPU (docs/benchmarks.md)
            output="adaptive",
        ),
        batch_size=16,
        steps=5500,
        learning_rate=5e-3,
        warmup_steps=100,
        log_every=50,
        checkpoint_every=250,
        exit_weighting="linear",
        exit_token_fraction=0.25,
        classifier_token_fraction=0.25,
        classifier_target="loss_gap",
        distillation_weight=0.5,
        carry_state=True,  # truncated BPTT over contiguous rows, as the LSTM baselines
    )


def _small(vocab_size: int) -> TrainConfig:
    """The cpu preset's choices at a size that trains in minutes on 2 CPU cores."""
    cpu = _cpu(vocab_size)
    model = cpu.model.replace(d_model=64, n_layers=4, bk_heads=8, bk_value_dim=4)
    return cpu.replace(model=model, steps=1500)


def _gpu(vocab_size: int) -> TrainConfig:
    """The cpu preset's choices scaled for one accelerator (the BK scan's method
    chosen by the platform)."""
    cpu = _cpu(vocab_size)
    model = cpu.model.replace(
        d_model=256,
        n_layers=8,
        n_seq=256,
        bk_heads=32,
        z_imag=(0.02, 1.0),
        dropout=0.2,
        bk_method="auto",
    )
    return cpu.replace(
        model=model, batch_size=64, steps=1300, learning_rate=2e-3, eval_batch_size=64
    )


LSTM_EPOCH_STEPS = 2984  # windows of 20 x 35 tokens in one pass over WikiText-2 train


def _lstm(vocab_size: int) -> TrainConfig:
    """The LSTM anchor: the PyTorch word_language_model example (2-layer LSTM of 200
    units, tied embeddings, dropout 0.2, truncated BPTT 35, batch 20, SGD at lr 20
    divided by 4 after an epoch that does not improve valid, gradient clip 0.25),
    6 epochs. Differences the harness brings: each LSTM layer sits in a pre-norm
    residual block, a LayerNorm precedes the tied softmax, dropout falls on the
    embeddings and on each block's residual branch, and flax's LSTM initialisation."""
    return TrainConfig(
        model=ModelConfig(
            vocab_size=vocab_size,
            d_model=200,
            n_layers=2,
            n_seq=35,
            position="none",
            mixer="lstm",
            num_experts=0,
            dropout=0.2,
            unembedding="tied",
            output="full",
        ),
        batch_size=20,
        steps=6 * LSTM_EPOCH_STEPS,
        optimizer="sgd",
        learning_rate=20.0,
        lr_schedule="plateau",
        plateau_factor=0.25,
        warmup_steps=0,
        weight_decay=0.0,
        grad_clip=0.25,
        exit_weighting="final",
        balance_weight=0.0,
        carry_state=True,
        log_every=100,
        checkpoint_every=500,
        eval_batch_size=10,
    )


TRAIN_PRESETS = {
    "tiny": lambda vocab_size: TrainConfig(
        model=tiny(vocab_size),
        batch_size=4,
        steps=200,
        learning_rate=1e-2,
        warmup_steps=10,
        log_every=20,
        checkpoint_every=100,
        eval_batch_size=4,
    ),
    "small": _small,
    "cpu": _cpu,
    "gpu": _gpu,
    "lstm": _lstm,
}
