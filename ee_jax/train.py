"""Joint training of every exit with optax, orbax checkpoints and data parallelism.

The work directory holds `config.json`, `metrics.jsonl` (one JSON row per logged
step) and `checkpoints/`. A run resumes from its latest checkpoint: the batch of
step s is a pure function of s (`data.train_batch`) and so is the dropout key
(`fold_in(key, s)`), so an interrupted run continues exactly where it stopped.
"""

import json
import pathlib
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from ee_jax.checkpoint import Checkpointer
from ee_jax.config import TrainConfig
from ee_jax.data import Batch, LMStream, train_batch
from ee_jax.losses import exit_weights, lm_loss, tail_capacities
from ee_jax.model import EarlyExitLM


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32: optimizer steps taken
    params: dict  # {"params": ...} of EarlyExitLM
    opt_state: optax.OptState


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine decay, after global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps, config.steps
    )
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(schedule, weight_decay=config.weight_decay),
    )


def init_state(config: TrainConfig) -> TrainState:
    model = EarlyExitLM(config.model)
    tokens = jnp.zeros((1, config.model.n_seq), jnp.int32)
    params = model.init(jax.random.key(config.seed), tokens)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=make_optimizer(config).init(params)
    )


def make_train_step(config: TrainConfig, capacities: tuple[int, ...] | None = None):
    """Returns train_step(state, batch, rng) -> (state, metrics), not yet jitted.

    capacities: static gather size per adaptive tail cluster (`stream_capacities`).
    """
    model = EarlyExitLM(config.model)
    optimizer = make_optimizer(config)
    weights = exit_weights(config.model.n_layers, config.exit_weighting)

    def loss_fn(params, batch: Batch, rng):
        dropout_rng, sample_rng = jax.random.split(rng)
        return lm_loss(
            model,
            params,
            batch.inputs,
            batch.targets,
            batch.mask,
            weights=weights,
            balance_weight=config.balance_weight,
            dropout_rng=dropout_rng,
            exit_token_fraction=config.exit_token_fraction,
            sample_rng=sample_rng,
            tail_capacities=capacities,
        )

    def train_step(state: TrainState, batch: Batch, rng: jax.Array):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

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


def train(
    config: TrainConfig,
    stream: LMStream,
    workdir: str | pathlib.Path,
    *,
    stop_at_step: int | None = None,
    resume_step: int | None = None,
    progress: bool = True,
) -> TrainState:
    """Trains (or resumes training) until `config.steps` (or `stop_at_step`).

    Args:
      config: the training configuration.
      stream: training windows (`data.make_lm_stream` with config.batch_size).
      workdir: gets config.json, metrics.jsonl and checkpoints/.
      stop_at_step: stop (with a checkpoint) at this step without changing the
        schedule, e.g. to split a run over several sessions.
      resume_step: resume from this checkpoint instead of the latest one.

    Returns:
      The final train state.

    Raises:
      FloatingPointError: the loss became non-finite (says at which step).
      CheckpointError: the checkpoint to resume from is damaged.
    """
    workdir = pathlib.Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
    mesh = make_mesh()
    replicated, sharded = data_parallel(mesh)
    if config.batch_size % mesh.size:
        raise ValueError(
            f"batch_size {config.batch_size} is not divisible by the {mesh.size} devices"
        )
    # Resume order: a fresh state gives the structure; the checkpoint (latest or
    # resume_step) replaces it; its step selects the data window and dropout key.
    state = init_state(config)
    if checkpointer.latest_step() is not None or resume_step is not None:
        state = checkpointer.restore(state, resume_step)
    state = jax.device_put(state, replicated)
    start = int(state.step)
    metrics_file = _truncate_metrics(workdir / "metrics.jsonl", start)
    step_fn = jax.jit(
        make_train_step(config, stream_capacities(config, stream)),
        donate_argnums=0,
        out_shardings=(replicated, replicated),
    )
    base_rng = jax.random.key(config.seed + 1)
    end = min(config.steps, stop_at_step or config.steps)
    tokens_per_step = config.batch_size * config.model.n_seq
    bar = tqdm(
        range(start, end),
        initial=start,
        total=config.steps,
        disable=not progress,
        desc="train",
        unit="step",
    )
    timed_steps, timer, compile_s = 0, time.perf_counter(), None
    for step in bar:
        batch = global_batch(train_batch(stream, step), sharded)
        state, metrics = step_fn(state, batch, jax.random.fold_in(base_rng, step))
        if step == start:  # this process's first step includes compilation: timed alone
            jax.block_until_ready(state)
            compile_s = time.perf_counter() - timer
        else:
            timed_steps += 1
        if step == 0 or (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            metrics = jax.device_get(metrics)  # waits for the dispatched steps to finish
            seconds = time.perf_counter() - timer
            row = _log(
                metrics_file, step, metrics, timed_steps * tokens_per_step, seconds, compile_s
            )
            if row["tokens_per_s"]:
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            timed_steps, timer, compile_s = 0, time.perf_counter(), None
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == end:
            checkpointer.save(step + 1, state)
    checkpointer.wait()
    checkpointer.close()
    return state


def _truncate_metrics(path: pathlib.Path, start: int) -> pathlib.Path:
    """Drops rows of steps after `start` (logged by a killed run after its last
    checkpoint; a row's step counts the updates it reflects),
    so a resumed run's metrics file equals an uninterrupted run's."""
    if path.exists():
        rows = [
            line
            for line in path.read_text().splitlines()
            if line and json.loads(line)["step"] <= start
        ]
        path.write_text("".join(row + "\n" for row in rows))
    return path


def _log(path, step, metrics, tokens, seconds, compile_s=None) -> dict:
    """Appends one metrics row; raises FloatingPointError on a non-finite loss.

    tokens_per_s covers the steps since the last row, without a compile step;
    compile_s is the first step of this process (compilation included), if any.
    """
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"non-finite training loss {loss} at step {step + 1}")
    exit_nll = np.asarray(metrics["exit_nll"], np.float64)
    row = {
        "step": step + 1,
        "loss": loss,
        "exit_nll": exit_nll.tolist(),
        "exit_ppl": np.exp(exit_nll).tolist(),
        "balance_loss": float(metrics["balance_loss"]),
        "classifier_loss": float(metrics["classifier_loss"]),
        "grad_norm": float(metrics["grad_norm"]),
        "param_norm": float(metrics["param_norm"]),
        "tokens_per_s": tokens / seconds if tokens else None,
        "compile_s": compile_s,
    }
    with open(path, "a") as file:
        file.write(json.dumps(row) + "\n")
    return row


def config_from_workdir(workdir: str | pathlib.Path) -> TrainConfig:
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a training work directory?")
    return TrainConfig.from_dict(json.loads(path.read_text()))


def restore_params(workdir: str | pathlib.Path, step: int | None = None):
    """(TrainConfig, {"params": ...}, step) of a work directory's checkpoint."""
    config = config_from_workdir(workdir)
    checkpointer = Checkpointer(pathlib.Path(workdir) / "checkpoints")
    state = checkpointer.restore(init_state(config), step)
    checkpointer.close()
    return config, state.params, int(state.step)
