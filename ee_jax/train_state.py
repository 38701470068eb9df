"""The training state and one training step (pure functions, jitted by `train`).

`TrainState` is what a checkpoint holds: the step, the parameters, the optax
state and, for truncated BPTT (`TrainConfig.carry_state`), every layer's mixer
state after the last window trained on. A step's batch and keys are pure
functions of its index (`data.train_batch`, `step_keys`), so a resumed run
continues exactly where it stopped.
"""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ee_jax.config import ModelConfig, TrainConfig
from ee_jax.data.batching import Batch, LMStream
from ee_jax.losses import lm_loss_from, tail_capacities
from ee_jax.model import EarlyExitLM
from ee_jax.state import MIXER_STATES, RecurrentState


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32: optimizer steps taken
    params: dict  # {"params": ...} of EarlyExitLM
    opt_state: optax.OptState
    # carry_state: every layer's mixer state after the last window trained on (the
    # next window of the same rows starts from it), `RecurrentState.layers` as a
    # plain tuple (the checkpoint's layout, `carried_layers`); None for window-reset
    # training or a mixer without state.
    carry: tuple | None = None


def carried_layers(config: ModelConfig, carry: tuple | None):
    """`TrainState.carry` as `RecurrentState.layers` (the mixer's state type)."""
    return None if carry is None else MIXER_STATES[config.mixer](*carry)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW or SGD at the schedule's learning rate.

    "warmup_cosine": linear warm-up, then cosine decay to 0.
    "plateau": the learning rate is a hyper-parameter in the optimizer state
    (`optax.inject_hyperparams`), lowered by `plateau_update` after each epoch that
    did not improve the validation loss (the rule of the PyTorch word_language_model
    example); the best validation loss so far is kept beside it, so a resumed run
    decides as the uninterrupted one would.
    """

    def optimizer(learning_rate, best_valid_loss=None):  # best_valid_loss: plateau's record
        if config.optimizer == "sgd":
            return optax.sgd(learning_rate)
        return optax.adamw(learning_rate, weight_decay=config.weight_decay)

    if config.lr_schedule == "plateau":
        rule = optax.inject_hyperparams(optimizer)
        inner = rule(learning_rate=config.learning_rate, best_valid_loss=jnp.inf)
    else:
        inner = optimizer(
            optax.warmup_cosine_decay_schedule(
                0.0, config.learning_rate, config.warmup_steps, config.steps
            )
        )
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), inner)


def plateau_update(config: TrainConfig, opt_state, valid_loss: float):
    """The "plateau" rule after an epoch's validation: a loss below the best so far
    becomes the best; otherwise the learning rate is multiplied by
    config.plateau_factor. Returns the new optimizer state (`make_optimizer`)."""
    clip_state, rule_state = opt_state
    hyper = dict(rule_state.hyperparams)
    if valid_loss < float(hyper["best_valid_loss"]):
        hyper["best_valid_loss"] = jnp.asarray(valid_loss, hyper["best_valid_loss"].dtype)
    else:
        hyper["learning_rate"] = hyper["learning_rate"] * config.plateau_factor
    return (clip_state, rule_state._replace(hyperparams=hyper))


def learning_rate(config: TrainConfig, opt_state) -> float | None:
    """The learning rate in the optimizer state ("plateau"), else None."""
    if config.lr_schedule != "plateau":
        return None
    return float(opt_state[1].hyperparams["learning_rate"])


def run_keys(seed: int) -> dict[str, jax.Array]:
    """The run's named keys, split once from `jax.random.key(seed)`: "init"
    (parameters), "dropout" and "sample" (the positions scoring the early exits).
    Seeds s and s + 1 share no key (once, seed s's dropout key was key(s + 1),
    the init key of seed s + 1)."""
    names = ("init", "dropout", "sample")
    return dict(zip(names, jax.random.split(jax.random.key(seed), len(names)), strict=True))


def step_keys(keys: dict[str, jax.Array], step) -> dict[str, jax.Array]:
    """The keys of training step `step` (`train_step`'s rngs): each named key
    but "init" folded with the step."""
    return {name: jax.random.fold_in(keys[name], step) for name in ("dropout", "sample")}


def parameter_count(config: ModelConfig) -> int:
    """Number of parameters of `EarlyExitLM(config)` (shapes only, nothing computed)."""
    tokens = jax.ShapeDtypeStruct((1, config.n_seq), jnp.int32)
    shapes = jax.eval_shape(EarlyExitLM(config).init, jax.random.key(0), tokens)
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))


def init_state(config: TrainConfig) -> TrainState:
    model = EarlyExitLM(config.model)
    tokens = jnp.zeros((1, config.model.n_seq), jnp.int32)
    params = model.init(run_keys(config.seed)["init"], tokens)
    carry = None
    if config.carry_state:
        layers = RecurrentState.make(config.model, config.batch_size).layers
        carry = None if layers is None else tuple(layers)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=make_optimizer(config).init(params),
        carry=carry,
    )


def make_train_step(
    config: TrainConfig,
    capacities: tuple[int, ...] | None = None,
    windows_per_epoch: int | None = None,
):
    """Returns train_step(state, batch, rngs) -> (state, metrics), not yet jitted.

    rngs: {"dropout": key, "sample": key} of the step (`step_keys`).
    capacities: static gather size per adaptive tail cluster (`stream_capacities`).
    windows_per_epoch: with config.carry_state, the windows of the training stream
      (`len(stream)`): step s reads window s % windows_per_epoch (`train_batch`), so
      the carried state restarts from zeros where s % windows_per_epoch == 0 (the
      start of the text) and otherwise continues the previous step's window
      (truncated backpropagation through time, as LSTM language models train).
    """
    if config.carry_state and not windows_per_epoch:
        raise ValueError("carry_state=True needs windows_per_epoch (len of the train stream)")
    optimizer = make_optimizer(config)

    def loss_fn(params, start: RecurrentState, batch: Batch, rngs, step):
        return lm_loss_from(
            params,
            start,
            batch.inputs,
            batch.targets,
            batch.mask,
            config,
            rngs=rngs,
            tail_capacities=capacities,
            step=step,
        )

    def train_step(state: TrainState, batch: Batch, rngs: dict[str, jax.Array]):
        start = RecurrentState.make(config.model, batch.inputs.shape[0])
        if config.carry_state:
            restart = state.step % windows_per_epoch == 0
            carried = jax.tree.map(
                lambda fresh, last: jnp.where(restart, fresh, last),
                start.layers,
                carried_layers(config.model, state.carry),
            )
            start = start.replace(layers=carried)
        (loss, (metrics, after)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, start, batch, rngs, state.step
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
        }
        carry = None
        if config.carry_state and after.layers is not None:
            carry = tuple(after.layers)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, carry=carry)
        return new_state, metrics

    return train_step


def stream_capacities(config: TrainConfig, stream: LMStream) -> tuple[int, ...]:
    """The most targets any window of `stream` has in each adaptive tail cluster."""
    rows, n_seq = stream.targets.shape[0], stream.n_seq
    per_window = lambda a: a.reshape(rows, len(stream), n_seq).swapaxes(0, 1)  # noqa: E731
    return tail_capacities(config.model, per_window(stream.targets), per_window(stream.mask))


def data_parallel(mesh: Mesh):
    """(replicated sharding, batch sharding) for a 1-D "data" mesh."""
    return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))


def global_batch(batch: Batch, sharding: NamedSharding) -> Batch:
    """The global batch as arrays sharded on the data axis.

    Every process computes the same global batch (a function of the step) and
    contributes its own contiguous block of rows, so the same code serves one
    process and several hosts (after `jax.distributed.initialize()`).
    """
    rows = batch.inputs.shape[0] // jax.process_count()
    start = jax.process_index() * rows
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            sharding, x[start : start + rows], x.shape
        ),
        batch,
    )


def make_mesh() -> Mesh:
    """A 1-D mesh over every device (on several hosts: after jax.distributed.initialize)."""
    return Mesh(np.array(jax.devices()), ("data",))


# Fields that change only the bookkeeping, never the weights trained: a resumed run
# may change them without allow_config_change (the change is still logged).
