"""Checkpoints: orbax ``CheckpointManager`` with digests, resume and corrupt-checkpoint
fallback, on local disks or cloud storage (``storage``).

A checkpoint step directory ``<workdir>/checkpoints/<step>/`` holds three items: ``state``
(the train state arrays, ``StandardSave``), ``extra`` (JSON: data position, open metric
window, ...) and ``config`` (JSON: the run's config), plus ``aa_flax_digest.json``
(``integrity``), written once every process has written its part and before orbax commits
the step. orbax writes a step into a temporary directory and renames it when complete (on
object stores it writes a commit marker last), so a run killed mid-save leaves no half-written
step behind.

Every read of a checkpoint (resume, eval-only, fine-tuning, the tools) is a verified read:
the files are checked against the digest first, then restored. A step that is provably
damaged (files that differ from the digest, a missing or unreadable digest, metadata that does
not parse) is moved to ``<workdir>/corrupt_checkpoints/`` and a resume uses the previous step.
A storage outage is not damage: reads and writes are retried (``storage.retrying``) and, if
the storage stays unavailable, ``StorageUnavailableError`` ends the run with nothing moved.
In a multi-process job process 0 verifies and chooses the step (and alone moves damaged ones);
every process restores that step, or all stop with the same error.
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

from aa_flax import errors, integrity, storage
from aa_flax.errors import (AAFlaxError, ConfigMismatchError, CorruptCheckpointError,
                            WorkdirError)
from aa_flax.workdir import CHECKPOINT_DIR, CORRUPT_DIR

QUARANTINE_REASON_FILE = "aa_flax_quarantine_reason.txt"


@dataclasses.dataclass
class Restored:
  """A restored checkpoint: its step, train state, extra JSON and saved config."""
  step: int
  state: Any
  extra: dict[str, Any]
  config: dict[str, Any]
  path: epath.Path


_first_line = storage.first_line
_MESSAGE_BYTES = 4096  # an error shared between processes: "<type name>\n<message>", UTF-8
# orbax notices that say nothing to a user: the type handler replaced below, and the missing
# step metadata when an item directory (``<step>/state``) is read on its own.
_MUTED_NOTICES = ("overriding", "Metadata file does not exist")


def _quietly(function: Callable, *args, **kwargs) -> Any:
  """Calls ``function`` with orbax's notices in ``_MUTED_NOTICES`` muted."""
  def not_an_override_notice(record) -> bool:
    return not any(notice in str(record.msg) for notice in _MUTED_NOTICES)
  absl_logger = python_logging.getLogger("absl")
  absl_logger.addFilter(not_an_override_notice)
  try:
    return function(*args, **kwargs)
  finally:
    absl_logger.removeFilter(not_an_override_notice)


