"""One run per workdir: ``<workdir>/run.lock`` names the run holding it and is refreshed
while that run lives.

A second run on the same workdir stops at start-up naming the holder (host, pid). A lock
whose holder is gone is stale and taken over with a warning: on the same host when its
process no longer exists, on any host when it was not refreshed for ``STALE_AFTER_S``
(a hard-killed run on a machine that is gone), or whose refresh time lies more than that
ahead of this host's clock (a record from a wrong clock is not trusted forever). The lock is
created atomically where the storage allows (``storage.create_exclusive``). In a
multi-process job process 0 holds it for all processes.

The record holds a token unique to its holder, which checks it (``confirm``) before each
checkpoint save and at each refresh: a run whose lock was deleted or taken by another run
stops with a ``WorkdirError`` instead of writing on.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging
from etils import epath

from aa_flax import storage
from aa_flax.errors import WorkdirError
from aa_flax.workdir import LOCK_FILE

REFRESH_S = 60.0
STALE_AFTER_S = 600.0


def _process_exists(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # it exists, under another user
    return True
  return True


class WorkdirLock:
  """The lock file of one workdir: ``acquire()``, then ``release()`` (or a ``with`` block)."""

  def __init__(self, workdir: epath.Path):
    self.path = workdir / LOCK_FILE
    self._token = uuid.uuid4().hex
    self._stop = threading.Event()
    self._lost: str | None = None  # why the lock is no longer this run's, once seen
    self._refresher: threading.Thread | None = None

  def _record(self) -> str:
    return storage.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                          "token": self._token, "refreshed": time.time()})

  def _holder(self) -> dict[str, Any] | None:
    """The lock's content; ``None`` if there is no lock; ``{}`` if it is unreadable."""
    try:
      holder = json.loads(self.path.read_text())
      return holder if isinstance(holder, dict) else {}
    except FileNotFoundError:
      return None
    except IsADirectoryError:
      raise WorkdirError(f"{self.path} is a directory, not a lock file; remove it (this "
                         "path holds the lock of the run using the workdir).") from None
    except ValueError:
      return {}

  def _lost_reason(self) -> str | None:
    """Why the lock file no longer holds this run's token, or ``None`` if it does."""
    holder = self._holder()
    if holder is None:
      return "was deleted"
    if holder.get("token") != self._token:
      return (f"was taken by another run (host {holder.get('host')}, pid "
              f"{holder.get('pid')})")
    return None

  def confirm(self, action: str = "writing on") -> None:
    """Raises ``WorkdirError`` unless the lock file still holds this run's token."""
    self._lost = self._lost or self._lost_reason()
    if self._lost is not None:
      raise WorkdirError(
          f"The lock {self.path} of this run {self._lost}; {action}: another run may be "
          "using this workdir. Check that no other run uses it, then rerun to resume.")

  def acquire(self) -> None:
    """Takes the lock; raises ``WorkdirError`` naming the holder if a live run has it."""
    for _ in range(3):  # a stale lock costs one more round
      if storage.create_exclusive(self.path, self._record()):
        self._refresher = threading.Thread(target=self._refresh, daemon=True,
                                           name="aa_flax-workdir-lock")
        self._refresher.start()
        return
      holder = self._holder()
      if holder is None:  # released in between
        continue
      stale = _stale_reason(holder)
      if stale is None:
        age = time.time() - holder["refreshed"]
        raise WorkdirError(
            f"Workdir {self.path.parent} is in use by another run (host {holder['host']}, "
            f"pid {holder['pid']}, alive {age:.0f} s ago per {self.path}). Wait for it to "
            "finish or use another --workdir. If that run is gone, delete the lock file (a "
            f"lock not refreshed for {STALE_AFTER_S:.0f} s is ignored).")
      logging.warning("Taking over the lock %s: %s.", self.path, stale)
      if self._holder() == holder:  # not replaced meanwhile by a run that also saw it stale
        self.path.unlink(missing_ok=True)
    raise WorkdirError(f"Could not take the lock {self.path}: other runs keep taking it.")

  def _refresh(self) -> None:
    while not self._stop.wait(REFRESH_S):
      try:
        self._lost = self._lost_reason()
        if self._lost is not None:
          logging.warning("The lock %s %s; the run stops at its next save.", self.path,
                          self._lost)
          return
        storage.write_text(self.path, self._record())
      except Exception as error:  # noqa: BLE001 - keep refreshing through storage hiccups.
        logging.warning("Could not refresh the lock %s: %s", self.path, error)

  def release(self) -> None:
    self._stop.set()
    if self._refresher is not None:
      self._refresher.join()
    holder = self._holder()
    if holder and holder.get("token") == self._token:
      self.path.unlink(missing_ok=True)

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()


def _stale_reason(holder: dict[str, Any]) -> str | None:
  """Why the lock described by ``holder`` no longer protects a live run, or ``None``."""
  try:
    host, pid, age = holder["host"], int(holder["pid"]), time.time() - holder["refreshed"]
  except (KeyError, TypeError, ValueError):
    return f"its content {holder!r} is unreadable"
  if host == socket.gethostname() and not _process_exists(pid):
    return f"process {pid} on this host ({host}) no longer exists"
  if age > STALE_AFTER_S:
    return f"host {host} pid {pid} last refreshed it {age:.0f} s ago"
  if age < -STALE_AFTER_S:
    return (f"host {host} pid {pid} claims to have refreshed it {-age:.0f} s in the future "
            "(a wrong clock)")
  return None


@contextlib.contextmanager
def workdir_lock(workdir: epath.Path) -> Iterator[Callable[[str], None]]:
  """Holds ``workdir``'s lock for one job: process 0 takes it; every process raises the
  same ``WorkdirError`` if that fails. Yields ``confirm(action)``, which every process calls
  together: it raises ``WorkdirError`` on all of them unless process 0 still holds the lock
  (``action``, e.g. "not saving checkpoint step 20", says what is not done then)."""
  lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
  _on_every_process(lock.acquire if lock else None,
                    f"Process 0 could not lock {workdir / LOCK_FILE}; see its error.")

  def confirm(action: str) -> None:
    _on_every_process(functools.partial(lock.confirm, action) if lock else None,
                      f"Process 0 lost the lock {workdir / LOCK_FILE}; {action}.")

  try:
    yield confirm
  finally:
    if lock is not None:
      lock.release()


def _on_every_process(check: Callable[[], None] | None, elsewhere: str) -> None:
  """Runs ``check`` (on process 0; ``None`` elsewhere); if it raised ``WorkdirError``, every
  process raises: process 0 that error, the others one with the message ``elsewhere``."""
  error = None
  if check is not None:
    try:
      check()
    except WorkdirError as failure:
      error = failure
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not ok and error is None:
      error = WorkdirError(elsewhere)
  if error is not None:
    raise error
