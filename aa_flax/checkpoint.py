"""Checkpoints: orbax ``CheckpointManager`` with digests, resume and corrupt-checkpoint
fallback, on local disks or cloud storage (``storage``).

A checkpoint step directory ``<workdir>/checkpoints/<step>/`` holds three items: ``state``
(the train state arrays, ``StandardSave``), ``extra`` (JSON: data position, open metric
window, ...) and ``config`` (JSON: the run's config), plus ``aa_flax_digest.json``
(``integrity``), written once every process has written its part and before orbax commits
the step. orbax writes a step into a temporary directory and renames it when complete (on
object stores it writes a commit marker last), so a run killed mid-save leaves no half-written
step behind. A complete step that cannot be read, or whose files differ from its digest, is
moved to ``<workdir>/corrupt_checkpoints/`` and the previous step is used instead.
"""

from __future__ import annotations

import dataclasses
import logging as python_logging
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from etils import epath

from aa_flax import integrity, storage
from aa_flax.errors import ConfigMismatchError, WorkdirError

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"
QUARANTINE_REASON_FILE = "aa_flax_quarantine_reason.txt"


@dataclasses.dataclass
class Restored:
  """A restored checkpoint: its step, train state, extra JSON and saved config."""
  step: int
  state: Any
  extra: dict[str, Any]
  config: dict[str, Any]
  path: epath.Path


def _first_line(error: BaseException, limit: int = 300) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:limit] if text else ''}"


def _quietly(function: Callable, *args, **kwargs) -> Any:
  """Calls ``function`` with orbax's warnings about the type handler it replaces muted."""
  def not_an_override_notice(record) -> bool:
    return "overriding" not in str(record.msg)
  absl_logger = python_logging.getLogger("absl")
  absl_logger.addFilter(not_an_override_notice)
  try:
    return function(*args, **kwargs)
  finally:
    absl_logger.removeFilter(not_an_override_notice)