class Checkpointer:
  """Saves and restores ``(state, extra, config)`` under ``<workdir>/checkpoints``.

  Saves are asynchronous (when ``async_save``); ``wait()`` blocks until they are committed.
  A failed save raises ``WorkdirError`` (``StorageUnavailableError`` for an outage) from
  ``save``, ``wait`` or ``check_for_errors``. Every process must call ``save``/``restore``
  together (orbax writes collectively).
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
    _bound_tensorstore_retries(storage.retry_seconds())
    self.workdir = workdir
    self.directory = workdir / CHECKPOINT_DIR
    self._async_save = async_save
    self._saving_step: int | None = None
    # Saves always run through orbax's async machinery: it offers the hook that writes the
    # digest between the last write and the commit. A synchronous save then waits.
    # The constructor lists the steps, retried through outages; it holds no barrier (orbax's
    # create=True and save_root_metadata add one each), so a retry on one process cannot
    # mismatch the other processes' barriers. The directory is created here instead.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=False, save_root_metadata=False,
        enable_async_checkpointing=True,
        cleanup_tmp_directories=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_digest))
    error = None
    try:
      storage.retrying(f"Creating {self.directory}", self.directory.mkdir, parents=True,
                       exist_ok=True)
      self.manager = storage.retrying(f"Listing {self.directory}", ocp.CheckpointManager,
                                      self.directory, options=options)
    except Exception as failure:  # noqa: BLE001 - shared with the other processes below
      error = failure
    _agree(error)

  def _write_digest(self) -> None:
    """orbax calls this on process 0 after every process wrote its part, before the commit."""
    from orbax.checkpoint.path import atomicity_types
    step = self._saving_step
    temporary = self.directory / f"{step}{atomicity_types.TMP_DIR_SUFFIX}"
    exists = storage.retrying(f"Reading {temporary}", temporary.exists)
    integrity.write_digest(temporary if exists else self.step_path(step))

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

  def _save_error(self, step: int | None, error: Exception) -> AAFlaxError:
    if isinstance(error, AAFlaxError):  # raised by the digest hook (storage.retrying)
      return error
    if storage.is_transient(error):  # tensorstore and gcsfs retried it already
      return storage.unavailable(f"Saving checkpoint step {step} in {self.directory}", error)
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
    """Restores the newest intact step, or returns ``None`` when there is none.

    ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings.
    Process 0 chooses the step: the newest whose files match its digest; newer ones that are
    provably damaged are moved to ``corrupt_checkpoints/``. ``check_resume(saved_config,
    saved_extra)`` runs on the chosen step before its state is read and may raise (e.g.
    ``ConfigMismatchError``). Every process then restores that step. An intact step whose
    state does not fit ``abstract_state`` raises ``ConfigMismatchError``; if steps exist but
    none is intact, ``WorkdirError`` lists them and nothing is moved. Storage outages are
    retried, then raise ``StorageUnavailableError`` (nothing moved). Any error is raised on
    every process with the same message.
    """
    chosen, error = None, None
    if jax.process_index() == 0:
      try:
        chosen = self._choose_step(check_resume)
      except Exception as failure:  # noqa: BLE001 - shared with the other processes below
        error = failure
    _agree(error)
    chosen = _broadcast_step(chosen)
    if chosen is None:
      return None
    restored = None
    try:
      if jax.process_index() != 0:
        self._reload()  # process 0 may have moved damaged steps away
      saved = self._read_json_items(chosen)
      state = self._read_state(chosen, abstract_state)
      restored = Restored(chosen, state, saved["extra"], saved["config"],
                          self.step_path(chosen))
    except Exception as failure:  # noqa: BLE001 - shared with the other processes below
      error = failure
    _agree(error)
    return restored

  def _choose_step(self, check_resume) -> int | None:
    """The newest intact step (process 0 alone); moves damaged newer ones away."""
    damaged: list[tuple[int, Exception]] = []
    for step in sorted(self._reload(), reverse=True):
      try:
        self._verify(self.step_path(step))
        saved = self._read_json_items(step)
      except CorruptCheckpointError as error:
        damaged.append((step, error))
        logging.warning("Checkpoint step %d is unreadable (%s); trying an older one.", step,
                        _first_line(error.__cause__ or error))
        continue
      if check_resume is not None:
        check_resume(saved["config"], saved["extra"])
      self._quarantine(damaged)
      return step
    if damaged:
      details = "\n".join(f"  step {s}: {_first_line(e.__cause__ or e)}" for s, e in damaged)
      raise WorkdirError(f"No checkpoint in {self.directory} could be restored:\n{details}\n"
                         "Move the directory away to start afresh.")
    return None

  def _verify(self, step_dir: epath.Path) -> None:
    verify(step_dir)

  def _reload(self) -> list[int]:
    """The steps on storage now (re-listed; retried through outages)."""
    def reload():
      self.manager.reload()
      return list(self.manager.all_steps())
    return storage.retrying(f"Listing {self.directory}", reload)

  def _read_json_items(self, step: int) -> dict[str, Any]:
    return _read_json_items(self.step_path(step))

  def _read_state(self, step: int, abstract_state: Any) -> Any:
    try:
      return storage.retrying(f"Reading checkpoint {self.step_path(step)}", _restore_state,
                              self.step_path(step), abstract_state)
    except ValueError as error:  # orbax: tree structures or shapes that do not match
      raise ConfigMismatchError(
          f"Checkpoint {self.step_path(step)} is intact (its files match their digest) "
          "but its train state does not fit the current model and optimizer "
          f"({_first_line(error)}). Resume with the config it was written with "
          "(its 'config' item), or use a new --workdir.") from None  # orbax's traceback adds nothing

  def _quarantine(self, damaged: list[tuple[int, Exception]]) -> None:
    """Moves provably damaged steps to ``corrupt_checkpoints/`` (process 0 only)."""
    if not damaged:
      return
    target_root = self.workdir / CORRUPT_DIR
    if storage.retrying(f"Reading {target_root}", target_root.exists) and \
        not storage.retrying(f"Reading {target_root}", target_root.is_dir):
      raise WorkdirError(f"{target_root} exists but is not a directory; damaged checkpoints "
                         "are moved there: move that file away and rerun.")
    storage.retrying(f"Creating {target_root}", target_root.mkdir, parents=True,
                     exist_ok=True)
    for step, error in damaged:
      target = target_root / f"{step}-{int(time.time())}"
      storage.move_tree(self.step_path(step), target)
      storage.write_text(target / QUARANTINE_REASON_FILE,
                         f"{_first_line(error.__cause__ or error, 2000)}\n")
      logging.warning("Moved damaged checkpoint step %d to %s.", step, target)
    self._reload()


def restore_as_saved(location: str, sharding) -> Restored:
  """Restores the step directory ``location`` (digest verified first) with the shapes it was
  saved with (read from its metadata) instead of the current model's: ``state`` is a dict of
  ``step``, ``params``, ``batch_stats`` and ``opt_state`` arrays placed with ``sharding``.
  For evaluation-only runs, fine-tuning and moving a checkpoint to another image size
  (``aa_flax.workdir.load_variables``). Process 0 verifies; every process reads; an error is
  raised on every process with the same message. Nothing is moved."""
  _bound_tensorstore_retries(storage.retry_seconds())
  step_dir, error, restored = storage.path(location), None, None
  if jax.process_index() == 0:
    try:
      verify(_step_directory(location)[0])
    except Exception as failure:  # noqa: BLE001 - shared with the other processes below
      error = failure
  _agree(error)
  step = int(step_dir.name)  # checked by process 0
  try:
    metadata = _state_metadata(step_dir)
    saved = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                           sharding=sharding), metadata)
    state = _read_item(step_dir, lambda: _restore_state(step_dir, saved))
    items = _read_json_items(step_dir)
    restored = Restored(step, state, items["extra"], items["config"], step_dir)
  except Exception as failure:  # noqa: BLE001 - shared with the other processes below
    error = failure
  _agree(error)
  return restored


def verify(step_dir: epath.Path) -> None:
  """Checks the files of checkpoint step directory ``step_dir`` against its digest.

  Raises ``CorruptCheckpointError`` (caused by ``integrity.DigestMismatchError``) if they
  differ or the digest is missing or unreadable; ``StorageUnavailableError`` if the storage
  stays unavailable (``storage.retrying``).
  """
  try:
    integrity.verify_digest(step_dir)
  except integrity.DigestMismatchError as error:
    raise CorruptCheckpointError(f"Checkpoint {step_dir} is corrupt: {error}") from error


def _read_item(step_dir: epath.Path, read: Callable[[], Any]) -> Any:
  """``read()`` retried through outages; a failure to parse is ``CorruptCheckpointError``
  (a local ``OSError`` such as EIO or EACCES stays a ``WorkdirError``: not proven damage)."""
  try:
    return storage.retrying(f"Reading checkpoint {step_dir}", _quietly, read)
  except AAFlaxError:
    raise
  except OSError as error:
    raise WorkdirError(f"Cannot read checkpoint {step_dir} ({_first_line(error)}).") from error
  except (ValueError, KeyError) as error:  # JSON, tensorstore and orbax metadata parse errors
    raise CorruptCheckpointError(f"Checkpoint {step_dir} is corrupt: its metadata does not "
                                 f"parse ({_first_line(error)}).") from error


# Items are read through orbax's item handlers: unlike the manager's and the checkpointers'
# restore they hold no barrier, so a process can read (and retry) on its own.
def _read_json_items(step_dir: epath.Path) -> dict[str, Any]:
  """``{'config', 'extra'}`` of a step; ``CorruptCheckpointError`` if they do not parse."""
  import orbax.checkpoint as ocp
  handler = ocp.JsonCheckpointHandler()
  return {name: _read_item(step_dir, lambda name=name: handler.restore(step_dir / name))
          for name in ("config", "extra")}


def _restore_state(step_dir: epath.Path, abstract_state: Any) -> Any:
  """The ``state`` item restored as ``abstract_state`` (``jax.ShapeDtypeStruct`` leaves
  with shardings)."""
  import orbax.checkpoint as ocp
  handler = ocp.StandardCheckpointHandler()
  try:
    return handler.restore(step_dir / "state", args=ocp.args.StandardRestore(abstract_state))
  finally:
    handler.close()


def _state_metadata(step_dir: epath.Path) -> Any:
  """The tree of the ``state`` item's array metadata (shapes, dtypes), as saved."""
  import orbax.checkpoint as ocp

  def read():
    handler = ocp.PyTreeCheckpointHandler()
    try:
      metadata = handler.metadata(step_dir / "state")
    finally:
      handler.close()
    if metadata is None:
      raise ValueError("no tree metadata")
    return metadata
  return _read_item(step_dir, read)


