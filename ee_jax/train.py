"""Joint training of every exit with optax, orbax checkpoints and data parallelism.

The work directory holds `config.json`, `vocab.txt` (the words of the ids),
`vocab.sha256` (its checksum), `metrics.jsonl` (one strict-JSON row per logged
step), `environment.jsonl` (versions, XLA flags and devices of each sitting) and
`checkpoints/`. A run resumes from its latest checkpoint: the batch of
step s is a pure function of s (`data.train_batch`) and so are its keys
(`step_keys`: the run's named keys folded with s), so an interrupted run
continues exactly where it stopped.
"""

import contextlib
import json
import pathlib
import signal
import threading
import time
from collections.abc import Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from ee_jax.checkpoint import Checkpointer, CheckpointError, config_changes, write_atomic
from ee_jax.config import TrainConfig, upgrade_dict
from ee_jax.data import LMStream, Vocabulary, train_batch
from ee_jax.metrics import MetricsWriter, record_environment
from ee_jax.model import EarlyExitLM
from ee_jax.passes import exit_perplexities
from ee_jax.run import VOCAB_CHECKSUM_FILE, VOCAB_FILE, check_vocab, save_vocab, vocab_words
from ee_jax.train_state import (
    TrainState,
    data_parallel,
    global_batch,
    init_state,
    learning_rate,
    make_mesh,
    make_train_step,
    plateau_update,
    run_keys,
    step_keys,
    stream_capacities,
)

PROFILE_STEPS = 3  # training steps a --profile trace covers
BOOKKEEPING_FIELDS = frozenset(
    {"log_every", "checkpoint_every", "keep_checkpoints", "eval_batch_size"}
)


class TrainSetupError(ValueError):
    """Training cannot run as asked (a bad stop step, a batch the devices cannot split)."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after a checkpoint was saved at `step`."""

    def __init__(self, signal_number: int, step: int, workdir: pathlib.Path):
        self.signal_number, self.step, self.workdir = signal_number, step, workdir
        super().__init__(
            f"{signal.Signals(signal_number).name} received: training stopped at step {step} "
            f"and saved it in {workdir / 'checkpoints' / str(step)}"
        )


