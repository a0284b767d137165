"""Exceptions for mistakes a user can fix (bad config, bad data, bad workdir).

``train.py`` prints these without a traceback and exits non-zero; library users can catch
``AAFlaxError`` or the built-in base each one also derives from (``ValueError``, ...).
"""


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


class PeerLostError(AAFlaxError, ConnectionError):
  """Another process of a multi-process job is gone (a collective with it failed)."""