class Checkpointer:
  """Saves and restores ``(state, extra, config)`` under ``<workdir>/checkpoints``.

  Saves are asynchronous (when ``async_save``); ``wait()`` blocks until they are committed.
  A failed save raises ``WorkdirError`` from ``save``, ``wait`` or ``check_for_errors``.
  Every process must call ``save``/``restore`` together (orbax writes collectively).
  """

  def __init__(self, workdir: epath.Path, *, max_to_keep: int, async_save: bool = True):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    if jax.default_backend() == "cpu":
      # Replica-parallel saving slices each replicated array once per device and compiles a
      # slice per (shape, device): ~0.07 s each on CPU, i.e. seconds to minutes at the first
      # save of a state over simulated devices. CPU devices share one disk, so nothing is lost.
      _quietly(ocp.type_handlers.register_type_handler, jax.Array,
               ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
    self.workdir = workdir
    self.directory = workdir / CHECKPOINT_DIR
    self._async_save = async_save
    self._saving_step: int | None = None
    # Saves always run through orbax's async machinery: it offers the hook that writes the
    # digest between the last write and the commit. A synchronous save then waits.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True,
        cleanup_tmp_directories=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_digest))
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def _write_digest(self) -> None:
    """orbax calls this on process 0 after every process wrote its part, before the commit."""
    from orbax.checkpoint.path import atomicity_types
    step = self._saving_step
    temporary = self.directory / f"{step}{atomicity_types.TMP_DIR_SUFFIX}"
    integrity.write_digest(temporary if temporary.exists() else self.step_path(step))

  def save(self, step: int, state: Any, extra: dict[str, Any], config: dict[str, Any]) -> None:
    """Starts writing step ``step`` (a no-op if that step already exists)."""
    if step in self.manager.all_steps():
      return
    self.wait()  # the digest hook reads _saving_step: one save at a time
    self._saving_step = step
    args = self._ocp.args
    try:
      self.manager.save(step, args=args.Composite(
          state=args.StandardSave(state), extra=args.JsonSave(storage.finite_or_none(extra)),
          config=args.JsonSave(storage.finite_or_none(config))), force=True)
    except Exception as error:  # noqa: BLE001 - storage errors come in many types.
      raise self._save_error(step, error) from error
    if not self._async_save:
      self.wait()

  def wait(self) -> None:
    """Blocks until the save in flight is committed; raises ``WorkdirError`` if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as error:  # noqa: BLE001
      raise self._save_error(self._saving_step, error) from error

  def check_for_errors(self) -> None:
    """Raises ``WorkdirError`` if a background save already failed. Blocks only for a save
    other processes finished first; a collective when there are several processes."""
    finished = not self.manager.is_saving_in_progress()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      finished = bool(np.any(multihost_utils.process_allgather(np.int32(finished))))
    if finished:
      self.wait()

  def _save_error(self, step: int | None, error: Exception) -> WorkdirError:
    self.manager.reload()  # what is on disk now
    complete = [s for s in self.manager.all_steps() if s != step]
    last = str(self.step_path(max(complete))) if complete else "none"
    cause = ("no space left on device" if "No space left on device" in str(error)
             else _first_line(error))
    return WorkdirError(f"Saving checkpoint step {step} in {self.directory} failed ({cause}). "
                        f"Last complete checkpoint: {last}. Fix the cause (e.g. free space) "
                        "and rerun to resume from it.")

  def close(self) -> None:
    """Waits for the save in flight (a failure is logged: ``wait`` reports it) and closes."""
    try:
      self.manager.close()
    except Exception as error:  # noqa: BLE001 - an exception may already be propagating.
      logging.warning("Closing the checkpoint manager: %s", _first_line(error))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def step_path(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def restore_latest(self, abstract_state: Any,
                     check_resume: Callable[[dict[str, Any], dict[str, Any]], None] | None = None
                     ) -> Restored | None:
    """Restores the newest usable step, or returns ``None`` when there is none.

    ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings.
    ``check_resume(saved_config, saved_extra)`` runs before the state is read and may raise
    (e.g. ``ConfigMismatchError``); such errors propagate. A step whose files differ from its
    digest or cannot be read is reported and, once an older step restores, moved to
    ``corrupt_checkpoints/``. An intact step (digest verified) whose state does not fit
    ``abstract_state`` raises ``ConfigMismatchError``. If no step can be read, raises
    ``WorkdirError`` listing every failure and moves nothing.
    """
    failures: list[tuple[int, Exception]] = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        verified = self._verify(step)
        saved = self._restore_items(step, config=self._ocp.args.JsonRestore(),
                                    extra=self._ocp.args.JsonRestore())
      except Exception as error:  # noqa: BLE001 - any read failure means an unusable step.
        self._report_unusable(step, error, failures)
        continue
      if check_resume is not None:
        check_resume(saved["config"], saved["extra"])
      try:
        state = self._restore_items(
            step, state=self._ocp.args.StandardRestore(abstract_state))["state"]
      except Exception as error:  # noqa: BLE001
        if verified:
          raise ConfigMismatchError(
              f"Checkpoint {self.step_path(step)} is intact (its files match their digest) "
              "but its train state does not fit the current model and optimizer "
              f"({_first_line(error)}). Resume with the config it was written with "
              "(its 'config' item), or use a new --workdir.") from None
        self._report_unusable(step, error, failures)
        continue
      self._quarantine(failures)
      return Restored(step, state, saved["extra"], saved["config"], self.step_path(step))
    if failures:
      details = "\n".join(f"  step {s}: {_first_line(e)}" for s, e in failures)
      raise WorkdirError(f"No checkpoint in {self.directory} could be restored:\n{details}\n"
                         "Move the directory away to start afresh.")
    return None

  def restore_path(self, location: str, abstract_state: Any) -> Restored:
    """Restores the checkpoint step directory ``location`` (for evaluation-only runs)."""
    step_dir, step = _step_directory(location)
    try:
      integrity.verify_digest(step_dir)
    except integrity.DigestMismatchError as error:
      raise WorkdirError(f"Checkpoint {step_dir} is corrupt: {error}") from error
    args = self._ocp.args
    with self._ocp.CheckpointManager(step_dir.parent) as manager:
      result = manager.restore(step, args=args.Composite(
          state=args.StandardRestore(abstract_state), extra=args.JsonRestore(),
          config=args.JsonRestore()))
    return Restored(step, result["state"], result["extra"], result["config"], step_dir)

  def restore_path_as_saved(self, location: str, sharding) -> Restored:
    """Restores the step directory ``location`` with the shapes it was saved with (read from
    its metadata) instead of the current model's: ``state`` is a dict of ``step``,
    ``params``, ``batch_stats`` and ``opt_state`` arrays placed with ``sharding``. For moving
    a checkpoint to another image size (``aa_flax.resolution``)."""
    import orbax.checkpoint as ocp
    state_dir = _step_directory(location)[0] / "state"
    try:
      with ocp.PyTreeCheckpointer() as reader:
        metadata = reader.metadata(state_dir).item_metadata
      if metadata is None:
        raise ValueError("no metadata")
    except Exception as error:  # noqa: BLE001 - an unreadable item
      raise WorkdirError(f"Cannot read the train state of checkpoint {storage.path(location)} "
                         f"({_first_line(error)}).") from error
    saved = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                           sharding=sharding), metadata)
    return self.restore_path(location, saved)

  def _verify(self, step: int) -> bool:
    verified = integrity.verify_digest(self.step_path(step))
    if not verified:
      logging.warning("Checkpoint step %d has no digest (written by an earlier version); "
                      "restoring it unchecked.", step)
    return verified

  def _restore_items(self, step: int, **items) -> dict[str, Any]:
    return self.manager.restore(step, args=self._ocp.args.Composite(**items))

  @staticmethod
  def _report_unusable(step: int, error: Exception, failures: list) -> None:
    failures.append((step, error))
    logging.warning("Checkpoint step %d is unreadable (%s); trying an older one.", step,
                    _first_line(error))

  def _quarantine(self, failures: list[tuple[int, Exception]]) -> None:
    """Moves unusable steps out of the manager's directory (process 0), then reloads."""
    if not failures:
      return
    if jax.process_index() == 0:
      target_root = self.workdir / CORRUPT_DIR
      target_root.mkdir(parents=True, exist_ok=True)
      for step, error in failures:
        target = target_root / f"{step}-{int(time.time())}"
        storage.move_tree(self.step_path(step), target)
        (target / QUARANTINE_REASON_FILE).write_text(f"{_first_line(error, 2000)}\n")
        logging.warning("Moved unusable checkpoint step %d to %s.", step, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("aa_flax_quarantine")
    self.manager.reload()


def _step_directory(location: str) -> tuple[epath.Path, int]:
  """``(path, step)`` of a checkpoint step directory; ``WorkdirError`` if it is not one."""
  step_dir = storage.path(location)
  if not (step_dir / "state").exists():
    raise WorkdirError(f"{step_dir} is not a checkpoint step directory (it has no 'state' "
                       "item); pass e.g. <workdir>/checkpoints/<step>.")
  try:
    return step_dir, int(step_dir.name)
  except ValueError as error:
    raise WorkdirError(f"{step_dir}: a checkpoint step directory is named by its step."
                       ) from error


def read_state_arrays(step_dir: str) -> dict[str, Any]:
  """The train state of checkpoint ``<workdir>/checkpoints/<step>`` as nested numpy arrays.

  For inspection and comparisons (no model or mesh needed): ``{'step', 'params',
  'batch_stats', 'opt_state'}``.
  """
  import numpy as np
  import orbax.checkpoint as ocp
  state_dir = storage.path(step_dir) / "state"
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(state_dir).item_metadata
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    return checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