def train(
    config: TrainConfig,
    stream: LMStream,
    workdir: str | pathlib.Path,
    *,
    vocab: Vocabulary | Sequence[str] | None = None,
    stop_at_step: int | None = None,
    resume_step: int | None = None,
    allow_config_change: bool = False,
    progress: bool = True,
    valid: LMStream | None = None,
    eval_every: int = 0,
    tensorboard: bool = True,
    profile: str | pathlib.Path | None = None,
) -> TrainState:
    """Trains (or resumes training) until `config.steps` (or `stop_at_step`).

    SIGINT (Ctrl-C) and SIGTERM stop training after the current step, save it
    and raise TrainingInterrupted; a second signal acts as usual.

    On several processes (after `jax.distributed.initialize()`) every process
    calls this with the same arguments and a shared `workdir`: all of them save
    and restore the checkpoints (orbax coordinates them), process 0 alone writes
    config.json, vocab.txt and metrics.jsonl and shows the progress bar.

    Args:
      config: the training configuration.
      stream: training windows (`data.make_lm_stream` with config.batch_size).
      workdir: gets config.json, vocab.txt, vocab.sha256, metrics.jsonl and checkpoints/.
      vocab: the corpus vocabulary the stream's ids come from (config.model.vocab_size
        words); recorded as vocab.txt with its sha256 in vocab.sha256 (loaders check
        both) and checked against it when resuming.
      stop_at_step: stop (with a checkpoint) at this step in [1, steps] without
        changing the schedule, e.g. to split a run over several sittings.
      resume_step: resume from this checkpoint instead of the latest one; the
        later checkpoints are moved to workdir/superseded/.
      allow_config_change: resume although `config` differs from the run's
        config.json in fields that change training (listed in the next metrics
        row's "config_changes"); otherwise that raises CheckpointError.
      progress: show a progress bar.
      valid: windows to validate on every `eval_every` steps (with eval_every > 0)
        and, for lr_schedule "plateau", after every epoch (its row then also has the
        "learning_rate" for the next epoch):
        the perplexity of every exit (`passes.exit_perplexities`, continuous
        protocol when config.carry_state) in a metrics row {"step",
        "valid_exit_ppl", "valid_tokens", "valid_protocol"}.
      tensorboard: also write the metrics as TensorBoard event files in
        workdir/tensorboard (tensorboardX; `tensorboard --logdir WORKDIR`); on
        resuming, TensorBoard drops the steps an earlier run logged after the
        checkpoint resumed from (as metrics.jsonl does); `metrics.MetricsWriter`.
      profile: a folder for a `jax.profiler` trace of PROFILE_STEPS steps after the
        first (compiling) one: open its perfetto_trace.json.gz in ui.perfetto.dev,
        or the folder with TensorBoard's profile plugin (docs/benchmarks.md).

    Returns:
      The final train state.

    Raises:
      FloatingPointError: the loss became non-finite (says at which step).
      CheckpointError: the checkpoint to resume from is damaged, was made with
        another vocabulary or other settings, or a save did not happen.
      TrainSetupError: stop_at_step, the batch size or the vocabulary's size cannot be used.
      TrainingInterrupted: a signal stopped training (after saving).
    """
    workdir = pathlib.Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    end = _end_step(config, stop_at_step)
    mesh = make_mesh()
    replicated, sharded = data_parallel(mesh)
    if config.batch_size % mesh.size:
        raise TrainSetupError(
            f"batch_size {config.batch_size} is not divisible by the {mesh.size} devices"
        )
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 0:
        raise TrainSetupError(f"eval_every must be an integer >= 0, got {eval_every!r}")
    if eval_every and valid is None:
        raise TrainSetupError("eval_every > 0 needs the `valid` windows to evaluate on")
    plateau = config.lr_schedule == "plateau"
    if plateau and valid is None:
        raise TrainSetupError(
            'lr_schedule "plateau" validates after every epoch: it needs the `valid` windows'
        )
    if vocab is not None and len(vocab_words(vocab)) != config.model.vocab_size:
        raise TrainSetupError(
            f"the vocabulary has {len(vocab_words(vocab))} words but the model's vocab_size "
            f"is {config.model.vocab_size}: set vocab_size to the corpus's vocabulary size"
        )
    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
    metrics, profiling = None, False
    try:
        state, changes = _resume(
            config, workdir, checkpointer, vocab, resume_step, allow_config_change, replicated
        )
        start = int(state.step)
        if start > end:
            raise TrainSetupError(
                f"the checkpoint resumed from is at step {start}, after the last step asked "
                f"for ({end}: steps={config.steps}, stop_at_step={stop_at_step})"
            )
        metrics = MetricsWriter(workdir, start, primary=_is_primary(), tensorboard=tensorboard)
        if _is_primary():
            record_environment(workdir, start)
        pending = metrics.dropped_changes if start else []  # a fresh run inherits none
        if changes:
            pending.append({"from_step": start, "fields": changes})
        step_fn = jax.jit(
            make_train_step(config, stream_capacities(config, stream), len(stream)),
            donate_argnums=0,
            out_shardings=(replicated, replicated),
        )
        keys = run_keys(config.seed)
        tokens_per_step = config.batch_size * config.model.n_seq
        bar = tqdm(
            range(start, end),
            initial=start,
            total=config.steps,
            disable=not progress or not _is_primary(),
            desc="train",
            unit="step",
        )
        timed_steps, timer, compile_s = 0, time.perf_counter(), None
        with bar, _stop_signals() as stop:
            for step in bar:
                batch = global_batch(train_batch(stream, step), sharded)
                if profile and _is_primary() and step == start + 1:  # after compiling
                    jax.profiler.start_trace(str(profile), create_perfetto_trace=True)
                    profiling = True
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    state, values = step_fn(state, batch, step_keys(keys, step))
                if profiling and step == start + PROFILE_STEPS:
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()
                    profiling = False
                if step == start:  # this process's first step includes compilation: timed alone
                    jax.block_until_ready(state)
                    compile_s = time.perf_counter() - timer
                else:
                    timed_steps += 1
                # A config change is logged at once, so a signal cannot lose it.
                log = step == 0 or (step + 1) % config.log_every == 0 or step + 1 == config.steps
                # Every process fetches the same steps (pending is process 0's, and only
                # ever at the start), so all stop together on a non-finite loss.
                if log or step == start:
                    values = jax.device_get(values)  # waits for the dispatched steps to finish
                    _check_finite(values, step)
                if log or pending:
                    seconds = time.perf_counter() - timer
                    row = _row(
                        step,
                        values,
                        timed_steps * tokens_per_step,
                        seconds,
                        compile_s,
                        config_changes=pending,
                    )
                    metrics.write(row)
                    if row["tokens_per_s"]:
                        bar.set_postfix(
                            loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}"
                        )
                    timed_steps, timer, compile_s, pending = 0, time.perf_counter(), None, []
                epoch_end = plateau and (step + 1) % len(stream) == 0
                if epoch_end or (eval_every and (step + 1) % eval_every == 0):
                    row = _validate(config, state.params, valid, step + 1)
                    if epoch_end:
                        valid_loss = float(np.log(row["valid_exit_ppl"][-1]))
                        opt_state = plateau_update(config, state.opt_state, valid_loss)
                        state = state.replace(opt_state=jax.device_put(opt_state, replicated))
                        row["learning_rate"] = learning_rate(config, state.opt_state)
                    metrics.write(row)
                    timer = time.perf_counter()  # validation time is not training time
                if (step + 1) % config.checkpoint_every == 0 or step + 1 == end or stop:
                    checkpointer.save(step + 1, state)
                if stop:
                    checkpointer.wait()
                    raise TrainingInterrupted(stop[0], step + 1, workdir)
        checkpointer.wait()
    finally:
        checkpointer.close()
        if profiling:
            jax.profiler.stop_trace()
        if metrics is not None:
            metrics.close()
    return state


