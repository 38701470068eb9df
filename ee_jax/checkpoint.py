"""Checkpoints of a training run: orbax steps, and the vocabulary and settings
they were made with, with clear errors when they cannot be used."""

import logging
import os
import pathlib
import shutil
import sys
import tempfile
import traceback

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ee_jax import layout

SHOWN_DIFFERENCES = 6  # arrays named when a checkpoint does not fit the model


class CheckpointError(RuntimeError):
    """A checkpoint cannot be restored (missing, damaged, from another model,
    vocabulary or configuration) or saved."""


class Checkpointer:
    """Saves and restores a pytree (the train state) under `directory/<step>`.

    Paths are made absolute (orbax saves in a background thread; a relative path
    fails there). Saving is asynchronous: call `wait()` before reading the files.
    A write that fails on disk raises one CheckpointError: from `save` when the
    folder cannot take a file or the disk lacks the space (checked first), else
    from `save`, `wait` or `close`, whichever meets orbax's background error
    first. The tracebacks orbax's threads print for that same error are dropped.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        self.directory = pathlib.Path(directory).expanduser().resolve()
        self._quiet = _QuietBackgroundErrors(self.directory)
        self._write_failed = False
        try:
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
                # Registered up front so a step's metadata can be read before restoring.
                item_handlers=ocp.StandardCheckpointHandler(),
            )
        except OSError as error:
            self._quiet.stop()
            raise CheckpointError(
                f"the checkpoint folder {self.directory} cannot be created or read "
                f"({_one_line(error)}): give a work directory that can be written to."
            ) from error

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        """Starts saving `state` as `step`.

        Raises:
          CheckpointError: orbax declined the save (it refuses steps at or below
            its latest one), so the step would silently keep other weights; or
            the folder cannot be written to, or an earlier save failed.
        """
        self._check_disk(step, state)
        try:
            saved = self.manager.save(step, args=ocp.args.StandardSave(state))
        except Exception as error:  # orbax re-raises a failed earlier save here too
            raise self._write_error(step, error) from error
        if not saved:
            raise CheckpointError(
                f"checkpoint step {step} was not saved in {self.directory}: orbax only saves "
                f"steps after its latest ({self.latest_step()}); existing steps: {self.steps()}"
            )

    def wait(self) -> None:
        """Waits until the started saves are on disk (CheckpointError if one failed)."""
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # the background write's error, re-raised
            raise self._write_error(None, error) from error

    def restore(self, template, step: int | None = None):
        """Restores `step` (default: the latest) into the structure of `template`.

        The step's recorded array tree, shapes and dtypes are compared with
        `template` first, so a checkpoint made for another model is named as such.
        A checkpoint of the earlier flat parameter layout is migrated
        (`ee_jax.layout`).

        Raises:
          CheckpointError: the step does not exist; its arrays differ from the
            template's (naming them: the checkpoint is intact, the model is
            another); or its files cannot be read (naming the other steps,
            which `--resume_step` can resume from).
        """
        steps = self.steps()
        step = self.latest_step() if step is None else step
        if step not in steps:
            raise CheckpointError(
                f"no checkpoint at step {step} in {self.directory}; available steps: {steps}"
            )
        try:
            saved = self.manager.metadata(step).item_metadata
        except Exception as error:  # orbax raises many types for unreadable files
            raise self._read_error(step, steps, error) from error
        saved = None if saved is None else getattr(saved, "tree", saved)
        earlier = saved is not None and layout.is_earlier_layout(saved)
        if earlier:  # the flat parameter layout: restored as saved, then upgraded
            template = layout.earlier_layout(template)
        if saved is not None:  # None: nothing recorded to compare; restoring will tell
            self._check_fits(step, saved, template)
        try:
            restored = self.manager.restore(step, args=ocp.args.StandardRestore(template))
        except Exception as error:  # orbax raises many types for damaged files
            raise self._read_error(step, steps, error) from error
        return layout.upgrade(restored) if earlier else restored

    def _check_fits(self, step: int, saved, template) -> None:
        """Raises CheckpointError naming the arrays whose path, shape or dtype in the
        checkpoint (`saved`, orbax's metadata tree) differ from `template`'s."""
        differences = array_differences(array_specs(saved), array_specs(template))
        if not differences:
            return
        shown = "; ".join(differences[:SHOWN_DIFFERENCES])
        more = len(differences) - SHOWN_DIFFERENCES
        raise CheckpointError(
            f"checkpoint step {step} in {self.directory / str(step)} is intact but was made "
            f"for another model shape or other settings: {len(differences)} arrays differ "
            f"(checkpoint vs this model): {shown}{f'; and {more} more' if more > 0 else ''}. "
            f"Resume with the settings it was made with (config.json in the work "
            f"directory), or train these settings in a new work directory."
        )

    def _read_error(self, step: int, steps: list[int], error: Exception) -> CheckpointError:
        others = [s for s in steps if s != step]
        return CheckpointError(
            f"checkpoint step {step} in {self.directory / str(step)} is damaged: its files "
            f"could not be read ({_one_line(error)}). Other steps: {others or 'none'}; "
            f"resume from one of them with --resume_step STEP (later steps are moved to "
            f"superseded/ and kept), or move this step's folder out of {self.directory}."
        )

    def _check_disk(self, step: int, state) -> None:
        """Raises CheckpointError at once when `directory` cannot take a new file (it
        is gone, a file, or read-only) or has less free space than `state`'s arrays
        take: orbax would find out in background threads (which wait minutes for a
        step folder that could not be made, and print a traceback each)."""
        try:
            with tempfile.TemporaryFile(dir=self.directory):
                free = shutil.disk_usage(self.directory).free
        except OSError as error:
            raise self._write_error(step, error) from error
        needed = sum(int(getattr(leaf, "nbytes", 0)) for leaf in jax.tree.leaves(state))
        if free < needed:
            raise CheckpointError(
                f"checkpoint step {step} could not be written to {self.directory}: it needs "
                f"about {needed / 1e6:.1f} MB and the disk has {free / 1e6:.1f} MB free. Free "
                f"disk space, then run the same command again: it resumes from the last "
                f"step saved."
            )

    def _write_error(self, step: int | None, error: Exception) -> CheckpointError:
        self._write_failed = True
        what = "a checkpoint" if step is None else f"checkpoint step {step}"
        return CheckpointError(
            f"{what} could not be written to {self.directory} ({_one_line(error)}). "
            f"Make the folder writable or free disk space, then run the same command "
            f"again: it resumes from the last step saved."
        )

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
                f"(kept there, intact)",
                file=sys.stderr,
            )
        return later

    def close(self) -> None:
        """Finishes the started saves and releases orbax (CheckpointError if a save failed)."""
        try:
            self.manager.close()
        except Exception as error:
            raise self._write_error(None, error) from error
        finally:
            # After a failed write, orbax's threads may still print its echoes: the
            # quieting stays, so the CheckpointError remains the one line about it.
            if not self._write_failed:
                self._quiet.stop()


ORBAX_PATH = f"{os.sep}orbax{os.sep}checkpoint{os.sep}"  # in the file names of orbax's code
QUIETED_LOGGERS = ("absl", "asyncio")  # where orbax's background errors are logged


class _QuietBackgroundErrors(logging.Filter):
    """From construction to `stop()` (a Checkpointer's life), drops the tracebacks
    that a failed background write prints besides the error orbax raises again in
    the caller's thread (`wait_until_finished`), which the Checkpointer reports as
    one CheckpointError line:
    - orbax logs each background thread's exception (absl logger), and asyncio
      the ones of its write tasks and tensorstore futures nobody awaited any more
      ("Task/Future exception was never retrieved"): log records with a traceback
      through orbax or an exception naming a file under the checkpoint folder;
    - tensorstore's writes still in flight finish after orbax closed their event
      loop, and each prints "RuntimeError: Event loop is closed" (unraisable).
    Other log records and unraisable exceptions pass to their usual handlers.
    """

    def __init__(self, directory: pathlib.Path):
        super().__init__()
        self.directory = str(directory)
        self.active = True
        self.previous_hook = sys.unraisablehook
        sys.unraisablehook = self.unraisable
        for name in QUIETED_LOGGERS:
            logging.getLogger(name).addFilter(self)

    def stop(self) -> None:
        self.active = False  # a hook chained after this one still calls it: it passes all
        for name in QUIETED_LOGGERS:
            logging.getLogger(name).removeFilter(self)
        if sys.unraisablehook == self.unraisable:
            sys.unraisablehook = self.previous_hook

    def filter(self, record: logging.LogRecord) -> bool:
        if not (self.active and record.exc_info and record.exc_info[1]):
            return True
        files = [record.pathname] + [
            frame.filename for frame in traceback.extract_tb(record.exc_info[2])
        ]
        through_orbax = any(ORBAX_PATH in file for file in files)
        return not (through_orbax or self.directory in str(record.exc_info[1]))

    def unraisable(self, info) -> None:
        closed_loop = info.exc_type is RuntimeError and str(info.exc_value) == (
            "Event loop is closed"
        )
        if not (self.active and closed_loop):
            self.previous_hook(info)


def _one_line(error: BaseException) -> str:
    """`Type: first line of the message`, at most 1,000 characters (an OS error
    comes last in orbax's messages, after the file names)."""
    text = str(error).strip().split("\n")[0]
    return f"{type(error).__name__}: {text[:1000]}"


def array_specs(tree) -> dict[str, tuple]:
    """{"a/b/0": (shape, dtype)} of every leaf with a shape (arrays, abstract arrays,
    orbax ArrayMetadata), in tree order; paths use the names of dict keys,
    attributes and sequence indices alike, so a TrainState and orbax's saved
    dicts of it name each array the same way."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): (
            tuple(getattr(leaf, "shape", ())),
            np.dtype(leaf.dtype) if getattr(leaf, "dtype", None) is not None else None,
        )
        for path, leaf in leaves
    }


def array_differences(saved: dict[str, tuple], model: dict[str, tuple]) -> list[str]:
    """One "path: checkpoint ..., model ..." line per array that differs, in the
    model's order, then the arrays only the checkpoint has."""

    def spec(shape_dtype) -> str:
        shape, dtype = shape_dtype
        return f"{shape} {dtype}" if dtype is not None else str(shape)

    lines = []
    for path, wanted in model.items():
        if path not in saved:
            lines.append(f"{path}: not in the checkpoint, model {spec(wanted)}")
        elif saved[path] != wanted:
            lines.append(f"{path}: checkpoint {spec(saved[path])}, model {spec(wanted)}")
    extra = [path for path in saved if path not in model]
    lines += [f"{path}: checkpoint {spec(saved[path])}, not in the model" for path in extra]
    return lines


def sync_processes(name: str) -> None:
    """Waits until every process reaches this point (nothing on a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def write_atomic(path: pathlib.Path, data: bytes) -> None:
    """Writes `data` to a temporary file and renames it to `path` (never half a file)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


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
