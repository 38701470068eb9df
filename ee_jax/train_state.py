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
from ee_jax.state import BKState, RecurrentState


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


def carried_layers(carry: tuple | None) -> BKState | None:
    """`TrainState.carry` as `RecurrentState.layers`."""
    return None if carry is None else BKState(*carry)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine decay, after global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps, config.steps
    )
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(schedule, weight_decay=config.weight_decay),
    )


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

    def loss_fn(params, start: RecurrentState, batch: Batch, rngs):
        return lm_loss_from(
            params,
            start,
            batch.inputs,
            batch.targets,
            batch.mask,
            config,
            rngs=rngs,
            tail_capacities=capacities,
        )

    def train_step(state: TrainState, batch: Batch, rngs: dict[str, jax.Array]):
        start = RecurrentState.make(config.model, batch.inputs.shape[0])
        if config.carry_state:
            restart = state.step % windows_per_epoch == 0
            carried = jax.tree.map(
                lambda fresh, last: jnp.where(restart, fresh, last),
                start.layers,
                carried_layers(state.carry),
            )
            start = start.replace(layers=carried)
        (loss, (metrics, after)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, start, batch, rngs
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