def _validate(config: TrainConfig, params, valid: LMStream, step: int) -> dict:
    """The metrics row of a validation pass at `step` (see `train`)."""
    model = EarlyExitLM(config.model)
    result = exit_perplexities(model, params, valid, carry=config.carry_state, progress=False)
    return {
        "step": step,
        "valid_exit_ppl": result["exit_ppl"],
        "valid_tokens": result["tokens"],
        "valid_protocol": result["protocol"],
    }


def _end_step(config: TrainConfig, stop_at_step: int | None) -> int:
    if stop_at_step is None:
        return config.steps
    if (
        not isinstance(stop_at_step, int | np.integer)
        or isinstance(stop_at_step, bool)
        or not 1 <= stop_at_step <= config.steps
    ):
        raise TrainSetupError(
            f"stop_at_step must be a step in [1, steps={config.steps}], got {stop_at_step!r}"
        )
    return int(stop_at_step)


def _resume(config, workdir, checkpointer, vocab, resume_step, allow_config_change, sharding):
    """(state placed with `sharding`, config changes) to start from, after checking
    the work directory.

    Resume order: a fresh state gives the structure; the checkpoint (latest or
    resume_step) replaces it; its step selects the data window and dropout key.
    The checks (vocabulary, settings) come before anything in workdir changes.
    The checkpoint is restored straight into `sharding`: on several processes a
    restored array on one local device could not be moved across hosts.
    """
    state, changes = jax.device_put(init_state(config), sharding), {}
    words = None if vocab is None else vocab_words(vocab)
    if checkpointer.latest_step() is not None or resume_step is not None:
        if words is not None:
            check_vocab(workdir, words)
        changes = _check_config(workdir, config, allow_config_change)
        state = checkpointer.restore(state, resume_step)
        # orbax saves only after its latest step: later steps would never be replaced.
        checkpointer.set_aside_after(int(state.step), workdir / "superseded")
    if not _is_primary():  # the other processes have checked the files; process 0 writes them
        return state, changes
    if words is not None:
        save_vocab(workdir, words)
    elif checkpointer.latest_step() is None:
        for name in (VOCAB_FILE, VOCAB_CHECKSUM_FILE):  # a fresh run's ids are unrecorded
            (workdir / name).unlink(missing_ok=True)
    write_atomic(workdir / "config.json", json.dumps(config.to_dict(), indent=2).encode())
    return state, changes


