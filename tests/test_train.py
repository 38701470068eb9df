"""Training: loss decreases, exact resume after a kill, data parallelism, errors."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ee_jax import train as train_lib
from ee_jax.checkpoint import CheckpointError
from ee_jax.config import train_preset
from ee_jax.data import load_wikitext2, make_lm_stream
from ee_jax.evaluate import exit_perplexities
from ee_jax.model import EarlyExitLM

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "train_wikitext2.py"


def markov_text(n_lines: int, seed: int) -> str:
    """Lines from a small Markov chain: learnable structure in a 40-word vocabulary."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(40)]
    successors = np.random.default_rng(0).integers(0, 40, (40, 3))  # 3 likely successors
    lines = []
    for _ in range(n_lines):
        word = rng.integers(40)
        line = [words[word]]
        for _ in range(rng.integers(5, 15)):
            word = successors[word, rng.integers(3)] if rng.random() < 0.9 else rng.integers(40)
            line.append(words[word])
        lines.append(" ".join(line))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("markov")
    for split, (lines, seed) in {"train": (600, 1), "valid": (60, 2), "test": (60, 3)}.items():
        (folder / f"{split}.txt").write_text(markov_text(lines, seed))
    return folder


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
    # When it trains for a few hundred steps.
    state = train_lib.train(config, stream, tmp_path, progress=False)
    after = exit_perplexities(model, state.params, valid, progress=False)
    # Then every exit's validation perplexity is well below where it started.
    assert all(a < 0.5 * b for a, b in zip(after["exit_ppl"], before["exit_ppl"], strict=True)), (
        before,
        after,
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 300 and all(np.isfinite(row["loss"]) for row in rows)


def run_cli(workdir, corpus_dir, *extra, background=False):
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
        return subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def comparable_rows(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: row[k] for k in ("step", "loss", "exit_nll", "grad_norm")} for row in rows]


def test_resume_after_kill_equals_uninterrupted_run(corpus_dir, tmp_path):
    flags = ("--steps", "400", "--checkpoint_every", "20", "--log_every", "20")
    # Given an uninterrupted run.
    straight = tmp_path / "straight"
    assert run_cli(straight, corpus_dir, *flags).returncode == 0
    # When a second run is killed (SIGKILL) after its first checkpoint, then resumed.
    killed = tmp_path / "killed"
    process = run_cli(killed, corpus_dir, *flags, background=True)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "20").is_dir() and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    resumed_from = train_lib.Checkpointer(killed / "checkpoints").latest_step()
    assert resumed_from is not None and resumed_from < 400
    assert run_cli(killed, corpus_dir, *flags).returncode == 0
    # Then parameters and logged metrics are identical to the uninterrupted run's.
    _, params_straight, _ = train_lib.restore_params(straight)
    _, params_killed, step = train_lib.restore_params(killed)
    assert step == 400
    jax.tree.map(np.testing.assert_array_equal, params_straight, params_killed)
    assert comparable_rows(killed) == comparable_rows(straight)


def test_damaged_latest_checkpoint_is_reported_and_previous_step_resumes(corpus, tmp_path):
    # Given a run with checkpoints at steps 10 and 20, and step 20 damaged.
    config = tiny_config(corpus, steps=30, checkpoint_every=10)
    stream = make_lm_stream(corpus.train, config.batch_size, config.model.n_seq, eos_id=0)
    train_lib.train(config, stream, tmp_path, stop_at_step=20, progress=False)
    damaged = max(
        (tmp_path / "checkpoints" / "20").rglob("*"),
        key=lambda p: p.stat().st_size if p.is_file() else -1,
    )
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    # When training resumes, it names the damaged step and the way out.
    with pytest.raises(CheckpointError, match=r"step 20 .*damaged.*--resume_step"):
        train_lib.train(config, stream, tmp_path, progress=False)
    # Then resuming from step 10 works and finishes the run.
    state = train_lib.train(config, stream, tmp_path, resume_step=10, progress=False)
    assert int(state.step) == 30


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
rng = jax.random.key(1)
single = jax.jit(step)(state, batch, rng)
replicated, sharded = train.data_parallel(train.make_mesh())
parallel = jax.jit(step)(jax.device_put(state, replicated), train.global_batch(batch, sharded), rng)
assert len(parallel[0].params["params"]["token_embed"]["embedding"].sharding.device_set) == 4
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
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
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
        train_lib._log(tmp_path / "m.jsonl", 6, metrics, 100, 1.0)
