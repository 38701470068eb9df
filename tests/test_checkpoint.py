"""Tests for ee_jax.checkpoint: a checkpoint made for another model is named as
such (never as damaged), damaged files are, and a failed write on disk ends in
one CheckpointError line."""

import asyncio
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ee_jax import checkpoint as checkpoint_lib
from ee_jax import train as train_lib
from ee_jax.checkpoint import Checkpointer, CheckpointError
from ee_jax.config import train_preset
from ee_jax.data import load_wikitext2, make_lm_stream

REPO = pathlib.Path(__file__).resolve().parents[1]
VOCAB_SIZE = 50


def small_run(tmp_path, **changes):
    """(tiny config with `changes`, a training stream of random ids)."""
    config = train_preset("tiny", VOCAB_SIZE).replace(
        steps=4, warmup_steps=1, checkpoint_every=2, log_every=2, **changes
    )
    ids = np.random.default_rng(0).integers(1, VOCAB_SIZE, 4000)
    return config, make_lm_stream(ids, config.batch_size, config.model.n_seq, eos_id=0)


def assert_never_advises_deleting(message: str) -> None:
    assert not re.search(r"delet|remove", message, re.IGNORECASE), message


def test_resuming_with_another_width_names_the_arrays_not_damage(tmp_path):
    # Given a tiny run (D = 16) stopped at step 2 of 4.
    config, stream = small_run(tmp_path)
    train_lib.train(config, stream, tmp_path, stop_at_step=2, progress=False)
    # When it resumes with D = 32 and config changes allowed.
    wider = config.replace(d_model=32)
    with pytest.raises(CheckpointError) as excinfo:
        train_lib.train(wider, stream, tmp_path, allow_config_change=True, progress=False)
    # Then the error says the checkpoint is intact, names differing arrays with both
    # shapes, says what to do, and neither calls it damaged nor advises deleting it.
    message = str(excinfo.value)
    assert "intact but was made for another model shape" in message, message
    assert re.search(
        r"params/params/\S+: checkpoint \((\d+, )?16(, \d+)*\) float32, "
        r"model \((\d+, )?32(, \d+)*\) float32",
        message,
    ), message
    assert "config.json" in message and "new work directory" in message
    assert "damaged" not in message
    assert_never_advises_deleting(message)
    # And the checkpoint still resumes with its own settings, to the end of the run.
    assert int(train_lib.train(config, stream, tmp_path, progress=False).step) == 4


def test_arrays_missing_extra_or_of_another_dtype_are_named(tmp_path):
    # Given a checkpoint of a small tree.
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    checkpointer.save(1, {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.int32)})
    checkpointer.wait()
    # When it is restored into a tree with another dtype, a new array and no "b".
    template = {"a": np.zeros((2, 3), np.int32), "c": np.zeros(5, np.float32)}
    with pytest.raises(CheckpointError) as excinfo:
        checkpointer.restore(template)
    checkpointer.close()
    # Then each difference is named, with the checkpoint's and the model's side.
    message = str(excinfo.value)
    assert "3 arrays differ" in message, message
    assert "a: checkpoint (2, 3) float32, model (2, 3) int32" in message
    assert "c: not in the checkpoint, model (5,) float32" in message
    assert "b: checkpoint (4,) int32, not in the model" in message


def test_damaged_files_are_called_damaged_and_other_steps_offered(tmp_path):
    # Given checkpoints at steps 1 and 2, and every file of step 2 cut in half.
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    tree = {"a": np.arange(4096, dtype=np.float32)}
    for step in (1, 2):
        checkpointer.save(step, tree)
    checkpointer.wait()
    for path in (tmp_path / "checkpoints" / "2").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    # When step 2 is restored, the error calls it damaged and offers step 1.
    with pytest.raises(CheckpointError, match=r"step 2 .*damaged.*Other steps: \[1\]") as info:
        checkpointer.restore(tree, 2)
    assert "--resume_step" in str(info.value)
    assert_never_advises_deleting(str(info.value))
    # And step 1 still restores.
    np.testing.assert_array_equal(checkpointer.restore(tree, 1)["a"], tree["a"])
    checkpointer.close()


