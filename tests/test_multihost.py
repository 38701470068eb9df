"""Multi-host training, run as two processes on this machine (gloo CPU collectives).

Two processes with two forced CPU devices each make one 4-device mesh, exactly
as two hosts would; the reference is one process with four forced CPU devices.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import write_markov_corpus

from ee_jax.data import load_wikitext2
from ee_jax.run import load_run

REPO = pathlib.Path(__file__).resolve().parents[1]

# Trains the tiny preset on spec["corpus_dir"] for each (workdir, stop_at_step) of
# spec["runs"] in turn, as process spec["process_id"] of spec["processes"].
WORKER = """
import json, sys
import jax
spec = json.loads(sys.argv[1])
if spec["processes"] > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"127.0.0.1:{spec['port']}", num_processes=spec["processes"],
        process_id=spec["process_id"], initialization_timeout=120,
    )
jax.config.update("jax_default_matmul_precision", "highest")
import ee_jax
from ee_jax import train as train_lib
from ee_jax.config import train_preset
from ee_jax.data import load_wikitext2, make_lm_stream
ee_jax.enable_compilation_cache(spec["jax_cache"])
corpus = load_wikitext2(spec["corpus_dir"], cache_dir=spec["data_cache"], verify_checksums=False)
config = train_preset("tiny", len(corpus.vocab)).replace(**spec["config"])
stream = make_lm_stream(corpus.train, config.batch_size, config.model.n_seq, eos_id=0)
for workdir, stop in spec["runs"]:
    train_lib.train(config, stream, workdir, vocab=corpus.vocab, stop_at_step=stop, progress=False)
print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                  "devices": jax.device_count(), "local_devices": jax.local_device_count()}))
"""

CONFIG = {"steps": 6, "warmup_steps": 1, "log_every": 1, "checkpoint_every": 3}
COMPARED = ("loss", "exit_nll", "balance_loss", "classifier_loss", "grad_norm", "param_norm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(spec: dict, devices: int, **spec_changes) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "XLA_FLAGS": " ".join(
            [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={devices}"]
        ),
    }
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, json.dumps({**spec, **spec_changes})],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> dict:
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def metric_rows(workdir: pathlib.Path) -> list[dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{"step": row["step"], **{name: row[name] for name in COMPARED}} for row in rows]


def assert_same_rows(rows, reference):
    assert [row["step"] for row in rows] == [row["step"] for row in reference]
    for row, expected in zip(rows, reference, strict=True):
        for name in COMPARED:
            np.testing.assert_allclose(row[name], expected[name], rtol=1e-5, err_msg=name)


def assert_same_params(workdir, reference, step):
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])  # noqa: E731
    got, expected = load_run(workdir, step=step), load_run(reference, step=step)
    assert got.step == expected.step == step
    np.testing.assert_allclose(flat(got.variables), flat(expected.variables), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> dict:
    corpus_dir = write_markov_corpus(tmp_path_factory.mktemp("markov"), 200)
    data_cache = tmp_path_factory.mktemp("data_cache")
    load_wikitext2(corpus_dir, cache_dir=data_cache, verify_checksums=False)  # prepared once
    return {
        "corpus_dir": str(corpus_dir),
        "data_cache": str(data_cache),
        "jax_cache": jax.config.jax_compilation_cache_dir,  # conftest's
        "config": CONFIG,
    }


def test_two_processes_train_and_checkpoint_as_one(spec, tmp_path):
    # Given a run of two processes x two CPU devices that stops at step 2 and is
    # resumed by the same two processes up to step 3 (restoring as two processes).
    multi, reference = tmp_path / "multi", tmp_path / "reference"
    port = free_port()
    workers = [
        start_worker(
            spec, 2, processes=2, process_id=i, port=port, runs=[[str(multi), 2], [str(multi), 3]]
        )
        for i in range(2)
    ]
    reports = [finish(worker) for worker in workers]
    assert [(r["process"], r["processes"], r["devices"], r["local_devices"]) for r in reports] == [
        (0, 2, 4, 2),
        (1, 2, 4, 2),
    ]
    # When one process with four devices trains the same run uninterrupted, and
    # then resumes the two-process run's checkpoint up to the last step.
    single = start_worker(
        spec, 4, processes=1, process_id=0, runs=[[str(reference), None], [str(multi), None]]
    )
    assert finish(single)["devices"] == 4
    # Then the steps saved are complete (no orbax temporary folders left by either
    # process), the checkpoint the two processes wrote restores in one process with
    # the reference's parameters, and so does the one-process continuation's.
    assert sorted(p.name for p in (multi / "checkpoints").iterdir()) == ["2", "3", "6"]
    assert_same_params(multi, reference, 3)
    assert_same_params(multi, reference, 6)
    # And metrics.jsonl has one row a step (process 0 alone writes), equal to the reference's.
    assert_same_rows(metric_rows(multi), metric_rows(reference))