def _agree(error: Exception | None) -> None:
  """Raises on every process if ``error`` is set on any: this process's own error, or the
  first failing process's (same type and message: every process prints the same line). A
  collective when there are several processes."""
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return
  from jax.experimental import multihost_utils
  mine = np.zeros(_MESSAGE_BYTES, np.uint8)
  if error is not None:
    text = f"{type(error).__name__}\n{error}".encode()[:_MESSAGE_BYTES - 1]
    mine[:len(text)] = np.frombuffer(text, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(mine))
  if error is not None:
    raise error
  for process, row in enumerate(gathered):
    if row[0]:
      name, _, message = bytes(row).rstrip(b"\0").decode(errors="replace").partition("\n")
      kind = getattr(errors, name, None)
      if isinstance(kind, type) and issubclass(kind, AAFlaxError):
        raise kind(message)
      raise WorkdirError(f"Process {process} failed: {name}: {message.splitlines()[0]}")


def _broadcast_step(step: int | None) -> int | None:
  """Process 0's ``step`` on every process (a collective when there are several)."""
  if jax.process_count() == 1:
    return step
  from jax.experimental import multihost_utils
  value = int(multihost_utils.broadcast_one_to_all(np.int64(-1 if step is None else step)))
  return None if value < 0 else value


def _bound_tensorstore_retries(retry_s: float) -> None:
  """Makes tensorstore (orbax's array reads and writes) retry an unavailable object store
  for about ``retry_s`` instead of its own default of many minutes. orbax builds each
  tensorstore context from these module dicts."""
  from orbax.checkpoint._src.serialization import tensorstore_utils
  initial, longest = 1.0, min(32.0, max(1.0, retry_s / 4))
  delays, delay = 0.0, initial
  attempts = 1
  while delays < retry_s:
    delays += delay
    delay = min(2 * delay, longest)
    attempts += 1
  retries = {"max_retries": attempts, "initial_delay": f"{initial}s",
             "max_delay": f"{longest}s"}
  for context in (tensorstore_utils._BASE_TS_CONTEXT,  # noqa: SLF001
                  tensorstore_utils._DEFAULT_OCDBT_TS_CONTEXT):  # noqa: SLF001
    context["gcs_request_retries"] = dict(retries)
    context["s3_request_retries"] = dict(retries)


