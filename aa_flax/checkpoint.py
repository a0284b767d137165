"""Checkpoints: orbax ``CheckpointManager`` with resume, corrupt-checkpoint fallback and
config checks.

A checkpoint step directory ``<workdir>/checkpoints/<step>/`` holds three items:
``state`` (the train state arrays, ``StandardSave``), ``extra`` (JSON: the data iterator
state and the open metric window) and ``config`` (JSON: the run's config). orbax writes a
step into a temporary directory and renames it when complete, so a run killed mid-save
leaves no half-written step behind; an unreadable complete step (a truncated file) is moved
to ``<workdir>/corrupt_checkpoints/`` and the previous step is used instead.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Any

import jax
from absl import logging

from aa_flax.errors import ConfigMismatchError, WorkdirError

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"


@dataclasses.dataclass
class Restored:
  """A restored checkpoint: its step, train state, extra JSON and saved config."""
  step: int
  state: Any
  extra: dict[str, Any]
  config: dict[str, Any]
  path: str


class Checkpointer:
  """Saves and restores ``(state, extra, config)`` under ``<workdir>/checkpoints``.

  Saves are asynchronous (when ``async_save``); ``wait()`` blocks until they are on disk.
  Every process must call ``save``/``restore`` together (orbax writes collectively).
  """

  def __init__(self, workdir: str, *, max_to_keep: int, async_save: bool = True):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    if jax.default_backend() == "cpu":
      # Replica-parallel saving slices each replicated array once per device and compiles a
      # slice per (shape, device): ~0.07 s each on CPU, i.e. seconds to minutes at the first
      # save of a state over simulated devices. CPU devices share one disk, so nothing is lost.
      ocp.type_handlers.register_type_handler(
          jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    self.workdir = os.path.abspath(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: Any, extra: dict[str, Any], config: dict[str, Any]) -> None:
    """Starts writing step ``step`` (a no-op if that step already exists)."""
    if step in self.manager.all_steps():
      return
    args = self._ocp.args
    self.manager.save(step, args=args.Composite(
        state=args.StandardSave(state), extra=args.JsonSave(extra),
        config=args.JsonSave(config)), force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def read_config(self, step: int) -> dict[str, Any]:
    args = self._ocp.args
    return self.manager.restore(step, args=args.Composite(config=args.JsonRestore()))["config"]

  def restore_latest(self, abstract_state: Any, check_config=None) -> Restored | None:
    """Restores the newest readable step, or returns ``None`` when there is none.

    ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings.
    ``check_config(saved_config_dict)`` runs before the state is read and may raise (e.g.
    ``ConfigMismatchError``); such errors propagate. A step whose files cannot be read is
    reported, and once an older step restores, moved to ``corrupt_checkpoints/``. If no step
    can be read, raises ``WorkdirError`` listing every failure and moves nothing.
    """
    failures = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        config = self.read_config(step)
      except Exception as error:  # noqa: BLE001 - any read failure means an unusable step.
        failures.append((step, error))
        logging.warning("Checkpoint step %d is unreadable (%s: %s); trying an older one.",
                        step, type(error).__name__, error)
        continue
      if check_config is not None:
        check_config(config)
      try:
        restored = self._restore_step(step, abstract_state)
      except Exception as error:  # noqa: BLE001
        failures.append((step, error))
        logging.warning("Checkpoint step %d is unreadable (%s: %s); trying an older one.",
                        step, type(error).__name__, error)
        continue
      self._quarantine([s for s, _ in failures])
      return dataclasses.replace(restored, config=config)
    if failures:
      details = "\n".join(f"  step {s}: {type(e).__name__}: {e}" for s, e in failures)
      raise WorkdirError(f"No checkpoint in {self.directory} could be restored:\n{details}\n"
                         "Move the directory away to start afresh.")
    return None

  def restore_path(self, path: str, abstract_state: Any) -> Restored:
    """Restores the checkpoint step directory ``path`` (for evaluation-only runs)."""
    import orbax.checkpoint as ocp
    path = os.path.abspath(path)
    if not os.path.isdir(os.path.join(path, "state")):
      raise WorkdirError(f"{path} is not a checkpoint step directory (it has no 'state' "
                         "item); pass e.g. <workdir>/checkpoints/<step>.")
    manager = ocp.CheckpointManager(os.path.dirname(path))
    try:
      step = int(os.path.basename(path))
    except ValueError as error:
      raise WorkdirError(f"{path}: a checkpoint step directory is named by its step.") from error
    args = ocp.args
    result = manager.restore(step, args=args.Composite(
        state=args.StandardRestore(abstract_state), extra=args.JsonRestore(),
        config=args.JsonRestore()))
    manager.close()
    return Restored(step, result["state"], result["extra"], result["config"], path)

  def _restore_step(self, step: int, abstract_state: Any) -> Restored:
    args = self._ocp.args
    result = self.manager.restore(step, args=args.Composite(
        state=args.StandardRestore(abstract_state), extra=args.JsonRestore()))
    return Restored(step, result["state"], result["extra"], {}, self.step_path(step))

  def _quarantine(self, steps: list[int]) -> None:
    """Moves unreadable steps out of the manager's directory (process 0), then reloads."""
    if not steps:
      return
    if jax.process_index() == 0:
      target_root = os.path.join(self.workdir, CORRUPT_DIR)
      os.makedirs(target_root, exist_ok=True)
      for step in steps:
        target = os.path.join(target_root, f"{step}-{int(time.time())}")
        shutil.move(self.step_path(step), target)
        logging.warning("Moved unreadable checkpoint step %d to %s.", step, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("aa_flax_quarantine")
    self.manager.reload()


def check_resume_config(saved: dict[str, Any], current, allow_mismatch: bool) -> None:
  """Raises ``ConfigMismatchError`` listing model/data keys that differ from the checkpoint."""
  from aa_flax.config_utils import resume_differences
  differences = resume_differences(saved, current)
  if not differences:
    return
  lines = "\n".join(f"  {key}: checkpoint {old!r} -> now {new!r}" for key, old, new in differences)
  if allow_mismatch:
    logging.warning("Resuming despite config changes (allow_config_mismatch=True):\n%s", lines)
    return
  raise ConfigMismatchError(
      "The workdir holds checkpoints of a run with a different model or data config:\n"
      f"{lines}\nUse a new --workdir, or pass --config.allow_config_mismatch=True to resume "
      "anyway.")


def check_workdir(workdir: str, required_bytes: int) -> None:
  """Raises ``WorkdirError`` if ``workdir`` cannot be created/written or lacks free space.

  ``required_bytes`` is what the checkpoints will need (state size x checkpoints kept + 1).
  """
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe.{jax.process_index()}.{os.getpid()}")
    with open(probe, "wb") as handle:
      handle.write(b"0" * 4096)
    os.remove(probe)
  except OSError as error:
    raise WorkdirError(f"Workdir {workdir} is not writable: {error}.") from error
  free = shutil.disk_usage(workdir).free
  if free < required_bytes:
    raise WorkdirError(
        f"Workdir {workdir} has {free / 2**20:.1f} MiB free but the checkpoints need about "
        f"{required_bytes / 2**20:.1f} MiB (config.keep_checkpoints + 1 copies of the train "
        "state). Free space, choose another --workdir or lower keep_checkpoints.")


def read_state_arrays(step_dir: str) -> dict[str, Any]:
  """The train state of checkpoint ``<workdir>/checkpoints/<step>`` as nested numpy arrays.

  For inspection and comparisons (no model or mesh needed): ``{'step', 'params',
  'batch_stats', 'opt_state'}``.
  """
  import numpy as np
  import orbax.checkpoint as ocp
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(os.path.join(step_dir, "state")).item_metadata
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    return checkpointer.restore(os.path.join(step_dir, "state"),
                                args=ocp.args.PyTreeRestore(restore_args=restore_args))
