"""SIGTERM (preemption notice) handling: a flag the training loop checks between steps."""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from absl import logging

# train.py's exit status after a preemption checkpoint (EX_TEMPFAIL: "try again later").
EXIT_PREEMPTED = 75


class PreemptionWatcher:
  """Records SIGTERM instead of dying; ``should_stop()`` is agreed by all processes.

  Installed only from the main thread (Python delivers signals there); elsewhere it only
  answers ``False``. ``close()`` (or leaving a ``with`` block) restores the previous handlers.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._received = threading.Event()
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for signum in signals:
        self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):  # noqa: ARG002 - signal handler signature
    logging.warning("Received signal %d: will checkpoint after the current step and exit.",
                    signum)
    self._received.set()

  def should_stop(self) -> bool:
    """True once any process got the signal (a collective when there are several)."""
    local = self._received.is_set()
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(local))))

  def __enter__(self) -> "PreemptionWatcher":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def close(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}
