"""The one metrics writer of training: metrics.jsonl and TensorBoard, process 0 only.

metrics.jsonl holds one strict-JSON row per logged step ({"step": updates done,
...}) and per validation; TensorBoard event files (tensorboardX, in
workdir/tensorboard) hold the same numbers as scalars, lists as one tag per exit.
On resuming from step s, the rows of later steps (written by a run killed after
its last checkpoint) are dropped from both, so a resumed run's metrics equal an
uninterrupted run's.
"""

import datetime
import importlib.metadata
import json
import os
import pathlib

import jax
import tensorboardX

ENVIRONMENT_FILE = "environment.jsonl"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def package_versions(names) -> dict[str, str | None]:
    """The installed version of each named package; None where it is absent."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def record_environment(workdir: pathlib.Path, start: int) -> dict:
    """Appends this sitting's software and machine to workdir/environment.jsonl: the
    step it starts from, the UTC time, the versions of PACKAGES, $XLA_FLAGS (as
    `import ee_jax` left them) and the devices. Numerics depend on all of them, so
    a run that does not reproduce can be traced to its sittings. Returns the row."""
    device = jax.devices()[0]
    row = {
        "start_step": start,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": package_versions(PACKAGES),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
    }
    with open(pathlib.Path(workdir) / ENVIRONMENT_FILE, "a") as file:
        file.write(json.dumps(row) + "\n")
    return row


class MetricsWriter:
    """Writes training metrics rows (module docstring); a no-op on processes > 0.

    Args:
      workdir: the run folder.
      start: the step training resumes from (0 for a fresh run).
      primary: whether this process writes (process 0 of several).
      tensorboard: also write TensorBoard event files.
    """

    def __init__(self, workdir: pathlib.Path, start: int, *, primary: bool, tensorboard: bool):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.primary = primary
        self.dropped_changes = self._truncate(start) if primary else []
        self.board = None
        if primary and tensorboard:
            # TensorBoard hides the events of steps > start that an earlier run logged
            # (a row's step counts updates, so the resumed run's first row is start + 1).
            self.board = tensorboardX.SummaryWriter(
                str(self.path.parent / "tensorboard"), purge_step=start + 1
            )

    def write(self, row: dict) -> None:
        """Appends `row` (strict JSON: no NaN or Infinity) and its scalars."""
        if not self.primary:
            return
        with open(self.path, "a") as file:
            file.write(json.dumps(row, allow_nan=False) + "\n")
        if self.board is None:
            return
        step = row["step"]
        for name, value in row.items():
            if name == "step" or value is None or isinstance(value, str | dict):
                continue
            prefix = "valid" if name.startswith("valid") else "train"
            if isinstance(value, list):
                for exit_index, item in enumerate(value):
                    if isinstance(item, int | float):
                        self.board.add_scalar(f"{prefix}/{name}/exit_{exit_index + 1}", item, step)
            else:
                self.board.add_scalar(f"{prefix}/{name}", value, step)
        self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()

    def _truncate(self, start: int) -> list[dict]:
        """Drops rows of steps after `start`; returns the config changes recorded in
        them (they still apply: config.json already holds the new settings)."""
        carried = []
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                if not line:
                    continue
                row = json.loads(line)
                if row["step"] <= start:
                    kept.append(line)
                else:
                    carried.extend(row.get("config_changes", []))
            self.path.write_text("".join(row + "\n" for row in kept))
        return carried
