"""Exceptions for mistakes a user can fix (bad config, bad data, bad workdir).

``train.py`` and the other command-line tools print these as one line without a traceback
(``exit_with_error``; ``AA_FLAX_TRACEBACK=1`` shows it) and exit non-zero; library users can
catch ``AAFlaxError`` or the built-in base each one also derives from (``ValueError``, ...).
"""

import os
import sys
import traceback
from typing import NoReturn


class AAFlaxError(Exception):
  """Base class of every user-facing aa_flax error."""


class ConfigError(AAFlaxError, ValueError):
  """A config value is invalid (unknown name, bad batch size, ...)."""


class DataError(AAFlaxError, ValueError):
  """Input data is malformed (wrong dtype, shape, labels out of range, empty)."""


class DatasetNotFoundError(AAFlaxError, FileNotFoundError):
  """A dataset that must be prepared or downloaded by hand is missing."""


class ConfigMismatchError(AAFlaxError, ValueError):
  """A workdir holds checkpoints of a run with a different model or data config."""


class WorkdirError(AAFlaxError, OSError):
  """The workdir is unwritable or lacks the disk space the checkpoints need."""


class NonFiniteError(AAFlaxError, FloatingPointError):
  """Training produced a non-finite loss or gradient."""


class VariableMismatchError(AAFlaxError, ValueError):
  """Variables (or a checkpoint) do not belong to the model they are used with."""


class StorageUnavailableError(AAFlaxError, OSError):
  """Workdir storage kept answering with transient errors (HTTP 5xx or 429, timeouts,
  dropped connections) for ``config.storage_retry_s``; nothing was moved or marked corrupt.
  ``train.py`` exits with status 75 (try again later)."""


class CorruptCheckpointError(WorkdirError):
  """A checkpoint's files are provably damaged: they differ from its digest, its digest is
  missing or unreadable, or its metadata does not parse."""


class PeerLostError(AAFlaxError, ConnectionError):
  """Another process of a multi-process job is gone (a collective with it failed)."""


TRACEBACK_VARIABLE = "AA_FLAX_TRACEBACK"


def print_error(error: BaseException) -> None:
  """One line ``error: <Type>: <message>`` on stderr, after the traceback behind it when the
  environment sets ``AA_FLAX_TRACEBACK=1`` (what every command-line tool prints on a user
  error)."""
  if os.environ.get(TRACEBACK_VARIABLE) == "1":
    traceback.print_exception(error, file=sys.stderr)
  print(f"error: {type(error).__name__}: {error}", file=sys.stderr, flush=True)


def exit_with_error(error: BaseException, status: int = 1) -> NoReturn:
  """``print_error(error)``, then exits with ``status``."""
  print_error(error)
  sys.exit(status)
