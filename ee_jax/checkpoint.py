"""orbax checkpoints of the training state, with clear errors for damaged steps."""

import os
import pathlib

import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint cannot be restored (missing, damaged or from another model)."""


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
        self.manager.save(step, args=ocp.args.StandardSave(state))

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

    def close(self) -> None:
        self.manager.close()