def _is_primary() -> bool:
    """Whether this process writes the work directory's files (process 0 of several)."""
    return jax.process_index() == 0


def _check_config(workdir: pathlib.Path, config: TrainConfig, allow_change: bool) -> dict:
    """The fields of `config` that differ from the run's config.json, {name: [old, new]}.

    Raises:
      CheckpointError: some differ in more than bookkeeping and not `allow_change`.
    """
    path = workdir / "config.json"
    current = json.loads(json.dumps(config.to_dict()))  # tuples as lists, as read back
    try:
        recorded = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as error:
        raise CheckpointError(f"{path} cannot be read: {error}") from error
    changes = config_changes(upgrade_dict(recorded) if recorded else {}, current)
    if set(changes) - BOOKKEEPING_FIELDS and not allow_change:
        listed = "; ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in changes.items())
        raise CheckpointError(
            f"the checkpoints in {workdir} were made with other settings than these "
            f"({'no config.json' if not recorded else listed}). Resume with the recorded "
            f"settings (config.json), train in a new work directory, or continue with the "
            f"new ones with --allow_config_change true (allow_config_change=True)."
        )
    return changes


@contextlib.contextmanager
def _stop_signals():
    """Yields a list that gets the signal number when SIGINT or SIGTERM arrives.

    The first signal only asks the loop to stop (after saving); the previous
    handlers come back at once, so a second signal acts as usual. Handlers can
    only be set in the main thread: elsewhere the list stays empty.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in signals}

    def restore():
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)

    def request_stop(number, frame):
        received.append(number)
        restore()

    for number in signals:
        signal.signal(number, request_stop)
    try:
        yield received
    finally:
        restore()


def _finite(values) -> list[float | None]:
    """Floats as a list, None where not finite (strict JSON has no NaN or Infinity)."""
    values = np.asarray(values, np.float64).ravel()
    return [float(v) if np.isfinite(v) else None for v in values]


def _check_finite(metrics, step: int) -> None:
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"non-finite training loss {loss} at step {step + 1}")


def _row(step, metrics, tokens, seconds, compile_s=None, *, config_changes=None) -> dict:
    """One metrics row of the values of a step; raises FloatingPointError on a
    non-finite loss.

    tokens_per_s covers the steps since the last row, without a compile step;
    compile_s is the first step of this process (compilation included), if any.
    Non-finite values (an exit no position scored) are written as null;
    config_changes (if any) lists the settings changed on resuming.
    """
    _check_finite(metrics, step)
    loss = float(metrics["loss"])
    exit_nll = np.asarray(metrics["exit_nll"], np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        exit_ppl = np.exp(exit_nll)
    row = {
        "step": step + 1,
        "loss": loss,
        "exit_nll": _finite(exit_nll),
        "exit_ppl": _finite(exit_ppl),
        **{
            name: _finite(metrics[name])[0]
            for name in (
                "balance_loss",
                "classifier_loss",
                "distillation_loss",
                "grad_norm",
                "param_norm",
            )
        },
        "tokens_per_s": tokens / seconds if tokens else None,
        "compile_s": compile_s,
    }
    if config_changes:
        row["config_changes"] = config_changes
    return row
