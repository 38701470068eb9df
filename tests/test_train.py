"""Training: loss decreases, exact resume after a kill, data parallelism, errors."""

import argparse
import gzip
import importlib.util
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_markov_corpus

from ee_jax import cli, train_state
from ee_jax import train as train_lib
from ee_jax.checkpoint import CheckpointError
from ee_jax.config import train_preset
from ee_jax.data import Batch, Corpus, Vocabulary, load_wikitext2, make_lm_stream
from ee_jax.metrics import MetricsWriter
from ee_jax.model import EarlyExitLM
from ee_jax.passes import exit_perplexities
from ee_jax.run import load_run, read_config

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "train_wikitext2.py"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> pathlib.Path:
    return write_markov_corpus(tmp_path_factory.mktemp("markov"), 600)


@pytest.fixture(scope="module")
def corpus(corpus_dir, tmp_path_factory):
    return load_wikitext2(
        corpus_dir, cache_dir=tmp_path_factory.mktemp("cache"), verify_checksums=False
    )


def tiny_config(corpus, **changes):
    return train_preset("tiny", len(corpus.vocab)).replace(**changes)


def test_training_lowers_every_exit_loss(corpus, tmp_path):
    # Given the tiny preset on a small Markov-chain corpus.
    config = tiny_config(corpus, steps=300, checkpoint_every=300)
    model = EarlyExitLM(config.model)
    stream = make_lm_stream(corpus.train, config.batch_size, config.model.n_seq, eos_id=0)
    valid = make_lm_stream(corpus.valid, 4, config.model.n_seq, eos_id=0)
    before = exit_perplexities(model, train_lib.init_state(config).params, valid, progress=False)
    # When it trains for a few hundred steps, validating every 100.
    state = train_lib.train(config, stream, tmp_path, progress=False, valid=valid, eval_every=100)
    after = exit_perplexities(model, state.params, valid, progress=False)
    # Then every exit's validation perplexity is well below where it started.
    assert all(a < 0.5 * b for a, b in zip(after["exit_ppl"], before["exit_ppl"], strict=True)), (
        before,
        after,
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    checks = [row for row in rows if "valid_exit_ppl" in row]
    rows = [row for row in rows if "loss" in row]
    assert rows[-1]["step"] == 300 and all(np.isfinite(row["loss"]) for row in rows)
    # And the validations at steps 100, 200, 300 fell, the last one the final model's,
    # also written as TensorBoard scalars.
    assert [row["step"] for row in checks] == [100, 200, 300]
    assert checks[0]["valid_exit_ppl"][-1] > checks[-1]["valid_exit_ppl"][-1]
    np.testing.assert_allclose(checks[-1]["valid_exit_ppl"], after["exit_ppl"], rtol=1e-6)
    events = b"".join(path.read_bytes() for path in (tmp_path / "tensorboard").iterdir())
    for tag in (b"train/loss", b"valid/valid_exit_ppl/exit_1", b"train/exit_ppl/exit_3"):
        assert tag in events


def run_cli(workdir, corpus_dir, *extra, background=False, stderr=subprocess.DEVNULL):
    command = [
        sys.executable,
        str(SCRIPT),
        "--preset",
        "tiny",
        "--workdir",
        str(workdir),
        "--data_dir",
        str(corpus_dir),
        "--cache_dir",
        str(workdir.parent / "cache"),
        "--verify_checksums",
        "false",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if background:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def comparable_rows(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: row[k] for k in ("step", "loss", "exit_nll", "grad_norm")} for row in rows]


KILL_FLAGS = ("--steps", "400", "--checkpoint_every", "20", "--log_every", "20")


@pytest.fixture(scope="module")
def straight_run(corpus_dir, tmp_path_factory):
    """An uninterrupted CLI run with KILL_FLAGS, for the interrupted runs to equal."""
    straight = tmp_path_factory.mktemp("straight") / "run"
    result = run_cli(straight, corpus_dir, *KILL_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return straight


def saved_steps(workdir) -> list[int]:
    # Orbax writes a step under a temporary name and renames it when complete.
    folder = workdir / "checkpoints"
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    return sorted(int(name) for name in names if name.isdigit())


def start_and_wait_for_checkpoint(workdir, corpus_dir, after_step=0, **popen):
    """Starts (or resumes) the CLI run in workdir; returns once it saved a step > after_step."""
    process = run_cli(workdir, corpus_dir, *KILL_FLAGS, background=True, **popen)
    deadline = time.time() + 300
    while not any(s > after_step for s in saved_steps(workdir)) and time.time() < deadline:
        time.sleep(0.02)
    return process


def assert_same_run(workdir, straight):
    run, straight_run = load_run(workdir), load_run(straight)
    assert run.step == 400
    jax.tree.map(np.testing.assert_array_equal, straight_run.variables, run.variables)
    assert comparable_rows(workdir) == comparable_rows(straight)


def interrupt_between_checkpoints(workdir, corpus_dir, signal_number, after_step, log):
    """(Re)starts the run, sends signal_number between two checkpoints, checks how it
    stopped (exit code, no traceback, the saved step, the resume command); returns that step."""
    with open(log, "w") as stderr:
        process = start_and_wait_for_checkpoint(workdir, corpus_dir, after_step, stderr=stderr)
        time.sleep(0.3)  # somewhere between two checkpoints
        process.send_signal(signal_number)
        code = process.wait(timeout=300)
    stderr = log.read_text()
    assert code == 128 + signal_number, stderr[-3000:]
    assert "Traceback" not in stderr
    step = int(re.search(r"stopped at step (\d+)", stderr).group(1))
    assert after_step < step < 400
    assert train_lib.Checkpointer(workdir / "checkpoints").latest_step() == step
    command = re.search(r"resume with: (.*)", stderr).group(1)
    assert "train_wikitext2.py" in command and str(workdir) in command
    return step


def test_kill_and_interrupts_resume_to_the_uninterrupted_run(corpus_dir, straight_run, tmp_path):
    # Given an uninterrupted run (straight_run), and the same run killed (SIGKILL)
    # after its first checkpoint.
    workdir = tmp_path / "run"
    process = start_and_wait_for_checkpoint(workdir, corpus_dir)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = train_lib.Checkpointer(workdir / "checkpoints").latest_step()
    assert killed_at is not None and killed_at < 400
    # When it is resumed and interrupted (SIGTERM, then Ctrl-C's SIGINT) between two
    # checkpoints, each time exiting non-zero without a traceback, with the step it
    # saved on the way out and the command that resumes it,
    step = killed_at
    for number, signal_number in enumerate([signal.SIGTERM, signal.SIGINT]):
        log = tmp_path / f"stderr{number}.txt"
        step = interrupt_between_checkpoints(workdir, corpus_dir, signal_number, step, log)
    # and is then resumed to the end.
    assert run_cli(workdir, corpus_dir, *KILL_FLAGS).returncode == 0
    # Then parameters and logged metrics are identical to the uninterrupted run's.
    assert_same_run(workdir, straight_run)


def test_damaged_latest_checkpoint_is_reported_and_previous_step_resumes(corpus, tmp_path):
    # Given a run with checkpoints at steps 10 and 20, and step 20 damaged.
    config = tiny_config(corpus, steps=30, checkpoint_every=10)
    stream = make_lm_stream(corpus.train, config.batch_size, config.model.n_seq, eos_id=0)
    train_lib.train(config, stream, tmp_path, vocab=corpus.vocab, stop_at_step=20, progress=False)
    damaged = max(
        (tmp_path / "checkpoints" / "20").rglob("*"),
        key=lambda p: p.stat().st_size if p.is_file() else -1,
    )
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    # When training resumes, it names the damaged step and the way out.
    with pytest.raises(CheckpointError, match=r"step 20 .*damaged.*--resume_step"):
        train_lib.train(config, stream, tmp_path, progress=False)
    # Then resuming from step 10 works and finishes the run, and the damaged step 20,
    # set aside, is replaced by the resumed run's (orbax saves only after its latest).
    state = train_lib.train(config, stream, tmp_path, resume_step=10, progress=False)
    assert int(state.step) == 30
    assert (tmp_path / "superseded" / "20").is_dir()
    assert load_run(tmp_path, step=20).step == 20


def test_a_save_orbax_declines_raises(tmp_path):
    # Given a checkpoint at step 20, when step 10 is saved, it raises instead of skipping.
    checkpointer = train_lib.Checkpointer(tmp_path / "checkpoints")
    checkpointer.save(20, {"x": np.zeros(2)})
    checkpointer.wait()
    with pytest.raises(CheckpointError, match=r"step 10 was not saved"):
        checkpointer.save(10, {"x": np.ones(2)})
    checkpointer.close()


def test_run_keys_split_one_seed_into_distinct_named_keys():
    # Given the named keys of seeds 0..3 and the keys of their first steps.
    def data(key):
        return tuple(np.asarray(jax.random.key_data(key)).ravel().tolist())

    keys = []
    for seed in range(4):
        named = train_lib.run_keys(seed)
        keys.append(named["init"])
        keys += [k for step in range(3) for k in train_lib.step_keys(named, step).values()]
    # Then seed s's dropout key is not seed s + 1's init key, and no two keys coincide
    # (dropout, sampling and initialisation draw independent streams).
    for seed in range(3):
        dropout, init = train_lib.run_keys(seed)["dropout"], train_lib.run_keys(seed + 1)["init"]
        assert data(dropout) != data(init)
        assert data(dropout) != data(jax.random.key(seed + 1))  # the old scheme's dropout key
    assert len({data(k) for k in keys}) == len(keys)


def test_init_uses_the_init_key_and_steps_are_deterministic():
    # Given the tiny preset with dropout and a batch.
    config = train_preset("tiny", 97).replace(dropout=0.1, exit_token_fraction=0.5)
    state = train_lib.init_state(config)
    tokens = jax.random.randint(jax.random.key(0), (4, config.model.n_seq), 0, 97)
    batch = Batch(tokens, jnp.roll(tokens, -1, 1), jnp.ones_like(tokens, bool))
    # When the parameters are compared with an init from the named key, and one step
    # runs twice with the same keys and once with the next step's keys.
    expected = EarlyExitLM(config.model).init(
        train_lib.run_keys(config.seed)["init"], jnp.zeros((1, config.model.n_seq), jnp.int32)
    )
    step = jax.jit(train_lib.make_train_step(config))
    keys = train_lib.run_keys(config.seed)
    first, again = (step(state, batch, train_lib.step_keys(keys, 0))[1] for _ in range(2))
    other = step(state, batch, train_lib.step_keys(keys, 1))[1]
    # Then the parameters are that init, equal keys give equal steps and other keys
    # (dropout and the sampled positions) another loss.
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(got, want)
    assert float(first["loss"]) == float(again["loss"])
    assert float(first["loss"]) != float(other["loss"])


DATA_PARALLEL_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from ee_jax import train
from ee_jax.config import train_preset
from ee_jax.data import Batch
assert jax.device_count() == 4
config = train_preset("tiny", 97).replace(batch_size=8)
state = train.init_state(config)
tokens = jax.random.randint(jax.random.key(0), (8, config.model.n_seq), 0, 97)
batch = Batch(tokens, jnp.roll(tokens, -1, 1), jnp.ones_like(tokens, bool))
step = train.make_train_step(config)
rng = train.step_keys(train.run_keys(1), 0)
single = jax.jit(step)(state, batch, rng)
replicated, sharded = train.data_parallel(train.make_mesh())
parallel = jax.jit(step)(jax.device_put(state, replicated), train.global_batch(batch, sharded), rng)
table = parallel[0].params["params"]["embedder"]["token_embed"]["embedding"]
assert len(table.sharding.device_set) == 4
flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
for a, b in [(single[1]["loss"], parallel[1]["loss"]),
             (single[1]["grad_norm"], parallel[1]["grad_norm"]),
             (flat(single[0].params), flat(parallel[0].params))]:
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
print("ok", float(single[1]["loss"]), float(parallel[1]["loss"]))
"""


def test_data_parallel_step_equals_single_device():
    # Given 4 forced CPU devices, when one step runs with the batch sharded over them,
    # then loss, gradient norm and updated parameters equal the single-device step.
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4",
    }
    result = subprocess.run(
        [sys.executable, "-c", DATA_PARALLEL_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")


@pytest.mark.parametrize("problem", ["empty folder", "truncated test.txt"])
def test_cli_reports_bad_data_in_one_line(problem, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    if problem == "truncated test.txt":
        shared = REPO.parent / "shared" / "data" / "wikitext-2"
        source = shared if shared.is_dir() else None
        for split in ("train", "valid", "test"):
            text = (source / f"{split}.txt").read_bytes() if source else b"a b\n" * 10
            (folder / f"{split}.txt").write_bytes(
                text[: len(text) // 2] if split == "test" else text
            )
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--preset",
            "tiny",
            "--workdir",
            str(tmp_path / "run"),
            "--cache_dir",
            str(tmp_path / "cache"),
        ],
        env={**os.environ, "PYTHONPATH": str(REPO), "EE_JAX_DATA_DIR": str(folder)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    # One message (a few lines), no traceback, naming the folder, the file and the variable.
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "Traceback" not in result.stderr
    assert str(folder) in result.stderr and "EE_JAX_DATA_DIR" in result.stderr
    assert ("train.txt" if problem == "empty folder" else "test.txt") in result.stderr


def test_non_finite_loss_stops_with_the_step(tmp_path):
    metrics = {"loss": jnp.float32(jnp.nan), "exit_nll": jnp.zeros(3)}
    with pytest.raises(FloatingPointError, match="step 7"):
        train_lib._row(6, metrics, 100, 1.0)


def permuted(corpus):
    words = list(corpus.vocab.words)
    words[1], words[2] = words[2], words[1]
    return Vocabulary(tuple(words))


def test_vocabulary_is_recorded_and_every_loader_checks_it(corpus, tmp_path, monkeypatch):
    # Given a run trained with the corpus's vocabulary.
    config = tiny_config(corpus, steps=4, warmup_steps=1, checkpoint_every=2, log_every=2)
    stream = make_lm_stream(corpus.train, config.batch_size, config.model.n_seq, eos_id=0)
    train_lib.train(config, stream, tmp_path, vocab=corpus.vocab, stop_at_step=2, progress=False)
    recorded = (tmp_path / "vocab.txt").read_bytes().decode("utf-8").split("\n")
    assert tuple(recorded) == corpus.vocab.words
    assert load_run(tmp_path, vocab=corpus.vocab).step == 2
    # When it is loaded or resumed with the same words in another order, each refuses.
    other = permuted(corpus)
    mismatch = r"trained with a different vocabulary \(order\).*id 1.*Retrain"
    with pytest.raises(CheckpointError, match=mismatch):
        load_run(tmp_path, vocab=other)
    with pytest.raises(CheckpointError, match=mismatch):
        train_lib.train(config, stream, tmp_path, vocab=other, progress=False)
    monkeypatch.setattr(cli, "load_wikitext2", lambda *a, **k: Corpus(other, *([None] * 3)))
    args = argparse.Namespace(workdir=str(tmp_path), data_dir=None, cache_dir=None)
    with pytest.raises(CheckpointError, match=mismatch):
        cli.load_run_and_corpus(args)
    # And a run from before vocabularies were recorded refuses too, naming the folder.
    (tmp_path / "vocab.txt").unlink()
    old = rf"{tmp_path} has no vocab.txt.*Retrain"
    with pytest.raises(CheckpointError, match=old):
        load_run(tmp_path, vocab=corpus.vocab)
    with pytest.raises(CheckpointError, match=old):
        train_lib.train(config, stream, tmp_path, vocab=corpus.vocab, progress=False)


def test_a_run_recorded_before_newer_fields_resumes_with_their_defaults(corpus, tmp_path):
    # Given a run stopped at step 2 whose config.json predates two training fields.
    config = tiny_config(corpus, steps=4, warmup_steps=1, checkpoint_every=2, log_every=1)
    stream = make_lm_stream(corpus.train, config.batch_size, config.model.n_seq, eos_id=0)
    train_lib.train(config, stream, tmp_path, stop_at_step=2, progress=False)
    recorded = json.loads((tmp_path / "config.json").read_text())
    del recorded["classifier_target"], recorded["distillation_weight"]
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    # When it resumes with today's defaults of those fields, then it finishes, and
    # no setting is recorded as changed.
    state = train_lib.train(config, stream, tmp_path, progress=False)
    assert int(state.step) == 4
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert not any("config_changes" in row for row in rows)
    assert all(row["distillation_loss"] == 0.0 for row in rows)


def test_resuming_with_other_settings_is_refused_unless_allowed(corpus, tmp_path):
    # Given a run stopped at step 2 of 4.
    config = tiny_config(corpus, steps=4, warmup_steps=1, checkpoint_every=2, log_every=1)
    stream = make_lm_stream(corpus.train, config.batch_size, config.model.n_seq, eos_id=0)
    train_lib.train(config, stream, tmp_path, stop_at_step=2, progress=False)
    recorded = (tmp_path / "config.json").read_text()
    # When it resumes with another learning rate and depth of warm-up, it refuses,
    # listing both fields, and leaves config.json alone.
    changed = config.replace(learning_rate=0.5, warmup_steps=2)
    with pytest.raises(CheckpointError, match=r"learning_rate: 0\.01 -> 0\.5; warmup_steps"):
        train_lib.train(changed, stream, tmp_path, progress=False)
    assert (tmp_path / "config.json").read_text() == recorded
    # Then with allow_config_change it continues and the metrics record the change.
    state = train_lib.train(changed, stream, tmp_path, allow_config_change=True, progress=False)
    assert int(state.step) == 4
    assert read_config(tmp_path) == changed
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    [change] = [change for row in rows for change in row.get("config_changes", [])]
    assert change == {
        "from_step": 2,
        "fields": {"learning_rate": [0.01, 0.5], "warmup_steps": [config.warmup_steps, 2]},
    }


def test_bookkeeping_settings_may_change_on_resume(corpus, tmp_path):
    config = tiny_config(corpus, steps=4, warmup_steps=1, checkpoint_every=2, log_every=1)
    stream = make_lm_stream(corpus.train, config.batch_size, config.model.n_seq, eos_id=0)
    train_lib.train(config, stream, tmp_path, stop_at_step=2, progress=False)
    state = train_lib.train(config.replace(log_every=2), stream, tmp_path, progress=False)
    assert int(state.step) == 4


def strict_loads(line: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not strict JSON")

    return json.loads(line, parse_constant=refuse)


def test_metrics_write_null_for_unscored_exits(tmp_path):
    metrics = {
        "loss": np.float32(2.0),
        "exit_nll": np.array([np.nan, 1.0, np.inf], np.float32),
        "balance_loss": np.float32(np.nan),
        "classifier_loss": np.float32(0.5),
        "distillation_loss": np.float32(0.0),
        "grad_norm": np.float32(1.0),
        "param_norm": np.float32(3.0),
    }
    MetricsWriter(tmp_path, 0, primary=True, tensorboard=False).write(
        train_lib._row(6, metrics, 100, 1.0)
    )
    row = strict_loads((tmp_path / "metrics.jsonl").read_text())
    assert row["exit_nll"] == [None, 1.0, None] and row["balance_loss"] is None
    assert row["exit_ppl"][0] is None and row["exit_ppl"][1] == pytest.approx(np.e)


def test_script_json_outputs_are_strict(tmp_path):
    cli.write_json(tmp_path / "r.json", {"ppl": [np.float32(np.nan), np.inf, 2.0], "n": 3})
    assert strict_loads((tmp_path / "r.json").read_text()) == {"ppl": [None, None, 2.0], "n": 3}


@pytest.mark.parametrize("stop_at_step", [0, -1, 5, 2.5])
def test_stop_at_step_outside_the_run_is_refused(stop_at_step, corpus, tmp_path):
    config = tiny_config(corpus, steps=4, warmup_steps=1)
    stream = make_lm_stream(corpus.train, config.batch_size, config.model.n_seq, eos_id=0)
    with pytest.raises(train_lib.TrainSetupError, match=r"stop_at_step must be a step in \[1, "):
        train_lib.train(config, stream, tmp_path, stop_at_step=stop_at_step, progress=False)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reports_user_errors_and_shows_bugs(corpus_dir, tmp_path, monkeypatch, capsys):
    script = load_script("train_wikitext2")
    argv = ["--preset", "tiny", "--workdir", str(tmp_path / "run"), "--data_dir", str(corpus_dir)]
    argv += ["--cache_dir", str(tmp_path / "cache"), "--verify_checksums", "false"]
    # A user error (here --stop_at_step 0) is one line and exit status 2.
    assert script.main([*argv, "--stop_at_step", "0"]) == 2
    err = capsys.readouterr().err
    assert "error: stop_at_step must be a step in [1, steps=200], got 0\n" in err
    assert "Traceback" not in err

    # A ValueError from inside training is a bug: it propagates with its traceback.
    def broken(*args, **kwargs):
        raise ValueError("a bug inside training")

    monkeypatch.setattr(train_lib, "train", broken)
    with pytest.raises(ValueError, match="a bug inside training"):
        script.main(argv)


def tensorboard_scalars(folder: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)...]} as TensorBoard shows the event files in `folder`: files
    in name order, and a SessionLog START at step s drops the events read before it
    of steps >= s (tensorboard's event_accumulator purge on a restart)."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    events = []
    for path in sorted(folder.iterdir()):
        data, at = path.read_bytes(), 0
        while at < len(data):  # TFRecord: length u64, its crc u32, data, data crc u32
            (length,) = np.frombuffer(data[at : at + 8], "<u8")
            event = Event.FromString(data[at + 12 : at + 12 + int(length)])
            at += 16 + int(length)
            if event.session_log.status == SessionLog.START:
                events = [e for e in events if e.step < event.step]
            events.append(event)
    scalars = {}
    for event in events:
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_resuming_from_an_earlier_step_replaces_the_later_tensorboard_steps(corpus, tmp_path):
    # Given a run of 4 steps, a metrics row every step, checkpoints at 2 and 4.
    config = tiny_config(corpus, steps=4, warmup_steps=1, checkpoint_every=2, log_every=1)
    stream = make_lm_stream(corpus.train, config.batch_size, config.model.n_seq, eos_id=0)
    train_lib.train(config, stream, tmp_path, progress=False)
    first = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # When it resumes from step 2 with another learning rate (so steps 3, 4 change).
    faster = config.replace(learning_rate=10 * config.learning_rate)
    train_lib.train(
        faster, stream, tmp_path, resume_step=2, allow_config_change=True, progress=False
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] != first[-1]["loss"]  # the resumed run's step 4 is another
    # Then TensorBoard shows each step once: steps 1, 2 of the first run, 3, 4 of the
    # resumed one, as metrics.jsonl records them.
    shown = tensorboard_scalars(tmp_path / "tensorboard")["train/loss"]
    assert [step for step, _ in shown] == [1, 2, 3, 4]
    np.testing.assert_allclose(
        [value for _, value in shown], [row["loss"] for row in rows], rtol=1e-6
    )


def test_a_vocabulary_of_another_size_than_the_model_is_refused_before_training(corpus, tmp_path):
    # Given a model one word larger than the corpus's vocabulary.
    config = tiny_config(corpus, steps=2, warmup_steps=1).replace(vocab_size=len(corpus.vocab) + 1)
    stream = make_lm_stream(corpus.train, config.batch_size, config.model.n_seq, eos_id=0)
    # When it trains with that vocabulary, then it is refused in one line, nothing recorded.
    with pytest.raises(train_lib.TrainSetupError, match=r"^[^\n]*vocab_size[^\n]*$"):
        train_lib.train(config, stream, tmp_path, vocab=corpus.vocab, progress=False)
    assert not (tmp_path / "vocab.txt").exists() and not (tmp_path / "checkpoints").exists()


def test_profile_traces_the_steps_after_the_compiling_one(corpus, tmp_path):
    # Given a tiny run of 6 steps, profiled.
    config = tiny_config(corpus, steps=6, warmup_steps=1, checkpoint_every=6)
    stream = make_lm_stream(corpus.train, config.batch_size, config.model.n_seq, eos_id=0)
    train_lib.train(config, stream, tmp_path / "run", profile=tmp_path / "trace", progress=False)
    # Then the trace (Perfetto's JSON) holds PROFILE_STEPS steps, from the second one.
    [path] = (tmp_path / "trace").rglob("perfetto_trace.json.gz")
    events = json.loads(gzip.decompress(path.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    steps = sorted({int(e["args"]["step_num"]) for e in events if e.get("name") == "train"})
    assert steps == list(range(1, 1 + train_lib.PROFILE_STEPS))


def test_the_plateau_rule_lowers_the_rate_only_after_an_epoch_without_improvement():
    # Given the SGD optimizer with the "plateau" schedule at learning rate 20.
    config = train_preset("lstm", 97).replace(**TINY_LSTM)
    opt_state = train_state.make_optimizer(config).init({"w": jnp.zeros(3)})
    # When epochs end with these validation losses, then the rate is divided by 4
    # exactly after the ones that did not beat the best so far (a tie does not).
    rates = []
    for loss in (5.0, 4.0, 4.5, 4.0, 3.9, 3.95):
        opt_state = train_state.plateau_update(config, opt_state, loss)
        rates.append(train_state.learning_rate(config, opt_state))
    assert rates == [20.0, 20.0, 5.0, 1.25, 1.25, 0.3125]


TINY_LSTM = dict(d_model=16, n_seq=8, batch_size=4, checkpoint_every=1, log_every=1, steps=12)


def test_plateau_training_follows_its_validations_and_resumes_exactly(corpus, tmp_path):
    # Given the LSTM anchor's recipe at a tiny size, on a stream of 3 windows an epoch
    # (a large rate and a mild factor, so that the rule acts), stopped at step 5.
    config = train_preset("lstm", len(corpus.vocab)).replace(
        **TINY_LSTM, learning_rate=30.0, plateau_factor=0.5
    )
    stream = make_lm_stream(corpus.train[:90], 4, 8, eos_id=0)
    valid = make_lm_stream(corpus.valid[:200], 2, 8, eos_id=0)
    assert len(stream) == 3
    straight = train_lib.train(config, stream, tmp_path / "a", valid=valid, progress=False)
    train_lib.train(config, stream, tmp_path / "b", valid=valid, stop_at_step=5, progress=False)
    resumed = train_lib.train(config, stream, tmp_path / "b", valid=valid, progress=False)
    # Then validations ran after every epoch, and each logged rate is the rule applied
    # to the logged validation perplexities.
    rows = [
        json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    ]
    checks = [row for row in rows if "learning_rate" in row]
    assert [row["step"] for row in checks] == [3, 6, 9, 12]
    rate, best = 30.0, np.inf
    for row in checks:
        loss = np.log(row["valid_exit_ppl"][-1])
        rate, best = (rate, loss) if loss < best else (rate * 0.5, best)
        assert row["learning_rate"] == pytest.approx(rate, rel=1e-6)
    assert rate < 30.0, "the rule should have acted at least once"
    # And the resumed run equals the straight one bit for bit, rate included.
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    # And each sitting recorded its software and flags.
    sittings = (tmp_path / "b" / "environment.jsonl").read_text().splitlines()
    assert [json.loads(row)["start_step"] for row in sittings] == [0, 5]
    row = json.loads(sittings[0])
    assert row["versions"]["jax"] == jax.__version__
    assert row["xla_flags"] == os.environ.get("XLA_FLAGS", "")