def _step_directory(location: str) -> tuple[epath.Path, int]:
  """``(path, step)`` of a checkpoint step directory; ``WorkdirError`` if it is not one."""
  step_dir = storage.path(location)
  if not storage.retrying(f"Reading {step_dir}", (step_dir / "state").exists):
    raise WorkdirError(f"{step_dir} is not a checkpoint step directory (it has no 'state' "
                       "item); pass e.g. <workdir>/checkpoints/<step>.")
  try:
    return step_dir, int(step_dir.name)
  except ValueError as error:
    raise WorkdirError(f"{step_dir}: a checkpoint step directory is named by its step."
                       ) from error


def read_state_arrays(step_dir: str) -> dict[str, Any]:
  """The train state of checkpoint ``<workdir>/checkpoints/<step>`` as nested numpy arrays,
  digest verified first (``verify``).

  For inspection, tools and comparisons (no model or mesh needed): ``{'step', 'params',
  'batch_stats', 'opt_state'}``. Raises ``CorruptCheckpointError``, ``WorkdirError`` (not a
  step directory) or ``StorageUnavailableError``.
  """
  import orbax.checkpoint as ocp
  _bound_tensorstore_retries(storage.retry_seconds())
  directory, _ = _step_directory(step_dir)
  verify(directory)
  metadata = _state_metadata(directory)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)

  def read():
    with ocp.PyTreeCheckpointer() as checkpointer:
      return checkpointer.restore(directory / "state",
                                  args=ocp.args.PyTreeRestore(restore_args=restore_args))
  return _read_item(directory, read)
