"""Checkpoints of a training run: orbax steps, and the vocabulary and settings
they were made with, with clear errors when they cannot be used."""

import os
import pathlib
import sys
from collections.abc import Sequence

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

VOCAB_FILE = "vocab.txt"  # the run's words, one per line (utf-8): line i is id i


class CheckpointError(RuntimeError):
    """A checkpoint cannot be restored (missing, damaged, from another model,
    vocabulary or configuration) or saved."""


class Checkpointer:
    """Saves and restores a pytree (the train state) under `directory/<step>`.

    Paths are made absolute (orbax saves in a background thread; a relative path
    fails there). Saving is asynchronous: call `wait()` before reading the files.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        self.directory = pathlib.Path(directory).expanduser().resolve()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        """Starts saving `state` as `step`.

        Raises:
          CheckpointError: orbax declined the save (it refuses steps at or below
            its latest one), so the step would silently keep other weights.
        """
        if not self.manager.save(step, args=ocp.args.StandardSave(state)):
            raise CheckpointError(
                f"checkpoint step {step} was not saved in {self.directory}: orbax only saves "
                f"steps after its latest ({self.latest_step()}); existing steps: {self.steps()}"
            )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, template, step: int | None = None):
        """Restores `step` (default: the latest) into the structure of `template`.

        Raises:
          CheckpointError: naming the step and folder, and the other steps that
            can be restored instead (`--resume_step`), when the files are damaged
            or do not match the model.
        """
        steps = self.steps()
        step = self.latest_step() if step is None else step
        if step not in steps:
            raise CheckpointError(
                f"no checkpoint at step {step} in {self.directory}; available steps: {steps}"
            )
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(template))
        except Exception as error:  # orbax raises many types for damaged files
            others = [s for s in steps if s != step]
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory / str(step)} is damaged or does "
                f"not match this model ({type(error).__name__}: {str(error)[:200]}). "
                f"Other steps: {others or 'none'}; resume from one of them with "
                f"--resume_step STEP, or delete the damaged folder."
            ) from error

    def set_aside_after(self, step: int, folder: pathlib.Path) -> list[int]:
        """Moves the steps after `step` into `folder` (orbax would never save them
        again: it only saves after its latest step); says so on stderr.

        Returns:
          The steps moved.
        """
        self.wait()
        later = [s for s in self.steps() if s > step]
        sync_processes("ee_jax.checkpoint.listed_steps")  # every process saw them before
        for later_step in later if jax.process_index() == 0 else []:  # one process moves
            target = folder / str(later_step)
            suffix = 1
            while target.exists():
                target, suffix = folder / f"{later_step}.{suffix}", suffix + 1
            folder.mkdir(parents=True, exist_ok=True)
            os.replace(self.directory / str(later_step), target)
        sync_processes("ee_jax.checkpoint.set_aside_after")
        if later:
            self.manager.reload()
        if later and jax.process_index() == 0:
            print(
                f"resuming from step {step}: moved the later checkpoints {later} to {folder} "
                f"(delete them when no longer needed)",
                file=sys.stderr,
            )
        return later

    def close(self) -> None:
        self.manager.close()


def sync_processes(name: str) -> None:
    """Waits until every process reaches this point (nothing on a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def write_atomic(path: pathlib.Path, data: bytes) -> None:
    """Writes `data` to a temporary file and renames it to `path` (never half a file)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def save_vocab(workdir: pathlib.Path, words: Sequence[str]) -> None:
    """Records the run's vocabulary as `workdir/vocab.txt` (bytes: universal
    newlines must not touch the words, as in data._save_cached)."""
    write_atomic(workdir / VOCAB_FILE, "\n".join(words).encode("utf-8"))


def check_vocab(workdir: pathlib.Path, words: Sequence[str]) -> None:
    """Checks that the run in `workdir` was trained with exactly `words` (in order).

    Raises:
      CheckpointError: the run has no recorded vocabulary (trained before it was
        recorded) or another one; its word ids would silently mean other words.
    """
    path = workdir / VOCAB_FILE
    words = tuple(words)
    if not path.is_file():
        raise CheckpointError(
            f"{workdir} has no {VOCAB_FILE}: it was trained before runs recorded their "
            f"vocabulary, so its word ids cannot be checked against this corpus's "
            f"{len(words)} words (whose order has since changed). Retrain it."
        )
    recorded = tuple(path.read_bytes().decode("utf-8").split("\n"))
    if recorded != words:
        first = next(
            (i for i, pair in enumerate(zip(recorded, words, strict=False)) if len(set(pair)) > 1),
            min(len(recorded), len(words)),
        )
        shown = [ws[first] if first < len(ws) else "<none>" for ws in (recorded, words)]
        raise CheckpointError(
            f"{workdir} was trained with a different vocabulary (order) than this corpus: "
            f"{len(recorded)} vs {len(words)} words, first difference at id {first} "
            f"({shown[0]!r} vs {shown[1]!r}); its word ids would mean other words. "
            f"Retrain it with this corpus (or load the corpus it was trained on)."
        )


def config_changes(recorded: dict, current: dict, prefix: str = "") -> dict[str, list]:
    """{"field" or "model.field": [recorded, current]} of the fields that differ
    between two `TrainConfig.to_dict()`-style dicts (as read back from JSON)."""
    changes = {}
    for name in sorted(set(recorded) | set(current)):
        old, new = recorded.get(name), current.get(name)
        if isinstance(old, dict) and isinstance(new, dict):
            changes.update(config_changes(old, new, f"{prefix}{name}."))
        elif old != new:
            changes[f"{prefix}{name}"] = [old, new]
    return changes