def test_a_checkpoint_folder_that_cannot_take_files_fails_the_save_at_once(tmp_path):
    # Given a checkpointer whose folder became a regular file (root can write into a
    # read-only folder, so chmod would not stop a test run as root; this does).
    folder = tmp_path / "checkpoints"
    checkpointer = Checkpointer(folder)
    shutil.rmtree(folder)
    folder.write_text("not a folder")
    # When a step is saved, one CheckpointError names the folder and the OS error.
    with pytest.raises(CheckpointError) as excinfo:
        checkpointer.save(1, {"a": np.zeros(3)})
    message = str(excinfo.value)
    assert f"checkpoint step 1 could not be written to {folder}" in message
    assert "NotADirectoryError" in message and "\n" not in message
    checkpointer.close()


def test_a_disk_without_room_for_the_state_fails_the_save_at_once(tmp_path, monkeypatch):
    # Given a disk with 1 kB free (reported so; root bypasses quotas and chmod).
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    usage = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(checkpoint_lib.shutil, "disk_usage", lambda path: usage)
    # When a 16 kB state is saved, one CheckpointError says what it needs and has.
    with pytest.raises(CheckpointError) as excinfo:
        checkpointer.save(1, {"a": np.zeros(4096, np.float32)})
    message = str(excinfo.value)
    assert "needs about 0.0 MB and the disk has 0.0 MB free" in message, message
    assert "run the same command again" in message and "\n" not in message
    checkpointer.close()
    assert checkpointer.steps() == []


def test_unretrieved_write_futures_of_the_checkpoint_folder_are_quieted(tmp_path, caplog):
    # Given a checkpointer, and asyncio's report of a tensorstore write future whose
    # exception nobody retrieved: raised in C++, so it has no Python traceback.
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    failed = ValueError(f'Error writing "{tmp_path / "checkpoints" / "2" / "x"}": too large')
    other = ValueError(f'Error writing "{tmp_path / "elsewhere"}": too large')
    # When asyncio logs both, then the one naming another folder again after close.
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for error in (failed, other):
            context = {"message": "Future exception was never retrieved", "exception": error}
            asyncio.new_event_loop().default_exception_handler(context)
        checkpointer.close()
        context["exception"] = failed
        asyncio.new_event_loop().default_exception_handler(context)
    # Then only the checkpoint folder's echo during the checkpointer's life is dropped.
    shown = [record.exc_info[1] for record in caplog.records]
    assert shown == [other, failed], shown


# Run in the child: no file may grow past LIMIT bytes (EFBIG, "File too large", as a
# full disk would fail; root is bound by it too; Python ignores SIGXFSZ, so the write
# fails instead of killing the process), then the training script.
LIMITED_RUN = """
import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_failed_background_write_ends_the_script_in_one_error_line(tmp_path):
    # Given a small corpus, prepared beforehand (preparing writes large files too).
    corpus_dir = tmp_path / "data"
    corpus_dir.mkdir()
    ids = np.random.default_rng(1).integers(0, 40, (3, 2000))
    for split, row in zip(("train", "valid", "test"), ids, strict=True):
        words = [f"w{i}" for i in row]
        lines = [" ".join(words[i : i + 10]) for i in range(0, len(words), 10)]
        (corpus_dir / f"{split}.txt").write_text("\n".join(lines) + "\n")
    load_wikitext2(corpus_dir, cache_dir=tmp_path / "cache", verify_checksums=False)
    # When the training script runs where no file may exceed 16 KiB: the
    # checkpoint's array data (about 300 kB) fails in orbax's background threads.
    # (The compilation cache is off: its entries would be cut short too.)
    script = REPO / "experiments" / "train_wikitext2.py"
    command = [sys.executable, "-c", LIMITED_RUN, str(16 * 1024), str(script)]
    command += ["--preset", "tiny", "--workdir", str(tmp_path / "run"), "--steps", "2"]
    command += ["--warmup_steps", "1", "--data_dir", str(corpus_dir)]
    command += ["--cache_dir", str(tmp_path / "cache"), "--verify_checksums", "false"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_ENABLE_COMPILATION_CACHE": "false"}
    env["EE_JAX_CACHE_DIR"] = str(tmp_path / "jax")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    # Then it ends with exit status 2 and one error line naming the checkpoint
    # folder and the OS error, with no traceback before it (orbax's are dropped).
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.fullmatch(
        rf"error: (a checkpoint|checkpoint step 2) could not be written to "
        rf"{re.escape(str(tmp_path / 'run' / 'checkpoints'))} \(.*File too large.*\)\. "
        r"Make the folder writable or free disk space, .*",
        lines[-1],
    ), result.stderr[-3000:]
    assert [line for line in lines if not line.startswith("train:")] == lines[-1:], lines
